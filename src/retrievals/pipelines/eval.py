"""Evaluate an embedding model: BEIR-layout retrieval (nDCG@10, MRR@10, Recall@100, MAP@100) or STS.

    python -m retrievals.pipelines.eval --model_name_or_path DIR --data_dir ../shared/data/scifact
    python -m retrievals.pipelines.eval --model_name_or_path DIR --sts_file ../shared/data/stsb/stsb-en-test.csv
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..backends.store import write_json_atomic
from ..data.beir import corpus_file, load_beir
from ..data.corpus import EMPTY_DOCUMENTS_HELP
from ..data.sts import load_sts
from ..evaluation.metrics import per_query
from ..evaluation.retrieval import evaluate_dims, evaluate_retrieval
from ..evaluation.significance import bootstrap_statistic, compare_metrics, metric_intervals, paired_statistic
from ..evaluation.sts import evaluate_sts, spearman_of, sts_cosines
from ..losses.matryoshka import parse_dims
from ..models.embedding_model import AutoModelForEmbedding
from .backend_flags import BACKEND_HELP, CALIBRATION_HELP, backend_kwargs
from .cli import run_cli

logger = logging.getLogger(__name__)
METRICS = ["ndcg@10", "mrr@10", "recall@100", "map@100"]


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={
        "help": "Model directory (saved by retrievals or sentence-transformers) or hub id; or a run file written by "
                "--save_run, scored as it is (with --compare: two run files, no model)"})
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
    bootstrap: int = field(default=1000, metadata={
        "help": "Resamples of the queries (or STS pairs) for each metric's 95% interval; 0: no intervals"})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap and permutation draws"})
    compare: Optional[str] = field(default=None, metadata={
        "help": "Another model folder, or a run file written by --save_run: the paired difference per metric "
                "(this model minus that one) with its 95% interval and a paired permutation p-value"})
    save_run: Optional[str] = field(default=None, metadata={
        "help": "Write this model's ranked run (top_k per query, JSON) here, for a later --compare"})


def run_eval(args: EvalArguments) -> Dict[str, float]:
    """Load the model and data named in ``args``, evaluate, print a report, return the metrics."""
    if not args.data_dir and not args.sts_file:
        raise ValueError("Pass --data_dir (BEIR retrieval) or --sts_file (STS)")
    start = time.perf_counter()
    data = load_beir(args.data_dir, args.split, with_corpus=not args.index_dir,
                     empty_documents=args.empty_documents) if args.data_dir else None
    pairs = load_sts(args.sts_file) if args.sts_file else None
    saved_run = _read_run(args.model_name_or_path) if os.path.isfile(args.model_name_or_path) else None
    if saved_run is not None and (pairs is not None or args.index_dir or args.dims or data is None):
        raise ValueError(f"{args.model_name_or_path}: a run file is scored on --data_dir alone (no --sts_file, "
                         "--index_dir or --dims)")
    model = _load(args, args.model_name_or_path) if saved_run is None else None
    metrics: Dict[str, float] = {}
    if pairs is not None:
        metrics.update({f"sts_{k}": v for k, v in evaluate_sts(model, pairs, batch_size=args.batch_size).items()})
        metrics.update(_sts_uncertainty(model, pairs, args))
    if data is not None:
        if saved_run is not None:
            run = saved_run
        elif args.index_dir:
            run = _index_run(model, data, args)
        else:
            run = evaluate_retrieval(model, data, top_k=args.top_k, batch_size=args.batch_size, show_progress_bar=True).run
            _print_examples(data, run, args.num_examples)
        metrics.update(_retrieval_metrics(run, data, args))
        if args.save_run and saved_run is None:
            os.makedirs(os.path.dirname(os.path.abspath(args.save_run)), exist_ok=True)
            write_json_atomic(args.save_run, {"model": args.model_name_or_path, "split": args.split, "run": run})
        if args.dims and not args.index_dir:
            for dim, values in evaluate_dims(model, data, parse_dims(args.dims), batch_size=args.batch_size).items():
                metrics[f"ndcg@10_d{dim}"] = values["ndcg@10"]
    metrics["seconds"] = time.perf_counter() - start
    _print_report(args, metrics)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def _load(args: EvalArguments, path: str) -> AutoModelForEmbedding:
    """A model with the evaluation's settings (the one evaluated, or the one it is compared with)."""
    return AutoModelForEmbedding.from_pretrained(
        path, pooling_method=args.pooling_method, max_length=args.max_length,
        precision=args.precision, **backend_kwargs(args.backend, args.calibration_file or (
            corpus_file(args.data_dir) if str(args.precision).lower() == "int8" and args.data_dir else None)),
    )


