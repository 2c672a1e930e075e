"""Online hard-negative refresh: every K optimizer steps, re-mine each training query's negatives with the
current weights (the rules of :func:`~.hard_negatives.mine_hard_negatives`, as ``build_hn``) and hand them
to the training dataset for the following steps.

- Distributed (torchrun): rank 0 mines and broadcasts the negatives, so every rank trains on the same ones.
  Under ``--fsdp`` no rank holds the whole model: every rank takes part in the encode
  (:class:`~retrievals.trainer.fsdp.ShardedEncoder`), and rank 0's negatives are broadcast as before.
- Resume: each refresh's negatives are written to ``OUTPUT/hn_refresh/step-<S>.jsonl``; a run resumed at step
  G reloads those of the last refresh at or before G, and keeps the previous ones for the one micro-batch
  the data loader had already fetched when that refresh ran (accelerate prefetches one batch), so the
  resumed run trains on exactly the batches of the uninterrupted run.
- Cost and staleness: each refresh logs its seconds and how far the previous negatives' ranks moved
  (mean absolute rank change, ranks beyond the search depth counted at the depth; the share that left
  the sampling range), also in ``hn_refresh/log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from transformers import TrainerCallback

from ..data.jsonl import write_jsonl
from .false_negatives import FalseNegativeFilter
from .hard_negatives import PoolEntry, mine_hard_negatives

logger = logging.getLogger(__name__)

REFRESH_DIR = "hn_refresh"


class NegativeRefreshCallback(TrainerCallback):
    """Give it to ``RetrievalTrainer(callbacks=[...])`` (``embed --hn_refresh_steps K`` does) with the
    model being trained and its :class:`~retrievals.data.datasets.RetrievalDataset`."""

    def __init__(self, model, dataset, candidate_pool: Sequence[PoolEntry], every_steps: int,
                 range_for_sampling: Tuple[int, int] = (2, 200), negative_number: int = 15, seed: int = 42,
                 false_negatives: Optional[FalseNegativeFilter] = None, batch_size: int = 64) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps (--hn_refresh_steps) must be >= 1, got {every_steps}")
        if not hasattr(dataset, "set_negatives"):
            raise TypeError(f"{type(dataset).__name__} cannot take refreshed negatives (use a RetrievalDataset)")
        self.model, self.dataset, self.pool = model, dataset, list(candidate_pool)
        self.every_steps, self.range, self.negative_number = every_steps, range_for_sampling, negative_number
        self.seed, self.rules, self.batch_size = seed, false_negatives, batch_size
        self.ranks: Optional[List[Dict[str, int]]] = None
        self.history: List[Dict[str, Any]] = []

    def mine(self, sharded: bool = False) -> Tuple[List[List[str]], List[Dict[str, int]]]:
        """``(negatives per dataset row, ranks per row)`` with the model's current weights; ``sharded``
        (FSDP): every rank calls this and takes part in the encode."""
        from ..trainer.fsdp import ShardedEncoder

        records = [{"query": r["query"], "positive": r["positive"]} for r in self.dataset.rows]
        report: Dict[str, Any] = {"ranks": []}
        encoder = ShardedEncoder(self.model) if sharded else self.model
        was_training = self.model.training
        self.model.eval()
        try:
            out = mine_hard_negatives(encoder, records, self.pool, range_for_sampling=self.range,
                                      negative_number=self.negative_number, seed=self.seed,
                                      batch_size=self.batch_size, false_negatives=self.rules, report=report)
        finally:
            self.model.train(was_training)
        return [r["negative"] for r in out], report["ranks"]

    def refresh(self, args, step: int) -> List[List[str]]:
        started = time.perf_counter()
        from ..trainer.fsdp import is_sharded

        rank, world = _rank_and_world()
        sharded = world > 1 and is_sharded(self.model)  # FSDP: no rank holds the whole model, all encode
        negatives, ranks = self.mine(sharded) if rank == 0 or sharded else (None, None)
        if world > 1:
            import torch.distributed as dist

            box = [negatives]
            dist.broadcast_object_list(box, src=0)
            negatives = box[0]
        previous = self.dataset.negatives()
        self.dataset.set_negatives(negatives)
        entry = {"step": step, "seconds": round(time.perf_counter() - started, 3)}
        if rank == 0:
            entry.update(self._staleness(previous, ranks))
            self.ranks = ranks
            folder = os.path.join(args.output_dir, REFRESH_DIR)
            os.makedirs(folder, exist_ok=True)
            write_jsonl(os.path.join(folder, f"step-{step}.jsonl"), negatives)
            with open(os.path.join(folder, "log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            logger.info("hard negatives refreshed at step %d: %s", step, entry)
        self.history.append(entry)
        return negatives

    def _staleness(self, previous: List[List[str]], ranks: List[Dict[str, int]]) -> Dict[str, float]:
        """How the negatives in use (mined at the last refresh) rank now."""
        if self.ranks is None:
            return {}
        start, end = self.range
        moved, left, count = 0.0, 0, 0
        for row, now, before in zip(previous, ranks, self.ranks):
            for text in row:
                if text not in before:
                    continue  # back-filled at random: it had no rank
                new = now.get(text, end)
                moved += abs(new - before[text])
                left += not start <= new < end
                count += 1
        return {"mean_rank_change": round(moved / max(count, 1), 2), "left_range": round(left / max(count, 1), 4)}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if args.dataloader_num_workers > 0:
            raise ValueError("online hard-negative refresh needs --dataloader_num_workers 0: data-loader workers "
                             "hold their own copy of the dataset and would not see the refreshed negatives")
        if state.global_step == 0:
            return control
        step = state.global_step
        last = (step // self.every_steps) * self.every_steps
        if last == 0:
            return control
        folder = os.path.join(args.output_dir, REFRESH_DIR)
        current = _read_lines(os.path.join(folder, f"step-{last}.jsonl"), step)
        per_epoch = max(len(train_dataloader) // max(args.gradient_accumulation_steps, 1), 1) \
            if train_dataloader is not None else 0
        if last == step and per_epoch and step % per_epoch:
            # the uninterrupted run had fetched one micro-batch with the negatives before this refresh
            previous = last - self.every_steps
            older = _read_lines(os.path.join(folder, f"step-{previous}.jsonl"), step) if previous > 0 \
                else self.dataset.initial_negatives()
            self.dataset.set_negatives(older)
            self.dataset.set_negatives(current, after_items=args.per_device_train_batch_size)
        else:
            self.dataset.set_negatives(current)
        logger.info("resumed at step %d with the hard negatives of the refresh at step %d", step, last)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every_steps == 0 and step < state.max_steps:
            self.refresh(args, step)
        return control


def _rank_and_world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _read_lines(path: str, step: int) -> List[List[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resuming at step {step} with --hn_refresh_steps needs {path} (the negatives of "
                                "that refresh, written under the run's --output_dir)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
