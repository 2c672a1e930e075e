"""Point-wise ArcFace on SciFact: does `embed --loss_fn arcface` beat the base model, and what do layer-wise
learning-rate decay and class-mean centre initialisation add?

Classes: each SciFact training claim's cited abstract is a class; its members are the claims citing it and
the abstract itself (title + text). A dev split is carved from SciFact *train* (20% of the training claims,
seed 0; their abstracts' classes are built only from the remaining 80%), evaluated by nDCG@10 of the dev
claims over a dev corpus (their relevant abstracts + 1,000 random other abstracts, seed 0). The test split
is touched only by ``--final NAME`` (one configuration, the whole 5,183-abstract corpus).

    OMP_NUM_THREADS=1 python benchmarks/pointwise_scifact.py --model PATH --data ../shared/data/scifact --out /tmp/pw
    OMP_NUM_THREADS=1 python benchmarks/pointwise_scifact.py ... --final class_mean+decay
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np

CONFIGS = {
    "class_mean": ["--arcface_init", "class_mean"],
    "xavier": [],
    "class_mean+decay": ["--arcface_init", "class_mean", "--layerwise_lr_decay", "0.9"],
    "xavier+decay": ["--layerwise_lr_decay", "0.9"],
}
RECIPE = ["--loss_fn", "arcface", "--num_train_epochs", "2", "--per_device_train_batch_size", "32",
          "--warmup_steps", "0.1", "--query_max_length", "64",
          "--arcface_scale", "30", "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
          "--seed", "0", "--overwrite_output_dir"]


def splits(data_dir: str):
    from retrievals.data.beir import BeirDataset, load_beir

    train = load_beir(data_dir, split="train")
    qids = sorted(train.qrels)
    random.Random(0).shuffle(qids)
    dev_ids = set(qids[: len(qids) // 5])
    rows = []
    classes = {}
    for qid in qids:
        if qid in dev_ids:
            continue
        for doc in train.qrels[qid]:
            classes.setdefault(doc, []).append(train.queries[qid])
    for doc, claims in sorted(classes.items()):
        d = train.corpus[doc]
        rows += [{"text": c, "label": doc} for c in claims] + [{"text": f"{d['title']} {d['text']}".strip(), "label": doc}]
    dev_qrels = {q: train.qrels[q] for q in sorted(dev_ids)}
    relevant = {d for docs in dev_qrels.values() for d in docs}
    others = sorted(set(train.corpus) - relevant)
    keep = relevant | set(random.Random(0).sample(others, 1000))
    dev = BeirDataset(corpus={d: train.corpus[d] for d in sorted(keep)}, queries={q: train.queries[q] for q in dev_qrels},
                      qrels=dev_qrels)
    return rows, dev, len(classes)


def evaluate(model_dir: str, data) -> float:
    from retrievals import AutoModelForEmbedding
    from retrievals.evaluation.retrieval import evaluate_retrieval

    model = AutoModelForEmbedding.from_pretrained(model_dir, pooling_method="mean", max_length=256, precision="fp32")
    return evaluate_retrieval(model, data).metrics["ndcg@10"]


def train(model: str, data_file: str, out: str, extra, lr: str = "5e-5", head_lr: str = "1e-4"):
    from retrievals.pipelines.embed import parse_args, run_embed

    start = time.perf_counter()
    result = run_embed(*parse_args(["--model_name_or_path", model, "--pooling_method", "mean", "--output_dir", out,
                                    "--do_train", "--data_name_or_path", data_file, *RECIPE, "--learning_rate", lr,
                                    "--head_learning_rate", head_lr, *extra]))
    return result["losses"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="../shared/data/scifact")
    parser.add_argument("--out", default="/tmp/pointwise_scifact")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--lr", default="5e-5", help="backbone learning rate")
    parser.add_argument("--head_lr", default="1e-4", help="learning rate of the ArcFace centres")
    parser.add_argument("--final", default=None, help="evaluate this configuration once on the test split")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.out, exist_ok=True)
    rows, dev, n_classes = splits(args.data)
    data_file = os.path.join(args.out, "pointwise_train.jsonl")
    with open(data_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} texts in {n_classes} classes; dev: {len(dev.queries)} claims over {len(dev.corpus)} abstracts")
    if args.final:
        from retrievals.data.beir import load_beir

        out = os.path.join(args.out, f"{args.final}@lr{args.lr},head{args.head_lr}")
        if not os.path.isdir(out):
            train(args.model, data_file, out, CONFIGS[args.final], args.lr, args.head_lr)
        print(json.dumps({"final": args.final, "test_ndcg@10": evaluate(out, load_beir(args.data, split="test"))}))
        return
    saved = os.path.join(args.out, "results.json")
    results = json.load(open(saved)) if os.path.isfile(saved) else {}
    if "base" not in results:
        results["base"] = {"dev_ndcg@10": evaluate(args.model, dev)}
    print(json.dumps(results["base"]))
    for config in args.configs.split(","):
        name = f"{config}@lr{args.lr},head{args.head_lr}"
        if name in results:
            continue
        out = os.path.join(args.out, name)
        losses, seconds = train(args.model, data_file, out, CONFIGS[config], args.lr, args.head_lr)
        per_epoch = np.array_split(np.array(losses), 2)
        results[name] = {"dev_ndcg@10": evaluate(out, dev), "train_s": round(seconds, 1),
                         "loss_first_10_steps": round(float(np.mean(losses[:2])), 3),
                         "loss_by_epoch": [round(float(e.mean()), 3) for e in per_epoch]}
        print(json.dumps({name: results[name]}), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("| configuration | dev nDCG@10 | train s | mean loss by epoch |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['dev_ndcg@10']:.4f} | {r.get('train_s', '')} | {r.get('loss_by_epoch', '')} |")


if __name__ == "__main__":
    main()
