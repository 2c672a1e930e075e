"""deploy/: the Kubernetes manifests validate against the official schemas and agree with the server; the
Dockerfile's command parses; two replicas behind the real haproxy lose no request when one is stopped;
``serve --workers N`` shares one port."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from processes import run, running
from retrievals import AutoModelForEmbedding
from test_serving_cli import RETRIEVALS, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def manifests():
    docs = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
        with open(path) as f:
            docs += [(os.path.basename(path), doc) for doc in yaml.safe_load_all(f) if doc]
    return docs


def serve_args(args):
    from transformers import HfArgumentParser

    from retrievals.pipelines.serve import ServeArguments, flags
    from retrievals.serving import ServerConfig

    return HfArgumentParser([ServeArguments, ServerConfig]).parse_args_into_dataclasses(args=flags(args))


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_manifests_validate_against_the_kubernetes_schemas(version):
    import kubernetes_validate

    docs = manifests()
    assert {doc["kind"] for _, doc in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for _, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown or mistyped field
    broken = dict(docs[0][1], spec={"replicas": "two"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_manifests_agree_with_the_server(tiny_bert_dir):
    from retrievals.serving import create_app
    from retrievals.serving.metrics import ServerMetrics

    kinds = {doc["kind"]: doc for _, doc in manifests()}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    serve, _ = serve_args(container["args"])
    assert container["ports"][0]["containerPort"] == serve.port and serve.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 30  # preStop, then the server's 30 s drain
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert re.search(rf"^# TYPE {metric} gauge$", ServerMetrics().render(), re.M)
    assert metric in kinds["ConfigMap"]["data"]["config.yaml"]
    assert create_app(AutoModelForEmbedding.from_pretrained(tiny_bert_dir)) is not None  # the app the image serves


def test_dockerfile_runs_the_serve_command():
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entry == ["retrievals", "serve"]
    serve, _ = serve_args(cmd)
    assert (serve.model_name_or_path, serve.host, serve.port) == ("/model", "0.0.0.0", 8000)
    assert f"EXPOSE {serve.port}" in text and "/health" in text and "USER 1000" in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        assert all(os.path.exists(os.path.join(ROOT, p)) for p in source.split()), source


def test_haproxy_config_is_valid():
    env = dict(os.environ, RETRIEVALS_BIND="127.0.0.1:1", RETRIEVALS_REPLICA_1="127.0.0.1:2",
               RETRIEVALS_REPLICA_2="127.0.0.1:3")
    cfg = os.path.join(DEPLOY, "haproxy", "haproxy.cfg")
    result = subprocess.run(["haproxy", "-c", "-f", cfg], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "Configuration file is valid" in result.stdout + result.stderr
    missing = subprocess.run(["haproxy", "-c", "-f", cfg], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "RETRIEVALS_REPLICA_2"})
    assert missing.returncode != 0  # an unset replica address is an error, not a silent default


@contextlib.contextmanager
def served(model_dir, port, *extra, log=None):
    """A ``retrievals serve`` process, healthy; stopped with its workers when the block ends, however it ends."""
    with running([RETRIEVALS, "serve", model_dir, "--port", str(port), "--log_level", "info",
                  "--served_model_name", "m", *extra], stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                 env=dict(os.environ, OMP_NUM_THREADS="1")) as proc:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield proc


def wait_healthy(url, proc=None, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc is None or proc.poll() is None, f"server exited with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy")


def gauge(url, name):
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def texts_for(client, n):
    words = "cat dog fish sky sun moon ocean blue red green".split()
    return [f"the {words[(client + i) % 10]} and the {words[(3 * client + 7 * i) % 10]} {words[i % 10]}" for i in range(n)]


@pytest.mark.slow
def test_two_replicas_behind_haproxy_lose_nothing_when_one_stops(tiny_bert_dir, tmp_path):
    ports = [free_port(), free_port()]
    lb_port = free_port()
    env = dict(os.environ, RETRIEVALS_BIND=f"127.0.0.1:{lb_port}", RETRIEVALS_REPLICA_1=f"127.0.0.1:{ports[0]}",
               RETRIEVALS_REPLICA_2=f"127.0.0.1:{ports[1]}")
    lb = f"http://127.0.0.1:{lb_port}"
    with contextlib.ExitStack() as stack:  # every process is stopped, however the test ends
        logs = [stack.enter_context(open(tmp_path / f"replica{i}.log", "w")) for i in (1, 2)]
        replicas = [stack.enter_context(served(tiny_bert_dir, p, *extra, log=log))
                    for p, log, extra in zip(ports, logs, [(), ("--max_batch_size", "4", "--backend", "torch")])]
        stack.enter_context(running(["haproxy", "-db", "-f", os.path.join(DEPLOY, "haproxy", "haproxy.cfg")], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_healthy(lb)
        results, failures, sent = {}, [], [0]
        lock = threading.Lock()

        def client(c):
            with httpx.Client(base_url=lb, timeout=60) as http:
                for i, text in enumerate(texts_for(c, 25)):
                    try:
                        r = http.post("/v1/embeddings", json={"input": [text], "model": "m"})
                        r.raise_for_status()
                        results[(c, i)] = (text, r.json()["data"][0]["embedding"])
                    except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                        failures.append(f"{c}/{i}: {err!r}")
                    with lock:
                        sent[0] += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        while sent[0] < 60:
            time.sleep(0.01)
        stopped_url = f"http://127.0.0.1:{ports[1]}"
        before_stop = gauge(stopped_url, "retrievals_embeddings_total")
        # a long request straight to the replica (batches of 4, on torch: slow enough to be seen in flight),
        # admitted before SIGTERM: it must still be answered
        long_texts = texts_for(99, 256)
        in_flight = {}

        def long_request():
            r = httpx.post(stopped_url + "/v1/embeddings", json={"input": long_texts, "model": "m"}, timeout=60)
            in_flight.update(r=r, answered=time.monotonic())

        direct = threading.Thread(target=long_request)
        direct.start()
        while gauge(stopped_url, "retrievals_capacity_in_use") <= 16:  # the 8 clients hold at most 8 texts
            assert direct.is_alive(), "the long request ended before it was seen in flight"
        killed = time.monotonic()
        replicas[1].send_signal(signal.SIGTERM)
        for t in threads + [direct]:
            t.join(timeout=120)
        assert replicas[1].wait(timeout=60) == 0  # a graceful stop
        assert failures == [] and len(results) == 200
        assert in_flight["r"].status_code == 200 and len(in_flight["r"].json()["data"]) == 256
        assert in_flight["answered"] > killed  # it was in flight at the signal and the replica finished it
        assert before_stop > 0  # both replicas served traffic
        assert gauge(f"http://127.0.0.1:{ports[0]}", "retrievals_embeddings_total") > 0
        model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir)
        texts = [text for text, _ in results.values()] + long_texts
        got = np.array([v for _, v in results.values()] + [d["embedding"] for d in in_flight["r"].json()["data"]])
        local = model.encode(texts)
        assert (np.sum(got * local, axis=1)).min() >= 0.9999
        assert "stopped by signal 15" in open(tmp_path / "replica2.log").read()


@pytest.mark.slow
def test_serve_workers_share_one_port(tiny_bert_dir, tmp_path):
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log, served(tiny_bert_dir, port, "--workers", "2", log=log) as proc:
        url = f"http://127.0.0.1:{port}"
        pids = {httpx.get(url + "/info", timeout=10).json()["pid"] for _ in range(40)}  # a new connection each
        assert len(pids) == 2 and proc.pid not in pids
        texts = texts_for(1, 16)
        got = np.array([d["embedding"] for d in httpx.post(
            url + "/v1/embeddings", json={"input": texts, "model": "m"}, timeout=60).json()["data"]])
        local = AutoModelForEmbedding.from_pretrained(tiny_bert_dir).encode(texts)
        assert np.sum(got * local, axis=1).min() >= 0.9999
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    output = open(tmp_path / "serve.log").read()
    assert output.count("stopped by signal 15") == 2 and "worker 1 started" in output
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_serve_workers_refuses_zero():
    result = run([RETRIEVALS, "serve", "/nonexistent", "--workers", "0"], timeout=60)
    assert result.returncode == 2 and "--workers must be >= 1, got 0" in result.stderr


def test_serve_workers_on_a_taken_port_fail_before_loading(tiny_bert_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run([RETRIEVALS, "serve", tiny_bert_dir, "--port", str(port), "--workers", "2"], timeout=120)
    assert result.returncode == 2 and "worker 0 started" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def serve_exit(args, timeout=120):
    """``(exit status, output)`` of ``retrievals serve ARGS``; ``None`` if it still runs after ``timeout`` s
    (then it is stopped, workers included)."""
    try:
        result = run([RETRIEVALS, "serve", *args], timeout=timeout, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        return None, ""
    return result.returncode, result.stdout


@pytest.mark.slow
def test_a_second_server_on_a_workers_port_fails_before_loading(tiny_bert_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "first.log", "w") as log, served(tiny_bert_dir, port, "--workers", "2", log=log) as first:
        pids = {httpx.get(url + "/info", timeout=10).json()["pid"] for _ in range(30)}
        assert len(pids) == 2
        for extra in (("--workers", "2"), ()):
            code, output = serve_exit([tiny_bert_dir, "--port", str(port), *extra], timeout=60)
            assert code == 2, output
            assert output.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
            assert "worker 0 started" not in output and "Loading weights" not in output  # before any model loads
        assert {httpx.get(url + "/info", timeout=10).json()["pid"] for _ in range(30)} == pids  # the first serves on
        assert first.poll() is None


@pytest.fixture(scope="module")
def nan_model_dir(tiny_bert_dir, tmp_path_factory):
    """A saved model whose weights are NaN: it loads, but fails the server's warm-up check."""
    import torch
    from transformers import BertModel

    path = str(tmp_path_factory.mktemp("nan_bert"))
    model = BertModel.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        for weight in model.parameters():
            weight.fill_(float("nan"))
    model.save_pretrained(path)
    AutoModelForEmbedding.from_pretrained(tiny_bert_dir).tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_failing_the_warm_up_exits_with_status_3(nan_model_dir, workers):
    code, output = serve_exit([nan_model_dir, "--port", str(free_port()), "--workers", str(workers)], timeout=90)
    assert code == 3, output[-3000:]
    assert "model returned non-finite values" in output
    assert "restarting" not in output
    if workers > 1:
        assert re.match(r"error: worker [01] failed to start \(exit status 3\)", output.strip().splitlines()[-1])
