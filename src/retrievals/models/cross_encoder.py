"""A small cross-encoder (``AutoModelForSequenceClassification``) that scores ``(query, document)`` pairs.

Used as a distillation teacher (``retrievals.mining.teacher``). It loads under the same safety rules
as :class:`~retrievals.models.AutoModelForEmbedding`: safetensors weights only and no custom code
unless ``trust_remote_code=True``.

Scores: with one output label, the logit; with two labels, ``logit[1] - logit[0]`` (the log-odds of
the "relevant" class, so ``sigmoid(score)`` is its softmax probability and the scale matches a
one-label model). Models with more labels are refused: they are not relevance rankers.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .loading import TOKENIZER_KWARGS, check_local_weights, ensure_pad_token, has_custom_code, resolve_source

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512  # tokens per pair when neither the caller nor the saved tokenizer gives a length


def tokenize_pairs(tokenizer, pairs: Sequence[Tuple[str, str]], max_length: int) -> List[Dict[str, List[int]]]:
    """Token ids of each ``(query, document)`` pair, truncated to ``max_length`` (longest side first): the
    one tokenization of training (:class:`~retrievals.data.collators.CrossEncoderCollator`) and ``predict``."""
    from .tokenization import tokenizer_lock

    with tokenizer_lock(tokenizer):
        encoded = tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=max_length)
    return [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(pairs))]


def saved_max_length(tokenizer, config) -> int:
    """The length a saved cross-encoder truncates pairs at: its tokenizer's ``model_max_length`` (what
    :meth:`CrossEncoder.save_pretrained` writes and sentence-transformers' ``CrossEncoder`` honours), within
    the model's position embeddings; :data:`DEFAULT_MAX_LENGTH` when the tokenizer has none (transformers'
    1e30 placeholder)."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    saved = getattr(tokenizer, "model_max_length", None)
    if not isinstance(saved, int) or not 0 < saved < VERY_LARGE_INTEGER:
        return DEFAULT_MAX_LENGTH
    positions = getattr(config, "max_position_embeddings", None)
    return min(saved, positions) if isinstance(positions, int) and positions > 0 else saved


def pair_scores(logits: torch.Tensor) -> torch.Tensor:
    """One relevance score per row of classifier logits: the logit (1 label) or ``logit[1] - logit[0]``."""
    return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]


class CrossEncoder:
    """``CrossEncoder.from_pretrained(path).predict([(query, document), ...]) -> np.ndarray [n]``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        num_labels = int(getattr(model.config, "num_labels", 1))
        if num_labels not in (1, 2):
            raise ValueError(f"a cross-encoder teacher needs 1 or 2 output labels (a relevance score), got {num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_labels = num_labels

    @classmethod
    def from_pretrained(cls, model_name_or_path: Union[str, os.PathLike], max_length: Optional[int] = None,
                        device: Optional[Union[str, torch.device]] = None, trust_remote_code: bool = False,
                        **kwargs: Any) -> CrossEncoder:
        """Load a sequence-classification model and its tokenizer; extra ``kwargs`` go to transformers.
        ``max_length`` (tokens per pair): default the saved one (:func:`saved_max_length`)."""
        path, is_local = resolve_source(str(model_name_or_path), kwargs)
        if kwargs.get("gguf_file"):
            raise ValueError(f"{model_name_or_path!r}: GGUF files are not supported for cross-encoders")
        if is_local:
            check_local_weights(path, kwargs)
            if has_custom_code(path) and not trust_remote_code:
                raise ValueError(f"{path!r} asks to run custom code (auto_map); pass trust_remote_code=True if you trust it")
        model_kwargs = dict(kwargs)
        model_kwargs.setdefault("use_safetensors", True if is_local else None)
        tokenizer_kwargs = {k: kwargs[k] for k in TOKENIZER_KWARGS if k in kwargs}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **tokenizer_kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                                       **model_kwargs)
        except OSError as e:
            raise OSError(f"Could not load cross-encoder {path!r}: {e}") from e
        ensure_pad_token(tokenizer, getattr(model.get_input_embeddings(), "num_embeddings", None))
        if tokenizer.pad_token_id is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token by it
        model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        return cls(model, tokenizer, max_length=max_length or saved_max_length(tokenizer, model.config))

    @classmethod
    def from_encoder(cls, model_name_or_path: Union[str, os.PathLike], max_length: Optional[int] = None,
                     trust_remote_code: bool = False, **kwargs: Any) -> CrossEncoder:
        """A cross-encoder to train: the encoder's weights plus a new one-label classification head."""
        kwargs.setdefault("num_labels", 1)
        return cls.from_pretrained(model_name_or_path, max_length=max_length, trust_remote_code=trust_remote_code,
                                   **kwargs)

    def save_pretrained(self, output_dir: Union[str, os.PathLike]) -> None:
        """Weights (safetensors), config and tokenizer: loads in ``CrossEncoder.from_pretrained`` and in
        sentence-transformers' ``CrossEncoder`` (its ``max_length`` is saved as the tokenizer's)."""
        self.model.save_pretrained(output_dir, safe_serialization=True)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(output_dir)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, pairs: Sequence[Tuple[str, str]], batch_size: int = 32, max_length: Optional[int] = None,
                show_progress_bar: bool = False) -> np.ndarray:
        """One float32 relevance score per ``(query, document)`` pair, in input order.

        Pairs are tokenized once (truncated to ``max_length`` tokens, longest side first), sorted by
        length and batched so each batch is padded only to its own longest pair.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(t, str) for t in pair):
                raise TypeError(f"pairs[{i}] must be a (query, document) pair of strings")
        scores = np.empty(len(pairs), dtype=np.float32)
        if not pairs:
            return scores
        features = tokenize_pairs(self.tokenizer, pairs, max_length or self.max_length)
        order = sorted(range(len(pairs)), key=lambda i: -len(features[i]["input_ids"]))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Scoring")
        with torch.inference_mode():
            for batch in batches:
                inputs = self.tokenizer.pad([features[i] for i in batch], return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits.float()
                scores[batch] = pair_scores(logits).cpu().numpy()
        return scores
