"""Issue 21: one similarity on every index path (the model's), mapped flat indexes, the index's corpus
checked for return_text, nprobe tuned on queries that are not stored vectors, index mining's bans."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.evaluation.search import exact_search
from retrievals.index import LoadedIndex, Searcher, build_index, encode_to_shards
from test_index import all_vectors, job, write_corpus

QUERIES = ["cat dog", "blue ocean", "model retrieval", "sun moon sky", "one two"]


@pytest.fixture(scope="module")
def models(tiny_bert_dir, tmp_path_factory):
    """The tiny model saved normalising (cosine) and not (inner product of unnormalised vectors)."""
    out = {}
    for name, normalize in (("normalised", True), ("unnormalised", False)):
        path = str(tmp_path_factory.mktemp(name))
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean",
                                              normalize_embeddings=normalize).save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", n=80, seed=3)


def encoded(model_dir, corpus, root, dtype="float32", **kw):
    encode_to_shards(job(corpus[0], root / f"vec-{dtype}", model_dir, dtype=dtype, **kw), show_progress=False)
    return str(root / f"vec-{dtype}")


@pytest.mark.parametrize("kind", ["normalised", "unnormalised"])
def test_flat_index_and_exact_search_equal_in_memory_search(models, corpus, tmp_path, kind):
    model = AutoModelForEmbedding.from_pretrained(models[kind], precision="fp32")
    docs = model.encode_corpus([{"title": r["title"], "text": r["text"]} for r in corpus[1]], convert_to_numpy=True)
    norms = np.linalg.norm(docs, axis=1)
    assert np.allclose(norms, 1, atol=1e-4) == (kind == "normalised")
    build_index(encoded(models[kind], corpus, tmp_path), str(tmp_path / "idx"))
    queries = model.encode_queries(QUERIES, convert_to_numpy=True)
    scores, rows = exact_search(queries, docs, 10)  # in memory: the model's similarity
    expected_ids = [[corpus[1][r]["_id"] for r in row] for row in rows.tolist()]
    searcher = Searcher(str(tmp_path / "idx"), model=model)
    for exact in (False, True):
        found = searcher.search(QUERIES, top_k=10, exact=exact)
        assert found.ids == expected_ids, exact
        np.testing.assert_allclose(found.scores, scores.numpy(), rtol=1e-5, atol=1e-5)


def test_binary_index_scores_estimate_the_cosine(models, corpus, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(models["normalised"], precision="fp32")
    build_index(encoded(models["normalised"], corpus, tmp_path, "binary"), str(tmp_path / "bin"))
    build_index(encoded(models["normalised"], corpus, tmp_path), str(tmp_path / "float"))
    _, floats = all_vectors(str(tmp_path / "vec-float32"))
    queries = model.encode_queries(QUERIES, convert_to_numpy=True)
    signs = np.where(floats > 0, 1.0, -1.0).astype(np.float32) * math.sqrt(math.pi / (2 * floats.shape[1]))
    for exact in (False, True):
        found = Searcher(str(tmp_path / "bin"), model=model).search(QUERIES, top_k=10, exact=exact)
        expected, _ = exact_search(queries, signs, 10)  # each bit read as +-sqrt(pi / 2d): a cosine estimate
        np.testing.assert_allclose(found.scores, expected.numpy(), rtol=1e-4, atol=1e-5)
    # on the cosine's scale: each hit's binary score against its float cosine (was ~5.6x with +-1 bits)
    row_of = {r["_id"]: i for i, r in enumerate(corpus[1])}
    got = np.array(found.scores)
    cos = np.array([[floats[row_of[i]] @ q for i in ids] for ids, q in zip(found.ids, queries)])
    assert 0.8 < np.median(got / cos) < 1.25 and np.abs(got - cos).mean() < 0.15, (np.median(got / cos), got - cos)
    # binary signs do not estimate an unnormalised model's inner product: refused, saying why
    with pytest.raises(ValueError, match="does not .*encode with --dtype float32 or int8"):
        build_index(encoded(models["unnormalised"], corpus, tmp_path / "u", "binary"), str(tmp_path / "ubin"))


def mapped(path):
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return any(line.split()[-1] == real for line in f if len(line.split()) == 6)


@pytest.mark.parametrize("index_type", ["flat", "ivf_pq"])
def test_loaded_index_is_memory_mapped(models, corpus, tmp_path, index_type):
    """faiss ignores IO_FLAG_MMAP for flat (and fast-scan) codes: each process held its own copy."""
    build_index(encoded(models["normalised"], corpus, tmp_path), str(tmp_path / "idx"), index_type=index_type, nlist=2)
    path = str(tmp_path / "idx" / "index.faiss")
    index = LoadedIndex(str(tmp_path / "idx"))
    assert mapped(path) and index.mapped_bytes() >= os.path.getsize(path) // 4096 * 4096
    in_memory = LoadedIndex(str(tmp_path / "idx"), mmap=False)
    assert in_memory.mapped_bytes() == index.mapped_bytes()  # the second one read it: no new mapping
    scores_m, ids_m = index.search(np.ones((2, 32), np.float32), 5)
    scores_l, ids_l = in_memory.search(np.ones((2, 32), np.float32), 5)
    assert ids_m == ids_l and np.array_equal(scores_m, scores_l)


def test_return_text_refuses_another_corpus_of_the_same_size(models, corpus, tmp_path):
    folder = encoded(models["normalised"], corpus, tmp_path, store_text=True)
    build_index(folder, str(tmp_path / "idx"))
    assert Searcher(str(tmp_path / "idx")).search("cat", 1, return_text=True).texts[0][0]
    other = write_corpus(tmp_path / "other.jsonl", n=80, seed=4)  # same ids and row count, other texts
    encoded(models["normalised"], other, tmp_path / "o", store_text=True)
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "o" / "vec-float32", folder)
    with pytest.raises(ValueError, match="no longer holds the vectors the index was built from"):
        Searcher(str(tmp_path / "idx")).search("cat", 1, return_text=True)


def test_older_index_formats_are_refused(models, corpus, tmp_path):
    build_index(encoded(models["unnormalised"], corpus, tmp_path), str(tmp_path / "idx"))
    path = tmp_path / "idx" / "index.json"
    manifest = json.loads(path.read_text())
    manifest.update(normalized_here=True, format_version=1)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="older retrievals that scored cosines .* rebuild it: retrievals index"):
        LoadedIndex(str(tmp_path / "idx"))


def test_nprobe_is_tuned_on_queries_that_are_not_stored_vectors(models, corpus, tmp_path):
    """A stored vector as its own query sits in the list probed first: optimistic recall (SciFact, IVF16 at
    nprobe 4: 0.891 on stored vectors, 0.837 on real queries, 0.828 on the turned ones)."""
    from retrievals.index.faiss_index import QUERY_COSINE, _training_sample, tuning_queries
    from retrievals.index.manifest import VectorsManifest

    folder = encoded(models["unnormalised"], corpus, tmp_path)
    manifest = VectorsManifest.load(folder)
    queries, sample = tuning_queries(folder, manifest, 30, 1), _training_sample(folder, manifest, 30, 1)
    norms = np.linalg.norm(sample, axis=1)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), norms, rtol=1e-4)
    np.testing.assert_allclose((queries * sample).sum(1) / norms ** 2, QUERY_COSINE, atol=1e-4)
