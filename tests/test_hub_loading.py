"""A model loaded by hub id (from the HF cache, offline) keeps the settings saved with it.

The fake cache below has huggingface_hub's layout: ``models--org--name/refs/<ref>`` holds a commit hash
and ``models--org--name/snapshots/<hash>/`` the files of that commit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import huggingface_hub.constants
import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.models.embedding_config import CONFIG_NAME
from retrievals.pipelines import build_hn

QUERIES = ["cat dog", "what is the sun", "blue ocean"]
DOCS = ["the cat and the dog", "the sun is a red sky", "the moon and the blue ocean"]
SETTINGS = ("pooling_method", "normalize_embeddings", "query_instruction", "document_instruction", "max_length")


@pytest.fixture
def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1, also in huggingface_hub's constant (read once, when it is first imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def save_cls_model(tiny_bert_dir: str, folder: Path, keep_our_config: bool) -> Path:
    """A tiny BERT saved with CLS pooling, no Normalize module and query/document prompts."""
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="cls", normalize_embeddings=False,
                                                  query_instruction="query: ", document_instruction="passage: ",
                                                  max_length=48, precision="fp32")
    model.save_pretrained(folder)
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"]  # no Normalize
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    if not keep_our_config:
        (folder / CONFIG_NAME).unlink()  # only sentence-transformers' files remain
    return folder


def add_to_hub_cache(cache: Path, repo_id: str, files: Path, ref: str = "main", subfolder: str = "") -> str:
    """Put the files of ``files`` in ``cache`` as the snapshot of ``repo_id`` at ``ref``; return the commit."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files, repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def settings_of(model: AutoModelForEmbedding) -> Dict[str, object]:
    return {k: getattr(model.embedding_config, k) for k in SETTINGS}


def assert_same_model(hub: AutoModelForEmbedding, folder: AutoModelForEmbedding) -> None:
    assert hub.embedding_config == folder.embedding_config
    np.testing.assert_allclose(hub.encode_queries(QUERIES), folder.encode_queries(QUERIES), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hub.encode(DOCS), folder.encode(DOCS), rtol=1e-5, atol=1e-6)


EXPECTED = {"pooling_method": "cls", "normalize_embeddings": False, "query_instruction": "query: ",
            "document_instruction": "passage: ", "max_length": 48}


@pytest.mark.parametrize("keep_our_config", [False, True], ids=["sentence-transformers-files", "retrievals_config"])
def test_hub_id_loads_saved_settings(tiny_bert_dir, tmp_path, offline, keep_our_config):
    folder = save_cls_model(tiny_bert_dir, tmp_path / "model", keep_our_config)
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "org/name", folder)
    from_folder = AutoModelForEmbedding.from_pretrained(folder, precision="fp32")
    assert settings_of(from_folder) == EXPECTED
    from_hub = AutoModelForEmbedding.from_pretrained("org/name", cache_dir=str(cache), precision="fp32")
    assert settings_of(from_hub) == EXPECTED
    assert_same_model(from_hub, from_folder)
    norms = np.linalg.norm(from_hub.encode(DOCS), axis=1)
    assert not np.allclose(norms, 1.0)  # not normalised


def test_hub_id_through_the_default_cache(tiny_bert_dir, tmp_path, offline, monkeypatch):
    """No ``cache_dir``: transformers reads ``huggingface_hub.constants.HF_HUB_CACHE`` at call time."""
    folder = save_cls_model(tiny_bert_dir, tmp_path / "model", keep_our_config=False)
    add_to_hub_cache(tmp_path / "hub", "org/name", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = AutoModelForEmbedding.from_pretrained("org/name", precision="fp32")
    assert_same_model(from_hub, AutoModelForEmbedding.from_pretrained(folder, precision="fp32"))


def test_hub_revision_and_subfolder(tiny_bert_dir, tmp_path, offline):
    """``revision=`` picks the snapshot the settings are read from; ``subfolder=`` the folder inside it."""
    cache = tmp_path / "hub"
    cls_folder = save_cls_model(tiny_bert_dir, tmp_path / "cls", keep_our_config=False)
    add_to_hub_cache(cache, "org/name", cls_folder, ref="main")
    plain = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="max", precision="fp32")
    plain.save_pretrained(tmp_path / "max")
    (tmp_path / "max" / CONFIG_NAME).unlink()
    add_to_hub_cache(cache, "org/name", tmp_path / "max", ref="v2", subfolder="embedder")
    main = AutoModelForEmbedding.from_pretrained("org/name", cache_dir=str(cache), precision="fp32")
    assert settings_of(main) == EXPECTED
    v2 = AutoModelForEmbedding.from_pretrained("org/name", cache_dir=str(cache), revision="v2", subfolder="embedder",
                                               precision="fp32")
    assert (v2.embedding_config.pooling_method, v2.embedding_config.normalize_embeddings) == ("max", True)


