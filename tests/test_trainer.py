import json
import os

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from retrievals import (
    AutoModelForEmbedding,
    PairCollator,
    PointwiseCollator,
    PointwiseDataset,
    RetrievalCollator,
    RetrievalDataset,
    RetrievalTrainer,
    ScoredPairCollator,
    ScoredPairDataset,
)
from retrievals.losses import ArcFaceAdaptiveMarginLoss, CoSENT, InfoNCE, SimCSE, TripletLoss
from retrievals.trainer import NonFiniteLossError

WORDS = "cat dog fish sky sun moon ocean blue red green".split()


def pair_rows(n=32):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b = rng.choice(WORDS, 2, replace=False)
        rows.append({"query": f"{a} {b}", "positive": f"the {a} and the {b}",
                     "negative": [f"the {w}" for w in rng.choice([w for w in WORDS if w not in (a, b)], 3)]})
    return rows


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1,
                learning_rate=5e-4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("loss_fn,group", [(InfoNCE(temperature=0.1), 1), (InfoNCE(temperature=0.1), 3),
                                           (TripletLoss(margin=0.3), 2), (SimCSE(temperature=0.1), 1)])
def test_training_reduces_loss(tiny_bert_dir, tmp_path, loss_fn, group):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    data = RetrievalDataset(write_jsonl(tmp_path / "train.jsonl", pair_rows(64)), train_group_size=group)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, num_train_epochs=4), train_dataset=data,
                               data_collator=RetrievalCollator(model.tokenizer), loss_fn=loss_fn)
    trainer.train()
    losses = losses_of(trainer)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


def test_collator_takes_instructions_and_eos_from_model(tiny_llama_dir):
    model = AutoModelForEmbedding.from_pretrained(tiny_llama_dir, pooling_method="last", query_instruction="query ",
                                                  document_instruction="passage ")
    collator = PairCollator(model.tokenizer, query_max_length=16, document_max_length=16)
    bound = collator.with_model_config(model.embedding_config)
    assert collator.query_instruction is None  # the user's object is untouched
    batch = bound([{"query": "cat", "positive": "dog fish"}])
    assert batch["query"]["input_ids"][0].tolist() == model.tokenize(["cat"], is_query=True)[0]
    assert batch["positive"]["input_ids"][0].tolist() == model.tokenize(["dog fish"])[0]
    assert batch["positive"]["input_ids"][0, -1].item() == model.tokenizer.eos_token_id
    # the trainer forward on collated tokens equals encode
    with torch.no_grad():
        emb = model(**batch["query"])
    np.testing.assert_allclose(emb[0].numpy(), model.encode("cat", is_query=True, precision="fp32"), atol=1e-5)


def test_cosent_on_scored_pairs(tiny_bert_dir, tmp_path):
    rows = [{"query": r["query"], "positive": r["positive"] if i % 2 else r["negative"][0], "label": float(i % 2) * 5}
            for i, r in enumerate(pair_rows(64))]
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    data = ScoredPairDataset(rows)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, num_train_epochs=4), train_dataset=data,
                               data_collator=ScoredPairCollator(model.tokenizer), loss_fn=CoSENT())
    trainer.train()
    losses = losses_of(trainer)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_arcface_pointwise_trains_its_class_weights(tiny_bert_dir, tmp_path):
    rows = [{"text": f"{w} {w}", "label": w} for w in WORDS[:4] for _ in range(8)]
    data = PointwiseDataset(rows)
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    loss_fn = ArcFaceAdaptiveMarginLoss(32, 4, scale=10.0, margin=0.2)
    before = loss_fn.weight.detach().clone()
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, num_train_epochs=3), train_dataset=data,
                               data_collator=PointwiseCollator(model.tokenizer), loss_fn=loss_fn)
    trainer.train()
    assert not torch.equal(before, loss_fn.weight.detach())
    losses = losses_of(trainer)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_seed_optimizer_and_scheduler_assignment_and_checkpoints(tiny_bert_dir, tmp_path):
    from transformers import get_linear_schedule_with_warmup

    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="cls", query_instruction="query ")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=4)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                                                      gradient_checkpointing=True),
                               train_dataset=pair_rows(32), data_collator=PairCollator(model.tokenizer),
                               loss_fn=InfoNCE(torch.nn.CrossEntropyLoss(label_smoothing=0.05)))
    trainer.optimizer = optimizer
    trainer.scheduler = scheduler
    trainer.train()
    assert trainer.lr_scheduler is scheduler and scheduler.get_last_lr()[0] == 0.0  # it was stepped to the end
    ckpt = tmp_path / "out" / "checkpoint-4"
    reloaded = AutoModelForEmbedding.from_pretrained(ckpt, precision="fp32")
    assert reloaded.embedding_config.query_instruction == "query "
    np.testing.assert_allclose(reloaded.encode(["cat dog"]), model.encode(["cat dog"], precision="fp32"), atol=1e-5)
    assert os.path.isfile(ckpt / "model.safetensors") and not (ckpt / "pytorch_model.bin").exists()


