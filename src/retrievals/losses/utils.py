"""Shared pieces of the losses: cross-device gathering, score matrices, duplicate masks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

SIDES = ("query", "positive", "negative")  # the embedding arguments of every loss
LOSS_EXTRAS = ("labels", "teacher_scores", "positive_ids", "negative_ids")  # batch fields passed through


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_sizes(n: int, device: torch.device) -> list:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s.item()) for s in sizes]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))], dim=0)


def gather_with_grad(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` from every rank along dim 0, keeping gradients.

    Ranks may hold different batch sizes. Returns ``(gathered, offset)`` where ``offset`` is the
    index of this rank's first row in ``gathered``. Without an initialised process group this
    returns ``(tensor, 0)``.

    Scaling convention: each rank computes the mean loss over its own queries against all gathered
    candidates. ``torch.distributed.nn.all_gather`` sums the gradients flowing back to each rank's
    rows, and DDP then averages gradients over ranks, so the update equals the gradient of the mean
    loss over the whole global batch computed in one process (per rank, gradients are ``world_size``
    times those of the global mean before DDP's averaging).
    """
    if not is_distributed():
        return tensor, 0
    import torch.distributed.nn.functional as dist_fn

    sizes = _rank_sizes(tensor.shape[0], tensor.device)
    parts = dist_fn.all_gather(_pad_rows(tensor, max(sizes)))
    gathered = torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
    return gathered, sum(sizes[: dist.get_rank()])


def gather_ids(ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Gather integer ids (no gradients) the same way as :func:`gather_with_grad`."""
    if ids is None or not is_distributed():
        return ids
    sizes = _rank_sizes(ids.shape[0], ids.device)
    parts = [torch.zeros(max(sizes), dtype=ids.dtype, device=ids.device) for _ in sizes]
    dist.all_gather(parts, _pad_rows(ids, max(sizes)))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def flatten_negatives(negative: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """Accept ``[B, n, D]`` or ``[B * n, D]`` negatives; return ``[B * n, D]`` (or None)."""
    if negative is None:
        return None
    if negative.dim() == 3:
        return negative.reshape(-1, negative.shape[-1])
    if negative.dim() != 2 or negative.shape[0] % batch != 0:
        raise ValueError(f"negative must be [B, n, D] or [B*n, D] with B={batch}, got {tuple(negative.shape)}")
    return negative


SIMILARITIES = ("cosine", "dot")


def check_similarity(name: str) -> str:
    """``cosine`` or ``dot``; an unknown name raises an error listing the valid ones."""
    key = str(name).lower()
    if key not in SIMILARITIES:
        raise ValueError(f"Unknown similarity {name!r}; valid names are: {', '.join(SIMILARITIES)}")
    return key


def for_similarity(tensor: Optional[torch.Tensor], similarity: str) -> Optional[torch.Tensor]:
    """L2-normalise ``tensor`` along its last dimension for ``cosine`` (so a temperature means the
    same for every model, normalised or not); unchanged for ``dot`` or ``None``."""
    if tensor is None or similarity == "dot":
        return tensor
    return torch.nn.functional.normalize(tensor, p=2, dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return a @ b.T


def check_pair(query: torch.Tensor, positive: torch.Tensor) -> None:
    if query.dim() != 2 or positive.shape != query.shape:
        raise ValueError(f"query and positive must both be [B, D], got {tuple(query.shape)} and {tuple(positive.shape)}")


def masked_cross_entropy(scores: torch.Tensor, labels: torch.Tensor, criterion: torch.nn.Module) -> torch.Tensor:
    """Cross-entropy where ``-inf`` scores are masked candidates.

    For ``nn.CrossEntropyLoss`` the label smoothing mass is spread over the unmasked candidates
    only (PyTorch would put it on the ``-inf`` columns too and return inf); any other criterion
    is called as is.
    """
    if not isinstance(criterion, torch.nn.CrossEntropyLoss) or criterion.weight is not None:
        return criterion(scores, labels)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    log_probs = torch.log_softmax(scores, dim=-1)
    nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    smoothing = criterion.label_smoothing
    if smoothing > 0:
        valid = torch.isfinite(scores)
        uniform = -log_probs.masked_fill(~valid, 0.0).sum(1) / valid.sum(1)
        nll = (1 - smoothing) * nll + smoothing * uniform
    if criterion.reduction == "sum":
        return nll.sum()
    if criterion.reduction == "none":
        return nll
    return nll.mean()


def pos_neg_cosines(query: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor]):
    """Cosine ``s(q, p)`` ``[B, 1]`` and ``s(q, n)`` ``[B, n]`` against each query's own negatives."""
    check_pair(query, positive)
    if negative is None:
        raise ValueError("this loss needs negatives (query, positive, negative)")
    batch = query.shape[0]
    negative = flatten_negatives(negative, batch).reshape(batch, -1, query.shape[-1])
    q = torch.nn.functional.normalize(query, dim=-1)
    pos = (q * torch.nn.functional.normalize(positive, dim=-1)).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bnd->bn", q, torch.nn.functional.normalize(negative, dim=-1))
    return pos, neg
