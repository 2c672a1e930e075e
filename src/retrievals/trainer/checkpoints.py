"""Which checkpoint to resume from: the newest *complete* one.

The Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, each rank's RNG state, then
``trainer_state.json`` from rank 0), with no rename at the end. A job killed while saving (a lost node, a
pre-empted pod) leaves a partial ``checkpoint-N``, and ``get_last_checkpoint`` would resume from it and
fail, or resume without the other ranks' RNG state. We take the newest folder holding the trainer state and,
under several processes, every rank's RNG state, and say which newer ones were passed over.
"""

from __future__ import annotations

import logging
import os
import re
from typing import List, Optional

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def missing_files(folder: str, world_size: int = 1) -> List[str]:
    """Files a complete checkpoint has and ``folder`` lacks (``trainer_state.json``, ``rng_state_R.pth``)."""
    names = set(os.listdir(folder))
    needed = ["trainer_state.json"]
    if world_size > 1 and "rng_state_0.pth" in names:  # rank 0 writes its own before the trainer state
        needed += [f"rng_state_{rank}.pth" for rank in range(world_size)]
    return [n for n in needed if n not in names]


def last_complete_checkpoint(output_dir: str, world_size: int = 1) -> Optional[str]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None if there is none)."""
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    for _, name in found:
        path = os.path.join(output_dir, name)
        missing = missing_files(path, world_size)
        if not missing:
            return path
        logger.warning("skipping %s: incomplete (no %s), probably cut off while saving", path, ", ".join(missing))
    return None
