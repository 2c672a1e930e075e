"""Point-wise ArcFace from the CLI (dynamic margins, centre initialisation, saved labels), layer-wise
learning rates, and list-wise training from the CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from retrievals import AutoModelForEmbedding, PointwiseCollator, PointwiseDataset, RetrievalTrainer
from retrievals.losses import ArcFaceAdaptiveMarginLoss
from retrievals.losses.arcface import dynamic_margins
from retrievals.pipelines.embed import main
from retrievals.pipelines.pointwise import class_mean_centres
from retrievals.trainer.param_groups import layer_depth, layerwise_param_groups

COLOURS = ["blue", "red", "green"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pointwise_rows():
    """Three classes with 12 / 6 / 3 texts: each text names its colour among random other words."""
    rng = np.random.default_rng(0)
    others = "cat dog fish sky sun moon ocean".split()
    rows = []
    for colour, n in zip(COLOURS, (12, 6, 3)):
        for _ in range(n):
            a, b = rng.choice(others, 2, replace=False)
            rows.append({"text": f"{a} {colour} {b}", "label": colour})
    return rows


def test_dynamic_margins_by_hand():
    # n ** -0.25 for 1, 16, 256 = 1, 0.5, 0.25: linear in that onto [low, high]
    m = dynamic_margins([1, 16, 256], low=0.1, high=0.4)
    np.testing.assert_allclose(m.numpy(), [0.4, 0.1 + 0.3 / 3, 0.1], rtol=1e-6)
    np.testing.assert_allclose(dynamic_margins([5, 5, 5], 0.1, 0.4).numpy(), [0.25] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="low <= high"):
        dynamic_margins([1, 2], low=0.5, high=0.1)
    loss = ArcFaceAdaptiveMarginLoss(4, 3, class_counts=torch.tensor([1, 16, 256]), margin_bounds=(0.1, 0.4))
    np.testing.assert_allclose(loss.margins.numpy(), m.numpy())
    with pytest.raises(ValueError, match="shape"):
        loss.init_centres(torch.ones(2, 4))


def test_layerwise_groups_hold_the_expected_rates(tiny_bert_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    loss_fn = ArcFaceAdaptiveMarginLoss(32, 3)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), learning_rate=1e-3, weight_decay=0.01, report_to=[],
                             use_cpu=True, max_steps=1)
    trainer = RetrievalTrainer(model=model, args=args, train_dataset=PointwiseDataset(pointwise_rows()),
                               data_collator=PointwiseCollator(model.tokenizer), loss_fn=loss_fn,
                               layerwise_lr_decay=0.5, head_learning_rate=0.05)
    optimizer = trainer.create_optimizer()
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    expected = {"embeddings": 1e-3 * 0.5**2, "layer.0.": 1e-3 * 0.5, "layer.1.": 1e-3, "pooler": 1e-3}
    checked = 0
    for name, p in model.named_parameters():
        key = next(k for k in expected if k in name)
        lr, wd = rate[id(p)]
        assert lr == pytest.approx(expected[key]), name
        assert wd == (0.0 if name.endswith("bias") or "LayerNorm" in name else 0.01), name
        checked += 1
    assert checked == len(list(model.parameters())) and rate[id(loss_fn.weight)] == (0.05, 0.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == checked + 1
    # decoder names (Llama/Qwen) follow the same rule
    assert layer_depth("model.layers.3.mlp.up_proj.weight", 4) == 0
    assert layer_depth("model.layers.0.self_attn.q_proj.weight", 4) == 3
    assert layer_depth("model.embed_tokens.weight", 4) == 4 and layer_depth("model.norm.weight", 4) is None
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layerwise_param_groups(model, 1e-3, 0.0, [], layerwise_lr_decay=1.5)


def run_cli(tmp_path, data, *extra, out="out"):
    return main(["--output_dir", str(tmp_path / out), "--do_train", "--data_name_or_path", data,
                 "--per_device_train_batch_size", "7", "--learning_rate", "1e-3", "--logging_steps", "1",
                 "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0", "--query_max_length", "16",
                 *extra])


def test_arcface_from_the_cli_dynamic_margins_and_saved_labels(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pointwise_rows())
    assert run_cli(tmp_path, data, "--model_name_or_path", tiny_bert_dir, "--loss_fn", "arcface", "--label_key", "label",
                   "--num_train_epochs", "10", "--arcface_scale", "8", "--arcface_margin_min", "0.1",
                   "--arcface_margin_max", "0.4", "--layerwise_lr_decay", "0.9", "--head_learning_rate", "0.05") == 0
    out = tmp_path / "out"
    assert json.loads((out / "labels.json").read_text())["labels"] == sorted(COLOURS)  # class ids: blue, green, red
    head = load_file(str(out / "arcface_head.safetensors"))
    counts = [6 * 2, 3, 6]  # blue 12, green 3, red 6 (in class-id order)
    np.testing.assert_allclose(head["margins"].numpy(), dynamic_margins(counts, 0.1, 0.4).numpy(), rtol=1e-6)
    trained = AutoModelForEmbedding.from_pretrained(str(out), precision="fp32")
    # the trained model separates the colours: each text is closest to its own class centre
    emb = torch.from_numpy(trained.encode_queries([r["text"] for r in pointwise_rows()]))
    pred = (emb @ torch.nn.functional.normalize(head["weight"], dim=-1).T).argmax(1)
    truth = torch.tensor([sorted(COLOURS).index(r["label"]) for r in pointwise_rows()])
    assert (pred == truth).float().mean() >= 0.9


def test_arcface_centre_initialisations(tiny_bert_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean")
    data = PointwiseDataset(pointwise_rows())
    centres = class_mean_centres(model, data)
    emb = torch.from_numpy(model.encode_queries([r["text"] for r in pointwise_rows()]))
    for colour, i in data.label_to_id.items():
        members = [j for j, r in enumerate(pointwise_rows()) if r["label"] == colour]
        np.testing.assert_allclose(centres[i].numpy(), torch.nn.functional.normalize(emb[members].mean(0), dim=0).numpy(),
                                   atol=1e-5)
    path = write_jsonl(tmp_path / "train.jsonl", pointwise_rows())
    common = ("--model_name_or_path", tiny_bert_dir, "--loss_fn", "arcface", "--max_steps", "1", "--learning_rate", "0")
    assert run_cli(tmp_path, path, *common, "--arcface_init", "class_mean", "--arcface_margin", "0.2") == 0
    saved = load_file(str(tmp_path / "out" / "arcface_head.safetensors"))
    np.testing.assert_allclose(saved["weight"].numpy(), centres.numpy(), atol=1e-5)  # lr 0: unchanged
    np.testing.assert_allclose(saved["margins"].numpy(), [0.2] * 3)  # a fixed margin
    # from the saved head (the folder or the file)
    assert run_cli(tmp_path, path, *common, "--arcface_init", str(tmp_path / "out"), out="again") == 0
    np.testing.assert_allclose(load_file(str(tmp_path / "again" / "arcface_head.safetensors"))["weight"].numpy(),
                               centres.numpy(), atol=1e-5)
    other = write_jsonl(tmp_path / "other.jsonl", [{**r, "label": r["label"] + "x"} for r in pointwise_rows()])
    assert run_cli(tmp_path, other, *common, "--arcface_init", str(tmp_path / "out"), out="bad") == 2


def test_arcface_cli_bad_input_names_file_and_line(tiny_bert_dir, tmp_path, capsys):
    rows = pointwise_rows()
    rows[4] = {"text": "cat red dog"}
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert run_cli(tmp_path, path, "--model_name_or_path", tiny_bert_dir, "--loss_fn", "arcface", "--max_steps", "1") == 2
    err = capsys.readouterr().err
    assert "train.jsonl:5" in err and "'label'" in err
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": 1}] * 8)
    assert run_cli(tmp_path, one, "--model_name_or_path", tiny_bert_dir, "--loss_fn", "arcface", "--max_steps", "1",
                   out="o2") == 2
    assert "at least 2 classes" in capsys.readouterr().err


def test_listwise_kl_from_the_cli_on_hand_written_lists(tiny_bert_dir, tmp_path):
    """Records {query, documents, scores}: the student learns the teacher's order of the documents."""
    rng = np.random.default_rng(1)
    words = "cat dog fish sky sun moon ocean blue red green".split()
    rows = []
    for _ in range(28):
        a, b, c, d = rng.choice(words, 4, replace=False)
        rows.append({"query": f"{a} {b}", "documents": [f"{a} {b}", f"{a} {c}", f"{c} {d}"], "scores": [3.0, 1.0, -2.0]})
    path = write_jsonl(tmp_path / "lists.jsonl", rows)
    assert run_cli(tmp_path, path, "--model_name_or_path", tiny_bert_dir, "--loss_fn", "listwise_kl",
                   "--num_train_epochs", "4", "--temperature", "0.1") == 0
    model = AutoModelForEmbedding.from_pretrained(str(tmp_path / "out"), precision="fp32")
    base = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")

    def order_agreement(m):
        hits = 0
        for r in rows:
            s = (m.encode_queries([r["query"]]) @ m.encode_corpus(r["documents"]).T)[0]
            hits += int(s[0] > s[1] > s[2])
        return hits / len(rows)

    assert order_agreement(model) > order_agreement(base) and order_agreement(model) >= 0.8


def test_embed_caps_default_lengths_at_the_encoders_positions(tiny_bert_dir, tmp_path):
    """The default --document_max_length 512 on a 64-position encoder: capped, not a crash on a long text."""
    long_text = " ".join(["cat dog fish sky"] * 40)  # 160 tokens
    rows = [{"query": "cat dog", "positive": long_text}] * 8
    assert run_cli(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows), "--model_name_or_path", tiny_bert_dir,
                   "--max_steps", "1") == 0
    saved = AutoModelForEmbedding.from_pretrained(str(tmp_path / "out"))
    assert saved.embedding_config.max_length == 64
