"""The OpenVINO backend and ``auto``: vectors match torch fp32 (real model, real text), an int8 export is
calibrated on the user's documents and reloads with identical vectors, exports follow the weights (files
or memory), the auto choice is measured once and cached, and one model serves many threads."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from conftest import WORDS
from retrievals import AutoModelForEmbedding
from retrievals.backends import auto as auto_choice
from retrievals.backends import openvino as ov_backend
from retrievals.index.manifest import model_fingerprint
from retrievals.pipelines import encode as encode_pipeline


def _texts(n: int, seed: int = 0, longest: int = 40):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, longest)))) for _ in range(n)]


def _scifact(data_dir, n):
    with gzip.open(os.path.join(data_dir, "scifact", "corpus.jsonl.gz"), "rt") as f:
        docs = [json.loads(line) for line, _ in zip(f, range(n))]
    with open(os.path.join(data_dir, "scifact", "queries.jsonl")) as f:
        queries = [json.loads(line)["text"] for line, _ in zip(f, range(n))]
    return [f"{d['title']} {d['text']}" for d in docs], queries


def _min_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVALS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unknown_backend_and_options_are_refused_with_the_valid_ones(tiny_bert_dir):
    with pytest.raises(ValueError, match="Unknown backend 'onnx'; valid backends are: torch, openvino, auto"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, backend="onnx")
    with pytest.raises(ValueError, match=r"Unknown backend_kwargs \['streamz'\]; valid: export_dir"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, backend="openvino", backend_kwargs={"streamz": 2})


def test_openvino_matches_torch_fp32_on_real_text(minilm_dir, data_dir, tmp_path):
    docs, queries = _scifact(data_dir, 48)
    reference = AutoModelForEmbedding.from_pretrained(minilm_dir, precision="fp32", backend="torch")
    for precision, floor in (("fp32", 0.99999), ("auto", 0.999)):  # auto: bf16 hint where the CPU has bf16 units
        model = AutoModelForEmbedding.from_pretrained(minilm_dir, precision=precision, backend="openvino",
                                                      backend_kwargs={"export_dir": str(tmp_path / "ov")})
        for texts, is_query in ((docs, False), (queries, True)):
            got = model.encode(texts, is_query=is_query)
            assert isinstance(model.runner, ov_backend.OpenVINORunner)
            assert _min_cos(got, reference.encode(texts, is_query=is_query)) >= floor, (precision, is_query)
    assert sorted(os.listdir(tmp_path / "ov")) == [".retrievals.lock", "retrievals_export.json", "retrievals_model.bin",
                                                   "retrievals_model.xml"]


def test_int8_is_calibrated_on_the_documents_and_reloads_with_identical_vectors(minilm_dir, data_dir, tmp_path,
                                                                                monkeypatch):
    docs, queries = _scifact(data_dir, 96)
    options = {"export_dir": str(tmp_path / "ov"), "calibration_texts": docs[:64]}
    first = AutoModelForEmbedding.from_pretrained(minilm_dir, precision="int8", backend="openvino",
                                                  backend_kwargs=options)
    vectors = first.encode(docs[64:])
    record = json.loads((tmp_path / "ov" / "retrievals_export.json").read_text())
    assert record["int8"]["documents"] == 64 and record["int8"]["source"].startswith("calibration_texts")
    fp32 = AutoModelForEmbedding.from_pretrained(minilm_dir, precision="fp32", backend="torch").encode(docs[64:])
    assert 0.95 <= _min_cos(vectors, fp32) < 0.99999  # int8: close, and really quantised

    def refuse(*args, **kwargs):
        raise AssertionError("the saved int8 graph must be reused, not calibrated again")

    monkeypatch.setattr(ov_backend, "quantize", refuse)
    again = AutoModelForEmbedding.from_pretrained(minilm_dir, quantization="int8", backend="openvino",
                                                  backend_kwargs={"export_dir": str(tmp_path / "ov")})
    assert np.array_equal(again.encode(docs[64:]), vectors)
    auto = AutoModelForEmbedding.from_pretrained(minilm_dir, quantization="int8", backend="auto",  # finds the saved graph
                                                 backend_kwargs={"export_dir": str(tmp_path / "ov")})
    assert auto.int8_backend == "openvino" and np.array_equal(auto.encode(docs[64:]), vectors)
    assert model_fingerprint(again) == model_fingerprint(first) != model_fingerprint(
        AutoModelForEmbedding.from_pretrained(minilm_dir, quantization="int8", backend="torch"))


def test_int8_without_documents_to_calibrate_on(tiny_bert_dir, tmp_path):
    """Asked for by name, OpenVINO int8 says what it needs; under auto, torch's dynamic int8 runs instead."""
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int8", backend="openvino",
                                                  backend_kwargs={"export_dir": str(tmp_path / "ov")})
    with pytest.raises(ValueError, match="calibrated on your documents.*calibration_texts.*this one has 3"):
        model.encode(_texts(3))
    auto = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int8", backend="auto",
                                                 backend_kwargs={"export_dir": str(tmp_path / "ov")})
    assert auto.int8_backend == "torch" and auto.encode(_texts(3)).shape == (3, 32)
    assert auto.__dict__.get("runner") is None and model_fingerprint(auto) != model_fingerprint(model)
    calibrated = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int8", backend="auto", backend_kwargs={
        "export_dir": str(tmp_path / "ov"), "calibration_texts": _texts(40)})
    assert calibrated.int8_backend == "openvino" and calibrated.encode(_texts(3)).shape == (3, 32)
    assert isinstance(calibrated.runner, ov_backend.OpenVINORunner)


