"""Matryoshka, cross-batch memory and the gradient-cache loss: hand references, gradients, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from retrievals import AutoModelForEmbedding, RetrievalCollator, RetrievalDataset, RetrievalTrainer
from retrievals.data.collators import text_ids
from retrievals.losses import CachedLoss, CrossBatchMemory, InfoNCE, MatryoshkaLoss
from retrievals.pipelines import embed

torch.manual_seed(0)


def reference_infonce(q, docs, labels, t):
    """-log softmax(q . d / t)[label], averaged: written out with explicit sums."""
    losses = []
    for i in range(q.shape[0]):
        scores = [float(q[i] @ d) / t for d in docs]
        m = max(scores)
        log_z = m + np.log(sum(np.exp(s - m) for s in scores))
        losses.append(log_z - scores[labels[i]])
    return float(np.mean(losses))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------- Matryoshka
def test_matryoshka_equals_weighted_sum_of_truncated_losses():
    q, p, n = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    loss = MatryoshkaLoss(InfoNCE(temperature=0.1), dims=[8, 4, 2], weights=[1.0, 0.5, 2.0])
    expected = 0.0
    for dim, w in ((8, 1.0), (4, 0.5), (2, 2.0)):
        qd, pd, nd = (unit(x[:, :dim].numpy()) for x in (q, p, n))
        expected += w * reference_infonce(qd, list(pd) + list(nd), [0, 1, 2], 0.1)
    assert float(loss(q, p, n)) == pytest.approx(expected, rel=1e-9)
    assert loss.temperature == 0.1  # the wrapped loss's settings stay readable


def test_matryoshka_gradcheck_and_errors():
    q, p = (torch.randn(3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss = MatryoshkaLoss(InfoNCE(temperature=0.5), dims=[6, 3])
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b), (q, p))
    with pytest.raises(ValueError, match="exceeds the embedding size 6"):
        MatryoshkaLoss(InfoNCE(), dims=[12])(q, p)
    with pytest.raises(ValueError, match="distinct positive"):
        MatryoshkaLoss(InfoNCE(), dims=[4, 4])


# ---------------------------------------------------------------------- cross-batch memory
def test_memory_bank_adds_recent_documents_as_negatives():
    t = 0.2
    bank_loss = CrossBatchMemory(InfoNCE(temperature=t), size=5)
    q1, p1, n1 = (unit(np.random.default_rng(i).normal(size=(2, 4))) for i in range(3))
    first = bank_loss(*(torch.tensor(x) for x in (q1, p1, n1)))
    assert float(first) == pytest.approx(reference_infonce(q1, list(p1) + list(n1), [0, 1], t), rel=1e-9)
    q2, p2 = (unit(np.random.default_rng(10 + i).normal(size=(2, 4))) for i in range(2))
    second = bank_loss(torch.tensor(q2), torch.tensor(p2))
    bank = list(p1) + list(n1)  # newest first, capped at 5 of the 4 queued: all of them
    assert float(second) == pytest.approx(reference_infonce(q2, list(p2) + bank, [0, 1], t), rel=1e-9)
    assert bank_loss.bank.shape == (5, 4)  # 4 from step 1 + 2 from step 2, oldest dropped
    assert torch.allclose(bank_loss.bank[:2], torch.tensor(p2))
    bank_loss.eval()
    bank_loss(torch.tensor(q2), torch.tensor(p2))
    assert bank_loss.bank.shape == (5, 4)  # no growth outside training


def test_memory_bank_masks_a_queued_copy_of_the_positive_and_has_no_grad_into_the_bank():
    t = 0.5
    bank_loss = CrossBatchMemory(InfoNCE(temperature=t), size=8)
    p = torch.tensor(unit(np.eye(3)[:2] + 0.1))
    ids = text_ids(["doc a", "doc b"])
    bank_loss(p.clone(), p, positive_ids=ids)
    q = torch.tensor(unit(np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3]])), requires_grad=True)
    loss = bank_loss(q, p, positive_ids=ids)
    # a query's own positive text also sits in the bank: that copy is masked; the other queued text stays
    qn, pn = q.detach().numpy(), p.numpy()
    expected = np.mean([reference_infonce(qn[i:i + 1], [pn[0], pn[1], pn[1 - i]], [i], t) for i in range(2)])
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    unmasked = CrossBatchMemory(InfoNCE(temperature=t), size=8)
    unmasked(p.clone(), p)
    assert float(unmasked(q, p)) > float(loss) + 0.01  # without ids the copies count as negatives
    loss.backward()
    assert not bank_loss.bank.requires_grad and q.grad is not None
    with pytest.raises(ValueError, match="use_inbatch_negative=True"):
        CrossBatchMemory(InfoNCE(use_inbatch_negative=False))


# ---------------------------------------------------------------------- gradient cache
def no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def batch_for(model, n=6, negatives=1):
    words = "the cat dog fish ocean sky blue red green sun moon protein female eat".split()
    rng = np.random.default_rng(1)
    rows = [{"query": " ".join(rng.choice(words, 3)), "positive": " ".join(rng.choice(words, int(rng.integers(2, 9)))),
             "negative": [" ".join(rng.choice(words, 5)) for _ in range(negatives)]} for _ in range(n)]
    collator = RetrievalCollator(model.tokenizer, query_max_length=16, document_max_length=16)
    return collator.with_model_config(model.embedding_config)(rows)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("inner", ["infonce", "matryoshka"])
def test_cached_loss_gradients_equal_the_full_batch_loss(tiny_bert_dir, inner):
    model = no_dropout(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32"))
    model.train()
    inputs = batch_for(model)
    base = InfoNCE(temperature=0.05) if inner == "infonce" else MatryoshkaLoss(InfoNCE(temperature=0.05), [32, 16, 8])
    plain = base(model(**inputs["query"]), model(**inputs["positive"]), model(**inputs["negative"]),
                 positive_ids=inputs["positive_ids"], negative_ids=inputs["negative_ids"])
    (plain * 0.5).backward()  # a scaled loss, as with gradient accumulation
    expected = grads(model)
    model.zero_grad()
    cached = CachedLoss(base, mini_batch_size=2)(model, inputs)
    assert float(cached) == pytest.approx(float(plain), rel=1e-5)
    (cached * 0.5).backward()
    got = grads(model)
    assert got.keys() == expected.keys() and len(got) > 10
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst < 1e-5


def test_cached_loss_replays_dropout_masks(tiny_bert_dir):
    """With dropout on, the cached loss must reproduce the first pass in backward: check it against the
    full-batch loss computed with the same per-chunk random states."""
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")
    model.train()
    inputs = batch_for(model, n=4, negatives=0)
    loss_fn = CachedLoss(InfoNCE(temperature=0.05), mini_batch_size=4)  # one chunk per side
    torch.manual_seed(3)
    cached = loss_fn(model, inputs)
    cached.backward()
    got = grads(model)
    model.zero_grad()
    torch.manual_seed(3)  # the same random stream, consumed in the same order: query chunk, positive chunk
    plain = InfoNCE(temperature=0.05)(model(**inputs["query"]), model(**inputs["positive"]),
                                      positive_ids=inputs["positive_ids"])
    plain.backward()
    assert float(cached) == pytest.approx(float(plain), rel=1e-6)
    worst = max(float((got[k] - p.grad).abs().max()) for k, p in model.named_parameters() if p.grad is not None)
    assert worst < 1e-5


def write_pairs(path, n=32):
    words = "cat dog fish sky sun moon ocean blue red green".split()
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.choice(words, 2, replace=False)
            others = [w for w in words if w not in (a, b)]
            f.write(json.dumps({"query": f"{a} {b}", "positive": f"the {a} and the {b}",
                                "negative": [f"the {w}" for w in rng.choice(others, 2)]}) + "\n")
    return str(path)


def test_trainer_step_with_cached_loss_equals_plain_step(tiny_bert_dir, tmp_path):
    from transformers import TrainingArguments

    data = RetrievalDataset(write_pairs(tmp_path / "train.jsonl", n=16), train_group_size=2)
    states = []
    for loss_fn in (InfoNCE(temperature=0.1), CachedLoss(InfoNCE(temperature=0.1), mini_batch_size=3)):
        model = no_dropout(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean",
                                                                 precision="fp32"))
        args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=8, max_steps=1,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, optim="sgd",
                                 data_seed=0)
        collator = RetrievalCollator(model.tokenizer, query_max_length=16, document_max_length=16)
        RetrievalTrainer(model=model, args=args, train_dataset=data, data_collator=collator, loss_fn=loss_fn).train()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    before = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean").state_dict()
    moved = max(float((states[0][k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4  # the step did something
    assert max(float((states[0][k] - states[1][k]).abs().max()) for k in before) < 1e-6


# ---------------------------------------------------------------------- pipeline flags
def common_flags(tmp_path, model_dir, data, out="out"):
    return ["--output_dir", str(tmp_path / out), "--model_name_or_path", model_dir, "--do_train",
            "--data_name_or_path", data, "--per_device_train_batch_size", "8", "--num_train_epochs", "2",
            "--learning_rate", "5e-4", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
            "--report_to", "none", "--query_max_length", "16", "--document_max_length", "16",
            "--train_group_size", "2", "--pooling_method", "mean"]


def test_embed_flags_matryoshka_cached_truncate_and_eval_dims(tiny_bert_dir, tiny_beir_dir, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "train.jsonl")
    seen = []
    original = CachedLoss.forward

    def spy(self, model, inputs):
        seen.append((type(self.loss).__name__, self.mini_batch_size, list(self.loss.dims), list(self.loss.weights)))
        return original(self, model, inputs)

    monkeypatch.setattr(CachedLoss, "forward", spy)
    beir = tiny_beir_dir
    result = embed.run_embed(*embed.parse_args(common_flags(tmp_path, tiny_bert_dir, data) + [
        "--matryoshka_dims", "32,16,8", "--matryoshka_weights", "1,1,2", "--cached_mini_batch_size", "3",
        "--truncate_dim", "16",
        "--do_eval", "--eval_data_dir", str(beir), "--eval_dims", "32,8"]))
    assert seen and seen[0] == ("MatryoshkaLoss", 3, [32, 16, 8], [1.0, 1.0, 2.0])
    assert result["losses"][-1] < result["losses"][0]
    assert set(result["metrics_by_dim"]) == {32, 8} and 0 < result["metrics_by_dim"][8]["ndcg@10"] <= 1
    model = AutoModelForEmbedding.from_pretrained(tmp_path / "out")
    assert model.embedding_config.truncate_dim == 16
    vector = model.encode("cat dog")
    assert vector.shape == (16,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    assert model.encode("cat dog", truncate_dim=32).shape == (32,)
    from retrievals.pipelines import eval as eval_pipeline

    metrics = eval_pipeline.run_eval(eval_pipeline.EvalArguments(model_name_or_path=str(tmp_path / "out"),
                                                                 data_dir=str(beir), dims="32,8", num_examples=0))
    assert metrics["ndcg@10_d32"] == pytest.approx(result["metrics_by_dim"][32]["ndcg@10"])
    assert metrics["ndcg@10_d8"] == pytest.approx(result["metrics_by_dim"][8]["ndcg@10"])


def test_embed_flag_memory_bank(tiny_bert_dir, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "train.jsonl")
    sizes = []
    original = CrossBatchMemory.forward

    def spy(self, query, positive, *args, **kwargs):
        sizes.append(0 if self.bank is None else self.bank.shape[0])
        return original(self, query, positive, *args, **kwargs)

    monkeypatch.setattr(CrossBatchMemory, "forward", spy)
    result = embed.run_embed(*embed.parse_args(common_flags(tmp_path, tiny_bert_dir, data) + ["--memory_bank_size", "20"]))
    assert sizes[:4] == [0, 16, 20, 20]  # 8 positives + 8 negatives per step, capped at 20
    assert result["losses"][-1] < result["losses"][0] + 1.0
    with pytest.raises(ValueError, match="cannot be combined"):
        embed.run_embed(*embed.parse_args(common_flags(tmp_path, tiny_bert_dir, data, "out2") + [
            "--memory_bank_size", "20", "--matryoshka_dims", "32,16"]))

