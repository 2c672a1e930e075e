"""Weight quantisation (int8 dynamic, bitsandbytes checks) and int8/binary embedding search with rescoring."""

import gzip
import json
import os

import numpy as np
import pytest
import torch

from retrievals import AutoModelForEmbedding
from retrievals.evaluation.metrics import evaluate_run
from retrievals.evaluation.quantized_search import (
    hamming_distances,
    quantize_embeddings,
    quantized_search,
)
from retrievals.evaluation.retrieval import evaluate_retrieval
from retrievals.evaluation.search import exact_search
from retrievals.models import quantization as q
from retrievals.models.precision import cpu_has_fast_bf16
from retrievals.pipelines import embed

TEXTS = ["what is the sun", "the cat and the dog", "blue ocean sky", "define protein", "hello world one two three"]
WORDS = "cat dog fish sky sun moon ocean blue red green".split()


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ------------------------------------------------------------------------------------------- int8 model
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_int8_model_close_to_fp32_tiny(tiny_bert_dir, backend):
    fp32 = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, device="cpu", precision="fp32")
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, device="cpu", precision="fp32")
    q.quantize_int8(model, backend=backend)
    assert model.quantization == "int8" and model.int8_backend == backend and model.precision == "fp32"
    linears = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not [m for m in linears if type(m) is torch.nn.Linear]  # every float Linear was replaced
    a, b = fp32.encode(TEXTS), model.encode(TEXTS)
    assert cosines(a, b).min() > 0.99
    assert not np.allclose(a, b, atol=1e-6)  # it really is quantised


def test_int8_from_pretrained_uses_cpu_and_refuses_training_and_saving(tiny_bert_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="INT8")
    assert model.quantization == "int8" and model.device.type == "cpu"
    inputs = model.tokenizer(["cat dog"], return_tensors="pt")
    model.train()
    with pytest.raises(ValueError, match="can only run inference"):
        model(inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="Cannot save an int8-quantized model"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(ValueError, match="runs in fp32"):
        model.encode(TEXTS, precision="bf16")
    with pytest.raises(ValueError, match="CPU only"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int8", device="cuda")


def test_int8_auto_backend_falls_back_to_native_without_torch_ao(tiny_bert_dir, monkeypatch):
    monkeypatch.setattr(q, "_torch_ao_quantize_dynamic", lambda: None)
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int8")
    assert model.int8_backend == "native"
    assert isinstance(model.model.encoder.layer[0].intermediate.dense, q.Int8DynamicLinear)
    with pytest.raises(ValueError, match="backend='torch' needs torch.ao"):
        q.quantize_int8(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, device="cpu"), backend="torch")


def test_int8_native_linear_matches_hand_computation():
    linear = torch.nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.27, -0.5], [0.3, 1.27]]))  # row scales 0.01: exact in int8
        linear.bias.copy_(torch.tensor([0.1, -0.2]))
    layer = q.Int8DynamicLinear(linear)
    assert layer.weight_t.t().tolist() == [[127, -50], [30, 127]]
    # row max 2.54 -> activation scale 0.02; 0.011 rounds to 1 step = 0.02
    out = layer(torch.tensor([[2.54, -1.0], [2.54, 0.011]]))
    expected = [[2.54 * 1.27 + 0.5 + 0.1, 2.54 * 0.3 - 1.27 - 0.2],
                [2.54 * 1.27 - 0.02 * 0.5 + 0.1, 2.54 * 0.3 + 0.02 * 1.27 - 0.2]]
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_int8_minilm_close_to_fp32(minilm_dir, data_dir):
    with gzip.open(os.path.join(data_dir, "scifact", "corpus.jsonl.gz"), "rt") as f:
        docs = [json.loads(next(f)) for _ in range(40)]
    texts = [f"{d['title']} {d['text']}" for d in docs]
    fp32 = AutoModelForEmbedding.from_pretrained(minilm_dir, max_length=128, device="cpu", precision="fp32")
    ref = fp32.encode(texts)
    int8 = AutoModelForEmbedding.from_pretrained(minilm_dir, max_length=128, quantization="int8")
    cos = cosines(ref, int8.encode(texts))
    assert cos.mean() > 0.975 and cos.min() > 0.95, (cos.mean(), cos.min())
    native = AutoModelForEmbedding.from_pretrained(minilm_dir, max_length=128, device="cpu")
    q.quantize_int8(native, backend="native")  # per-token activation scales: closer still
    assert cosines(ref, native.encode(texts)).min() > 0.99
    # the quantised model still finds each text from a prefix of it
    queries = int8.encode_queries([t[:80] for t in texts[:10]])
    assert (exact_search(queries, ref, top_k=1)[1][:, 0].numpy() == np.arange(10)).mean() >= 0.9


