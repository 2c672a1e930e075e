"""Search: one function behind the library, the command line, evaluation, mining and the server."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..evaluation.metrics import Run
from ..evaluation.search import exact_search
from .faiss_index import LoadedIndex
from .manifest import VectorsManifest, model_fingerprint
from .shards import from_stored, iter_shards
from .texts import stored_texts

logger = logging.getLogger(__name__)


def exact_search_shards(vectors_dir: str, queries: np.ndarray, top_k: int,
                        manifest: Optional[VectorsManifest] = None, normalize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` over every shard, one shard in memory at a time: each shard's
    top-k merged, which equals :func:`~retrievals.evaluation.search.exact_search` over all vectors.
    Returns ``(scores, rows)`` with global row numbers."""
    manifest = manifest or VectorsManifest.load(vectors_dir)
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    best_scores = torch.full((q.shape[0], 0), float("-inf"))
    best_rows = torch.empty((q.shape[0], 0), dtype=torch.long)
    for info, shard in iter_shards(vectors_dir, manifest, columns=("embedding",)):
        x = shard["embedding"]
        x = torch.as_tensor(np.asarray(from_stored(x, manifest) if manifest.dtype == "binary" else x, dtype=np.float32))
        if normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        scores, rows = exact_search(q, x, top_k=top_k)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_rows = torch.cat([best_rows, rows + info.first_row], dim=1)
        best_scores, order = best_scores.topk(min(top_k, best_scores.shape[1]), dim=1)
        best_rows = best_rows.gather(1, order)
    return best_scores.numpy(), best_rows.numpy()


@dataclass
class SearchResult:
    ids: List[List[str]]
    scores: List[List[float]]
    texts: Optional[List[List[str]]] = None  # with ``return_text``: each hit's stored corpus text


class Searcher:
    """A model plus an opened index (memory-mapped); the model must be the one that made the vectors.

    ``model`` defaults to the one named in the index's manifest; a model with another fingerprint
    (another fine-tune, pooling or instruction) is refused, naming both."""

    def __init__(self, index_dir: str, model: Any = None, nprobe: Optional[int] = None, mmap: bool = True,
                 **load_kwargs: Any) -> None:
        self.index = LoadedIndex(index_dir, mmap=mmap)
        self.index.set_nprobe(nprobe)
        made_by = self.index.manifest.vectors
        if model is None or isinstance(model, (str, os.PathLike)):
            from ..models.embedding_model import AutoModelForEmbedding

            model = AutoModelForEmbedding.from_pretrained(str(model or made_by["model"]), **load_kwargs)
        found = model_fingerprint(model)
        if found != made_by["model_fingerprint"]:
            name = getattr(model.model.config, "_name_or_path", type(model).__name__)
            raise ValueError(f"index {index_dir} was built from vectors of {made_by['model']} (fingerprint "
                             f"{made_by['model_fingerprint']}); the model given is {name} (fingerprint {found}): "
                             "encode and index the corpus with this model, or search with the model that made it")
        self.model = model
        self._vectors: Optional[VectorsManifest] = None

    def search_vectors(self, query_vectors: np.ndarray, top_k: int = 10, return_text: bool = False) -> SearchResult:
        """Ids and scores of the ``top_k`` best rows per query vector; ``return_text`` adds their stored text."""
        return self._result(*self.index.search_rows(query_vectors, top_k), return_text)

    def _result(self, scores: np.ndarray, rows: np.ndarray, return_text: bool) -> SearchResult:
        kept = [[int(r) for r in row if r >= 0] for row in rows]  # -1: fewer hits than top_k
        texts = None
        if return_text:
            found = self.texts_of({r for row in kept for r in row})
            texts = [[found[r] for r in row] for row in kept]
        return SearchResult(ids=[self.index.ids_of(r) for r in kept],
                            scores=[s[:len(r)].tolist() for s, r in zip(scores, kept)], texts=texts)

    def vectors_manifest(self) -> VectorsManifest:
        """The manifest of the vectors folder the index was built from (``FileNotFoundError`` if it moved;
        ``ValueError`` if it now holds other vectors). ``options["store_text"]``: whether texts were kept."""
        if self._vectors is None:
            made_by, folder = self.index.manifest.vectors, self.index.manifest.vectors["folder"]
            manifest = VectorsManifest.load(folder)
            if manifest.model_fingerprint != made_by["model_fingerprint"] or manifest.count != self.index.manifest.count:
                raise ValueError(f"{folder} no longer holds the vectors the index was built from ({manifest.count} "
                                 f"vectors of fingerprint {manifest.model_fingerprint}); rebuild the index")
            self._vectors = manifest
        return self._vectors

    def texts_of(self, rows: Iterable[int]) -> Dict[int, str]:
        """``{row: text}``: the stored corpus text of index rows, for vectors encoded with ``store_text=True``
        (``ValueError`` otherwise), read from the shards that hold them (:func:`.texts.stored_texts`)."""
        return stored_texts(self.index.manifest.vectors["folder"], rows, self.vectors_manifest())

    def search(self, queries: Union[str, Sequence[str]], top_k: int = 10, batch_size: int = 32,
               exact: bool = False, return_text: bool = False) -> SearchResult:
        """Top-``k`` ids and scores per query; ``exact=True`` searches every stored vector (shard by shard)
        instead of the index; ``return_text`` adds each hit's stored text (:meth:`texts_of`)."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        vectors = np.atleast_2d(self.model.encode_queries(texts, batch_size=batch_size, convert_to_numpy=True))
        if not exact:
            return self.search_vectors(vectors, top_k, return_text)
        folder = self.index.manifest.vectors["folder"]
        scores, rows = exact_search_shards(folder, vectors, top_k, normalize=self.index.manifest.normalized_here)
        return self._result(scores, rows, return_text)

    def run(self, queries: Dict[str, str], top_k: int = 100, exact: bool = False, batch_size: int = 32) -> Run:
        """A run ``{query id: {doc id: score}}`` (the input of :func:`~retrievals.evaluation.evaluate_run`)."""
        qids = list(queries)
        found = self.search([queries[q] for q in qids], top_k=top_k, batch_size=batch_size, exact=exact)
        return {qid: dict(zip(ids, scores)) for qid, ids, scores in zip(qids, found.ids, found.scores)}


def search(index_dir: str, queries: Union[str, Sequence[str]], top_k: int = 10, model: Any = None,
           nprobe: Optional[int] = None, **load_kwargs: Any) -> SearchResult:
    """``retrievals.search(index_dir, ["a question", ...], top_k=10)`` -> ids and scores per query.

    Encodes the queries with the model that made the index (or ``model``, checked against it) and
    searches the memory-mapped index. For many calls, build one :class:`Searcher`."""
    return Searcher(index_dir, model=model, nprobe=nprobe, **load_kwargs).search(queries, top_k)
