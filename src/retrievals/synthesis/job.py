"""Stream a corpus through a generator and the filters, shard by shard, resumable, locally or on Ray.

    job = SynthesisJob(corpus="corpus.jsonl", output_dir="synthetic", template="claim", per_document=3)
    summary = run_job(job)                  # or run_job(job, num_workers=4, ray_address=...) on Ray

Layout of ``output_dir``: ``parts/part-NNNNN.jsonl`` (every generation of ``shard_size`` documents with its
verdict, written whole when the shard is done: a killed job resumes at the first missing part);
after the consistency filter (:mod:`.consistency`) ``queries.jsonl`` + ``qrels/train.tsv`` (a BEIR folder; a
JSONL corpus is linked in as ``corpus.jsonl``), ``generated.jsonl`` (every query, its document, its verdict)
and ``synthesis.json`` (settings, counts per filter, seconds, queries per second; ``done`` once complete).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..backends.store import write_json_atomic
from ..data.corpus import CorpusOptions, CorpusReader
from ..data.jsonl import iter_jsonl, write_jsonl
from .filters import FilterSettings, QueryFilter
from .templates import get_template

logger = logging.getLogger(__name__)
SUMMARY = "synthesis.json"


@dataclass
class SynthesisJob:
    corpus: str  # a corpus file or folder (JSONL, .gz, Parquet), or a BEIR folder with corpus.jsonl
    output_dir: str
    generator: str = "smollm2"
    gguf_file: Optional[str] = None
    template: str = "question"
    per_document: int = 3
    batch_size: int = 16  # documents per generate call
    shard_size: int = 256  # documents per part file: the unit of resume and of a Ray task
    document_max_tokens: int = 128
    max_new_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 25
    seed: int = 0
    max_documents: Optional[int] = None
    empty_documents: str = "skip"
    filters: FilterSettings = field(default_factory=FilterSettings)

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.per_document < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("per_document, batch_size and shard_size must be >= 1")
        if os.path.isdir(self.corpus) and os.path.exists(os.path.join(self.corpus, "queries.jsonl")):
            from ..data.beir import corpus_file

            self.corpus = corpus_file(self.corpus)

    def load_generator(self):
        from .generator import QueryGenerator

        return QueryGenerator.from_pretrained(
            self.generator, gguf_file=self.gguf_file, document_max_tokens=self.document_max_tokens,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def settings(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "output_dir"}


def part_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, "parts", f"part-{index:05d}.jsonl")


def shards(job: SynthesisJob) -> Iterator[Tuple[int, List[Tuple[str, str]]]]:
    """``(shard index, [(doc id, text)])`` in corpus order, through the package's one corpus reader."""
    reader = CorpusReader(job.corpus, CorpusOptions(empty_documents=job.empty_documents))
    rows: List[Tuple[str, str]] = []
    index, read = 0, 0
    for row in reader:
        if job.max_documents is not None and read >= job.max_documents:
            break
        rows.append((row.id, row.text))
        read += 1
        if len(rows) == job.shard_size:
            yield index, rows
            index, rows = index + 1, []
    if rows:
        yield index, rows
    reader.stats.report(job.corpus)


