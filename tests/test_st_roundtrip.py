"""Training outputs of ``python -m retrievals.pipelines.embed`` in sentence-transformers: a LoRA-merged model
loads in ``SentenceTransformer`` with our vectors; a multi-vector model loads there only as its dense first
stage (and as a wrong ``MultiVectorEncoder``) until exported with ``export_multi_vector_encoder``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from retrievals import AutoModelForEmbedding, MultiVectorModel
from retrievals.integrations import export_multi_vector_encoder
from retrievals.losses.maxsim import maxsim_scores
from retrievals.pipelines import embed

WORDS = "cat dog fish sky sun moon ocean blue red green".split()
TEXTS = ["cat dog", "the sun and the moon", "blue ocean", "a red fish in the green sea"]


def train(tmp_path, model_dir: str, name: str, *flags: str) -> str:
    """Run the embed pipeline for 4 steps on word-pair data; returns its output directory."""
    rng = np.random.default_rng(0)
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for _ in range(32):
            a, b = rng.choice(WORDS, 2, replace=False)
            f.write(json.dumps({"query": f"{a} {b}", "positive": [f"the {a} and the {b}"]}) + "\n")
    out = str(tmp_path / name)
    argv = ["--output_dir", out, "--model_name_or_path", model_dir, "--do_train", "--data_name_or_path", str(data),
            "--per_device_train_batch_size", "8", "--max_steps", "4", "--learning_rate", "1e-2",
            "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none", "--pooling_method", "mean",
            "--query_instruction", "query ", "--document_instruction", "passage ", "--query_max_length", "16",
            "--document_max_length", "32", *flags]
    assert embed.main(argv) == 0
    return out


def test_lora_merged_output_loads_in_sentence_transformers(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from retrievals.models.lora import add_lora, load_adapter_weights

    out = train(tmp_path, tiny_bert_dir, "lora", "--use_lora", "True", "--merge_lora", "True")
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))  # a plain model at the top ...
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))  # ... the adapter aside
    ours = AutoModelForEmbedding.from_pretrained(out, precision="fp32")
    st = SentenceTransformer(out, device="cpu")
    np.testing.assert_allclose(st.encode_query(TEXTS), ours.encode_queries(TEXTS), atol=1e-5)
    # plain encode() is the document side in both libraries (ST's default prompt is saved as "document")
    np.testing.assert_allclose(st.encode(TEXTS), ours.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), ours.encode_corpus(TEXTS), atol=1e-5)
    assert st.prompts["query"] == "query " and st.prompts["document"] == "passage "

    # the merged weights are the trained model: base + the saved adapter gives the same vectors ...
    adapted = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32",
                                                    query_instruction="query ", document_instruction="passage ")
    add_lora(adapted, rank=8, alpha=16, dropout=0.0, target_modules="all-linear")
    assert load_adapter_weights(adapted.model, out)
    np.testing.assert_allclose(adapted.encode_queries(TEXTS), ours.encode_queries(TEXTS), atol=1e-5)
    # ... and training moved them away from the base model's
    base = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32",
                                                 query_instruction="query ")
    assert np.abs(base.encode_queries(TEXTS) - ours.encode_queries(TEXTS)).max() > 1e-3


def padded(vectors):
    """Per-text ``[tokens, dim]`` matrices -> ``([n, L, dim], mask [n, L])``."""
    tensors = [torch.as_tensor(v, dtype=torch.float32) for v in vectors]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(t)) for t in tensors], batch_first=True)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True), mask


def test_multi_vector_output_in_sentence_transformers(tiny_bert_dir, tmp_path):
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer

    out = train(tmp_path, tiny_bert_dir, "mv", "--multi_vector_dim", "16", "--loss_fn", "maxsim",
                "--temperature", "0.1")
    ours = MultiVectorModel.from_pretrained(out, precision="fp32")
    queries, docs = ours.encode(TEXTS, is_query=True), ours.encode(TEXTS)
    assert [q.shape for q in queries] == [(n + 3, 16) for n in (2, 5, 2, 7)]  # [CLS] query ... [SEP]

    # As it is, the directory loads in SentenceTransformer as its dense backbone only (the first stage) ...
    st = SentenceTransformer(out, device="cpu")
    np.testing.assert_allclose(st.encode_query(TEXTS), ours.embedder.encode_queries(TEXTS), atol=1e-5)
    assert st.get_embedding_dimension() == 32  # the backbone's pooled size, not token vectors
    # ... and MultiVectorEncoder converts that dense model with a NEW random 128-dim projection: refused
    # as a way to load it (the trained multi_vector_projection.safetensors is not read).
    converted = MultiVectorEncoder(out, device="cpu")
    assert converted.encode_query(TEXTS[:1])[0].shape[-1] == 128 != ours.dim

    # Exported, it loads as a MultiVectorEncoder with our token vectors and our (mean-over-query) MaxSim.
    exported = export_multi_vector_encoder(out, tmp_path / "mve")
    encoder = MultiVectorEncoder(exported, device="cpu")
    st_queries, st_docs = encoder.encode_query(TEXTS), encoder.encode_document(TEXTS)
    for got, expected in zip(list(st_queries) + list(st_docs), list(queries) + list(docs)):
        assert tuple(got.shape) == tuple(expected.shape)
        np.testing.assert_allclose(torch.as_tensor(got).numpy(), torch.as_tensor(expected).numpy(), atol=1e-5)
    expected_scores = maxsim_scores(*padded(queries), *padded(docs))
    np.testing.assert_allclose(encoder.similarity(st_queries, st_docs).cpu().numpy(), expected_scores.numpy(),
                               atol=1e-5)
    assert expected_scores.diagonal().min() > 0  # real scores, not an all-zero matrix

    # a loaded model exports the same way; a dense directory is refused with the reason
    again = MultiVectorEncoder(export_multi_vector_encoder(ours, tmp_path / "mve2"), device="cpu")
    np.testing.assert_allclose(again.encode_query(TEXTS[:1])[0].numpy(), torch.as_tensor(queries[0]).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="not a multi-vector model directory"):
        export_multi_vector_encoder(tiny_bert_dir, tmp_path / "dense")
