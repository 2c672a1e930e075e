"""Training datasets, validated when loaded.

- ``RetrievalDataset``: pairs ``(query, positive)`` and groups ``(query, positive, [negatives])``;
  each item samples 1 positive + ``train_group_size - 1`` negatives.
- ``ScoredPairDataset``: ``(query, document, score)`` (STS, CoSENT).
- ``PointwiseDataset``: ``(text, label)`` (ArcFace).
- ``ListwiseDataset``: ``(query, [documents], [scores])`` (distillation, list-wise losses).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict, List, Optional

from torch.utils.data import Dataset

from .records import InvalidRecord, SkipCounter, iter_records, number_field, text_field, text_list_field

logger = logging.getLogger(__name__)


def load_validated(source: Any, parse: Callable[[Dict[str, Any], str], Dict[str, Any]],
                   skip_invalid: bool) -> List[Dict[str, Any]]:
    """Parse every record; raise on the first invalid one, or skip, count and report them."""
    rows, counter, total = [], SkipCounter(), 0
    name = source if isinstance(source, str) else type(source).__name__
    for origin, record in iter_records(source):
        total += 1
        try:
            rows.append(parse(record, origin))
        except InvalidRecord as e:
            if not skip_invalid:
                raise
            counter.add(e)
    counter.report(total, str(name))
    if not rows:
        raise ValueError(f"{name}: 0 valid examples ({total} records read)")
    return rows


class RetrievalDataset(Dataset):
    """``{"query", "positive", "negative": [...]}`` items; ``negative`` is empty for pair data.

    ``train_group_size`` = 1 positive + (n - 1) negatives per item. Negatives are sampled without
    replacement, with replacement only when a record has too few (reported once).
    Sampling is seeded by ``(seed, index, epoch)``: set ``dataset.epoch`` to vary it per epoch.
    """

    def __init__(self, source: Any, query_key: str = "query", positive_key: str = "positive",
                 negative_key: str = "negative", train_group_size: int = 1, skip_invalid: bool = False,
                 seed: int = 42, query_instruction_key: Optional[str] = None) -> None:
        if train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {train_group_size}")
        self.keys = (query_key, positive_key, negative_key)
        self.train_group_size = train_group_size
        self.seed, self.epoch = seed, 0
        self.rows = load_validated(source, self._parse, skip_invalid)
        need = train_group_size - 1
        short = sum(1 for r in self.rows if 0 < len(r["negative"]) < need)
        if need and short:
            logger.warning("%d of %d records have fewer than %d negatives; sampling those with replacement",
                           short, len(self.rows), need)

    def _parse(self, record: Dict[str, Any], origin: str) -> Dict[str, Any]:
        q, p, n = self.keys
        row = {
            "query": text_field(record, q, origin),
            "positive": text_list_field(record, p, origin),
            "negative": text_list_field(record, n, origin, required=False),
        }
        if self.train_group_size > 1 and not row["negative"]:
            raise InvalidRecord(f"{origin}: field {n!r} is missing or empty but train_group_size="
                                f"{self.train_group_size} needs negatives")
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        rng = random.Random(hash((self.seed, index, self.epoch)))
        need = self.train_group_size - 1
        negatives = row["negative"]
        if need == 0 or not negatives:
            sampled: List[str] = []
        elif len(negatives) >= need:
            sampled = rng.sample(negatives, need)
        else:
            sampled = [rng.choice(negatives) for _ in range(need)]
        return {"query": row["query"], "positive": rng.choice(row["positive"]), "negative": sampled}


class ScoredPairDataset(Dataset):
    """``{"query", "positive", "label"}`` items from ``(text1, text2, score)`` records."""

    def __init__(self, source: Any, query_key: str = "query", document_key: str = "positive",
                 label_key: str = "label", skip_invalid: bool = False) -> None:
        self.keys = (query_key, document_key, label_key)
        self.rows = load_validated(source, self._parse, skip_invalid)

    def _parse(self, record: Dict[str, Any], origin: str) -> Dict[str, Any]:
        q, d, label = self.keys
        return {"query": text_field(record, q, origin), "positive": text_field(record, d, origin),
                "label": number_field(record, label, origin)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.rows[index]


class PointwiseDataset(Dataset):
    """``{"query", "label"}`` items from ``(text, label)`` records; labels map to class ids."""

    def __init__(self, source: Any, text_key: str = "text", label_key: str = "label",
                 skip_invalid: bool = False) -> None:
        self.keys = (text_key, label_key)
        raw = load_validated(source, self._parse, skip_invalid)
        self.label_to_id = {label: i for i, label in enumerate(sorted({r["label"] for r in raw}, key=str))}
        self.rows = [{"query": r["query"], "label": self.label_to_id[r["label"]]} for r in raw]

    def _parse(self, record: Dict[str, Any], origin: str) -> Dict[str, Any]:
        text, label = self.keys
        if label not in record or record[label] is None:
            raise InvalidRecord(f"{origin}: missing field {label!r}")
        return {"query": text_field(record, text, origin), "label": record[label]}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.rows[index]


class ListwiseDataset(Dataset):
    """``{"query", "documents", "scores"}`` items; lists are truncated/sampled to ``group_size``."""

    def __init__(self, source: Any, query_key: str = "query", documents_key: str = "documents",
                 scores_key: str = "scores", group_size: Optional[int] = None, skip_invalid: bool = False,
                 seed: int = 42) -> None:
        self.keys = (query_key, documents_key, scores_key)
        self.group_size, self.seed, self.epoch = group_size, seed, 0
        self.rows = load_validated(source, self._parse, skip_invalid)
        sizes = {len(r["documents"]) for r in self.rows}
        if group_size is None and len(sizes) > 1:
            raise ValueError(f"lists have different lengths {sorted(sizes)[:5]}; set group_size")

    def _parse(self, record: Dict[str, Any], origin: str) -> Dict[str, Any]:
        q, d, s = self.keys
        docs = text_list_field(record, d, origin)
        scores = record.get(s)
        if not isinstance(scores, list) or len(scores) != len(docs):
            raise InvalidRecord(f"{origin}: field {s!r} must be a list of {len(docs)} numbers")
        return {"query": text_field(record, q, origin), "documents": docs,
                "scores": [number_field({s: x}, s, origin) for x in scores]}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        if not self.group_size or self.group_size >= len(row["documents"]):
            return row
        rng = random.Random(hash((self.seed, index, self.epoch)))
        keep = sorted(rng.sample(range(len(row["documents"])), self.group_size))
        return {"query": row["query"], "documents": [row["documents"][i] for i in keep],
                "scores": [row["scores"][i] for i in keep]}
