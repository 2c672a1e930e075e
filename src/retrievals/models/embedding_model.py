"""``AutoModelForEmbedding``: a transformers backbone + pooling + optional L2 normalisation."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .accelerated import backend_runner
from .accelerated import configure as configure_backend
from .accelerated import run as run_backend
from .embedding_config import EmbeddingConfig, load_saved_settings
from .loading import (
    default_settings,
    ensure_pad_token,
    hub_file_locator,
    load_backbone,
    needs_eos,
    resolve_source,
    weights_files,
    weights_state,
)
from .pooling import Pooling
from .precision import autocast_context, canonical_precision, resolve_precision
from .similarity import similarity
from .tokenization import DEFAULT_CPU_BATCH_TOKENS, MIN_FILL, check_texts, length_sorted_batches, pad_batch, tokenize_texts  # noqa: F401  (length_sorted_batches: imported from here by users)

logger = logging.getLogger(__name__)


class AutoModelForEmbedding(nn.Module):
    """Embedding model: ``forward(input_ids, attention_mask) -> [batch, dim]`` embeddings.

    Build it with :meth:`from_pretrained`; encode texts with :meth:`encode`.
    """

    def __init__(self, backbone: nn.Module, tokenizer, config: EmbeddingConfig, precision: str = "auto") -> None:
        super().__init__()
        self.model = backbone
        self.tokenizer = tokenizer
        self.embedding_config = config
        self.pooling = Pooling(config.pooling_method)
        self.precision = canonical_precision(precision)
        self._accepts_position_ids: Optional[bool] = None
        configure_backend(self, None, None, None)  # the default backend; from_pretrained sets the user's
        self.train(backbone.training)  # transformers loads in eval mode; keep it

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: Union[str, os.PathLike],
        pooling_method: Optional[str] = None,
        normalize_embeddings: Optional[bool] = None,
        query_instruction: Optional[str] = None,
        document_instruction: Optional[str] = None,
        max_length: Optional[int] = None,
        query_max_length: Optional[int] = None,
        use_fp16: bool = False,
        use_bf16: Optional[bool] = None,
        precision: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        trust_remote_code: bool = False,
        quantization: Optional[str] = None,
        backend: Optional[str] = None,
        backend_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> AutoModelForEmbedding:
        """Load a model; arguments left as ``None`` come from the saved config, then defaults.

        Extra keyword arguments (``gguf_file=``, ``torch_dtype=``, ``revision=`` ...) go to
        ``transformers``. ``precision`` is ``auto`` (bf16 where the hardware is fast at it),
        ``fp32``, ``bf16`` or ``fp16``; ``use_fp16=True`` / ``use_bf16=`` are shorthands.
        ``quantization`` is ``int8`` (dynamic int8 Linear layers, CPU inference only), ``bnb-8bit`` or
        ``bnb-4bit`` (bitsandbytes, CUDA only); see :mod:`retrievals.models.quantization`.
        ``backend`` runs inference on ``torch``, ``openvino`` or ``auto`` (the fastest near-lossless one on
        this CPU; int8 there is OpenVINO's static int8); ``backend_kwargs``: ``calibration_texts``
        (int8), ``export_dir``, ``streams``; see :mod:`retrievals.backends`.
        """
        from .quantization import prepare_quantization, quantize_int8

        if precision is not None and str(precision).lower() == "int8":  # --precision int8: int8 weights
            precision, quantization = None, quantization or "int8"
        path, is_local = resolve_source(str(model_name_or_path), kwargs)
        quantization = prepare_quantization(quantization, kwargs, device)
        saved = load_saved_settings(path, None if is_local else hub_file_locator(path, kwargs))
        backbone, tokenizer = load_backbone(path, is_local, trust_remote_code, kwargs)
        embeddings = backbone.get_input_embeddings()
        ensure_pad_token(tokenizer, getattr(embeddings, "num_embeddings", None))
        explicit = {
            "pooling_method": pooling_method,
            "normalize_embeddings": normalize_embeddings,
            "query_instruction": query_instruction,
            "document_instruction": document_instruction,
            "max_length": max_length,
            "query_max_length": query_max_length,
        }
        settings = default_settings(backbone, tokenizer, saved, explicit)
        settings.update(saved)
        settings.update({k: v for k, v in explicit.items() if v is not None})
        if "append_eos" not in saved or pooling_method is not None:
            settings["append_eos"] = needs_eos(backbone, tokenizer, settings["pooling_method"])
        config = EmbeddingConfig.from_dict(settings, source=path)
        tokenizer.padding_side = config.padding_side
        chosen = precision or ("fp16" if use_fp16 else {True: "bf16", False: "fp32", None: "auto"}[use_bf16])
        model = cls(backbone, tokenizer, config, precision=chosen)
        if quantization is None or quantization == "int8":
            model.to_device("cpu" if quantization == "int8" else device)
        model.weights_files = weights_files(path, is_local, kwargs)  # what its fingerprint hashes
        model.loaded_weights_state = weights_state(backbone)
        if configure_backend(model, backend, backend_kwargs, path if is_local else None, quantization) \
                and quantization == "int8":
            quantize_int8(model)  # torch's dynamic int8 (int8 on OpenVINO quantises its own graph)
        model.quantization = quantization  # bitsandbytes weights stay where device_map put them
        model.loaded_weights_state = weights_state(backbone)  # changed in memory later: the fingerprint hashes memory
        return model

    def to_device(self, device: Optional[Union[str, torch.device]] = None) -> AutoModelForEmbedding:
        """Move to ``device`` (default: CUDA when available); on CUDA, half precision casts the weights."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.to(device)
        resolved = resolve_precision(self.precision, device, owner=self)
        if device.type == "cuda" and resolved in ("fp16", "bf16") and self.dtype == torch.float32:
            self.to({"fp16": torch.float16, "bf16": torch.bfloat16}[resolved])
        return self

    @property
    def config(self):
        """The backbone's transformers config (what ``transformers.Trainer`` expects)."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                                        **kwargs: Any) -> None:
        """Trade compute for memory in the backbone (non-reentrant checkpointing by default)."""
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                                      **kwargs: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def get_sentence_embedding_dimension(self) -> int:
        return self.embedding_config.truncate_dim or self.model.config.hidden_size

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Pooled (and, if configured, L2-normalised) float32 embeddings ``[batch, dim]``."""
        embeddings = self._pooled(input_ids, attention_mask, **kwargs)
        if self.embedding_config.normalize_embeddings:
            embeddings = nn.functional.normalize(embeddings, p=2, dim=-1)
        return embeddings

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self._needs_position_ids(attention_mask):
            # Left padding: count positions from each text's first real token, as with right padding.
            kwargs.setdefault("position_ids", (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0))
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return self.pooling(hidden.float(), attention_mask)

    def _needs_position_ids(self, attention_mask: torch.Tensor) -> bool:
        if self.embedding_config.padding_side != "left" or bool(attention_mask[:, 0].all()):
            return False
        if self._accepts_position_ids is None:
            accepts = "position_ids" in inspect.signature(self.model.forward).parameters
            # RoBERTa-style embeddings derive positions from the pad id themselves.
            derives = hasattr(getattr(self.model, "embeddings", None), "padding_idx")
            self._accepts_position_ids = accepts and not derives
        return self._accepts_position_ids

    # ------------------------------------------------------------------ tokenising
    def tokenize(self, texts: Sequence[str], is_query: bool = False, max_length: Optional[int] = None,
                 truncation: bool = True) -> List[List[int]]:
        """Token ids with the side's instruction and EOS handling (shared with the collators).

        ``truncation=False`` returns full-length ids (callers check them against ``max_length``)."""
        cfg = self.embedding_config
        tokenized = tokenize_texts(
            self.tokenizer,
            texts,
            max_length=max_length or cfg.max_length_for(is_query),
            instruction=cfg.instruction_for(is_query),
            append_eos=cfg.append_eos,
            truncation=truncation,
        )
        if tokenized.num_truncated and truncation:
            logger.info("%d of %d texts reached max_length and were truncated", tokenized.num_truncated, len(texts))
        return tokenized.input_ids

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        sentences: Union[str, Sequence[str]],
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: Optional[bool] = None,
        is_query: bool = False,
        max_length: Optional[int] = None,
        max_batch_tokens: Optional[int] = None,
        truncate_dim: Optional[int] = None,
        precision: Optional[str] = None,
        **kwargs: Any,
    ) -> Union[np.ndarray, torch.Tensor]:
        """Embed texts; returns ``[n, dim]`` (``[dim]`` for a single string), in input order.

        Texts are tokenized once, sorted by token length and batched so that each batch is padded
        only to its own longest text; ``max_batch_tokens`` caps ``batch x length`` per batch.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        check_texts(texts)
        ids = self.tokenize(texts, is_query=is_query, max_length=max_length) if texts else []
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO and len(texts) > 4 * batch_size
        out = self.encode_ids(ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens, precision=precision,
                              show_progress_bar=show_progress_bar)
        out = self.finalize_embeddings(out, normalize_embeddings, truncate_dim)
        if single:
            out = out[0]
        if convert_to_tensor or not convert_to_numpy:
            return out
        return out.numpy()

    def encode_ids(
        self,
        ids: Sequence[Sequence[int]],
        batch_size: int = 32,
        max_batch_tokens: Optional[int] = None,
        precision: Optional[str] = None,
        show_progress_bar: bool = False,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """Pooled float32 embeddings ``[n, hidden]`` (not normalised) for token id lists, in input order.

        The one inference path behind :meth:`encode` and the HTTP server: ids are sorted by length and
        batched so that each batch is padded only to its own longest text, with at most ``batch_size``
        texts and ``max_batch_tokens`` padded tokens (default 4096 on CPU) per batch. The model's backend
        runs them (``backend="torch"``, or a ``precision`` other than the model's, forces torch).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device
        out = torch.empty((len(ids), self.model.config.hidden_size), dtype=torch.float32)
        if not ids:
            return out
        if max_batch_tokens is None and device.type == "cpu":
            max_batch_tokens = DEFAULT_CPU_BATCH_TOKENS
        batches = list(length_sorted_batches([len(x) for x in ids], batch_size, max_batch_tokens, MIN_FILL))
        forced = backend == "torch" or (precision is not None and canonical_precision(precision) != self.precision)
        runner = None if forced else backend_runner(self, ids)
        if runner is not None:
            run_backend(self, runner, ids, out.numpy(), batches)
            return out
        resolved = resolve_precision(precision or self.precision, device, owner=self)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), autocast_context(resolved, device, self.dtype):
                for batch in tqdm(batches, desc="Encoding", disable=not show_progress_bar):
                    inputs = pad_batch([ids[i] for i in batch], self.tokenizer.pad_token_id,
                                       self.embedding_config.padding_side, device)
                    out[batch] = self._pooled(**inputs).cpu()
        finally:
            self.train(was_training)
        return out

    def finalize_embeddings(self, out: torch.Tensor, normalize: Optional[bool] = None,
                            truncate_dim: Optional[int] = None) -> torch.Tensor:
        """Truncate to ``truncate_dim`` (default: the saved one), then L2-normalise if configured."""
        truncate_dim = truncate_dim or self.embedding_config.truncate_dim
        if truncate_dim:
            if truncate_dim > out.shape[-1]:
                raise ValueError(f"truncate_dim={truncate_dim} exceeds the embedding size {out.shape[-1]}")
            out = out[:, :truncate_dim]
        normalize = self.embedding_config.normalize_embeddings if normalize is None else normalize
        return nn.functional.normalize(out, p=2, dim=-1) if normalize else out

    def encode_queries(self, queries: Union[str, Sequence[str]], **kwargs: Any) -> Union[np.ndarray, torch.Tensor]:
        """:meth:`encode` with the query instruction and query max length."""
        kwargs["is_query"] = True
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus: Union[str, Sequence[Any]], **kwargs: Any) -> Union[np.ndarray, torch.Tensor]:
        """:meth:`encode` for documents; items may be strings or ``{"title", "text"}`` dicts."""
        if not isinstance(corpus, str):
            corpus = [_document_text(doc, i) for i, doc in enumerate(corpus)]
        kwargs["is_query"] = False
        return self.encode(corpus, **kwargs)

    def similarity(self, a, b):
        """Cosine score matrix between two sets of embeddings (see :func:`retrievals.similarity`)."""
        return similarity(a, b, metric="cosine")

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike], merge_lora: bool = True, **kwargs: Any) -> None:
        """Write safetensors weights, the tokenizer, our config and sentence-transformers' files.

        With LoRA adapters the weights are written merged (a complete model that loads anywhere) and
        the adapter itself goes to ``adapter/`` (for resuming); ``merge_lora=False`` writes only the
        adapter and the config.
        """
        from .lora import is_peft_model, merged_copy, save_adapter
        from .model_card import model_facts, write_card
        from .quantization import check_can_save

        check_can_save(self)
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        kwargs.setdefault("safe_serialization", True)
        backbone = self.model
        if is_peft_model(backbone):
            save_adapter(backbone, save_directory)
            if not merge_lora:
                self.tokenizer.save_pretrained(save_directory)
                self.embedding_config.save(save_directory, dimension=backbone.config.hidden_size)
                return
            backbone = merged_copy(backbone)
        backbone.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory)
        self.embedding_config.save(save_directory, dimension=backbone.config.hidden_size)
        info = model_facts(self, getattr(self, "source_dir", None))
        write_card(save_directory, {"name": os.path.basename(os.path.normpath(save_directory)), **info})


def _document_text(doc: Any, index: int) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and "text" in doc:
        title = doc.get("title") or ""
        return f"{title} {doc['text']}".strip() if title else doc["text"]
    raise TypeError(f"corpus[{index}] must be a string or a dict with 'text', got {type(doc).__name__}")
