"""Index types side by side on one vectors folder: build time, bytes per vector, recall@10 against exact
search and queries/s (1 thread; builds use --build_threads), and, with ``--data_dir``, nDCG@10 through each index.

    # SciFact: encode once, then compare
    python -m retrievals.pipelines.encode --model_name_or_path MODEL --corpus ../shared/data/scifact/corpus.jsonl.gz \\
        --output_dir outputs/scifact-vectors
    python benchmarks/index.py --vectors outputs/scifact-vectors --data_dir ../shared/data/scifact --model MODEL
    # 1M synthetic documents (benchmarks/synthetic_corpus.py), vectors composed from the model's sentence vectors
    python benchmarks/index.py --composed 1000000 --model MODEL --workdir outputs/composed
    # or unit vectors with a power-law covariance, no model
    python benchmarks/index.py --synthetic 1000000 --dim 384 --workdir outputs/synthetic

Queries: with ``--model``, the SciFact queries (all 1,109) encoded by it; without, stored vectors plus noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np

from retrievals.index.faiss_index import INDEX_NAME, LoadedIndex, build_index, recall_with_ties
from retrievals.index.manifest import VectorsManifest
from retrievals.index.search import exact_search_shards
from retrievals.index.shards import shard_ranges, write_shard


def synthetic_vectors(folder: str, count: int, dim: int, shard_size: int = 100_000, seed: int = 0) -> str:
    """Unit vectors with a power-law spectrum (eigenvalues ~ 1/i), written as shards with a manifest."""
    rng = np.random.default_rng(seed)
    scales = (1.0 / np.arange(1, dim + 1)) ** 0.5
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    manifest = VectorsManifest(model="synthetic", model_fingerprint="synthetic", dimension=dim, normalized=True,
                               document_instruction="", dtype="float32", shard_size=shard_size, total_rows=count)
    os.makedirs(folder, exist_ok=True)
    for index, (start, end) in enumerate(shard_ranges(count, shard_size)):
        x = (rng.standard_normal((end - start, dim)) * scales).astype(np.float32) @ rotation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        manifest.shards.append(write_shard(folder, index, start, [f"s{i}" for i in range(start, end)], x))
    manifest.complete = True
    manifest.save(folder)
    return folder


def sample_queries(folder: str, count: int, seed: int = 1) -> np.ndarray:
    from retrievals.index.faiss_index import _training_sample

    manifest = VectorsManifest.load(folder)
    noisy = _training_sample(folder, manifest, count, seed)
    noisy += np.random.default_rng(seed).normal(0, 0.05, noisy.shape).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def model_queries(model) -> np.ndarray:
    from retrievals.data.jsonl import iter_jsonl
    from synthetic_corpus import SCIFACT_DIR

    texts = [rec["text"] for _, rec in iter_jsonl(os.path.join(SCIFACT_DIR, "queries.jsonl"))]
    return np.asarray(model.encode_queries(texts, batch_size=64, convert_to_numpy=True), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", default=None)
    parser.add_argument("--synthetic", type=int, default=0)
    parser.add_argument("--composed", type=int, default=0, help="documents of the synthetic corpus (needs --model)")
    parser.add_argument("--model", default=None, help="encodes the SciFact queries (and sentences for --composed)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--workdir", default="outputs/index-bench")
    parser.add_argument("--data_dir", default=None, help="BEIR folder: also nDCG@10 through each index")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--types", default="flat,ivf,ivf_sq8,ivf_pq")
    parser.add_argument("--build_threads", type=int, default=2, help="faiss threads to build (search: 1 thread)")
    args = parser.parse_args()
    model = None
    if args.model:
        from retrievals import AutoModelForEmbedding

        model = AutoModelForEmbedding.from_pretrained(args.model)
    if args.vectors:
        vectors = args.vectors
    elif args.composed:
        from synthetic_corpus import composed_vectors

        vectors = composed_vectors(os.path.join(args.workdir, f"composed-{args.composed}"), args.composed, model)
    else:
        vectors = synthetic_vectors(os.path.join(args.workdir, "vectors"), args.synthetic, args.dim)
    queries = model_queries(model) if model is not None else sample_queries(vectors, args.queries)
    started = time.perf_counter()
    exact_scores, exact = exact_search_shards(vectors, queries, 100)  # deeper than 10: ties count as hits
    print(json.dumps({"exact_search_s": round(time.perf_counter() - started, 1), "queries": len(queries),
                      "vectors": VectorsManifest.load(vectors).count}))
    rows = []
    for kind in args.types.split(","):
        out = os.path.join(args.workdir, f"index-{kind}")
        faiss.omp_set_num_threads(args.build_threads)
        manifest = build_index(vectors, out, index_type=kind)
        faiss.omp_set_num_threads(1)
        index = LoadedIndex(out)
        start = time.perf_counter()
        _, found = index.search_rows(queries, 10)
        qps = len(queries) / (time.perf_counter() - start)
        recall = recall_with_ties(exact_scores, exact, found, 10)
        row = {"type": kind, "factory": manifest.factory, "nprobe": manifest.nprobe, "build_s": manifest.build_seconds,
               "bytes_per_vector": os.path.getsize(os.path.join(out, INDEX_NAME)) / manifest.count,
               "recall@10": round(recall, 4), "queries_per_s": round(qps, 1),
               "printed_expected_recall": manifest.expected_recall_at_10}
        if args.data_dir:
            from retrievals.data.beir import load_beir
            from retrievals.evaluation.metrics import evaluate_run
            from retrievals.index.search import Searcher

            data = load_beir(args.data_dir, "test", with_corpus=False)
            row["ndcg@10"] = evaluate_run(Searcher(out).run(data.queries, top_k=100), data.qrels, ["ndcg@10"])["ndcg@10"]
        rows.append(row)
        print(json.dumps(row))
    if args.data_dir:  # the same queries searched exactly over the shards (equal to in-memory exact search, tested)
        exact_run = Searcher(out).run(data.queries, top_k=100, exact=True)
        print(json.dumps({"exact ndcg@10": evaluate_run(exact_run, data.qrels, ["ndcg@10"])["ndcg@10"]}))
    print("\n| index | factory | nprobe | build s | bytes/vector | recall@10 | queries/s |" +
          (" nDCG@10 |" if args.data_dir else "") + "\n|---|---|---|---|---|---|---|" + ("---|" if args.data_dir else ""))
    for r in rows:
        print(f"| {r['type']} | {r['factory']} | {r['nprobe']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | "
              f"{r['recall@10']:.3f} | {r['queries_per_s']:.0f} |" + (f" {r['ndcg@10']:.4f} |" if args.data_dir else ""))


if __name__ == "__main__":
    main()
