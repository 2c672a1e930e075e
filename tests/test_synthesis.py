"""Synthetic queries: filters on hand-made cases, the generator's shared-prompt path against plain
``generate``, a job killed mid-way resuming to the same output, the BEIR folder the pipeline writes, and the
consistency filter with a real model."""

import json
import os
import threading

import numpy as np
import pytest
import torch

from conftest import word_tokenizer
from retrievals.synthesis import FilterSettings, QueryFilter, clean_query, get_template
from retrievals.synthesis import job as job_module
from retrievals.synthesis.filters import Unfinished, script
from retrievals.synthesis.generator import QueryGenerator
from retrievals.synthesis.job import SynthesisJob, generate_all, read_parts

WORDS = "the a cat dog fish sky sun moon ocean blue red green what is of and".split()


@pytest.fixture(scope="module")
def tiny_generator_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_generator"))
    tokenizer = word_tokenizer(WORDS, 256)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():  # near-uniform next tokens: a sample ends (</s>) within 12 tokens about half the time
        model.lm_head.weight.mul_(0.05)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_clean_query_strips_labels_quotes_and_later_lines():
    assert clean_query('Question: "What is the sun?"\nAnswer: a star') == "What is the sun?"
    assert clean_query("\n1. What   is  the moon?") == "What is the moon?"
    assert clean_query("- Claim: Aspirin lowers fever.") == "Aspirin lowers fever."
    assert clean_query("   \n  ") == ""
    assert clean_query("What is the answer to this question? Does aspirin lower fever?") == "Does aspirin lower fever?"
    assert clean_query("The answer to this question is: What is a moon?") == "What is a moon?"
    assert clean_query("The question is: How does a moon form?") == "How does a moon form?"
    # a claim wrapped in a sentence about it, and a second sentence the model ran on into
    assert clean_query("The abstract supports the claim that aspirin lowers fever in adults.") == \
        "Aspirin lowers fever in adults."
    assert clean_query("The claim is that A20 decreases glioma growth. Glioblastomas are deadly",
                       first_sentence=True) == "A20 decreases glioma growth."
    assert clean_query("What is a red sun? Is it hot?") == "What is a red sun? Is it hot?"  # whole, unless cut
    assert clean_query("What is a red sun? Is it", first_sentence=True) == "What is a red sun?"
    assert clean_query("What's the answer to this question? Is a red sun hot?") == "Is a red sun hot?"
    assert clean_query("Cotton (Gossypium spp.) DNA, e.g. from leaves, is hard to extract. More", True) == \
        "Cotton (Gossypium spp.) DNA, e.g. from leaves, is hard to extract."


def test_each_filter_names_its_reason():
    f = QueryFilter(FilterSettings(min_words=3, max_words=12))
    doc = "The blue whale is the largest animal known to have ever existed on the planet."
    assert f.reason("", doc) == "empty"
    assert f.reason("whale size", doc) == "too_short"
    assert f.reason(" ".join(["word"] * 13), doc) == "too_long"
    assert f.reason("鲸鱼是最大的动物吗", doc) == "script"
    assert f.reason("the largest animal known to have ever existed", doc) == "copy"
    assert f.reason("What does the passage say about whales?", doc) == "context"
    assert f.reason("Here is a question about whales", doc) == "context"
    assert f.reason("Which animal is the largest on Earth?", doc) is None
    assert script("鲸鱼是最大的动物") == "CJK" and script("Wal") == "LATIN" and script("123") is None


def test_duplicates_are_dropped_across_documents_and_an_unfinished_generation_is_rejected():
    f = QueryFilter()
    first = f.check(["What is a red sun?", "what is a RED sun", Unfinished("What is the")], "A red sun sets.")
    assert [why for _, why in first] == [None, "duplicate", "unfinished"]
    assert f.check(["What is a red sun?"], "Another red sun document.")[0][1] == "duplicate"
    # cut by the token limit after a complete first sentence: that sentence is the query
    assert f.check([Unfinished("Red suns set late in winter. They are")], "A red sun sets.")[0] == \
        ("Red suns set late in winter.", None)
    assert dict(f.counts) == {"kept": 2, "duplicate": 2, "unfinished": 1}
    seen_again = QueryFilter(seen=["What is a red sun?"])  # a resumed job's filter
    assert seen_again.check(["What is a red sun?"], "A red sun.")[0][1] == "duplicate"


