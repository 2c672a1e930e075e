"""Online hard-negative refresh (``NegativeRefreshCallback``, ``embed --hn_refresh_steps``): the refreshed
negatives equal what ``build_hn`` mines with the same weights, rules and seed; a resumed run trains on
exactly the batches of the uninterrupted run; every rank of a 2-process run trains on the same negatives."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch
from transformers import TrainingArguments

from processes import run
from retrievals import AutoModelForEmbedding, RetrievalCollator, RetrievalDataset, RetrievalTrainer
from retrievals.losses import InfoNCE
from retrievals.mining.false_negatives import FalseNegativeFilter
from retrievals.mining.refresh import REFRESH_DIR, NegativeRefreshCallback
from retrievals.pipelines import build_hn, embed

WORDS = "cat dog fish sky sun moon ocean blue red green one two".split()
POOL = [f"the {a} and the {b}" for a, b in zip(WORDS, WORDS[1:] + WORDS[:1])]
RECORDS = [{"query": f"{a} {b}", "positive": POOL[i], "negative": [POOL[(i + 5) % 12], POOL[(i + 7) % 12]]}
           for i, (a, b) in enumerate(zip(WORDS[:8], WORDS[1:9]))]


@dataclasses.dataclass
class RecordingCollator(RetrievalCollator):
    seen: list = dataclasses.field(default_factory=list)

    def __call__(self, features):
        self.seen.append([(f["query"], tuple(f["negative"])) for f in features])
        return super().__call__(features)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def training_args(output_dir, **kw):
    base = dict(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3,
                logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def train(model_dir, output_dir, resume=None, **kw):
    torch.manual_seed(0)
    model = AutoModelForEmbedding.from_pretrained(model_dir, pooling_method="mean")
    dataset = RetrievalDataset(RECORDS, train_group_size=2, seed=0)
    collator = RecordingCollator(model.tokenizer, query_max_length=16, document_max_length=16)
    refresh = NegativeRefreshCallback(model, dataset, POOL, every_steps=2, range_for_sampling=(0, 8), negative_number=3,
                                      seed=7, false_negatives=FalseNegativeFilter(max_positive_ratio=1.0))
    trainer = RetrievalTrainer(model=model, args=training_args(output_dir, **kw), train_dataset=dataset,
                               data_collator=collator, loss_fn=InfoNCE(), callbacks=[refresh])
    trainer.train(resume_from_checkpoint=resume)
    return trainer.data_collator.seen, refresh, dataset


def test_refreshed_negatives_equal_build_hn_with_the_same_weights(tiny_bert_dir, tmp_path):
    seen, refresh, dataset = train(tiny_bert_dir, tmp_path / "run")
    assert [e["step"] for e in refresh.history] == [2, 4]
    assert "mean_rank_change" in refresh.history[1] and 0 <= refresh.history[1]["left_range"] <= 1
    for step in (2, 4):
        refreshed = [json.loads(line) for line in open(tmp_path / "run" / REFRESH_DIR / f"step-{step}.jsonl")]
        argv = ["--model_name_or_path", str(tmp_path / "run" / f"checkpoint-{step}"),  # the weights at that step
                "--input_file", write_jsonl(tmp_path / "in.jsonl", [{k: r[k] for k in ("query", "positive")}
                                                                   for r in RECORDS]),
                "--output_file", str(tmp_path / "out.jsonl"), "--candidate_pool",
                write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in POOL]), "--range_for_sampling", "0-8",
                "--negative_number", "3", "--seed", "7", "--max_positive_ratio", "1.0"]
        assert build_hn.main(argv) == 0
        mined = [json.loads(line)["negative"] for line in open(tmp_path / "out.jsonl")]
        assert refreshed == mined, step
    assert dataset.negatives() == refreshed  # the dataset holds the last refresh
    assert dataset.negatives() != dataset.initial_negatives()
    # one micro-batch (batch 3) was fetched before the refresh at step 2: it draws from the file's negatives;
    # batches 4 and 5 draw from the refresh of step 2
    step2 = [json.loads(line) for line in open(tmp_path / "run" / REFRESH_DIR / "step-2.jsonl")]
    row = {r["query"]: i for i, r in enumerate(RECORDS)}
    assert all(set(negs) <= set(RECORDS[row[q]]["negative"]) for q, negs in seen[2])
    assert all(set(negs) <= set(step2[row[q]]) for batch in seen[3:5] for q, negs in batch)


@pytest.mark.parametrize("checkpoint", [2, 3, 4])
def test_a_resumed_run_trains_on_the_batches_of_the_uninterrupted_run(tiny_bert_dir, tmp_path, checkpoint):
    """Refresh every 2 steps; 4 steps per epoch. Resuming at 2 (just refreshed, mid-epoch: one fetched
    micro-batch had the older negatives), 3 (refreshed one step before) and 4 (epoch end)."""
    save = 3 if checkpoint == 3 else 2
    full, _, _ = train(tiny_bert_dir, tmp_path / "full", save_steps=save)
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    for name in os.listdir(partial / REFRESH_DIR):  # the interrupted run never wrote the later refreshes
        if name.startswith("step-") and int(name[5:].split(".")[0]) > checkpoint:
            os.remove(partial / REFRESH_DIR / name)
    resumed, _, _ = train(tiny_bert_dir, partial, resume=str(partial / f"checkpoint-{checkpoint}"), save_steps=save)
    assert resumed == full[checkpoint:]


def test_data_loader_workers_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="--dataloader_num_workers 0"):
        train(tiny_bert_dir, tmp_path / "run", dataloader_num_workers=1)


def test_resume_without_the_refresh_file_is_a_clear_error(tiny_bert_dir, tmp_path):
    train(tiny_bert_dir, tmp_path / "run", max_steps=3, save_steps=3)
    os.remove(tmp_path / "run" / REFRESH_DIR / "step-2.jsonl")
    with pytest.raises(FileNotFoundError, match="step-2.jsonl"):
        train(tiny_bert_dir, tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-3"), save_steps=3)


def embed_argv(model_dir, tmp_path, output_dir):
    return ["--model_name_or_path", model_dir, "--pooling_method", "mean", "--output_dir", str(output_dir),
            "--data_name_or_path", write_jsonl(tmp_path / "train.jsonl", RECORDS),
            "--candidate_pool", write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in POOL]),
            "--hn_refresh_steps", "2", "--range_for_sampling", "0-8", "--hn_negative_number", "3",
            "--train_group_size", "2", "--per_device_train_batch_size", "2", "--max_steps", "5",
            "--query_max_length", "16", "--document_max_length", "16", "--learning_rate", "5e-3",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--do_train", "--seed", "0"]


def test_embed_flags_refresh_and_refuse_without_a_pool(tiny_bert_dir, tmp_path):
    assert embed.main(embed_argv(tiny_bert_dir, tmp_path, tmp_path / "out")) == 0
    log = [json.loads(line) for line in open(tmp_path / "out" / REFRESH_DIR / "log.jsonl")]
    assert [e["step"] for e in log] == [2, 4] and all(e["seconds"] > 0 for e in log)
    argv = embed_argv(tiny_bert_dir, tmp_path, tmp_path / "out2")
    i = argv.index("--candidate_pool")
    with pytest.raises(ValueError, match="--hn_refresh_steps needs --candidate_pool"):
        model_args, data_args, args = embed.parse_args(argv[:i] + argv[i + 2:])
        embed.run_embed(model_args, data_args, args)


RANK_SCRIPT = (
    "import json, os, sys\n"
    "from retrievals.pipelines import embed\n"
    "from retrievals.data.datasets import RetrievalDataset\n"
    "seen = []\n"
    "original = RetrievalDataset.set_negatives\n"
    "def spy(self, negatives, after_items=0):\n"
    "    seen.append(negatives)\n"
    "    return original(self, negatives, after_items)\n"
    "RetrievalDataset.set_negatives = spy\n"
    "result = embed.run_embed(*embed.parse_args(sys.argv[1:]))\n"
    "with open(os.path.join(sys.argv[sys.argv.index('--output_dir') + 1], f\"seen-{os.environ['RANK']}.json\"), 'w') as f:\n"
    "    json.dump({'seen': seen, 'losses': result['losses']}, f)\n")


def two_gloo_ranks(model_dir, tmp_path, out, *extra):
    """``embed --hn_refresh_steps 2`` for 5 steps on 2 gloo ranks: each rank's refreshed negatives and losses."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun takes a free port itself (a port picked here could be taken by a parallel test)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script)] + embed_argv(model_dir, tmp_path, out) + ["--ddp_backend", "gloo", "--logging_steps", "1", *extra]
    result = run(cmd, timeout=300, env=env)  # a timeout stops the ranks too
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.load(open(out / f"seen-{r}.json")) for r in (0, 1)]


