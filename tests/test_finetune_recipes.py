"""The main job's recipe levers (issue 22): a dev split carved from train that never reads the test split,
online refresh, false-negative rules and distillation from a cross-encoder, with their figures kept."""

import json

import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.data.beir import BeirDataset, load_beir, split_queries
from retrievals.pipelines import finetune_beir

FLAGS = ["--epochs", "2", "--batch_size", "8", "--learning_rate", "1e-3", "--range_for_sampling", "2-20",
         "--negative_number", "3"]


def linked_dataset():
    """12 queries; q0-q3 share document a, q4-q5 share b, the others have their own document."""
    qrels = {f"q{i}": {"a": 1} for i in range(4)}
    qrels.update({"q4": {"b": 1}, "q5": {"b": 1, "c": 1}, "q6": {"c": 1}})
    qrels.update({f"q{i}": {f"own{i}": 1} for i in range(7, 12)})
    docs = {d for rels in qrels.values() for d in rels}
    return BeirDataset(corpus={d: {"title": "", "text": d} for d in sorted(docs)},
                       queries={q: f"query {q}" for q in qrels}, qrels=qrels)


def test_split_queries_random_and_disjoint():
    data = linked_dataset()
    rest, dev = split_queries(data, 0.25, seed=3, kind="random")
    assert len(dev.queries) == 3 and len(rest.queries) == 9 and set(dev.queries).isdisjoint(rest.queries)
    assert set(dev.qrels) == set(dev.queries) and dev.corpus is data.corpus  # the corpus stays whole
    assert split_queries(data, 0.25, seed=3)[1].queries == dev.queries  # seeded
    assert {tuple(sorted(split_queries(data, 0.25, seed=s)[1].queries)) for s in range(6)} != {tuple(sorted(dev.queries))}
    for seed in range(10):
        rest, dev = split_queries(data, 0.25, seed=seed, kind="disjoint")
        judged = ({d for q in rest.qrels for d in rest.qrels[q]}, {d for q in dev.qrels for d in dev.qrels[q]})
        assert judged[0].isdisjoint(judged[1]) and len(dev.queries) >= 3
        assert {"q4", "q5", "q6"} <= set(dev.queries) or {"q4", "q5", "q6"}.isdisjoint(dev.queries)  # linked via c
    with pytest.raises(ValueError, match="valid: random, disjoint"):
        split_queries(data, 0.2, kind="documents")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_queries(data, 1.0)


def test_eval_on_dev_never_reads_the_test_split(word_beir, tiny_bert_dir, tmp_path, capsys):
    (word_beir / "qrels" / "test.tsv").unlink()  # it would fail if anything read it
    out = tmp_path / "dev"
    code = finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(word_beir), "--output_dir",
                               str(out), "--eval_on", "dev", "--dev_fraction", "0.2", "--rounds", "2"] + FLAGS)
    assert code == 0
    printed = capsys.readouterr().out
    assert "CPU: " in printed and "estimated time: " in printed and "estimated time for the rest: " in printed
    assert "| dev metric | base | round 1 | round 2 |" in printed
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["eval_on"] == "dev" and set(result["base_evaluations"]) == {"dev"}
    assert result["training_queries"] == 48
    rest, dev = split_queries(load_beir(str(word_beir), "train"), 0.2, seed=0)
    trained = {json.loads(line)["query"] for line in open(out / "round-1" / "train_hn.jsonl")}
    assert trained == set(rest.queries.values()) and trained.isdisjoint(dev.queries.values())
    # the dev curve: base, then each round's end, on one step axis; the round-2 point is the saved model's
    curve = result["dev_curve"]
    assert [s for s, _ in curve] == [0, result["rounds"][0]["steps"], result["rounds"][1]["steps"]]
    assert curve[0][1] == result["base"]["ndcg@10"] and curve[-1][1] == result["fine_tuned"]["ndcg@10"]
    queries = result["rounds"][-1]["ndcg@10_per_query"]["dev"]  # for paired comparisons between runs
    assert set(queries) == set(dev.qrels) and np.mean(list(queries.values())) == pytest.approx(curve[-1][1])
    from retrievals.evaluation.retrieval import evaluate_retrieval

    saved = AutoModelForEmbedding.from_pretrained(out)
    assert evaluate_retrieval(saved, dev).metrics["ndcg@10"] == pytest.approx(curve[-1][1], abs=1e-4)
    assert (out / "finetune.png").stat().st_size > 1000
    assert finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--eval_on", "dev"]) == 2  # no --dev_fraction


