"""BEIR-layout retrieval data: ``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/{split}.tsv``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .corpus import CorpusOptions, CorpusReader
from .jsonl import iter_jsonl, open_text, require_str

logger = logging.getLogger(__name__)

BEIR_DOWNLOAD_HINT = (
    "Get the data with: wget https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip "
    "&& unzip {name}.zip (or pass --data_dir pointing at a BEIR-layout folder)"
)


@dataclass
class BeirDataset:
    corpus: Dict[str, Dict[str, str]]  # doc id -> {"title", "text"}
    queries: Dict[str, str]  # query id -> text (only those with qrels in the split)
    qrels: Dict[str, Dict[str, int]]  # query id -> {doc id: relevance}
    empty_documents: int = 0  # documents with no title and no text (skipped, or embedded as "")

    def corpus_ids(self) -> List[str]:
        return list(self.corpus)

    def corpus_texts(self, sep: str = " ") -> List[str]:
        """``title + sep + text`` per document (just the text when the title is empty)."""
        return [(d["title"] + sep + d["text"]).strip() if d["title"] else d["text"] for d in self.corpus.values()]


def _find(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{os.path.join(data_dir, stem)} not found (BEIR layout expected)")


def corpus_file(data_dir: str) -> str:
    """The corpus file of a BEIR folder (``corpus.jsonl`` or ``corpus.jsonl.gz``)."""
    return _find(data_dir, "corpus.jsonl")


def read_corpus(path: str, empty_documents: str = "skip") -> Tuple[Dict[str, Dict[str, str]], int]:
    """``({doc id: {"title", "text"}}, number of empty documents)`` through the package's one corpus reader
    (:class:`~retrievals.data.corpus.CorpusReader`): its field checks, and its ``empty_documents`` policy."""
    reader = CorpusReader(path, CorpusOptions(empty_documents=empty_documents))
    corpus = {row.id: {"title": row.title, "text": row.body} for row in reader}
    reader.stats.report(path)
    return corpus, reader.stats.empty


def load_qrels(path: str) -> Dict[str, Dict[str, int]]:
    qrels: Dict[str, Dict[str, int]] = {}
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if line_no == 1 and parts[0] == "query-id":
                continue
            if not line.strip():
                continue
            if len(parts) != 3:
                raise ValueError(f"{path}:{line_no}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                score = int(float(parts[2]))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: field 'score' is not a number: {parts[2]!r}") from None
            qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


def load_beir(data_dir: str, split: str = "test", with_corpus: bool = True, empty_documents: str = "skip") -> BeirDataset:
    """Load a BEIR folder; ``queries`` keeps only the queries judged in ``split``. ``with_corpus=False``
    leaves the corpus out (searching a built index needs only queries and qrels). Empty documents are
    skipped with a logged count, embedded as ``""`` or refused (``empty_documents``: skip, embed, error)."""
    if not os.path.isdir(data_dir):
        name = os.path.basename(os.path.normpath(data_dir)) or "scifact"
        raise FileNotFoundError(f"Data folder {data_dir!r} does not exist. " + BEIR_DOWNLOAD_HINT.format(name=name))
    corpus, empty = read_corpus(_find(data_dir, "corpus.jsonl"), empty_documents) if with_corpus else ({}, 0)
    qrels = load_qrels(_find(os.path.join(data_dir, "qrels"), f"{split}.tsv"))
    queries_path = _find(data_dir, "queries.jsonl")
    queries = {}
    for line_no, rec in iter_jsonl(queries_path):
        qid = str(rec.get("_id", ""))
        if qid in qrels:
            queries[qid] = require_str(rec, "text", queries_path, line_no)
    missing = set(qrels) - set(queries)
    if missing:
        raise ValueError(f"{queries_path}: {len(missing)} judged queries missing, e.g. {sorted(missing)[:3]}")
    logger.info("Loaded %s: %d documents, %d %s queries", data_dir, len(corpus), len(queries), split)
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, empty_documents=empty)


DEV_KINDS = ("random", "disjoint")


def split_queries(data: BeirDataset, fraction: float = 0.2, seed: int = 0,
                  kind: str = "random") -> Tuple[BeirDataset, BeirDataset]:
    """``(rest, held_out)``: about ``fraction`` of ``data``'s judged queries held out (a dev split carved
    from train), both sharing the whole corpus. ``kind="random"``: a seeded sample of queries.
    ``kind="disjoint"``: whole groups of queries linked by a judged document, so no document judged for a
    held-out query is judged for a remaining one (a dev split that memorising documents cannot win)."""
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be in (0, 1), got {fraction}")
    if kind not in DEV_KINDS:
        raise ValueError(f"unknown dev split kind {kind!r}; valid: {', '.join(DEV_KINDS)}")
    import random

    ids = sorted(data.qrels)
    groups = [[q] for q in ids] if kind == "random" else _linked_queries(data.qrels, ids)
    random.Random(seed).shuffle(groups)
    target, held = round(fraction * len(ids)), set()
    for group in groups:
        if len(held) >= target:
            break
        held.update(group)
    if not held or len(held) == len(ids):
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(ids)} queries ({kind}): one split would be empty")

    def part(keep) -> BeirDataset:
        return BeirDataset(corpus=data.corpus, queries={q: t for q, t in data.queries.items() if keep(q)},
                           qrels={q: r for q, r in data.qrels.items() if keep(q)}, empty_documents=data.empty_documents)

    return part(lambda q: q not in held), part(lambda q: q in held)


def _linked_queries(qrels: Dict[str, Dict[str, int]], ids: List[str]) -> List[List[str]]:
    """Connected groups of queries, two queries linked when they judge a document in common."""
    parent = {q: q for q in ids}

    def root(q: str) -> str:
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    first_query: Dict[str, str] = {}
    for q in ids:
        for doc in qrels[q]:
            other = first_query.setdefault(doc, q)
            parent[root(q)] = root(other)
    groups: Dict[str, List[str]] = {}
    for q in ids:
        groups.setdefault(root(q), []).append(q)
    return list(groups.values())
