import json
import os
import shutil

import numpy as np
import pytest
import torch

from retrievals import AutoModelForEmbedding, similarity
from retrievals.models.embedding_model import length_sorted_batches
from retrievals.models.tokenization import spread_batches

TEXTS = [
    "hello world",
    "what is the blue sky and the red sun and the green ocean with fish",
    "cat",
    "how to search long text with one model",
    "dog and cat",
]


def manual_embedding(model, text: str, pooling: str) -> torch.Tensor:
    """Reference: run the backbone on one unpadded text and pool by hand."""
    ids = model.tokenizer(text)["input_ids"]
    if model.embedding_config.append_eos:
        ids = ids + [model.tokenizer.eos_token_id]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    ref = {"cls": hidden[0], "last": hidden[-1], "mean": hidden.mean(0), "max": hidden.max(0).values,
           "weightedmean": (hidden * torch.arange(1, len(ids) + 1)[:, None]).sum(0) / sum(range(1, len(ids) + 1))}[pooling]
    return torch.nn.functional.normalize(ref, dim=-1)


@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "weightedmean", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_bert_encode_matches_manual(tiny_bert_dir, pooling, side):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method=pooling, precision="fp32")
    model.embedding_config.padding_side = side
    emb = model.encode(TEXTS, batch_size=2, convert_to_tensor=True)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(emb[i], manual_embedding(model, text, pooling), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_decoder_last_pooling_left_equals_right(request, fixture):
    path = request.getfixturevalue(fixture)
    model = AutoModelForEmbedding.from_pretrained(path, pooling_method="last", precision="fp32")
    assert model.embedding_config.append_eos
    assert model.tokenizer.pad_token == model.tokenizer.eos_token  # reused, vocabulary not grown
    model.embedding_config.padding_side = "right"
    right = model.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    model.embedding_config.padding_side = "left"
    left = model.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(right[i], manual_embedding(model, text, "last"), atol=1e-5, rtol=1e-4)


def test_decoder_eos_appended_once_and_within_max_length(tiny_llama_dir):
    model = AutoModelForEmbedding.from_pretrained(tiny_llama_dir, pooling_method="last", max_length=6)
    eos = model.tokenizer.eos_token_id
    ids = model.tokenize(["hello world", "one two three four five six seven eight"])
    assert ids[0][-1] == eos and ids[0].count(eos) == 1
    assert len(ids[1]) == 6 and ids[1][-1] == eos
    # mean pooling on a decoder does not need EOS
    mean_model = AutoModelForEmbedding.from_pretrained(tiny_llama_dir, pooling_method="mean")
    assert not mean_model.embedding_config.append_eos


def test_order_restored_and_batch_invariant(tiny_bert_dir):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")
    together = model.encode(TEXTS, batch_size=3)
    for i, text in enumerate(TEXTS):
        alone = model.encode(text)
        assert alone.shape == (32,)
        np.testing.assert_allclose(together[i], alone, atol=1e-5)
    assert model.encode(TEXTS, convert_to_tensor=True).shape == (5, 32)
    assert model.encode([]).shape == (0, 32)


def test_length_sorted_batches_respect_limits():
    lengths = [5, 50, 10, 50, 3, 20]
    batches = list(length_sorted_batches(lengths, batch_size=3, max_tokens=100))
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 100
    assert [lengths[b[0]] for b in batches] == sorted([lengths[b[0]] for b in batches], reverse=True)
    assert list(length_sorted_batches([500], batch_size=4, max_tokens=100)) == [[0]]


def test_min_fill_keeps_short_texts_out_of_long_batches():
    lengths = [256, 20, 240, 18, 25, 130, 22]
    assert list(length_sorted_batches(lengths, batch_size=32, max_tokens=4096)) == [[0, 2, 5, 4, 6, 1, 3]]
    assert list(length_sorted_batches(lengths, 32, 4096, min_fill=0.5)) == [[0, 2, 5], [4, 6, 1, 3]]
    assert list(length_sorted_batches(lengths, 2, 4096, min_fill=0.5)) == [[0, 2], [5], [4, 6], [1, 3]]


def test_spread_batches_gives_every_stream_work_and_keeps_every_text_once():
    # dealt out alternately: a batch sorted by length gives each stream as many long texts
    assert spread_batches([[0, 1, 2, 3, 4, 5, 6, 7, 8]], 2) == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    # then split on while one costs more than 1.5 shares (10 texts / 4 streams)
    assert spread_batches([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]], 4) == [[0, 4], [2, 6], [1, 5], [3, 7], [8, 9]]
    assert spread_batches([[0, 1, 2]], 4) == [[0, 1, 2]]  # too small to halve (min_size 2)
    assert spread_batches([[5, 6], [7]], 1) == [[5, 6], [7]] and spread_batches([], 4) == []
    # by padded tokens: 5 abstracts (5 x 256) against 11 queries (11 x 30) on 2 streams -> the abstracts split
    lengths = [256] * 5 + [30] * 11
    got = spread_batches([[0, 1, 2, 3, 4], list(range(5, 16))], 2, lengths)
    assert got == [[0, 2, 4], [1, 3], list(range(5, 16))]


