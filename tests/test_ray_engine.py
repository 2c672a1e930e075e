"""The Ray Data engine (issue 11): shards encoded by actors equal the local engine, survive a killed actor,
a killed driver and a lost node; search in actors equals one process; Ray stays optional."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from processes import one_ray_at_a_time, running
from retrievals import AutoModelForEmbedding
from retrievals.index import EncodeJob, LoadedIndex, Searcher, VectorsManifest, build_index, encode_to_shards
from test_index import all_vectors, write_corpus

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
FAULTS_ENV = "RETRIEVALS_RAY_FAULTS"  # ray_engine.FAULTS_ENV (not imported: the module is optional)
N_ROWS, SHARD = 64, 8  # 8 shards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import _save_tiny_bert

    path = _save_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert_ray")))
    AutoModelForEmbedding.from_pretrained(path, pooling_method="mean").save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_ray_at_a_time():
    with one_ray_at_a_time():
        yield


@pytest.fixture
def ray_tmp():
    """Ray's temp dir for one test: short (unix socket paths are limited), removed afterwards."""
    path = tempfile.mkdtemp(prefix="rt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def job(corpus, out, model_dir, dtype="float32"):
    return EncodeJob(corpus=corpus, output_dir=str(out), model_name_or_path=model_dir, precision="fp32",
                     shard_size=SHARD, chunk_rows=3, dtype=dtype)


def ray_processes(tag: str) -> set:
    """Pids of Ray processes: named ray::... (workers), raylet or gcs_server, or started with ``tag``."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and (cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd or tag in cmd):
            found.add(int(pid))
    return found


def assert_ray_gone(before: set, tag: str, actors, within: float = 10.0) -> float:
    """No Ray process started by the job (its actors included) is alive ``within`` seconds after it;
    returns the seconds they took to go."""
    started = time.time()
    while True:
        left = ray_processes(tag) - before
        if not left or time.time() > started + within:
            break
        time.sleep(0.5)
    assert not left, f"Ray processes alive {within:g} s after the job: {sorted(left)}"
    assert not set(actors) & ray_processes(tag)
    return time.time() - started


def check_ids_once(folder, rows) -> None:
    ids, _ = all_vectors(folder)
    assert ids == [r["_id"] for r in rows] and len(set(ids)) == len(rows)
    assert not os.path.exists(os.path.join(folder, "_staging")) and not [f for f in os.listdir(folder) if ".tmp" in f]


@pytest.mark.slow
def test_two_actors_equal_one_process(model_dir, tmp_path, ray_tmp):
    corpus, rows = write_corpus(tmp_path / "corpus.jsonl", n=N_ROWS)
    before = ray_processes(ray_tmp)
    manifest = encode_to_shards(job(corpus, tmp_path / "vec", model_dir), engine="ray", num_workers=2,
                                temp_dir=ray_tmp, show_progress=False)
    report = manifest.ray_report
    assert manifest.complete and manifest.engine == "ray" and len(manifest.shards) == N_ROWS // SHARD
    assert len(report.work) == 8 and len(report.pids) == 2, report  # both actors got shards
    check_ids_once(str(tmp_path / "vec"), rows)
    _, vectors = all_vectors(str(tmp_path / "vec"))
    expected = AutoModelForEmbedding.from_pretrained(model_dir, precision="fp32").encode_corpus(
        [{"title": r["title"], "text": r["text"]} for r in rows])
    cos = (vectors * expected).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.99999
    gone = assert_ray_gone(before, ray_tmp, report.pids)
    print(f"ray start {report.ray_start_s} s, first shard {report.first_result_s} s, wall {report.wall_s} s, "
          f"Ray processes gone {gone:.1f} s after the job; model load {sorted({w['load_s'] for w in report.work})} s")


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_its_shard_retried(model_dir, tmp_path, ray_tmp, monkeypatch):
    corpus, rows = write_corpus(tmp_path / "corpus.jsonl", n=N_ROWS, seed=2)
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"die_once": str(marker)}))  # SIGKILL after its first shard
    manifest = encode_to_shards(job(corpus, tmp_path / "vec", model_dir), engine="ray", temp_dir=ray_tmp,
                                show_progress=False)
    dead = int(marker.read_text())
    assert dead not in manifest.ray_report.pids and len(manifest.ray_report.work) == 8
    check_ids_once(str(tmp_path / "vec"), rows)


DRIVER = """
import sys
from retrievals.index import EncodeJob, encode_to_shards
corpus, out, model, tmp = sys.argv[1:]
encode_to_shards(EncodeJob(corpus=corpus, output_dir=out, model_name_or_path=model, precision="fp32", shard_size={shard},
                           chunk_rows=3, dtype="int8"), engine="ray", temp_dir=tmp, show_progress=False)
"""


def shards_listed(folder) -> int:
    try:
        return len(VectorsManifest.load(str(folder)).shards)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_remainder(model_dir, tmp_path, ray_tmp):
    """int8 shards: the ranges are fixed before the first launch and kept by the resumed run."""
    corpus, rows = write_corpus(tmp_path / "corpus.jsonl", n=N_ROWS, seed=3)
    before = ray_processes(ray_tmp)
    env = os.environ | {"PYTHONPATH": SRC, FAULTS_ENV: json.dumps({"pause_s": 1.0}), "OMP_NUM_THREADS": "1"}
    # the driver is SIGKILLed, then the Ray processes it started (its process group) are, when the block ends
    with running([sys.executable, "-c", DRIVER.format(shard=SHARD), corpus, str(tmp_path / "vec"), model_dir, ray_tmp],
                 first=signal.SIGKILL, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as driver:
        deadline = time.time() + 150
        while shards_listed(tmp_path / "vec") < 2 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        driver.kill()
        driver.wait()
    print(f"the killed driver's Ray processes went in {assert_ray_gone(before, ray_tmp, [], within=30):.1f} s")
    partial = VectorsManifest.load(str(tmp_path / "vec"))
    assert 2 <= len(partial.shards) < 8 and not partial.complete and partial.int8_ranges
    manifest = encode_to_shards(job(corpus, tmp_path / "vec", model_dir, dtype="int8"), engine="ray", temp_dir=ray_tmp,
                                show_progress=False)
    second = {w["name"] for w in manifest.ray_report.work}
    assert len(second) == 8 - len(partial.shards) and not second & {s.name for s in partial.shards}
    assert manifest.int8_ranges == partial.int8_ranges
    check_ids_once(str(tmp_path / "vec"), rows)
    _, stored = all_vectors(str(tmp_path / "vec"))
    floats = AutoModelForEmbedding.from_pretrained(model_dir, precision="fp32").encode_corpus(
        [{"title": r["title"], "text": r["text"]} for r in rows])
    assert ((stored * floats).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(floats, axis=1)).min() > 0.95


@pytest.mark.slow
def test_a_lost_worker_node_does_not_lose_shards(model_dir, tmp_path, ray_tmp, monkeypatch):
    from ray.cluster_utils import Cluster

    corpus, rows = write_corpus(tmp_path / "corpus.jsonl", n=N_ROWS, seed=4)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"pause_s": 1.0}))
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # the nodes' files (and Cluster's address file) go there
    os.makedirs(os.path.join(ray_tmp, "ray"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    worker = cluster.add_node(num_cpus=2)
    removed_at = []

    def remove_when_started() -> None:
        deadline = time.time() + 150
        while shards_listed(tmp_path / "vec") < 1 and time.time() < deadline:
            time.sleep(0.1)
        removed_at.append(shards_listed(tmp_path / "vec"))
        cluster.remove_node(worker)

    watcher = threading.Thread(target=remove_when_started, daemon=True)
    watcher.start()
    try:
        manifest = encode_to_shards(job(corpus, tmp_path / "vec", model_dir), engine="ray", num_workers=2,
                                    ray_address=cluster.address, show_progress=False)
        watcher.join(30)
    finally:
        cluster.shutdown()
    assert removed_at and removed_at[0] < 8, removed_at  # the node went away mid-job
    nodes = [w["node"] for w in manifest.ray_report.work]
    print(f"removed at {removed_at[0]} shards; shards per node {[nodes.count(n) for n in set(nodes)]}, "
          f"pids {manifest.ray_report.pids}")
    assert worker.node_id in nodes and len(manifest.shards) == 8  # the lost node had worked, then the head finished
    check_ids_once(str(tmp_path / "vec"), rows)


@pytest.mark.slow
def test_search_with_ray_equals_one_process(model_dir, tmp_path, ray_tmp):
    from retrievals.index.ray_engine import search_with_ray

    corpus, rows = write_corpus(tmp_path / "corpus.jsonl", n=120, seed=5)
    encode_to_shards(job(corpus, tmp_path / "vec", model_dir), show_progress=False)
    build_index(str(tmp_path / "vec"), str(tmp_path / "idx"))
    _, matrix = all_vectors(str(tmp_path / "vec"))
    queries = matrix[:30] + 0.01
    found = search_with_ray(str(tmp_path / "idx"), queries, top_k=5, num_workers=2, batch_size=8, temp_dir=ray_tmp)
    scores, ids = LoadedIndex(str(tmp_path / "idx")).search(queries, 5)
    assert found.ids == ids and len(found.ray_report.pids) == 2
    np.testing.assert_allclose(found.scores, scores, rtol=0, atol=1e-6)
    texts = [f"{r['title']} {r['text']}" for r in rows[:12]] + ["cat dog", "blue ocean"]
    (tmp_path / "queries.txt").write_text("\n".join(texts) + "\n")
    from retrievals.pipelines import search as search_cli  # the command line's --engine ray (texts)

    assert search_cli.main(["--index_dir", str(tmp_path / "idx"), "--queries", str(tmp_path / "queries.txt"),
                            "--output_file", str(tmp_path / "run.jsonl"), "--top_k", "4", "--engine", "ray"]) == 0
    by_text = [json.loads(line)["results"] for line in open(tmp_path / "run.jsonl")]
    local = Searcher(str(tmp_path / "idx")).search(texts, top_k=4)
    assert [[h["id"] for h in hits] for hits in by_text] == local.ids and by_text[0][0]["id"] == rows[0]["_id"]
    np.testing.assert_allclose([[h["score"] for h in hits] for hits in by_text], local.scores, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_relative_paths_when_the_actors_run_elsewhere(model_dir, tmp_path, ray_tmp, monkeypatch):
    """A cluster whose workers' cwd is not the driver's (``--ray_address``; here a working_dir runtime env):
    relative corpus, output_dir, model and index_dir are resolved in the driver (issue 21, item 7)."""
    import ray

    from retrievals.index.ray_engine import search_with_ray

    corpus, rows = write_corpus(tmp_path / "corpus.jsonl", n=2 * SHARD, seed=6)
    os.symlink(model_dir, tmp_path / "model")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "README").write_text("the actors' working directory\n")
    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING",
             runtime_env={"working_dir": str(tmp_path / "elsewhere")})
    try:
        def cwd() -> str:  # a nested function: Ray ships it by value
            return os.getcwd()

        actor_cwd = ray.get(ray.remote(cwd).remote())
        assert os.path.realpath(actor_cwd) != os.path.realpath(tmp_path)
        manifest = encode_to_shards(job("corpus.jsonl", "vec", "model"), engine="ray", num_workers=1,
                                    show_progress=False)
        assert manifest.complete and len(manifest.ray_report.work) == 2
        check_ids_once(str(tmp_path / "vec"), rows)
        build_index("vec", "idx")
        _, matrix = all_vectors(str(tmp_path / "vec"))
        found = search_with_ray("idx", matrix[:4] + 0.01, top_k=3, num_workers=1, batch_size=2)
        scores, ids = LoadedIndex(str(tmp_path / "idx")).search(matrix[:4] + 0.01, 3)
        assert found.ids == ids and found.ids[0][0] == rows[0]["_id"]
        np.testing.assert_allclose(found.scores, scores, rtol=0, atol=1e-6)
    finally:
        ray.shutdown()


def test_ray_engine_without_ray_names_the_install_hint(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    corpus, _ = write_corpus(tmp_path / "corpus.jsonl", n=10)
    with pytest.raises(ImportError, match=r"^the Ray engine needs Ray Data.*pip install 'retrievals\[ray\]'$"):
        encode_to_shards(job(corpus, tmp_path / "vec", model_dir), engine="ray", show_progress=False)
    assert not (tmp_path / "vec").exists()  # refused before any work


def test_importing_retrievals_does_not_import_ray():
    code = "import sys, retrievals, retrievals.index; assert 'ray' not in sys.modules, 'ray imported'"
    env = os.environ | {"PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
