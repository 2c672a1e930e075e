"""Train a cross-encoder re-ranker from any encoder checkpoint and evaluate it as a re-ranker of a dense
model's top-k, so "distill from a cross-encoder" works with no downloadable reranker.

    python -m retrievals.pipelines.rerank --model_name_or_path ENCODER --output_dir CE \\
        --data_name_or_path train_hn.jsonl --train_group_size 8 --loss listwise --max_length 256 \\
        --num_train_epochs 1 --per_device_train_batch_size 4 --learning_rate 2e-5 \\
        [--eval_data_dir ../shared/data/scifact --dense_model_name_or_path DENSE --rerank_top_k 100]

Training data: ``{"query", "positive", "negative": [...]}`` records (``build_hn`` output); each step
scores one positive and ``train_group_size - 1`` sampled negatives per query. The saved folder loads in
``CrossEncoder.from_pretrained`` and in sentence-transformers' ``CrossEncoder``, and is the teacher of
``build_hn --teacher_model_name_or_path`` (scores, ``--teacher_threshold``) and so of
``embed --loss_fn listwise_kl|margin_mse``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from transformers import TrainingArguments

from ..data.beir import BeirDataset, load_beir
from ..data.collators import CrossEncoderCollator
from ..data.datasets import RetrievalDataset
from ..evaluation.metrics import evaluate_run
from ..evaluation.retrieval import evaluate_retrieval
from ..mining.teacher import is_cross_encoder
from ..models.cross_encoder import CrossEncoder
from ..models.embedding_model import AutoModelForEmbedding
from ..trainer.cross_encoder_trainer import CROSS_ENCODER_LOSSES, CrossEncoderTrainer
from .cli import run_cli

logger = logging.getLogger(__name__)
METRICS = ("ndcg@10", "mrr@10", "recall@100")
NEW_HEAD_MAX_LENGTH = 256  # --max_length of a cross-encoder started from an encoder


@dataclass
class RerankArguments:
    model_name_or_path: str = field(metadata={
        "help": "Encoder checkpoint to start from (a new classification head), or a cross-encoder to go on from"})
    data_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Training JSONL of query / positive / negative (build_hn output); without it: evaluate only"})
    query_key: str = field(default="query")
    positive_key: str = field(default="positive")
    negative_key: str = field(default="negative")
    train_group_size: int = field(default=8, metadata={"help": "1 positive + (n-1) sampled negatives per query"})
    loss: str = field(default="listwise", metadata={"help": f"One of {', '.join(CROSS_ENCODER_LOSSES)}"})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Tokens per (query, document) pair (default: a cross-encoder's saved length; 256 from an encoder)"})
    eval_data_dir: Optional[str] = field(default=None, metadata={"help": "BEIR folder: re-rank the dense top-k"})
    eval_split: str = field(default="test")
    dense_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Embedding model whose top-k is re-ranked (needed with --eval_data_dir)"})
    rerank_top_k: int = field(default=100)
    skip_invalid: bool = field(default=False)

    def __post_init__(self) -> None:
        if self.loss not in CROSS_ENCODER_LOSSES:
            raise ValueError(f"Unknown --loss {self.loss!r}; valid losses are: {', '.join(CROSS_ENCODER_LOSSES)}")
        if self.train_group_size < 2:
            raise ValueError("--train_group_size must be >= 2 (a positive and at least one negative)")
        if self.eval_data_dir and not self.dense_model_name_or_path:
            raise ValueError("--eval_data_dir needs --dense_model_name_or_path (the first-stage model)")


def load_cross_encoder(args: RerankArguments) -> CrossEncoder:
    if is_cross_encoder(args.model_name_or_path):
        return CrossEncoder.from_pretrained(args.model_name_or_path, max_length=args.max_length)
    return CrossEncoder.from_encoder(args.model_name_or_path, max_length=args.max_length or NEW_HEAD_MAX_LENGTH)


def train_cross_encoder(args: RerankArguments, training_args: TrainingArguments) -> Tuple[CrossEncoder, List[float]]:
    """Train and save; returns the cross-encoder and its logged training losses."""
    cross = load_cross_encoder(args)
    dataset = RetrievalDataset(args.data_name_or_path, query_key=args.query_key, positive_key=args.positive_key,
                               negative_key=args.negative_key, train_group_size=args.train_group_size,
                               skip_invalid=args.skip_invalid, seed=training_args.seed)
    trainer = CrossEncoderTrainer(model=cross.model, args=training_args, train_dataset=dataset,
                                  data_collator=CrossEncoderCollator(cross.tokenizer, cross.max_length), loss=args.loss)
    result = trainer.train()
    cross.model.eval()
    if trainer.is_world_process_zero():
        cross.save_pretrained(training_args.output_dir)
    logger.info("cross-encoder trained (%s loss, %.1f s) and saved to %s", args.loss,
                result.metrics.get("train_runtime", 0.0), training_args.output_dir)
    return cross, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def rerank_run(cross: CrossEncoder, queries: Dict[str, str], texts: Dict[str, str], run: Dict[str, Dict[str, float]],
               top_k: int = 100, batch_size: int = 32) -> Dict[str, Dict[str, float]]:
    """The ``top_k`` documents of each query in ``run``, scored again by the cross-encoder."""
    candidates = {q: sorted(docs, key=docs.get, reverse=True)[:top_k] for q, docs in run.items()}
    pairs = [(queries[q], texts[d]) for q, docs in candidates.items() for d in docs]
    scores = iter(cross.predict(pairs, batch_size=batch_size, show_progress_bar=len(pairs) > 1000).tolist())
    return {q: {d: next(scores) for d in docs} for q, docs in candidates.items()}


def rerank_dense(cross: CrossEncoder, dense, data: BeirDataset, top_k: int = 100) -> Dict[str, Dict[str, float]]:
    """Metrics of ``dense``'s run on ``data`` and of its top-k re-ranked by ``cross``."""
    first = evaluate_retrieval(dense, data, top_k=top_k, metrics=METRICS)
    texts = dict(zip(data.corpus_ids(), data.corpus_texts()))
    reranked = rerank_run(cross, data.queries, texts, first.run, top_k=top_k)
    return {"dense": first.metrics, "reranked": evaluate_run(reranked, data.qrels, METRICS)}


def evaluate_reranking(cross: CrossEncoder, args: RerankArguments) -> Dict[str, Dict[str, float]]:
    """Metrics of the dense run and of its re-ranked top-k."""
    data = load_beir(args.eval_data_dir, split=args.eval_split)
    return rerank_dense(cross, AutoModelForEmbedding.from_pretrained(args.dense_model_name_or_path), data,
                        args.rerank_top_k)


def run_rerank(args: RerankArguments, training_args: TrainingArguments) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    if args.data_name_or_path:
        cross, result["losses"] = train_cross_encoder(args, training_args)
    else:
        cross = load_cross_encoder(args)
    if args.eval_data_dir and training_args.process_index == 0:
        result["metrics"] = evaluate_reranking(cross, args)
        print(json.dumps(result["metrics"], indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([RerankArguments, TrainingArguments], run_rerank, argv)


if __name__ == "__main__":
    sys.exit(main())
