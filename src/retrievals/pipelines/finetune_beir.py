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

from ..data.beir import BeirDataset, load_beir
from ..data.collators import RetrievalCollator
from ..data.corpus import EMPTY_DOCUMENTS_HELP
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
    rounds: int = field(default=1, metadata={
        "help": "Rounds of (mine with the current model -> train -> evaluate); round r > 1 mines with round r-1's model"})
    round_start: str = field(default="continue", metadata={
        "help": "Weights each round > 1 trains from: 'continue' (the previous round's) or 'base'"})
    empty_documents: str = field(default="skip", metadata={"help": EMPTY_DOCUMENTS_HELP})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.round_start not in ("continue", "base"):
            raise ValueError(f"--round_start must be 'continue' or 'base', got {self.round_start!r}")


def run_finetune(args: FinetuneArguments) -> Dict[str, Any]:
    """Base eval, then ``rounds`` x (mine with the current model -> train -> eval); returns every round's
    metrics, timings and losses. Each round's negatives and model are kept in ``output_dir/round-<r>``
    (with one round, the model is saved in ``output_dir`` only)."""
    test, train = (load_beir(args.data_dir, split, empty_documents=args.empty_documents) for split in ("test", "train"))
    records = training_records(train)
    if len(records) < args.batch_size:  # before any encoding: the trainer would only say "max_steps must be set"
        raise ValueError(f"{args.data_dir}: {len(records)} training queries are fewer than one batch "
                         f"(--batch_size {args.batch_size}, the last partial batch is dropped); lower --batch_size")
    model = load_base(args)
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    texts = test.corpus_texts()
    corpus_emb = model.encode_corpus(texts, show_progress_bar=True)
    base = evaluate_retrieval(model, test, corpus_embeddings=corpus_emb).metrics
    timings["evaluate base"] = time.perf_counter() - start
    rounds, losses, offset = [], [], 0
    for r in range(1, args.rounds + 1):
        suffix = f" (round {r})" if args.rounds > 1 else ""
        start = time.perf_counter()
        mined = mine_hard_negatives(model, records, candidate_pool=texts, corpus_embeddings=corpus_emb,
                                    range_for_sampling=parse_range(args.range_for_sampling),
                                    negative_number=args.negative_number, seed=args.seed + r - 1)
        timings["mine hard negatives" + suffix] = time.perf_counter() - start
        if r > 1 and args.round_start == "base":
            model = load_base(args)  # mined by the trained model, trained from the base weights
        start = time.perf_counter()
        trainer = _train(model, mined, args)
        timings["fine-tune" + suffix] = time.perf_counter() - start
        folder = os.path.join(args.output_dir, f"round-{r}") if args.rounds > 1 else args.output_dir
        model.save_pretrained(folder)
        if args.rounds > 1:
            _write_jsonl(os.path.join(folder, "train_hn.jsonl"), mined)
        start = time.perf_counter()
        corpus_emb = model.encode_corpus(texts, show_progress_bar=True)
        metrics = evaluate_retrieval(model, test, corpus_embeddings=corpus_emb).metrics
        timings["evaluate fine-tuned" + suffix] = time.perf_counter() - start
        round_losses = [(offset + h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        offset += trainer.state.global_step
        losses += round_losses
        rounds.append({"round": r, "metrics": metrics, "losses": round_losses})
        logger.info("round %d: nDCG@10 %.4f", r, metrics["ndcg@10"])
    if args.rounds > 1:
        model.save_pretrained(args.output_dir)
    return {"base": base, "fine_tuned": rounds[-1]["metrics"], "rounds": rounds, "seconds": timings, "losses": losses,
            "args": asdict(args)}


def training_records(train: BeirDataset) -> List[Dict[str, Any]]:
    """``{query, positive}`` per judged training query. Positives are the judged documents of the corpus (an
    empty document skipped while loading is not one); a query left with none is left out, with a count."""
    by_id = dict(zip(train.corpus_ids(), train.corpus_texts()))
    records, without = [], 0
    for q, rels in train.qrels.items():
        positives = [by_id[d] for d, r in rels.items() if r > 0 and d in by_id]
        if positives:
            records.append({"query": train.queries[q], "positive": positives})
        else:
            without += 1
    if without:
        logger.warning("%d training queries have no judged positive in the corpus (empty documents are not read); "
                       "left out", without)
    return records


def load_base(args: FinetuneArguments) -> AutoModelForEmbedding:
    return AutoModelForEmbedding.from_pretrained(args.model_name_or_path, max_length=args.document_max_length,
                                                 query_max_length=args.query_max_length)


def _write_jsonl(path: str, records: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


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
    rounds = result.get("rounds") or [{"round": 1, "metrics": result["fine_tuned"]}]
    names = ["fine-tuned"] if len(rounds) == 1 else [f"round {r['round']}" for r in rounds]
    print("\n| metric | base | " + " | ".join(names) + " | change |\n|---|---|" + "---|" * len(names) + "---|")
    for name in METRICS:
        b, values = result["base"][name], [r["metrics"][name] for r in rounds]
        print(f"| {name} | {b:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {values[-1] - b:+.4f} |")
    pad = " |" * len(names)
    for step, seconds in result["seconds"].items():
        print(f"| time: {step} | {seconds:.0f} s |{pad} |")
    print(f"| time: total | {sum(result['seconds'].values()):.0f} s |{pad} |")


def save_plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = zip(*result["losses"]) if result["losses"] else ((), ())
    left.plot(steps, losses, marker="o")
    left.set(title="training loss (InfoNCE)", xlabel="step", ylabel="loss")
    xs = range(len(METRICS))
    rounds = result.get("rounds") or [{"round": 1, "metrics": result["fine_tuned"]}]
    bars = [("base", result["base"])] + [("fine-tuned" if len(rounds) == 1 else f"round {r['round']}", r["metrics"])
                                         for r in rounds]
    width = 0.8 / len(bars)
    for i, (label, metrics) in enumerate(bars):
        right.bar([x - 0.4 + width * (i + 0.5) for x in xs], [metrics[m] for m in METRICS], width=width, label=label)
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
