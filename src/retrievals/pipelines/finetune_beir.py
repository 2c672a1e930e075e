"""The main job: evaluate a model on a BEIR dataset, mine hard negatives for the train queries,
fine-tune, evaluate again, print a table, save a plot and keep the model.

    python -m retrievals.pipelines.finetune_beir --model_name_or_path DIR --data_dir ../shared/data/scifact
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from transformers import TrainingArguments

from ..data.beir import load_beir
from ..data.collators import RetrievalCollator
from ..data.datasets import RetrievalDataset
from ..evaluation.retrieval import evaluate_retrieval
from ..losses import InfoNCE
from ..mining.hard_negatives import mine_hard_negatives, parse_range
from ..models.embedding_model import AutoModelForEmbedding
from ..models.precision import cpu_has_fast_bf16
from ..trainer import RetrievalTrainer
from .cli import run_cli

logger = logging.getLogger(__name__)
METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(metadata={"help": "Base model directory"})
    data_dir: str = field(default="../shared/data/scifact", metadata={"help": "BEIR folder with train and test qrels"})
    output_dir: str = field(default="outputs/scifact-finetuned")
    epochs: float = field(default=3)
    batch_size: int = field(default=32)
    learning_rate: float = field(default=3e-5)
    temperature: float = field(default=0.05)
    train_group_size: int = field(default=2, metadata={"help": "1 positive + (n-1) mined negatives per query"})
    range_for_sampling: str = field(default="10-100")
    negative_number: int = field(default=8)
    query_max_length: int = field(default=64)
    document_max_length: int = field(default=256)
    seed: int = field(default=42)


def run_finetune(args: FinetuneArguments) -> Dict[str, Any]:
    """Base eval -> mining -> training -> eval; returns metrics, timings and losses."""
    test, train = load_beir(args.data_dir, "test"), load_beir(args.data_dir, "train")
    model = AutoModelForEmbedding.from_pretrained(args.model_name_or_path, max_length=args.document_max_length,
                                                  query_max_length=args.query_max_length)
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    texts = test.corpus_texts()
    corpus_emb = model.encode_corpus(texts, show_progress_bar=True)
    base = evaluate_retrieval(model, test, corpus_embeddings=corpus_emb).metrics
    timings["evaluate base"] = time.perf_counter() - start

    start = time.perf_counter()
    by_id = dict(zip(train.corpus_ids(), train.corpus_texts()))
    records = [{"query": train.queries[q], "positive": [by_id[d] for d, r in rels.items() if r > 0]}
               for q, rels in train.qrels.items()]
    mined = mine_hard_negatives(model, records, candidate_pool=texts, corpus_embeddings=corpus_emb,
                                range_for_sampling=parse_range(args.range_for_sampling),
                                negative_number=args.negative_number, seed=args.seed)
    timings["mine hard negatives"] = time.perf_counter() - start

    start = time.perf_counter()
    trainer = _train(model, mined, args)
    timings["fine-tune"] = time.perf_counter() - start
    model.save_pretrained(args.output_dir)

    start = time.perf_counter()
    tuned = evaluate_retrieval(model, test).metrics
    timings["evaluate fine-tuned"] = time.perf_counter() - start
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"base": base, "fine_tuned": tuned, "seconds": timings, "losses": losses, "args": asdict(args)}


def _train(model, records: List[dict], args: FinetuneArguments) -> RetrievalTrainer:
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "checkpoints"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0.1,
        logging_steps=5, save_strategy="no", report_to=[], seed=args.seed, dataloader_drop_last=True,
        bf16=cpu_has_fast_bf16(), use_cpu=True, disable_tqdm=False,
    )
    trainer = RetrievalTrainer(
        model=model, args=training_args,
        train_dataset=RetrievalDataset(records, train_group_size=args.train_group_size, seed=args.seed),
        data_collator=RetrievalCollator(model.tokenizer, query_max_length=args.query_max_length,
                                        document_max_length=args.document_max_length),
        loss_fn=InfoNCE(temperature=args.temperature, use_inbatch_negative=True),
    )
    trainer.train()
    return trainer


def print_table(result: Dict[str, Any]) -> None:
    print("\n| metric | base | fine-tuned | change |\n|---|---|---|---|")
    for name in METRICS:
        b, t = result["base"][name], result["fine_tuned"][name]
        print(f"| {name} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
    for step, seconds in result["seconds"].items():
        print(f"| time: {step} | {seconds:.0f} s | | |")
    print(f"| time: total | {sum(result['seconds'].values()):.0f} s | | |")


def save_plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = zip(*result["losses"]) if result["losses"] else ((), ())
    left.plot(steps, losses, marker="o")
    left.set(title="training loss (InfoNCE)", xlabel="step", ylabel="loss")
    xs = range(len(METRICS))
    right.bar([x - 0.2 for x in xs], [result["base"][m] for m in METRICS], width=0.4, label="base")
    right.bar([x + 0.2 for x in xs], [result["fine_tuned"][m] for m in METRICS], width=0.4, label="fine-tuned")
    right.set_xticks(list(xs), METRICS)
    right.set(title="SciFact test", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_and_report(args: FinetuneArguments) -> Dict[str, Any]:
    """:func:`run_finetune`, then the table, the plot and the JSON figures in ``output_dir``."""
    result = run_finetune(args)
    print_table(result)
    save_plot(result, os.path.join(args.output_dir, "finetune.png"))
    with open(os.path.join(args.output_dir, "finetune_result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\nModel, plot and figures saved in {args.output_dir}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([FinetuneArguments], run_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
