"""`eval` reports intervals and paired comparisons: values checked against the significance module on the
same per-query figures, a model compared with itself gives 0 and p = 1, a run file round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import WORDS
from retrievals import AutoModelForEmbedding
from retrievals.evaluation.metrics import per_query
from retrievals.evaluation.significance import bootstrap_interval, paired_difference
from retrievals.pipelines.eval import EvalArguments, run_eval


def _perturbed_copy(src: str, dst: str) -> str:
    model = AutoModelForEmbedding.from_pretrained(src, precision="fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(dst)
    return dst


def test_retrieval_intervals_and_paired_comparison(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys):
    weak = _perturbed_copy(tiny_bert_dir, str(tmp_path / "weak"))  # per-query figures that vary
    base = EvalArguments(model_name_or_path=weak, data_dir=tiny_beir_dir, precision="fp32", bootstrap=300,
                         seed=3, save_run=str(tmp_path / "run.json"))
    metrics = run_eval(base)
    saved = json.loads((tmp_path / "run.json").read_text())
    from retrievals.data.beir import load_beir

    values = per_query(saved["run"], load_beir(tiny_beir_dir).qrels, ["ndcg@10", "recall@100"])
    expected = bootstrap_interval(list(values["ndcg@10"].values()), resamples=300, seed=3)
    assert metrics["ndcg@10"] == pytest.approx(expected.mean)
    assert (metrics["ndcg@10_low"], metrics["ndcg@10_high"]) == pytest.approx((expected.low, expected.high))
    assert metrics["ndcg@10_low"] < metrics["ndcg@10"] < metrics["ndcg@10_high"]
    assert "ndcg@10:" in capsys.readouterr().out

    # the same model against its own run file: no difference, p = 1
    same = run_eval(EvalArguments(model_name_or_path=weak, data_dir=tiny_beir_dir, precision="fp32",
                                  bootstrap=100, compare=str(tmp_path / "run.json")))
    assert same["ndcg@10_diff"] == 0 and same["ndcg@10_p"] == 1.0

    # another model (folder): the difference of the means, and the p-value of the per-query differences
    other = weak
    versus = run_eval(EvalArguments(model_name_or_path=tiny_bert_dir, data_dir=tiny_beir_dir, precision="fp32",
                                    bootstrap=200, compare=other, save_run=str(tmp_path / "run2.json")))
    other_metrics = run_eval(EvalArguments(model_name_or_path=other, data_dir=tiny_beir_dir, precision="fp32",
                                           bootstrap=0, save_run=str(tmp_path / "other.json")))
    assert versus["ndcg@10_diff"] == pytest.approx(versus["ndcg@10"] - other_metrics["ndcg@10"])
    assert "ndcg@10_low" not in other_metrics  # --bootstrap 0
    qrels = load_beir(tiny_beir_dir).qrels
    mine = per_query(json.loads((tmp_path / "run2.json").read_text())["run"], qrels)["ndcg@10"]
    theirs = per_query(json.loads((tmp_path / "other.json").read_text())["run"], qrels)["ndcg@10"]
    assert versus["ndcg@10_p"] == pytest.approx(paired_difference(mine, theirs, resamples=200).p_value)
    out = capsys.readouterr().out
    assert f"vs {other}:" in out and ", p" in out


def test_sts_interval_and_comparison(tiny_bert_dir, tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        a = " ".join(rng.choice(WORDS, 4))
        b = " ".join(rng.choice(WORDS, 4))
        rows.append(f"{a}\t{b}\t{rng.uniform(0, 5):.2f}")
    sts = tmp_path / "sts.tsv"
    sts.write_text("\n".join(rows) + "\n")
    metrics = run_eval(EvalArguments(model_name_or_path=tiny_bert_dir, sts_file=str(sts), precision="fp32",
                                     bootstrap=200, compare=tiny_bert_dir))
    assert metrics["sts_spearman_low"] <= metrics["sts_spearman"] <= metrics["sts_spearman_high"]
    assert metrics["sts_spearman_diff"] == 0 and metrics["sts_spearman_p"] == 1.0


def test_a_bad_run_file_is_named(tiny_bert_dir, tiny_beir_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"queries": {}}')
    with pytest.raises(ValueError, match="bad.json: no 'run' field"):
        run_eval(EvalArguments(model_name_or_path=tiny_bert_dir, data_dir=tiny_beir_dir, compare=str(bad)))


def test_two_run_files_compare_without_a_model(tiny_bert_dir, tiny_beir_dir, tmp_path):
    weak = _perturbed_copy(tiny_bert_dir, str(tmp_path / "weak"))
    for name, path in (("a", tiny_bert_dir), ("b", weak)):
        run_eval(EvalArguments(model_name_or_path=path, data_dir=tiny_beir_dir, precision="fp32", bootstrap=0,
                               save_run=str(tmp_path / f"{name}.json")))
    by_runs = run_eval(EvalArguments(model_name_or_path=str(tmp_path / "a.json"), data_dir=tiny_beir_dir,
                                     bootstrap=100, compare=str(tmp_path / "b.json")))
    by_model = run_eval(EvalArguments(model_name_or_path=tiny_bert_dir, data_dir=tiny_beir_dir, precision="fp32",
                                      bootstrap=100, compare=str(tmp_path / "b.json")))
    for key in ("ndcg@10", "ndcg@10_low", "ndcg@10_diff", "ndcg@10_diff_high", "ndcg@10_p"):
        assert by_runs[key] == pytest.approx(by_model[key]), key
    with pytest.raises(ValueError, match="a run file is scored on --data_dir alone"):
        run_eval(EvalArguments(model_name_or_path=str(tmp_path / "a.json"), data_dir=tiny_beir_dir, dims="16"))