# ------------------------------------------------------------------------------------------- names, bnb
def test_unknown_quantization_name_fails_before_loading(tiny_bert_dir, monkeypatch):
    import retrievals.models.embedding_model as em

    monkeypatch.setattr(em, "load_backbone", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"Unknown quantization 'int4'; valid values are: int8, bnb-8bit, bnb-4bit"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int4")
    with pytest.raises(ValueError, match=r"needs a CUDA device, and none is available"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="bnb-4bit")
    with pytest.raises(ValueError, match="Unknown int8 backend 'onnx'"):
        q.quantize_int8(torch.nn.Linear(2, 2), backend="onnx")
    assert q.canonical_quantization("none") is None and q.canonical_quantization("BNB_8bit") == "bnb-8bit"


def test_bnb_checks_and_config(monkeypatch):
    assert not torch.cuda.is_available()
    with pytest.raises(ValueError, match=r"'bnb-8bit' \(bitsandbytes\) needs a CUDA device"):
        q.prepare_quantization("bnb-8bit", {}, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(q.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the bitsandbytes package, which is not installed"):
        q.prepare_quantization("bnb-4bit", {}, None)
    cfg8 = q.bnb_quantization_config("bnb-8bit")
    assert cfg8.load_in_8bit and not cfg8.load_in_4bit
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cfg4 = q.bnb_quantization_config("bnb-4bit")
    assert cfg4.load_in_4bit and cfg4.bnb_4bit_quant_type == "nf4" and cfg4.bnb_4bit_compute_dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- embeddings
def test_quantize_embeddings_int8_by_hand():
    x = np.array([[0.0, 1.0, 5.0], [2.0, -1.0, 5.0], [1.5, 0.5, 5.0]], dtype=np.float32)
    out = quantize_embeddings(x, "int8")
    # dim 0: range [0, 2], step 2/255: 0 -> 0-128, 2 -> 255-128, 1.5 -> rint(191.25)=191 -> 63
    # dim 1: range [-1, 1]: 1 -> 127, -1 -> -128, 0.5 -> rint(191.25)=191 -> 63; dim 2 constant: step 1 -> -128
    assert out.values.dtype == np.int8
    assert out.values.tolist() == [[-128, 127, -128], [127, -128, -128], [63, 63, -128]]
    np.testing.assert_allclose(out.steps, [2 / 255, 2 / 255, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out.dequantize()[2], [191 * 2 / 255, -1 + 191 * 2 / 255, 5.0], rtol=1e-5)
    calibrated = quantize_embeddings(np.array([[1.0], [9.0], [-9.0]]), "int8", calibration=np.array([[-4.0], [4.0]]))
    assert calibrated.values[:, 0].tolist() == [31, 127, -128]  # 5 / (8/255) = 159.4 -> 159; outside clips
    again = quantize_embeddings(np.array([[2.0, 0.5, 7.0]]), "int8", ranges=(out.starts, out.steps))
    assert again.values.tolist() == [[127, 63, -126]]
    with pytest.raises(ValueError, match=r"Unknown embedding precision 'int4'; valid values are: int8, binary"):
        quantize_embeddings(x, "int4")


def test_quantize_embeddings_binary_by_hand():
    x = np.array([[0.5, -1, 0, 2, 3, -0.1, 0.2, -5, 1]], dtype=np.float32)
    out = quantize_embeddings(torch.from_numpy(x), "binary")
    assert out.values.tolist() == [[0b10011010, 0b10000000]] and out.dim == 9
    assert out.dequantize().tolist() == [[1, -1, -1, 1, 1, -1, 1, -1, 1]]


def test_hamming_distances_by_hand():
    a = np.packbits(np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1], [0] * 9], dtype=np.uint8), axis=1)
    b = np.packbits(np.array([[0, 0, 1, 0, 0, 0, 0, 1, 1], [1] * 9], dtype=np.uint8), axis=1)
    assert hamming_distances(a, b).tolist() == [[3, 5], [3, 9]]  # differ at bits 0,3,7 / 4 zeros of 9 / ...
    rng = np.random.default_rng(0)
    bits_a, bits_b = rng.integers(0, 2, (4, 128)), rng.integers(0, 2, (6, 128))  # 16 bytes: the uint64 path
    expected = [[sum(int(x != y) for x, y in zip(ra, rb)) for rb in bits_b] for ra in bits_a]
    assert hamming_distances(np.packbits(bits_a.astype(np.uint8), axis=1),
                             np.packbits(bits_b.astype(np.uint8), axis=1)).tolist() == expected


@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_rescoring_search_recovers_exact_top_k(precision):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((300, 48)).astype(np.float32)
    queries = rng.standard_normal((20, 48)).astype(np.float32)
    quantized = quantize_embeddings(corpus, precision)
    exact_scores, exact_idx = exact_search(queries, corpus, top_k=10)
    # enough candidates (all 300) and float rescoring: exactly the exact-search result
    scores, idx = quantized_search(queries, quantized, top_k=10, rescore_multiplier=30, rescore_embeddings=corpus,
                                   chunk_size=7)
    assert idx.tolist() == exact_idx.tolist()
    np.testing.assert_allclose(scores.numpy(), exact_scores.numpy(), rtol=1e-5)
    # rescoring with the stored vectors equals exact search over the de-quantised corpus
    scores, idx = quantized_search(queries, quantized, top_k=10, rescore_multiplier=30)
    deq_scores, deq_idx = exact_search(queries, quantized.dequantize(), top_k=10)
    assert idx.tolist() == deq_idx.tolist()
    np.testing.assert_allclose(scores.numpy(), deq_scores.numpy(), rtol=1e-4)
    # 20 candidates: the exact top 10 is partly missed, but far more is found than 20 random docs would (6.7%)
    _, idx = quantized_search(queries, quantized, top_k=10, rescore_multiplier=2, rescore_embeddings=corpus)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), exact_idx.tolist())])
    assert {"binary": 0.3, "int8": 0.9}[precision] < overlap <= 1.0, overlap
    with pytest.raises(ValueError, match="rescore_multiplier must be >= 1, got 0"):
        quantized_search(queries, quantized, rescore_multiplier=0)


