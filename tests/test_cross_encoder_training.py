"""Cross-encoder training (``retrievals.pipelines.rerank``): the loss falls and the ranking improves on a
toy task, the group losses equal their hand-computed values, the saved model loads in sentence-transformers'
``CrossEncoder`` with equal scores, and the re-ranked dense run of a small BEIR folder beats the dense run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from retrievals.data.collators import CrossEncoderCollator
from retrievals.models.cross_encoder import CrossEncoder
from retrievals.pipelines import rerank
from retrievals.trainer.cross_encoder_trainer import binary_loss, listwise_loss

WORDS = "cat dog fish sky sun moon ocean blue red green one two".split()
POOL = [f"the {a} and the {b}" for a, b in zip(WORDS, WORDS[1:] + WORDS[:1])]
QUERIES = [f"{a} {b}" for a, b in zip(WORDS, WORDS[1:] + WORDS[:1])]


def records():
    return [{"query": q, "positive": POOL[i], "negative": [POOL[(i + k) % 12] for k in range(1, 12)]}
            for i, q in enumerate(QUERIES)]


def accuracy(cross: CrossEncoder) -> float:
    """Share of queries whose own document scores highest among all 12."""
    scores = cross.predict([(q, d) for q in QUERIES for d in POOL]).reshape(12, 12)
    return float(np.mean(scores.argmax(1) == np.arange(12)))


def test_group_losses_equal_hand_computed_values_and_gradients():
    scores = torch.tensor([[2.0, 1.0, -1.0], [0.5, 1.5, 0.0]], dtype=torch.float64, requires_grad=True)
    expected = -np.mean([2 - math.log(math.exp(2) + math.exp(1) + math.exp(-1)),
                         0.5 - math.log(math.exp(0.5) + math.exp(1.5) + 1)])
    assert listwise_loss(scores).item() == pytest.approx(expected, abs=1e-12)

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    values = [[2.0, 1.0, -1.0], [0.5, 1.5, 0.0]]
    expected = np.mean([bce(x, 1.0 if j == 0 else 0.0) for row in values for j, x in enumerate(row)])
    assert binary_loss(scores).item() == pytest.approx(expected, abs=1e-12)
    assert torch.autograd.gradcheck(listwise_loss, (scores,))
    assert torch.autograd.gradcheck(binary_loss, (scores,))


def test_collator_groups_positive_first_and_tokenizes_like_predict(tiny_bert_dir):
    cross = CrossEncoder.from_encoder(tiny_bert_dir, max_length=16)
    batch = CrossEncoderCollator(cross.tokenizer, max_length=16)(
        [{"query": "cat dog", "positive": "the cat", "negative": ["a", "b"]},
         {"query": "sun", "positive": "the sun", "negative": ["c", "d"]}])
    assert batch["group_size"] == 3 and batch["input_ids"].shape[0] == 6
    expected = cross.tokenizer("cat dog", "the cat", truncation=True, max_length=16)["input_ids"]
    assert batch["input_ids"][0][:len(expected)].tolist() == expected
    with pytest.raises(ValueError, match="same number of negatives"):
        CrossEncoderCollator(cross.tokenizer)([{"query": "q", "positive": "p", "negative": ["a"]},
                                               {"query": "q", "positive": "p", "negative": ["a", "b"]}])


def test_saved_cross_encoder_loads_in_sentence_transformers_with_equal_scores(tiny_bert_dir, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    torch.manual_seed(0)
    cross = CrossEncoder.from_encoder(tiny_bert_dir, max_length=32)
    torch.nn.init.normal_(cross.model.classifier.weight, std=10.0)  # spread the untrained scores
    cross.save_pretrained(str(tmp_path / "ce"))
    pairs = [(q, d) for q in QUERIES[:4] for d in POOL]
    ours = CrossEncoder.from_pretrained(str(tmp_path / "ce")).predict(pairs)
    np.testing.assert_allclose(ours, cross.predict(pairs), atol=1e-6)
    theirs = STCrossEncoder(str(tmp_path / "ce"), device="cpu").predict(pairs, activation_fn=torch.nn.Identity(),
                                                                      convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.ptp(ours) > 1e-2  # the scores differ between pairs, so equality means something


def test_saved_max_length_is_reloaded_by_from_pretrained_and_load_teacher(tiny_bert_dir, tmp_path):
    """``rerank --max_length 8`` saves 8 as the tokenizer's length (sentence-transformers truncates there): our
    loaders used 512 and scored the same pair differently. An explicit ``max_length`` still overrides."""
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from retrievals.mining.teacher import load_teacher

    torch.manual_seed(0)
    cross = CrossEncoder.from_encoder(tiny_bert_dir, max_length=8)
    torch.nn.init.normal_(cross.model.classifier.weight, std=10.0)
    cross.save_pretrained(str(tmp_path / "ce"))
    pairs = [(q, f"{d} and the long text of one two three four five words") for q in QUERIES[:3] for d in POOL[:4]]
    before = cross.predict(pairs)
    assert np.abs(before - cross.predict(pairs, max_length=64)).max() > 1e-2  # truncation at 8 changes the scores
    theirs = STCrossEncoder(str(tmp_path / "ce"), device="cpu").predict(pairs, activation_fn=torch.nn.Identity(),
                                                                      convert_to_numpy=True)
    np.testing.assert_allclose(theirs, before, atol=1e-4)
    for loaded in (CrossEncoder.from_pretrained(str(tmp_path / "ce")), load_teacher(str(tmp_path / "ce"))):
        assert loaded.max_length == 8
        np.testing.assert_allclose(loaded.predict(pairs), before, atol=1e-6)
    explicit = CrossEncoder.from_pretrained(str(tmp_path / "ce"), max_length=64)
    assert explicit.max_length == 64 and load_teacher(str(tmp_path / "ce"), max_length=64).max_length == 64
    np.testing.assert_allclose(explicit.predict(pairs), cross.predict(pairs, max_length=64), atol=1e-6)
    # a tokenizer without a length of its own (transformers' 1e30 placeholder) keeps the 512 default
    tokenizer_config = tmp_path / "ce" / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text())
    config.pop("model_max_length")
    tokenizer_config.write_text(json.dumps(config))
    assert CrossEncoder.from_pretrained(str(tmp_path / "ce")).max_length == 512


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["listwise", "binary"])
def test_training_lowers_the_loss_and_ranks_better(minilm_dir, tmp_path, loss):
    """From all-MiniLM-L6-v2's encoder weights (a new head): 12 queries, each against its own document and
    the other 11 (which share one word with it or none)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    torch.manual_seed(0)
    before = accuracy(CrossEncoder.from_encoder(minilm_dir, max_length=32))
    args, training = rerank_args(minilm_dir, tmp_path, data, loss)
    cross, losses = rerank.train_cross_encoder(args, training)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    after = accuracy(cross)
    assert after >= 0.9 and after > before + 0.3, (before, after)