@pytest.mark.slow
def test_two_gloo_ranks_train_on_the_same_refreshed_negatives_with_ddp_and_fsdp(tiny_bert_dir, tmp_path):
    rank0, rank1 = two_gloo_ranks(tiny_bert_dir, tmp_path, tmp_path / "ddp")
    assert len(rank0["seen"]) == 2 and rank0["seen"] == rank1["seen"]  # both refreshes, identical on both ranks
    written = [json.loads(line) for line in open(tmp_path / "ddp" / REFRESH_DIR / "step-4.jsonl")]
    assert rank0["seen"][-1] == written
    # --fsdp: every rank takes part in the refresh's encode (the sharded weights are gathered in the forward);
    # the same negatives and the same losses as DDP
    sharded0, sharded1 = two_gloo_ranks(tiny_bert_dir, tmp_path, tmp_path / "fsdp", "--fsdp", "full_shard")
    assert sharded0["seen"] == sharded1["seen"] == rank0["seen"]
    for step in (2, 4):
        assert (tmp_path / "fsdp" / REFRESH_DIR / f"step-{step}.jsonl").read_text() == \
            (tmp_path / "ddp" / REFRESH_DIR / f"step-{step}.jsonl").read_text()
    assert len(sharded0["losses"]) == 5
    assert sharded0["losses"] == pytest.approx(rank0["losses"], rel=1e-5)
