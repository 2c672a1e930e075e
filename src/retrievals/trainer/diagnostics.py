"""Training diagnostics logged with the loss: is the model learning to rank, or failing quietly?

From one batch's embeddings (queries, positives, optional hard negatives; cosine scores, every document
of the batch a candidate for every query, as InfoNCE sees them):

- ``diag_accuracy``: share of queries whose positive ranks first among the batch's documents;
- ``diag_margin``: mean of positive score minus the hardest other document's score;
- ``diag_positive_rank``: mean rank of the positive (1 = first);
- ``diag_doc_cosine``: mean pairwise cosine of the batch's document vectors (near 1: collapse);
- ``diag_effective_rank``: exp(entropy) of the document vectors' normalised singular values (Roy and
  Vetterli); a collapsed space has an effective rank near 1;
- ``diag_logit_range``: mean per query of (highest - lowest score) / temperature (the softmax's spread);
- ``diag_negatives_above``: share of queries with a hard negative scoring above their positive.

Rules name a likely cause when they fire (:data:`RULES`); each warns the first time it fires and every
``repeat`` firings after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["RULES", "DiagnosticsMonitor", "batch_diagnostics"]


@torch.no_grad()
def batch_diagnostics(query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
                      temperature: float = 0.05) -> Dict[str, float]:
    """The figures above for one batch: ``query`` and ``positive`` ``[B, d]``, ``negative`` ``[B * n, d]``
    (query i's hard negatives at rows ``i * n ... i * n + n - 1``) or None."""
    q = F.normalize(query.detach().float(), dim=-1)
    docs = positive.detach().float()
    n_neg = 0
    if negative is not None and negative.numel():
        n_neg = negative.shape[0] // q.shape[0]
        docs = torch.cat([docs, negative.detach().float()])
    d = F.normalize(docs, dim=-1)
    scores = q @ d.T  # [B, B (1 + n)]
    batch = q.shape[0]
    rows = torch.arange(batch)
    pos = scores[rows, rows]
    others = scores.clone()
    others[rows, rows] = float("-inf")
    hardest = others.max(dim=1).values
    rank = 1 + (others > pos[:, None]).sum(dim=1).float()
    pairwise = d @ d.T
    m = d.shape[0]
    off = pairwise[~torch.eye(m, dtype=torch.bool)]
    singular = torch.linalg.svdvals(d)
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    out = {
        "diag_accuracy": float((rank == 1).float().mean()),
        "diag_margin": float((pos - hardest).mean()),
        "diag_positive_rank": float(rank.mean()),
        "diag_doc_cosine": float(off.mean()) if off.numel() else 1.0,
        "diag_effective_rank": float(torch.exp(entropy)),
        "diag_logit_range": float(((scores.max(dim=1).values - scores.min(dim=1).values) / temperature).mean()),
    }
    if n_neg:
        own = scores[:, batch:].reshape(batch, batch, n_neg)[rows, rows]  # each query's own hard negatives
        out["diag_negatives_above"] = float((own.max(dim=1).values > pos).float().mean())
    return out


@dataclass(frozen=True)
class Rule:
    name: str
    fires: Callable[[Dict[str, float]], bool]
    message: Callable[[Dict[str, float]], str]


RULES: Tuple[Rule, ...] = (
    Rule("collapse",
         lambda s: s["diag_doc_cosine"] > 0.9,
         lambda s: (f"embedding collapse: the batch's documents have mean pairwise cosine {s['diag_doc_cosine']:.3f} "
                    f"(effective rank {s['diag_effective_rank']:.1f}); the loss can fall without separating documents "
                    "(a distillation loss with no in-batch negatives, or a too-high learning rate)")),
    Rule("temperature",
         lambda s: s["diag_logit_range"] > 60,
         lambda s: (f"temperature too low: scores / temperature span {s['diag_logit_range']:.0f} logits per query, the "
                    "softmax is saturated and only the top candidate gets a gradient; try 0.02-0.05")),
    Rule("false_negatives",
         lambda s: s.get("diag_negatives_above", 0.0) > 0.3,
         lambda s: (f"hard negatives score above the positive for {100 * s['diag_negatives_above']:.0f}% of queries: "
                    "likely false negatives (relevant documents mined as negatives); try --max_positive_ratio 0.95, "
                    "a --range_for_sampling that skips the top, or a teacher threshold")),
)


class DiagnosticsMonitor:
    """Applies :data:`RULES` to each logged set of diagnostics; warns on the first firing of a rule and
    every ``repeat``-th after; keeps the counts."""

    def __init__(self, repeat: int = 20, rules: Tuple[Rule, ...] = RULES) -> None:
        self.repeat, self.rules = repeat, rules
        self.fired: Dict[str, int] = {}
        self.messages: List[str] = []

    def check(self, stats: Dict[str, float], step: int) -> List[str]:
        fired = []
        for rule in self.rules:
            if rule.fires(stats):
                count = self.fired.get(rule.name, 0) + 1
                self.fired[rule.name] = count
                fired.append(rule.name)
                if count == 1 or count % self.repeat == 0:
                    message = f"step {step}: {rule.message(stats)}"
                    self.messages.append(message)
                    logger.warning("%s", message)
        return fired
