"""The Ray Data engine: a corpus encoded shard by shard in a pool of actors, and queries searched in one.

Same per-batch function (:class:`~retrievals.index.encode_job.BatchEncoder`), manifest and atomic shard
writes as the local engine; Ray only schedules. The driver stages each pending shard's rows in
``<output_dir>/_staging`` (one shard of text in memory at a time); a Ray Dataset holds one small item
per pending shard; each :class:`ShardWorker` actor (model loaded once) encodes its shard and writes
it; the driver records every finished shard in the manifest as it arrives, so a killed driver resumes
with the remainder only. A killed actor is restarted and its shard retried. Every path the actors get
is made absolute in the driver (their working directory is not the driver's on a cluster); every node must see
``output_dir`` (a shared filesystem). Ray is imported lazily: ``pip install 'retrievals[ray]'``.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from ..data.corpus import CorpusReader
from .encode_job import EncodeJob, finish
from .manifest import ShardInfo, VectorsManifest
from .search import SearchResult
from .shards import shard_ranges, to_stored, write_shard

logger = logging.getLogger(__name__)

INSTALL_HINT = "the Ray engine needs Ray Data, which is not installed: pip install 'retrievals[ray]'"
STAGING = "_staging"
INT8_CALIBRATION_ROWS = 1024
# The pool starts once every actor is up (else the first one ready takes all the work while the others
# still load, or a pool that cannot be placed waits silently): at most 10 minutes, then a timeout error.
DATA_CONTEXT = {"wait_for_min_actors_s": 600, "enable_progress_bars": False}
FAULTS_ENV = "RETRIEVALS_RAY_FAULTS"  # test hooks, JSON: {"pause_s": seconds, "die_once": marker path}


def import_ray():
    """``ray`` (with ``ray.data``), or an ImportError with the install hint."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


@dataclass
class RayReport:
    """What one Ray run did (``manifest.ray_report`` / ``result.ray_report``): seconds to start Ray and
    the pool, and per shard (or query batch) the actor's pid and node."""

    ray_start_s: float = 0.0
    first_result_s: float = 0.0  # from launching the pool to the first finished shard (actor start + load)
    wall_s: float = 0.0
    work: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def pids(self) -> List[int]:
        return sorted({int(w["pid"]) for w in self.work})


@contextmanager
def ray_session(num_workers: int, ray_address: Optional[str] = None, temp_dir: Optional[str] = None,
                report: Optional[RayReport] = None) -> Iterator[Any]:
    """Ray, started (a local cluster of ``num_workers + 1`` CPUs, temp files in ``temp_dir``) or connected
    to ``ray_address``; shut down on exit. A cluster needs more CPUs than workers: with exactly as many,
    Ray Data's own tasks never get one and the job hangs without an error. Ray's usage statistics are
    off unless ``RAY_USAGE_STATS_ENABLED`` says otherwise."""
    ray = import_ray()
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    ray_address = ray_address or os.environ.get("RAY_ADDRESS")
    started = time.perf_counter()
    owned_dir = None
    ours = not ray.is_initialized()
    quiet = "RAY_USAGE_STATS_ENABLED" not in os.environ  # no usage reports (nor their Prometheus queries)
    if quiet:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ours and ray_address is None:
        owned_dir = temp_dir or tempfile.mkdtemp(prefix="rtv-ray-")  # short: unix socket paths are limited
        ray.init(num_cpus=num_workers + 1, include_dashboard=False, _temp_dir=os.path.abspath(owned_dir),
                 logging_level=logging.WARNING)
    elif ours:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus <= num_workers:
            raise ValueError(f"the Ray cluster {ray_address or '(running)'} has {cpus:g} CPUs: {num_workers} workers "
                             f"need at least {num_workers + 1} (one is left for Ray Data's own tasks)")
        if report is not None:
            report.ray_start_s = round(time.perf_counter() - started, 2)
        with _data_context(ray):
            yield ray
    finally:
        if ours:
            ray.shutdown()
        if owned_dir and temp_dir is None:
            shutil.rmtree(owned_dir, ignore_errors=True)
        if quiet:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)