def test_refresh_and_false_negative_rules_are_applied_and_counted(word_beir, tiny_bert_dir, tmp_path):
    from retrievals.mining.false_negatives import FalseNegativeFilter
    from retrievals.mining.hard_negatives import mine_hard_negatives

    out = tmp_path / "refresh"
    code = finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(word_beir), "--output_dir",
                               str(out), "--hn_refresh_steps", "4", "--max_positive_ratio", "1.0",
                               "--dev_fraction", "0.2", "--dev_eval_steps", "6"] + FLAGS)
    assert code == 0
    result = json.loads((out / "finetune_result.json").read_text())
    assert [e["step"] for e in result["rounds"][0]["refreshes"]] == [4, 8]  # 48 queries / 8 x 2 epochs = 12 steps
    assert all(e["seconds"] > 0 for e in result["rounds"][0]["refreshes"])
    assert [s for s, _ in result["dev_curve"]] == [0, 6, 12]
    assert set(result["base_evaluations"]) == {"dev", "test"} and result["eval_on"] == "test"
    # round 1's counts are those of the same rule applied by the base model
    train, _ = split_queries(load_beir(str(word_beir), "train"), 0.2, seed=0)
    records = finetune_beir.training_records(train)
    counts = {}
    mine_hard_negatives(AutoModelForEmbedding.from_pretrained(tiny_bert_dir, max_length=256, query_max_length=64),
                        records, candidate_pool=train.corpus_texts(), range_for_sampling=(2, 20), negative_number=3,
                        seed=42, false_negatives=FalseNegativeFilter(max_positive_ratio=1.0), report=counts)
    assert counts["max_positive_ratio"] > 0 and result["rounds"][0]["mining"] == counts


def test_distillation_from_a_cross_encoder_uses_its_scores(word_beir, tiny_bert_dir, tmp_path):
    from retrievals.models.cross_encoder import CrossEncoder

    teacher_dir = tmp_path / "ce"
    CrossEncoder.from_encoder(tiny_bert_dir, max_length=32).save_pretrained(teacher_dir)
    out = tmp_path / "kl"
    code = finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(word_beir), "--output_dir",
                               str(out), "--teacher", str(teacher_dir), "--loss_fn", "listwise_kl",
                               "--train_group_size", "3", "--rounds", "2"] + FLAGS)
    assert code == 0
    teacher = CrossEncoder.from_pretrained(teacher_dir)
    record = json.loads(open(out / "round-1" / "train_hn.jsonl").readline())
    expected = teacher.predict([(record["query"], d) for d in record["positive"] + record["negative"]])
    np.testing.assert_allclose(record["pos_scores"] + record["neg_scores"], expected, rtol=1e-4, atol=1e-5)
    losses = [loss for _, loss in json.loads((out / "finetune_result.json").read_text())["losses"]]
    assert losses and all(loss >= 0 for loss in losses)  # a KL divergence, not InfoNCE's
    base = ["--model_name_or_path", tiny_bert_dir, "--data_dir", str(word_beir)]
    assert finetune_beir.main(base + ["--loss_fn", "margin_mse"]) == 2  # no teacher
    assert finetune_beir.main(base + ["--teacher", str(teacher_dir), "--loss_fn", "listwise_kl",
                                      "--train_group_size", "3", "--hn_refresh_steps", "5"]) == 2
    assert finetune_beir.main(base + ["--loss_fn", "kl"]) == 2


def test_the_time_estimate_counts_encodes_and_training_steps(monkeypatch):
    monkeypatch.setenv("RETRIEVALS_CPU_BF16", "1")
    args = finetune_beir.FinetuneArguments(model_name_or_path="m", epochs=3, batch_size=32, train_group_size=2,
                                           document_max_length=256)
    encode, train = finetune_beir.SECONDS_PER_TOKEN[True]
    # 64 queries: 2 steps per epoch, 6 steps; the corpus is encoded before and after training
    expected = (2 * 100 * 256 + 6 * 32 * 2 * 256 * train / encode) * 1e-4
    assert finetune_beir.estimate_seconds(args, 100, 64, 1e-4) == pytest.approx(expected)
    args.rounds, args.hn_refresh_steps = 2, 4  # a refresh at step 4 of each 6-step round: 5 encodes in all
    expected = (5 * 100 * 256 + 12 * 32 * 2 * 256 * train / encode) * 1e-4
    assert finetune_beir.estimate_seconds(args, 100, 64, 1e-4) == pytest.approx(expected)


