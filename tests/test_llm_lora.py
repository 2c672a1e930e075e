"""SmolLM2-135M (GGUF) + LoRA + last-token pooling + instructions through the embed pipeline (slow)."""

import json
import os

import numpy as np
import pytest

from retrievals import AutoModelForEmbedding, PairCollator
from retrievals.losses import InfoNCE
from retrievals.pipelines import embed

pytestmark = pytest.mark.slow


def fixed_batch_loss(model, rows):
    import torch

    collator = PairCollator(model.tokenizer, query_max_length=48, document_max_length=96)
    batch = collator.with_model_config(model.embedding_config)(rows)
    model.eval()
    with torch.no_grad():
        return InfoNCE()(model(**batch["query"]), model(**batch["positive"]), positive_ids=batch["positive_ids"]).item()


def test_smollm2_lora_pipeline(smollm_gguf, data_dir, tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from train_scifact_infonce import scifact_train_rows

    rows = [{"query": r["query"], "positive": r["positive"][0]}
            for r in scifact_train_rows(os.path.join(data_dir, "scifact"))[:200]]
    train_file = tmp_path / "pairs.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    argv = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", smollm_gguf, "--do_train",
            "--data_name_or_path", str(train_file), "--pooling_method", "last", "--use_lora", "True",
            "--query_instruction", "Retrieve the possible answer for query.\\nQuery: ", "--document_instruction",
            "Document: ", "--query_max_length", "48", "--document_max_length", "96", "--learning_rate", "5e-4",
            "--per_device_train_batch_size", "8", "--max_steps", "12", "--logging_steps", "4", "--bf16",
            "--temperature", "0.05", "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none"]
    model_args, data_args, train_args = embed.parse_args(argv)
    model = embed.load_model(model_args)
    held_out = rows[:8]
    before = fixed_batch_loss(model, held_out)
    embed.train(model, model_args, data_args, train_args)
    after = fixed_batch_loss(model, held_out)
    assert after < before, (before, after)
    model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForEmbedding.from_pretrained(tmp_path / "merged", precision="fp32")
    assert merged.embedding_config.query_instruction == "Retrieve the possible answer for query.\nQuery: "
    texts = [r["query"] for r in held_out]
    a = model.encode(texts, is_query=True, precision="fp32")
    b = merged.encode(texts, is_query=True, precision="fp32")
    assert (a * b).sum(1).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