def test_the_export_follows_the_weights_on_disk_and_in_memory(tiny_bert_dir, tmp_path):
    folder = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    texts = _texts(40)
    model = AutoModelForEmbedding.from_pretrained(folder, precision="fp32", backend="openvino")
    before = model.encode(texts)
    assert os.path.exists(os.path.join(folder, "openvino", "retrievals_model.xml"))  # beside the model
    with torch.no_grad():
        model.model.embeddings.word_embeddings.weight.mul_(-1.5)
    changed = model.encode(texts)  # asked for by name: exported again from the weights in memory
    torch_now = model.encode(texts, backend="torch")
    assert _min_cos(changed, torch_now) > 0.99999 and _min_cos(changed, before) < 0.99
    model.save_pretrained(folder)  # the files change: a new load must not reuse the old graph
    reloaded = AutoModelForEmbedding.from_pretrained(folder, precision="fp32", backend="openvino")
    assert _min_cos(reloaded.encode(texts), torch_now) > 0.99999


def test_auto_measures_once_caches_the_choice_and_stays_on_torch_while_training(tiny_bert_dir, cache, monkeypatch):
    texts = _texts(300)
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="fp32", backend="auto")
    model.encode(texts[:10])  # too few texts to measure anything: torch, undecided
    assert model.__dict__.get("backend_choice") is None
    model.encode(texts)
    table = json.loads((cache / auto_choice.CHOICE_FILE).read_text())
    (record,) = table.values()
    assert record["choice"] in ("torch", "openvino") and set(record["texts_per_second"]) == {"torch", "openvino"}
    assert record["min_cosine"]["openvino"] >= 0.999 and model.backend_choice == record["choice"]

    monkeypatch.setattr(auto_choice, "measure", lambda *a, **k: pytest.fail("measured twice"))
    second = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="fp32", backend="auto")
    second.encode(texts[:5])  # the cached choice applies at once, even to a small call
    assert second.backend_choice == record["choice"]
    with torch.no_grad():
        second.model.pooler.dense.bias.add_(1.0)  # as an optimizer step would
    assert np.array_equal(second.encode(texts[:50]), second.encode(texts[:50], backend="torch"))


def test_measure_picks_the_fastest_near_lossless_candidate():
    reference = np.eye(4, dtype=np.float32) + 0.1
    lossy = reference.copy()
    lossy[0] = [1, -1, 0, 0]
    calls = []
    candidates = {"slow": lambda: calls.append("slow") or [sum(range(20000))] and reference,
                  "fast_lossy": lambda: calls.append("fast_lossy") or lossy,
                  "fast": lambda: calls.append("fast") or reference + 1e-6}
    record = auto_choice.measure(candidates, reference, texts=4, rounds=2)
    assert record["choice"] == "fast" and record["min_cosine"]["fast_lossy"] < 0.999
    assert calls == ["slow", "fast_lossy", "fast"] * 3  # one warm-up round, then two interleaved ones