def rerank_args(model_dir, tmp_path, data, loss="listwise", extra=()):
    from transformers import HfArgumentParser, TrainingArguments

    argv = ["--model_name_or_path", model_dir, "--data_name_or_path", str(data), "--output_dir", str(tmp_path / "ce"),
            "--train_group_size", "4", "--loss", loss, "--max_length", "32", "--per_device_train_batch_size", "4",
            "--learning_rate", "5e-5", "--max_steps", "40", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "--seed", "0", *extra]
    return HfArgumentParser([rerank.RerankArguments, TrainingArguments]).parse_args_into_dataclasses(args=argv)


@pytest.mark.slow
def test_cli_trains_and_reranks_a_dense_run_above_it(minilm_dir, tiny_bert_dir, tmp_path):
    """Each query has its document and a distractor that repeats the query's words (the random dense model,
    mean-pooled, ranks it first); trained on such groups, the re-ranker puts the document first."""
    distractors = [f"{q} {q} {q}" for q in QUERIES]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"d{i}", "text": t} for i, t in enumerate(POOL)] + \
        [{"_id": f"x{i}", "text": t} for i, t in enumerate(distractors)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                for i, q in enumerate(QUERIES)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{i}\t1\n" for i in range(12)))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive": POOL[i], "negative": [distractors[i]] + [
        POOL[(i + k) % 12] for k in range(3, 9)]}) + "\n" for i, q in enumerate(QUERIES)))
    args, training = rerank_args(minilm_dir, tmp_path, data, extra=[
        "--eval_data_dir", str(beir), "--dense_model_name_or_path", tiny_bert_dir, "--rerank_top_k", "24"])
    metrics = rerank.run_rerank(args, training)["metrics"]
    assert metrics["dense"]["ndcg@10"] < 0.9 and metrics["reranked"]["ndcg@10"] > metrics["dense"]["ndcg@10"] + 0.1, \
        metrics
    assert rerank.main(["--model_name_or_path", tiny_bert_dir, "--loss", "pairwise"]) == 2
