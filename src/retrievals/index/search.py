"""Search: one function behind the library, the command line, evaluation, mining and the server."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..evaluation.metrics import Run
from .exact import exact_search_shards
from .faiss_index import LoadedIndex, shards_digest
from .manifest import VectorsManifest, model_fingerprint
from .texts import stored_texts

__all__ = ["SearchResult", "Searcher", "search", "exact_search_shards"]

logger = logging.getLogger(__name__)


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
        ``ValueError`` if it now holds other vectors: another model, corpus or encode, by the shards'
        checksums). ``options["store_text"]``: whether texts were kept."""
        if self._vectors is None:
            made_by, folder = self.index.manifest.vectors, self.index.manifest.vectors["folder"]
            manifest = VectorsManifest.load(folder)
            digest = made_by.get("shards_digest")
            if manifest.model_fingerprint != made_by["model_fingerprint"] or manifest.count != self.index.manifest.count \
                    or (digest is not None and shards_digest(manifest) != digest):
                raise ValueError(f"{folder} no longer holds the vectors the index was built from (now {manifest.count} "
                                 f"vectors of fingerprint {manifest.model_fingerprint}, shards digest "
                                 f"{shards_digest(manifest)}; the index: {self.index.manifest.count} of "
                                 f"{made_by['model_fingerprint']}, {digest}); rebuild the index")
            self._vectors = manifest
        return self._vectors

    def texts_of(self, rows: Iterable[int]) -> Dict[int, str]:
        """``{row: text}``: the stored corpus text of index rows, for vectors encoded with ``store_text=True``
        (``ValueError`` otherwise), read from the shards that hold them (:func:`.texts.stored_texts`)."""
        return stored_texts(self.index.manifest.vectors["folder"], rows, self.vectors_manifest())

    def search(self, queries: Union[str, Sequence[str]], top_k: int = 10, batch_size: int = 32,
               exact: bool = False, return_text: bool = False) -> SearchResult:
        """Top-``k`` ids and scores per query (the model's similarity, as in-memory search); ``exact=True``
        searches every stored vector (shard by shard) instead of the index, with the same scores;
        ``return_text`` adds each hit's stored text (:meth:`texts_of`)."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        vectors = np.atleast_2d(self.model.encode_queries(texts, batch_size=batch_size, convert_to_numpy=True))
        if not exact:
            return self.search_vectors(vectors, top_k, return_text)
        folder = self.index.manifest.vectors["folder"]
        scores, rows = exact_search_shards(folder, vectors, top_k)
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