def test_the_base_corpus_vectors_are_cached_by_model_and_texts(word_beir, tiny_bert_dir, tmp_path):
    from retrievals.pipelines.finetune_beir import encode_corpus_cached, load_base

    args = finetune_beir.FinetuneArguments(model_name_or_path=tiny_bert_dir)
    model, texts, cache = load_base(args), load_beir(str(word_beir), "train").corpus_texts(), tmp_path / "cache"
    first, hit = encode_corpus_cached(model, texts, str(cache))
    assert not hit and len(list(cache.iterdir())) == 1
    again, hit = encode_corpus_cached(load_base(args), texts, str(cache))
    assert hit and np.array_equal(first, again)
    np.testing.assert_allclose(first, model.encode_corpus(texts), atol=1e-6)
    _, hit = encode_corpus_cached(model, texts[:-1] + [texts[-1] + "!"], str(cache))  # one text changed
    assert not hit
    shorter = finetune_beir.FinetuneArguments(model_name_or_path=tiny_bert_dir, document_max_length=8)
    _, hit = encode_corpus_cached(load_base(shorter), texts, str(cache))  # other vectors: another key
    assert not hit and len(list(cache.iterdir())) == 3


def test_the_demo_recipe_in_the_makefile_parses():
    import os
    import re

    from transformers import HfArgumentParser

    makefile = open(os.path.join(os.path.dirname(__file__), "..", "Makefile")).read()
    recipe = re.search(r"^DEMO_RECIPE \?= (.*)$", makefile, re.M).group(1).split()
    (args,) = HfArgumentParser([finetune_beir.FinetuneArguments]).parse_args_into_dataclasses(
        ["--model_name_or_path", "m"] + recipe)
    assert args.dev_fraction > 0 and args.eval_on == "test"  # the plot's dev curve; the table's test split
    assert "--seed $(SEED)" in makefile


def test_the_splits_share_one_corpus(word_beir):
    args = finetune_beir.FinetuneArguments(model_name_or_path="m", data_dir=str(word_beir), dev_fraction=0.2)
    train, dev, test = finetune_beir.load_splits(args)
    assert train.corpus is dev.corpus is test.corpus and len(test.corpus) == 90  # read once, one row order
    assert set(test.queries) == {f"q{i}" for i in range(60, 90)} and set(test.qrels) == set(test.queries)


def test_leaked_queries_are_found_dropped_and_the_gain_has_an_interval(word_beir, tiny_bert_dir, tmp_path, capsys):
    # plant a leak: training query q0 becomes a copy of test query q60 (case and punctuation aside)
    queries = [json.loads(line) for line in (word_beir / "queries.jsonl").read_text().splitlines()]
    queries[0]["text"] = queries[60]["text"].upper() + "?"
    (word_beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    # the tiny random model embeds every short query alike: near copies only at cosine 1 here
    common = ["--model_name_or_path", tiny_bert_dir, "--data_dir", str(word_beir), "--leak_threshold", "1.0"] + FLAGS
    assert finetune_beir.main([*common, "--output_dir", str(tmp_path / "error"), "--on_leak", "error"]) == 2
    assert "test queries leak into the training data" in capsys.readouterr().err
    assert finetune_beir.main([*common, "--output_dir", str(tmp_path / "drop"), "--on_leak", "drop"]) == 0
    result = json.loads((tmp_path / "drop" / "finetune_result.json").read_text())
    leak = result["leakage"]["test"]
    assert leak["leaked_test_queries"] == 1 and leak["counts"]["exact query"] == 1
    assert leak["examples"][0]["train_id"] == "q0" and leak["examples"][0]["test_id"] == "q60"
    assert result["training_queries"] == 59  # q0 dropped, the test split unchanged
    s = result["significance"]["test"]
    assert s["queries"] == 30 and s["base"]["low"] <= s["base"]["mean"] <= s["base"]["high"]
    assert s["change"]["difference"] == pytest.approx(result["fine_tuned"]["ndcg@10"] - result["base"]["ndcg@10"])
    assert 0 < s["change"]["p_value"] <= 1
    out = capsys.readouterr().out
    assert "test nDCG@10 over 30 queries" in out and "paired permutation" in out
    # the model card: results in model-index, the interval, the leakage line
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(tmp_path / "drop" / "README.md"))
    ndcg = [r for r in card.data.eval_results if r.metric_type == "ndcg_at_10"]
    assert ndcg[0].metric_value == round(result["fine_tuned"]["ndcg@10"], 4) and ndcg[0].dataset_split == "test"
    assert "test split: 1 of 30 queries have a training twin" in card.text and "- training queries: 59" in card.text
    assert s["change_text"] in card.text
