"""Teacher scores for knowledge distillation.

A teacher is a bi-encoder (any :class:`~retrievals.models.AutoModelForEmbedding`; score = dot
product of its query and document embeddings, a cosine when it normalises them) or a cross-encoder
(:class:`~retrievals.models.cross_encoder.CrossEncoder`; score = its relevance logit).
:func:`score_records` writes the scores in FlagEmbedding's format: ``pos_scores`` / ``neg_scores``
lists aligned with ``positive`` / ``negative``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.records import text_field, text_list_field
from ..models.cross_encoder import CrossEncoder
from ..models.embedding_model import AutoModelForEmbedding
from ..models.loading import resolve_source

logger = logging.getLogger(__name__)

Teacher = Union[AutoModelForEmbedding, CrossEncoder]


def is_cross_encoder(model_name_or_path: Union[str, os.PathLike]) -> bool:
    """True when the model's ``config.json`` names a ``...ForSequenceClassification`` architecture."""
    path, is_local = resolve_source(str(model_name_or_path), {})
    if is_local:
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path!r} is not a model directory: config.json is missing")
        with open(config_file, encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
    else:
        from transformers import AutoConfig

        architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def load_teacher(model_name_or_path: Union[str, os.PathLike], max_length: Optional[int] = None,
                 device: Optional[str] = None, trust_remote_code: bool = False, **kwargs: Any) -> Teacher:
    """A :class:`CrossEncoder` for sequence-classification checkpoints, else an ``AutoModelForEmbedding``
    (with its saved pooling, instructions and normalisation). ``max_length`` overrides the saved length
    (cross-encoder: per pair, its tokenizer's, else 512; bi-encoder: its saved document max length)."""
    if is_cross_encoder(model_name_or_path):
        teacher: Teacher = CrossEncoder.from_pretrained(model_name_or_path, max_length=max_length, device=device,
                                                        trust_remote_code=trust_remote_code, **kwargs)
    else:
        teacher = AutoModelForEmbedding.from_pretrained(model_name_or_path, max_length=max_length, device=device,
                                                        trust_remote_code=trust_remote_code, **kwargs)
    logger.info("Teacher %s loaded as a %s", model_name_or_path,
                "cross-encoder" if isinstance(teacher, CrossEncoder) else "bi-encoder")
    return teacher


def _index(items: Sequence[Any]) -> Dict[Any, int]:
    positions: Dict[Any, int] = {}
    for item in items:
        positions.setdefault(item, len(positions))
    return positions


def score_candidates(teacher: Teacher, queries: Sequence[str], documents_per_query: Sequence[Sequence[str]],
                     batch_size: int = 32, show_progress_bar: bool = False) -> List[List[float]]:
    """``scores[i][j]`` = teacher score of ``(queries[i], documents_per_query[i][j])``.

    Each distinct query and document is embedded once (bi-encoder); each distinct pair is scored
    once (cross-encoder).
    """
    if len(queries) != len(documents_per_query):
        raise ValueError(f"{len(queries)} queries but {len(documents_per_query)} document lists")
    if isinstance(teacher, CrossEncoder):
        pairs = _index([(q, d) for q, docs in zip(queries, documents_per_query) for d in docs])
        flat = teacher.predict(list(pairs), batch_size=batch_size, show_progress_bar=show_progress_bar)
        return [[float(flat[pairs[(q, d)]]) for d in docs] for q, docs in zip(queries, documents_per_query)]
    if not isinstance(teacher, AutoModelForEmbedding):
        raise TypeError(f"teacher must be an AutoModelForEmbedding or a CrossEncoder, got {type(teacher).__name__}")
    query_pos = _index(queries)
    doc_pos = _index([d for docs in documents_per_query for d in docs])
    q_emb = np.asarray(teacher.encode_queries(list(query_pos), batch_size=batch_size,
                                              show_progress_bar=show_progress_bar), dtype=np.float32)
    if not doc_pos:
        return [[] for _ in queries]
    d_emb = np.asarray(teacher.encode_corpus(list(doc_pos), batch_size=batch_size,
                                             show_progress_bar=show_progress_bar), dtype=np.float32)
    out = []
    for q, docs in zip(queries, documents_per_query):
        rows = d_emb[[doc_pos[d] for d in docs]] if docs else np.zeros((0, d_emb.shape[1]), dtype=np.float32)
        out.append([float(s) for s in rows @ q_emb[query_pos[q]]])
    return out


def score_records(teacher: Teacher, records: Sequence[Dict[str, Any]], query_key: str = "query",
                  positive_key: str = "positive", negative_key: str = "negative", pos_scores_key: str = "pos_scores",
                  neg_scores_key: str = "neg_scores", batch_size: int = 32,
                  origins: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Copies of ``records`` with ``pos_scores_key`` / ``neg_scores_key`` aligned with the positive and
    negative texts (a single string counts as a one-element list; no negatives gives ``[]``)."""
    origins = list(origins) if origins is not None else [f"record {i}" for i in range(len(records))]
    queries, docs, splits = [], [], []
    for record, origin in zip(records, origins):
        positives = text_list_field(record, positive_key, origin)
        negatives = text_list_field(record, negative_key, origin, required=False)
        queries.append(text_field(record, query_key, origin))
        docs.append(positives + negatives)
        splits.append(len(positives))
    scores = score_candidates(teacher, queries, docs, batch_size=batch_size, show_progress_bar=len(records) > 100)
    out = []
    for record, row, split in zip(records, scores, splits):
        new = dict(record)
        new[pos_scores_key], new[neg_scores_key] = row[:split], row[split:]
        out.append(new)
    return out
