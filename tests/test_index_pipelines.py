"""The encode -> index -> search / eval / build_hn command lines over a vectors folder (issue 11)."""

import gzip
import json
import os

import pytest

from retrievals import AutoModelForEmbedding
from retrievals.data.beir import load_beir
from retrievals.evaluation.retrieval import evaluate_retrieval
from retrievals.pipelines import encode, index, search
from retrievals.pipelines import eval as eval_pipeline


@pytest.fixture()
def built(tiny_bert_dir, tiny_beir_dir, tmp_path):
    model_dir = str(tmp_path / "model")
    AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean").save_pretrained(model_dir)
    corpus = os.path.join(tiny_beir_dir, "corpus.jsonl.gz")
    vec, idx = str(tmp_path / "vec"), str(tmp_path / "idx")
    assert encode.main(["--model_name_or_path", model_dir, "--corpus", corpus, "--output_dir", vec,
                        "--shard_size", "7", "--precision", "fp32", "--store_text"]) == 0
    assert index.main(["--vectors", vec, "--output_dir", idx]) == 0
    return model_dir, tiny_beir_dir, vec, idx


def test_eval_through_the_index_equals_in_memory_evaluation(built, capsys):
    model_dir, beir, vec, idx = built
    expected = evaluate_retrieval(AutoModelForEmbedding.from_pretrained(model_dir, precision="fp32"),
                                  load_beir(beir)).metrics
    args = ["--model_name_or_path", model_dir, "--data_dir", beir, "--precision", "fp32", "--index_dir", idx]
    for extra in ([], ["--exact_search"]):
        out = str(built[3]) + f"/metrics{len(extra)}.json"
        assert eval_pipeline.main(args + extra + ["--output_file", out]) == 0
        got = json.load(open(out))
        assert {k: round(got[k], 6) for k in expected} == {k: round(v, 6) for k, v in expected.items()}


def test_search_cli_writes_trec_and_jsonl(built, tmp_path):
    model_dir, beir, vec, idx = built
    queries = os.path.join(beir, "queries.jsonl")
    assert search.main(["--index_dir", idx, "--queries", queries, "--output_file", str(tmp_path / "run.trec"),
                        "--top_k", "3"]) == 0
    lines = (tmp_path / "run.trec").read_text().splitlines()
    first = lines[0].split()
    assert first[:2] == ["q0", "Q0"] and first[3] == "1" and len(lines) == 3 * len(open(queries).readlines())
    (tmp_path / "q.txt").write_text("cat\n\nthe dog\n")
    assert search.main(["--index_dir", idx, "--queries", str(tmp_path / "q.txt"), "--output_file",
                        str(tmp_path / "run.jsonl"), "--top_k", "2"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run.jsonl")]
    assert [r["query_id"] for r in rows] == ["1", "3"] and len(rows[0]["results"]) == 2


def test_pipeline_errors_are_one_line(built, tiny_bert_dir, tmp_path, capsys):
    model_dir, beir, vec, idx = built
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"_id": "a", "text": "cat"}\n{"_id": "a", "text": "dog"}\n')
    assert encode.main(["--model_name_or_path", model_dir, "--corpus", str(dup), "--output_dir",
                        str(tmp_path / "v2")]) == 2
    assert "duplicate id 'a'" in capsys.readouterr().err
    assert encode.main(["--model_name_or_path", model_dir, "--corpus", str(dup), "--output_dir",
                        str(tmp_path / "v3"), "--dtype", "float8"]) == 2
    assert "Unknown embedding dtype 'float8'" in capsys.readouterr().err
    other = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="cls")
    other.save_pretrained(tmp_path / "other")
    assert eval_pipeline.main(["--model_name_or_path", str(tmp_path / "other"), "--data_dir", beir,
                               "--index_dir", idx]) == 2
    err = capsys.readouterr().err
    assert "error: index" in err and "the model given is" in err
    assert index.main(["--vectors", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "i2")]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err


