"""``MultiVectorModel``: token-level (ColBERT-style) embeddings for late-interaction (maxsim) scoring.

An :class:`AutoModelForEmbedding` supplies the backbone, tokenizer, instructions and max lengths;
a linear projection ``hidden -> dim`` (no bias) maps every token's last hidden state to a vector
that is then L2-normalised. Score query/document pairs with
:func:`retrievals.losses.maxsim.maxsim_scores`; train with :class:`retrievals.losses.MaxSimLoss`
through ``RetrievalTrainer`` (``returns_token_embeddings = True`` makes it pass the masks).

Saved layout: the backbone directory written by ``AutoModelForEmbedding.save_pretrained`` (it still
loads as a dense model), plus ``multi_vector_projection.safetensors`` and ``multi_vector_config.json``.

Resuming from a ``RetrievalTrainer`` checkpoint restores the backbone, the projection
(:meth:`MultiVectorModel.load_projection`) and the optimizer state.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .embedding_model import DEFAULT_CPU_BATCH_TOKENS, AutoModelForEmbedding, length_sorted_batches
from .precision import autocast_context, resolve_precision
from .tokenization import check_texts, pad_batch

logger = logging.getLogger(__name__)

PROJECTION_FILE = "multi_vector_projection.safetensors"
MULTI_VECTOR_CONFIG = "multi_vector_config.json"
DEFAULT_DIM = 128


def is_multi_vector_dir(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a directory saved by :meth:`MultiVectorModel.save_pretrained`."""
    return os.path.isfile(os.path.join(str(path), MULTI_VECTOR_CONFIG))


def _saved_dim(path: str) -> Optional[int]:
    if not is_multi_vector_dir(path):
        return None
    with open(os.path.join(path, MULTI_VECTOR_CONFIG), encoding="utf-8") as f:
        return int(json.load(f)["dim"])


