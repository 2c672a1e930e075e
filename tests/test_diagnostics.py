"""Training diagnostics: values against a hand computation, each rule made to fire on purpose, and the
trainer logging them beside the loss."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from retrievals.trainer.diagnostics import DiagnosticsMonitor, batch_diagnostics


def test_values_match_a_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # query 0: cosine 1; query 1: cosine 1/sqrt2
    neg = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # query 0's negative: 0; query 1's: 1 (above its positive)
    s = batch_diagnostics(q, pos, neg, temperature=0.1)
    r = 1 / math.sqrt(2)
    # scores: q0 -> [1, r, 0, 0], q1 -> [0, r, 1, 1]
    assert s["diag_accuracy"] == pytest.approx(0.5)
    assert s["diag_margin"] == pytest.approx(((1 - r) + (r - 1)) / 2)
    assert s["diag_positive_rank"] == pytest.approx((1 + 3) / 2)  # q1: two documents (1, 1) above r
    assert s["diag_logit_range"] == pytest.approx(((1 - 0) + (1 - 0)) / 2 / 0.1)
    assert s["diag_negatives_above"] == pytest.approx(0.5)
    docs = torch.nn.functional.normalize(torch.cat([pos, neg]), dim=-1)
    pairwise = docs @ docs.T
    assert s["diag_doc_cosine"] == pytest.approx(float((pairwise.sum() - pairwise.trace()) / 12))
    sv = torch.linalg.svdvals(docs)
    p = sv / sv.sum()
    assert s["diag_effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_effective_rank_of_collapsed_and_spread_vectors():
    same = torch.ones(8, 4)
    assert batch_diagnostics(same[:4], same[4:])["diag_effective_rank"] == pytest.approx(1.0, abs=1e-4)
    eye = torch.eye(4)
    assert batch_diagnostics(eye, eye)["diag_effective_rank"] == pytest.approx(4.0)


def _rules_fired(stats):
    return DiagnosticsMonitor().check(stats, step=1)


def test_each_rule_fires_on_purpose_and_not_on_a_healthy_batch(caplog):
    torch.manual_seed(0)
    healthy_q = torch.randn(16, 32)
    healthy = batch_diagnostics(healthy_q, healthy_q + 0.3 * torch.randn(16, 32), torch.randn(16, 32))
    assert _rules_fired(healthy) == []
    # collapse: every document is almost the same vector
    base = torch.randn(1, 32)
    collapsed = batch_diagnostics(torch.randn(16, 32), base + 0.01 * torch.randn(16, 32))
    with caplog.at_level(logging.WARNING):
        assert _rules_fired(collapsed) == ["collapse"]
    assert "embedding collapse" in caplog.text
    # temperature too low: the same healthy batch at temperature 0.005
    cold = batch_diagnostics(healthy_q, healthy_q + 0.3 * torch.randn(16, 32), temperature=0.005)
    assert _rules_fired(cold) == ["temperature"]
    # false negatives: each query's hard negative is a copy of the query
    q = torch.randn(16, 32)
    fn = batch_diagnostics(q, q + 0.8 * torch.randn(16, 32), q.clone())
    assert _rules_fired(fn) == ["false_negatives"]


def test_monitor_warns_first_then_every_repeat(caplog):
    monitor = DiagnosticsMonitor(repeat=3)
    stats = {"diag_doc_cosine": 0.99, "diag_effective_rank": 1.0, "diag_logit_range": 5.0}
    with caplog.at_level(logging.WARNING):
        for step in range(1, 7):
            monitor.check(stats, step)
    assert monitor.fired == {"collapse": 6} and len(monitor.messages) == 3  # firings 1, 3 and 6
    assert monitor.messages[0].startswith("step 1: embedding collapse")


def test_trainer_logs_diagnostics_with_the_loss_and_warns_on_a_cold_temperature(tiny_bert_dir, tmp_path, caplog):
    from datasets import Dataset
    from transformers import TrainingArguments

    from retrievals import AutoModelForEmbedding, PairCollator, RetrievalTrainer
    from retrievals.losses import InfoNCE

    rows = [{"query": f"query {w}", "positive": f"the {w} document"} for w in
            "cat dog fish sky sun moon red blue green ocean summit protein".split()]
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-4)
    trainer = RetrievalTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               data_collator=PairCollator(model.tokenizer), loss_fn=InfoNCE(temperature=0.001))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("diag_accuracy" in h and "diag_effective_rank" in h for h in logged)
    assert all(0 <= h["diag_accuracy"] <= 1 and 1 <= h["diag_positive_rank"] <= 4 for h in logged)
    cold = sum(h["diag_logit_range"] > 60 for h in logged)  # the rule's own threshold, on the logged figures
    assert cold >= 1 and trainer.diagnostics.fired["temperature"] == cold and "temperature too low" in caplog.text
