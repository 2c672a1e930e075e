"""Check training data against a test split for leaked queries (exact and near duplicates).

    retrievals check-data --data_dir ../shared/data/scifact [--model_name_or_path DIR --threshold 0.95]
    retrievals check-data --data_dir BEIR --train_file train.jsonl --on_leak error

Training side: the BEIR folder's ``--train_split`` queries and their judged documents, or a JSONL training
file (``query``, ``positive``). Test side: the ``--test_split`` queries. ``finetune_beir`` and
``embed --do_eval`` run the same check at their start (``--on_leak``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from ..data.beir import BeirDataset, load_beir
from ..data.jsonl import iter_jsonl
from ..evaluation.leakage import LEAK_POLICIES, LeakReport, apply_policy, check_leakage
from .cli import run_cli

logger = logging.getLogger(__name__)
ON_LEAK_HELP = "What a leak does: " + "; ".join(f"{k}: {v}" for k, v in LEAK_POLICIES.items())


@dataclass
class CheckDataArguments:
    data_dir: str = field(metadata={"help": "BEIR-layout folder whose test split is checked against"})
    train_split: str = field(default="train", metadata={"help": "qrels split of the training queries"})
    test_split: str = field(default="test")
    train_file: Optional[str] = field(default=None, metadata={
        "help": "A JSONL training file (query, positive) instead of the folder's train split"})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Embedding model for near duplicates (cosine >= --threshold); without it, exact ones only"})
    threshold: float = field(default=0.95, metadata={"help": "Cosine at or above which two queries are near copies"})
    positives: bool = field(default=True, metadata={"help": "Also check training positives against test queries"})
    on_leak: str = field(default="warn", metadata={"help": ON_LEAK_HELP})
    num_examples: int = field(default=5)
    batch_size: int = field(default=64)
    output_file: Optional[str] = field(default=None, metadata={"help": "Write the report as JSON here"})


def training_side(args: CheckDataArguments) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``({id: query}, {id: positive text})`` of the training data."""
    if args.train_file:
        queries, positives = {}, {}
        for line_no, record in iter_jsonl(args.train_file):
            for key in ("query", "positive"):
                if key not in record:
                    raise ValueError(f"{args.train_file}:{line_no}: missing field {key!r}")
            positive = record["positive"][0] if isinstance(record["positive"], list) else record["positive"]
            queries[f"line {line_no}"] = str(record["query"])
            positives[f"line {line_no}"] = str(positive)
        return queries, positives
    train = load_beir(args.data_dir, args.train_split, with_corpus=args.positives)
    return train.queries, _positive_texts(train) if args.positives else {}


def _positive_texts(data: BeirDataset) -> Dict[str, str]:
    texts = data.corpus_texts()
    by_id = dict(zip(data.corpus_ids(), texts))
    return {doc: by_id[doc] for rels in data.qrels.values() for doc, r in rels.items() if r > 0 and doc in by_id}


def leakage_report(train_queries: Dict[str, str], test_queries: Dict[str, str], positives: Optional[Dict[str, str]],
                   model=None, threshold: float = 0.95, batch_size: int = 64) -> LeakReport:
    return check_leakage(train_queries, test_queries, positives or None, model=model, threshold=threshold,
                         batch_size=batch_size)


def run_check_data(args: CheckDataArguments) -> LeakReport:
    if args.on_leak not in LEAK_POLICIES:
        raise ValueError(f"Unknown --on_leak {args.on_leak!r}; valid: {', '.join(LEAK_POLICIES)}")
    train_queries, positives = training_side(args)
    test = load_beir(args.data_dir, args.test_split, with_corpus=False)
    model = None
    if args.model_name_or_path:
        from ..models.embedding_model import AutoModelForEmbedding

        model = AutoModelForEmbedding.from_pretrained(args.model_name_or_path)
    report = leakage_report(train_queries, test.queries, positives, model, args.threshold, args.batch_size)
    print(report.summary(args.num_examples))
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
    apply_policy(report, args.on_leak, where="check-data")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([CheckDataArguments], run_check_data, argv)


if __name__ == "__main__":
    sys.exit(main())


def check_splits(train: BeirDataset, held_out: Dict[str, BeirDataset], model, threshold: float, policy: str,
                 where: str) -> Tuple[BeirDataset, Dict[str, Dict[str, object]]]:
    """The check at the start of a fine-tune: training queries (exact and near, with ``model``) and training
    positives (exact) against each held-out split's queries; ``policy`` acts on every report. Returns the
    training split (without the leaked queries under ``drop``) and each split's report."""
    reports, drop = {}, set()
    positives = _positive_texts(train)
    for name, data in held_out.items():
        report = check_leakage(train.queries, data.queries, model=model, threshold=threshold)
        exact = check_leakage(positives, data.queries, min_jaccard=None)  # documents: exact copies only
        report.leaks += [replace(leak, kind=leak.kind.replace("query", "positive")) for leak in exact.leaks]
        if exact.leaks:
            report.counts["exact positive"] = report.counts.get("exact positive", 0) + len(exact.leaks)
        reports[name] = report.to_dict()
        dropped = apply_policy(report, policy, where=f"{where}, {name} split")
        drop |= {q for q in dropped if q in train.queries}
        drop |= {q for q, rels in train.qrels.items() if any(d in dropped for d in rels)}
    if drop:
        logger.warning("%s: %d leaked training queries dropped (--on_leak drop)", where, len(drop))
        train = replace(train, queries={q: t for q, t in train.queries.items() if q not in drop},
                        qrels={q: r for q, r in train.qrels.items() if q not in drop})
    return train, reports


def check_training_file(path: str, data_dir: str, split: str, model, threshold: float, policy: str,
                        query_key: str = "query", positive_key: str = "positive",
                        out_dir: Optional[str] = None) -> Tuple[str, Dict[str, object]]:
    """``embed --do_train --do_eval``'s check: the training file's queries (exact and near) and positives
    (exact) against the evaluation split's queries. Returns the file to train on: ``path``, or under
    ``drop`` a copy without the leaked lines beside ``out_dir``, and the report (``<out_dir>.train-no-leak.jsonl``: the output
    folder itself must stay empty for the Trainer)."""
    if not os.path.isfile(path) or not path.endswith((".jsonl", ".jsonl.gz")):
        logger.info("leakage check skipped: %s is not a local JSONL file", path)
        return path, {}
    records = list(iter_jsonl(path))
    queries = {f"line {n}": str(r.get(query_key, "")) for n, r in records}
    positives = {}
    for n, r in records:
        positive = r.get(positive_key, "")
        positives[f"line {n}"] = str(positive[0] if isinstance(positive, list) and positive else positive)
    test = load_beir(data_dir, split, with_corpus=False)
    report = check_leakage(queries, test.queries, model=model, threshold=threshold)
    exact = check_leakage(positives, test.queries, min_jaccard=None)
    report.leaks += [replace(leak, kind="exact positive") for leak in exact.leaks]
    if exact.leaks:
        report.counts["exact positive"] = len(exact.leaks)
    drop = apply_policy(report, policy, where=f"embed: {path} against {data_dir} {split}")
    if not drop:
        return path, report.to_dict()
    out = os.path.abspath(out_dir or "train")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    kept = f"{out}.train-no-leak.jsonl"
    tmp = f"{kept}.tmp-{os.getpid()}"  # each rank of a distributed run writes the same file: whole, never half
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for n, r in records if f"line {n}" not in drop)
    os.replace(tmp, kept)
    logger.warning("embed: trains on %s (%d of %d lines; the leaked ones dropped)", kept, len(records) - len(drop),
                   len(records))
    return kept, report.to_dict()