def test_filter_shared_by_threads_keeps_each_query_once():
    f = QueryFilter()
    queries = [f"What is the colour of sky number {i}?" for i in range(50)]
    kept = []
    lock = threading.Lock()

    def work():
        for q in queries:
            verdict = f.check([q], "sky colour document")[0][1]
            if verdict is None:
                with lock:
                    kept.append(q)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(kept) == sorted(queries)  # each once, whichever thread got there first
    assert f.counts["kept"] == 50 and f.counts["duplicate"] == 7 * 50


def test_unknown_template_and_bad_generator_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="valid: question, claim, keyword"):
        get_template("title")
    with pytest.raises(FileNotFoundError, match="packaged names"):
        QueryGenerator.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QueryGenerator.from_pretrained(str(tmp_path / "model.gguf"))


def test_shared_prompt_generation_equals_plain_generate_per_sample(tiny_generator_dir):
    """Greedy: every sample of a document equals transformers' own generate of that prompt alone (left padding
    and the copied cache change nothing)."""
    g = QueryGenerator.from_pretrained(tiny_generator_dir, max_new_tokens=6, temperature=0, precision="fp32")
    docs = ["the cat", "a blue fish and the green ocean of the red sun", "moon"]
    out = g.generate(docs, get_template("question"), per_document=2)
    for doc, samples in zip(docs, out):
        prompt = g.tokenizer(g._prompts([doc], get_template("question")), return_tensors="pt")
        with torch.inference_mode():
            ref = g.model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=g.tokenizer.pad_token_id,
                                     eos_token_id=g.stop_ids)
        expected = g.tokenizer.decode(ref[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert samples == [expected, expected]
    sampled = QueryGenerator.from_pretrained(tiny_generator_dir, max_new_tokens=6, temperature=1.0)
    a, b = (sampled.generate(docs, get_template("question"), 3, seed=7) for _ in range(2))
    assert a == b and len({s for samples in a for s in samples}) > 3  # seeded, and the samples differ


def _corpus(tmp_path, n=10):
    path = tmp_path / "corpus.jsonl"
    words = WORDS[2:14]
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"the {words[i % 12]} and the "
                                        f"{words[(i * 5 + 1) % 12]} sky"}) + "\n" for i in range(n)))
    return str(path)


def test_a_killed_job_resumes_without_regenerating_and_ends_as_an_uninterrupted_one(tiny_generator_dir, tmp_path,
                                                                                    monkeypatch):
    settings = dict(corpus=_corpus(tmp_path), generator=tiny_generator_dir, shard_size=3, batch_size=2,
                    per_document=2, max_new_tokens=5, temperature=1.0, filters=FilterSettings(min_words=1))
    generate_all(SynthesisJob(output_dir=str(tmp_path / "whole"), **settings))
    calls = []
    real = job_module.generate_shard

    def dies_on_the_third_shard(generator, job, index, rows):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(generator, job, index, rows)

    monkeypatch.setattr(job_module, "generate_shard", dies_on_the_third_shard)
    killed = SynthesisJob(output_dir=str(tmp_path / "killed"), **settings)
    with pytest.raises(KeyboardInterrupt):
        generate_all(killed)
    assert sorted(os.listdir(tmp_path / "killed" / "parts")) == ["part-00000.jsonl", "part-00001.jsonl"]
    calls.clear()
    run = generate_all(killed)
    assert calls == [2, 3] and run["documents"] == 4  # shards 0 and 1 were not generated again
    assert read_parts(str(tmp_path / "killed")) == read_parts(str(tmp_path / "whole"))
    with pytest.raises(ValueError, match="other settings .*template"):
        generate_all(SynthesisJob(output_dir=str(tmp_path / "killed"), **{**settings, "template": "claim"}))


