"""MTEB: :class:`MTEBModel` makes an :class:`~retrievals.AutoModelForEmbedding` an mteb encoder
(``pip install 'retrievals[mteb]'``; written against mteb 2.x).

    import mteb
    from retrievals import AutoModelForEmbedding
    from retrievals.integrations import MTEBModel

    model = MTEBModel(AutoModelForEmbedding.from_pretrained("path/to/model"))
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]), cache=None)

mteb calls ``encode(DataLoader, task_metadata=..., hf_split=..., hf_subset=..., prompt_type=...)``; the
side follows ``prompt_type``: ``PromptType.query`` embeds with the model's query instruction and query max
length (``encode_queries``), ``PromptType.document`` with the document side (``encode_corpus``; mteb has
already joined each document's title and text with a space, as :mod:`retrievals.data.beir` does). Tasks
without a prompt type (STS, classification, clustering ...) use the document side unless
``symmetric_as_query=True``. mteb's own per-task prompts are not applied: the model's saved instructions are.

:func:`beir_retrieval_task` turns a BEIR-layout folder (or a :class:`~retrievals.data.beir.BeirDataset`) into an
mteb retrieval task held in memory, for data that is not on the hub or a machine without network.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional, Sequence, Union

import numpy as np

from . import missing_dependency

try:
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ScoringFunction
    from mteb.types import PromptType
except ImportError as e:
    raise missing_dependency("mteb", e) from e

__all__ = ["MTEBModel", "beir_retrieval_task"]

# mteb's ``precision`` encode argument quantizes the output (sentence-transformers' int8/binary ...);
# only full-precision float output is produced here.
FLOAT_PRECISIONS = (None, "float32")


class MTEBModel(AbsEncoder):
    """An mteb encoder over ``model`` (an :class:`~retrievals.AutoModelForEmbedding`).

    ``name`` (``organization/model``, default ``retrievals/<folder name>``) and ``revision`` label the results;
    ``batch_size`` is used when mteb passes none. Scores are cosine for a model that L2-normalises its
    embeddings, dot product otherwise (what :func:`retrievals.evaluation.evaluate_retrieval` ranks by).
    """

    def __init__(self, model: Any, name: Optional[str] = None, revision: str = "local", batch_size: int = 32,
                 symmetric_as_query: bool = False) -> None:
        if not hasattr(model, "encode_queries") or not hasattr(model, "embedding_config"):
            raise TypeError(f"MTEBModel wraps an AutoModelForEmbedding, got {type(model).__name__}")
        self.model, self.batch_size, self.symmetric_as_query = model, batch_size, symmetric_as_query
        cfg = model.embedding_config
        source = getattr(model.model.config, "_name_or_path", "") or "model"
        # create_empty applies the values with model_copy (no validation): they are given as mteb's types
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": name or f"retrievals/{os.path.basename(os.path.normpath(str(source)))}",
            "revision": revision,
            "embed_dim": model.get_sentence_embedding_dimension(),
            "max_tokens": cfg.max_length,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "similarity_fn_name": ScoringFunction.COSINE if cfg.normalize_embeddings else ScoringFunction.DOT_PRODUCT,
            "use_instructions": bool(cfg.query_instruction or cfg.document_instruction),
            "framework": ["PyTorch"],
            "open_weights": True,
        })

    def encode(self, inputs: Union[Iterable[Any], Sequence[str]], *, task_metadata: Any = None, hf_split: str = "",
               hf_subset: str = "", prompt_type: Optional[PromptType] = None, **kwargs: Any) -> np.ndarray:
        """``[n, dim]`` float32 embeddings of ``inputs`` (mteb's DataLoader of ``{"text": [...]}`` batches, or
        plain strings), on the query side for ``PromptType.query``, else the document side."""
        precision = kwargs.get("precision")
        if precision not in FLOAT_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; MTEBModel returns float32 embeddings")
        texts = _texts(inputs)
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        side = PromptType(prompt_type) if prompt_type is not None else None
        is_query = side == PromptType.query or (side is None and self.symmetric_as_query)
        encode = self.model.encode_queries if is_query else self.model.encode_corpus
        vectors = encode(texts, batch_size=kwargs.get("batch_size") or self.batch_size, convert_to_numpy=True,
                         show_progress_bar=bool(kwargs.get("show_progress_bar", False)))
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def beir_retrieval_task(data: Any, name: str = "LocalRetrieval", split: str = "test",
                        languages: Sequence[str] = ("eng-Latn",)) -> Any:
    """An mteb ``AbsTaskRetrieval`` over ``data`` (a BEIR folder, read with :func:`~retrievals.data.beir.load_beir`
    for ``split``, or a ``BeirDataset``); its results are reported under ``name`` and ``split``."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    if isinstance(data, (str, os.PathLike)):
        from ..data.beir import load_beir

        data = load_beir(str(data), split=split)

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name, type="Retrieval", main_score="ndcg_at_10", category="t2t", modalities=["text"],
            description="A retrieval task built in memory from a BEIR-layout dataset by retrievals.",
            reference="https://github.com/beir-cellar/beir", dataset={"path": f"local/{name}", "revision": "local"},
            eval_splits=[split], eval_langs=list(languages), date=None, dialect=[], domains=[], task_subtypes=[],
            license="not specified", annotations_creators="derived", sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc: Optional[int] = None, **kwargs: Any) -> None:
            corpus = [{"id": d, "title": doc.get("title") or "", "text": doc["text"]} for d, doc in data.corpus.items()]
            self.dataset = {"default": {split: RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in data.queries.items()]),
                corpus=Dataset.from_list(corpus), relevant_docs=data.qrels, top_ranked=None)}}
            self.data_loaded = True

    LocalRetrieval.__name__ = LocalRetrieval.__qualname__ = name
    return LocalRetrieval()


def _texts(inputs: Union[Iterable[Any], Sequence[str]]) -> List[str]:
    """The texts of mteb's input: a DataLoader of ``{"text": [...]}`` batches, or a string / list of strings."""
    if isinstance(inputs, str):
        return [inputs]
    texts: List[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and "text" in item:
            texts.extend(item["text"])
        else:
            raise TypeError(f"expected strings or batches with a 'text' column, got {type(item).__name__} "
                            f"(keys {sorted(item) if isinstance(item, dict) else '-'})")
    return texts