def test_hub_id_without_settings_files_uses_defaults(tiny_bert_dir, tmp_path, offline):
    """A plain transformers checkpoint on the hub: missing settings files are not errors."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "org/plain", Path(tiny_bert_dir))
    model = AutoModelForEmbedding.from_pretrained("org/plain", cache_dir=str(cache), precision="fp32")
    assert (model.embedding_config.pooling_method, model.embedding_config.normalize_embeddings) == ("mean", True)


def test_hub_settings_errors_name_the_file(tiny_bert_dir, tmp_path, offline):
    folder = save_cls_model(tiny_bert_dir, tmp_path / "model", keep_our_config=False)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true,\n')
    add_to_hub_cache(tmp_path / "hub", "org/name", folder)
    with pytest.raises(ValueError, match=r"1_Pooling[/\\]config\.json: line 2: invalid JSON"):
        AutoModelForEmbedding.from_pretrained("org/name", cache_dir=str(tmp_path / "hub"))


def run_build_hn(tmp_path: Path, model: str, pooling_method: Optional[str], seen: list, monkeypatch) -> None:
    records = [{"query": q, "positive": [d]} for q, d in zip(QUERIES, DOCS)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    real = build_hn.mine_hard_negatives

    def spy(model, *args, **kwargs):
        seen.append(model.embedding_config)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(build_hn, "mine_hard_negatives", spy)
    args = build_hn.BuildHNArguments(input_file=str(tmp_path / "in.jsonl"), output_file=str(tmp_path / "out.jsonl"),
                                     model_name_or_path=model, range_for_sampling="0-3", negative_number=1,
                                     pooling_method=pooling_method)
    out = build_hn.run_build_hn(args)
    assert len(out) == len(records) and all(len(r["negative"]) == 1 for r in out)


@pytest.mark.parametrize("flag", [None, "mean", "last"])
def test_build_hn_pooling_method_reaches_the_model(tiny_bert_dir, tmp_path, offline, monkeypatch, flag):
    """The seed's ``build_hn --model_name_or_path BAAI/bge-...`` case: a hub id mines with its saved CLS
    pooling, and ``--pooling_method`` overrides it."""
    folder = save_cls_model(tiny_bert_dir, tmp_path / "model", keep_our_config=False)
    add_to_hub_cache(tmp_path / "hub", "BAAI/bge-tiny", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    seen: list = []
    run_build_hn(tmp_path, "BAAI/bge-tiny", flag, seen, monkeypatch)
    assert [cfg.pooling_method for cfg in seen] == [flag or "cls"]
    assert seen[0].query_instruction == "query: "


def test_build_hn_pooling_method_flag_parses(tiny_bert_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in zip(QUERIES, DOCS)))
    argv = ["--model_name_or_path", tiny_bert_dir, "--input_file", str(inp), "--output_file",
            str(tmp_path / "o.jsonl"), "--range_for_sampling", "0-3", "--negative_number", "1"]
    assert build_hn.main(argv + ["--pooling_method", "cls"]) == 0
    assert build_hn.main(argv + ["--pooling_method", "no_such_pooling"]) == 2
    assert "no_such_pooling" in capsys.readouterr().err