class MultiVectorModel(nn.Module):
    """``forward(input_ids, attention_mask) -> [batch, length, dim]`` float32 token vectors, each
    L2-normalised, padding positions zero. :meth:`encode` returns one ``[n_tokens, dim]`` matrix per
    text (padding removed; special tokens kept unless ``skip_special_tokens=True``, matching what
    training sees through the attention masks).
    """

    returns_token_embeddings = True
    supports_gradient_checkpointing = True

    def __init__(self, embedder: AutoModelForEmbedding, dim: int = DEFAULT_DIM) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.embedder = embedder
        hidden = embedder.model.config.hidden_size
        self.projection = nn.Linear(hidden, dim, bias=False).to(embedder.device)
        self.train(embedder.training)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, model_name_or_path: Union[str, os.PathLike], dim: Optional[int] = None,
                        **kwargs: Any) -> MultiVectorModel:
        """Load the backbone (``kwargs`` go to ``AutoModelForEmbedding.from_pretrained``) and, when the
        directory holds one, the projection. ``dim`` defaults to the saved size, else 128; a ``dim``
        that contradicts the saved projection is an error."""
        path = str(model_name_or_path)
        saved = _saved_dim(path) if os.path.isdir(path) else None
        if dim is not None and saved is not None and dim != saved:
            raise ValueError(f"dim={dim} but {path} holds a projection of size {saved}")
        model = cls(AutoModelForEmbedding.from_pretrained(path, **kwargs), dim=dim or saved or DEFAULT_DIM)
        if saved is not None:
            model.load_projection(path, required=True)
        else:
            logger.info("No projection in %s: a new %d-dim projection is initialised at random", path, model.dim)
        return model

    def load_projection(self, directory: Union[str, os.PathLike], required: bool = False) -> bool:
        """Load the projection saved in ``directory``; False (or an error with ``required``) if absent."""
        from safetensors.torch import load_file

        path = os.path.join(str(directory), PROJECTION_FILE)
        if not os.path.isfile(path):
            if required:
                raise FileNotFoundError(f"{path} not found")
            return False
        weight = load_file(path)["weight"]
        if tuple(weight.shape) != tuple(self.projection.weight.shape):
            raise ValueError(f"{path} holds a projection of shape {tuple(weight.shape)}, the model needs "
                             f"{tuple(self.projection.weight.shape)}")
        with torch.no_grad():
            self.projection.weight.copy_(weight)
        return True

    def save_pretrained(self, save_directory: Union[str, os.PathLike], merge_lora: bool = True, **kwargs: Any) -> None:
        """The backbone directory (``AutoModelForEmbedding.save_pretrained``), the projection and its config."""
        from safetensors.torch import save_file

        save_directory = str(save_directory)
        self.embedder.save_pretrained(save_directory, merge_lora=merge_lora, **kwargs)
        save_file({"weight": self.projection.weight.detach().float().cpu().contiguous()},
                  os.path.join(save_directory, PROJECTION_FILE))
        config = {"dim": self.dim, "hidden_size": self.projection.in_features, "score": "maxsim, mean over query tokens"}
        with open(os.path.join(save_directory, MULTI_VECTOR_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    # ------------------------------------------------------------------ what the trainer needs
    @property
    def model(self) -> nn.Module:
        """The transformers backbone (``RetrievalTrainer`` resumes its weights from checkpoints)."""
        return self.embedder.model

    @property
    def config(self):
        return self.embedder.model.config

    @property
    def tokenizer(self):
        return self.embedder.tokenizer

    @property
    def embedding_config(self):
        return self.embedder.embedding_config

    @property
    def dim(self) -> int:
        return self.projection.out_features

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedder.dtype

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                                        **kwargs: Any) -> None:
        """Trade compute for memory in the backbone (the projection is cheap)."""
        self.embedder.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                                      **kwargs: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def tokenize(self, texts: Sequence[str], is_query: bool = False, max_length: Optional[int] = None) -> List[List[int]]:
        """Token ids with the side's instruction and max length (as the collators make them)."""
        return self.embedder.tokenize(texts, is_query=is_query, max_length=max_length)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Float32 ``[batch, length, dim]``: projected, L2-normalised token vectors; padding is zero."""
        if self.embedder._needs_position_ids(attention_mask):
            kwargs.setdefault("position_ids", (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0))
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        # Half-precision CUDA weights meet a float32 projection: feed it its own dtype (autocast may still lower it).
        tokens = nn.functional.normalize(self.projection(hidden.to(self.projection.weight.dtype)).float(), p=2, dim=-1)
        return tokens * attention_mask.unsqueeze(-1).to(tokens.dtype)

    # ------------------------------------------------------------------ encoding
    def encode(self, sentences: Union[str, Sequence[str]], is_query: bool = False, batch_size: int = 32,
               max_length: Optional[int] = None, skip_special_tokens: bool = False, precision: Optional[str] = None,
               max_batch_tokens: Optional[int] = None, dtype: torch.dtype = torch.float32,
               show_progress_bar: Optional[bool] = None) -> List[torch.Tensor]:
        """One CPU ``[n_tokens_i, dim]`` tensor per text, in input order (a list even for one string).

        Queries (``is_query=True``) get the query instruction and max length from the embedding
        config. ``dtype=torch.float16`` halves the memory of a stored corpus.
        """
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        check_texts(texts)
        ids = self.tokenize(texts, is_query=is_query, max_length=max_length) if texts else []
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO and len(texts) > 4 * batch_size
        return self.encode_ids(ids, batch_size=batch_size, skip_special_tokens=skip_special_tokens, precision=precision,
                               max_batch_tokens=max_batch_tokens, dtype=dtype, show_progress_bar=show_progress_bar)

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32, skip_special_tokens: bool = False,
                   precision: Optional[str] = None, max_batch_tokens: Optional[int] = None,
                   dtype: torch.dtype = torch.float32, show_progress_bar: bool = False) -> List[torch.Tensor]:
        """Token matrices for token id lists, batched by length like ``AutoModelForEmbedding.encode_ids``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device
        if max_batch_tokens is None and device.type == "cpu":
            max_batch_tokens = DEFAULT_CPU_BATCH_TOKENS
        resolved = resolve_precision(precision or self.embedder.precision, device, owner=self.embedder)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        out: List[Optional[torch.Tensor]] = [None] * len(ids)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), autocast_context(resolved, device, self.dtype):
                batches = list(length_sorted_batches([len(x) for x in ids], batch_size, max_batch_tokens))
                for batch in tqdm(batches, desc="Encoding tokens", disable=not show_progress_bar):
                    inputs = pad_batch([ids[i] for i in batch], self.tokenizer.pad_token_id,
                                       self.embedding_config.padding_side, device)
                    tokens = self(**inputs).cpu()
                    keep = inputs["attention_mask"].cpu().bool()
                    if skip_special_tokens:
                        keep &= ~torch.isin(inputs["input_ids"].cpu(), special)
                    for row, index in enumerate(batch):
                        if not keep[row].any():
                            raise ValueError(f"text {index} has no tokens left after removing special tokens")
                        out[index] = tokens[row][keep[row]].to(dtype)
        finally:
            self.train(was_training)
        return out  # type: ignore[return-value]
