"""Sentence-pair similarity data (STS-B): CSV ``s1,s2,score`` or tab-separated ``s1 s2 score``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import List

from .jsonl import open_text


@dataclass
class StsPairs:
    sentences1: List[str]
    sentences2: List[str]
    scores: List[float]


def load_sts(path: str) -> StsPairs:
    """Read an STS file without header; the delimiter is a comma for ``.csv``, else a tab."""
    delimiter = "," if path.endswith((".csv", ".csv.gz")) else "\t"
    s1, s2, scores = [], [], []
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        for line_no, row in enumerate(reader, start=1):
            if not row:
                continue
            if len(row) != 3:
                raise ValueError(f"{path}:{line_no}: expected 3 fields (sentence1, sentence2, score), got {len(row)}")
            try:
                score = float(row[2])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: field 'score' is not a number: {row[2]!r}") from None
            s1.append(row[0])
            s2.append(row[1])
            scores.append(score)
    if not scores:
        raise ValueError(f"{path}: 0 pairs")
    return StsPairs(s1, s2, scores)
