"""Mine hard negatives for ``(query, positive[, negative])`` JSONL records.

    python -m retrievals.pipelines.build_hn --model_name_or_path MODEL --input_file train.jsonl \\
        --output_file train_hn.jsonl --positive_key positive --negative_key negative \\
        --range_for_sampling 2-200 --negative_number 15 [--candidate_pool corpus.jsonl]

``--candidate_pool`` is a JSONL file of ``{"_id", "title", "text"}`` records (``_id`` and ``title`` optional;
the title is prepended when present). A pool document is never mined as a negative of a record whose
positive equals it with or without its title; ``--positive_id_key pos_ids`` also bans the pool
documents whose ``_id`` the record lists in ``pos_ids``.

``--teacher_model_name_or_path TEACHER`` then scores every positive and negative with a teacher (a
bi-encoder saved by this package, or a ``...ForSequenceClassification`` cross-encoder) and writes
``pos_scores`` / ``neg_scores`` lists aligned with ``positive`` / ``negative`` (FlagEmbedding's format),
the input of ``embed --loss_fn listwise_kl`` / ``margin_mse``. ``--score_only`` scores the input
file's own negatives without mining (no ``--model_name_or_path`` needed).

False-negative control (off by default): ``--max_positive_ratio 0.95`` drops candidates scoring above
95% of the positive's score (NV-Retriever's TopK-PercPos), ``--positive_margin 0.05`` those within 0.05
of it, ``--teacher_threshold 0.5`` those the teacher scores as relevant. The count each rule dropped
is logged.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..data.corpus import EMPTY_DOCUMENTS_HELP, CorpusOptions, CorpusReader
from ..data.jsonl import iter_jsonl
from ..data.records import InvalidRecord, text_field, text_list_field
from ..mining.false_negatives import FalseNegativeFilter
from ..mining.hard_negatives import PoolDocument, mine_hard_negatives, parse_range
from ..mining.teacher import load_teacher, score_records
from ..models.embedding_model import AutoModelForEmbedding
from .arguments import unescape
from .backend_flags import BACKEND_HELP, CALIBRATION_HELP, backend_kwargs
from .cli import run_cli

logger = logging.getLogger(__name__)


@dataclass
class BuildHNArguments:
    input_file: str = field(metadata={"help": "JSONL with query and positive (and optionally negative)"})
    output_file: str = field(metadata={"help": "Where to write the records with mined negatives"})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Embedding model that mines (its saved pooling/instructions are used); not needed with --score_only"})
    query_key: str = field(default="query")
    backend: Optional[str] = field(default=None, metadata={"help": BACKEND_HELP})
    calibration_file: Optional[str] = field(default=None, metadata={"help": CALIBRATION_HELP})
    positive_key: str = field(default="positive")
    negative_key: str = field(default="negative")
    range_for_sampling: str = field(default="2-200", metadata={"help": "Ranks to sample from, 'start-end'"})
    negative_number: int = field(default=15)
    candidate_pool: Optional[str] = field(default=None, metadata={
        "help": "JSONL of {_id, title, text} forming the corpus (_id and title optional)"})
    positive_id_key: Optional[str] = field(default=None, metadata={
        "help": "Input field listing the pool _ids of each record's positives, banned as negatives (default: none; "
                "positives are matched on their text only)"})
    pooling_method: Optional[str] = field(default=None, metadata={
        "help": "Pooling of the mining model (cls, mean, max, weightedmean, last); default: the model's saved one"})
    query_instruction: Optional[str] = field(default=None)
    document_instruction: Optional[str] = field(default=None)
    batch_size: int = field(default=64)
    seed: int = field(default=42)
    teacher_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Teacher that scores positives and negatives into pos_scores/neg_scores: a bi-encoder or a "
                "...ForSequenceClassification cross-encoder"})
    teacher_batch_size: int = field(default=32, metadata={"help": "Batch size of the teacher"})
    teacher_max_length: Optional[int] = field(default=None, metadata={
        "help": "Teacher max tokens (cross-encoder: per pair, default its saved length, else 512; "
                "bi-encoder: per document, default saved)"})
    pos_scores_key: str = field(default="pos_scores", metadata={"help": "Output field of the positives' teacher scores"})
    neg_scores_key: str = field(default="neg_scores", metadata={"help": "Output field of the negatives' teacher scores"})
    score_only: bool = field(default=False, metadata={
        "help": "Do not mine: only score the input file's positives and negatives with the teacher"})
    max_positive_ratio: Optional[float] = field(default=None, metadata={
        "help": "False-negative rule (TopK-PercPos): drop candidates scoring above this fraction of the positive's "
                "score, e.g. 0.95"})
    positive_margin: Optional[float] = field(default=None, metadata={
        "help": "False-negative rule (TopK-MarginPos): drop candidates scoring above the positive's score minus this"})
    teacher_threshold: Optional[float] = field(default=None, metadata={
        "help": "False-negative rule: drop candidates the teacher (--teacher_model_name_or_path) scores as relevant: "
                "cross-encoder probability sigmoid(score) (bi-encoder: cosine) at or above this, e.g. 0.5"})
    empty_documents: str = field(default="skip", metadata={"help": "Of --candidate_pool: " + EMPTY_DOCUMENTS_HELP})
    index_dir: Optional[str] = field(default=None, metadata={
        "help": "Mine from this index (retrievals.pipelines.index) instead of encoding a pool; texts come from the "
                "shards (encoded with --store_text) or from --candidate_pool (by _id)"})

    def __post_init__(self) -> None:
        if self.score_only and not self.teacher_model_name_or_path:
            raise ValueError("--score_only needs --teacher_model_name_or_path")
        if not self.score_only and not self.model_name_or_path and not self.index_dir:
            raise ValueError("--model_name_or_path is required (the model that mines negatives) unless --score_only")
        if self.positive_id_key and not self.score_only and not self.candidate_pool and not self.index_dir:
            raise ValueError("--positive_id_key needs a --candidate_pool whose records have '_id' fields")
        if self.teacher_threshold is not None and not self.teacher_model_name_or_path:
            raise ValueError("--teacher_threshold needs --teacher_model_name_or_path")

    def false_negatives(self) -> Optional[FalseNegativeFilter]:
        rules = FalseNegativeFilter(self.max_positive_ratio, self.positive_margin, self.teacher_threshold)
        return rules if rules.uses_positive_scores or rules.uses_teacher else None


def read_input(args: BuildHNArguments) -> List[dict]:
    records, with_ids = [], 0
    for line_no, record in iter_jsonl(args.input_file):
        origin = f"{args.input_file}:{line_no}"
        text_field(record, args.query_key, origin)
        text_list_field(record, args.positive_key, origin)
        text_list_field(record, args.negative_key, origin, required=False)
        if args.positive_id_key and not args.score_only:
            with_ids += bool(id_list_field(record, args.positive_id_key, origin))
        records.append(record)
    if not records:
        raise ValueError(f"{args.input_file}: 0 records")
    if args.positive_id_key and not args.score_only and not with_ids:
        raise ValueError(f"{args.input_file}: no record has the field {args.positive_id_key!r} (--positive_id_key)")
    return records


def id_list_field(record: Dict[str, Any], key: str, origin: str) -> List[str]:
    """Ids in ``record[key]``: one or a list, each a string or an integer; ``[]`` when absent."""
    value = record.get(key)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            where = f"{key!r}[{i}]" if isinstance(value, list) else repr(key)
            raise InvalidRecord(f"{origin}: field {where} must be a string or an integer, got {type(item).__name__}")
    return [str(item) for item in items]


def read_pool(path: str, require_ids: bool = False, empty_documents: str = "skip") -> List[PoolDocument]:
    """The candidate pool's documents, read by the package's corpus reader (``.jsonl``, ``.jsonl.gz``,
    ``.parquet`` or a folder; empty documents per ``empty_documents``); ``_id`` (a string or an integer) is
    required with ``require_ids``."""
    reader = CorpusReader(path, CorpusOptions(id_required=require_ids, empty_documents=empty_documents))
    docs = [PoolDocument(text=row.body or row.text, title=row.title if row.body else "", doc_id=row.id or None)
            for row in reader]
    reader.stats.report(path)
    return docs


def mine_with_index(args: BuildHNArguments, records: List[dict], teacher: Any = None) -> List[dict]:
    """Search the built index with its model, or ``--model_name_or_path``, loaded with ``--pooling_method`` and
    the instruction flags when given: a model that did not make the index's vectors is refused, naming both."""
    from ..index.search import Searcher
    from ..mining.index_mining import mine_from_index

    settings = {"pooling_method": args.pooling_method, "query_instruction": unescape(args.query_instruction),
                "document_instruction": unescape(args.document_instruction)}
    searcher = Searcher(args.index_dir, model=args.model_name_or_path, **backend_kwargs(args.backend, args.calibration_file),
                        **{k: v for k, v in settings.items() if v is not None})
    if args.candidate_pool:  # with titles: the pool's positive rule exactly
        by_id = {doc.doc_id: doc for doc in read_pool(args.candidate_pool, True, args.empty_documents)}

        def texts_of(rows, ids):
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise ValueError(f"{args.candidate_pool}: no document with _id {missing[0]!r} (found in the index)")
            return {row: by_id[i] for row, i in zip(rows, ids)}
    else:
        def texts_of(rows, ids):
            return searcher.texts_of(rows)  # checked against the index's shards
    return mine_from_index(searcher, records, texts_of, query_key=args.query_key, positive_key=args.positive_key,
                           negative_key=args.negative_key, range_for_sampling=parse_range(args.range_for_sampling),
                           negative_number=args.negative_number, seed=args.seed, batch_size=args.batch_size,
                           positive_id_key=args.positive_id_key, false_negatives=args.false_negatives(),
                           teacher=teacher if args.teacher_threshold is not None else None)