def test_nan_loss_stops_training(tiny_bert_dir, tmp_path):
    class Poison(torch.nn.Module):
        def forward(self, query, positive, **kw):
            return (query * positive).sum() * float("nan")

    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=1),
                               train_dataset=pair_rows(16), data_collator=PairCollator(model.tokenizer), loss_fn=Poison())
    with pytest.raises(NonFiniteLossError, match="step 0"):
        trainer.train()
    assert not any(p.startswith("checkpoint") for p in os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else True


def test_dataset_validation_names_file_line_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n{"query": "a", "positive": ""}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: field 'positive' is empty"):
        RetrievalDataset(str(path))
    path.write_text('{"query": "a", "positive": "b"}\n{"query": "a", "positive": ["b"]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: malformed JSON"):
        RetrievalDataset(str(path))
    path.write_text('{"query": "a", "pos": ["b"], "neg": []}\n{"query": "c", "pos": ["d"], "neg": ["e"]}\n'
                    '{"pos": ["x"]}\n{"query": 5, "pos": ["x"]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'neg' is missing or empty"):
        RetrievalDataset(str(path), positive_key="pos", negative_key="neg", train_group_size=2)
    data = RetrievalDataset(str(path), positive_key="pos", negative_key="neg", train_group_size=2, skip_invalid=True)
    assert len(data) == 1 and data[0] == {"query": "c", "positive": "d", "negative": ["e"]}
    with pytest.raises(ValueError, match="0 valid examples"):
        RetrievalDataset([{"query": "", "positive": "x"}], skip_invalid=True)


def test_group_sampling_is_seeded_and_replaces_only_when_short():
    rows = [{"query": "q", "positive": ["p1", "p2"], "negative": ["n1", "n2", "n3", "n4"]},
            {"query": "r", "positive": "p", "negative": ["m1"]}]
    a = RetrievalDataset(rows, train_group_size=4, seed=1)
    b = RetrievalDataset(rows, train_group_size=4, seed=1)
    assert a[0] == b[0] and len(set(a[0]["negative"])) == 3
    assert a[1]["negative"] == ["m1", "m1", "m1"]


def test_retrieval_evaluator_callback_during_training(tiny_bert_dir, tmp_path):
    from retrievals.data.beir import BeirDataset
    from retrievals.evaluation import RetrievalEvaluatorCallback

    rows = pair_rows(32)
    corpus = {f"d{i}": {"title": "", "text": r["positive"]} for i, r in enumerate(rows)}
    dev = BeirDataset(corpus, {f"q{i}": r["query"] for i, r in enumerate(rows)}, {f"q{i}": {f"d{i}": 1} for i in range(32)})
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    callback = RetrievalEvaluatorCallback(model, dev, eval_steps=2)
    trainer = RetrievalTrainer(model=model, args=args(tmp_path, num_train_epochs=2), train_dataset=rows,
                               data_collator=PairCollator(model.tokenizer), loss_fn=InfoNCE(temperature=0.1),
                               callbacks=[callback])
    trainer.train()
    assert [step for step, _ in callback.history] == [2, 4, 6, 8]
    assert all(0 <= m["dev_ndcg@10"] <= 1 for _, m in callback.history)
    assert any("dev_ndcg@10" in h for h in trainer.state.log_history)
