"""Collators: dataclasses that turn dataset items into token tensors, without side effects.

They tokenize through :func:`retrievals.models.tokenization.tokenize_texts`, the function
``encode`` uses, so instructions, truncation and the decoder EOS token are identical in training
and inference. Fields left as ``None`` (instructions, ``append_eos``, padding side) are filled
from the model's saved config by ``RetrievalTrainer`` (``with_model_config``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..models.tokenization import pad_batch, tokenize_texts

logger = logging.getLogger(__name__)


def text_ids(texts: Sequence[str]) -> torch.Tensor:
    """Stable 56-bit ids of texts, for masking in-batch candidates that are the same text."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=7).digest(), "big")
                         for t in texts], dtype=torch.long)


def _first(value: Any) -> str:
    return value[0] if isinstance(value, (list, tuple)) else value


@dataclass
class _BaseCollator:
    tokenizer: Any
    query_max_length: int = 32
    document_max_length: int = 128
    query_instruction: Optional[str] = None
    document_instruction: Optional[str] = None
    append_eos: Optional[bool] = None
    padding_side: Optional[str] = None
    pad_token_id: Optional[int] = None

    def with_model_config(self, config, pad_token_id: Optional[int] = None) -> _BaseCollator:
        """A copy whose unset fields come from an ``EmbeddingConfig`` (and the model's pad id: a tokenizer
        loaded separately for a decoder LLM often has no pad token of its own)."""
        updates = {name: getattr(config, name) for name in
                   ("query_instruction", "document_instruction", "append_eos", "padding_side")
                   if getattr(self, name) is None}
        if self.pad_token_id is None and pad_token_id is not None:
            updates["pad_token_id"] = pad_token_id
        return dataclasses.replace(self, **updates)

    def padding_id(self) -> int:
        """``pad_token_id`` if set, else the tokenizer's; a clear error when neither exists."""
        pad = self.pad_token_id if self.pad_token_id is not None else self.tokenizer.pad_token_id
        if pad is None:
            raise ValueError(f"{type(self).__name__}: the tokenizer has no pad token; pass pad_token_id=... (e.g. "
                             "the model's: model.tokenizer.pad_token_id), use model.tokenizer, or let "
                             "RetrievalTrainer fill it from the model")
        return pad

    def encode_texts(self, texts: Sequence[str], is_query: bool) -> Dict[str, torch.Tensor]:
        instruction = (self.query_instruction if is_query else self.document_instruction) or ""
        tokenized = tokenize_texts(
            self.tokenizer, texts, max_length=self.query_max_length if is_query else self.document_max_length,
            instruction=instruction, append_eos=bool(self.append_eos),
        )
        if tokenized.num_truncated:
            logger.debug("%d %s texts reached max length", tokenized.num_truncated, "query" if is_query else "document")
        return pad_batch(tokenized.input_ids, self.padding_id(), self.padding_side or "right")

    def pair_batch(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        queries = [f["query"] for f in features]
        positives = [_first(f["positive"]) for f in features]
        batch = {"query": self.encode_texts(queries, True), "positive": self.encode_texts(positives, False),
                 "positive_ids": text_ids(positives)}
        if "label" in features[0]:
            batch["labels"] = torch.tensor([float(f["label"]) for f in features])
        return batch

    def triplet_batch(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = self.pair_batch(features)
        groups = [f["negative"] if isinstance(f["negative"], (list, tuple)) else [f["negative"]] for f in features]
        sizes = {len(g) for g in groups}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"every item needs the same, non-zero number of negatives; got sizes {sorted(sizes)}")
        negatives = [n for g in groups for n in g]
        batch["negative"] = self.encode_texts(negatives, False)
        batch["negative_ids"] = text_ids(negatives)
        return batch


@dataclass
class PairCollator(_BaseCollator):
    """Items ``{"query", "positive"}`` -> ``{"query": tokens, "positive": tokens, "positive_ids"}``.

    A ``positive`` given as a list uses its first element (``RetrievalDataset`` samples one).
    """

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        return self.pair_batch(features)


@dataclass
class TripletCollator(_BaseCollator):
    """Items ``{"query", "positive", "negative"}`` (``negative`` a string or a list of equal length
    per item) -> pair output plus ``"negative"`` tokens ``[B * n]`` and ``"negative_ids"``."""

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        return self.triplet_batch(features)


@dataclass
class RetrievalCollator(_BaseCollator):
    """For ``RetrievalDataset`` items: pairs when they carry no negatives, triplets otherwise.

    Items with ``"teacher_scores"`` (positive first, then one per negative) add a float
    ``"teacher_scores"`` tensor ``[B, 1 + n]`` for the distillation losses.
    """

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        if features and features[0].get("negative"):
            batch = self.triplet_batch(features)
        else:
            batch = self.pair_batch(features)
        if features and "teacher_scores" in features[0]:
            batch["teacher_scores"] = _teacher_scores(features)
        return batch


def _teacher_scores(features: List[Dict[str, Any]]) -> torch.Tensor:
    rows = []
    for i, f in enumerate(features):
        negatives = f.get("negative") or []
        size = 1 + (len(negatives) if isinstance(negatives, (list, tuple)) else 1)
        scores = f.get("teacher_scores")
        if scores is None or len(scores) != size:
            got = None if scores is None else len(scores)
            raise ValueError(f"item {i} of the batch needs {size} teacher_scores (positive + negatives), got {got}")
        rows.append([float(x) for x in scores])
    return torch.tensor(rows, dtype=torch.float)


@dataclass
class ScoredPairCollator(_BaseCollator):
    """Items ``{"query", "positive", "label"}`` -> pair output plus float ``"labels"`` ``[B]``.
    Both sides are treated as documents (symmetric STS) unless ``symmetric=False``."""

    symmetric: bool = True

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        queries = [f["query"] for f in features]
        positives = [_first(f["positive"]) for f in features]
        return {"query": self.encode_texts(queries, not self.symmetric), "positive": self.encode_texts(positives, False),
                "labels": torch.tensor([float(f["label"]) for f in features])}


@dataclass
class PointwiseCollator(_BaseCollator):
    """Items ``{"query", "label"}`` (integer class) -> ``{"query": tokens, "labels"}``."""

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"query": self.encode_texts([f["query"] for f in features], True),
                "labels": torch.tensor([int(f["label"]) for f in features])}


