"""The seed's two ``embed`` shell blocks, run as written (model and data paths substituted), without
``--use_cpu``, on this CPU-only machine (issue 10, item 9)."""

import json
import os
import sys

import numpy as np
import pytest

from processes import run
from retrievals import AutoModelForEmbedding
from retrievals.models.precision import cpu_has_fast_bf16
from retrievals.pipelines import embed

WORDS = "cat dog fish sky sun moon ocean blue red green".split()


def t2_ranking(path, n=64):
    """Records in the seed's ``t2_ranking.jsonl`` shape: query, positive, 4 negatives."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.choice(WORDS, 2, replace=False)
            others = [w for w in WORDS if w not in (a, b)]
            f.write(json.dumps({"query": f"{a} {b}", "positive": [f"the {a} and the {b}"],
                                "negative": [f"the {w}" for w in rng.choice(others, 4, replace=False)]}) + "\n")
    return str(path)


def block_one(model, data, out):
    """The seed's "Pairwise fine-tune embedding model" flags."""
    return ["--output_dir", out, "--overwrite_output_dir", "--model_name_or_path", model, "--do_train",
            "--data_name_or_path", data, "--positive_key", "positive", "--negative_key", "negative",
            "--learning_rate", "3e-5", "--fp16", "--num_train_epochs", "5", "--per_device_train_batch_size", "32",
            "--dataloader_drop_last", "True", "--query_max_length", "64", "--document_max_length", "512",
            "--train_group_size", "4", "--logging_steps", "100", "--temperature", "0.02",
            "--use_inbatch_negative", "false"]


def block_two(model, data, out):
    """The seed's "Pairwise fine-tune LLM embedding" flags."""
    return ["--output_dir", out, "--overwrite_output_dir", "--model_name_or_path", model, "--pooling_method", "last",
            "--do_train", "--data_name_or_path", data, "--positive_key", "positive", "--negative_key", "negative",
            "--use_lora", "True", "--query_instruction", "Retrieve the possible answer for query.\\nQuery: ",
            "--document_instruction", "Document: ", "--learning_rate", "2e-4", "--bf16", "--num_train_epochs", "3",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "16", "--dataloader_drop_last",
            "True", "--query_max_length", "64", "--document_max_length", "256", "--train_group_size", "4",
            "--logging_steps", "100", "--temperature", "0.02", "--use_inbatch_negative", "false",
            "--save_total_limit", "1"]


@pytest.mark.parametrize("block,fixture", [(block_one, "tiny_bert_dir"), (block_two, "tiny_llama_dir")])
def test_seed_embed_blocks_run_unchanged_on_cpu(block, fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    argv = block(model_dir, t2_ranking(tmp_path / "t2_ranking.jsonl"), str(tmp_path / "t2_output"))
    _, _, args = embed.parse_args(argv)
    fast = cpu_has_fast_bf16()
    assert (args.bf16, args.fp16, args.use_cpu) == (fast, False, True)  # bf16 autocast where the CPU has it
    assert embed.main(argv) == 0
    model = AutoModelForEmbedding.from_pretrained(tmp_path / "t2_output")
    if block is block_two:
        assert model.embedding_config.query_instruction == "Retrieve the possible answer for query.\nQuery: "
        assert model.embedding_config.pooling_method == "last"
    assert np.isfinite(model.encode(["cat dog"])).all()


@pytest.mark.slow
def test_seed_block_one_through_torchrun(tiny_bert_dir, tmp_path):
    argv = block_one(tiny_bert_dir, t2_ranking(tmp_path / "t2_ranking.jsonl"), str(tmp_path / "t2_output"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
           "-m", "retrievals.pipelines.embed", *argv, "--report_to", "none"]
    proc = run(cmd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))  # a timeout stops the ranks too
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "with bf16 autocast" if cpu_has_fast_bf16() else "in fp32"
    assert f"--fp16 on CPU: training {expected}" in proc.stderr
    assert os.path.isfile(tmp_path / "t2_output" / "model.safetensors")