@contextmanager
def _data_context(ray) -> Iterator[None]:
    """Ray Data settings of :data:`DATA_CONTEXT` while a job runs; the caller's afterwards."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in DATA_CONTEXT}
    for name, value in DATA_CONTEXT.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _faults() -> Dict[str, Any]:
    faults = json.loads(os.environ.get(FAULTS_ENV) or "{}")
    return faults | ({"die_once": os.path.abspath(faults["die_once"])} if faults.get("die_once") else {})


class ShardWorker:
    """One actor: loads the model once, then for each item ``{"index", "first_row", "staging"}`` reads
    the staged rows, encodes them in chunks of ``chunk_rows`` and writes the shard atomically.
    Returns the :class:`ShardInfo` fields plus the actor's pid and node."""

    def __init__(self, job: EncodeJob, manifest: VectorsManifest, faults: Optional[Dict[str, Any]] = None) -> None:
        import ray

        started = time.perf_counter()
        self.job, self.manifest = job, manifest
        self.encoder = self.job.encoder()
        self.encoder.model  # noqa: B018 - loaded now, once per actor
        self.load_s = round(time.perf_counter() - started, 2)
        self.node = ray.get_runtime_context().get_node_id()
        self.faults = faults or {}

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out: Dict[str, list] = {}
        for index, first_row, staging in zip(batch["index"], batch["first_row"], batch["staging"]):
            started = time.perf_counter()
            info = self.encode_shard(int(index), int(first_row), str(staging))
            row = asdict(info) | {"pid": os.getpid(), "node": self.node, "load_s": self.load_s,
                                  "seconds": round(time.perf_counter() - started, 3)}
            for key, value in row.items():
                out.setdefault(key, []).append(value)
            self._inject_faults()
        return {key: np.asarray(values) for key, values in out.items()}

    def encode_shard(self, index: int, first_row: int, staging: str) -> ShardInfo:
        import pyarrow.parquet as pq

        table = pq.read_table(staging)
        ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
        step = self.job.chunk_rows
        vectors = [self.encoder({"id": ids[s:s + step], "text": texts[s:s + step]})["embedding"]
                   for s in range(0, len(ids), step)]
        stored = to_stored(np.concatenate(vectors), self.manifest)
        return write_shard(self.job.output_dir, index, first_row, ids, stored, texts if self.job.store_text else None)

    def _inject_faults(self) -> None:
        """Test hooks: pause after each shard; the first actor to create the ``die_once`` marker is
        SIGKILLed after writing its shard and before reporting it."""
        time.sleep(float(self.faults.get("pause_s", 0)))
        marker = self.faults.get("die_once")
        if not marker:
            return
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def _write_staging(path: str, ids: List[str], texts: List[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}), tmp)
    os.replace(tmp, path)


def stage_pending(job: EncodeJob, manifest: VectorsManifest, reader: CorpusReader, staging: str) -> List[Dict[str, Any]]:
    """Stream the corpus once and write each pending shard's rows to ``staging``; one item per pending
    shard. Reads every row (the skipped-record counts of ``reader.stats`` need the full pass)."""
    os.makedirs(staging, exist_ok=True)
    ranges = shard_ranges(manifest.total_rows, job.shard_size)
    done = {info.first_row for info in manifest.shards}
    items: List[Dict[str, Any]] = []
    ids: List[str] = []
    texts: List[str] = []
    for row in reader:
        index = row.row // job.shard_size
        first_row, end_row = ranges[index]
        if first_row in done:
            continue
        ids.append(row.id)
        texts.append(row.text)
        if row.row + 1 == end_row:
            path = os.path.join(staging, f"input-{index:05d}.parquet")
            _write_staging(path, ids, texts)
            items.append({"index": index, "first_row": first_row, "staging": path})
            ids, texts = [], []
    return items


def fix_int8_ranges(job: EncodeJob, manifest: VectorsManifest, first: Dict[str, Any]) -> None:
    """int8 ranges from the first rows of the first pending shard (one chunk, at least
    :data:`INT8_CALIBRATION_ROWS`), encoded here before any actor starts, so every actor quantises alike."""
    import pyarrow.parquet as pq

    from ..evaluation.quantized_search import int8_ranges

    table = pq.read_table(first["staging"]).slice(0, max(job.chunk_rows, INT8_CALIBRATION_ROWS))
    vectors = job.encoder()({"id": table.column("id").to_pylist(), "text": table.column("text").to_pylist()})["embedding"]
    starts, steps = int8_ranges(vectors)
    manifest.int8_ranges = {"starts": starts.tolist(), "steps": steps.tolist()}


def _record(manifest: VectorsManifest, row: Dict[str, Any], output_dir: str) -> bool:
    """Add one finished shard to the manifest and save it; False for a shard already recorded."""
    info = ShardInfo(name=str(row["name"]), rows=int(row["rows"]), first_row=int(row["first_row"]),
                     sha256=str(row["sha256"]), bytes=int(row["bytes"]))
    if any(s.first_row == info.first_row for s in manifest.shards):
        logger.warning("%s reported twice; keeping the first", info.name)
        return False
    manifest.shards.append(info)
    manifest.shards.sort(key=lambda s: s.first_row)
    manifest.save(output_dir)
    return True


