"""False-negative rules of hard-negative mining drop exactly the candidates they should, on a small pool
whose scores are known (a fake model with fixed unit vectors), and on the command line with a real model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.mining.false_negatives import FalseNegativeFilter
from retrievals.mining.hard_negatives import mine_hard_negatives
from retrievals.models.cross_encoder import CrossEncoder
from retrievals.pipelines import build_hn

# cosine of each pool document with the query (the query is the unit vector [1, 0])
SCORES = {"positive doc": 0.80, "c1": 0.95, "c2": 0.79, "c3": 0.77, "c4": 0.70, "c5": 0.50, "c6": 0.20}
RECORD = {"query": "the query", "positive": "positive doc"}


def unit(cos: float) -> np.ndarray:
    return np.array([cos, math.sqrt(1 - cos * cos)], dtype=np.float32)


class FixedModel:
    """Embeds each known text as a fixed 2-d unit vector, so every score is known exactly."""

    def encode_queries(self, texts, **_):
        return np.stack([unit(1.0) for _ in texts])

    def encode_corpus(self, texts, **_):
        return np.stack([unit(SCORES[t]) for t in texts])


class FixedCrossEncoder(CrossEncoder):
    """A cross-encoder teacher with fixed logits per document; records the pairs it was asked about."""

    def __init__(self, logits):
        self.logits, self.asked = logits, []

    def predict(self, pairs, batch_size=32, max_length=None, show_progress_bar=False):
        self.asked += list(pairs)
        return np.array([self.logits[d] for _, d in pairs], dtype=np.float32)


def mine(rules=None, teacher=None, negative_number=6):
    report = {}
    out = mine_hard_negatives(FixedModel(), [RECORD], list(SCORES), range_for_sampling=(0, 7),
                              negative_number=negative_number, false_negatives=rules, teacher=teacher, report=report)
    return sorted(out[0]["negative"]), report


def test_without_rules_every_candidate_but_the_positive_is_kept():
    negatives, report = mine()
    assert negatives == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert report == {"backfilled_queries": 0}


def test_top_k_perc_pos_drops_candidates_above_the_fraction_of_the_positive():
    negatives, report = mine(FalseNegativeFilter(max_positive_ratio=0.95), negative_number=3)  # limit 0.76
    assert negatives == ["c4", "c5", "c6"]
    assert report["max_positive_ratio"] == 3 and report["backfilled_queries"] == 0


def test_margin_rule_drops_candidates_within_the_margin_of_the_positive():
    negatives, report = mine(FalseNegativeFilter(positive_margin=0.02), negative_number=4)  # limit 0.78
    assert negatives == ["c3", "c4", "c5", "c6"]
    assert report["positive_margin"] == 2


def test_both_rules_the_stricter_wins_and_each_counts_its_own():
    negatives, report = mine(FalseNegativeFilter(max_positive_ratio=0.95, positive_margin=0.02), negative_number=3)
    assert negatives == ["c4", "c5", "c6"]
    assert report["max_positive_ratio"] == 3 and report["positive_margin"] == 2 and report["dropped_by_score"] == 3


def test_several_positives_use_the_lowest_positive_score():
    record = {"query": "the query", "positive": ["positive doc", "c4"]}  # lowest positive score 0.70
    out = mine_hard_negatives(FixedModel(), [record], list(SCORES), range_for_sampling=(0, 7), negative_number=2,
                              false_negatives=FalseNegativeFilter(max_positive_ratio=0.9))  # limit 0.63
    assert sorted(out[0]["negative"]) == ["c5", "c6"]


def test_teacher_drops_what_it_scores_relevant_and_is_asked_only_what_is_needed():
    logits = {t: -3.0 for t in SCORES}
    logits["c3"] = 3.0  # sigmoid 0.95: relevant
    teacher = FixedCrossEncoder(logits)
    negatives, report = mine(FalseNegativeFilter(teacher_threshold=0.5), teacher=teacher, negative_number=5)
    assert negatives == ["c1", "c2", "c4", "c5", "c6"]
    assert report.get("teacher_threshold", 0) == sum(d == "c3" for _, d in teacher.asked) <= 1
    assert len(teacher.asked) <= 6 and all(q == "the query" for q, _ in teacher.asked)

    few = FixedCrossEncoder({t: -3.0 for t in SCORES})
    mine(FalseNegativeFilter(teacher_threshold=0.5), teacher=few, negative_number=2)
    assert len(few.asked) == 2  # two needed, none relevant: two pairs scored


def test_teacher_rule_without_a_teacher_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="needs a teacher"):
        mine(FalseNegativeFilter(teacher_threshold=0.5))
    with pytest.raises(ValueError, match="max_positive_ratio must be in"):
        FalseNegativeFilter(max_positive_ratio=0)
    # a cross-encoder's threshold is a probability: 2.0 would silently drop nothing
    for threshold in (2.0, 0.0):
        with pytest.raises(ValueError, match=r"probability in \(0, 1\).*sigmoid"):
            mine(FalseNegativeFilter(teacher_threshold=threshold), teacher=FixedCrossEncoder({t: 9.0 for t in SCORES}))
    with pytest.raises(ValueError, match="--teacher_threshold needs --teacher_model_name_or_path"):
        build_hn.BuildHNArguments(input_file="a", output_file="b", model_name_or_path="m", teacher_threshold=0.5)


def test_cli_ratio_rule_drops_exactly_the_candidates_the_model_scores_too_close(tiny_bert_dir, tmp_path):
    words = "cat dog fish sky sun moon ocean blue red green one two".split()
    pool = [f"the {a} and the {b}" for a, b in zip(words, words[1:] + words[:1])]
    records = [{"query": f"{a} {b}", "positive": text} for text, (a, b) in zip(pool, zip(words, words[1:]))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pool))
    argv = ["--model_name_or_path", tiny_bert_dir, "--input_file", str(tmp_path / "in.jsonl"), "--output_file",
            str(tmp_path / "out.jsonl"), "--candidate_pool", str(tmp_path / "pool.jsonl"), "--range_for_sampling",
            "0-12", "--negative_number", "11", "--max_positive_ratio", "0.99"]
    assert build_hn.main(argv) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir)
    docs = np.asarray(model.encode_corpus(pool), dtype=np.float32)
    queries = np.asarray(model.encode_queries([r["query"] for r in records]), dtype=np.float32)
    dropped = 0
    for i, rec in enumerate(out):
        scores = docs @ queries[i]
        limit = 0.99 * scores[pool.index(records[i]["positive"])]
        others = [(t, s) for t, s in zip(pool, scores) if t != records[i]["positive"]]
        too_close = {t for t, s in others if s > limit + 1e-4}
        clearly_kept = {t for t, s in others if s < limit - 1e-4}
        assert not too_close & set(rec["negative"]), i  # not mined, not back-filled either
        assert clearly_kept <= set(rec["negative"]), i  # 11 asked: every allowed document is taken
        dropped += len(too_close)
    assert dropped > 0  # the rule had something to drop
