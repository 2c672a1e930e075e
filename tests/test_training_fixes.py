"""Regression tests of the review's trainer and data defects (issue 10, items 3, 5, 6, 8, 10, 11)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from retrievals import (
    AutoModelForEmbedding,
    ListwiseCollator,
    ListwiseDataset,
    PairCollator,
    PointwiseCollator,
    PointwiseDataset,
    RetrievalCollator,
    RetrievalDataset,
    RetrievalTrainer,
)
from retrievals.losses import ArcFaceAdaptiveMarginLoss, InfoNCE, TripletLoss
from retrievals.pipelines import embed

WORDS = "cat dog fish sky sun moon ocean blue red green".split()


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@dataclasses.dataclass
class RecordingCollator(RetrievalCollator):
    """Test helper: remembers every item it collates (query -> negatives seen)."""

    seen: list = dataclasses.field(default_factory=list)

    def __call__(self, features):
        self.seen.append([(f["query"], f["positive"], tuple(f["negative"])) for f in features])
        return super().__call__(features)


def ten_negative_rows(n=8):
    return [{"query": f"{WORDS[i]} query", "positive": f"the {WORDS[i]}",
             "negative": [f"{WORDS[i]} {w} {j}" for j, w in enumerate(WORDS)]} for i in range(n)]


# ---------------------------------------------------------------- item 3: a new draw every epoch
def test_dataset_draws_anew_per_epoch_and_is_deterministic():
    data = RetrievalDataset(ten_negative_rows(), train_group_size=3, seed=7)
    first = [data[i]["negative"] for i in range(len(data))]
    data.set_epoch(1)
    second = [data[i]["negative"] for i in range(len(data))]
    assert first != second
    again = RetrievalDataset(ten_negative_rows(), train_group_size=3, seed=7)
    again.set_epoch(1)
    assert [again[i]["negative"] for i in range(len(again))] == second


def test_trainer_advances_the_epoch_of_sampled_negatives(tiny_bert_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    data = RetrievalDataset(ten_negative_rows(), train_group_size=3)
    collator = RecordingCollator(model.tokenizer, query_max_length=8, document_max_length=8)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, num_train_epochs=3), train_dataset=data,
                               data_collator=collator, loss_fn=InfoNCE())
    trainer.train()
    used = {}
    for batch in trainer.data_collator.seen:
        for query, _, negatives in batch:
            used.setdefault(query, set()).update(negatives)
    # one draw reused for 3 epochs uses 2 of the 10 negatives; fresh draws use more for every query
    assert all(len(n) > 2 for n in used.values()), {q: len(n) for q, n in used.items()}


def test_resumed_run_draws_what_the_uninterrupted_run_drew(tiny_bert_dir, tmp_path):
    def run(out, resume=None):
        model = no_dropout(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean"))
        collator = RecordingCollator(model.tokenizer, query_max_length=8, document_max_length=8)
        trainer = RetrievalTrainer(model=model, args=args(tmp_path, output_dir=str(out), num_train_epochs=3,
                                                          save_strategy="steps", save_steps=3),
                                   train_dataset=RetrievalDataset(ten_negative_rows(), train_group_size=3),
                                   data_collator=collator, loss_fn=InfoNCE())
        trainer.train(resume_from_checkpoint=resume)
        return trainer.data_collator.seen

    full = run(tmp_path / "a")  # 2 steps per epoch, 6 in all; checkpoint-3 is mid-epoch 2
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert len(full) == 6 and resumed == full[3:]
    state = json.loads((tmp_path / "a" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["CheckpointRanks"] == {"args": {}, "attributes": {"world_size": 1}}


# ---------------------------------------------------------------- item 10: short lists
def test_listwise_group_size_pads_short_lists_and_keeps_the_first(tmp_path, caplog):
    rows = [{"query": "q1", "documents": ["a", "b", "c", "d"], "scores": [4, 3, 2, 1]},
            {"query": "q2", "documents": ["e", "f"], "scores": [2, 1]}]
    data = ListwiseDataset(rows, group_size=3)
    assert "1 of 2 lists have fewer than 3 documents" in caplog.text
    items = [data[0], data[1]]
    assert [len(i["documents"]) for i in items] == [3, 3]
    assert [i["documents"][0] for i in items] == ["a", "e"]
    assert items[1]["documents"] == ["e", "f", "f"] and items[1]["scores"] == [2.0, 1.0, 1.0]
    scores = dict(zip(rows[0]["documents"], rows[0]["scores"]))
    assert all(scores[d] == s for d, s in zip(items[0]["documents"], items[0]["scores"]))
    with pytest.raises(ValueError, match=r"documents.*1 document but group_size=3"):
        ListwiseDataset([{"query": "q", "documents": ["x"], "scores": [1]}], group_size=3)


def test_listwise_collates_lists_of_different_lengths(tiny_bert_dir):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    rows = [{"query": "cat", "documents": ["the cat", "the dog", "the fish", "the sky"], "scores": [4, 3, 2, 1]},
            {"query": "sun", "documents": ["the sun", "the moon"], "scores": [2, 1]}]
    batch = ListwiseCollator(model.tokenizer)([*ListwiseDataset(rows, group_size=3)])
    assert batch["teacher_scores"].shape == (2, 3) and batch["negative"]["input_ids"].shape[0] == 4


# ---------------------------------------------------------------- item 11: separately loaded tokenizer
def test_collator_takes_the_models_pad_id(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)  # the seed's pattern: no pad token
    assert tokenizer.pad_token_id is None
    model = AutoModelForEmbedding.from_pretrained(tiny_llama_dir, pooling_method="last")
    rows = [{"query": "cat dog", "positive": "the cat and the dog"}, {"query": "sun", "positive": "the sun"}] * 4
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=rows,
                               data_collator=PairCollator(tokenizer, query_max_length=8, document_max_length=12))
    batch = trainer.data_collator(rows[:2])
    assert batch["query"]["input_ids"][1, -1].item() == model.tokenizer.pad_token_id
    assert batch["query"]["input_ids"][0].tolist()[:3] == model.tokenize(["cat dog"], is_query=True)[0]
    trainer.train()
    with pytest.raises(ValueError, match="no pad token"):
        PairCollator(tokenizer)(rows[:2])


# ---------------------------------------------------------------- item 6: gradient accumulation and labels
def _first_step(tiny_bert_dir, tmp_path, rows, collator_cls, loss_fn, **kw):
    torch.manual_seed(0)
    model = no_dropout(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32"))
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, max_steps=1, optim="sgd", max_grad_norm=0.0, **kw),
                               train_dataset=rows, data_collator=collator_cls(model.tokenizer), loss_fn=loss_fn)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h][0]
    return logs["loss"], logs["grad_norm"], model.model.embeddings.word_embeddings.weight.detach().clone()


def test_labels_column_does_not_change_loss_or_gradient(tiny_bert_dir, tmp_path):
    rows = [{"query": f"{a} {b}", "positive": f"the {a} and the {b}", "negative": [f"the {c}"]}
            for a, b, c in zip(WORDS[:8], WORDS[1:9], WORDS[2:10])]
    plain = _first_step(tiny_bert_dir, tmp_path, rows, RetrievalCollator, TripletLoss(margin=0.9),
                        gradient_accumulation_steps=2)
    labelled = _first_step(tiny_bert_dir, tmp_path, [{**r, "label": 1.0} for r in rows], RetrievalCollator,
                           TripletLoss(margin=0.9), gradient_accumulation_steps=2)
    assert plain[0] > 0
    np.testing.assert_allclose(labelled[:2], plain[:2], rtol=1e-5)
    torch.testing.assert_close(labelled[2], plain[2])


def test_accumulated_batches_equal_one_big_batch(tiny_bert_dir, tmp_path):
    rows = [{"text": f"{w} {w}", "label": w} for w in WORDS[:4] for _ in range(2)]

    def step(**kw):
        torch.manual_seed(1)
        return _first_step(tiny_bert_dir, tmp_path, PointwiseDataset(rows), PointwiseCollator,
                           ArcFaceAdaptiveMarginLoss(32, 4, scale=10.0, margin=0.2), **kw)

    big = step(per_device_train_batch_size=8)
    accumulated = step(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    np.testing.assert_allclose(accumulated[:2], big[:2], rtol=1e-5)
    torch.testing.assert_close(accumulated[2], big[2], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- item 8: the loss's own parameters
def test_resume_restores_arcface_centres(tiny_bert_dir, tmp_path):
    rows = [{"text": f"{w} {w}", "label": w} for w in WORDS[:4] for _ in range(4)]

    def run(out, resume=None):
        torch.manual_seed(3)
        model = no_dropout(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean"))
        loss_fn = ArcFaceAdaptiveMarginLoss(32, 4, scale=10.0, margin=0.2)
        trainer = RetrievalTrainer(model=model, args=args(tmp_path, output_dir=str(out), max_steps=6,
                                                          save_strategy="steps", save_steps=3),
                                   train_dataset=PointwiseDataset(rows), data_collator=PointwiseCollator(model.tokenizer),
                                   loss_fn=loss_fn)
        trainer.train(resume_from_checkpoint=resume)
        return loss_fn.weight.detach().clone(), model.encode(["cat cat", "sun"], precision="fp32")

    weight, emb = run(tmp_path / "a")
    resumed_weight, resumed_emb = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    torch.testing.assert_close(resumed_weight, weight, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(resumed_emb, emb, atol=1e-5)
    saved = load_file(str(tmp_path / "a" / "checkpoint-6" / "loss_state.safetensors"))
    torch.testing.assert_close(saved["weight"], weight)


# ---------------------------------------------------------------- item 5: evaluate and the best checkpoint
def test_trainer_evaluate_gives_the_eval_loss(tiny_bert_dir, tmp_path):
    model = no_dropout(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32"))
    rows = [{"query": f"{w} query", "positive": f"the {w}"} for w in WORDS[:8]]
    collator = PairCollator(model.tokenizer, query_max_length=8, document_max_length=8)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, per_device_eval_batch_size=8), train_dataset=rows,
                               eval_dataset=rows, data_collator=collator, loss_fn=InfoNCE())
    metrics = trainer.evaluate()
    with torch.no_grad():
        batch = trainer.data_collator(rows)
        expected = InfoNCE()(model(**batch["query"]), model(**batch["positive"]),
                             positive_ids=batch["positive_ids"]).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_embed_keeps_the_best_checkpoint_by_dev_ndcg(tiny_bert_dir, tiny_beir_dir, tmp_path):
    words = "the a of to in is are was and or".split()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"{a} {b}", "positive": [f"the {b} {a}"]}) + "\n"
                            for a in words for b in words[:4]))
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", tiny_bert_dir, "--do_train", "--data_name_or_path",
            str(data), "--per_device_train_batch_size", "8", "--num_train_epochs", "2", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--report_to", "none", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_strategy", "steps", "--save_steps", "2", "--load_best_model_at_end", "True",
            "--metric_for_best_model", "ndcg@10", "--dev_data_dir", tiny_beir_dir, "--dev_split", "test"]
    assert embed.main(argv) == 0
    last = sorted((p for p in os.listdir(out) if p.startswith("checkpoint-")), key=lambda p: int(p.split("-")[1]))[-1]
    state = json.loads((out / last / "trainer_state.json").read_text())
    dev = [h for h in state["log_history"] if "eval_ndcg@10" in h]
    assert len(dev) == 5 and all("eval_loss" in h for h in dev)
    best = max(dev, key=lambda h: h["eval_ndcg@10"])
    assert state["best_metric"] == pytest.approx(best["eval_ndcg@10"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    final = AutoModelForEmbedding.from_pretrained(out, precision="fp32")
    kept = AutoModelForEmbedding.from_pretrained(state["best_model_checkpoint"], precision="fp32")
    np.testing.assert_allclose(final.encode(["cat sky", "the sun"]), kept.encode(["cat sky", "the sun"]), atol=1e-6)


# ---------------------------------------------------------------- TripletCollator on its own
def test_triplet_collator_tokens_ids_and_errors(tiny_bert_dir):
    from retrievals import TripletCollator
    from retrievals.data.collators import text_ids

    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", query_instruction="query ")
    collator = TripletCollator(model.tokenizer, query_max_length=6, document_max_length=5).with_model_config(
        model.embedding_config)
    items = [{"query": "cat", "positive": "the cat", "negative": ["the dog", "the fish sky sun moon ocean"]},
             {"query": "sun moon", "positive": ["the sun", "ignored"], "negative": ["the moon", "the cat"]}]
    batch = collator(items)
    negatives = ["the dog", "the fish sky sun moon ocean", "the moon", "the cat"]
    assert batch["negative"]["input_ids"].shape[0] == 4
    for row, text in enumerate(negatives):
        ids = model.tokenize([text], max_length=5)[0]
        assert batch["negative"]["input_ids"][row, :len(ids)].tolist() == ids
        assert batch["negative"]["attention_mask"][row].sum().item() == len(ids)
    assert batch["query"]["input_ids"][1].tolist()[:4] == model.tokenize(["sun moon"], is_query=True)[0][:4]
    assert batch["positive_ids"].tolist() == text_ids(["the cat", "the sun"]).tolist()
    assert batch["negative_ids"].tolist() == text_ids(negatives).tolist()
    single = collator([{"query": "cat", "positive": "the cat", "negative": "the dog"}])
    assert single["negative"]["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"same, non-zero number of negatives; got sizes \[1, 2\]"):
        collator([items[0], {"query": "x", "positive": "y", "negative": ["z"]}])


def fabricated_checkpoint(folder, *files, ranks=None):
    """A ``checkpoint-N`` holding ``files``; ``ranks``: the saving processes as this version records them in
    trainer_state.json (None: an older version's file, or none when trainer_state.json is not in ``files``)."""
    folder.mkdir()
    for name in files:
        (folder / name).write_text('{"global_step": 1}' if name == "trainer_state.json" else "x")
    if ranks is not None:
        state = {"global_step": 1, "stateful_callbacks": {"CheckpointRanks": {"args": {}, "attributes": {"world_size": ranks}}}}
        (folder / "trainer_state.json").write_text(json.dumps(state))


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path, caplog):
    from retrievals.trainer.checkpoints import last_complete_checkpoint

    fabricated_checkpoint(tmp_path / "checkpoint-2", "model.safetensors", "rng_state_0.pth", "rng_state_1.pth",
                          "trainer_state.json")
    # rank 1 never wrote its RNG (rank 0 writes the trainer state after its own RNG, not after the others')
    fabricated_checkpoint(tmp_path / "checkpoint-4", "model.safetensors", "rng_state_0.pth", "trainer_state.json")
    fabricated_checkpoint(tmp_path / "checkpoint-10", "model.safetensors")  # killed after the weights
    (tmp_path / "checkpoint-12").write_text("a file, not a checkpoint")
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    assert "checkpoint-10: incomplete (no trainer_state.json)" in caplog.text
    assert "checkpoint-4: incomplete (no rng_state_1.pth)" in caplog.text
    assert last_complete_checkpoint(str(tmp_path / "checkpoint-10")) is None


