"""Search a built index with a file of queries; write a TREC run file or JSONL.

    python -m retrievals.pipelines.search --index_dir IDX --queries queries.jsonl --output_file run.trec \\
        [--top_k 100 --nprobe 64 --exact_search] [--engine ray --num_workers 2]

Queries: JSONL with ``_id`` and ``text`` (BEIR ``queries.jsonl``), or a text file with one query per line
(ids are line numbers). Output: ``.trec`` / ``.txt`` (``qid Q0 docid rank score tag``) or ``.jsonl``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..data.jsonl import iter_jsonl, open_text, require_str
from ..index.search import Searcher, SearchResult
from .cli import run_cli


@dataclass
class SearchArguments:
    index_dir: str = field(metadata={"help": "Index folder built by retrievals.pipelines.index"})
    queries: str = field(metadata={"help": "JSONL of {_id, text} or a text file with one query per line"})
    output_file: str = field(metadata={"help": "Run file: .trec/.txt (TREC format) or .jsonl"})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Query encoder (default: the model that made the index; another one is refused)"})
    top_k: int = field(default=100)
    nprobe: Optional[int] = field(default=None, metadata={"help": "IVF lists searched per query"})
    exact_search: bool = field(default=False, metadata={"help": "Exact search over the stored vectors instead"})
    batch_size: int = field(default=32)
    engine: str = field(default="local", metadata={"help": "local, or ray: query batches across actors"})
    num_workers: int = field(default=2, metadata={"help": "Ray actors, each memory-mapping the index"})
    ray_address: Optional[str] = field(default=None)
    run_tag: str = field(default="retrievals")


def read_queries(path: str) -> Dict[str, str]:
    """``{query id: text}`` from JSONL (``_id``, ``text``) or from plain lines (ids "1", "2", ...)."""
    queries: Dict[str, str] = {}
    if path.endswith((".jsonl", ".jsonl.gz")):
        for line_no, record in iter_jsonl(path):
            qid = str(record.get("_id", record.get("id", "")))
            if not qid:
                raise ValueError(f"{path}:{line_no}: missing field '_id'")
            if qid in queries:
                raise ValueError(f"{path}:{line_no}: duplicate query id {qid!r}")
            queries[qid] = require_str(record, "text", path, line_no)
    else:
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    queries[str(line_no)] = line.strip()
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def write_run(path: str, queries: Dict[str, str], result: SearchResult, tag: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for (qid, text), ids, scores in zip(queries.items(), result.ids, result.scores):
            if path.endswith(".jsonl"):
                hits = [{"id": i, "score": float(s)} for i, s in zip(ids, scores)]
                f.write(json.dumps({"query_id": qid, "query": text, "results": hits}, ensure_ascii=False) + "\n")
            else:
                f.writelines(f"{qid} Q0 {i} {rank} {s:.6f} {tag}\n" for rank, (i, s) in enumerate(zip(ids, scores), 1))


def run_search(args: SearchArguments) -> SearchResult:
    queries = read_queries(args.queries)
    if args.engine == "ray":
        from ..index.ray_engine import search_with_ray

        if args.model_name_or_path or args.exact_search:
            raise ValueError("--engine ray searches the index with the model that made it: drop "
                             "--model_name_or_path / --exact_search, or use --engine local")
        result = search_with_ray(args.index_dir, list(queries.values()), top_k=args.top_k,
                                 num_workers=args.num_workers, ray_address=args.ray_address, nprobe=args.nprobe)
    elif args.engine == "local":
        searcher = Searcher(args.index_dir, model=args.model_name_or_path, nprobe=args.nprobe)
        result = searcher.search(list(queries.values()), top_k=args.top_k, batch_size=args.batch_size,
                                 exact=args.exact_search)
    else:
        raise ValueError(f"Unknown engine {args.engine!r}; valid engines are: local, ray")
    write_run(args.output_file, queries, result, args.run_tag)
    print(f"{len(queries)} queries, top {args.top_k}, written to {args.output_file}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([SearchArguments], run_search, argv)


if __name__ == "__main__":
    sys.exit(main())