def test_synthesize_writes_a_beir_folder_with_counted_verdicts(tiny_generator_dir, minilm_dir, tiny_bert_dir,
                                                              tmp_path):
    from retrievals.data.beir import load_beir
    from retrievals.models.cross_encoder import CrossEncoder
    from retrievals.pipelines.synthesize import SynthesizeArguments, run_synthesize
    from test_distillation import _save_cross_encoder

    out = str(tmp_path / "syn")
    settings = dict(corpus=_corpus(tmp_path), output_dir=out, generator=tiny_generator_dir, per_document=3,
                    shard_size=4, max_new_tokens=20, temperature=1.0, min_words=1, embedder=minilm_dir,
                    consistency_top_k=4)
    summary = run_synthesize(SynthesizeArguments(**settings))
    records = [json.loads(line) for line in open(os.path.join(out, "generated.jsonl"))]
    assert len(records) == summary["generated"] == 30 and sum(summary["counts"].values()) == 30
    assert summary["counts"].get("inconsistent", 0) > 0  # random words: many documents are not in the top 4
    data = load_beir(out, "train")  # the corpus is linked in: any pipeline reads the folder
    kept = [r for r in records if r["reason"] is None]
    assert len(data.queries) == summary["kept"] == len(kept) > 0
    assert all(data.qrels[r["query_id"]] == {r["doc_id"]: 1} and data.queries[r["query_id"]] == r["query"]
               for r in kept)

    # a rerun with a cross-encoder generates nothing new and rejects the kept pairs it scores below the threshold
    cross_encoder = _save_cross_encoder(tiny_bert_dir, tmp_path / "ce")
    texts = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(settings["corpus"])}
    scores = CrossEncoder.from_pretrained(cross_encoder).predict([(r["query"], texts[r["doc_id"]]) for r in kept])
    sigmoid = 1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))
    threshold = float(np.median(sigmoid))
    again = run_synthesize(SynthesizeArguments(**settings, cross_encoder=cross_encoder, cross_encoder_threshold=threshold))
    assert again["generated"] == 30 and again["counts"]["cross_encoder"] == int((sigmoid < threshold).sum()) > 0
    survivors = {r["query"] for r in (json.loads(line) for line in open(os.path.join(out, "generated.jsonl")))
                 if r["reason"] is None}
    assert survivors == {r["query"] for r, p in zip(kept, sigmoid) if p >= threshold}


def test_consistency_keeps_a_query_only_when_its_document_is_in_the_top_k(minilm_dir):
    from retrievals.models.embedding_model import AutoModelForEmbedding
    from retrievals.synthesis.consistency import in_top_k

    model = AutoModelForEmbedding.from_pretrained(minilm_dir, backend="torch")
    ids = ["whale", "volcano", "violin"]
    texts = ["The blue whale is the largest animal on Earth.", "Lava erupts from an active volcano.",
             "A violin has four strings played with a bow."]
    vectors = model.encode_corpus(texts)
    keep = in_top_k(model, ["biggest animal", "what instrument has four strings", "biggest animal"],
                    ["whale", "violin", "volcano"], ids, vectors, top_k=1)
    assert keep == [True, True, False]
    assert in_top_k(model, ["biggest animal"], ["volcano"], ids, vectors, top_k=3) == [True]
    with pytest.raises(ValueError, match="not in the corpus"):
        in_top_k(model, ["q"], ["nowhere"], ids, vectors, top_k=1)


