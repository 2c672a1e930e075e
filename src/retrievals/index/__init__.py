"""Corpora of any size: streamed encode to Parquet shards, a faiss index over them, and search.

Engines are optional and imported lazily: the local engine needs nothing more than the package;
``engine="ray"`` needs ``retrievals[ray]``.
"""

from ..data.corpus import CorpusOptions, CorpusReader
from .encode import encode_to_shards
from .encode_job import BatchEncoder, EncodeJob
from .faiss_index import LoadedIndex, build_index
from .manifest import VectorsManifest, model_fingerprint
from .search import Searcher, SearchResult, exact_search_shards, search
from .shards import iter_shards

__all__ = [
    "CorpusOptions", "CorpusReader", "BatchEncoder", "EncodeJob", "encode_to_shards", "LoadedIndex", "build_index",
    "VectorsManifest", "model_fingerprint", "Searcher", "SearchResult", "exact_search_shards", "search", "iter_shards",
]
