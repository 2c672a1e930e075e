"""`retrievals serve`: startup failures are one-line errors; a saved model serves with its own config."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from processes import run, running

RETRIEVALS = os.path.join(os.path.dirname(sys.executable), "retrievals")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([RETRIEVALS, "serve", *args], timeout=timeout)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    result = run_serve(str(tmp_path / "missing"), "--port", str(free_port()))
    assert result.returncode == 2
    assert last_line(result.stderr).startswith("error: Model path") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_one_line_error(tiny_bert_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_serve(tiny_bert_dir, "--port", str(port))
    assert result.returncode == 2
    assert last_line(result.stderr) == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_truncated_weights_refuse_to_serve(tiny_bert_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_serve(str(broken), "--port", str(free_port()))
    assert result.returncode != 0
    assert last_line(result.stderr).startswith("error:") and "Traceback" not in result.stderr


def test_bad_settings_and_unknown_command(tiny_bert_dir):
    result = run_serve(tiny_bert_dir, "--port", str(free_port()), "--max_batch_tokens", "8")
    assert result.returncode == 2 and "max_batch_tokens (8) < the model's max input length" in result.stderr
    result = run([RETRIEVALS, "nope"], timeout=60)
    assert result.returncode == 2 and "unknown command 'nope'" in result.stderr


@pytest.mark.slow
def test_saved_model_serves_openai_clients_and_shuts_down_gracefully(minilm_dir, tmp_path):
    from retrievals import AutoModelForEmbedding

    model = AutoModelForEmbedding.from_pretrained(minilm_dir, query_instruction="query: ", precision="fp32")
    saved = tmp_path / "minilm-query"
    model.save_pretrained(saved)
    port = free_port()
    env = {**os.environ, "RETRIEVALS_API_KEY": "k3y", "OMP_WAIT_POLICY": "PASSIVE"}
    with open(tmp_path / "serve.log", "w") as log, running(
            [RETRIEVALS, "serve", str(saved), "--port", str(port), "--precision", "fp32"], env=env, stdout=log,
            stderr=subprocess.STDOUT) as proc:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["minilm-query"]
        docs = ["The ocean covers most of the Earth.", "Proteins fold into three-dimensional shapes."]
        for fmt in ("float", openai.NOT_GIVEN):  # the SDK's default asks for base64 and decodes it
            got = np.array([d.embedding for d in client.embeddings.create(
                input=docs, model="minilm-query", encoding_format=fmt).data])
            assert (got * model.encode_corpus(docs)).sum(1).min() > 0.9999
        query = client.embeddings.create(input="how big is the ocean", model="minilm-query",
                                         extra_body={"input_type": "query"})
        reference = model.encode_queries("how big is the ocean")
        assert float(np.dot(query.data[0].embedding, reference)) > 0.9999
        assert float(np.dot(query.data[0].embedding, model.encode("how big is the ocean"))) < 0.9999

        # SIGTERM with a request in flight: it completes, then the process exits 0.
        long_texts = [" ".join(docs * 40)] * 48
        answer = {}
        worker = threading.Thread(target=lambda: answer.update(r=httpx.post(
            url + "/v1/embeddings", json={"input": long_texts}, headers={"Authorization": "Bearer k3y"}, timeout=120)))
        worker.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        assert answer["r"].status_code == 200 and len(answer["r"].json()["data"]) == 48
        assert proc.wait(timeout=60) == 0


def test_int8_model_is_served_like_its_encode(tiny_bert_dir):
    from transformers import HfArgumentParser

    from retrievals import AutoModelForEmbedding
    from retrievals.pipelines.serve import ServeArguments
    from retrievals.serving import BackgroundServer, ServerConfig, create_app

    parsed, = HfArgumentParser([ServeArguments]).parse_args_into_dataclasses(
        ["--model_name_or_path", tiny_bert_dir, "--quantization", "int8"])
    assert parsed.quantization == "int8"
    int8 = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", quantization=parsed.quantization)
    texts = ["hello world", "what is the ocean", "the cat and the dog eat fish", "blue sky"]
    with BackgroundServer(create_app(int8, ServerConfig(served_model_name="tiny"))).start() as srv:
        response = httpx.post(srv.url + "/v1/embeddings", json={"input": texts}, timeout=30)
        got = np.array([d["embedding"] for d in response.json()["data"]])
    np.testing.assert_allclose(got, int8.encode(texts), atol=1e-5)


def test_one_server_per_port_whatever_its_kind():
    """A ``--workers`` parent's reservation refuses every other server, even before its workers listen; its own
    ``SO_REUSEPORT`` workers join it; a single-process server refuses a ``--workers`` one."""
    from retrievals.serving.server import bind_socket, reserve_port

    def refused(open_socket):
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            open_socket().close()

    reservation = reserve_port("127.0.0.1", 0)
    port = reservation.getsockname()[1]
    others = (lambda: reserve_port("127.0.0.1", port), lambda: bind_socket("127.0.0.1", port))
    workers = []
    try:
        for other in others:  # while the workers load their model
            refused(other)
        workers = [bind_socket("127.0.0.1", port, reuse_port=True) for _ in range(2)]
        for other in others:
            refused(other)
        reservation.close()
        for other in others:  # the workers alone
            refused(other)
    finally:
        for sock in [reservation, *workers]:
            sock.close()
    with bind_socket("127.0.0.1", 0) as single:
        port = single.getsockname()[1]
        refused(lambda: reserve_port("127.0.0.1", port))
        # a restart right after a single-process server is not refused by its connections in TIME_WAIT
        client = socket.create_connection(single.getsockname())
        accepted, _ = single.accept()
        accepted.close()  # the server closes first: TIME_WAIT on the server's port
        time.sleep(0.1)
        client.close()
    reserve_port("127.0.0.1", port).close()
