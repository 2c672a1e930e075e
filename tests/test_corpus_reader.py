"""One corpus reader, one empty-document policy on every path: the BEIR loader (eval, finetune_beir, embed),
build_hn's candidate pool and the encode job read a corpus through ``retrievals.data.corpus``; empty documents
are skipped with a logged count by default, embedded with ``embed``, refused (naming file:line and the
fields) with ``error``."""

from __future__ import annotations

import json
import logging

import pytest

from retrievals.data.beir import load_beir
from retrievals.data.corpus import CorpusError, CorpusOptions, CorpusReader

WORDS = "cat dog fish sky sun moon ocean blue red green".split()
EMPTY = {4: {"_id": "e1", "title": "", "text": ""}, 9: {"_id": "e2", "title": " ", "text": "  "}}  # line: record


def _write_beir(root, with_empty: bool = True):
    """10 one-word documents; with ``with_empty`` two empty ones at lines 4 and 9 of corpus.jsonl. Test qrels:
    each word's query -> its document; train qrels: q0 -> its document and e2, q3 -> e1 only."""
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": f"doc-{w}", "title": w, "text": f"the {w}"} for w in WORDS]
    if with_empty:
        for line, record in sorted(EMPTY.items()):
            docs.insert(line - 1, record)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": w}) + "\n" for i, w in enumerate(WORDS)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\tdoc-{w}\t1\n" for i, w in enumerate(WORDS)))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tdoc-cat\t1\nq0\te2\t1\nq3\te1\t1\n"
                                              "q1\tdoc-dog\t1\nq2\tdoc-fish\t1\n")
    return str(root)


@pytest.fixture
def beir_with_empty(tmp_path):
    return _write_beir(tmp_path / "beir")


def test_the_beir_loader_skips_empty_documents_with_a_count(beir_with_empty, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_beir(beir_with_empty, "test")
    assert list(data.corpus) == [f"doc-{w}" for w in WORDS] and data.empty_documents == 2
    assert "corpus.jsonl: 2 empty documents (skipped)" in caplog.text
    assert data.corpus_texts()[:2] == ["cat the cat", "dog the dog"]
    embedded = load_beir(beir_with_empty, "test", empty_documents="embed")
    assert list(embedded.corpus)[3] == "e1" and len(embedded.corpus) == 12 and embedded.corpus_texts()[8] == ""


def test_the_error_policy_names_the_file_the_line_and_the_fields(beir_with_empty):
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:4: document 'e1' has empty 'title' and 'text'"):
        load_beir(beir_with_empty, "test", empty_documents="error")
    reader = CorpusReader(f"{beir_with_empty}/corpus.jsonl", CorpusOptions(empty_documents="error"))
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:4: document 'e1' has empty 'title' and 'text'"):
        list(reader)
    assert reader.stats.rows == 3  # the three documents before it
    with pytest.raises(ValueError, match="empty_documents must be one of skip, embed, error, got 'drop'"):
        load_beir(beir_with_empty, "test", empty_documents="drop")


def test_eval_skips_empty_documents_and_scores_as_without_them(tiny_bert_dir, beir_with_empty, tmp_path, caplog,
                                                               capsys):
    from retrievals.pipelines import eval as eval_pipeline

    clean = _write_beir(tmp_path / "clean", with_empty=False)

    def metrics(folder, name, *extra):
        out = tmp_path / f"{name}.json"
        assert eval_pipeline.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", folder, "--precision", "fp32",
                                   "--num_examples", "0", "--output_file", str(out), *extra]) == 0
        return {k: v for k, v in json.loads(out.read_text()).items() if k != "seconds"}

    with caplog.at_level(logging.WARNING):
        skipped = metrics(beir_with_empty, "skipped")
    assert "2 empty documents (skipped)" in caplog.text
    assert skipped == metrics(clean, "clean") and skipped["ndcg@10"] > 0
    assert eval_pipeline.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", beir_with_empty,
                               "--empty_documents", "error"]) == 2
    assert "corpus.jsonl:4: document 'e1' has empty 'title' and 'text'" in capsys.readouterr().err