def test_many_threads_share_one_openvino_model(tiny_bert_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, backend="openvino", precision="fp32",
                                                  backend_kwargs={"export_dir": str(tmp_path / "ov")})
    sets = [_texts(30, seed=s) for s in range(8)]
    expected = [model.encode(t) for t in sets]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = model.encode(sets[i])
                assert np.array_equal(results[i], expected[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8


def test_auto_is_the_default_but_not_for_training_pipelines_or_very_large_models(tiny_bert_dir, tmp_path, monkeypatch):
    from retrievals.models import accelerated
    from retrievals.pipelines.arguments import ModelArguments
    from retrievals.pipelines.embed import load_model
    from retrievals.pipelines.finetune_beir import FinetuneArguments, load_base

    monkeypatch.delenv("RETRIEVALS_BACKEND", raising=False)
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="fp32")
    assert model.backend == "auto"
    monkeypatch.setenv("RETRIEVALS_BACKEND", "auto")  # the training pipelines stay on torch whatever the default
    assert load_model(ModelArguments(model_name_or_path=tiny_bert_dir)).backend == "torch"
    assert load_base(FinetuneArguments(model_name_or_path=tiny_bert_dir, data_dir=str(tmp_path),
                                       output_dir=str(tmp_path / "o"))).backend == "torch"
    # above AUTO_MAX_PARAMETERS auto exports nothing and measures nothing: torch
    monkeypatch.setattr(accelerated, "AUTO_MAX_PARAMETERS", 1000)
    model.backend_options = {"export_dir": str(tmp_path / "ov")}
    texts = _texts(accelerated.AUTO_MIN_TEXTS + 8)
    reference = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="fp32", backend="torch").encode(texts)
    assert np.array_equal(model.encode(texts), reference)
    assert model.__dict__.get("runner") is None and not (tmp_path / "ov").exists()


def test_one_batch_is_split_over_the_streams_with_unchanged_vectors(tiny_bert_dir, tmp_path, monkeypatch):
    # a server's one batch of short texts ran on one stream while the other idled
    monkeypatch.setenv("RETRIEVALS_OV_STREAMS", "2")
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, backend="openvino", precision="fp32",
                                                  backend_kwargs={"export_dir": str(tmp_path / "ov")})
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(WORDS, size=20)) for _ in range(24)]  # one length: one batch before the split
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the runner takes torch's thread count (one under `make test`), one per stream
    try:
        model.encode(texts[:2])
    finally:
        torch.set_num_threads(threads)
    runner = model.runner
    assert runner.requests >= 2
    seen = []
    original = runner.encode

    def counting(batches, out):
        batches = list(batches)
        seen.append(sorted(len(rows) for rows, _, _ in batches))
        return original(batches, out)

    monkeypatch.setattr(runner, "encode", counting)
    got = model.encode(texts, batch_size=32)
    assert len(seen) == 1 and len(seen[0]) == runner.requests and sum(seen[0]) == 24
    reference = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="fp32").encode(texts)
    assert _min_cos(got, reference) > 0.9999


@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_with_last_token_pooling_exports_exactly_on_either_padding_side(tiny_llama_dir, tmp_path, side):
    texts = _texts(24)
    models = [AutoModelForEmbedding.from_pretrained(tiny_llama_dir, precision="fp32", backend=backend,
                                                    backend_kwargs={"export_dir": str(tmp_path / "ov")})
              for backend in ("torch", "openvino")]
    for model in models:
        assert model.embedding_config.pooling_method == "last"
        model.embedding_config.padding_side = model.tokenizer.padding_side = side
    np.testing.assert_allclose(models[1].encode(texts), models[0].encode(texts), atol=2e-5)


def test_encode_pipeline_int8_on_openvino_calibrates_once_on_the_corpus(tiny_bert_dir, tmp_path):
    folder = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(_texts(80))))
    argv = ["--model_name_or_path", str(folder), "--corpus", str(corpus), "--backend", "openvino",
            "--precision", "int8", "--chunk_rows", "16"]
    first = encode_pipeline.run_encode(encode_pipeline.EncodeArguments(
        model_name_or_path=str(folder), corpus=str(corpus), output_dir=str(tmp_path / "v1"), backend="openvino",
        precision="int8", chunk_rows=16))
    record = json.loads((folder / "openvino" / "retrievals_export.json").read_text())
    assert record["int8"]["source"] == "calibration_texts (80 documents)"  # the corpus, not the first chunk
    assert encode_pipeline.main(argv + ["--output_dir", str(tmp_path / "v2")]) == 0
    second = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    assert first.model_fingerprint == second["model_fingerprint"]
    import pyarrow.parquet as pq

    read = [pq.read_table(os.path.join(tmp_path / d, first.shards[0].name)).column("embedding").to_pylist()
            for d in ("v1", "v2")]
    assert read[0] == read[1]
