"""Multi-vector (ColBERT-style) model, maxsim scorer and loss, maxsim retrieval and the embed flag."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from retrievals import AutoModelForEmbedding, RetrievalCollator, RetrievalDataset, RetrievalTrainer
from retrievals.evaluation.maxsim import (
    evaluate_maxsim_rerank,
    exact_maxsim_search,
    fuse_runs,
    pad_token_matrices,
    rerank_maxsim,
)
from retrievals.losses import LOSSES, MaxSimLoss, get_loss
from retrievals.losses.maxsim import maxsim_scores, paired_maxsim_scores
from retrievals.models.multi_vector import PROJECTION_FILE, MultiVectorModel
from retrievals.models.tokenization import pad_batch
from retrievals.pipelines import embed

WORDS = "cat dog fish sky sun moon ocean blue red green".split()

# Two queries and two documents of 2-d token vectors; padding rows hold large values that would win
# every max (and every sum) if they were not masked out.
QUERY = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]],
                      [[0.6, 0.8], [5.0, 5.0], [5.0, 5.0]]])
QUERY_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
DOCS = torch.tensor([[[-1.0, 0.0], [9.0, 9.0]],
                     [[0.0, 1.0], [0.6, 0.8]]])
DOC_MASK = torch.tensor([[1, 0], [1, 1]])
# q0.d0: max{-1} + max{0} = -1 over 2 tokens; q0.d1: max{0, .6} + max{1, .8} = 1.6 over 2;
# q1.d0: max{-.6} = -.6; q1.d1: max{.8, 1.0} = 1.0
HAND_SUMS = [[-1.0, 1.6], [-0.6, 1.0]]
HAND_MEANS = [[-0.5, 0.8], [-0.6, 1.0]]


def nll(scores, label):
    return -(scores[label] - math.log(sum(math.exp(s) for s in scores)))


def brute_maxsim(q, d):
    """Mean over query tokens of the max over document tokens, with Python loops."""
    return sum(max(float(qt @ dt) for dt in d) for qt in q) / len(q)


# ---------------------------------------------------------------------------- scorer and loss
def test_maxsim_scores_match_hand_with_padding_on_both_sides():
    np.testing.assert_allclose(maxsim_scores(QUERY, QUERY_MASK, DOCS, DOC_MASK).numpy(), HAND_MEANS, atol=1e-6)
    np.testing.assert_allclose(maxsim_scores(QUERY, QUERY_MASK, DOCS, DOC_MASK, normalize=False).numpy(), HAND_SUMS,
                               atol=1e-6)
    # paired form: each query against its own list of documents
    paired = paired_maxsim_scores(QUERY, QUERY_MASK, DOCS.flip(0).unsqueeze(0).expand(2, -1, -1, -1),
                                  DOC_MASK.flip(0).unsqueeze(0).expand(2, -1, -1))
    np.testing.assert_allclose(paired.numpy(), [[0.8, -0.5], [1.0, -0.6]], atol=1e-6)
    # no masks: every row is real, so padding rows count
    assert maxsim_scores(QUERY[:1, :1], None, DOCS[:1], None).item() == pytest.approx(9.0)


def test_maxsim_scores_reject_bad_input():
    with pytest.raises(ValueError, match=r"no real token in row\(s\) \[1\]"):
        maxsim_scores(QUERY, QUERY_MASK, DOCS, torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="query_mask must be"):
        maxsim_scores(QUERY, QUERY_MASK[:, :2], DOCS, DOC_MASK)
    with pytest.raises(ValueError, match="token dims differ"):
        maxsim_scores(QUERY, QUERY_MASK, torch.ones(2, 2, 3), None)
    with pytest.raises(ValueError, match=r"\[batch, tokens, dim\]"):
        maxsim_scores(QUERY[0], None, DOCS, DOC_MASK)


def test_maxsim_loss_matches_hand():
    loss = MaxSimLoss(temperature=1.0)
    expected = (nll(HAND_MEANS[0], 0) + nll(HAND_MEANS[1], 1)) / 2
    assert loss(QUERY, DOCS, query_mask=QUERY_MASK, positive_mask=DOC_MASK).item() == pytest.approx(expected, rel=1e-6)
    # temperature divides the scores
    halved = (nll([2 * x for x in HAND_MEANS[0]], 0) + nll([2 * x for x in HAND_MEANS[1]], 1)) / 2
    assert MaxSimLoss(temperature=0.5)(QUERY, DOCS, query_mask=QUERY_MASK, positive_mask=DOC_MASK).item() == \
        pytest.approx(halved, rel=1e-6)
    # hard negatives [B*n, L, d] (n=1): candidates [p0, p1, n0, n1] with n = the positives swapped
    neg, neg_mask = DOCS.flip(0), DOC_MASK.flip(0)
    rows = [HAND_MEANS[0] + HAND_MEANS[0][::-1], HAND_MEANS[1] + HAND_MEANS[1][::-1]]
    expected = (nll(rows[0], 0) + nll(rows[1], 1)) / 2
    value = loss(QUERY, DOCS, neg, query_mask=QUERY_MASK, positive_mask=DOC_MASK, negative_mask=neg_mask)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    four_d = loss(QUERY, DOCS, neg.unsqueeze(1), query_mask=QUERY_MASK, positive_mask=DOC_MASK,
                  negative_mask=neg_mask.unsqueeze(1))
    assert four_d.item() == pytest.approx(expected, rel=1e-6)
    # own candidates only: [own positive, own negative]
    own = MaxSimLoss(temperature=1.0, use_inbatch_negative=False)
    expected = (nll([-0.5, 0.8], 0) + nll([1.0, -0.6], 0)) / 2
    value = own(QUERY, DOCS, neg, query_mask=QUERY_MASK, positive_mask=DOC_MASK, negative_mask=neg_mask)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="needs hard negatives"):
        own(QUERY, DOCS, query_mask=QUERY_MASK, positive_mask=DOC_MASK)


def test_maxsim_loss_masks_duplicate_texts_and_is_registered():
    ids = torch.tensor([7, 7])  # both positives are the same text: each query keeps only its label column
    value = MaxSimLoss(temperature=1.0)(QUERY, DOCS, query_mask=QUERY_MASK, positive_mask=DOC_MASK, positive_ids=ids)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    neg, neg_mask = DOCS.flip(0), DOC_MASK.flip(0)
    # the negative of query 0 is text 2 (its positive id): masked; query 1's negative (id 5) stays
    value = MaxSimLoss(temperature=1.0)(QUERY, DOCS, neg, query_mask=QUERY_MASK, positive_mask=DOC_MASK,
                                        negative_mask=neg_mask, positive_ids=torch.tensor([2, 3]),
                                        negative_ids=torch.tensor([2, 5]))
    # row 0 candidates: p0, p1, (n0 masked: id 2 == positive id 2 but not the label column), n1
    expected = (nll([HAND_MEANS[0][0], HAND_MEANS[0][1], HAND_MEANS[0][0]], 0) +
                nll([HAND_MEANS[1][0], HAND_MEANS[1][1], HAND_MEANS[1][1], HAND_MEANS[1][0]], 1)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert LOSSES["maxsim"] is MaxSimLoss and get_loss("maxsim", temperature=0.1).temperature == 0.1
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        MaxSimLoss(temperature=0)


def _random_tokens(g, *shape):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.double), dim=-1).requires_grad_()


@pytest.mark.parametrize("inbatch", [True, False])
def test_maxsim_loss_gradcheck(inbatch):
    g = torch.Generator().manual_seed(0)
    q, p, n = _random_tokens(g, 3, 4, 5), _random_tokens(g, 3, 6, 5), _random_tokens(g, 6, 3, 5)
    q_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    p_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    n_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    loss = MaxSimLoss(temperature=0.5, use_inbatch_negative=inbatch)

    def fn(q, p, n):
        return loss(q, p, n, query_mask=q_mask, positive_mask=p_mask, negative_mask=n_mask)

    assert torch.autograd.gradcheck(fn, (q, p, n))
    fn(q, p, n).backward()
    assert q.grad[1, 2:].abs().max().item() == 0.0 and p.grad[2, 2:].abs().max().item() == 0.0  # padding: no gradient


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def mv_model(tiny_bert_dir):
    torch.manual_seed(0)
    return MultiVectorModel.from_pretrained(tiny_bert_dir, dim=16, pooling_method="mean", precision="fp32")


def test_forward_normalises_and_zeros_padding(mv_model):
    ids = mv_model.tokenize(["cat dog", "the sun and the moon over the ocean"])
    inputs = pad_batch(ids, mv_model.tokenizer.pad_token_id)
    with torch.no_grad():
        out = mv_model(**inputs)
    assert out.dtype == torch.float32 and out.shape == (2, len(ids[1]), 16)
    norms = out.norm(dim=-1)
    np.testing.assert_allclose(norms[inputs["attention_mask"].bool()].numpy(), 1.0, atol=1e-5)
    assert norms[0, len(ids[0]):].abs().max().item() == 0.0
    assert mv_model.returns_token_embeddings is True


def test_padding_invariance_and_special_tokens(mv_model):
    alone = mv_model.encode("cat dog")[0]
    batch = mv_model.encode(["the sun and the moon over the blue ocean", "cat dog", "fish"])
    assert alone.shape == (4, 16)  # [CLS] cat dog [SEP]
    torch.testing.assert_close(batch[1], alone, atol=1e-5, rtol=0)
    stripped = mv_model.encode(["cat dog"], skip_special_tokens=True)[0]
    torch.testing.assert_close(stripped, alone[1:3], atol=1e-6, rtol=0)
    # queries get the query instruction (more tokens) from the embedding config
    mv_model.embedding_config.query_instruction = "query: "
    try:
        assert mv_model.encode("cat dog", is_query=True)[0].shape[0] == len(mv_model.tokenize(["query: cat dog"])[0])
    finally:
        mv_model.embedding_config.query_instruction = ""


def test_save_load_round_trip(mv_model, tiny_bert_dir, tmp_path):
    mv_model.save_pretrained(tmp_path / "mv")
    assert (tmp_path / "mv" / PROJECTION_FILE).is_file()
    loaded = MultiVectorModel.from_pretrained(tmp_path / "mv", precision="fp32")
    assert loaded.dim == 16
    texts = ["cat dog", "the sun and the moon"]
    for a, b in zip(mv_model.encode(texts), loaded.encode(texts)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the directory still loads as a dense model equal to the backbone's pooled embeddings
    dense = AutoModelForEmbedding.from_pretrained(tmp_path / "mv", precision="fp32").encode(texts)
    np.testing.assert_allclose(dense, mv_model.embedder.encode(texts), atol=1e-6)
    with pytest.raises(ValueError, match="dim=8 but .* projection of size 16"):
        MultiVectorModel.from_pretrained(tmp_path / "mv", dim=8)
    fresh = MultiVectorModel.from_pretrained(tiny_bert_dir, dim=16)
    assert not torch.equal(fresh.projection.weight, loaded.projection.weight)


def pair_rows(n=64):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b = rng.choice(WORDS, 2, replace=False)
        rows.append({"query": f"{a} {b}", "positive": f"the {a} and the {b}",
                     "negative": [f"the {w}" for w in rng.choice([w for w in WORDS if w not in (a, b)], 2)]})
    return rows


def test_training_through_retrieval_trainer_lowers_the_loss(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    model = MultiVectorModel.from_pretrained(tiny_bert_dir, dim=16, pooling_method="mean")
    rows = pair_rows()
    collator = RetrievalCollator(model.tokenizer, query_max_length=16, document_max_length=24)
    fixed = collator.with_model_config(model.embedding_config)([{**r, "negative": r["negative"][:1]} for r in rows[:8]])
    loss_fn = MaxSimLoss(temperature=0.1)

    def fixed_loss():
        model.eval()
        with torch.no_grad():
            out = {side: model(**fixed[side]) for side in ("query", "positive", "negative")}
            masks = {f"{side}_mask": fixed[side]["attention_mask"] for side in ("query", "positive", "negative")}
            return loss_fn(**out, **masks).item()

    before = fixed_loss()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=3,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             activation_checkpointing=True)  # delegated to the backbone
    trainer = RetrievalTrainer(model=model, args=args, train_dataset=RetrievalDataset(rows, train_group_size=2),
                               data_collator=collator, loss_fn=loss_fn)
    projection_before = model.projection.weight.detach().clone()
    trainer.train()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    assert not torch.equal(projection_before, model.projection.weight)  # the projection is trained too
    assert model.model.is_activation_checkpointing


# ---------------------------------------------------------------------------- retrieval
CORPUS = {f"d{i}": {"title": "", "text": f"the {a} and the {b}"} for i, (a, b) in enumerate(zip(WORDS, WORDS[3:]))}
CORPUS["d_title"] = {"title": "fish", "text": "the blue sky"}
QUERIES = {"q0": "cat moon", "q1": "blue fish", "q2": "red sky"}


def test_exact_maxsim_search_matches_brute_force(mv_model):
    run = exact_maxsim_search(mv_model, QUERIES, CORPUS, top_k=3, docs_per_chunk=3)
    texts = {d: (c["title"] + " " + c["text"]).strip() for d, c in CORPUS.items()}
    doc_tokens = dict(zip(texts, mv_model.encode(list(texts.values()))))
    for qid, text in QUERIES.items():
        q = mv_model.encode(text, is_query=True)[0]
        brute = {d: brute_maxsim(q, t.float()) for d, t in doc_tokens.items()}
        best = sorted(brute, key=brute.get, reverse=True)[:3]
        assert list(run[qid]) == best
        for d in best:
            assert run[qid][d] == pytest.approx(brute[d], abs=2e-3)  # documents are stored as float16


def test_rerank_keeps_only_first_stage_candidates(mv_model):
    data = type("Data", (), {"queries": QUERIES, "corpus": CORPUS})()
    first = {"q0": {"d0": 0.9, "d1": 0.8, "d2": 0.7, "d3": 0.1}, "q1": {"d4": 0.5, "d_title": 0.4}}
    run = rerank_maxsim(mv_model, data, first, top_k=3)
    assert set(run["q0"]) == {"d0", "d1", "d2"}  # d3 is outside the top 3
    assert set(run["q1"]) == {"d4", "d_title"} and run["q2"] == {}
    q = mv_model.encode(QUERIES["q1"], is_query=True)[0]
    expected = brute_maxsim(q, mv_model.encode("fish the blue sky")[0])
    assert run["q1"]["d_title"] == pytest.approx(expected, abs=2e-3)
    with pytest.raises(ValueError, match="not in the corpus, e.g. \\['nope'\\]"):
        rerank_maxsim(mv_model, data, {"q0": {"nope": 1.0}})


def test_fuse_runs_and_padding_helper():
    fused = fuse_runs({"q": {"a": 1.0, "b": 0.0}}, {"q": {"a": 0.0, "b": 0.5, "c": 9.0}}, weight=0.25)
    assert fused == {"q": {"a": 0.25, "b": 0.375}}
    padded, mask = pad_token_matrices([torch.ones(1, 2), torch.full((3, 2), 2.0)])
    assert padded[0].tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]] and mask.tolist() == [[1, 0, 0], [1, 1, 1]]


# ---------------------------------------------------------------------------- the embed pipeline
def flags(tmp_path, model_dir, data):
    return ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", model_dir, "--do_train",
            "--data_name_or_path", data, "--per_device_train_batch_size", "8", "--num_train_epochs", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
            "--report_to", "none", "--multi_vector_dim", "16", "--loss_fn", "maxsim", "--temperature", "0.1",
            "--train_group_size", "2", "--query_max_length", "16", "--document_max_length", "24", "--seed", "0"]


def test_embed_pipeline_multi_vector_flag(tiny_bert_dir, tiny_beir_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    root = tiny_beir_dir
    argv = flags(tmp_path, tiny_bert_dir, str(data)) + ["--do_eval", "--eval_data_dir", root]
    model_args, data_args, args = embed.parse_args(argv)
    assert model_args.multi_vector_dim == 16
    assert isinstance(embed.build_loss(args), MaxSimLoss) and embed.build_loss(args).temperature == 0.1
    result = embed.run_embed(model_args, data_args, args)
    assert np.mean(result["losses"][-3:]) < np.mean(result["losses"][:3]), result["losses"]
    loaded = MultiVectorModel.from_pretrained(tmp_path / "out")
    assert loaded.dim == 16
    # --do_eval reports the maxsim re-rank of the dense top 100 of the trained model
    from retrievals.data.beir import load_beir

    expected = evaluate_maxsim_rerank(loaded, load_beir(root))
    for name, value in expected["maxsim"].metrics.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6)
    for name, value in expected["dense"].metrics.items():
        assert result["first_stage_metrics"][name] == pytest.approx(value, abs=1e-6)
    # bad combinations fail with the flag named
    argv = flags(tmp_path, tiny_bert_dir, str(data))
    del argv[argv.index("--multi_vector_dim"):argv.index("--multi_vector_dim") + 2]
    assert embed.main(argv) == 2
    assert "--loss_fn maxsim trains token embeddings: pass --multi_vector_dim" in capsys.readouterr().err
    assert embed.main(flags(tmp_path, tiny_bert_dir, str(data)) + ["--do_encode"]) == 2
    assert "--do_encode is not supported with --multi_vector_dim" in capsys.readouterr().err
    assert embed.main(flags(tmp_path, tiny_bert_dir, str(data))[:-2] + ["--loss_fn", "infonce"]) == 2
    assert "--multi_vector_dim trains with --loss_fn maxsim, got --loss_fn 'infonce'" in capsys.readouterr().err


def test_embed_multi_vector_resume_restores_the_projection(tiny_bert_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(48)))
    argv = flags(tmp_path, tiny_bert_dir, str(data))
    argv[argv.index("--save_strategy") + 1] = "steps"
    argv += ["--max_steps", "6", "--save_steps", "2"]
    assert embed.main(argv) == 0
    uninterrupted = MultiVectorModel.from_pretrained(tmp_path / "out", precision="fp32")
    shutil.rmtree(tmp_path / "out" / "checkpoint-6")  # as if killed after step 4
    model_args, data_args, args = embed.parse_args(argv)
    model = embed.wrap_multi_vector(embed.load_model(model_args), model_args, args)
    trainer = embed.train(model, model_args, data_args, args)
    assert trainer.state.global_step == 6
    torch.testing.assert_close(model.projection.weight, uninterrupted.projection.weight, atol=1e-5, rtol=0)
    for a, b in zip(model.encode(WORDS, precision="fp32"), uninterrupted.encode(WORDS)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
