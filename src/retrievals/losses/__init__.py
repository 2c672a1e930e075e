"""Losses over embeddings; each is an ``nn.Module`` returning a scalar. ``get_loss(name)`` by name."""

from typing import Any, Dict, Type

from torch import nn

from .arcface import ArcFaceAdaptiveMarginLoss
from .cached import CachedLoss
from .cosent import CircleLoss, CoSENT
from .distillation import ListwiseKLLoss, MarginMSELoss
from .infonce import InfoNCE
from .matryoshka import MatryoshkaLoss
from .maxsim import MaxSimLoss
from .memory_bank import CrossBatchMemory
from .simcse import SimCSE
from .triplet import PairwiseHingeLoss, PairwiseLogisticLoss, TripletLoss
from .utils import gather_with_grad

LOSSES: Dict[str, Type[nn.Module]] = {
    "infonce": InfoNCE,
    "simcse": SimCSE,
    "triplet": TripletLoss,
    "hinge": PairwiseHingeLoss,
    "logistic": PairwiseLogisticLoss,
    "cosent": CoSENT,
    "circle": CircleLoss,
    "arcface": ArcFaceAdaptiveMarginLoss,
    "listwise_kl": ListwiseKLLoss,
    "margin_mse": MarginMSELoss,
    "maxsim": MaxSimLoss,
}


def get_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss called ``name`` (case-insensitive) with ``kwargs``."""
    key = str(name).lower()
    if key not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid names are: {', '.join(sorted(LOSSES))}")
    return LOSSES[key](**kwargs)


__all__ = [
    "LOSSES", "get_loss", "gather_with_grad", "InfoNCE", "SimCSE", "TripletLoss", "PairwiseHingeLoss",
    "PairwiseLogisticLoss", "CoSENT", "CircleLoss", "ArcFaceAdaptiveMarginLoss", "ListwiseKLLoss", "MarginMSELoss",
    "MatryoshkaLoss", "CachedLoss", "CrossBatchMemory", "MaxSimLoss",
]
