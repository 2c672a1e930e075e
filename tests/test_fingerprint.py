"""The model fingerprint that guards every vectors folder and index: every weight, and every setting that
changes the vectors, changes it; the same model loaded twice (or from a copy) keeps it."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from retrievals import AutoModelForEmbedding
from retrievals.index.manifest import model_fingerprint
from retrievals.models import fingerprint


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    """Each test hashes into its own cache folder (and starts with an empty in-process cache)."""
    monkeypatch.setenv("RETRIEVALS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_FILE_HASHES", {})


def _wide_bert(tiny_bert_dir: str, path: str) -> str:
    """A BERT whose safetensors file is ~7 MiB: its middle layers lie outside the first and last MiB."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=70, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=4096)
    BertModel(config).eval().save_pretrained(path)
    for name in os.listdir(tiny_bert_dir):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(tiny_bert_dir, name), path)
    return path


@pytest.fixture(scope="module")
def wide_bert_dir(tiny_bert_dir, tmp_path_factory) -> str:
    return _wide_bert(tiny_bert_dir, str(tmp_path_factory.mktemp("wide_bert")))


def _load(path: str, **kwargs) -> AutoModelForEmbedding:
    return AutoModelForEmbedding.from_pretrained(path, pooling_method=kwargs.pop("pooling_method", "mean"),
                                                 precision="fp32", **kwargs)


def _set_weight(path: str, tensor: str, index: int, value: float) -> int:
    """Overwrite one float32 of ``tensor`` in a safetensors file in place; returns its byte offset."""
    with open(path, "r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        offset = 8 + header_len + header[tensor]["data_offsets"][0] + 4 * index
        f.seek(offset)
        f.write(struct.pack("<f", value))
    return offset


def test_one_weight_in_the_middle_of_the_file_changes_the_fingerprint(wide_bert_dir, tmp_path):
    changed = shutil.copytree(wide_bert_dir, tmp_path / "changed")
    weights = os.path.join(changed, "model.safetensors")
    size = os.path.getsize(weights)
    before = model_fingerprint(_load(str(changed)))
    offset = _set_weight(weights, "encoder.layer.2.attention.self.query.weight", 1000, 0.5)
    assert (1 << 20) < offset < size - (1 << 20), "the weight must lie outside the first and last MiB"
    after_model = _load(str(changed))
    base_model = _load(wide_bert_dir)
    assert after_model.model.encoder.layer[2].attention.self.query.weight.flatten()[1000].item() == 0.5
    assert model_fingerprint(after_model) != before
    assert model_fingerprint(base_model) == before


def test_every_setting_that_changes_the_vectors_changes_the_fingerprint(wide_bert_dir):
    base = model_fingerprint(_load(wide_bert_dir))
    variants = [dict(pooling_method="cls"), dict(normalize_embeddings=False), dict(query_instruction="query: "),
                dict(document_instruction="passage: "), dict(max_length=16), dict(query_max_length=8),
                dict(quantization="int8")]  # lossy int8 vectors must not mix with the float model's
    prints = [model_fingerprint(_load(wide_bert_dir, **v)) for v in variants]
    assert len({base, *prints}) == len(variants) + 1


def test_the_same_saved_model_twice_has_one_fingerprint(wide_bert_dir, tmp_path, monkeypatch):
    model = _load(wide_bert_dir)
    model.save_pretrained(str(tmp_path / "a"))
    model.save_pretrained(str(tmp_path / "b"))
    monkeypatch.chdir(tmp_path)
    prints = {model_fingerprint(_load(p)) for p in ("a", str(tmp_path / "a"), "b", str(tmp_path / "b"))}
    assert len(prints) == 1
    assert model_fingerprint(_load("a")) == model_fingerprint(_load("a"))  # deterministic, and cached alike


def test_a_merged_lora_fine_tune_gets_another_fingerprint(wide_bert_dir, tmp_path):
    """LoRA on query and value of the middle layers, merged and saved: other vectors, other fingerprint.
    The adapter in memory (not merged yet) also differs from the base."""
    from peft import LoraConfig, get_peft_model

    base = _load(wide_bert_dir)
    tuned = _load(wide_bert_dir)
    torch.manual_seed(3)
    tuned.model = get_peft_model(tuned.model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                         layers_to_transform=[1, 2, 3], init_lora_weights=False))
    assert model_fingerprint(tuned) != model_fingerprint(base)
    tuned.save_pretrained(str(tmp_path / "merged"))
    merged = _load(str(tmp_path / "merged"))
    texts = ["the cat is blue", "what is the sun", "one two three four five"]
    cosines = np.sum(base.encode(texts) * merged.encode(texts), axis=1)
    assert cosines.max() < 0.999
    assert model_fingerprint(merged) != model_fingerprint(base)


