"""The model card: save_pretrained writes README.md whose front matter parses with huggingface_hub's
ModelCard; a fine-tune's card carries its data, hyper-parameters, intervals and leakage result."""

from __future__ import annotations

from huggingface_hub import ModelCard

from retrievals import AutoModelForEmbedding
from retrievals.models.model_card import card_text


def test_save_pretrained_writes_a_card_that_parses(tiny_bert_dir, tmp_path):
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir, pooling_method="mean", precision="fp32")
    model.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(str(tmp_path / "saved" / "README.md"))
    assert card.data.library_name == "sentence-transformers" and "retrievals" in card.data.tags
    assert card.data.base_model == "tiny_bert" or card.data.base_model  # named, never an absolute path
    assert not str(card.data.base_model).startswith("/")
    assert "- pooling: mean" in card.text and "- dimension: 32" in card.text
    assert AutoModelForEmbedding.from_pretrained(tmp_path / "saved").embedding_config.pooling_method == "mean"


def test_evaluation_results_round_trip_through_model_index():
    info = {"name": "scifact-finetuned", "base_model": "sentence-transformers/all-MiniLM-L6-v2", "dataset": "scifact",
            "model": {"pooling": "mean"}, "training": {"loss": "infonce", "training queries": 728},
            "evaluation": {"split": "test", "metrics": {"ndcg@10": 0.75531, "recall@100": 0.95},
                           "rows": [{"metric": "ndcg@10", "base": "0.6451 [0.60, 0.69]", "fine_tuned": "0.7553",
                                     "change": "+0.1102 [+0.08, +0.14], p < 0.001"}]},
            "leakage": ["test split: 0 of 300 queries have a training twin"]}
    card = ModelCard(card_text(info))
    results = card.data.eval_results
    assert {(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in results} == {
        ("ndcg_at_10", 0.7553, "scifact", "test"), ("recall_at_100", 0.95, "scifact", "test")}
    assert card.data.datasets == ["scifact"] and card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    for text in ("## Training", "- training queries: 728", "p < 0.001", "## Leakage check", "0 of 300 queries",
                 "SentenceTransformer(\"scifact-finetuned\")"):
        assert text in card.text, text
