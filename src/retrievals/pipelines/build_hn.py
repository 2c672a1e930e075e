"""Mine hard negatives for ``(query, positive[, negative])`` JSONL records.

    python -m retrievals.pipelines.build_hn --model_name_or_path MODEL --input_file train.jsonl \\
        --output_file train_hn.jsonl --positive_key positive --negative_key negative \\
        --range_for_sampling 2-200 --negative_number 15 [--candidate_pool corpus.jsonl]

``--candidate_pool`` is a JSONL file of ``{"text": ...}`` records (a ``title`` is prepended when present).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from ..data.jsonl import iter_jsonl, require_str
from ..data.records import text_field, text_list_field
from ..mining.hard_negatives import mine_hard_negatives, parse_range
from ..models.embedding_model import AutoModelForEmbedding
from .arguments import unescape
from .cli import run_cli

logger = logging.getLogger(__name__)


@dataclass
class BuildHNArguments:
    model_name_or_path: str = field(metadata={"help": "Embedding model (its saved pooling/instructions are used)"})
    input_file: str = field(metadata={"help": "JSONL with query and positive (and optionally negative)"})
    output_file: str = field(metadata={"help": "Where to write the records with mined negatives"})
    query_key: str = field(default="query")
    positive_key: str = field(default="positive")
    negative_key: str = field(default="negative")
    range_for_sampling: str = field(default="2-200", metadata={"help": "Ranks to sample from, 'start-end'"})
    negative_number: int = field(default=15)
    candidate_pool: Optional[str] = field(default=None, metadata={"help": "JSONL of {text} forming the corpus"})
    query_instruction: Optional[str] = field(default=None)
    document_instruction: Optional[str] = field(default=None)
    batch_size: int = field(default=64)
    seed: int = field(default=42)


def read_input(args: BuildHNArguments) -> List[dict]:
    records = []
    for line_no, record in iter_jsonl(args.input_file):
        origin = f"{args.input_file}:{line_no}"
        text_field(record, args.query_key, origin)
        text_list_field(record, args.positive_key, origin)
        text_list_field(record, args.negative_key, origin, required=False)
        records.append(record)
    if not records:
        raise ValueError(f"{args.input_file}: 0 records")
    return records


def read_pool(path: str) -> List[str]:
    texts = []
    for line_no, record in iter_jsonl(path):
        text = require_str(record, "text", path, line_no)
        title = record.get("title")
        texts.append(f"{title} {text}" if isinstance(title, str) and title.strip() else text)
    return texts


def run_build_hn(args: BuildHNArguments) -> List[dict]:
    value_range = parse_range(args.range_for_sampling)
    records = read_input(args)
    pool = read_pool(args.candidate_pool) if args.candidate_pool else None
    model = AutoModelForEmbedding.from_pretrained(args.model_name_or_path,
                                                  query_instruction=unescape(args.query_instruction),
                                                  document_instruction=unescape(args.document_instruction))
    mined = mine_hard_negatives(model, records, pool, query_key=args.query_key, positive_key=args.positive_key,
                                negative_key=args.negative_key, range_for_sampling=value_range,
                                negative_number=args.negative_number, seed=args.seed, batch_size=args.batch_size)
    with open(args.output_file, "w", encoding="utf-8") as f:
        for record in mined:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("Wrote %d records to %s", len(mined), args.output_file)
    return mined


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([BuildHNArguments], run_build_hn, argv)


if __name__ == "__main__":
    sys.exit(main())
