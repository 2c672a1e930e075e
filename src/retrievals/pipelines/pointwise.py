"""Point-wise training from the command line: ``embed --loss_fn arcface`` on ``(text, label)`` records.

The class count, the per-class margins and (optionally) the starting class centres come from the data
and the starting model; the label map and the trained centres are saved beside the model.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..data.datasets import PointwiseDataset
from ..losses.arcface import ArcFaceAdaptiveMarginLoss

logger = logging.getLogger(__name__)

HEAD_NAME = "arcface_head.safetensors"  # {"weight": [classes, dim], "margins": [classes]}
LABELS_NAME = "labels.json"  # {"labels": [label of class 0, label of class 1, ...]}


def class_counts(dataset: PointwiseDataset) -> List[int]:
    counts = Counter(row["label"] for row in dataset.rows)
    return [counts.get(i, 0) for i in range(len(dataset.label_to_id))]


@torch.no_grad()
def class_mean_centres(model, dataset: PointwiseDataset, batch_size: int = 32) -> torch.Tensor:
    """Each class's normalised mean embedding of its training texts under ``model`` (the query side, as the
    point-wise collator embeds them), ``[classes, dim]``."""
    embeddings = model.encode_queries([row["query"] for row in dataset.rows], batch_size=batch_size,
                                      convert_to_tensor=True, normalize_embeddings=True).float()
    labels = torch.tensor([row["label"] for row in dataset.rows])
    centres = torch.zeros(len(dataset.label_to_id), embeddings.shape[1]).index_add_(0, labels, embeddings)
    return torch.nn.functional.normalize(centres, dim=-1)


def load_centres(path: str) -> torch.Tensor:
    """Class centres from a ``.npy`` array or a ``.safetensors`` file (its ``weight`` tensor, as in a saved
    ``arcface_head.safetensors``); a folder means its ``arcface_head.safetensors``."""
    if os.path.isdir(path):
        path = os.path.join(path, HEAD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--arcface_init: no centres file at {path!r} (expected .npy or .safetensors)")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path)).float()
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "weight" not in tensors:
            raise ValueError(f"{path}: no 'weight' tensor (found {sorted(tensors)})")
        return tensors["weight"].float()
    raise ValueError(f"--arcface_init {path!r}: use xavier, class_mean, or a .npy / .safetensors file")


def build_arcface(model, dataset: PointwiseDataset, args) -> ArcFaceAdaptiveMarginLoss:
    """The ArcFace loss of ``embed --loss_fn arcface``: classes from the data, fixed (``--arcface_margin``) or
    dynamic margins from the class counts, centres from ``--arcface_init``."""
    counts = class_counts(dataset)
    if len(counts) < 2:
        raise ValueError(f"--loss_fn arcface needs at least 2 classes; the data have {len(counts)}")
    dim = model.config.hidden_size
    fixed = args.arcface_margin is not None
    loss = ArcFaceAdaptiveMarginLoss(
        dim, len(counts), scale=args.arcface_scale, margin=args.arcface_margin if fixed else 0.3,
        class_counts=None if fixed else torch.tensor(counts),
        margin_bounds=None if fixed else (args.arcface_margin_min, args.arcface_margin_max))
    init = args.arcface_init
    if init == "class_mean":
        loss.init_centres(class_mean_centres(model, dataset, batch_size=args.per_device_train_batch_size))
    elif init != "xavier":
        loss.init_centres(load_centres(init))
        saved = load_labels(init if os.path.isdir(init) else os.path.dirname(os.path.abspath(init)))
        if saved is not None and saved != dataset.label_to_id:
            raise ValueError(f"--arcface_init {init!r}: its {LABELS_NAME} lists other classes than the training data")
    margins = loss.margins
    logger.info("arcface: %d classes (%d-%d texts each), margins %.3f-%.3f (%s), scale %g, centres %s", len(counts),
                min(counts), max(counts), margins.min().item(), margins.max().item(), "fixed" if fixed else "dynamic",
                args.arcface_scale, init)
    return loss


def save_head(output_dir: str, loss: ArcFaceAdaptiveMarginLoss, dataset: PointwiseDataset) -> None:
    """Write the trained centres and margins, and the label of each class id, beside the model."""
    from safetensors.torch import save_file

    save_file({"weight": loss.weight.detach().cpu().contiguous(), "margins": loss.margins.detach().cpu().contiguous()},
              os.path.join(output_dir, HEAD_NAME))
    id_to_label = sorted(dataset.label_to_id, key=dataset.label_to_id.get)
    with open(os.path.join(output_dir, LABELS_NAME), "w", encoding="utf-8") as f:
        json.dump({"labels": id_to_label}, f, ensure_ascii=False, indent=1)


def load_labels(model_dir: str) -> Optional[Dict[Any, int]]:
    """The label -> class id map saved by :func:`save_head` (None when the folder has none)."""
    path = os.path.join(model_dir, LABELS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    return {label: i for i, label in enumerate(labels)}
