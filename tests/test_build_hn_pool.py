"""``build_hn`` with a titled candidate pool never mines a query's own positive as a negative.

The pool's texts are embedded (and written out) as ``title + text``; a record's positive may be the
body text alone, or be named by the pool document's ``_id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from retrievals.pipelines import build_hn

WORDS = "cat dog fish sky sun moon ocean blue red green one two".split()
PAIRS = list(zip(WORDS, WORDS[1:] + WORDS[:1]))  # 12 distinct (a, b) pairs


def pool_documents() -> List[Dict[str, str]]:
    return [{"_id": f"doc{i}", "title": a, "text": f"the {a} and the {b}"} for i, (a, b) in enumerate(PAIRS)]


def full_text(doc: Dict[str, str]) -> str:
    return f"{doc['title']} {doc['text']}"


def write_jsonl(path: Path, rows: List[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path: Path, model_dir: str, records: List[dict], pool: List[dict], value_range: str = "0-12",
        negative_number: int = 11, extra: Optional[List[str]] = None) -> List[dict]:
    """Run ``build_hn`` on the command line and return the written records."""
    out = tmp_path / "out.jsonl"
    argv = ["--model_name_or_path", model_dir, "--input_file", write_jsonl(tmp_path / "in.jsonl", records),
            "--output_file", str(out), "--candidate_pool", write_jsonl(tmp_path / "pool.jsonl", pool),
            "--range_for_sampling", value_range, "--negative_number", str(negative_number)] + (extra or [])
    assert build_hn.main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def own_positive_leaks(out: List[dict], own: List[str]) -> List[str]:
    """The records (by query) whose negatives hold their own positive document, as embedded."""
    return [f"{rec['query']!r} got its positive {text!r} as a negative" for rec, text in zip(out, own)
            if text in rec["negative"]]


def test_titled_pool_never_mines_own_positive(tiny_bert_dir, tmp_path):
    """Every rank is sampled (range 0-12 over 12 documents), so the own positive would be drawn."""
    pool = pool_documents()
    # positives are the body text without the title (spacing and case differ, too)
    records = [{"query": f"{a} {b}", "positive": [f"The {a}  and the {b}"]} for a, b in PAIRS]
    out = run(tmp_path, tiny_bert_dir, records, pool)
    assert own_positive_leaks(out, [full_text(d) for d in pool]) == []
    for rec, doc in zip(out, pool):
        # 11 candidates survive the ban: the output is every other pool text, as embedded (title + text)
        assert sorted(rec["negative"]) == sorted(full_text(d) for d in pool if d is not doc)


def test_titled_pool_back_fill_respects_the_ban(tiny_bert_dir, tmp_path):
    pool = pool_documents()
    records = [{"query": f"{a} {b}", "positive": f"the {a} and the {b}"} for a, b in PAIRS]
    out = run(tmp_path, tiny_bert_dir, records, pool, value_range="0-2", negative_number=10)
    assert own_positive_leaks(out, [full_text(d) for d in pool]) == []
    assert all(len(set(rec["negative"])) == 10 for rec in out)


def test_positive_ids_ban_the_pool_document(tiny_bert_dir, tmp_path):
    """The record's positive text differs from the pool's (another wording); its ``_id`` still bans it. A copy
    of doc0 (same title and text, another id) comes first in the pool, so deduplication keeps the copy and drops
    doc0: the copy is banned for doc0's record all the same."""
    pool = pool_documents()
    pool.insert(0, {"_id": "doc0-copy", "title": pool[0]["title"], "text": pool[0]["text"]})
    records = [{"query": f"{a} {b}", "positive": [f"an article about {a} and {b}"], "pos_ids": [f"doc{i}"]}
               for i, (a, b) in enumerate(PAIRS)]
    out = run(tmp_path, tiny_bert_dir, records, pool, value_range="0-13", negative_number=11,
              extra=["--positive_id_key", "pos_ids"])
    assert own_positive_leaks(out, [full_text(d) for d in pool[1:]]) == []
    unique_texts = {full_text(d) for d in pool}
    for rec, doc in zip(out, pool[1:]):
        assert sorted(rec["negative"]) == sorted(unique_texts - {full_text(doc)})


def test_positive_ids_need_pool_ids_and_a_known_field(tiny_bert_dir, tmp_path, capsys):
    pool = pool_documents()
    records = [{"query": f"{a} {b}", "positive": "x", "pos_ids": [[f"doc{i}"]]} for i, (a, b) in enumerate(PAIRS)]
    argv_out = tmp_path / "o.jsonl"

    def main(records: List[dict], pool: List[dict], key: str) -> int:
        return build_hn.main(["--model_name_or_path", tiny_bert_dir, "--input_file",
                              write_jsonl(tmp_path / "in.jsonl", records), "--output_file", str(argv_out),
                              "--candidate_pool", write_jsonl(tmp_path / "pool.jsonl", pool),
                              "--positive_id_key", key])

    assert main(records, pool, "pos_ids") == 2
    assert "in.jsonl:1: field 'pos_ids'[0] must be a string or an integer, got list" in capsys.readouterr().err
    assert main([{**r, "pos_ids": "doc1"} for r in records], pool, "positive_ids") == 2
    assert "no record has the field 'positive_ids'" in capsys.readouterr().err
    no_ids = [{"title": d["title"], "text": d["text"]} for d in pool]
    assert main([{**r, "pos_ids": "doc1"} for r in records], no_ids, "pos_ids") == 2
    assert "pool.jsonl:1: missing field '_id'" in capsys.readouterr().err
    bad_title = [{**pool[0], "title": 3}] + pool[1:]
    assert main([{**r, "pos_ids": "doc1"} for r in records], bad_title, "pos_ids") == 2
    assert "pool.jsonl:1: field 'title' must be a string" in capsys.readouterr().err


def test_mining_with_precomputed_embeddings_uses_the_same_rule(tiny_bert_dir):
    """finetune_beir's call: a pool with its embeddings (no re-encoding); strings or documents."""
    from retrievals import AutoModelForEmbedding
    from retrievals.mining.hard_negatives import PoolDocument, mine_hard_negatives

    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, precision="fp32")
    docs = [PoolDocument(text=d["text"], title=d["title"], doc_id=d["_id"]) for d in pool_documents()]
    records = [{"query": f"{a} {b}", "positive": [f"the {a} and the {b}"]} for a, b in PAIRS]
    embeddings = model.encode_corpus([d.full_text for d in docs])
    kwargs = dict(range_for_sampling=(0, 12), negative_number=11)
    with_docs = mine_hard_negatives(model, records, docs, corpus_embeddings=embeddings, **kwargs)
    assert with_docs == mine_hard_negatives(model, records, docs, **kwargs)
    assert own_positive_leaks(with_docs, [d.full_text for d in docs]) == []
    # plain strings know no title: positives match the pool text as embedded (finetune_beir's records)
    titled_records = [{"query": r["query"], "positive": [d.full_text]} for r, d in zip(records, docs)]
    as_strings = mine_hard_negatives(model, titled_records, [d.full_text for d in docs],
                                     corpus_embeddings=embeddings, **kwargs)
    assert [r["negative"] for r in as_strings] == [r["negative"] for r in with_docs]
    with pytest.raises(ValueError, match="one text per row"):
        mine_hard_negatives(model, records, docs[:3], corpus_embeddings=embeddings, **kwargs)