def test_instructions_only_on_their_side(tiny_bert_dir):
    plain = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")
    model = AutoModelForEmbedding.from_pretrained(
        tiny_bert_dir, pooling_method="mean", precision="fp32",
        query_instruction="query ", document_instruction="passage ",
    )
    text = ["cat and dog"]
    np.testing.assert_allclose(model.encode(text, is_query=True), plain.encode(["query cat and dog"]), atol=1e-6)
    np.testing.assert_allclose(model.encode_queries(text), plain.encode(["query cat and dog"]), atol=1e-6)
    np.testing.assert_allclose(model.encode(text), plain.encode(["passage cat and dog"]), atol=1e-6)
    np.testing.assert_allclose(model.encode_corpus(text), plain.encode(["passage cat and dog"]), atol=1e-6)
    docs = [{"title": "sky", "text": "blue"}]
    np.testing.assert_allclose(model.encode_corpus(docs), plain.encode(["passage sky blue"]), atol=1e-6)


def test_save_load_round_trip(tiny_llama_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(
        tiny_llama_dir, pooling_method="last", query_instruction="query ", document_instruction="passage ",
        max_length=32, normalize_embeddings=False, precision="fp32",
    )
    expected_q = model.encode(TEXTS, is_query=True)
    expected_d = model.encode(TEXTS)
    model.save_pretrained(tmp_path / "saved")
    files = os.listdir(tmp_path / "saved")
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    loaded = AutoModelForEmbedding.from_pretrained(tmp_path / "saved", precision="fp32")
    assert loaded.embedding_config == model.embedding_config
    np.testing.assert_allclose(loaded.encode(TEXTS, is_query=True), expected_q, atol=1e-6)
    np.testing.assert_allclose(loaded.encode(TEXTS), expected_d, atol=1e-6)
    # an explicit argument still overrides the saved value
    assert AutoModelForEmbedding.from_pretrained(tmp_path / "saved", max_length=8).embedding_config.max_length == 8


def test_saved_directory_loads_in_sentence_transformers(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="cls", precision="fp32",
                                                  query_instruction="query ")
    model.save_pretrained(tmp_path / "saved")
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), model.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="query"), model.encode(TEXTS, is_query=True), atol=1e-5)


def test_reads_sentence_transformers_pooling(tiny_bert_dir, tmp_path):
    target = tmp_path / "st_model"
    shutil.copytree(tiny_bert_dir, target)
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
         "pooling_mode_max_tokens": True}))
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    model = AutoModelForEmbedding.from_pretrained(target)
    cfg = model.embedding_config
    assert (cfg.pooling_method, cfg.normalize_embeddings, cfg.max_length) == ("max", False, 16)


def test_bad_paths_and_names(tiny_bert_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoModelForEmbedding.from_pretrained(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        AutoModelForEmbedding.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="valid names are: cls, last, max, mean, weightedmean"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="average_pool")
    with pytest.raises(ValueError, match="Unknown precision"):
        AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="int3")
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir)
    with pytest.raises(TypeError, match=r"sentences\[1\] must be a string"):
        model.encode(["ok", None])


def test_refuses_pickle_weights_and_custom_code(tiny_bert_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, pickled)
    os.remove(pickled / "model.safetensors")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        AutoModelForEmbedding.from_pretrained(pickled)
    custom = tmp_path / "custom"
    shutil.copytree(tiny_bert_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForEmbedding.from_pretrained(custom)


def test_similarity_helper():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(similarity(a, b), [[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]], atol=1e-6)
    np.testing.assert_allclose(similarity(a, b, metric="dot"), [[2.0, 0.0], [2.0, 3.0]])
    assert isinstance(similarity(torch.tensor(a), b), torch.Tensor)
    with pytest.raises(ValueError, match="cosine, dot"):
        similarity(a, b, metric="l3")


def test_bf16_close_to_fp32_and_truncate_dim(tiny_bert_dir):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    fp32 = model.encode(TEXTS, precision="fp32")
    bf16 = model.encode(TEXTS, precision="bf16")
    assert (fp32 * bf16).sum(1).min() > 0.99
    assert model.dtype == torch.float32  # autocast, weights untouched
    short = model.encode(TEXTS, precision="fp32", truncate_dim=8)
    assert short.shape == (5, 8)
    ref = fp32[:, :8] / np.linalg.norm(fp32[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short, ref, atol=1e-5)
    with pytest.raises(ValueError, match="truncate_dim"):
        model.encode(TEXTS, truncate_dim=64)


def test_forward_matches_encode_and_has_gradients(tiny_bert_dir):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")
    from retrievals.models.tokenization import pad_batch

    batch = pad_batch(model.tokenize(TEXTS[:2]), model.tokenizer.pad_token_id)
    model.train()
    out = model(**batch)
    out.sum().backward()
    assert model.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    model.eval()
    torch.testing.assert_close(model(**batch).detach(), model.encode(TEXTS[:2], convert_to_tensor=True), atol=1e-5,
                               rtol=1e-4)


def test_one_position_limit_for_the_default_length_and_the_embed_cap(tiny_bert_dir):
    """``position_limit`` is the one home of the limit: the default max_length (up to 512) and embed's cap."""
    from types import SimpleNamespace

    from retrievals.models.loading import position_limit

    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    assert position_limit(model.model.config, model.tokenizer) == 64 == model.embedding_config.max_length
    no_limit = SimpleNamespace(model_max_length=int(1e30))
    assert position_limit(SimpleNamespace(max_position_embeddings=2048), no_limit) == 2048
    assert position_limit(SimpleNamespace(), SimpleNamespace(model_max_length=128)) == 128
    assert position_limit(SimpleNamespace(max_position_embeddings=None), SimpleNamespace()) is None
