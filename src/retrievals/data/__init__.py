from .beir import BeirDataset, load_beir
from .sts import StsPairs, load_sts

__all__ = ["BeirDataset", "load_beir", "StsPairs", "load_sts"]