def test_finetune_beir_loads_a_corpus_with_empty_documents(beir_with_empty, tiny_bert_dir, tmp_path, capsys, caplog):
    """The training records keep the positives that are documents: q3 (only e1) is left out, q0 keeps doc-cat."""
    from retrievals.pipelines import finetune_beir

    train = load_beir(beir_with_empty, "train")
    with caplog.at_level(logging.WARNING):
        records = finetune_beir.training_records(train)
    assert records == [{"query": "cat", "positive": ["cat the cat"]}, {"query": "dog", "positive": ["dog the dog"]},
                       {"query": "fish", "positive": ["fish the fish"]}]
    assert "1 training queries have no judged positive in the corpus (empty documents are not read); left out" in caplog.text
    argv = ["--model_name_or_path", tiny_bert_dir, "--data_dir", beir_with_empty, "--output_dir", str(tmp_path / "o"),
            "--batch_size", "8"]
    assert finetune_beir.main(argv) == 2  # loads, then stops at the few training queries, before any encoding
    assert "3 training queries are fewer than one batch" in capsys.readouterr().err
    assert finetune_beir.main(argv + ["--empty_documents", "error"]) == 2
    assert "corpus.jsonl:4: document 'e1' has empty 'title' and 'text'" in capsys.readouterr().err


def test_build_hn_mines_from_a_beir_corpus_with_empty_documents(beir_with_empty, tiny_bert_dir, tmp_path, capsys,
                                                                caplog):
    from retrievals.pipelines import build_hn

    records = [{"query": w, "positive": [f"{w} the {w}"]} for w in WORDS]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--model_name_or_path", tiny_bert_dir, "--input_file", str(inp), "--output_file", str(tmp_path / "o.jsonl"),
            "--candidate_pool", f"{beir_with_empty}/corpus.jsonl", "--range_for_sampling", "1-20", "--negative_number",
            "9"]
    with caplog.at_level(logging.WARNING):
        assert build_hn.main(argv) == 0
    assert "corpus.jsonl: 2 empty documents (skipped)" in caplog.text
    for line, word in zip((tmp_path / "o.jsonl").read_text().splitlines(), WORDS):
        assert sorted(json.loads(line)["negative"]) == sorted(f"{w} the {w}" for w in WORDS if w != word)
    assert build_hn.main(argv + ["--empty_documents", "error"]) == 2
    assert "corpus.jsonl:4: document 'e1' has empty 'title' and 'text'" in capsys.readouterr().err


def test_the_encode_job_refuses_empty_documents_with_error(beir_with_empty, tiny_bert_dir, tmp_path, capsys):
    from retrievals.pipelines import encode

    argv = ["--model_name_or_path", tiny_bert_dir, "--corpus", f"{beir_with_empty}/corpus.jsonl"]
    assert encode.main(argv + ["--output_dir", str(tmp_path / "vec"), "--empty_documents", "error"]) == 2
    assert "corpus.jsonl:4: document 'e1' has empty 'title' and 'text'" in capsys.readouterr().err
    assert encode.main(argv + ["--output_dir", str(tmp_path / "vec2")]) == 0
    assert "10 vectors" in capsys.readouterr().out


def test_write_jsonl_round_trips_whole_and_leaves_no_temporary_file(tmp_path):
    from retrievals.data.jsonl import iter_jsonl, write_jsonl

    records = [{"query": "café ☕", "negative": ["a", "b"]}, {"query": "q2", "negative": []}]
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n")
    write_jsonl(str(path), records)
    assert [r for _, r in iter_jsonl(str(path))] == records
    assert "café ☕" in path.read_text(encoding="utf-8")  # not ASCII-escaped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
