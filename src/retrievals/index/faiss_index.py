"""A faiss index over a vectors folder: built shard by shard, saved so it opens memory-mapped, with the
row -> id mapping in an Arrow file (memory-mapped too) and a manifest tying it to the model and to the
vectors folder's shards. Every index scores with the model's similarity: the inner product of the query
with the stored vectors (:func:`.shards.stored_vectors`), as in-memory search does."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .exact import exact_search_shards
from .manifest import VectorsManifest, write_json_atomic
from .shards import iter_shards, stored_vectors

logger = logging.getLogger(__name__)

INDEX_NAME, IDS_NAME, INDEX_MANIFEST = "index.faiss", "ids.arrow", "index.json"
INDEX_TYPES = ("auto", "flat", "ivf", "ivf_sq8", "ivf_pq")
FLAT_BELOW = 1_000_000  # "auto" picks exact search below this many vectors, IVF above
TARGET_RECALL = 0.998  # nprobe (unless given): the smallest reaching this share of the all-lists recall@10
QUERY_COSINE = 0.4  # tuning queries: sampled vectors turned away to this cosine (see tuning_queries)
FORMAT_VERSION = 2  # 2: the model's inner product (1 normalised the vectors of a model that does not; +-1 bits)


@dataclass
class IndexManifest:
    index_type: str
    factory: str
    count: int
    dimension: int
    nlist: Optional[int]
    nprobe: Optional[int]
    expected_recall_at_10: Optional[float]
    recall_sample: int
    build_seconds: float
    vectors: dict  # the vectors manifest's model, fingerprint, dtype, instruction, folder, shards_digest
    normalized_here: bool = False  # format 1 only: vectors (and queries) L2-normalised by the index
    format_version: int = 1


def shards_digest(manifest: VectorsManifest) -> str:
    """A hash of a vectors folder's shard list (names, rows, checksums): another corpus, or the same corpus
    encoded again, gives another digest even with as many rows and the same model."""
    shards = sorted(manifest.shards, key=lambda s: s.first_row)
    return hashlib.sha256(json.dumps([[s.name, s.first_row, s.rows, s.sha256] for s in shards]).encode()).hexdigest()[:16]


def choose_index(count: int, index_type: str = "auto", nlist: Optional[int] = None,
                 nprobe: Optional[int] = None, dimension: int = 384) -> Tuple[str, str, Optional[int], Optional[int]]:
    """``(type, faiss factory string, nlist, nprobe)``. IVF: ``nlist`` ~ 4 sqrt(n) (a power of two, at most
    n / 39 so every list can train); ``nprobe`` stays ``None`` unless given: :func:`build_index` tunes it."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index type {index_type!r}; valid types are: {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        index_type = "flat" if count < FLAT_BELOW else "ivf"
    if index_type == "flat":
        return "flat", "Flat", None, None
    if nlist is None:
        nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(count)))))
        while nlist > 1 and nlist * 39 > count:
            nlist //= 2
    if nlist < 1 or nlist > count:
        raise ValueError(f"nlist must be between 1 and the number of vectors ({count}), got {nlist}")
    nprobe = min(nlist, nprobe) if nprobe else None
    coder = {"ivf": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{_pq_size(dimension)}x4fs"}[index_type]
    return index_type, f"IVF{nlist},{coder}", nlist, nprobe


def _pq_size(dimension: int) -> int:
    """Sub-quantisers of IVF-PQ (4-bit fast-scan codes): dimension / 4, i.e. 96 for 384-d = 48 bytes per
    vector, a divisor of the dimension. (8-bit PQ48, the same bytes, took 190 s to train on 5k vectors
    here, fast-scan 1 s, and it searches faster.)"""
    m = max(1, dimension // 4)
    while dimension % m:
        m -= 1
    return m


def _training_sample(folder: str, manifest: VectorsManifest, size: int, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(manifest.count, size=min(size, manifest.count), replace=False))
    parts = []
    for info, shard in iter_shards(folder, manifest, columns=("embedding",)):
        local = rows[(rows >= info.first_row) & (rows < info.first_row + info.rows)] - info.first_row
        if len(local):
            parts.append(stored_vectors(shard["embedding"], manifest)[local])
    return np.concatenate(parts)


def tuning_queries(folder: str, manifest: VectorsManifest, size: int, seed: int,
                   cosine: float = QUERY_COSINE) -> np.ndarray:
    """Queries to tune ``nprobe`` on: sampled stored vectors, each turned by a random direction to ``cosine``
    with itself (its norm kept). A stored vector as its own query is optimistic: it sits in the list probed
    first, with its neighbours. all-MiniLM-L6-v2, 800 SciFact documents, IVF16, recall@10 at nprobe 1/2/4/8:
    stored 0.612/0.764/0.891/0.971, real queries 0.487/0.670/0.837/0.953, turned to 0.4 0.498/0.665/0.828/0.957."""
    x = _training_sample(folder, manifest, size, seed)
    noise = np.random.default_rng(seed + 7).standard_normal(x.shape).astype(np.float32)
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    unit = x / norms
    noise -= (noise * unit).sum(axis=1, keepdims=True) * unit
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray((cosine * unit + math.sqrt(1 - cosine ** 2) * noise) * norms, dtype=np.float32)


def build_index(vectors_dir: str, output_dir: str, index_type: str = "auto", nlist: Optional[int] = None,
                nprobe: Optional[int] = None, train_size: Optional[int] = None, recall_sample: int = 500,
                target_recall: float = TARGET_RECALL,
                seed: int = 0) -> IndexManifest:
    """Build, save and describe an index; peak memory is about two shards plus the index itself."""
    import faiss
    import pyarrow as pa

    started = time.perf_counter()
    vectors = VectorsManifest.load(vectors_dir)
    kind, factory, nlist, nprobe = choose_index(vectors.count, index_type, nlist, nprobe, vectors.dimension)
    index = faiss.index_factory(vectors.dimension, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        size = train_size or min(vectors.count, max(40 * nlist, 10_000))  # faiss asks >= 39 per list
        index.train(_training_sample(vectors_dir, vectors, size, seed))
    os.makedirs(output_dir, exist_ok=True)
    ids_tmp = os.path.join(output_dir, IDS_NAME + ".tmp")
    schema = pa.schema([("id", pa.string())])
    with pa.OSFile(ids_tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for _, shard in iter_shards(vectors_dir, vectors):
            index.add(stored_vectors(shard["embedding"], vectors))
            writer.write_batch(pa.record_batch([pa.array(shard["id"], pa.string())], schema=schema))
    recall = None
    if kind != "flat":
        nprobe, recall = _tune_nprobe(index, vectors_dir, vectors, recall_sample, seed, nlist, nprobe, target_recall)
        faiss.extract_index_ivf(index).nprobe = nprobe
    index_tmp = os.path.join(output_dir, INDEX_NAME + ".tmp")
    faiss.write_index(index, index_tmp)
    os.replace(ids_tmp, os.path.join(output_dir, IDS_NAME))
    os.replace(index_tmp, os.path.join(output_dir, INDEX_NAME))
    manifest = IndexManifest(
        index_type=kind, factory=factory, count=index.ntotal, dimension=vectors.dimension, nlist=nlist, nprobe=nprobe,
        expected_recall_at_10=recall, recall_sample=0 if recall is None else recall_sample,
        build_seconds=round(time.perf_counter() - started, 3), format_version=FORMAT_VERSION,
        vectors={k: getattr(vectors, k) for k in ("model", "model_fingerprint", "dtype", "document_instruction",
                                                  "normalized")} | {"folder": os.path.abspath(vectors_dir),
                                                                    "shards_digest": shards_digest(vectors)})
    write_json_atomic(os.path.join(output_dir, INDEX_MANIFEST), asdict(manifest))
    logger.info("index %s (%s): %d vectors; expected recall@10 %s", kind, factory, index.ntotal,
                "1.0 (exact)" if recall is None else f"{recall:.3f} at nprobe {nprobe} (on {recall_sample} sampled vectors)")
    return manifest


def recall_with_ties(exact_scores: np.ndarray, exact_rows: np.ndarray, found_rows: np.ndarray, k: int = 10) -> float:
    """Mean recall@k of ``found_rows`` where every row scoring within 1e-5 of the exact k-th score counts as a
    hit: corpora hold duplicate documents, and which of equal-scoring rows a search returns is arbitrary.
    ``exact_*`` come from an exact search deeper than ``k`` (ties beyond its depth are missed)."""
    hits = []
    for scores, rows, found in zip(exact_scores, exact_rows, found_rows):
        threshold = scores[k - 1] - 1e-5
        good = {int(r) for r, s in zip(rows, scores) if s >= threshold and r >= 0}
        hits.append(len(good & {int(r) for r in found[:k]}) / k)
    return float(np.mean(hits))


def _tune_nprobe(index, vectors_dir: str, vectors: VectorsManifest, size: int, seed: int,
                 nlist: int, nprobe: Optional[int], target_recall: float = TARGET_RECALL) -> Tuple[int, float]:
    """``(nprobe, recall@10)`` against exact search with ``size`` :func:`tuning_queries`: the given
    ``nprobe``, or the smallest of nlist/64, 3/128, 1/32, ... nlist that reaches ``target_recall`` of
    the recall of probing every list (1.0 for IVF-Flat; a lossy code -- SQ8, PQ -- has a lower ceiling)."""
    import faiss

    queries = tuning_queries(vectors_dir, vectors, size, seed + 1)
    exact_scores, exact_rows = exact_search_shards(vectors_dir, queries, min(100, vectors.count), vectors)
    ivf = faiss.extract_index_ivf(index)

    def recall_at(probe: int) -> float:
        ivf.nprobe = probe
        _, found = index.search(queries, min(10, vectors.count))
        return recall_with_ties(exact_scores, exact_rows, found, min(10, vectors.count))

    if nprobe:
        return nprobe, recall_at(nprobe)
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    target = target_recall * recall_at(nlist)
    probe, candidates = max(1, nlist // 64), []
    while probe < nlist:
        candidates += [probe, probe * 3 // 2]
        probe *= 2
    for probe in sorted({min(nlist, max(1, c)) for c in candidates} | {nlist}):
        recall = recall_at(probe)
        if recall >= target - 1e-9 or probe == nlist:
            return probe, recall
    raise AssertionError("unreachable")


class LoadedIndex:
    """An opened index: ``search(query_vectors, top_k) -> (scores [q, k], ids)`` with string ids.

    ``mmap=True`` maps ``index.faiss`` (``IO_FLAG_MMAP_IFC``: flat and fast-scan codes too, which plain
    ``IO_FLAG_MMAP`` reads into memory), so processes opening one index share one copy in the page cache."""

    def __init__(self, index_dir: str, mmap: bool = True) -> None:
        import faiss
        import pyarrow as pa

        path = os.path.join(index_dir, INDEX_MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index_dir!r} holds no {INDEX_MANIFEST}: not an index built by retrievals.pipelines.index")
        with open(path, encoding="utf-8") as f:
            self.manifest = IndexManifest(**json.load(f))
        old = self.manifest.format_version < FORMAT_VERSION and (
            self.manifest.normalized_here or self.manifest.vectors.get("dtype") == "binary")
        if old:
            raise ValueError(f"{index_dir}: built by an older retrievals that scored "
                             f"{'cosines of a model that does not normalise' if self.manifest.normalized_here else '+-1 per bit'}"
                             f", not the model's similarity; rebuild it: retrievals index --vectors "
                             f"{self.manifest.vectors.get('folder')} --output_dir {index_dir}")
        self.path = os.path.join(index_dir, INDEX_NAME)
        flags = (getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        self.index = faiss.read_index(self.path, flags)
        self.ids = pa.ipc.open_file(pa.memory_map(os.path.join(index_dir, IDS_NAME))).read_all().column("id")
        if len(self.ids) != self.index.ntotal:
            raise ValueError(f"{index_dir}: {len(self.ids)} ids for {self.index.ntotal} vectors")

    def mapped_bytes(self) -> int:
        """Bytes of ``index.faiss`` this process has memory-mapped (0: read into memory)."""
        total, real = 0, os.path.realpath(self.path)
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == real:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    total += end - start
        return total

    def set_nprobe(self, nprobe: Optional[int]) -> None:
        if nprobe and self.manifest.nlist:
            import faiss

            faiss.extract_index_ivf(self.index).nprobe = min(nprobe, self.manifest.nlist)

    def search_rows(self, queries: np.ndarray, top_k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` ``[q, k]``: the model's inner product with the stored vectors; rows are
        positions in the vectors folder (-1: nothing found)."""
        return self.index.search(np.array(queries, dtype=np.float32, ndmin=2), min(top_k, self.index.ntotal))

    def search(self, queries: np.ndarray, top_k: int = 10) -> Tuple[np.ndarray, List[List[str]]]:
        scores, rows = self.search_rows(queries, top_k)
        return scores, [self.ids_of(r) for r in rows]

    def ids_of(self, rows: Sequence[int]) -> List[str]:
        rows = [int(r) for r in rows if r >= 0]
        return self.ids.take(rows).to_pylist() if rows else []
