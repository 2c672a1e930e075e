"""Gradient cache (Gao et al., 2021): contrastive losses over big batches in small-batch memory.

The loss couples every query with every document of the batch, so it needs all embeddings at once,
but not all activations. ``CachedLoss`` (1) embeds the batch in chunks of ``mini_batch_size``
without a graph, (2) computes the wrapped loss on those embeddings and its gradient with respect
to them, and (3) when the trainer calls ``backward``, embeds each chunk again with a graph and
back-propagates its slice of the cached gradient. Peak activation memory is that of one chunk; the
gradients equal the full-batch loss's (dropout masks are replayed from the saved RNG state, and the
autocast setting of the first pass is restored for the second).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from .simcse import inputs_to_embed
from .utils import LOSS_EXTRAS

__all__ = ["CachedLoss"]


class CachedLoss(nn.Module):
    """``CachedLoss(InfoNCE(), mini_batch_size=32)``: any embedding loss, computed as a gradient cache.

    Called by :class:`RetrievalTrainer` as ``loss_fn(model, inputs)`` (``takes_model_inputs``) with
    the collator's batch (``query`` / ``positive`` / ``negative`` token dicts plus extras such as
    ``positive_ids``). Returns a scalar whose ``backward()`` fills the model's gradients. The wrapped
    loss may itself be a wrapper (``MatryoshkaLoss``, ``CrossBatchMemory``). With DDP, all chunks but
    the last run under ``no_sync`` so gradients are all-reduced once.
    """

    takes_model_inputs = True

    def __init__(self, loss: nn.Module, mini_batch_size: int = 32) -> None:
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.loss, self.mini_batch_size = loss, mini_batch_size

    def forward(self, model: nn.Module, inputs: Dict[str, Any]) -> torch.Tensor:
        side_inputs = inputs_to_embed(self.loss, inputs)
        extras = {k: inputs[k] for k in LOSS_EXTRAS if k in inputs}
        autocast = _AutocastState()
        rng_states: Dict[str, List[_RngState]] = {}
        leaves: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for side, batch in side_inputs.items():
                rng_states[side], chunks = [], []
                for piece in _chunks(batch, self.mini_batch_size):
                    rng_states[side].append(_RngState())
                    chunks.append(model(**piece))
                leaves[side] = torch.cat(chunks).detach().requires_grad_()
        if not torch.is_grad_enabled():  # evaluation: just the loss value
            with torch.no_grad():
                return self.loss(**leaves, **extras)
        loss = self.loss(**leaves, **extras)
        params = [p for p in self.loss.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [leaves[s] for s in side_inputs] + params, allow_unused=True)
        cache = dict(zip(side_inputs, grads[: len(side_inputs)]))
        result = loss.detach().requires_grad_()
        result.register_hook(partial(self._replay, model, side_inputs, rng_states, cache, autocast,
                                     list(zip(params, grads[len(side_inputs):]))))
        return result

    def _replay(self, model, side_inputs, rng_states, cache, autocast, param_grads, grad_output) -> None:
        """Backward hook: re-embed chunk by chunk with a graph and push the cached gradients through."""
        pieces = [(side, piece, state) for side, batch in side_inputs.items()
                  for piece, state in zip(_chunks(batch, self.mini_batch_size), rng_states[side])]
        offsets = dict.fromkeys(side_inputs, 0)
        no_sync = getattr(model, "no_sync", None)
        with torch.enable_grad(), autocast.restore():
            for i, (side, piece, state) in enumerate(pieces):
                last = i == len(pieces) - 1
                with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()), state.restore():
                    reps = model(**piece)
                    start = offsets[side]
                    offsets[side] = start + reps.shape[0]
                    grad = cache[side]
                    if grad is None:  # the loss did not use this side
                        continue
                    reps.backward(grad[start: start + reps.shape[0]] * grad_output)
        for param, grad in param_grads:
            if grad is not None:
                param.grad = grad * grad_output if param.grad is None else param.grad + grad * grad_output


def _chunks(batch: Dict[str, torch.Tensor], size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Row chunks of a tokenized batch, each cut to the columns its own texts use."""
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        piece = {k: v[start: start + size] if torch.is_tensor(v) else v for k, v in batch.items()}
        mask = piece.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            used = mask.bool().any(dim=0)
            if not bool(used.all()):
                width = mask.shape[1]
                piece = {k: v[:, used] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == width else v
                         for k, v in piece.items()}
        yield piece


class _RngState:
    """CPU (and CUDA) random state at capture, restorable in a forked RNG context."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda: Optional[list] = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restore(self):
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class _AutocastState:
    """The autocast setting of the first pass, re-entered for the replay (which runs in backward)."""

    def __init__(self) -> None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.states = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]

    @contextlib.contextmanager
    def restore(self):
        with contextlib.ExitStack() as stack:
            for device, enabled, dtype in self.states:
                stack.enter_context(torch.autocast(device_type=device, dtype=dtype, enabled=enabled))
            yield