def test_checkpoint_completeness_does_not_depend_on_the_resuming_world_size(tmp_path, caplog):
    """Issue 21 item 11: a 2-rank job resumed on 4 ranks refused every complete checkpoint as "incomplete (no
    rng_state_2.pth)". Complete is what the saving run wrote; a changed world size resumes with a warning."""
    from retrievals.trainer.checkpoints import last_complete_checkpoint, missing_files

    fabricated_checkpoint(tmp_path / "checkpoint-2", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json")
    fabricated_checkpoint(tmp_path / "checkpoint-4", "rng_state_0.pth", "rng_state_1.pth", ranks=2)
    fabricated_checkpoint(tmp_path / "checkpoint-6", "rng_state_0.pth", "rng_state_1.pth", ranks=3)  # rank 2's: cut off
    for world_size in (1, 2, 4):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert last_complete_checkpoint(str(tmp_path), world_size=world_size).endswith("checkpoint-4")
        assert "checkpoint-6: incomplete (no rng_state_2.pth)" in caplog.text
        assert ("was saved by 2 processes" in caplog.text) == (world_size != 2)
    assert "this run has 4: the RNG states of ranks 0-1 are restored, ranks 2-3 have none" in caplog.text
    assert missing_files(str(tmp_path / "checkpoint-2")) == []  # an older version's 2-rank checkpoint
    fabricated_checkpoint(tmp_path / "checkpoint-8", "rng_state.pth", ranks=1)  # one process
    fabricated_checkpoint(tmp_path / "checkpoint-9", "model.safetensors", ranks=2)  # --save_only_model: no RNG
    assert missing_files(str(tmp_path / "checkpoint-8")) == missing_files(str(tmp_path / "checkpoint-9")) == []
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(str(tmp_path), world_size=2).endswith("checkpoint-9")
    assert caplog.text == ""  # no RNG states saved: nothing to restore, nothing to warn about
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": ')  # cut off mid-write
    assert missing_files(str(tmp_path / "checkpoint-10")) == ["trainer_state.json (unreadable)"]


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks(tiny_bert_dir, tmp_path):
    from retrievals.trainer.checkpoints import missing_files
    from test_fsdp import torchrun
    from test_pipelines import common_flags, write_pairs

    data = write_pairs(tmp_path / "train.jsonl", with_negatives=False)
    out = tmp_path / "out"
    flags = common_flags(tmp_path, tiny_bert_dir, data)
    flags[flags.index("--save_strategy") + 1] = "steps"
    assert embed.main(flags + ["--max_steps", "2", "--save_steps", "2", "--overwrite_output_dir"]) == 0
    log = torchrun(tiny_bert_dir, data, out, overwrite=False)  # 2 ranks, to step 4, a checkpoint every 2
    assert f"Resuming from {out / 'checkpoint-2'}" in log
    assert "checkpoint-2 was saved by 1 process and this run has 2: no rank restores an RNG state" in log
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["CheckpointRanks"]["attributes"] == {"world_size": 2}
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert missing_files(str(out / "checkpoint-4")) == []
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoint-4"))
