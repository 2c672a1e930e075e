"""Training datasets, validated when loaded.

- ``RetrievalDataset``: pairs ``(query, positive)`` and groups ``(query, positive, [negatives])``;
  each item samples 1 positive + ``train_group_size - 1`` negatives.
- ``ScoredPairDataset``: ``(query, document, score)`` (STS, CoSENT).
- ``PointwiseDataset``: ``(text, label)`` (ArcFace).
- ``ListwiseDataset``: ``(query, [documents], [scores])`` (distillation, list-wise losses).
"""

from __future__ import annotations

import json
import logging
import math
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


def score_list_field(record: Dict[str, Any], key: str, origin: str, texts: List[str], texts_key: str) -> List[float]:
    """A list of finite numbers, one per text of ``texts_key`` (a JSON-encoded list in a CSV cell too)."""
    if key not in record or record[key] is None:
        raise InvalidRecord(f"{origin}: missing field {key!r} (teacher scores for the {len(texts)} texts "
                            f"of {texts_key!r})")
    value = record[key]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise InvalidRecord(f"{origin}: field {key!r} must be a list of numbers, got {type(value).__name__}")
    if len(value) != len(texts):
        raise InvalidRecord(f"{origin}: field {key!r} has {len(value)} scores but {texts_key!r} has "
                            f"{len(texts)} texts")
    scores = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise InvalidRecord(f"{origin}: field {key!r}[{i}] must be a finite number, got {item!r}")
        scores.append(float(item))
    return scores


def item_rng(seed: int, index: int, epoch: int) -> random.Random:
    """The random source of one item in one epoch: the same ``(seed, index, epoch)``, the same draws."""
    return random.Random(hash((seed, index, epoch)))


def sample_indices(rng: random.Random, size: int, need: int) -> List[int]:
    """``need`` distinct indices of ``range(size)``, or with replacement when ``size < need``."""
    if need <= 0 or size == 0:
        return []
    if size >= need:
        return rng.sample(range(size), need)
    return [rng.randrange(size) for _ in range(need)]


class EpochSampled(Dataset):
    """A dataset whose items are drawn per ``(seed, index, epoch)``; ``RetrievalTrainer`` calls
    :meth:`set_epoch` at each epoch begin."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the items of ``epoch`` from now on."""
        self.epoch = int(epoch)


class RetrievalDataset(EpochSampled):
    """``{"query", "positive", "negative": [...]}`` items; ``negative`` is empty for pair data.

    ``train_group_size`` = 1 positive + (n - 1) negatives per item. Negatives are sampled without
    replacement, with replacement only when a record has too few (reported once).
    Sampling is seeded by ``(seed, index, epoch)``; ``RetrievalTrainer`` calls :meth:`set_epoch` at
    every epoch, so each epoch draws new negatives (and positives), deterministically and resumably.

    ``with_teacher_scores=True`` (distillation) requires ``pos_scores_key`` / ``neg_scores_key`` lists
    aligned with the positive / negative texts in every record, and adds ``"teacher_scores"`` to each
    item: the chosen positive's score first, then the sampled negatives' scores in the same order.
    """

    def __init__(self, source: Any, query_key: str = "query", positive_key: str = "positive",
                 negative_key: str = "negative", train_group_size: int = 1, skip_invalid: bool = False,
                 seed: int = 42, query_instruction_key: Optional[str] = None, with_teacher_scores: bool = False,
                 pos_scores_key: str = "pos_scores", neg_scores_key: str = "neg_scores") -> None:
        if train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {train_group_size}")
        self.keys = (query_key, positive_key, negative_key)
        self.score_keys = (pos_scores_key, neg_scores_key) if with_teacher_scores else None
        self.train_group_size = train_group_size
        self.seed, self.epoch = seed, 0
        self.rows = load_validated(source, self._parse, skip_invalid)
        need = train_group_size - 1
        short = sum(1 for r in self.rows if 0 < len(r["negative"]) < need)
        if need and short:
            logger.warning("%d of %d records have fewer than %d negatives; sampling those with replacement",
                           short, len(self.rows), need)
        self._initial = [list(r["negative"]) for r in self.rows]
        self._pending: Optional[List[List[str]]] = None
        self._pending_after = 0

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
        if self.score_keys:
            ps, ns = self.score_keys
            row["pos_scores"] = score_list_field(record, ps, origin, row["positive"], p)
            needs_neg = bool(row["negative"]) and self.train_group_size > 1
            row["neg_scores"] = score_list_field(record, ns, origin, row["negative"], n) if needs_neg else []
        return row

    def negatives(self) -> List[List[str]]:
        """The negatives each row samples from now."""
        return [list(r["negative"]) for r in self.rows]

    def initial_negatives(self) -> List[List[str]]:
        """The negatives of the training file."""
        return [list(n) for n in self._initial]

    def set_negatives(self, negatives: List[List[str]], after_items: int = 0) -> None:
        """Replace every row's negatives (online refresh), after ``after_items`` more items are drawn."""
        if len(negatives) != len(self.rows):
            raise ValueError(f"{len(negatives)} negative lists for {len(self.rows)} training rows")
        if self.score_keys:
            raise ValueError("negatives with teacher scores (distillation) cannot be refreshed: the scores would "
                             "no longer match")
        need = self.train_group_size > 1
        for i, row in enumerate(negatives):
            if need and not row:
                raise ValueError(f"refreshed negatives of row {i} are empty but train_group_size={self.train_group_size}")
        self._pending, self._pending_after = [list(n) for n in negatives], int(after_items)
        if after_items <= 0:
            self._apply_pending()

    def _apply_pending(self) -> None:
        if self._pending is not None:
            for row, negatives in zip(self.rows, self._pending):
                row["negative"] = negatives
            self._pending = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self._pending is not None:
            if self._pending_after <= 0:
                self._apply_pending()
            self._pending_after -= 1
        row = self.rows[index]
        rng = item_rng(self.seed, index, self.epoch)
        need = self.train_group_size - 1
        negatives = row["negative"]
        # Sample indices (the same random draws as sampling the texts) so scores stay aligned.
        chosen = sample_indices(rng, len(negatives), need)
        positive = rng.choice(range(len(row["positive"])))
        item = {"query": row["query"], "positive": row["positive"][positive], "negative": [negatives[i] for i in chosen]}
        if self.score_keys:
            item["teacher_scores"] = [row["pos_scores"][positive]] + [row["neg_scores"][i] for i in chosen]
        return item


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