# ------------------------------------------------------------------------------------------- pipeline
def write_pairs(path, n=48):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.choice(WORDS, 2, replace=False)
            f.write(json.dumps({"query": f"{a} {b}", "positive": [f"the {a} and the {b}"]}) + "\n")
    return str(path)


def test_embed_pipeline_quantization_flags(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys):
    root = tiny_beir_dir
    argv = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", tiny_bert_dir, "--do_eval",
            "--eval_data_dir", root, "--report_to", "none", "--quantization", "int8",
            "--embedding_quantization", "binary", "--rescore_multiplier", "2"]
    result = embed.run_embed(*embed.parse_args(argv))
    # reference by hand: the int8 model's float embeddings, binary top-20 by Hamming (10 docs -> all), rescored
    # with the +-1 document vectors
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, quantization="int8")
    docs = model.encode_corpus([{"title": w, "text": f"the {w}"} for w in WORDS])
    queries = model.encode_queries(WORDS)
    signs = np.where(docs > 0, 1.0, -1.0)
    expected_run = {f"q{i}": {f"doc-{w}": float(s) for w, s in zip(WORDS, queries[i] @ signs.T)} for i in range(10)}
    qrels = {f"q{i}": {f"doc-{w}": 1} for i, w in enumerate(WORDS)}
    expected = evaluate_run(expected_run, qrels, ["ndcg@10", "mrr@10", "recall@100", "map@100"])
    assert result["metrics"] == pytest.approx(expected)
    # with float rescoring over all documents it is exactly the int8 model's exact search
    float_rescored = embed.run_embed(*embed.parse_args(argv + ["--rescore_with_float", "True"]))
    data = embed.load_beir(root)
    assert float_rescored["metrics"] == pytest.approx(evaluate_retrieval(model, data).metrics)
    # errors: unknown names, bitsandbytes without CUDA, int8 with training / LoRA
    data_file = write_pairs(tmp_path / "train.jsonl")
    train = ["--do_train", "--data_name_or_path", data_file, "--per_device_train_batch_size", "8", "--use_cpu", "True",
             "--save_strategy", "no"]
    for extra, message in [(["--quantization", "int4"], "Unknown quantization 'int4'"),
                           (["--quantization", "bnb-4bit"], "needs a CUDA device"),
                           (["--embedding_quantization", "int4"], "Unknown embedding precision 'int4'"),
                           (["--quantization", "int8", *train], "can only run inference"),
                           (["--quantization", "int8", "--use_lora", "True"], "cannot take --use_lora")]:
        assert embed.main(argv[:9] + extra) == 2
        assert message in capsys.readouterr().err


