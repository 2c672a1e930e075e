"""The model card: ``README.md`` beside the weights, Hugging Face format (YAML front matter + body).

:func:`write_card` is called by ``save_pretrained`` with what the model knows (base model, pooling, size,
max length); a fine-tuning job calls it again with what it measured (data sizes, loss and
hyper-parameters, hardware and time, metrics with their intervals, the leakage check). The front matter
carries ``base_model``, ``library_name``, ``tags``, ``datasets`` and ``model-index`` (evaluation results)
and parses with ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import yaml

__all__ = ["CARD_NAME", "card_text", "write_card"]

CARD_NAME = "README.md"
METRIC_TYPES = {"ndcg@10": "ndcg_at_10", "mrr@10": "mrr_at_10", "recall@100": "recall_at_100", "map@100": "map_at_100"}


def _front_matter(info: Dict[str, Any]) -> Dict[str, Any]:
    meta: Dict[str, Any] = {"library_name": "sentence-transformers",
                            "tags": ["retrievals", "sentence-transformers", "feature-extraction", "sentence-similarity"],
                            "pipeline_tag": "sentence-similarity"}
    if info.get("base_model"):
        meta["base_model"] = info["base_model"]
    if info.get("dataset"):
        meta["datasets"] = [info["dataset"]]
    evaluation = info.get("evaluation") or {}
    if evaluation.get("metrics"):
        metrics = [{"type": METRIC_TYPES.get(name, name.replace("@", "_at_")), "name": name, "value": round(value, 4)}
                   for name, value in evaluation["metrics"].items()]
        meta["model-index"] = [{"name": info.get("name", "model"), "results": [{
            "task": {"type": "retrieval", "name": "Retrieval"},
            "dataset": {"name": info.get("dataset", "dataset"), "type": info.get("dataset", "dataset"),
                        "split": evaluation.get("split", "test")},
            "metrics": metrics}]}]
    return meta


def _section(title: str, rows: List[str]) -> str:
    return f"## {title}\n\n" + "\n".join(rows) + "\n" if rows else ""


def card_text(info: Dict[str, Any]) -> str:
    """The whole ``README.md`` from ``info`` (keys: name, base_model, dataset, model, training, evaluation,
    leakage); missing parts are left out."""
    name = info.get("name", "model")
    model = info.get("model", {})
    body = [f"# {name}\n",
            "An embedding model saved by [retrievals](https://github.com/LongxingTan/open-retrievals)"
            + (f", fine-tuned from `{info['base_model']}`" if info.get("base_model") else "") + ".\n"]
    body.append(_section("Model", [f"- {k.replace('_', ' ')}: {v}" for k, v in model.items() if v is not None]))
    training = info.get("training") or {}
    body.append(_section("Training", [f"- {k.replace('_', ' ')}: {v}" for k, v in training.items()]))
    evaluation = info.get("evaluation") or {}
    if evaluation.get("rows"):
        lines = [f"{evaluation.get('note', '')}\n", "| metric | base | fine-tuned | change |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['base']} | {r['fine_tuned']} | {r['change']} |" for r in evaluation["rows"]]
        body.append(_section(f"Evaluation ({info.get('dataset', '')} {evaluation.get('split', 'test')})", lines))
    if info.get("leakage"):
        body.append(_section("Leakage check", [f"- {line}" for line in info["leakage"]]))
    path = name if "/" not in name else name
    body.append(_section("Usage", [
        "```python", "from retrievals import AutoModelForEmbedding", "",
        f'model = AutoModelForEmbedding.from_pretrained("{path}")',
        'vectors = model.encode(["a query", "a document"])', "```", "",
        "The folder also loads in sentence-transformers (same pooling and normalisation):", "",
        "```python", "from sentence_transformers import SentenceTransformer", "",
        f'model = SentenceTransformer("{path}")', "```"]))
    front = yaml.safe_dump(_front_matter(info), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(part for part in body if part)


def write_card(folder: str, info: Dict[str, Any]) -> str:
    path = os.path.join(folder, CARD_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(card_text(info))
    os.replace(tmp, path)
    return path


def model_facts(model, source: Optional[str] = None) -> Dict[str, Any]:
    """What ``save_pretrained`` knows: the card's Model section and base model."""
    cfg = model.embedding_config
    facts = {"architecture": type(model.model).__name__, "dimension": model.model.config.hidden_size,
             "pooling": cfg.pooling_method, "normalized": cfg.normalize_embeddings, "max_length": cfg.max_length,
             "query_instruction": cfg.query_instruction or None, "document_instruction": cfg.document_instruction or None}
    info: Dict[str, Any] = {"model": facts}
    if source:
        info["base_model"] = base_name(source)
    return info


def base_name(source: str) -> str:
    """How a card names the model it started from: a hub id as is; a local folder by its own card's title
    (``# all-MiniLM-L6-v2``), else by its name (with its parent when the name says nothing, like ``model``).
    Never an absolute path; never ``config.json``'s ``_name_or_path``, which names the folder's own base."""
    if not os.path.isdir(source):
        return source
    readme = os.path.join(source, CARD_NAME)
    if os.path.exists(readme):
        with open(readme, encoding="utf-8", errors="replace") as f:
            for line in f:
                title = line[2:].strip() if line.startswith("# ") else ""
                if title and " " not in title:
                    return title
    parts = os.path.normpath(os.path.abspath(source)).split(os.sep)
    return "/".join(parts[-2:]) if parts[-1] in ("model", "models", "saved", "output", "outputs") else parts[-1]
