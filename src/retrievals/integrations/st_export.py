"""sentence-transformers: :func:`export_multi_vector_encoder` writes a multi-vector model as a ``MultiVectorEncoder``.

A dense model saved by :meth:`~retrievals.AutoModelForEmbedding.save_pretrained` (LoRA merged or not) already
loads in ``SentenceTransformer(dir)`` with the same pooling, normalisation and query/document prompts. A
multi-vector directory (``--multi_vector_dim``) does not carry over by itself: ``SentenceTransformer(dir)``
loads only its dense backbone (the first stage), and ``MultiVectorEncoder(dir)`` converts that dense model
with a new, randomly initialised 128-dim projection, ignoring ``multi_vector_projection.safetensors``.
This module writes a separate directory that ``MultiVectorEncoder`` loads with the trained projection:

    from retrievals.integrations import export_multi_vector_encoder
    from sentence_transformers import MultiVectorEncoder

    export_multi_vector_encoder("path/to/multi_vector_model", "path/to/st_export")
    encoder = MultiVectorEncoder("path/to/st_export")   # encode_query / encode_document: [tokens, dim] each

Token vectors are the same as :meth:`~retrievals.MultiVectorModel.encode` (special tokens kept, padding
dropped); ``similarity`` is ``meanmaxsim`` (MaxSim averaged over query tokens, as our score).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Union

from . import missing_dependency

__all__ = ["export_multi_vector_encoder"]


def export_multi_vector_encoder(model: Union[str, os.PathLike, Any], output_dir: Union[str, os.PathLike]) -> str:
    """Write ``model`` (a :class:`~retrievals.MultiVectorModel` or the directory it was saved to) to
    ``output_dir`` as a sentence-transformers ``MultiVectorEncoder``; returns ``output_dir``."""
    from ..models.multi_vector import MultiVectorModel, is_multi_vector_dir

    if isinstance(model, (str, os.PathLike)):
        if not is_multi_vector_dir(model):
            raise ValueError(f"{model} is not a multi-vector model directory (no multi_vector_config.json); "
                             "a dense model directory loads in SentenceTransformer as it is")
        model = MultiVectorModel.from_pretrained(model, precision="fp32", device="cpu")
    if not isinstance(model, MultiVectorModel):
        raise TypeError(f"expected a MultiVectorModel or its directory, got {type(model).__name__}")
    if model.embedding_config.append_eos:
        raise ValueError("this model appends an EOS token that sentence-transformers' tokenization would not add; "
                         "its token vectors would differ, so it is not exported")
    output_dir = str(output_dir)
    with tempfile.TemporaryDirectory() as backbone_dir:
        model.embedder.save_pretrained(backbone_dir)  # a plain transformers directory for ST's Transformer
        _build_encoder(model, backbone_dir).save_pretrained(output_dir)
    return output_dir


def _build_encoder(model: Any, backbone_dir: str):
    try:
        from sentence_transformers import MultiVectorEncoder
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.base.modules.dense import Dense
        from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
    except ImportError as e:
        raise missing_dependency("sentence_transformers", e) from e
    import torch

    cfg = model.embedding_config
    transformer = Transformer(backbone_dir, max_seq_length=cfg.max_length, query_length=cfg.max_length_for(True),
                              document_length=cfg.max_length_for(False))
    weight = model.projection.weight.detach().float().cpu().clone()
    dense = Dense(weight.shape[1], weight.shape[0], bias=False, activation_function=torch.nn.Identity(),
                  init_weight=weight, module_input_name="token_embeddings")
    modules = [transformer, dense, MultiVectorMask(skiplist_words=[]), Normalize(module_input_name="token_embeddings")]
    prompts = {"query": cfg.query_instruction or "", "document": cfg.document_instruction or ""}
    return MultiVectorEncoder(modules=modules, device="cpu", prompts=prompts, similarity_fn_name="meanmaxsim")
