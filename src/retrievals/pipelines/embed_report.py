"""``embed --do_train --do_eval --report_html``: the page ``finetune_beir`` writes (report.html, the model card,
the figures), for a model trained by ``embed``: the base model is evaluated on the same split for the
before/after table, intervals and examples; the diagnostics and losses come from the Trainer's log."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..evaluation.metrics import per_query
from ..evaluation.retrieval import evaluate_retrieval
from .finetune_html import pick_examples
from .finetune_report import significance, write_report


def _top(run) -> Dict[str, list]:
    return {q: sorted(hits, key=hits.get, reverse=True)[:3] for q, hits in run.items()}


def write_embed_report(base_model, after, data, trainer, output_dir: str, split: str, model_name: str, data_dir: str,
                       leakage: Optional[Dict[str, Any]] = None, seconds: Optional[Dict[str, float]] = None) -> str:
    """Evaluate ``base_model`` on ``data`` (``after``: the trained model's ``RetrievalResult`` there); write
    report.html, README.md and the figures to ``output_dir``; returns the page's path."""
    before = evaluate_retrieval(base_model, data)
    base_q = {split: per_query(before.run, data.qrels)["ndcg@10"]}
    final_q = {split: per_query(after.run, data.qrels)["ndcg@10"]}
    history = trainer.state.log_history
    result: Dict[str, Any] = {
        "eval_on": split, "base": before.metrics, "fine_tuned": after.metrics, "base_ndcg@10_per_query": base_q,
        "rounds": [{"round": 1, "metrics": after.metrics, "steps": trainer.state.global_step,
                    "ndcg@10_per_query": final_q,
                    "diagnostics": [{"step": h["step"], **{k: v for k, v in h.items() if k.startswith("diag_")}}
                                    for h in history if "loss" in h and "diag_accuracy" in h]}],
        "losses": [(h["step"], h["loss"]) for h in history if "loss" in h], "dev_curve": [],
        "seconds": seconds or {}, "leakage": {split: leakage} if leakage else {},
        "training_queries": len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None,
        "args": {"model_name_or_path": model_name, "data_dir": data_dir, "loss_fn": type(trainer.loss_fn).__name__,
                 "learning_rate": trainer.args.learning_rate, "batch_size": trainer.args.per_device_train_batch_size,
                 "epochs": trainer.args.num_train_epochs, "seed": trainer.args.seed},
        "examples": pick_examples(data, {split: _top(before.run)}, {split: _top(after.run)}, base_q, final_q, split),
    }
    result["significance"] = significance(result)
    write_report(result, output_dir)
    return f"{output_dir}/report.html"
