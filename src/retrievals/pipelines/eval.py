"""Evaluate an embedding model: BEIR-layout retrieval (nDCG@10, MRR@10, Recall@100, MAP@100) or STS.

    python -m retrievals.pipelines.eval --model_name_or_path DIR --data_dir ../shared/data/scifact
    python -m retrievals.pipelines.eval --model_name_or_path DIR --sts_file ../shared/data/stsb/stsb-en-test.csv
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..data.beir import corpus_file, load_beir
from ..data.corpus import EMPTY_DOCUMENTS_HELP
from ..data.sts import load_sts
from ..evaluation.retrieval import evaluate_dims, evaluate_retrieval
from ..evaluation.sts import evaluate_sts
from ..losses.matryoshka import parse_dims
from ..models.embedding_model import AutoModelForEmbedding
from .backend_flags import BACKEND_HELP, CALIBRATION_HELP, backend_kwargs
from .cli import run_cli

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Model directory (saved by retrievals or sentence-transformers) or hub id"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "BEIR-layout folder (corpus, queries, qrels/)"})
    split: str = field(default="test", metadata={"help": "qrels split to evaluate"})
    sts_file: Optional[str] = field(default=None, metadata={"help": "STS file (s1, s2, score) instead of retrieval"})
    pooling_method: Optional[str] = field(default=None, metadata={"help": "Override the saved pooling"})
    max_length: Optional[int] = field(default=None, metadata={"help": "Override the saved max length"})
    batch_size: int = field(default=32)
    top_k: int = field(default=100)
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where fast), fp32, bf16, fp16 or int8"})
    backend: Optional[str] = field(default=None, metadata={"help": BACKEND_HELP})
    calibration_file: Optional[str] = field(default=None, metadata={"help": CALIBRATION_HELP})
    num_examples: int = field(default=3, metadata={"help": "Example queries to print with their top hits"})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write the metrics as JSON here"})
    dims: Optional[str] = field(default=None, metadata={
        "help": "Also evaluate these embedding sizes (Matryoshka), e.g. 384,256,128,64: nDCG@10 per size"})
    index_dir: Optional[str] = field(default=None, metadata={
        "help": "Search this index (built by retrievals.pipelines.index) instead of encoding the corpus"})
    exact_search: bool = field(default=False, metadata={
        "help": "With --index_dir: exact search over the index's stored vectors, shard by shard"})
    nprobe: Optional[int] = field(default=None, metadata={"help": "With an IVF index: lists probed per query"})
    empty_documents: str = field(default="skip", metadata={"help": EMPTY_DOCUMENTS_HELP})


def run_eval(args: EvalArguments) -> Dict[str, float]:
    """Load the model and data named in ``args``, evaluate, print a report, return the metrics."""
    if not args.data_dir and not args.sts_file:
        raise ValueError("Pass --data_dir (BEIR retrieval) or --sts_file (STS)")
    start = time.perf_counter()
    data = load_beir(args.data_dir, args.split, with_corpus=not args.index_dir,
                     empty_documents=args.empty_documents) if args.data_dir else None
    pairs = load_sts(args.sts_file) if args.sts_file else None
    model = AutoModelForEmbedding.from_pretrained(
        args.model_name_or_path, pooling_method=args.pooling_method, max_length=args.max_length,
        precision=args.precision, **backend_kwargs(args.backend, args.calibration_file or (
            corpus_file(args.data_dir) if str(args.precision).lower() == "int8" and args.data_dir else None)),
    )
    metrics: Dict[str, float] = {}
    if pairs is not None:
        metrics.update({f"sts_{k}": v for k, v in evaluate_sts(model, pairs, batch_size=args.batch_size).items()})
    if data is not None and args.index_dir:
        metrics.update(_evaluate_index(model, data, args))
    elif data is not None:
        result = evaluate_retrieval(model, data, top_k=args.top_k, batch_size=args.batch_size, show_progress_bar=True)
        metrics.update(result.metrics)
        _print_examples(data, result.run, args.num_examples)
        if args.dims:
            for dim, values in evaluate_dims(model, data, parse_dims(args.dims), batch_size=args.batch_size).items():
                metrics[f"ndcg@10_d{dim}"] = values["ndcg@10"]
    metrics["seconds"] = time.perf_counter() - start
    _print_report(args, metrics)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def _evaluate_index(model, data, args: EvalArguments) -> Dict[str, float]:
    """Queries searched in the built index (the model must be the one that made it)."""
    from ..evaluation.metrics import evaluate_run
    from ..index.search import Searcher

    searcher = Searcher(args.index_dir, model=model, nprobe=args.nprobe)
    run = searcher.run(data.queries, top_k=args.top_k, exact=args.exact_search, batch_size=args.batch_size)
    return evaluate_run(run, data.qrels, ["ndcg@10", "mrr@10", "recall@100", "map@100"])


def _print_examples(data, run, num_examples: int) -> None:
    for qid in list(data.queries)[:num_examples]:
        print(f"\nQuery {qid}: {data.queries[qid]}")
        ranked = sorted(run[qid].items(), key=lambda x: -x[1])[:3]
        for rank, (doc_id, score) in enumerate(ranked, start=1):
            mark = "relevant" if data.qrels[qid].get(doc_id, 0) > 0 else "-"
            title = data.corpus[doc_id]["title"] or data.corpus[doc_id]["text"]
            print(f"  {rank}. [{score:.3f}] ({mark}) {doc_id}: {title[:90]}")


def _print_report(args: EvalArguments, metrics: Dict[str, float]) -> None:
    print(f"\nModel: {args.model_name_or_path}  precision={args.precision}")
    for name, value in metrics.items():
        print(f"  {name:>12}: {value:.4f}")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([EvalArguments], run_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
