"""Framework adapters: LangChain and LlamaIndex (over a loaded model and over a real loopback server), MTEB."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.data.beir import BeirDataset
from retrievals.evaluation import evaluate_retrieval
from retrievals.integrations import EmbeddingServerError, LangChainEmbeddings, LlamaIndexEmbedding, make_backend
from retrievals.integrations.backend import embeddings_url
from retrievals.serving import BackgroundServer, ServerConfig, create_app

WORDS = "cat dog fish sky sun moon ocean blue red green".split()
# For every word both "w" and "query w": the query "w" is embedded as "query w" (the query instruction),
# so its nearest document is "query w" by construction (same token ids), not the bare word.
DOCS = WORDS + [f"query {w}" for w in WORDS]


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32",
                                                 query_instruction="query ", max_length=32)


@pytest.fixture(scope="module")
def server(model):
    srv = BackgroundServer(create_app(model, ServerConfig(served_model_name="tiny", max_client_batch_size=8))).start()
    yield srv
    srv.stop()


def backend_kwargs(kind: str, request) -> dict:
    """Adapter arguments for the in-process model or the running server (batches of 4 texts per request)."""
    if kind == "local":
        return {"model": request.getfixturevalue("model")}
    return {"base_url": request.getfixturevalue("server").url, "batch_size": 4}


def check_vectors(got, expected, kind: str) -> None:
    got = np.asarray(got, dtype=np.float32)
    if kind == "local":
        np.testing.assert_array_equal(got, expected)
    else:  # the server batches differently; base64 float32 carries its values exactly
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_import_is_lazy_and_names_are_listed(monkeypatch):
    import importlib

    import retrievals

    frameworks = ("langchain_core", "llama_index", "mteb", "httpx", "sentence_transformers")
    for name in [m for m in sys.modules if m.split(".")[0] in frameworks or m.startswith("retrievals.integrations")]:
        monkeypatch.delitem(sys.modules, name)  # all put back after the test
    monkeypatch.delattr(retrievals, "integrations", raising=False)
    integrations = importlib.import_module("retrievals.integrations")  # a fresh import of the package
    assert sorted(m for m in sys.modules if m.split(".")[0] in frameworks) == []
    assert "LangChainEmbeddings" in dir(integrations) and "beir_retrieval_task" in integrations.__all__
    with pytest.raises(AttributeError, match="available: .*LangChainEmbeddings.*MTEBModel"):
        integrations.NoSuchAdapter  # noqa: B018
    assert sorted(m for m in sys.modules if m.split(".")[0] in frameworks) == []


@pytest.mark.parametrize("kind", ["local", "server"])
def test_langchain_embeddings_in_memory_vector_store(kind, model, request):
    from langchain_core.vectorstores import InMemoryVectorStore

    embeddings = LangChainEmbeddings(**backend_kwargs(kind, request))
    check_vectors(embeddings.embed_documents(DOCS), model.encode_corpus(DOCS), kind)
    check_vectors(embeddings.embed_query("cat"), model.encode_queries("cat"), kind)
    check_vectors(embeddings.embed_query("cat"), model.encode_corpus("query cat"), kind)  # the instruction applied
    assert not np.allclose(embeddings.embed_query("cat"), model.encode_corpus("cat"), atol=1e-3)
    assert embeddings.embed_documents([]) == []

    store = InMemoryVectorStore(embeddings)
    store.add_texts(DOCS)
    for word in WORDS:
        (doc, score), *_ = store.similarity_search_with_score(word, k=2)
        assert doc.page_content == f"query {word}" and score == pytest.approx(1.0, abs=1e-5)
    assert [d.page_content for d in store.similarity_search("moon", k=1)] == ["query moon"]

    async def run_async():
        docs = await embeddings.aembed_documents(DOCS)
        query = await embeddings.aembed_query("sun")
        found = await store.asimilarity_search("sun", k=1)
        return docs, query, found

    docs, query, found = asyncio.run(run_async())
    check_vectors(docs, model.encode_corpus(DOCS), kind)
    check_vectors(query, model.encode_queries("sun"), kind)
    assert [d.page_content for d in found] == ["query sun"]


@pytest.mark.parametrize("kind", ["local", "server"])
def test_llamaindex_embedding_vector_store_index(kind, model, request):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    embed_model = LlamaIndexEmbedding(**backend_kwargs(kind, request))
    assert embed_model.embed_batch_size == (32 if kind == "local" else 4)
    check_vectors(embed_model.get_query_embedding("cat"), model.encode_queries("cat"), kind)
    check_vectors(embed_model.get_text_embedding("cat"), model.encode_corpus("cat"), kind)
    check_vectors(embed_model.get_text_embedding_batch(DOCS), model.encode_corpus(DOCS), kind)

    async def run_async():
        return (await embed_model.aget_query_embedding("dog"), await embed_model.aget_text_embedding("dog"),
                await embed_model.aget_text_embedding_batch(DOCS))

    query, text, batch = asyncio.run(run_async())
    check_vectors(query, model.encode_queries("dog"), kind)
    check_vectors(text, model.encode_corpus("dog"), kind)
    check_vectors(batch, model.encode_corpus(DOCS), kind)

    nodes = [TextNode(text=text, id_=f"n{i}") for i, text in enumerate(DOCS)]
    index = VectorStoreIndex(nodes, embed_model=embed_model)  # no LLM is involved in retrieval
    check_vectors([index.vector_store.get(f"n{i}") for i in range(len(DOCS))], model.encode_corpus(DOCS), kind)
    retriever = index.as_retriever(similarity_top_k=1)
    for word in WORDS:
        (hit,) = retriever.retrieve(word)
        assert hit.node.text == f"query {word}" and hit.score == pytest.approx(1.0, abs=1e-5)
    (hit,) = asyncio.run(retriever.aretrieve("ocean"))
    assert hit.node.text == "query ocean"


def test_server_backend_errors_and_urls(server):
    assert embeddings_url("http://h:1") == embeddings_url("http://h:1/v1/") == "http://h:1/v1/embeddings"
    assert embeddings_url("https://h/v1/embeddings") == "https://h/v1/embeddings"
    with pytest.raises(ValueError, match="must start with http"):
        embeddings_url("h:1")
    with pytest.raises(ValueError, match="exactly one of model"):
        make_backend()
    with pytest.raises(TypeError, match="AutoModelForEmbedding or a path"):
        LangChainEmbeddings(object())
    wrong = LangChainEmbeddings(base_url=server.url, model_name="other")
    with pytest.raises(EmbeddingServerError, match="answered 404: model 'other' not found; this server serves 'tiny'"):
        wrong.embed_query("cat")
    with pytest.raises(EmbeddingServerError, match="answered 404"):
        asyncio.run(wrong.aembed_documents(["cat"]))
    served = LangChainEmbeddings(base_url=server.url + "/v1", model_name="tiny", dimensions=8)
    assert len(served.embed_query("cat")) == 8


# ------------------------------------------------ a busy server: bounded concurrency, retry with backoff (issue 21, item 8)
@pytest.fixture(scope="module")
def busy_server(model):
    """Room for two requests of 4 texts (beyond: 429 with ``Retry-After: 0``)."""
    config = ServerConfig(served_model_name="tiny", max_client_batch_size=4, max_queue_items=8, retry_after=0)
    srv = BackgroundServer(create_app(model, config)).start()
    yield srv
    srv.stop()  # a fixture's teardown: runs whether the tests pass or fail


def overloaded(server) -> int:
    """429s the server has answered so far (its Prometheus counter)."""
    found = re.search(r'retrievals_request_failures_total\{reason="overloaded"\} (\S+)', httpx.get(server.url + "/metrics").text)
    return int(float(found.group(1))) if found else 0


def test_server_adapters_wait_their_turn_at_a_full_server(model, busy_server):
    """200 texts in 50 requests to a server with room for 2: sent all at once they got 429 "server at capacity";
    now at most ``max_concurrency`` at a time, a 429 retried after backoff; every vector back, in order."""
    texts = [f"{a} {b} {c}" for a in WORDS for b in WORDS for c in WORDS[:2]]
    expected = model.encode_corpus(texts)
    server = {"base_url": busy_server.url, "batch_size": 4, "backoff": 0.01}
    langchain = LangChainEmbeddings(**server)
    check_vectors(asyncio.run(langchain.aembed_documents(texts)), expected, "server")
    assert (refused := overloaded(busy_server)) > 0  # 4 requests of 4 texts in flight, room for 2: some refused, retried
    llama = LlamaIndexEmbedding(**server)  # LlamaIndex gathers its batches itself: the bound is per adapter
    check_vectors(asyncio.run(llama.aget_text_embedding_batch(texts)), expected, "server")
    check_vectors(langchain.embed_documents(texts), expected, "server")  # sync: threads, the same bound
    assert overloaded(busy_server) > refused
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        LangChainEmbeddings(base_url=busy_server.url, max_concurrency=0)


def test_server_backend_honours_retry_after_and_gives_up(model, monkeypatch):
    """Each request answered 429 (``Retry-After: 2``) twice, 503, then 200: all texts back in order, equal to local
    encode; waits of at least Retry-After, else exponential; at most max_concurrency in flight, sync or async."""
    from retrievals.integrations import backend as backend_module

    tries, waits, flight, lock = {}, [], {"now": 0, "most": 0}, threading.Lock()

    def count(step: int) -> None:
        with lock:
            flight["now"] += step
            flight["most"] = max(flight["most"], flight["now"])

    def reply(request):
        texts = json.loads(request.content)["input"]
        with lock:
            n = tries[texts[0]] = tries.get(texts[0], 0) + 1
        if n <= 3:
            return httpx.Response(429 if n < 3 else 503, headers={"Retry-After": "2"} if n < 3 else {})
        return httpx.Response(200, json={"data": [{"index": i, "embedding": base64.b64encode(v.astype("<f4")).decode()}
                                                  for i, v in reversed(list(enumerate(model.encode_corpus(texts))))]})

    def answer(request):
        count(1), time.sleep(0.002), count(-1)
        return reply(request)

    async def answer_async(request):
        count(1), await asyncio.sleep(0.002), count(-1)
        return reply(request)

    async def no_wait(seconds):
        waits.append(seconds)

    monkeypatch.setattr(backend_module, "_sleep", waits.append)
    monkeypatch.setattr(backend_module, "_asleep", no_wait)
    texts = [f"{w} {v}" for w in WORDS for v in WORDS[:3]]  # 30 texts, 10 requests of 3
    for run, handler in ((lambda b: b.embed(texts, is_query=False), answer),
                         (lambda b: asyncio.run(b.aembed(texts, is_query=False)), answer_async)):
        tries.clear(), waits.clear(), flight.update(most=0)
        backend = make_backend(base_url="http://server:1", batch_size=3, max_concurrency=2, backoff=0.5,
                               transport=httpx.MockTransport(handler))
        check_vectors(run(backend), model.encode_corpus(texts), "server")
        assert sorted(tries.values()) == [4] * 10 and flight["most"] == 2
        assert waits == [2] * 30  # max(Retry-After 2, 0.5 then 1), then the 503: 0.5 x 2 x 2

    stubborn = make_backend(base_url="http://server:1", max_retries=1, backoff=5.0,
                            transport=httpx.MockTransport(lambda r: httpx.Response(429, headers={"Retry-After": "1"})))
    with pytest.raises(EmbeddingServerError, match=r"answered 429: .*\(after 2 tries\)$"):
        stubborn.embed(["cat"], is_query=False)
    assert waits[-1] == 5.0  # backoff beyond Retry-After: the larger wait
    with pytest.raises(EmbeddingServerError, match="answered 400: bad$"):  # not retried
        make_backend(base_url="http://server:1", transport=httpx.MockTransport(
            lambda r: httpx.Response(400, json={"error": {"message": "bad"}}))).embed(["cat"], is_query=True)


# ---------------------------------------------------------------------- MTEB (an in-memory AbsTaskRetrieval, no hub)
def word_pairs_dataset() -> BeirDataset:
    """45 two-word documents (some with titles); each query names two words; graded qrels."""
    pairs = [(a, b) for i, a in enumerate(WORDS) for b in WORDS[i + 1:]]
    corpus = {f"d{i}": {"title": a if i % 3 == 0 else "", "text": f"the {b}" if i % 3 == 0 else f"the {a} and the {b}"}
              for i, (a, b) in enumerate(pairs)}
    queries, qrels = {}, {}
    for i in range(0, len(pairs), 4):
        a, b = pairs[i]
        queries[f"q{i}"] = f"{b} {a}"
        qrels[f"q{i}"] = {f"d{i}": 2, f"d{(i + 7) % len(pairs)}": 1}
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels)


def test_mteb_encoder_picks_the_side_from_the_prompt_type(model):
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.models.models_protocols import EncoderProtocol
    from mteb.types import PromptType

    from retrievals.integrations import MTEBModel, beir_retrieval_task

    wrapped = MTEBModel(model)
    assert isinstance(wrapped, EncoderProtocol)
    meta = wrapped.mteb_model_meta
    assert (meta.name, meta.embed_dim, meta.similarity_fn_name.value, meta.use_instructions) == \
        ("retrievals/" + model.model.config._name_or_path.rstrip("/").split("/")[-1], 32, "cosine", True)
    task = beir_retrieval_task(word_pairs_dataset())
    texts = ["cat dog", "the sun and the moon", "blue", "a red fish in the ocean", "sky"]
    corpus = Dataset.from_list([{"id": str(i), "title": "" if i % 2 else "green", "text": t} for i, t in enumerate(texts)])
    joined = [t if i % 2 else f"green {t}" for i, t in enumerate(texts)]  # mteb joins title and text
    queries = Dataset.from_list([{"id": str(i), "text": t} for i, t in enumerate(texts)])

    def run(dataset, prompt_type, encoder=wrapped):
        loader = create_dataloader(dataset, task_metadata=task.metadata, prompt_type=prompt_type, batch_size=2)
        return encoder.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                              prompt_type=prompt_type, batch_size=2)

    # (mteb's batches of 2 pad differently from one batch: float32 rounding only)
    np.testing.assert_allclose(run(queries, PromptType.query), model.encode_queries(texts), atol=1e-6, rtol=0)
    np.testing.assert_allclose(run(corpus, PromptType.document), model.encode_corpus(joined), atol=1e-6, rtol=0)
    assert not np.allclose(model.encode_queries(texts), model.encode_corpus(texts), atol=1e-3)
    plain = wrapped.encode(texts, task_metadata=task.metadata, hf_split="test", hf_subset="default")
    np.testing.assert_array_equal(plain, model.encode_corpus(texts))  # no prompt type: document side
    as_query = MTEBModel(model, symmetric_as_query=True).encode(texts, task_metadata=task.metadata, hf_split="test",
                                                                hf_subset="default", prompt_type=None)
    np.testing.assert_array_equal(as_query, model.encode_queries(texts))
    assert wrapped.encode([], task_metadata=task.metadata, hf_split="test", hf_subset="default").shape == (0, 32)
    with pytest.raises(ValueError, match="precision='binary' is not supported"):
        wrapped.encode(texts, task_metadata=task.metadata, hf_split="test", hf_subset="default", precision="binary")
    with pytest.raises(TypeError, match="MTEBModel wraps an AutoModelForEmbedding"):
        MTEBModel(object())


def run_mteb(model, data, name: str = "WordPairs", **kwargs):
    """mteb's own evaluation of ``MTEBModel(model)`` on ``data`` (a BeirDataset or a BEIR folder)."""
    import mteb

    from retrievals.integrations import MTEBModel, beir_retrieval_task

    result = mteb.evaluate(MTEBModel(model, **kwargs), beir_retrieval_task(data, name=name), cache=None,
                           co2_tracker=False, show_progress_bar=False, encode_kwargs={"batch_size": 8})
    (task_result,) = result.task_results
    (scores,) = task_result.scores["test"]
    return task_result, scores