def test_finetune_without_labels_never_reads_the_train_qrels_and_reuses_a_finished_synthesis(
        tiny_generator_dir, tiny_bert_dir, word_beir, tmp_path, monkeypatch):
    from retrievals.pipelines import finetune_beir
    from retrievals.synthesis import generator as generator_module

    (word_beir / "qrels" / "train.tsv").write_text("not a qrels file\n")  # read, it would fail
    args = finetune_beir.FinetuneArguments(
        model_name_or_path=tiny_bert_dir, data_dir=str(word_beir), output_dir=str(tmp_path / "out"), epochs=1,
        batch_size=8, document_max_length=16, query_max_length=16, no_labels=True, generator=tiny_generator_dir,
        queries_per_document=2, dev_fraction=0.2, dev_kind="disjoint", on_leak="warn")
    result = finetune_beir.run_finetune(args)
    folder = tmp_path / "out" / "synthetic"
    summary = json.loads((folder / "synthesis.json").read_text())
    assert summary["done"] and summary["generated"] == 180 and summary["kept"] > 16
    dev_queries = result["base_evaluations"]["dev"]
    held_out = round(0.2 * summary["kept"])
    assert result["training_queries"] + held_out >= summary["kept"] - 1  # every kept query: trained on or dev
    assert dev_queries["ndcg@10"] >= 0 and result["fine_tuned"]["ndcg@10"] >= 0
    assert result["rounds"][0]["steps"] == result["training_queries"] // 8 > 0  # trained on the synthetic queries
    assert result["leakage"] is not None  # synthetic queries are checked against the test split too

    def no_generation(*a, **k):
        raise AssertionError("a finished synthesis must be reused, not generated again")

    monkeypatch.setattr(generator_module.QueryGenerator, "from_pretrained", no_generation)
    again = finetune_beir.run_finetune(args)
    assert again["training_queries"] == result["training_queries"]


@pytest.mark.slow
def test_ray_actors_generate_the_same_parts_as_one_process(tiny_generator_dir, tmp_path):
    settings = dict(corpus=_corpus(tmp_path, 9), generator=tiny_generator_dir, shard_size=2, batch_size=2,
                    per_document=2, max_new_tokens=5, temperature=1.0, filters=FilterSettings(min_words=1))
    from processes import one_ray_at_a_time

    local = generate_all(SynthesisJob(output_dir=str(tmp_path / "local"), **settings))
    with one_ray_at_a_time():  # the Ray engine's tests count Ray processes: never two clusters at once
        on_ray = generate_all(SynthesisJob(output_dir=str(tmp_path / "ray"), **settings), num_workers=2)
    assert on_ray["documents"] == local["documents"] == 9
    assert read_parts(str(tmp_path / "ray")) == read_parts(str(tmp_path / "local"))  # seeded per shard


@pytest.mark.slow
def test_the_packaged_smollm2_writes_questions_about_the_document():
    """The real 135M instruct model, out of the box: each document gets a kept question, the model's generic
    ones ("What's the passage's answer to this question?") are rejected, and the output is seeded."""
    g = QueryGenerator.from_pretrained("smollm2", max_new_tokens=32)
    docs = ["Vitamin D and bone fractures. In a trial of 2,000 older women, a yearly dose of vitamin D "
            "increased the rate of hip fractures compared with placebo.",
            "Aspirin and colorectal cancer. Daily aspirin taken for five years or more lowered deaths from "
            "colorectal cancer in long-term follow-up of randomised trials."]
    out = g.generate(docs, get_template("question"), per_document=6, seed=0)
    f, named = QueryFilter(), 0
    for samples, doc, subject in zip(out, docs, ("vitamin d", "aspirin")):
        verdicts = f.check(samples, doc)
        kept = [q for q, why in verdicts if why is None]
        assert kept, verdicts  # each document gets a question
        assert all(why is not None for q, why in verdicts if "this question" in q.lower()), verdicts
        named += any(subject in q.lower() for q in kept)
    assert named >= 1  # a 135M model: not every kept question names its document's subject
    assert out == g.generate(docs, get_template("question"), per_document=6, seed=0)  # seeded


def test_a_wrong_generator_path_writes_nothing_and_a_fixed_rerun_starts(tiny_generator_dir, tmp_path):
    out = tmp_path / "syn"
    settings = dict(corpus=_corpus(tmp_path, 2), output_dir=str(out), max_new_tokens=3, per_document=1)
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        generate_all(SynthesisJob(generator=str(tmp_path / "typo"), **settings))
    assert not out.exists()
    assert generate_all(SynthesisJob(generator=tiny_generator_dir, **settings))["documents"] == 2
