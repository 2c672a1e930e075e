"""A faiss index over a vectors folder: built shard by shard, saved so it opens memory-mapped, with the
row -> id mapping in an Arrow file (memory-mapped too) and a manifest tying it to the model."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .manifest import VectorsManifest, write_json_atomic
from .shards import from_stored, iter_shards

logger = logging.getLogger(__name__)

INDEX_NAME, IDS_NAME, INDEX_MANIFEST = "index.faiss", "ids.arrow", "index.json"
INDEX_TYPES = ("auto", "flat", "ivf", "ivf_sq8", "ivf_pq")
FLAT_BELOW = 1_000_000  # "auto" picks exact search below this many vectors, IVF above
TARGET_RECALL = 0.998  # nprobe (unless given): the smallest reaching this share of the all-lists recall@10


@dataclass
class IndexManifest:
    index_type: str
    factory: str
    count: int
    dimension: int
    nlist: Optional[int]
    nprobe: Optional[int]
    normalized_here: bool  # vectors (and queries) L2-normalised by the index: the model scores cosine
    expected_recall_at_10: Optional[float]
    recall_sample: int
    build_seconds: float
    vectors: dict  # the vectors manifest's model, fingerprint, dtype, instruction


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


def _float_batch(shard: dict, manifest: VectorsManifest, normalize: bool) -> np.ndarray:
    x = shard["embedding"]
    if manifest.dtype == "binary":
        x = from_stored(x, manifest)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if normalize:
        import faiss

        faiss.normalize_L2(x)
    return x


def _training_sample(folder: str, manifest: VectorsManifest, size: int, normalize: bool, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(manifest.count, size=min(size, manifest.count), replace=False))
    parts = []
    for info, shard in iter_shards(folder, manifest, columns=("embedding",)):
        local = rows[(rows >= info.first_row) & (rows < info.first_row + info.rows)] - info.first_row
        if len(local):
            parts.append(_float_batch(shard, manifest, normalize)[local])
    return np.concatenate(parts)


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
    normalize = not vectors.normalized
    index = faiss.index_factory(vectors.dimension, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        size = train_size or min(vectors.count, max(40 * nlist, 10_000))  # faiss asks >= 39 per list
        index.train(_training_sample(vectors_dir, vectors, size, normalize, seed))
    os.makedirs(output_dir, exist_ok=True)
    ids_tmp = os.path.join(output_dir, IDS_NAME + ".tmp")
    schema = pa.schema([("id", pa.string())])
    with pa.OSFile(ids_tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for _, shard in iter_shards(vectors_dir, vectors):
            index.add(_float_batch(shard, vectors, normalize))
            writer.write_batch(pa.record_batch([pa.array(shard["id"], pa.string())], schema=schema))
    recall = None
    if kind != "flat":
        nprobe, recall = _tune_nprobe(index, vectors_dir, vectors, normalize, recall_sample, seed, nlist, nprobe,
                                      target_recall)
        faiss.extract_index_ivf(index).nprobe = nprobe
    index_tmp = os.path.join(output_dir, INDEX_NAME + ".tmp")
    faiss.write_index(index, index_tmp)
    os.replace(ids_tmp, os.path.join(output_dir, IDS_NAME))
    os.replace(index_tmp, os.path.join(output_dir, INDEX_NAME))
    manifest = IndexManifest(
        index_type=kind, factory=factory, count=index.ntotal, dimension=vectors.dimension, nlist=nlist, nprobe=nprobe,
        normalized_here=normalize, expected_recall_at_10=recall, recall_sample=0 if recall is None else recall_sample,
        build_seconds=round(time.perf_counter() - started, 3),
        vectors={k: getattr(vectors, k) for k in ("model", "model_fingerprint", "dtype", "document_instruction",
                                                  "normalized")} | {"folder": os.path.abspath(vectors_dir)})
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


def _tune_nprobe(index, vectors_dir: str, vectors: VectorsManifest, normalize: bool, size: int, seed: int,
                 nlist: int, nprobe: Optional[int], target_recall: float = TARGET_RECALL) -> Tuple[int, float]:
    """``(nprobe, recall@10)`` against exact search with ``size`` stored vectors as queries: the given
    ``nprobe``, or the smallest of nlist/64, 3/128, 1/32, ... nlist that reaches ``target_recall`` of
    the recall of probing every list (1.0 for IVF-Flat; a lossy code -- SQ8, PQ -- has a lower ceiling).
    Real queries, further from the documents than stored vectors, reach a little less (SciFact: 0.995
    where the sample gives 0.998)."""
    import faiss

    from .search import exact_search_shards

    queries = _training_sample(vectors_dir, vectors, size, normalize, seed + 1)
    exact_scores, exact_rows = exact_search_shards(vectors_dir, queries, min(100, vectors.count), vectors,
                                                   normalize=normalize)
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
    """An opened index: ``search(query_vectors, top_k) -> (scores [q, k], ids)`` with string ids."""

    def __init__(self, index_dir: str, mmap: bool = True) -> None:
        import faiss
        import pyarrow as pa

        path = os.path.join(index_dir, INDEX_MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index_dir!r} holds no {INDEX_MANIFEST}: not an index built by retrievals.pipelines.index")
        with open(path, encoding="utf-8") as f:
            self.manifest = IndexManifest(**json.load(f))
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        self.index = faiss.read_index(os.path.join(index_dir, INDEX_NAME), flags)
        self.ids = pa.ipc.open_file(pa.memory_map(os.path.join(index_dir, IDS_NAME))).read_all().column("id")
        if len(self.ids) != self.index.ntotal:
            raise ValueError(f"{index_dir}: {len(self.ids)} ids for {self.index.ntotal} vectors")

    def set_nprobe(self, nprobe: Optional[int]) -> None:
        if nprobe and self.manifest.nlist:
            import faiss

            faiss.extract_index_ivf(self.index).nprobe = min(nprobe, self.manifest.nlist)

    def search_rows(self, queries: np.ndarray, top_k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` ``[q, k]``; rows are positions in the vectors folder (-1: nothing found)."""
        x = np.array(queries, dtype=np.float32, ndmin=2)
        if self.manifest.normalized_here:
            import faiss

            faiss.normalize_L2(x)
        return self.index.search(x, min(top_k, self.index.ntotal))

    def search(self, queries: np.ndarray, top_k: int = 10) -> Tuple[np.ndarray, List[List[str]]]:
        scores, rows = self.search_rows(queries, top_k)
        return scores, [self.ids_of(r) for r in rows]

    def ids_of(self, rows: Sequence[int]) -> List[str]:
        rows = [int(r) for r in rows if r >= 0]
        return self.ids.take(rows).to_pylist() if rows else []