def test_embed_pipeline_bf16_training_loss_falls(tiny_bert_dir, tmp_path, monkeypatch):
    data_file = write_pairs(tmp_path / "train.jsonl", n=64)
    argv = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", tiny_bert_dir, "--do_train",
            "--data_name_or_path", data_file, "--per_device_train_batch_size", "16", "--num_train_epochs", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
            "--report_to", "none", "--bf16", "True", "--query_max_length", "16", "--document_max_length", "16"]
    model_args, data_args, args = embed.parse_args(argv)
    fast = cpu_has_fast_bf16()  # without bf16 units the CPU trains in fp32 (with a warning)
    assert args.bf16 == fast
    seen = []
    original = torch.nn.Linear.forward

    def spy(self, x):  # record the dtype the Linear layers compute in under the Trainer's autocast
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype)
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    result = embed.run_embed(model_args, data_args, args)
    monkeypatch.undo()
    assert seen and all(d == (torch.bfloat16 if fast else torch.float32) for d in seen[:50])
    losses = result["losses"]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_bf16_reading_can_be_overridden(forced, monkeypatch):
    """RETRIEVALS_CPU_BF16=0 runs the fp32 path of a CPU without bf16 units (how the suite's AVX2-only time is
    measured on a bf16 machine); =1 the bf16 path. The CPU class printed at a test run says so."""
    from retrievals.models import precision

    monkeypatch.setenv(precision.BF16_ENV, forced)
    precision.cpu_has_fast_bf16.cache_clear()
    precision.cpu_class.cache_clear()
    try:
        assert precision.cpu_has_fast_bf16() is (forced == "1")
        assert precision.resolve_precision("auto", torch.device("cpu")) == ("bf16" if forced == "1" else "fp32")
        assert f"RETRIEVALS_CPU_BF16={forced}" in precision.cpu_class()
    finally:
        monkeypatch.undo()
        precision.cpu_has_fast_bf16.cache_clear()
        precision.cpu_class.cache_clear()
