"""FSDP2 through the HF Trainer on CPU (gloo, torchrun): the same losses and weights as DDP, checkpoints that
load with ``from_pretrained`` and resume exactly, LoRA included; and the one-line messages where it cannot run."""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from processes import run, spawn_gloo
from retrievals import AutoModelForEmbedding
from retrievals.pipelines import embed
from test_pipelines import common_flags, write_pairs

TEXTS = ["cat dog", "the sun and the moon", "blue fish", "red sky green ocean"]



def torchrun(model_dir, data, out, *extra, overwrite=True):
    """Two ranks of ``embed`` for 4 steps of 4 examples each, cross-device negatives, a checkpoint every 2 steps."""
    flags = common_flags(out.parent, model_dir, data)
    flags[flags.index("--output_dir") + 1] = str(out)
    flags[flags.index("--per_device_train_batch_size") + 1] = "4"
    flags[flags.index("--save_strategy") + 1] = "steps"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "retrievals.pipelines.embed", *flags, "--max_steps", "4", "--save_steps", "2",
           "--negatives_cross_device", "True", "--ddp_backend", "gloo", *extra]
    if overwrite:
        cmd.append("--overwrite_output_dir")
    proc = run(cmd, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))  # a timeout stops the ranks too
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def losses(out):
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def assert_same_weights(a, b, atol):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def assert_encodes_alike(a, b):
    ea = AutoModelForEmbedding.from_pretrained(a, precision="fp32").encode(TEXTS, precision="fp32")
    eb = AutoModelForEmbedding.from_pretrained(b, precision="fp32").encode(TEXTS, precision="fp32")
    assert (ea * eb).sum(1).min() >= 0.999999


def fsdp_against_ddp_then_resume(model_dir, tmp_path, *extra):
    data = write_pairs(tmp_path / "train.jsonl", with_negatives=False)
    torchrun(model_dir, data, tmp_path / "ddp", *extra)
    log = torchrun(model_dir, data, tmp_path / "fsdp", *extra, "--fsdp", "full_shard")
    assert "FSDP2 (fully_shard) over 2 processes" in log  # not accelerate's silent DDP
    held = {int(r): int(n) for r, n in re.findall(r"FSDP rank (\d) holds (\d+) of", log)}
    total = int(re.search(r"holds \d+ of (\d+) parameter", log).group(1))
    assert set(held) == {0, 1} and sum(held.values()) == total and max(held.values()) < 0.52 * total
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=1e-5)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "ddp", atol=1e-6)
    assert_encodes_alike(tmp_path / "fsdp", tmp_path / "ddp")
    # resume: a run that finds only checkpoint-2 finishes where the uninterrupted one did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    log = torchrun(model_dir, data, resumed, *extra, "--fsdp", "full_shard", overwrite=False)
    assert "Resuming from" in log
    assert losses(resumed) == losses(tmp_path / "fsdp")
    assert_same_weights(resumed, tmp_path / "fsdp", atol=0)
    return tmp_path / "fsdp"


@pytest.mark.slow
def test_fsdp_full_fine_tuning_equals_ddp_and_resumes(tiny_bert_dir, tmp_path):
    # BERT keeps dropout on: the ranks' random streams must match DDP's too
    out = fsdp_against_ddp_then_resume(tiny_bert_dir, tmp_path)
    assert os.path.isfile(out / "checkpoint-2" / "pytorch_model_fsdp.bin")  # the Trainer's FSDP resume file
    assert os.path.isfile(out / "checkpoint-2" / "model.safetensors")  # and a checkpoint from_pretrained loads


@pytest.mark.slow
def test_fsdp_lora_equals_ddp_and_resumes(tiny_llama_dir, tmp_path):
    out = fsdp_against_ddp_then_resume(tiny_llama_dir, tmp_path, "--use_lora", "True", "--lora_dropout", "0")
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")


def test_fsdp_in_one_process_says_it_trains_unsharded(tiny_bert_dir, tmp_path, caplog):
    data = write_pairs(tmp_path / "train.jsonl", n=16, with_negatives=False)
    with caplog.at_level("WARNING"):
        assert embed.main(common_flags(tmp_path, tiny_bert_dir, data) + ["--fsdp", "full_shard"]) == 0
    messages = [r.getMessage() for r in caplog.records if "--fsdp" in r.getMessage()]
    assert len(messages) == 1 and "this run has one; training unsharded" in messages[0]
    assert AutoModelForEmbedding.from_pretrained(tmp_path / "out").encode("cat dog").shape == (32,)


