"""Unsupervised pre-training: pairs made from documents (crop, title_body, dropout), the resumable pair stream
over a raw corpus, and the ``pretrain`` pipeline (loss goes down, exact resume, bad input)."""

import gzip
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retrievals.data.corpus import CorpusError
from retrievals.data.pretrain import CropBounds, Document, crop_length, make_pair, random_crop, word_spans
from retrievals.data.pretrain_stream import DocumentReader, PretrainPairs, scan_corpus
from retrievals.pipelines import pretrain

VOCAB = ("cat dog fish sky sun moon ocean blue red green protein female eat summit hello world "
         "model embedding retrieval search text long short sentence word token one two three four five").split()
LONG = " ".join(f"w{i}" for i in range(200))


def topical_corpus(path, n=64, seed=0, extra=()):
    """Documents whose words come from a few words of their own (crops of one document share words)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        topic = rng.choice(VOCAB, 4, replace=False)
        records.append({"_id": f"d{i}", "title": str(topic[0]), "text": " ".join(rng.choice(topic, 24))})
    records += list(extra)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


# ---------------------------------------------------------------- pairs
def test_crop_spans_are_word_runs_of_the_document_within_the_length_bounds():
    bounds = CropBounds(0.1, 0.5)
    words = LONG.split()
    lengths = []
    for index in range(200):
        pair = make_pair(Document("", LONG), "crop", seed=3, index=index, bounds=bounds)
        for span in (pair["query"], pair["positive"]):
            assert span in LONG
            first = words.index(span.split()[0])
            assert span.split() == words[first:first + len(span.split())]  # whole words, in order
            lengths.append(len(span.split()))
    assert min(lengths) >= 20 and max(lengths) <= 100  # 0.1 x 200 .. 0.5 x 200
    assert max(lengths) - min(lengths) > 50  # drawn over the range, not a constant
    assert crop_length(3, 0.1) == 1 and crop_length(10, 1.0) == 10 and crop_length(10, 0.26) == 3


def test_crops_keep_the_original_spacing_and_cover_short_documents():
    rng = np.random.default_rng(0)
    text = "alpha  beta\ngamma\tdelta"
    assert word_spans(text) == [(0, 5), (7, 11), (12, 17), (18, 23)]
    full = random_crop(text, rng, CropBounds(1.0, 1.0))
    assert full == text
    assert random_crop("single", rng, CropBounds(0.1, 0.2)) == "single"  # at least one word
    two = {random_crop(text, np.random.default_rng(s), CropBounds(0.5, 0.5)) for s in range(50)}
    assert two == {"alpha  beta", "beta\ngamma", "gamma\tdelta"}


def test_pairs_are_seeded_by_seed_and_index():
    doc = Document("t", LONG)
    assert make_pair(doc, "crop", 1, 7) == make_pair(doc, "crop", 1, 7)
    assert make_pair(doc, "crop", 1, 7) != make_pair(doc, "crop", 1, 8)
    assert make_pair(doc, "crop", 1, 7) != make_pair(doc, "crop", 2, 7)
    pair = make_pair(doc, "crop", 1, 7)
    assert pair["query"] != pair["positive"]  # two independent crops


def test_title_body_pairs_and_their_crop_fallback():
    doc = Document("Protein folding", "Proteins fold into shapes. The shape decides the function.")
    assert make_pair(doc, "title_body", 0, 0) == {"query": "Protein folding", "positive": doc.body}
    assert doc.text == "Protein folding Proteins fold into shapes. The shape decides the function."
    untitled = Document("", LONG)
    assert make_pair(untitled, "title_body", 5, 2) == make_pair(untitled, "crop", 5, 2)
    title_only = Document("only a title here", "")
    pair = make_pair(title_only, "title_body", 5, 2)
    assert pair["query"] in "only a title here" and pair["positive"] in "only a title here"


def test_dropout_pairs_are_the_text_twice_and_bad_names_are_refused():
    doc = Document("Title", "body text")
    assert make_pair(doc, "dropout", 0, 0) == {"query": "Title body text", "positive": "Title body text"}
    with pytest.raises(ValueError, match="crop, title_body, dropout"):
        make_pair(doc, "span", 0, 0)
    for low, high in ((0, 0.5), (0.6, 0.5), (0.1, 1.5)):
        with pytest.raises(ValueError, match="0 < min <= max <= 1"):
            CropBounds(low, high)


# ---------------------------------------------------------------- the stream
def test_reader_counts_empty_documents_in_jsonl_gz_and_plain_text(tmp_path):
    path = topical_corpus(tmp_path / "c.jsonl.gz", n=5, extra=[{"_id": "e1", "title": "", "text": "  "},
                                                              {"_id": "e2", "text": ""}])
    reader = DocumentReader(path)
    docs = list(reader)
    assert len(docs) == 5 and reader.stats.empty == 2 and reader.stats.rows == 5
    assert docs[0].title and docs[0].body.split()[0] in VOCAB
    assert scan_corpus(path) == {"documents": 5, "empty": 2, "invalid": 0, "titled": 5}
    text = tmp_path / "c.txt"
    text.write_text("first document\n\n   \nsecond  document\n")
    reader = DocumentReader(str(text))
    assert [d.body for d in reader] == ["first document", "second  document"]
    assert (reader.stats.rows, reader.stats.empty) == (2, 2)
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(CorpusError, match=r"bad\.txt:2: not UTF-8"):
        list(DocumentReader(str(tmp_path / "bad.txt")))


def take(dataset, n):
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def test_stream_shuffles_each_pass_and_resumes_at_an_example(tmp_path):
    path = topical_corpus(tmp_path / "c.jsonl", n=10)
    stream = PretrainPairs(path, strategy="title_body", seed=1, shuffle_buffer=4)
    items = take(stream, 25)  # 2.5 passes, endless
    titles = [json.loads(line)["title"] for line in open(path)]
    first, second = [i["query"] for i in items[:10]], [i["query"] for i in items[10:20]]
    assert sorted(first) == sorted(titles) == sorted(second)  # each pass holds every document once
    assert first != titles and first != second  # shuffled, differently in each pass
    stream.start = 13
    assert take(stream, 12) == items[13:]  # a resumed stream continues with the same examples


def test_stream_with_workers_yields_the_single_process_batches(tmp_path):
    path = topical_corpus(tmp_path / "c.jsonl", n=12)
    def batches(workers, start=0):
        stream = PretrainPairs(path, seed=4, shuffle_buffer=5, batch_size=4)
        stream.start = start
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=list)
        it = iter(loader)
        return [next(it) for _ in range(7)]
    single = batches(0)
    assert batches(2) == single
    assert batches(2, start=8) == batches(0, start=8) != single


# ---------------------------------------------------------------- the pipeline
def flags(tmp_path, model_dir, corpus, *extra):
    return ["--model_name_or_path", model_dir, "--corpus", corpus, "--output_dir", str(tmp_path / "out"),
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--query_max_length", "16", "--document_max_length", "16", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", *extra]


def test_pretrain_cli_lowers_the_loss(tiny_bert_dir, tmp_path):
    corpus = topical_corpus(tmp_path / "c.jsonl.gz")
    argv = flags(tmp_path, tiny_bert_dir, corpus, "--max_steps", "40", "--pair_strategy", "crop",
                 "--crop_min_ratio", "0.2", "--crop_max_ratio", "0.5", "--temperature", "0.1")
    assert pretrain.main(argv) == 0
    result = pretrain.run_pretrain(*pretrain.parse_args(argv + ["--overwrite_output_dir"]))
    losses = result["losses"]
    assert result["steps"] == 40 and len(losses) == 40 and result["corpus"]["documents"] == 64
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_resumed_pretraining_ends_with_the_uninterrupted_weights(tiny_bert_dir, tmp_path):
    corpus = topical_corpus(tmp_path / "c.jsonl", n=40)
    argv = flags(tmp_path, tiny_bert_dir, corpus, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
                 "--per_device_train_batch_size", "8")
    assert pretrain.main(argv) == 0  # 6 steps; 48 examples: the stream enters its second pass
    straight = load_file(tmp_path / "out" / "model.safetensors")
    shutil.rmtree(tmp_path / "out" / "checkpoint-6")  # as if stopped after step 3
    result = pretrain.run_pretrain(*pretrain.parse_args(argv))  # resumes from checkpoint-3
    assert result["steps"] == 6 and len(result["losses"]) == 6  # steps 1-3 from the checkpoint's log
    resumed = load_file(tmp_path / "out" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:  # dropout is on: the random state is restored too
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)


def test_bad_corpus_names_the_line_and_empty_documents_are_counted(tiny_bert_dir, tmp_path, capsys, caplog):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "the cat"}\n{"_id": "b", "text": "the dog"}\n{"_id": "c", "text": \n')
    assert pretrain.main(flags(tmp_path, tiny_bert_dir, str(corpus), "--max_steps", "2")) == 2
    assert f"{corpus}:3: malformed JSON" in capsys.readouterr().err
    assert pretrain.main(flags(tmp_path, tiny_bert_dir, str(corpus), "--max_steps", "2", "--scan_corpus", "false",
                               "--per_device_train_batch_size", "2")) == 2  # met while streaming: same message
    assert f"{corpus}:3: malformed JSON" in capsys.readouterr().err
    path = topical_corpus(tmp_path / "d.jsonl", n=8, extra=[{"_id": "e1", "title": "", "text": ""},
                                                            {"_id": "e2", "text": "   "}])
    with caplog.at_level(logging.INFO):
        result = pretrain.run_pretrain(*pretrain.parse_args(flags(tmp_path, tiny_bert_dir, path, "--max_steps", "1")))
    assert result["corpus"] == {"documents": 8, "empty": 2, "invalid": 0, "titled": 8}
    assert "8 documents; 2 empty skipped" in caplog.text
    assert pretrain.main(flags(tmp_path, tiny_bert_dir, path, "--overwrite_output_dir")) == 2  # no --max_steps
    assert "--max_steps is required" in capsys.readouterr().err
