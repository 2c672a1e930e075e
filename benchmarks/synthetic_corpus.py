"""The synthetic corpus of the benchmarks: documents of 1-3 sentences drawn from the SciFact abstracts
(generated on demand, never committed), as texts or, for index benchmarks at 1M documents, as vectors
composed from the model's embeddings of the sentences (the normalised sum of a document's sentence
vectors: the clustering of real embeddings without encoding 1M texts in fp32 on a 2-core CPU)."""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator, List

import numpy as np

SCIFACT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scifact")
SCIFACT = os.path.join(SCIFACT_DIR, "corpus.jsonl.gz")


def scifact_sentences(source: str = SCIFACT) -> List[str]:
    sentences = []
    with gzip.open(source, "rt") as f:
        for line in f:
            sentences += [s.strip() for s in json.loads(line)["text"].split(". ") if len(s.strip()) > 20]
    return sentences


def document_sentences(lines: int, num_sentences: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The sentence indices of each synthetic document, in order (the same for texts and vectors)."""
    rng = np.random.default_rng(seed)
    for _ in range(lines):
        yield rng.integers(0, num_sentences, rng.integers(1, 4))


def write_synthetic(path: str, lines: int, seed: int = 0) -> str:
    """A JSONL corpus of ``lines`` documents (``_id`` s0, s1, ...)."""
    sentences = scifact_sentences()
    with open(path, "w", encoding="utf-8") as f:
        for i, picked in enumerate(document_sentences(lines, len(sentences), seed)):
            f.write(json.dumps({"_id": f"s{i}", "text": ". ".join(sentences[j] for j in picked)}) + "\n")
    return path


def composed_vectors(folder: str, lines: int, model, shard_size: int = 100_000, seed: int = 0) -> str:
    """A vectors folder of ``lines`` synthetic documents, each the normalised sum of the model's (normalised)
    sentence embeddings; the SciFact sentences are encoded once."""
    from retrievals.index.manifest import VectorsManifest
    from retrievals.index.shards import shard_ranges, write_shard

    if os.path.exists(os.path.join(folder, "manifest.json")) and VectorsManifest.load(folder).complete:
        return folder
    sentence_vectors = np.asarray(model.encode(scifact_sentences(), batch_size=64, convert_to_numpy=True,
                                               normalize_embeddings=True), dtype=np.float32)
    manifest = VectorsManifest(model="composed", model_fingerprint="composed", dimension=sentence_vectors.shape[1],
                               normalized=True, document_instruction="", dtype="float32", shard_size=shard_size,
                               total_rows=lines)
    os.makedirs(folder, exist_ok=True)
    documents = document_sentences(lines, len(sentence_vectors), seed)
    for index, (start, end) in enumerate(shard_ranges(lines, shard_size)):
        x = np.stack([sentence_vectors[next(documents)].sum(0) for _ in range(start, end)])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        manifest.shards.append(write_shard(folder, index, start, [f"s{i}" for i in range(start, end)], x))
    manifest.complete = True
    manifest.save(folder)
    return folder
