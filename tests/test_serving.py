"""The embedding server on a real loopback port: OpenAI contract, bad input, limits, auth, metrics."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hmac
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.serving import BackgroundServer, ServerConfig, create_app

TEXTS = ["hello world", "what is the ocean", "the cat and the dog eat fish", "blue sky",
         "one two three four five model embedding retrieval search text long short sentence word token"]


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32",
                                                 query_instruction="query: ", max_length=32)


def start(model, **settings) -> BackgroundServer:
    settings.setdefault("served_model_name", "tiny")
    return BackgroundServer(create_app(model, ServerConfig(**settings))).start()


@pytest.fixture(scope="module")
def server(model):
    srv = start(model, max_client_batch_size=32, max_request_tokens=600, max_body_bytes=64 * 1024)
    yield srv
    srv.stop()


def embed(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)


def slow_model(model, monkeypatch, seconds: float) -> list:
    """Make each model call take ``seconds``; returns the list of texts the model was called with."""
    calls: list = []
    original = AutoModelForEmbedding.encode_ids

    def slow(ids, *args, **kwargs):
        calls.append(len(ids))
        time.sleep(seconds)
        return original(model, ids, *args, **kwargs)

    monkeypatch.setattr(model, "encode_ids", slow, raising=False)
    return calls


# ---------------------------------------------------------------------- contract
def test_openai_client_float_and_base64_match_encode(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    default = client.embeddings.create(input=TEXTS, model="tiny")  # the SDK asks for base64 by default
    floats = client.embeddings.create(input=TEXTS, model="tiny", encoding_format="float")
    reference = model.encode(TEXTS)
    got_default = np.array([d.embedding for d in default.data], dtype=np.float32)
    got_float = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    assert (got_default * reference).sum(1).min() > 0.9999
    np.testing.assert_array_equal(got_default, got_float)
    expected_tokens = sum(len(x) for x in model.tokenize(TEXTS))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == expected_tokens
    assert expected_tokens != sum(len(t) for t in TEXTS)  # tokens, not characters
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert (card["dimension"], card["max_input_length"], card["max_client_batch_size"]) == (32, 32, 32)
    assert card["auto_truncate"] is True and card["max_batch_tokens"] == 16384
    info = httpx.get(server.url + "/info").json()
    assert info["pooling_method"] == "mean" and info["query_instruction"] == "query: "


def test_base64_is_bit_identical_to_float(server):
    a = embed(server, input=TEXTS, encoding_format="float").json()
    b = embed(server, input=TEXTS, encoding_format="base64").json()
    assert a["object"] == "list" and a["data"][0]["object"] == "embedding" and a["model"] == "tiny"
    for x, y in zip(a["data"], b["data"]):
        decoded = np.frombuffer(base64.b64decode(y["embedding"]), "<f4")
        assert decoded.tobytes() == np.asarray(x["embedding"], dtype=np.float32).tobytes()


def test_order_and_batch_invariance_and_determinism(server, model):
    rng = np.random.default_rng(0)
    words = "the cat dog fish ocean sky blue red green sun moon protein female eat".split()
    mixed = [" ".join(rng.choice(words, size=int(rng.integers(1, 25)))) for _ in range(31)]
    batch = mixed[:13] + ["what is the ocean"] + mixed[13:]
    alone = np.array(embed(server, input="what is the ocean").json()["data"][0]["embedding"])
    together = embed(server, input=batch).json()
    assert [d["index"] for d in together["data"]] == list(range(32))
    vectors = np.array([d["embedding"] for d in together["data"]])
    np.testing.assert_allclose(vectors[13], alone, atol=1e-5)
    np.testing.assert_allclose(vectors, model.encode(batch), atol=1e-5)
    again = embed(server, input="what is the ocean").content
    assert again == embed(server, input="what is the ocean").content


def test_dimensions_input_type_and_truncation(server, model):
    out = embed(server, input=TEXTS[:2], dimensions=8).json()
    vectors = np.array([d["embedding"] for d in out["data"]])
    assert vectors.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, model.encode(TEXTS[:2], truncate_dim=8), atol=1e-6)
    query = np.array(embed(server, input="blue sky", input_type="query").json()["data"][0]["embedding"])
    document = np.array(embed(server, input="blue sky").json()["data"][0]["embedding"])
    np.testing.assert_allclose(query, model.encode_queries("blue sky"), atol=1e-6)
    assert np.abs(query - document).max() > 1e-3  # the query instruction was applied
    long_text = " ".join(["ocean"] * 60)
    cut = embed(server, input=long_text).json()
    assert cut["usage"]["prompt_tokens"] == 32  # truncated to the model's max length


# ---------------------------------------------------------------------- bad input
BAD_INPUTS = [
    ({"input": ""}, 400, "cannot be empty"),
    ({"input": "   "}, 400, "cannot be empty"),
    ({"input": ["a", ""]}, 400, "input[1] cannot be empty"),
    ({"input": []}, 400, "at least 1 item"),
    ({"input": None}, 422, "'input' is required"),
    ({}, 422, "'input' is required"),
    ({"input": 123}, 422, "got int"),
    ({"input": {}}, 422, "got dict"),
    ({"input": [1.5]}, 422, "input[0] must be a string"),
    ({"input": ["x"] * 33}, 422, "batch size 33 > maximum allowed batch size 32"),
    ({"input": "a" * 513}, 422, "513 characters; the maximum is 512"),
    ({"input": " ".join(["ocean"] * 40), "truncate": False}, 422, "has 42 tokens; the maximum is 32"),
    ({"input": ["ocean " * 30] * 20}, 422, "the maximum per request is 600"),
    ({"input": "\ud800"}, 400, "lone surrogate"),
    ({"input": "a", "dimensions": 0}, 422, "'dimensions' must be an integer from 1 to 32"),
    ({"input": "a", "dimensions": -1}, 422, "'dimensions'"),
    ({"input": "a", "dimensions": 33}, 422, "'dimensions'"),
    ({"input": "a", "dimensions": "8"}, 422, "'dimensions'"),
    ({"input": "a", "encoding_format": "bad"}, 422, "'bad'"),
    ({"input": "a", "model": "/some/path"}, 404, "model '/some/path' not found"),
    ({"input": "a", "input_type": "passage"}, 422, "'input_type' must be 'query' or 'document'"),
    ({"input": "a", "truncate": "yes"}, 422, "'truncate' must be true or false"),
    ({"input": "a", "dimension": 8}, 422, "unrecognized request argument(s): dimension"),
    ([1, 2], 422, "must be a JSON object"),
]


@pytest.mark.parametrize("body,status,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_matrix(server, body, status, message):
    import json

    response = httpx.post(server.url + "/v1/embeddings", content=json.dumps(body), timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert embed(server, input="still serving").status_code == 200


@pytest.mark.parametrize("content,headers,status,message", [
    (b"{bad json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b"[" * 60_000, {"Content-Type": "application/json"}, 400, "nested too deeply"),
    (b'{"input": "a"}', {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
    (b'{"input": "a"}', {}, 415, "Content-Type must be application/json"),
    (b'{"input": "' + b"a" * 70_000 + b'"}', {"Content-Type": "application/json"}, 413, "exceeds the limit"),
])
def test_malformed_bodies(server, content, headers, status, message):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/v1/embeddings", content=content, headers=headers)
        assert response.status_code == status
        assert message in response.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "same connection"}).status_code == 200


def test_odd_unicode_is_embedded(server):
    texts = ["nul \u0000 inside", "emoji \U0001f600", "\u05e9\u05dc\u05d5\u05dd rtl", "e" + "\u0301" * 400]
    response = embed(server, input=texts)
    assert response.status_code == 200
    assert np.isfinite(np.array([d["embedding"] for d in response.json()["data"]])).all()


def test_char_cap_rejects_a_huge_string_before_tokenizing(model, monkeypatch):
    with start(model, max_body_bytes=16 * 1024 * 1024) as srv:
        monkeypatch.setattr(model, "tokenize", lambda *a, **k: pytest.fail("tokenized a rejected text"), raising=False)
        started = time.perf_counter()
        response = embed(srv, input="x" * 10_000_000)
        assert response.status_code == 422 and "characters" in response.json()["error"]["message"]
        assert time.perf_counter() - started < 5  # generous: the 10 MB upload itself dominates


def test_unknown_route_and_method_use_the_envelope(server):
    assert httpx.get(server.url + "/nope").json()["error"]["code"] == "not_found"
    response = httpx.get(server.url + "/v1/embeddings")
    assert response.status_code == 405 and "error" in response.json()


def test_settings_that_could_never_serve_are_refused(model):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        create_app(model, ServerConfig(max_batch_tokens=16))
    with pytest.raises(ValueError, match="max_queue_items"):
        create_app(model, ServerConfig(max_queue_items=8, max_client_batch_size=32))
    with pytest.raises(TypeError, match="unknown server setting"):
        create_app(model, max_batch_tokenz=1)


# ---------------------------------------------------------------------- security
def test_api_key_on_every_route_but_health(model, monkeypatch):
    seen = []
    original = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append(1) or original(a, b))
    with start(model, api_key="s3cret") as srv:
        routes = [("POST", "/v1/embeddings"), ("POST", "/embeddings"), ("GET", "/v1/models"),
                  ("GET", "/v1/models/tiny"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/anything")]
        bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}, {"Authorization": "s3cret"},
                       {"Authorization": "Basic s3cret"}]
        statuses = []
        for method, path in routes:
            for headers in bad_headers:
                r = httpx.request(method, srv.url + path, json={"input": "a"}, headers=headers)
                statuses.append(r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
            r = httpx.request(method, srv.url + path + "?api_key=s3cret", json={"input": "a"})
            statuses.append(r.status_code)
        assert set(statuses) == {401}
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "a"}, headers=good).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers=good).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                input="a", model="tiny")
        assert len(openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret").embeddings.create(
            input="a", model="tiny").data) == 1
        assert seen  # the comparison went through hmac.compare_digest
        assert "s3cret" not in httpx.get(srv.url + "/metrics", headers=good).text
        assert "s3cret" not in httpx.get(srv.url + "/info", headers=good).text


def test_cors_is_off_by_default(server):
    r = httpx.options(server.url + "/v1/embeddings", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_internal_errors_hide_details_and_recover(model, monkeypatch):
    with start(model) as srv:
        original = AutoModelForEmbedding.encode_ids
        calls = {"n": 0}

        def flaky(ids, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("secret internal detail /home/x")
            return original(model, ids, *args, **kwargs)

        monkeypatch.setattr(model, "encode_ids", flaky, raising=False)
        r = embed(srv, input="boom")
        assert r.status_code == 500
        assert "secret" not in r.text and "Traceback" not in r.text and "boom" not in r.text
        assert embed(srv, input="fine").status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200


# ---------------------------------------------------------------------- batching, backpressure
def test_concurrent_requests_share_batches(model, monkeypatch):
    with start(model, max_wait_ms=50) as srv:
        calls = slow_model(model, monkeypatch, 0.05)
        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda t: embed(srv, input=t), [TEXTS[i % 5] + f" {i}" for i in range(16)]))
        assert all(r.status_code == 200 for r in results)
        assert len(calls) < 8 and max(calls) > 2  # 16 requests, few model calls
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.encode(TEXTS[i % 5] + f" {i}"),
                                       atol=1e-5)


def test_overload_answers_429_and_accepted_requests_succeed(model, monkeypatch):
    with start(model, max_queue_items=4, max_client_batch_size=4, retry_after=2) as srv:
        slow_model(model, monkeypatch, 0.1)
        texts = [f"ocean {i} sky" for i in range(48)]
        with cf.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda t: embed(srv, input=t), texts))
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 4
        for text, r in zip(texts, results):
            if r.status_code == 200:
                np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.encode(text), atol=1e-5)
            else:
                assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(srv.url + "/health").status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        assert f'retrievals_requests_total{{route="/v1/embeddings",code="429"}} {codes.count(429)}' in metrics
        assert "retrievals_capacity_in_use 0" in metrics


def test_a_disconnected_client_costs_no_compute(model, monkeypatch):
    with start(model) as srv:
        calls = slow_model(model, monkeypatch, 1.0)
        blocker = threading.Thread(target=embed, args=(srv,), kwargs={"input": "keeps the model busy"})
        blocker.start()
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:  # the model is busy with the blocker (slow machines)
            time.sleep(0.01)
        body = b'{"input": ["dropped one", "dropped two"]}'
        with socket.create_connection((srv.host, srv.port)) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)
        blocker.join()
        time.sleep(0.2)
        assert calls == [1]  # only the blocker ran; the two dropped texts never reached the model
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'retrievals_request_failures_total{reason="dropped"} 1' in metrics
        assert "retrievals_capacity_in_use 0" in metrics


def test_deadline_gives_503_and_frees_capacity(model, monkeypatch):
    with start(model, request_timeout=0.3, max_queue_items=256) as srv:
        slow_model(model, monkeypatch, 0.6)
        with cf.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda t: embed(srv, input=t), ["a first", "a second", "a third"]))
        assert [r.status_code for r in results].count(503) >= 2
        assert all("timed out" in r.json()["error"]["message"] for r in results if r.status_code == 503)
        time.sleep(0.8)
        assert "retrievals_capacity_in_use 0" in httpx.get(srv.url + "/metrics").text


def test_health_fails_when_the_model_hangs(model, monkeypatch):
    with start(model, health_timeout=0.2) as srv:
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        slow_model(model, monkeypatch, 1.0)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "did not answer" in r.json()["error"]["message"]


def test_metrics_move_with_requests(model):
    with start(model, max_client_batch_size=2) as srv:
        embed(srv, input=["a", "b", "c"])  # 422
        embed(srv, input=["blue sky", "red sun"])  # 200
        text = httpx.get(srv.url + "/metrics").text
        assert 'retrievals_requests_total{route="/v1/embeddings",code="422"} 1' in text
        assert 'retrievals_requests_total{route="/v1/embeddings",code="200"} 1' in text
        assert 'retrievals_request_failures_total{reason="too_many_inputs"} 1' in text
        assert "retrievals_embeddings_total 2" in text
        assert "retrievals_request_duration_seconds_count 1" in text
        assert "retrievals_batch_size_sum" in text and "retrievals_queue_size 0" in text
        assert "blue sky" not in text

