"""False-negative control for mined negatives: drop candidates that are probably unlabelled positives.

Three rules, each optional, applied after the positive rule of :class:`~.hard_negatives.PositiveRule`:

- ``max_positive_ratio`` (NV-Retriever's TopK-PercPos, e.g. 0.95): drop a candidate whose score is above
  ``ratio * positive score``;
- ``positive_margin`` (TopK-MarginPos, e.g. 0.05): drop a candidate whose score is above
  ``positive score - margin``;
- ``teacher_threshold``: drop a candidate the teacher scores as relevant: a cross-encoder's probability
  ``sigmoid(score)`` (or a bi-encoder teacher's cosine) at or above the threshold.

Scores are the mining model's (the same similarity as the search). A record with several positives is
compared with its *lowest* positive score, which drops the most candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class FalseNegativeFilter:
    """The rules (``None`` = off). :meth:`split_by_score` applies the score rules to one query's candidates;
    :meth:`teacher_relevant` the teacher rule to one teacher score."""

    max_positive_ratio: Optional[float] = None
    positive_margin: Optional[float] = None
    teacher_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if self.max_positive_ratio is not None and not 0 < self.max_positive_ratio <= 2:
            raise ValueError(f"max_positive_ratio must be in (0, 2], e.g. 0.95; got {self.max_positive_ratio}")
        if self.positive_margin is not None and not -1 <= self.positive_margin <= 2:
            raise ValueError(f"positive_margin must be in [-1, 2], e.g. 0.05; got {self.positive_margin}")
        if self.teacher_threshold is not None and not math.isfinite(self.teacher_threshold):
            raise ValueError(f"teacher_threshold must be a finite number, got {self.teacher_threshold}")

    @property
    def uses_positive_scores(self) -> bool:
        return self.max_positive_ratio is not None or self.positive_margin is not None

    @property
    def uses_teacher(self) -> bool:
        return self.teacher_threshold is not None

    def split_by_score(self, candidates: Sequence, scores: Sequence[float], positive_score: float,
                       counts: Dict[str, int]) -> List:
        """The candidates whose score is within the limit; ``counts[rule]`` grows by those dropped."""
        if not self.uses_positive_scores:
            return list(candidates)
        kept, limits = [], self.limits(positive_score)
        for candidate, score in zip(candidates, scores):
            over = [rule for rule, limit in limits if score > limit]
            if over:
                for rule in over:
                    counts[rule] = counts.get(rule, 0) + 1
                counts["dropped_by_score"] = counts.get("dropped_by_score", 0) + 1
            else:
                kept.append(candidate)
        return kept

    def limits(self, positive_score: float) -> List[Tuple[str, float]]:
        """``[(rule, limit)]``: a candidate scoring above a limit is dropped by that rule."""
        out = []
        if self.max_positive_ratio is not None:
            out.append(("max_positive_ratio", self.max_positive_ratio * positive_score))
        if self.positive_margin is not None:
            out.append(("positive_margin", positive_score - self.positive_margin))
        return out

    def teacher_relevant(self, score: float, cross_encoder: bool) -> bool:
        """Whether a teacher score marks the candidate as relevant (cross-encoder: ``sigmoid(score)``)."""
        value = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, score)))) if cross_encoder else score
        return value >= float(self.teacher_threshold)