def mine(args: BuildHNArguments, records: List[dict], teacher: Any = None) -> List[dict]:
    if args.index_dir:
        return mine_with_index(args, records, teacher)
    value_range = parse_range(args.range_for_sampling)
    pool = read_pool(args.candidate_pool, bool(args.positive_id_key), args.empty_documents) if args.candidate_pool else None
    model = AutoModelForEmbedding.from_pretrained(args.model_name_or_path, pooling_method=args.pooling_method,
                                                  query_instruction=unescape(args.query_instruction),
                                                  document_instruction=unescape(args.document_instruction),
                                                  **backend_kwargs(args.backend, args.calibration_file))
    return mine_hard_negatives(model, records, pool, query_key=args.query_key, positive_key=args.positive_key,
                               negative_key=args.negative_key, range_for_sampling=value_range,
                               negative_number=args.negative_number, seed=args.seed, batch_size=args.batch_size,
                               positive_id_key=args.positive_id_key, false_negatives=args.false_negatives(),
                               teacher=teacher if args.teacher_threshold is not None else None)


def run_build_hn(args: BuildHNArguments) -> List[dict]:
    """Mine (unless ``score_only``), score with the teacher (when given), write ``output_file``."""
    if not args.score_only:
        parse_range(args.range_for_sampling)  # fail on a bad flag before loading anything
    records = read_input(args)
    teacher = load_teacher(args.teacher_model_name_or_path, max_length=args.teacher_max_length) \
        if args.teacher_model_name_or_path else None
    out = records if args.score_only else mine(args, records, teacher)
    if teacher is not None:
        out = score_records(teacher, out, query_key=args.query_key, positive_key=args.positive_key,
                            negative_key=args.negative_key, pos_scores_key=args.pos_scores_key,
                            neg_scores_key=args.neg_scores_key, batch_size=args.teacher_batch_size)
    with open(args.output_file, "w", encoding="utf-8") as f:
        for record in out:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("Wrote %d records to %s", len(out), args.output_file)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([BuildHNArguments], run_build_hn, argv)


if __name__ == "__main__":
    sys.exit(main())
