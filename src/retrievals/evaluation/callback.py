"""Evaluate retrieval on a dev set during training, as a ``transformers`` callback."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from transformers import TrainerCallback

from ..data.beir import BeirDataset
from .retrieval import RetrievalEvaluator

logger = logging.getLogger(__name__)


class RetrievalEvaluatorCallback(TrainerCallback):
    """Every ``eval_steps`` optimizer steps (and at the end), evaluate ``model`` on ``data`` and log
    ``dev_ndcg@10`` etc. into the trainer's log history; ``history`` keeps ``(step, metrics)``."""

    def __init__(self, model, data: BeirDataset, eval_steps: int = 100, prefix: str = "dev_", **eval_kwargs: Any):
        self.model, self.data, self.eval_steps, self.prefix = model, data, eval_steps, prefix
        self.evaluator = RetrievalEvaluator(data, **eval_kwargs)
        self.history: List[tuple] = []

    def _evaluate(self, state) -> Dict[str, float]:
        metrics = {self.prefix + k: v for k, v in self.evaluator(self.model).items()}
        self.history.append((state.global_step, metrics))
        state.log_history.append({**metrics, "step": state.global_step})
        logger.info("step %d: %s", state.global_step, metrics)
        return metrics

    def on_step_end(self, args, state, control, **kwargs) -> Optional[Any]:
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self._evaluate(state)
        return control

    def on_train_end(self, args, state, control, **kwargs) -> Optional[Any]:
        if not self.history or self.history[-1][0] != state.global_step:
            self._evaluate(state)
        return control