def test_mteb_evaluate_reports_our_ndcg(model, tiny_beir_dir):
    from retrievals.data.beir import load_beir

    data = word_pairs_dataset()
    ours = evaluate_retrieval(model, data, metrics=("ndcg@10", "mrr@10", "recall@100", "map@100")).metrics
    assert 0.1 < ours["ndcg@10"] < 0.9  # a random tiny model: a figure that discriminates
    task_result, scores = run_mteb(model, data)
    assert task_result.task_name == "WordPairs" and task_result.get_score() == scores["ndcg_at_10"]
    for mine, theirs in (("ndcg@10", "ndcg_at_10"), ("mrr@10", "mrr_at_10"), ("recall@100", "recall_at_100"),
                         ("map@100", "map_at_100")):
        assert scores[theirs] == pytest.approx(ours[mine], abs=1e-4), mine  # mteb rounds to 5 decimals
    # a BEIR folder on disk (gzipped corpus, titles) gives the task directly
    _, scores = run_mteb(model, tiny_beir_dir, name="TinyBeir")
    ours = evaluate_retrieval(model, load_beir(tiny_beir_dir)).metrics
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-4) and ours["ndcg@10"] < 1


@pytest.mark.slow
def test_minilm_adapters_and_mteb_on_scifact(minilm_dir, data_dir):
    """The real model: semantic retrieval through both frameworks, and mteb's nDCG@10 on a SciFact slice."""
    from langchain_core.vectorstores import InMemoryVectorStore
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from retrievals.data.beir import load_beir

    model = AutoModelForEmbedding.from_pretrained(minilm_dir, precision="fp32")
    docs = ["The Eiffel Tower is a wrought-iron lattice tower in Paris.", "Photosynthesis turns light into chemical "
            "energy in plants.", "The stock market fell sharply on Monday.", "Penguins are flightless birds of the "
            "Southern Hemisphere."]
    questions = ["Which landmark stands in the French capital?", "How do plants make energy from sunlight?",
                 "What happened to share prices?", "Which birds cannot fly and live near Antarctica?"]
    store = InMemoryVectorStore(LangChainEmbeddings(model))
    store.add_texts(docs)
    embed_model = LlamaIndexEmbedding(model)
    retriever = VectorStoreIndex([TextNode(text=d) for d in docs], embed_model=embed_model).as_retriever(
        similarity_top_k=1)
    for question, doc in zip(questions, docs):
        assert store.similarity_search(question, k=1)[0].page_content == doc
        assert retriever.retrieve(question)[0].node.text == doc
    np.testing.assert_array_equal(np.asarray(embed_model.get_query_embedding(questions[0]), dtype=np.float32),
                                  model.encode_queries(questions[0]))

    full = load_beir(f"{data_dir}/scifact", split="test")  # a slice: 20 claims, their abstracts, 30 others
    queries = dict(list(full.queries.items())[:20])
    keep = {d for q in queries for d in full.qrels[q]} | set(list(full.corpus)[:30])
    data = BeirDataset(corpus={d: full.corpus[d] for d in full.corpus if d in keep}, queries=queries,
                       qrels={q: full.qrels[q] for q in queries})
    model.embedding_config.max_length = 128  # CPU time; both paths read the same setting
    ours = evaluate_retrieval(model, data).metrics["ndcg@10"]
    _, scores = run_mteb(model, data, name="sentence-transformers/all-MiniLM-L6-v2")
    assert scores["ndcg_at_10"] == pytest.approx(ours, abs=1e-4)
    assert 0.5 < ours < 1.0