def generate_shard(generator, job: SynthesisJob, index: int, rows: List[Tuple[str, str]]) -> List[List[str]]:
    """Raw generations per document of one shard; seeded by (job seed, shard, batch): a resumed or
    re-distributed shard generates the same queries."""
    template, out = get_template(job.template), []
    for b in range(0, len(rows), job.batch_size):
        texts = [text for _, text in rows[b:b + job.batch_size]]
        out += generator.generate(texts, template, job.per_document,
                                  seed=job.seed * 1_000_003 + index * 1_009 + b // job.batch_size)
    return out


def _verdicts(query_filter: QueryFilter, rows: List[Tuple[str, str]], generations: List[List[str]]) -> List[dict]:
    records = []
    for (doc_id, text), raw in zip(rows, generations):
        for generated, (query, reason) in zip(raw, query_filter.check(raw, text)):
            records.append({"doc_id": doc_id, "query": query, "reason": reason, "raw": str(generated)})
    return records


def _done_parts(job: SynthesisJob) -> Tuple[set, QueryFilter]:
    """Shards already written, and a filter that has seen their kept queries (de-duplication goes on)."""
    folder = os.path.join(job.output_dir, "parts")
    done, kept = set(), []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith("part-") and name.endswith(".jsonl"):
                done.add(int(name[5:10]))
                kept += [r["query"] for _, r in iter_jsonl(os.path.join(folder, name)) if r["reason"] is None]
    return done, QueryFilter(job.filters, seen=kept)


def _check_settings(job: SynthesisJob) -> None:
    """A resumed job must have the settings of the parts it goes on from."""
    path, parts = os.path.join(job.output_dir, SUMMARY), os.path.join(job.output_dir, "parts")
    if not os.path.exists(path) or not any(name.endswith(".jsonl") for name in os.listdir(parts)):
        return  # nothing generated yet (e.g. a first run stopped by a wrong generator path): any settings go
    with open(path, encoding="utf-8") as f:
        before = json.load(f).get("settings", {})
    changed = sorted(k for k, v in job.settings().items() if k != "max_documents" and before.get(k, v) != v)
    if changed:
        raise ValueError(f"{job.output_dir} holds a synthesis made with other settings ({', '.join(changed)}); "
                         "use another --output_dir or delete it")


def generate_all(job: SynthesisJob, num_workers: int = 0, ray_address: Optional[str] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Generate and filter every shard not yet written; returns ``{"documents", "generated", "seconds",
    "counts"}`` of this run (counts: every verdict of every part, resumed ones included)."""
    from .generator import resolve_generator

    resolve_generator(job.generator, job.gguf_file)  # a wrong path fails here, before anything is written
    os.makedirs(os.path.join(job.output_dir, "parts"), exist_ok=True)
    _check_settings(job)
    write_json_atomic(os.path.join(job.output_dir, SUMMARY), {"settings": job.settings(), "done": False})
    done, query_filter = _done_parts(job)
    start, documents, generated = time.perf_counter(), 0, 0
    pending = ((i, rows) for i, rows in shards(job) if i not in done)
    if done:
        logger.info("resuming: %d shards already written in %s", len(done), job.output_dir)
    if num_workers:
        from .ray_generation import generate_with_ray

        results = generate_with_ray(job, generate_shard, pending, num_workers, ray_address)
    else:
        generator = job.load_generator()
        results = ((i, rows, generate_shard(generator, job, i, rows)) for i, rows in pending)
    for index, rows, generations in results:
        write_jsonl(part_path(job.output_dir, index), _verdicts(query_filter, rows, generations))
        documents += len(rows)
        generated += sum(len(g) for g in generations)
        if progress is not None:
            progress(documents, generated)
        logger.info("shard %d: %d documents, %d queries in %.0f s (%.2f queries/s)", index, documents, generated,
                    time.perf_counter() - start, generated / max(time.perf_counter() - start, 1e-9))
    return {"documents": documents, "generated": generated, "seconds": round(time.perf_counter() - start, 1)}


def read_parts(output_dir: str) -> List[dict]:
    folder = os.path.join(output_dir, "parts")
    return [r for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")
            for _, r in iter_jsonl(os.path.join(folder, name))]


def write_outputs(job: SynthesisJob, records: List[dict], run: Dict[str, Any]) -> Dict[str, Any]:
    """The BEIR folder of the kept queries (``queries.jsonl``, ``qrels/train.tsv``, ``corpus.jsonl`` linked
    to a JSONL corpus), ``generated.jsonl`` and the summary with the count of each verdict; returns it."""
    out = job.output_dir
    kept = [r for r in records if r["reason"] is None]
    for n, r in enumerate(kept):
        r["query_id"] = f"synth-{n}"
    write_jsonl(os.path.join(out, "generated.jsonl"), records)
    write_jsonl(os.path.join(out, "queries.jsonl"), ({"_id": r["query_id"], "text": r["query"]} for r in kept))
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    tmp = os.path.join(out, "qrels", "train.tsv.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{r['query_id']}\t{r['doc_id']}\t1\n" for r in kept)
    os.replace(tmp, os.path.join(out, "qrels", "train.tsv"))
    if os.path.isfile(job.corpus) and job.corpus.endswith((".jsonl", ".jsonl.gz")):
        link = os.path.join(out, "corpus.jsonl" + (".gz" if job.corpus.endswith(".gz") else ""))
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(job.corpus), link)
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["reason"] or "kept"] = counts.get(r["reason"] or "kept", 0) + 1
    documents = len({r["doc_id"] for r in records})
    summary = {"settings": job.settings(), "done": True, "documents": documents, "generated": len(records),
               "kept": len(kept), "documents_with_a_query": len({r["doc_id"] for r in kept}), "counts": counts,
               "pass_rate": round(len(kept) / max(len(records), 1), 4), "this_run": run,
               "queries_per_second": round(run["generated"] / run["seconds"], 3) if run["seconds"] else None}
    write_json_atomic(os.path.join(out, SUMMARY), summary)
    return summary


def is_done(output_dir: str) -> bool:
    path = os.path.join(output_dir, SUMMARY)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return bool(json.load(f).get("done"))