def _index_run(model, data, args: EvalArguments):
    """Queries searched in the built index (the model must be the one that made it)."""
    from ..index.search import Searcher

    searcher = Searcher(args.index_dir, model=model, nprobe=args.nprobe)
    return searcher.run(data.queries, top_k=args.top_k, exact=args.exact_search, batch_size=args.batch_size)


def _retrieval_metrics(run, data, args: EvalArguments) -> Dict[str, float]:
    """Each metric's mean over the queries, its interval (``_low``/``_high``) and, with ``--compare``, the
    paired difference to the other model or run (``_diff``, ``_diff_low``, ``_diff_high``, ``_p``)."""
    values = per_query(run, data.qrels, METRICS)
    out = {m: sum(v.values()) / max(1, len(v)) for m, v in values.items()}
    if args.bootstrap:
        for m, interval in metric_intervals(values, args.bootstrap, args.seed).items():
            out[f"{m}_low"], out[f"{m}_high"] = interval.low, interval.high
    if args.compare:
        other = per_query(_other_run(args, data), data.qrels, METRICS)
        for m, d in compare_metrics(values, other, max(args.bootstrap, 1), args.seed).items():
            out.update({f"{m}_diff": d.difference.mean, f"{m}_diff_low": d.difference.low,
                        f"{m}_diff_high": d.difference.high, f"{m}_p": d.p_value})
    return out


def _other_run(args: EvalArguments, data):
    """The run of ``--compare``: a run file (``--save_run``), or the other model evaluated here alike."""
    if os.path.isfile(args.compare):
        return _read_run(args.compare)
    other = _load(args, args.compare)
    if args.index_dir:
        raise ValueError("--compare with --index_dir: compare against a run file (--save_run) of the other model")
    return evaluate_retrieval(other, data, top_k=args.top_k, batch_size=args.batch_size).run


def _read_run(path: str):
    with open(path, encoding="utf-8") as f:
        try:
            saved = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a run file written by --save_run ({e})") from None
    if not isinstance(saved, dict) or "run" not in saved:
        raise ValueError(f"{path}: no 'run' field; write run files with --save_run")
    return saved["run"]


def _sts_uncertainty(model, pairs, args: EvalArguments) -> Dict[str, float]:
    out: Dict[str, float] = {}
    if not args.bootstrap and not args.compare:
        return out
    spearman = spearman_of(sts_cosines(model, pairs, batch_size=args.batch_size), pairs.scores)
    if args.bootstrap:
        interval = bootstrap_statistic(len(pairs.scores), spearman, args.bootstrap, args.seed)
        out["sts_spearman_low"], out["sts_spearman_high"] = interval.low, interval.high
    if args.compare:
        if os.path.isfile(args.compare):
            raise ValueError("--compare with --sts_file takes another model folder, not a run file")
        theirs = spearman_of(sts_cosines(_load(args, args.compare), pairs, batch_size=args.batch_size), pairs.scores)
        d = paired_statistic(len(pairs.scores), spearman, theirs, max(args.bootstrap, 1), args.seed)
        out.update({"sts_spearman_diff": d.difference.mean, "sts_spearman_diff_low": d.difference.low,
                    "sts_spearman_diff_high": d.difference.high, "sts_spearman_p": d.p_value})
    return out


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
    suffixes = ("_low", "_high", "_diff", "_diff_low", "_diff_high", "_p")
    for name, value in metrics.items():
        if name.endswith(suffixes) and any(name == base + s for s in suffixes for base in metrics):
            continue
        line = f"  {name:>12}: {value:.4f}"
        if f"{name}_low" in metrics:
            line += f" [{metrics[name + '_low']:.4f}, {metrics[name + '_high']:.4f}]"
        if f"{name}_diff" in metrics:
            p = metrics[f"{name}_p"]
            line += (f"   vs {args.compare}: {metrics[name + '_diff']:+.4f} [{metrics[name + '_diff_low']:+.4f}, "
                     f"{metrics[name + '_diff_high']:+.4f}], " + ("p < 0.001" if p < 0.001 else f"p = {p:.3f}"))
        print(line)
    if args.bootstrap:
        print(f"  (95% bootstrap intervals over {'pairs' if args.sts_file else 'queries'}, {args.bootstrap} resamples, "
              f"seed {args.seed})")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([EvalArguments], run_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