def encode_with_ray(job: EncodeJob, manifest: VectorsManifest, reader: CorpusReader, num_workers: int = 2,
                    ray_address: Optional[str] = None, temp_dir: Optional[str] = None, num_gpus_per_worker: float = 0,
                    max_restarts: Optional[int] = None, show_progress: bool = True) -> VectorsManifest:
    """Encode the shards of ``job`` not yet in ``manifest`` with ``num_workers`` Ray actors; returns the
    finished manifest, with ``manifest.ray_report`` (a :class:`RayReport`).

    ``ray_address``: an existing cluster (``output_dir`` on a filesystem every node sees); else a local
    one with its temp files in ``temp_dir`` (a short path; a fresh temporary folder by default, removed
    afterwards). A killed actor is restarted and its shard retried: without limit by default (Ray Data's
    default), or up to ``max_restarts`` times (passed as Ray remote args, deprecated by Ray 2.60).
    Paths are made absolute here, in the driver: a cluster's actors run in another working directory."""
    import_ray()
    started = time.perf_counter()
    job = job.resolved()
    manifest.engine = "ray"
    staging = os.path.join(job.output_dir, STAGING)
    items = stage_pending(job, manifest, reader, staging)
    if items and job.dtype == "int8" and manifest.int8_ranges is None:
        fix_int8_ranges(job, manifest, items[0])
    manifest.save(job.output_dir)
    report = RayReport()
    if items:
        with ray_session(num_workers, ray_address, temp_dir, report) as ray:
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardWorker, batch_size=1, num_cpus=1, num_gpus=num_gpus_per_worker or None,
                compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(items)), max_tasks_in_flight_per_actor=1),
                fn_constructor_kwargs={"job": job, "manifest": replace(manifest, shards=[]), "faults": _faults()},
                **({} if max_restarts is None else {"max_restarts": max_restarts, "max_task_retries": max_restarts}))
            bar = tqdm(total=manifest.total_rows, initial=manifest.count, unit="texts", desc="Encoding corpus (ray)",
                       disable=not show_progress)
            launched = time.perf_counter()
            for row in ds.iter_rows():
                report.first_result_s = report.first_result_s or round(time.perf_counter() - launched, 2)
                if _record(manifest, row, job.output_dir):
                    report.work.append({k: row[k] for k in ("name", "pid", "node", "load_s", "seconds")})
                    bar.update(int(row["rows"]))
            bar.close()
    shutil.rmtree(staging, ignore_errors=True)
    for leftover in glob.glob(os.path.join(job.output_dir, "shard-*.parquet.tmp-*")):  # actors killed mid-write
        os.remove(leftover)
    report.wall_s = round(time.perf_counter() - started, 2)
    manifest = finish(job, manifest, reader)
    manifest.ray_report = report
    logger.info("ray: %d shards by %d actors (Ray start %.1f s, first shard after %.1f s, model load %s s, %.1f s in all)",
                len(report.work), len(report.pids), report.ray_start_s, report.first_result_s,
                sorted({w["load_s"] for w in report.work}), report.wall_s)
    return manifest


class SearchWorker:
    """One actor with the index opened memory-mapped (and the model that made it, for text queries)."""

    def __init__(self, index_dir: str, nprobe: Optional[int], texts: bool, top_k: int) -> None:
        from .faiss_index import LoadedIndex
        from .search import Searcher

        self.top_k, self.texts = top_k, texts
        self.searcher = Searcher(index_dir, nprobe=nprobe) if texts else None
        self.index = self.searcher.index if texts else LoadedIndex(index_dir)
        if not texts:
            self.index.set_nprobe(nprobe)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.texts:
            found = self.searcher.search([str(t) for t in batch["query"]], self.top_k)
        else:
            scores, ids = self.index.search(np.stack(batch["query"]), self.top_k)
            found = SearchResult(ids=ids, scores=[s[:len(i)].tolist() for s, i in zip(scores, ids)])
        hits = [json.dumps([i, s]) for i, s in zip(found.ids, found.scores)]  # ragged lists travel as JSON
        return {"pos": np.asarray(batch["pos"]), "hits": np.asarray(hits), "pid": np.full(len(hits), os.getpid())}


def search_with_ray(index_dir: str, queries: Union[np.ndarray, str, Sequence[str]], top_k: int = 10,
                    num_workers: int = 2, nprobe: Optional[int] = None, batch_size: int = 256,
                    ray_address: Optional[str] = None, temp_dir: Optional[str] = None) -> SearchResult:
    """Search ``queries`` (texts, or query vectors ``[q, d]``) in ``index_dir`` with ``num_workers`` actors,
    each holding the index memory-mapped; results in input order (``result.ray_report`` says who did what).
    ``index_dir`` is made absolute here, in the driver: a cluster's actors run in another working directory."""
    index_dir = os.path.abspath(index_dir)
    texts = not isinstance(queries, np.ndarray)
    queries = [queries] if isinstance(queries, str) else list(queries) if texts else np.atleast_2d(queries)
    items = [{"pos": i, "query": q} for i, q in enumerate(queries)]
    if not items:
        return SearchResult(ids=[], scores=[])
    report = RayReport()
    started = time.perf_counter()
    hits: Dict[int, list] = {}
    with ray_session(num_workers, ray_address, temp_dir, report) as ray:
        blocks = max(1, min(len(items), max(num_workers, math.ceil(len(items) / batch_size))))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            SearchWorker, batch_size=math.ceil(len(items) / blocks), num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=min(num_workers, blocks), max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={"index_dir": index_dir, "nprobe": nprobe, "texts": texts, "top_k": top_k})
        for row in ds.iter_rows():
            hits[int(row["pos"])] = json.loads(row["hits"])
            report.work.append({"pos": int(row["pos"]), "pid": int(row["pid"])})
    result = SearchResult(ids=[hits[i][0] for i in range(len(items))], scores=[hits[i][1] for i in range(len(items))])
    report.wall_s = round(time.perf_counter() - started, 2)
    result.ray_report = report
    return result
