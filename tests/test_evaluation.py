import gzip
import json
import math

import numpy as np
import pytest
import torch

from retrievals.data.beir import load_beir
from retrievals.data.sts import load_sts
from retrievals.evaluation.metrics import evaluate_run
from retrievals.evaluation.search import exact_search


def test_metrics_match_hand_computation():
    qrels = {"q1": {"d1": 1, "d3": 2}, "q2": {"d9": 1}, "q3": {"dx": 0}}
    run = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7}, "q2": {"d5": 0.5}}
    m = evaluate_run(run, qrels, ["ndcg@10", "mrr@10", "recall@2", "map@100", "ndcg@1"])
    # q1: DCG = 1/log2(2) + 2/log2(4) = 2; IDCG = 2/1 + 1/log2(3)
    ndcg_q1 = 2 / (2 + 1 / math.log2(3))
    # q3 has no relevant document and is not counted (as trec_eval with BEIR qrels); q2 scores 0.
    assert m["ndcg@10"] == pytest.approx(ndcg_q1 / 2)
    assert m["mrr@10"] == pytest.approx(1.0 / 2)
    assert m["recall@2"] == pytest.approx(0.5 / 2)
    assert m["map@100"] == pytest.approx((1 + 2 / 3) / 2 / 2)
    assert m["ndcg@1"] == pytest.approx((1 / 2) / 2)  # top doc gain 1, ideal gain 2


def test_metric_ties_and_bad_names():
    qrels = {"q": {"b": 1}}
    # equal scores: trec_eval breaks ties by doc id descending -> "b" before "a"
    assert evaluate_run({"q": {"a": 1.0, "b": 1.0}}, qrels, ["mrr@10"])["mrr@10"] == 1.0
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate_run({}, qrels, ["ndgc@10"])


def test_exact_search_matches_full_sort():
    torch.manual_seed(0)
    q, c = torch.randn(7, 16), torch.randn(103, 16)
    scores, idx = exact_search(q, c, top_k=10, chunk_size=17)
    full = (q @ c.T).topk(10, dim=1)
    torch.testing.assert_close(scores, full.values)
    assert torch.equal(idx, full.indices)
    s2, i2 = exact_search(q.numpy(), c[:4].numpy(), top_k=10)
    assert s2.shape == (7, 4) and i2.max() < 4


def _write_beir(root, corpus_lines):
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
        f.write("\n".join(corpus_lines) + "\n")
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what"}) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")


def test_beir_loader_and_errors(tmp_path):
    good = json.dumps({"_id": "d1", "title": "T", "text": "body"})
    _write_beir(tmp_path / "ok", [good])
    data = load_beir(str(tmp_path / "ok"))
    assert data.corpus_texts() == ["T body"] and data.qrels == {"q1": {"d1": 1}}
    _write_beir(tmp_path / "bad", [good, '{"_id": "d2", "text": '])
    with pytest.raises(ValueError, match=r"corpus.jsonl.gz:2: malformed JSON"):
        load_beir(str(tmp_path / "bad"))
    _write_beir(tmp_path / "notext", [good, json.dumps({"_id": "d2", "text": 5})])
    with pytest.raises(ValueError, match=r":2: field 'text' must be a string"):
        load_beir(str(tmp_path / "notext"))
    with pytest.raises(FileNotFoundError, match="does not exist.*wget .*scifact.zip"):
        load_beir(str(tmp_path / "scifact"))


def test_sts_loader(tmp_path):
    (tmp_path / "a.csv").write_text('"a, b",c,4.5\nd,e,1\n')
    pairs = load_sts(str(tmp_path / "a.csv"))
    assert pairs.sentences1 == ["a, b", "d"] and pairs.scores == [4.5, 1.0]
    (tmp_path / "b.data").write_text("x\ty\tz\n")
    with pytest.raises(ValueError, match=r"b.data:1: field 'score' is not a number"):
        load_sts(str(tmp_path / "b.data"))
    assert np.isclose(load_sts(str(tmp_path / "a.csv")).scores[1], 1.0)


def test_metrics_equal_pytrec_eval_on_a_run_file():
    import pytrec_eval  # the reference implementation (a dev dependency)
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(300)]
    qrels = {f"q{q}": {d: int(rng.integers(1, 3)) for d in rng.choice(docs, int(rng.integers(1, 6)), replace=False)}
             for q in range(50)}
    run = {q: {d: float(s) for d, s in zip(rng.choice(docs, 120, replace=False), rng.random(120))} for q in qrels}
    for q in list(run)[:5]:  # put some relevant documents near the top
        for d in qrels[q]:
            run[q][d] = 2.0 + rng.random()
    ours = evaluate_run(run, qrels, ["ndcg@10", "mrr@10", "recall@100", "map@100"])
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recip_rank", "recall.100", "map_cut.100"})
    ref = evaluator.evaluate(run)
    mean = lambda key: float(np.mean([r[key] for r in ref.values()]))  # noqa: E731
    assert ours["ndcg@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-9)
    assert ours["recall@100"] == pytest.approx(mean("recall_100"), abs=1e-9)
    assert ours["map@100"] == pytest.approx(mean("map_cut_100"), abs=1e-9)
    # trec_eval's recip_rank has no cut-off; compare on a run truncated to 10 documents
    top10 = {q: dict(sorted(d.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, d in run.items()}
    ref10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    assert ours["mrr@10"] == pytest.approx(float(np.mean([r["recip_rank"] for r in ref10.values()])), abs=1e-9)


def test_per_query_values_by_hand_and_their_mean_is_the_metric():
    import math

    from retrievals.evaluation.metrics import evaluate_run, per_query

    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}, "q4": {"d": 1}}
    run = {"q1": {"a": 0.9, "b": 0.1}, "q2": {"a": 0.9, "b": 0.5}}  # q3 has nothing relevant, q4 no run
    values = per_query(run, qrels, ["ndcg@10", "mrr@10"])
    assert values["ndcg@10"] == {"q1": 1.0, "q2": 1 / math.log2(3), "q4": 0.0}
    assert values["mrr@10"] == {"q1": 1.0, "q2": 0.5, "q4": 0.0}
    assert evaluate_run(run, qrels, ["ndcg@10"])["ndcg@10"] == sum(values["ndcg@10"].values()) / 3