@dataclass
class ListwiseCollator(_BaseCollator):
    """Items ``{"query", "documents", "scores"}`` -> query tokens, ``"positive"`` (first document),
    ``"negative"`` (the rest, ``[B * (n-1)]``) and ``"teacher_scores"`` ``[B, n]``."""

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        sizes = {len(f["documents"]) for f in features}
        if len(sizes) != 1:
            raise ValueError(f"lists in a batch must have equal length, got {sorted(sizes)}")
        batch = {"query": self.encode_texts([f["query"] for f in features], True),
                 "positive": self.encode_texts([f["documents"][0] for f in features], False),
                 "teacher_scores": torch.tensor([f["scores"] for f in features], dtype=torch.float)}
        if sizes.pop() > 1:
            batch["negative"] = self.encode_texts([d for f in features for d in f["documents"][1:]], False)
        return batch


@dataclass
class CrossEncoderCollator:
    """Items ``{"query", "positive", "negative": [...]}`` -> the tokens of every ``(query, document)`` pair,
    positive first in each group: ``{"input_ids", "attention_mask", ..., "group_size"}``, tokenized as
    :meth:`CrossEncoder.predict <retrievals.models.cross_encoder.CrossEncoder.predict>` does."""

    tokenizer: Any
    max_length: int = 512

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        from ..models.cross_encoder import tokenize_pairs

        groups = [[_first(f["positive"])] + list(f.get("negative") or []) for f in features]
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"every item needs the same number of negatives; got group sizes {sorted(sizes)}")
        pairs = [(f["query"], doc) for f, group in zip(features, groups) for doc in group]
        batch = dict(self.tokenizer.pad(tokenize_pairs(self.tokenizer, pairs, self.max_length), return_tensors="pt"))
        batch["group_size"] = sizes.pop()
        return batch
