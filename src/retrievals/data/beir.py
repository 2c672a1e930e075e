"""BEIR-layout retrieval data: ``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/{split}.tsv``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List

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


def load_corpus(path: str) -> Dict[str, Dict[str, str]]:
    corpus: Dict[str, Dict[str, str]] = {}
    for line_no, rec in iter_jsonl(path):
        doc_id = str(rec.get("_id", ""))
        if not doc_id:
            raise ValueError(f"{path}:{line_no}: missing field '_id'")
        text = require_str(rec, "text", path, line_no, allow_empty=True)
        title = rec.get("title") or ""
        if not text.strip() and not str(title).strip():
            raise ValueError(f"{path}:{line_no}: document {doc_id!r} has empty 'title' and 'text'")
        corpus[doc_id] = {"title": str(title), "text": text}
    return corpus


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


def load_beir(data_dir: str, split: str = "test", with_corpus: bool = True) -> BeirDataset:
    """Load a BEIR folder; ``queries`` keeps only the queries judged in ``split``. ``with_corpus=False``
    leaves the corpus out (searching a built index needs only queries and qrels)."""
    if not os.path.isdir(data_dir):
        name = os.path.basename(os.path.normpath(data_dir)) or "scifact"
        raise FileNotFoundError(f"Data folder {data_dir!r} does not exist. " + BEIR_DOWNLOAD_HINT.format(name=name))
    corpus = load_corpus(_find(data_dir, "corpus.jsonl")) if with_corpus else {}
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
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels)
