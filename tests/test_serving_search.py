"""POST /v1/search (`retrievals serve MODEL --index_dir IDX`): the hits of Searcher, the limits, auth and
batcher of /v1/embeddings, stored text, and an index of another model refusing to start."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.index import EncodeJob, Searcher, build_index, encode_to_shards, search
from retrievals.serving import BackgroundServer, ServerConfig, create_app

WORDS = ("cat dog fish sky sun moon ocean blue red green one two three four five model embedding retrieval "
         "search text long short sentence word token").split()
QUERIES = ["cat dog fish", "blue ocean sky", "one two three model", "search retrieval text token"]
COUNT = 80


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import _save_tiny_bert

    path = _save_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert_search")))
    AutoModelForEmbedding.from_pretrained(path, pooling_method="mean", query_instruction="query: ",
                                          max_length=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForEmbedding.from_pretrained(model_dir, precision="fp32")


@pytest.fixture(scope="module")
def corpus(model_dir, tmp_path_factory):
    """Two vectors folders of one corpus (text kept or not), a flat index over each and an IVF one."""
    root = tmp_path_factory.mktemp("search_index")
    rng = np.random.default_rng(3)
    rows = [{"_id": f"d{i}", "title": str(rng.choice(WORDS)), "text": " ".join(rng.choice(WORDS, 6))}
            for i in range(COUNT)]
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, store_text in (("plain", False), ("text", True)):
        encode_to_shards(EncodeJob(corpus=str(path), output_dir=str(root / f"vec_{name}"), model_name_or_path=model_dir,
                                   shard_size=32, chunk_rows=32, precision="fp32", store_text=store_text),
                         show_progress=False)
        build_index(str(root / f"vec_{name}"), str(root / f"idx_{name}"))
    build_index(str(root / "vec_plain"), str(root / "idx_ivf"), index_type="ivf", nlist=2, recall_sample=20)
    return {"rows": rows, **{name: str(root / f"idx_{name}") for name in ("plain", "text", "ivf")}}


def start(model, index_dir=None, **settings) -> BackgroundServer:
    settings.setdefault("served_model_name", "tiny")
    return BackgroundServer(create_app(model, ServerConfig(**settings), index_dir=index_dir)).start()


@pytest.fixture(scope="module")
def server(model, corpus):
    srv = start(model, corpus["text"], max_client_batch_size=8, max_top_k=100)
    yield srv
    srv.stop()


def post(server, path="/v1/search", headers=None, **body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- results
def test_search_returns_the_hits_of_searcher(server, model, corpus):
    searcher = Searcher(corpus["text"], model)
    for query, top_k in ((QUERIES[0], 5), (QUERIES, 10), (QUERIES[1:3], 1), ([QUERIES[3]], 100)):
        response = post(server, query=query, top_k=top_k, model="tiny")
        assert response.status_code == 200, response.text
        body = response.json()
        expected = searcher.search(query, top_k)
        queries = [query] if isinstance(query, str) else query
        assert body["object"] == "list" and body["model"] == "tiny"
        assert [d["object"] for d in body["data"]] == ["search_result"] * len(queries)
        assert [d["index"] for d in body["data"]] == list(range(len(queries)))
        assert [[hit["id"] for hit in d["results"]] for d in body["data"]] == expected.ids
        got = [[hit["score"] for hit in d["results"]] for d in body["data"]]
        for row, ref in zip(got, expected.scores):
            np.testing.assert_allclose(row, ref, atol=1e-5)
        assert all("text" not in hit for d in body["data"] for hit in d["results"])
        tokens = sum(len(x) for x in model.tokenize(queries, is_query=True))  # the query side: instruction
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert len(post(server, query=QUERIES[0], top_k=100).json()["data"][0]["results"]) == COUNT
    assert len(post(server, query=QUERIES[0]).json()["data"][0]["results"]) == 10  # default top_k
    by_function = search(corpus["plain"], QUERIES, top_k=7, model=model)
    body = post(server, query=QUERIES, top_k=7).json()
    assert [[hit["id"] for hit in d["results"]] for d in body["data"]] == by_function.ids


def test_return_text_with_and_without_stored_text(server, model, corpus):
    texts = {r["_id"]: f"{r['title']} {r['text']}" for r in corpus["rows"]}
    body = post(server, query=QUERIES[:2], top_k=6, return_text=True).json()
    hits = [hit for d in body["data"] for hit in d["results"]]
    assert len(hits) == 12 and all(hit["text"] == texts[hit["id"]] for hit in hits)
    assert Searcher(corpus["text"], model).search(QUERIES[0], 6, return_text=True).texts[0] == \
        [hit["text"] for hit in body["data"][0]["results"]]
    with start(model, corpus["plain"]) as plain:
        refused = post(plain, query="cat", return_text=True)
        assert refused.status_code == 400, refused.text
        assert "corpus text was not kept" in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "return_text"
        assert post(plain, query="cat", return_text=False).status_code == 200
        assert httpx.get(plain.url + "/info").json()["index"]["text_stored"] is False


# ---------------------------------------------------------------------- limits
BAD_REQUESTS = [
    ({"query": "cat", "top_k": 0}, 422, "'top_k' must be an integer from 1 to 100, got 0"),
    ({"query": "cat", "top_k": 101}, 422, "from 1 to 100, got 101"),
    ({"query": "cat", "top_k": -3}, 422, "'top_k'"),
    ({"query": "cat", "top_k": "5"}, 422, "'top_k'"),
    ({"query": "cat", "top_k": 2.0}, 422, "'top_k'"),
    ({"query": "cat", "top_k": True}, 422, "'top_k'"),
    ({"query": ""}, 400, "query cannot be empty"),
    ({"query": ["cat", "  "]}, 400, "query[1] cannot be empty"),
    ({"query": []}, 400, "'query' must contain at least 1 item"),
    ({}, 422, "'query' is required"),
    ({"query": 5}, 422, "'query' must be a string or a list of strings"),
    ({"query": ["cat"] * 9}, 422, "batch size 9 > maximum allowed batch size 8"),
    ({"query": "a" * 513}, 422, "513 characters; the maximum is 512"),
    ({"query": " ".join(["ocean"] * 40), "truncate": False}, 422, "query has 44 tokens; the maximum is 32"),
    ({"query": "cat", "input": "cat"}, 422, "unrecognized request argument(s): input"),
    ({"query": "cat", "input_type": "query"}, 422, "unrecognized request argument(s): input_type"),
    ({"query": "cat", "model": "other"}, 404, "model 'other' not found"),
    ({"query": "cat", "return_text": "yes"}, 422, "'return_text' must be true or false"),
    ([1], 422, "must be a JSON object"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests(server, body, status, message):
    response = httpx.post(server.url + "/v1/search", content=json.dumps(body), timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_long_query_is_truncated_like_embeddings(server, model, corpus):
    long_query = " ".join(["ocean", "cat"] * 20)
    body = post(server, query=long_query, top_k=3).json()
    assert body["usage"]["prompt_tokens"] == 32  # the model's max length, like /v1/embeddings
    expected = Searcher(corpus["text"], model).search(long_query, 3)
    assert [hit["id"] for hit in body["data"][0]["results"]] == expected.ids[0]


# ---------------------------------------------------------------------- bounded responses
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


@pytest.fixture(scope="module")
def long_texts(model_dir, tmp_path_factory):
    """200 documents of ~1 KB each, text kept, in a flat index."""
    root = tmp_path_factory.mktemp("long_texts")
    rng = np.random.default_rng(5)
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"long{i}", "text": " ".join(rng.choice(WORDS, 180))}) + "\n"
                            for i in range(200)))
    encode_to_shards(EncodeJob(corpus=str(path), output_dir=str(root / "vec"), model_name_or_path=model_dir,
                               precision="fp32", store_text=True), show_progress=False)
    build_index(str(root / "vec"), str(root / "idx"))
    return str(root / "idx")


def test_search_responses_are_bounded_and_memory_stays_flat(model, long_texts):
    """The review's request (256 queries x top_k 1000 with return_text) returned 401 MB; now each request is
    bounded by queries x top_k and by the response's bytes, with the limit named, and memory stays flat."""
    many = {"query": [f"{w} ocean" for w in WORDS][:25] * 10, "top_k": 1000, "return_text": True}  # 250 x 1000
    big = {"query": QUERIES * 10, "top_k": 200, "return_text": True}  # 8,000 hits, ~8 MB of text
    with start(model, long_texts, max_client_batch_size=256, max_response_bytes=200_000) as srv, \
            httpx.Client(timeout=120) as client:
        ok = client.post(srv.url + "/v1/search", json={"query": QUERIES[:2], "top_k": 20, "return_text": True})
        assert ok.status_code == 200 and 40_000 < len(ok.content) <= 200_000
        assert len([hit["text"] for d in ok.json()["data"] for hit in d["results"]]) == 40
        for body in (many, big):  # warm-up
            client.post(srv.url + "/v1/search", json=body)
        before = rss_mb()
        with cf.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda body: client.post(srv.url + "/v1/search", json=body), [many, big] * 8))
        grown = rss_mb() - before
        limits = httpx.get(srv.url + "/v1/models").json()["data"][0]
    print(f"RSS grew {grown:.1f} MB over 16 concurrent over-limit searches")
    assert grown < 200
    for response, body in zip(responses, [many, big] * 8):
        error = response.json()["error"]
        if body is many:
            assert response.status_code == 422, response.text[:200]
            assert error["message"].startswith("250 queries x top_k 1000 = 250000 results; the maximum per request "
                                               "is 10000 (max_search_results)")
            assert (error["param"], error["code"]) == ("top_k", "too_many_results")
        else:
            assert response.status_code == 413, response.text[:200]
            assert error["message"].startswith("the response would exceed 200000 bytes (max_response_bytes)")
            assert error["code"] == "response_too_large"
    assert (limits["max_search_results"], limits["max_response_bytes"]) == (10000, 200_000)