def test_build_hn_from_the_index_equals_mining_the_pool(built, tmp_path):
    from retrievals.pipelines import build_hn

    model_dir, beir, vec, idx = built
    words = [json.loads(line)["text"] for line in open(os.path.join(beir, "queries.jsonl"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"query": w, "positive": [f"the {w}"], "pos_ids": [f"doc-{w}"]})
                                                  + "\n" for w in words))
    pool = tmp_path / "pool.jsonl"
    with gzip.open(os.path.join(beir, "corpus.jsonl.gz"), "rt") as f:
        pool.write_text(f.read())
    common = ["--input_file", str(tmp_path / "train.jsonl"), "--range_for_sampling", "0-6", "--negative_number", "3"]
    assert build_hn.main(common + ["--model_name_or_path", model_dir, "--candidate_pool", str(pool),
                                   "--output_file", str(tmp_path / "pool_hn.jsonl")]) == 0
    assert build_hn.main(common + ["--index_dir", idx, "--output_file", str(tmp_path / "index_hn.jsonl")]) == 0
    assert build_hn.main(common + ["--index_dir", idx, "--candidate_pool", str(pool), "--positive_id_key", "pos_ids",
                                   "--output_file", str(tmp_path / "ids_hn.jsonl")]) == 0
    from_pool = [json.loads(line) for line in open(tmp_path / "pool_hn.jsonl")]
    for name in ("index_hn.jsonl", "ids_hn.jsonl"):
        from_index = [json.loads(line) for line in open(tmp_path / name)]
        assert [r["negative"] for r in from_index] == [r["negative"] for r in from_pool]
    for record in from_pool:
        assert len(record["negative"]) == 3 and all(not n.endswith(record["positive"][0]) for n in record["negative"])
    # the false-negative rules give the same negatives from the index as from the pool
    rule = ["--range_for_sampling", "0-12", "--negative_number", "3"]
    ratio = ["--max_positive_ratio", "0.9"]
    assert build_hn.main(common + rule + ratio + ["--model_name_or_path", model_dir, "--candidate_pool", str(pool),
                                                  "--output_file", str(tmp_path / "pool_fn.jsonl")]) == 0
    assert build_hn.main(common + rule + ratio + ["--index_dir", idx, "--output_file", str(tmp_path / "index_fn.jsonl")]) == 0
    assert build_hn.main(common + rule + ["--index_dir", idx, "--output_file", str(tmp_path / "index_all.jsonl")]) == 0
    pool_fn, index_fn, index_all = ([json.loads(line)["negative"] for line in open(tmp_path / n)]
                                    for n in ("pool_fn.jsonl", "index_fn.jsonl", "index_all.jsonl"))
    assert pool_fn == index_fn and index_fn != index_all  # the rule changed what was drawn
    # back-fill from random rows when the range holds too few (range 0-2 leaves at most 2 candidates)
    assert build_hn.main(["--input_file", str(tmp_path / "train.jsonl"), "--range_for_sampling", "0-2",
                          "--negative_number", "4", "--index_dir", idx, "--output_file", str(tmp_path / "bf.jsonl")]) == 0
    for record in map(json.loads, open(tmp_path / "bf.jsonl")):
        assert len(set(record["negative"])) == 4 and not any(n.endswith(record["positive"][0]) for n in record["negative"])


def test_build_hn_index_uses_pooling_and_instruction_flags(built, tmp_path, capsys):
    """--pooling_method / instructions with --index_dir were ignored: now the model is loaded with them and,
    not being the model that made the vectors, refused naming both fingerprints."""
    from retrievals.pipelines import build_hn

    model_dir, beir, vec, idx = built
    (tmp_path / "train.jsonl").write_text(json.dumps({"query": "cat", "positive": ["the cat"]}) + "\n")
    common = ["--input_file", str(tmp_path / "train.jsonl"), "--index_dir", idx, "--range_for_sampling", "0-6",
              "--negative_number", "2", "--output_file", str(tmp_path / "hn.jsonl")]
    for flags in (["--pooling_method", "cls"], ["--document_instruction", "passage: "]):
        assert build_hn.main(common + flags) == 2
        assert "the model given is" in capsys.readouterr().err
    assert build_hn.main(common + ["--pooling_method", "mean"]) == 0  # the saved pooling: the same model


def test_index_mining_does_not_ban_documents_ending_with_the_query(built, tmp_path):
    """Stored texts are title + body; a body-only positive may end one, but a document ending with the query's
    words is no positive (it was banned: "blue the blue" for the query "blue"; the pool keeps it)."""
    from retrievals.index.search import Searcher
    from retrievals.mining.index_mining import mine_from_index

    model_dir, beir, vec, idx = built
    searcher = Searcher(idx)
    records = [{"query": "blue", "positive": ["the cat"]}]
    out = mine_from_index(searcher, records, lambda rows, ids: searcher.texts_of(rows), range_for_sampling=(0, 10),
                          negative_number=9)
    assert "blue the blue" in out[0]["negative"] and "cat the cat" not in out[0]["negative"]
    assert len(out[0]["negative"]) == 9


def test_a_short_positive_bans_only_a_stored_text_that_could_be_its_title_and_body():
    """A stored text ending with a positive is banned when what precedes the positive could be a title (no
    longer than the positive); a short positive ("blue cat") no longer bans every document ending with it."""
    from retrievals.mining.index_mining import StoredDocument, _is_banned

    positives = {"the blue cat", "a protein that binds the receptor in female mice"}
    banned = set(positives)
    assert _is_banned(StoredDocument("Receptor study a protein that binds the receptor in female mice"), banned, positives)
    assert _is_banned(StoredDocument("cat the blue cat"), banned, positives)  # a title "cat", the body after it
    assert _is_banned(StoredDocument("the blue cat"), banned, positives)  # the positive itself
    assert not _is_banned(StoredDocument("one two three four five sky sun moon and the blue cat"), banned, positives)