def test_a_model_in_memory_is_hashed_whole(wide_bert_dir):
    """Without weights files (built in memory), every byte of every tensor counts, not the first MiB."""
    loaded = _load(wide_bert_dir)
    loaded.model.config._name_or_path = ""
    model = AutoModelForEmbedding(loaded.model, loaded.tokenizer, loaded.embedding_config, precision="fp32")
    before = model_fingerprint(model)
    table = model.model.embeddings.position_embeddings.weight  # 4096 x 128 float32: 2 MiB
    with torch.no_grad():
        table[-1, -1] += 1.0
    assert model_fingerprint(model) != before


def test_the_file_hash_is_cached_by_file_identity(wide_bert_dir, tmp_path, monkeypatch):
    """Hashed once per file (path, size, mtime, inode), also across processes (a cache file); a rewritten
    file is hashed again."""
    copy = shutil.copytree(wide_bert_dir, tmp_path / "copy")
    weights = os.path.join(copy, "model.safetensors")
    calls = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: calls.append(path) or real(path))
    first = model_fingerprint(_load(str(copy)))
    monkeypatch.setattr(fingerprint, "_FILE_HASHES", {})  # a new process: only the cache file is left
    assert model_fingerprint(_load(str(copy))) == first
    assert calls == [weights]
    assert os.listdir(tmp_path / "cache")
    _set_weight(weights, "pooler.dense.bias", 0, 9.0)
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 1000))
    assert model_fingerprint(_load(str(copy))) != first
    assert calls == [weights, weights]


def test_weights_files_are_those_the_model_loads(tmp_path):
    from retrievals.models.loading import weights_files

    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin",
                 "training_args.bin", "a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"x")
    found = [os.path.basename(p) for p in weights_files(str(folder), True, {})]
    assert found == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [os.path.basename(p) for p in weights_files(str(folder), True, {"gguf_file": "b.gguf"})] == ["b.gguf"]
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / name).unlink()
    assert [os.path.basename(p) for p in weights_files(str(folder), True, {"use_safetensors": False})] == \
        ["pytorch_model.bin"]


def test_weights_changed_in_memory_after_loading_change_the_fingerprint(wide_bert_dir):
    """A model fine-tuned in the process that loaded it (finetune_beir's rounds, a notebook) is not the
    model of its files: an optimizer step, or weights set by hand, give another fingerprint."""
    model = _load(wide_bert_dir)
    loaded = model_fingerprint(model)
    model.encode(["hello world"])  # inference changes nothing
    assert model_fingerprint(model) == loaded
    param = model.model.encoder.layer[3].attention.self.query.weight
    param.grad = torch.ones_like(param)
    torch.optim.SGD([param], lr=1e-3).step()  # in place, as every optimizer does
    stepped = model_fingerprint(model)
    assert stepped != loaded
    moved = _load(wide_bert_dir)
    moved.model.pooler.dense.weight.data = moved.model.pooler.dense.weight.data + 1e-3  # a tensor swapped in
    assert model_fingerprint(moved) not in (loaded, stepped)
