"""Filters for generated queries: cleaning, length, script (language), copies, references to "the passage",
and de-duplication (per document and over the whole corpus). The consistency filter (the source document in
the embedder's top-k for its query) needs the corpus vectors and runs in :mod:`.job` after generation.

Every rejection has a reason, counted: ``QueryFilter.counts`` is what ``synthesize`` reports.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

_LABEL = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*|(?:question|query|claim|search query|q)\s*[:：]\s*)+", re.I)
# a query that talks about its source ("the passage says", "Here is the claim:") or about itself ("What is the
# answer to this question?", SmolLM2-135M's favourite) is no search query
# small instruct models open with a sentence about the task ("What is the answer to this question? <the question>")
_META = re.compile(r"^(?:(?:what is |what's )?(?:the )?answer to (?:this|the) question(?: is)?|(?:the|my) question is)"
                   r"\s*[:?.]?\s*", re.I)
# larger instruct models wrap a claim in a sentence about it: "The abstract supports the claim that X", "The claim is
# that X"; X is the claim
_WRAPPED = re.compile(r"^(?:(?:the|this) (?:abstract|study|article|passage|paper|report|text) (?:supports|suggests|"
                      r"shows|finds|confirms|refutes|states) (?:the claim )?that|the claim (?:is|would be) that)\s+",
                      re.I)
# the end of a first sentence followed by another: a terminator, a space, then an upper-case letter or a digit
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z0-9])")
_CONTEXT = re.compile(r"\b(?:passage|abstract|excerpt|paragraph|the (?:text|article|document|study|claim|question)|"
                      r"here is|here's|the above|the following|this question|the answer)\b", re.I)
REASONS = ("empty", "unfinished", "too_short", "too_long", "script", "copy", "context", "duplicate", "inconsistent",
           "cross_encoder")


class Unfinished(str):
    """A generation cut by ``max_new_tokens`` before it ended: the generator marks it, the filter rejects it
    as ``unfinished``."""


def clean_query(generated: str, first_sentence: bool = False) -> str:
    """The first non-empty line of a generation (its first sentence only with ``first_sentence``: the filter
    asks for it when the token limit cut the generation), without a leading label ("Question:", "1.", "-"), an
    opening sentence about the task ("The answer to this question is:"), a wrapper around a claim ("The
    abstract supports the claim that ...") or surrounding quotes, whitespace collapsed."""
    for line in generated.splitlines():
        line = _LABEL.sub("", _META.sub("", _LABEL.sub("", line).strip())).strip().strip("\"'“”‘’`").strip()
        wrapped = _WRAPPED.match(line)
        if wrapped and len(line) > wrapped.end():
            line = line[wrapped.end()].upper() + line[wrapped.end() + 1:]
        if first_sentence:
            line = _SENTENCE_END.split(line, maxsplit=1)[0].strip().strip("\"'“”‘’`").strip()
        if line:
            return " ".join(line.split())
    return ""


def is_finished(query: str) -> bool:
    """Whether a cleaned query ends as a sentence does: a generation cut by the token limit still gives a
    query when its first sentence was complete."""
    return query.endswith((".", "?", "!"))


def normalize(text: str) -> str:
    """Lower case, letters and digits only: what "the same query" means for de-duplication and copies."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def script(text: str) -> Optional[str]:
    """The script most letters of ``text`` are written in (LATIN, CJK, CYRILLIC, ARABIC, ...); ``None``
    without letters."""
    counts: Counter = Counter()
    for c in text:
        if c.isalpha():
            name = unicodedata.name(c, "")
            word = name.split(" ")[0] if name else ""
            counts["CJK" if word in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else word] += 1
    return counts.most_common(1)[0][0] if counts else None


@dataclass
class FilterSettings:
    min_words: int = 3  # words, or characters / 2 for CJK text (no spaces)
    max_words: int = 40
    same_script: bool = True  # the query is written in the document's script
    reject_copies: bool = True  # a query of 6+ words copied verbatim from its document
    reject_context: bool = True  # "this passage", "the abstract": a query that only makes sense with its document
    deduplicate: bool = True  # a normalised query seen before (any document) is dropped

    def __post_init__(self) -> None:
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ValueError(f"min_words ({self.min_words}) must be >= 1 and <= max_words ({self.max_words})")


def _length(query: str) -> int:
    words = len(query.split())
    return max(words, len(query) // 2) if script(query) == "CJK" else words


class QueryFilter:
    """Keeps or rejects each generated query for its document. Thread-safe: the seen-set and the counts are
    updated under a lock. ``seen`` holds 8 bytes per kept query (a 64-bit hash), the filter's only state."""

    def __init__(self, settings: Optional[FilterSettings] = None, seen: Iterable[str] = ()) -> None:
        self.settings = settings or FilterSettings()
        self.counts: Counter = Counter()
        self._seen = {self._key(q) for q in seen}
        self._lock = threading.Lock()

    @staticmethod
    def _key(query: str) -> int:
        return int.from_bytes(hashlib.blake2b(normalize(query).encode(), digest_size=8).digest(), "little")

    def reason(self, query: str, document: str) -> Optional[str]:
        """Why ``query`` is rejected for ``document`` (one of :data:`REASONS`), or ``None`` to keep it;
        does not record it as seen (:meth:`check` does)."""
        s = self.settings
        if not query:
            return "empty"
        length = _length(query)
        if length < s.min_words:
            return "too_short"
        if length > s.max_words:
            return "too_long"
        if s.same_script and script(query) != script(document):
            return "script"
        if s.reject_copies and len(query.split()) >= 6 and normalize(query) in normalize(document):
            return "copy"
        if s.reject_context and _CONTEXT.search(query):
            return "context"
        return None

    def check(self, generations: List[str], document: str) -> List[Tuple[str, Optional[str]]]:
        """``(cleaned query, reason or None)`` for each generation of one document; counts every verdict."""
        out = []
        with self._lock:
            for generated in generations:
                cut = isinstance(generated, Unfinished)
                query = clean_query(generated, first_sentence=cut)
                why = "unfinished" if cut and not is_finished(query) else self.reason(query, document)
                if why is None and self.settings.deduplicate:
                    key = self._key(query)
                    why = "duplicate" if key in self._seen else None
                    self._seen.add(key)
                self.counts[why or "kept"] += 1
                out.append((query, why))
        return out