# ---------------------------------------------------------------------- auth, info, metrics, no index
def test_api_key_guards_search(model, corpus):
    with start(model, corpus["plain"], api_key="s3cret") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = post(srv, headers=headers, query="cat")
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert post(srv, headers={"Authorization": "Bearer s3cret"}, query="cat").status_code == 200


def test_info_models_and_metrics_report_the_index(server, model):
    info = httpx.get(server.url + "/info").json()
    assert info["index"]["type"] == "flat" and info["index"]["count"] == COUNT
    assert info["index"]["text_stored"] is True and info["index"]["dimension"] == 32
    assert info["max_top_k"] == 100 and "vec_" not in json.dumps(info)  # no server paths
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["index"]["count"] == COUNT and card["max_top_k"] == 100
    post(server, query=QUERIES[:3])
    metrics = httpx.get(server.url + "/metrics").text
    assert 'retrievals_requests_total{route="/v1/search",code="200"}' in metrics
    assert "retrievals_index_search_duration_seconds_count" in metrics
    searched = re.search(r"^retrievals_search_queries_total (\S+)$", metrics, re.M)
    assert searched and float(searched.group(1)) >= 3
    with start(model) as bare:  # no index: no route
        assert post(bare, query="cat").status_code == 404
        assert "index" not in httpx.get(bare.url + "/info").json()