def _disagreeing_rank(rank, result):
    from types import SimpleNamespace

    from retrievals.trainer import fsdp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(device=torch.device("cpu")))
    fsdp.check_ranks_agree(trainer)  # the same seed: agrees
    if rank == 1:
        with torch.no_grad():
            model[1].weight[0, 0] += 1e-3
    try:
        fsdp.check_ranks_agree(trainer)
        result[f"disagree-{rank}"] = "no error"
    except RuntimeError as err:
        result[f"disagree-{rank}"] = str(err)


def _sharded_encode_rank(rank, model_dir, result):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from retrievals.trainer.fsdp import ShardedEncoder

    model = AutoModelForEmbedding.from_pretrained(model_dir, pooling_method="mean", precision="fp32")
    texts = TEXTS + ["one two three", "sky", "the long sentence of five words"]
    expected = model.encode(texts, batch_size=2), model.encode_queries(texts[:3], batch_size=2)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    encoder = ShardedEncoder(model)
    # 7 texts in batches of 2: rank 0 runs 2 of the 4 batches, rank 1 the other 2; 3 queries: 2 batches
    got = encoder.encode_corpus(texts, batch_size=2), encoder.encode_queries(texts[:3], batch_size=2)
    result[f"encode-{rank}"] = [float(abs(g - e).max()) for g, e in zip(got, expected)] + [got[0].shape]


def _two_gloo_ranks(rank, model_dir, result):
    _disagreeing_rank(rank, result)
    _sharded_encode_rank(rank, model_dir, result)


@pytest.fixture(scope="module")
def gloo_ranks(tiny_bert_dir):
    """One ``mp.spawn`` of 2 gloo ranks for the checks below (a spawn costs seconds of imports)."""
    result = mp.Manager().dict()
    spawn_gloo(_two_gloo_ranks, 2, tiny_bert_dir, result)
    return dict(result)


def test_fsdp_refuses_ranks_with_different_weights(gloo_ranks):
    # fully_shard keeps each rank's slice of its own copy: an unseeded init would train a mix of models
    for rank in (0, 1):
        assert "ranks hold different weights in 1 parameters (['1.weight']" in gloo_ranks[f"disagree-{rank}"]


def test_sharded_encoder_equals_encode_with_every_rank_taking_part(gloo_ranks):
    # the online hard-negative refresh under --fsdp encodes this way (the sharded model cannot encode alone)
    for rank in (0, 1):
        got = gloo_ranks[f"encode-{rank}"]
        assert got[:2] == pytest.approx([0.0, 0.0], abs=1e-6) and got[2] == (7, 32)


@pytest.mark.slow
def test_dev_evaluation_under_fsdp_with_a_loss_without_dev_pairs(tiny_bert_dir, tiny_beir_dir, tmp_path):
    """``--fsdp --eval_strategy steps`` with a loss that has no eval-loss pairs (cosent): the dev evaluator
    encoded on each rank alone and died ("aten.embedding got mixed torch.Tensor and DTensor"); every rank now
    takes part, and the logged dev nDCG@10 is the saved model's."""
    from retrievals.data.beir import load_beir
    from retrievals.evaluation.retrieval import evaluate_retrieval

    data = tmp_path / "scored.jsonl"
    rows = [{"query": " ".join(TEXTS[i % 4].split()[:2]), "positive": TEXTS[(i + 1) % 4], "label": (i % 5) / 4}
            for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "retrievals.pipelines.embed", *common_flags(tmp_path, tiny_bert_dir, str(data)),
           "--loss_fn", "cosent", "--per_device_train_batch_size", "4", "--max_steps", "2", "--ddp_backend", "gloo",
           "--fsdp", "full_shard", "--eval_strategy", "steps", "--eval_steps", "2", "--dev_data_dir", tiny_beir_dir,
           "--dev_split", "test", "--pooling_method", "mean", "--save_strategy", "steps", "--save_steps", "2",
           "--overwrite_output_dir"]
    proc = run(cmd, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = [h["eval_ndcg@10"] for h in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
              if "eval_ndcg@10" in h]
    saved = AutoModelForEmbedding.from_pretrained(out, precision="fp32")
    expected = evaluate_retrieval(saved, load_beir(tiny_beir_dir)).metrics["ndcg@10"]
    assert logged and logged[-1] == pytest.approx(expected, abs=1e-6)
