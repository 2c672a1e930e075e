"""Which checkpoint to resume from: the newest *complete* one.

The Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, each rank's RNG state, then
``trainer_state.json`` from rank 0), with no rename at the end. A job killed while saving (a lost node, a
pre-empted pod) leaves a partial ``checkpoint-N``, and ``get_last_checkpoint`` would resume from it and
fail, or resume without the other ranks' RNG state. We take the newest folder holding the trainer state and
the RNG state of every rank *of the run that saved it* (:class:`CheckpointRanks` records that number in
``trainer_state.json``), and say which newer ones were passed over. Completeness does not depend on the
resuming run: a job resumed on another number of processes resumes, with a warning about the RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import List, Optional, Set

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_RANK_RNG = re.compile(r"^rng_state_(\d+)\.pth$")
TRAINER_STATE = "trainer_state.json"


class CheckpointRanks(TrainerCallback, ExportableState):
    """Records in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``) how many processes saved
    it, so completeness is judged against the run that wrote it (:class:`RetrievalTrainer` adds it)."""

    def state(self) -> dict:
        return {"args": {}, "attributes": {"world_size": _current_world_size()}}


def _current_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def saved_world_size(folder: str, names: Optional[Set[str]] = None) -> Optional[int]:
    """How many processes saved ``folder``: as recorded in its trainer state; for an older version's checkpoint,
    guessed from the RNG files (``rng_state.pth``: 1; ``rng_state_R.pth``: at least the highest R + 1, and 2);
    None when the folder tells neither. Raises ``ValueError`` for an unreadable trainer state."""
    names = set(os.listdir(folder)) if names is None else names
    if TRAINER_STATE in names:
        try:
            with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{os.path.join(folder, TRAINER_STATE)} is unreadable: {err}") from None
        recorded = (state.get("stateful_callbacks") or {}).get(CheckpointRanks.__name__)
        if isinstance(recorded, dict) and isinstance(recorded.get("attributes", {}).get("world_size"), int):
            return recorded["attributes"]["world_size"]
    ranks = [int(m.group(1)) for name in names if (m := _RANK_RNG.match(name))]
    if ranks:
        return max(max(ranks) + 1, 2)  # one process writes rng_state.pth; several, rng_state_<rank>.pth each
    return 1 if "rng_state.pth" in names else None


def missing_files(folder: str) -> List[str]:
    """Files a complete checkpoint has and ``folder`` lacks: ``trainer_state.json`` and, when the saving run
    wrote RNG states (not with ``--save_only_model``), those of all its ranks (not the resuming run's)."""
    names = set(os.listdir(folder))
    if TRAINER_STATE not in names:
        return [TRAINER_STATE]
    try:
        saved = saved_world_size(folder, names)
    except ValueError:
        return [f"{TRAINER_STATE} (unreadable)"]
    if saved is None or saved < 2 or "rng_state_0.pth" not in names:  # rank 0 writes its RNG before the trainer state
        return []
    return [f"rng_state_{rank}.pth" for rank in range(saved) if f"rng_state_{rank}.pth" not in names]


def warn_if_world_size_changed(checkpoint: str, world_size: int) -> None:
    """Resuming on another number of processes works, but only ranks with a saved RNG state restore it: say so."""
    if not os.path.isdir(checkpoint):
        return
    names = set(os.listdir(checkpoint))
    try:
        saved = saved_world_size(checkpoint, names)
    except ValueError:
        return
    has_rng = "rng_state.pth" in names or "rng_state_0.pth" in names
    if saved is None or saved == world_size or not has_rng:
        return
    if saved == 1 or world_size == 1:
        restored = "no rank restores an RNG state (the file layout of one process and of several differ)"
    elif world_size > saved:
        restored = (f"the RNG states of ranks 0-{saved - 1} are restored, ranks {_span(saved, world_size)} have none "
                    "and start from the seed's")
    else:
        restored = f"ranks 0-{world_size - 1} restore theirs, those of ranks {_span(world_size, saved)} are not used"
    logger.warning("%s was saved by %d process%s and this run has %d: %s; random streams (dropout, sampling) and "
                   "the batches after the resume differ from an uninterrupted run", checkpoint, saved,
                   "" if saved == 1 else "es", world_size, restored)


def _span(start: int, stop: int) -> str:
    return str(start) if stop - start == 1 else f"{start}-{stop - 1}"


def last_complete_checkpoint(output_dir: str, world_size: Optional[int] = None) -> Optional[str]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None if there is none). ``world_size``: the
    resuming run's, only to warn when it differs from the saving run's."""
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    for _, name in found:
        path = os.path.join(output_dir, name)
        missing = missing_files(path)
        if not missing:
            if world_size is not None:
                warn_if_world_size_changed(path, world_size)
            return path
        logger.warning("skipping %s: incomplete (no %s), probably cut off while saving", path, ", ".join(missing))
    return None