# ---------------------------------------------------------------------- batching shared with /v1/embeddings
def test_searches_and_embeddings_share_model_batches(model, corpus, monkeypatch):
    query_id = model.tokenizer.convert_tokens_to_ids("query")
    with start(model, corpus["plain"], max_wait_ms=50) as srv:
        calls = []
        original = AutoModelForEmbedding.encode_ids

        def spy(ids, *args, **kwargs):
            calls.append([list(x) for x in ids])
            if len(calls) == 1:
                time.sleep(1.0)  # the first call keeps the model busy while the others queue
            return original(model, ids, *args, **kwargs)

        monkeypatch.setattr(model, "encode_ids", spy, raising=False)
        blocker = threading.Thread(target=post, args=(srv, "/v1/embeddings"), kwargs={"input": "keeps it busy"})
        blocker.start()
        time.sleep(0.2)
        jobs = [("/v1/search", {"query": q, "top_k": 3}) for q in QUERIES[:3]]
        jobs += [("/v1/embeddings", {"input": t}) for t in ("red sun", "green moon", "five fish")]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: post(srv, job[0], **job[1]), jobs))
        blocker.join()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert len(calls) <= 3  # 7 requests, 1 blocker + few model calls
    kinds = [{x[1] == query_id for x in call} for call in calls[1:]]
    assert {True, False} in kinds  # a query and a document text in one model batch
    searcher = Searcher(corpus["plain"], model)
    for (_, body), response in zip(jobs[:3], results[:3]):
        assert [hit["id"] for hit in response.json()["data"][0]["results"]] == searcher.search(body["query"], 3).ids[0]


# ---------------------------------------------------------------------- the command line
def test_cli_serves_the_index_with_nprobe(model_dir, model, corpus, monkeypatch):
    import retrievals.serving
    from retrievals.pipelines.serve import main

    apps = []

    def fake_serve(app, sock, log_level):
        apps.append(app)
        sock.close()

    monkeypatch.setattr(retrievals.serving, "serve", fake_serve)
    code = main([model_dir, "--index_dir", corpus["ivf"], "--nprobe", "2", "--precision", "fp32",
                 "--port", str(free_port()), "--max_top_k", "20", "--max_search_results", "60",
                 "--max_response_bytes", "1500"])
    assert code == 0 and len(apps) == 1
    state = apps[0].state.server
    assert (state.config.max_top_k, state.config.max_search_results, state.config.max_response_bytes) == (20, 60, 1500)
    assert (state.index_info["type"], state.index_info["nlist"], state.index_info["nprobe"]) == ("ivf", 2, 2)
    with BackgroundServer(apps[0]) as srv:
        body = post(srv, query=QUERIES, top_k=5).json()
        assert post(srv, query="cat", top_k=21).status_code == 422
        assert "(max_search_results)" in post(srv, query=QUERIES, top_k=16).json()["error"]["message"]
        assert "(max_response_bytes)" in post(srv, query=QUERIES, top_k=15).json()["error"]["message"]
    expected = Searcher(corpus["ivf"], model, nprobe=2).search(QUERIES, 5)
    assert [[hit["id"] for hit in d["results"]] for d in body["data"]] == expected.ids


def test_an_index_of_another_model_refuses_to_start(model_dir, corpus, tmp_path, capsys):
    from retrievals.pipelines.serve import main

    other = str(tmp_path / "cls_model")
    AutoModelForEmbedding.from_pretrained(model_dir, pooling_method="cls").save_pretrained(other)
    port = free_port()
    assert main([other, "--index_dir", corpus["plain"], "--port", str(port)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: index {corpus['plain']} was built from vectors of {model_dir}")
    assert "the model given is" in line and other in line and line.count("fingerprint") == 2
    with socket.socket() as s:  # the port was let go
        s.bind(("127.0.0.1", port))
    assert main([model_dir, "--index_dir", corpus["plain"], "--nprobe", "0", "--port", str(free_port())]) == 2
    assert "nprobe must be >= 1" in capsys.readouterr().err
