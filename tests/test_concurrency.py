"""Thread safety of tokenizing and encoding: one shared tokenizer, callers with different max lengths.

A fast tokenizer keeps its truncation length as mutable state of the Rust backend, set on every call;
concurrent callers (threads, the server's event loop beside its worker threads) must still each get
exactly what a serial call gives. Also: a CPU fallback for ``use_fp16`` warns once per model.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from retrievals import AutoModelForEmbedding
from retrievals.serving import BackgroundServer, ServerConfig, create_app, handling

WORDS = ("the cat dog fish ocean sky blue red green sun moon protein female eat summit define hello world model "
         "embedding retrieval search text long short sentence word token one two three four five").split()
QUERY_MAX, DOC_MAX = 8, 40


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32",
                                                 query_instruction="query: ", max_length=DOC_MAX,
                                                 query_max_length=QUERY_MAX, device="cpu")


@pytest.fixture
def eager_thread_switching():
    """Switch threads (nearly) every bytecode, so that unguarded shared state shows up in a few hundred calls."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def race_window(model, monkeypatch):
    """Pause (releasing the GIL, as a busy machine may) right after the fast tokenizer has set its backend's
    truncation, so that a caller that does not hold the tokenizer for the whole call meets another's setting."""
    original = model.tokenizer.set_truncation_and_padding

    def set_then_pause(*args, **kwargs):
        original(*args, **kwargs)
        time.sleep(0.0005)

    monkeypatch.setattr(model.tokenizer, "set_truncation_and_padding", set_then_pause)


def tokenize_calls(seed: int = 0, n: int = 400) -> list:
    """``(texts, kwargs)`` for ``model.tokenize``: query / document sides, explicit max lengths, no truncation;
    every text is longer than both limits (or, without truncation, kept whole)."""
    rng = np.random.default_rng(seed)
    variants = [{"is_query": True}, {"is_query": False}, {"is_query": True, "max_length": 16},
                {"is_query": False, "max_length": 4}, {"is_query": False, "truncation": False},
                {"is_query": True, "truncation": False}]
    calls = []
    for i in range(n):
        texts = [words(rng, int(rng.integers(45, 60))) for _ in range(int(rng.integers(1, 6)))]
        calls.append((texts, variants[i % len(variants)]))
    return calls


def run_threaded(fn, items: list, threads: int = 8) -> list:
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def test_threaded_tokenize_equals_serial(model, eager_thread_switching):
    calls = tokenize_calls()
    serial = [model.tokenize(texts, **kwargs) for texts, kwargs in calls]
    assert {len(ids[0]) for ids in serial} >= {QUERY_MAX, DOC_MAX, 16, 4}  # the limits really differ
    assert any(len(ids[0]) > DOC_MAX for ids in serial)  # and truncation=False keeps long texts whole
    for _ in range(3):
        threaded = run_threaded(lambda call: model.tokenize(call[0], **call[1]), calls)
        wrong = [i for i, (a, b) in enumerate(zip(threaded, serial)) if a != b]
        assert not wrong, f"{len(wrong)} of {len(calls)} threaded tokenize calls differ from serial, e.g. call " \
                          f"{wrong[0]} {calls[wrong[0]][1]}: lengths {[len(x) for x in threaded[wrong[0]]]} " \
                          f"instead of {[len(x) for x in serial[wrong[0]]]}"


def test_threaded_encode_equals_serial(model, race_window):
    rng = np.random.default_rng(1)
    calls = [([words(rng, int(rng.integers(45, 60))) for _ in range(3)], i % 2 == 0) for i in range(160)]
    serial = [model.encode(texts, is_query=is_query) for texts, is_query in calls]
    threaded = run_threaded(lambda call: model.encode(call[0], is_query=call[1]), calls)
    wrong = [i for i, (a, b) in enumerate(zip(threaded, serial)) if not np.allclose(a, b, atol=1e-6)]
    assert not wrong, f"{len(wrong)} of {len(calls)} threaded encode calls differ from serial encode"


def test_python_tokenizer_is_safe_too(model, tiny_bert_dir, eager_thread_switching):
    """A slow (pure Python) tokenizer goes through the same path, from threads, without deadlock."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    slow = BertTokenizerLegacy(vocab_file=os.path.join(tiny_bert_dir, "vocab.txt"), model_max_length=64)
    assert not slow.is_fast
    calls = tokenize_calls(seed=2, n=120)
    expected = [model.tokenize(texts, **kwargs) for texts, kwargs in calls]
    fast, model.tokenizer = model.tokenizer, slow
    try:
        got = run_threaded(lambda call: model.tokenize(call[0], **call[1]), calls)
    finally:
        model.tokenizer = fast
    assert got == expected


# ---------------------------------------------------------------------- the server
def test_server_answers_each_request_with_its_own_truncation(model, race_window):
    """Big document requests are tokenized on worker threads while query requests are tokenized on the
    event loop; each response must still be ``encode`` / ``encode_queries`` of its own inputs."""
    rng = np.random.default_rng(3)
    per_text = handling.INLINE_TOKENIZE_CHARS // 3 + 500
    documents = [[(words(rng, 4000) + " ")[:per_text] for _ in range(3)] for _ in range(40)]
    queries = [[(words(rng, 4000) + " ")[:per_text] for _ in range(2)] for _ in range(40)]
    assert sum(len(t) for t in documents[0]) > handling.INLINE_TOKENIZE_CHARS  # on a worker thread
    assert sum(len(t) for t in queries[0]) <= handling.INLINE_TOKENIZE_CHARS  # on the event loop
    requests = [({"input": d}, d, False) for d in documents] + \
               [({"input": q, "input_type": "query"}, q, True) for q in queries]
    requests = [requests[i] for i in rng.permutation(len(requests))]
    expected = [(sum(len(x) for x in model.tokenize(texts, is_query=is_query)), model.encode(texts, is_query=is_query))
                for _, texts, is_query in requests]
    app = create_app(model, ServerConfig(served_model_name="tiny", max_input_chars=per_text, max_wait_ms=1))
    with BackgroundServer(app).start() as srv, httpx.Client(timeout=60) as client:
        responses = run_threaded(lambda r: client.post(srv.url + "/v1/embeddings", json=r[0]), requests, threads=16)
    wrong = []
    for (_, _, is_query), (tokens, vectors), response in zip(requests, expected, responses):
        assert response.status_code == 200, response.text[:200]
        body = response.json()
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        if body["usage"]["prompt_tokens"] != tokens or not np.allclose(got, vectors, atol=1e-5):
            wrong.append(("query" if is_query else "document", body["usage"]["prompt_tokens"], tokens))
    assert not wrong, f"{len(wrong)} of {len(requests)} responses used another request's truncation " \
                      f"(side, prompt_tokens, expected): {wrong[:4]}"


# ---------------------------------------------------------------------- precision fallback
@pytest.mark.skipif(torch.cuda.is_available(), reason="the fp16 fallback is a CPU matter")
def test_fp16_on_cpu_warns_once_per_model(tiny_bert_dir, caplog):
    def fallback_warnings() -> int:
        return sum("fp16 is slow on CPU" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="retrievals"):
        model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", use_fp16=True,
                                                      device="cpu")
        model.encode(["hello world"])
        model.encode(["blue sky"], is_query=True)
        assert fallback_warnings() == 1
        other = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp16",
                                                      device="cpu")
        other.encode(["hello world"])
        assert fallback_warnings() == 2  # once per model, not once per process
        model.encode(["hello world"], precision="fp16")
        assert fallback_warnings() == 2