class ListwiseDataset(EpochSampled):
    """``{"query", "documents", "scores"}`` items of exactly ``group_size`` documents.

    The first document of a record is always kept (it is the collator's ``positive``); the other
    ``group_size - 1`` are sampled from the rest, without replacement, with replacement only for
    records with too few (reported once, as :class:`RetrievalDataset` does). Sampling is seeded by
    ``(seed, index, epoch)``; ``RetrievalTrainer`` calls :meth:`set_epoch` each epoch.
    Without ``group_size`` every list must have the same length.
    """

    def __init__(self, source: Any, query_key: str = "query", documents_key: str = "documents",
                 scores_key: str = "scores", group_size: Optional[int] = None, skip_invalid: bool = False,
                 seed: int = 42) -> None:
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.keys = (query_key, documents_key, scores_key)
        self.group_size, self.seed, self.epoch = group_size, seed, 0
        self.rows = load_validated(source, self._parse, skip_invalid)
        sizes = {len(r["documents"]) for r in self.rows}
        if group_size is None and len(sizes) > 1:
            raise ValueError(f"lists have different lengths {sorted(sizes)[:5]}; set group_size")
        short = sum(1 for r in self.rows if len(r["documents"]) < (group_size or 0))
        if short:
            logger.warning("%d of %d lists have fewer than %d documents; sampling their documents after the first "
                           "with replacement", short, len(self.rows), group_size)

    def _parse(self, record: Dict[str, Any], origin: str) -> Dict[str, Any]:
        q, d, s = self.keys
        docs = text_list_field(record, d, origin)
        scores = record.get(s)
        if not isinstance(scores, list) or len(scores) != len(docs):
            raise InvalidRecord(f"{origin}: field {s!r} must be a list of {len(docs)} numbers")
        if self.group_size and self.group_size > 1 and len(docs) < 2:
            raise InvalidRecord(f"{origin}: field {d!r} has 1 document but group_size={self.group_size} needs "
                                "at least 2 (the first plus others to sample from)")
        return {"query": text_field(record, q, origin), "documents": docs,
                "scores": [number_field({s: x}, s, origin) for x in scores]}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        if not self.group_size or self.group_size == len(row["documents"]):
            return row
        rest = sample_indices(item_rng(self.seed, index, self.epoch), len(row["documents"]) - 1, self.group_size - 1)
        keep = [0] + [1 + i for i in rest]
        return {"query": row["query"], "documents": [row["documents"][i] for i in keep],
                "scores": [row["scores"][i] for i in keep]}
