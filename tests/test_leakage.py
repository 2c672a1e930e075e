"""The train/test leakage check: every planted duplicate is found (exact, reworded, near), a clean split
gives no alarm, the policies act as named, and the command reports on a BEIR folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrievals.evaluation.leakage import apply_policy, check_leakage, normalise
from retrievals.pipelines.check_data import CheckDataArguments, run_check_data

TEST = {"t1": "Does aspirin reduce the risk of heart attack?", "t2": "Vitamin D deficiency causes rickets in children.",
        "t3": "Smoking increases lung cancer incidence.", "t4": "Exercise lowers blood pressure in adults."}
TRAIN = {"a": "Statins lower LDL cholesterol.", "b": "Coffee consumption is linked to longer life.",
         "c": "Sleep loss impairs memory consolidation.", "d": "Obesity raises the risk of type 2 diabetes."}


class BagOfWords:
    """A stand-in embedder: normalised word counts (cosine = word overlap), so "near" is predictable."""

    def __init__(self):
        self.vocab = {}

    def _encode(self, texts, **_):
        rows = []
        for text in texts:
            v = np.zeros(256)
            for w in normalise(text).split():
                v[self.vocab.setdefault(w, len(self.vocab)) % 256] += 1
            rows.append(v / max(np.linalg.norm(v), 1e-9))
        return np.array(rows)

    encode_queries = encode_corpus = _encode


def test_normalise():
    assert normalise("  What IS  X? ") == normalise("what is x") == "what is x"
    assert normalise("Ｆｕｌｌ－width") == "full width"


def test_clean_split_has_no_alarm_and_planted_duplicates_are_all_found():
    clean = check_leakage(TRAIN, TEST, model=BagOfWords(), threshold=0.8)
    assert clean.leaks == [] and "none of 4 test queries" in clean.summary()

    planted = dict(TRAIN)
    planted["p1"] = TEST["t1"]                                        # exact copy
    planted["p2"] = "  VITAMIN D deficiency causes rickets in children "  # case and punctuation only
    planted["p3"] = "Lung cancer incidence increases with smoking."     # near: reordered (cosine 0.91)
    planted["p4"] = "Exercise lowers blood presure in adults"           # fuzzy: a typo (3-gram Jaccard >= 0.8)
    report = check_leakage(planted, TEST, model=BagOfWords(), threshold=0.8)
    assert {(leak.train_id, leak.test_id, leak.kind) for leak in report.leaks} == {
        ("p1", "t1", "exact query"), ("p2", "t2", "exact query"), ("p3", "t3", "near query"), ("p4", "t4", "fuzzy query")}
    assert report.test_ids == {"t1", "t2", "t3", "t4"}
    assert report.counts == {"exact query": 2, "near query": 1, "fuzzy query": 1}
    assert 0.8 <= next(leak.cosine for leak in report.leaks if leak.kind == "near query") < 1
    # without a model: the exact and fuzzy ones
    assert check_leakage(planted, TEST).counts == {"exact query": 2, "fuzzy query": 1}


def test_positives_are_checked_too():
    report = check_leakage(TRAIN, TEST, train_positives={"a": TEST["t4"], "b": "unrelated text"})
    assert [(leak.train_id, leak.test_id, leak.kind) for leak in report.leaks] == [("a", "t4", "exact positive")]


def test_policies():
    report = check_leakage({**TRAIN, "p": TEST["t1"]}, TEST)
    assert apply_policy(report, "warn") == set()
    assert apply_policy(report, "drop") == {"p"}
    with pytest.raises(ValueError, match="1 test queries leak"):
        apply_policy(report, "error", where="finetune_beir")
    with pytest.raises(ValueError, match="valid: warn, error, drop"):
        apply_policy(report, "ignore")
    assert apply_policy(check_leakage(TRAIN, TEST), "error") == set()


def test_check_data_command_on_a_beir_folder(tiny_beir_dir, tiny_bert_dir, tmp_path, capsys):
    import shutil

    root = tmp_path / "planted"
    shutil.copytree(tiny_beir_dir, root)
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines()]
    # training queries: copies of two test queries under new ids, plus one that is new
    extra = [{"_id": "tr1", "text": queries[0]["text"].upper()}, {"_id": "tr2", "text": queries[1]["text"] + "!"},
             {"_id": "tr3", "text": "a query of its own"}]
    with open(root / "queries.jsonl", "a") as f:
        f.writelines(json.dumps(q) + "\n" for q in extra)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\tdoc-{w}\t1\n" for q, w in zip(extra, ["cat", "dog", "fish"])))
    out = tmp_path / "leaks.json"
    report = run_check_data(CheckDataArguments(data_dir=str(root), output_file=str(out)))
    assert report.test_ids == {queries[0]["_id"], queries[1]["_id"]} and report.train_ids == {"tr1", "tr2"}
    assert json.loads(out.read_text())["leaked_test_queries"] == 2
    assert "2 of" in capsys.readouterr().out
    with pytest.raises(ValueError, match="test queries leak"):
        run_check_data(CheckDataArguments(data_dir=str(root), on_leak="error"))
    with_model = run_check_data(CheckDataArguments(data_dir=str(root), model_name_or_path=tiny_bert_dir,
                                                   threshold=0.999))
    assert {"tr1", "tr2"} <= with_model.train_ids


def test_embed_do_eval_checks_the_training_file(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys):
    from retrievals.pipelines import embed

    queries = [json.loads(line)["text"] for line in open(f"{tiny_beir_dir}/queries.jsonl")]
    rows = [{"query": f"{a} {b}", "positive": f"the {a} and the {b}"} for a, b in
            [("cat", "dog"), ("sky", "sun"), ("moon", "red"), ("blue", "green")] * 4]
    rows[5] = {"query": queries[2].upper(), "positive": "the copied one"}  # a planted copy of an eval query
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--model_name_or_path", tiny_bert_dir, "--do_train", "--do_eval", "--data_name_or_path", str(data),
             "--eval_data_dir", tiny_beir_dir, "--per_device_train_batch_size", "4", "--max_steps", "1",
             "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none", "--leak_threshold", "1.0"]
    assert embed.main(flags + ["--output_dir", str(tmp_path / "e"), "--on_leak", "error"]) == 2
    assert "test queries leak into the training data" in capsys.readouterr().err
    assert embed.main(flags + ["--output_dir", str(tmp_path / "d"), "--on_leak", "drop", "--report_html"]) == 0
    kept = [json.loads(line) for line in (tmp_path / "d.train-no-leak.jsonl").read_text().splitlines()]
    assert len(kept) == 15 and rows[5] not in kept
    # --report_html: the base model evaluated too, the page, the card and the figures, as finetune_beir writes them
    page = (tmp_path / "d" / "report.html").read_text()
    result = json.loads((tmp_path / "d" / "finetune_result.json").read_text())
    assert result["leakage"]["test"]["leaked_test_queries"] == 1 and "1 of" in page
    assert result["significance"]["test"]["queries"] == len(queries) and "<table id=\"metrics\">" in page
    assert "model-index" in (tmp_path / "d" / "README.md").read_text()


def test_a_typo_is_found_by_character_trigrams_without_a_model():
    report = check_leakage({**TRAIN, "p": "Does asprin reduce the risk of heart attack?"}, TEST)
    assert [(leak.train_id, leak.test_id, leak.kind) for leak in report.leaks] == [("p", "t1", "fuzzy query")]
    assert check_leakage({**TRAIN, "p": "Does asprin reduce the risk of heart attack?"}, TEST, min_jaccard=None).leaks == []
    # different claims that share many words are not near copies
    assert check_leakage({"x": "Smoking increases heart disease incidence."}, TEST).leaks == []


def test_short_texts_are_not_fuzzy_matches():
    # two-word queries share most of their 3-grams by chance: only exact (and near, with a model) for them
    assert check_leakage({"a": "cat dot"}, {"t": "cat dog"}).leaks == []
    assert [leak.kind for leak in check_leakage({"a": "CAT DOG!"}, {"t": "cat dog"}).leaks] == ["exact query"]
