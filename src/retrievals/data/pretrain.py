"""Training pairs made from a document alone, for unsupervised contrastive pre-training.

Three strategies, chosen by name (:data:`PAIR_STRATEGIES`):

* ``crop``: two independent random spans of the document (Contriever's independent cropping); each
  span is a run of whole words, cut from the document text itself (so it is a substring of it), whose
  length is a ratio of the document's word count drawn uniformly from ``[min_ratio, max_ratio]``.
* ``title_body``: the title as the query, the body as the document; a document without a title or
  without a body falls back to ``crop``.
* ``dropout``: the same text twice (unsupervised SimCSE: the two dropout views of the model in train
  mode make the pair).

:func:`make_pair` draws everything from a generator seeded by ``(seed, index)``, so the pair of the
``index``-th example of a stream is the same in every run, whatever ran before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Document:
    title: str
    body: str

    @property
    def text(self) -> str:
        """Title and body joined as the encoder sees a document."""
        return f"{self.title} {self.body}".strip() if self.title else self.body


@dataclass(frozen=True)
class CropBounds:
    """A span's length as a fraction of the document's words, drawn from ``[min_ratio, max_ratio]``."""

    min_ratio: float = 0.1
    max_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.max_ratio <= 1:
            raise ValueError(f"crop ratios need 0 < min <= max <= 1, got min {self.min_ratio}, max {self.max_ratio}")


DEFAULT_BOUNDS = CropBounds()


def word_spans(text: str) -> List[Tuple[int, int]]:
    """``(start, end)`` character offsets of each whitespace-separated word of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def crop_length(num_words: int, ratio: float) -> int:
    """Words in a span of ``ratio`` of ``num_words`` words: rounded, at least 1, at most all."""
    return min(num_words, max(1, int(round(ratio * num_words))))


def random_crop(text: str, rng: np.random.Generator, bounds: CropBounds, spans: Optional[List[Tuple[int, int]]] = None) -> str:
    """A random run of whole words of ``text`` (a substring of it, original spacing kept); ``spans``:
    its :func:`word_spans`, when already known."""
    spans = word_spans(text) if spans is None else spans
    if not spans:
        return text
    length = crop_length(len(spans), rng.uniform(bounds.min_ratio, bounds.max_ratio))
    first = int(rng.integers(0, len(spans) - length + 1))
    return text[spans[first][0]:spans[first + length - 1][1]]


def crop_pair(doc: Document, rng: np.random.Generator, bounds: CropBounds) -> Tuple[str, str]:
    text = doc.text
    spans = word_spans(text)
    return random_crop(text, rng, bounds, spans), random_crop(text, rng, bounds, spans)


def title_body_pair(doc: Document, rng: np.random.Generator, bounds: CropBounds) -> Tuple[str, str]:
    if doc.title and doc.body:
        return doc.title, doc.body
    return crop_pair(doc, rng, bounds)


def dropout_pair(doc: Document, rng: np.random.Generator, bounds: CropBounds) -> Tuple[str, str]:
    return doc.text, doc.text


PAIR_STRATEGIES: Dict[str, Callable[[Document, np.random.Generator, CropBounds], Tuple[str, str]]] = {
    "crop": crop_pair,
    "title_body": title_body_pair,
    "dropout": dropout_pair,
}


def check_strategy(name: str) -> str:
    if name not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {name!r}; valid: {', '.join(PAIR_STRATEGIES)}")
    return name


def make_pair(doc: Document, strategy: str, seed: int, index: int, bounds: CropBounds = DEFAULT_BOUNDS) -> Dict[str, str]:
    """``{"query", "positive"}`` of the ``index``-th example, drawn from a generator seeded by ``(seed, index)``."""
    rng = np.random.default_rng((seed, index))
    query, positive = PAIR_STRATEGIES[check_strategy(strategy)](doc, rng, bounds)
    return {"query": query, "positive": positive}
