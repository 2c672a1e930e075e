"""What ``finetune_beir`` prints and saves: the table, the plot (loss with each round and refresh, the dev
metric over training, the metrics before and after) and the JSON figures."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def _rounds(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    return result.get("rounds") or [{"round": 1, "metrics": result["fine_tuned"]}]


def significance(result: Dict[str, Any], resamples: int = 1000, seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """Per evaluated split: base and fine-tuned nDCG@10 with 95% bootstrap intervals over the queries, and the
    paired change with its interval and a paired permutation p-value (from the per-query figures)."""
    from ..evaluation.significance import bootstrap_interval, paired_difference

    out: Dict[str, Dict[str, Any]] = {}
    last = _rounds(result)[-1].get("ndcg@10_per_query", {})
    for split, base in result.get("base_ndcg@10_per_query", {}).items():
        if split not in last or not base:
            continue
        change = paired_difference(last[split], base, resamples=resamples, seed=seed)
        out[split] = {"queries": len(base), "base": bootstrap_interval(list(base.values()), resamples, seed).to_dict(),
                      "fine_tuned": bootstrap_interval(list(last[split].values()), resamples, seed).to_dict(),
                      "change": change.to_dict(), "change_text": str(change)}
    return out


def print_significance(result: Dict[str, Any]) -> None:
    for split, s in result.get("significance", {}).items():
        b, f = s["base"], s["fine_tuned"]
        print(f"{split} nDCG@10 over {s['queries']} queries (95% bootstrap intervals): base {b['mean']:.4f} "
              f"[{b['low']:.4f}, {b['high']:.4f}] -> fine-tuned {f['mean']:.4f} [{f['low']:.4f}, {f['high']:.4f}]; "
              f"change {s['change_text']} (paired permutation test)")


def print_table(result: Dict[str, Any]) -> None:
    rounds = _rounds(result)
    names = ["fine-tuned"] if len(rounds) == 1 else [f"round {r['round']}" for r in rounds]
    split = result.get("eval_on", "test")
    print(f"\n| {split} metric | base | " + " | ".join(names) + " | change |\n|---|---|" + "---|" * len(names) + "---|")
    for name in METRICS:
        b, values = result["base"][name], [r["metrics"][name] for r in rounds]
        print(f"| {name} | {b:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {values[-1] - b:+.4f} |")
    pad = " |" * len(names)
    if split != "dev" and "dev" in result.get("base_evaluations", {}):
        values = [r["evaluations"]["dev"]["ndcg@10"] for r in rounds]
        b = result["base_evaluations"]["dev"]["ndcg@10"]
        print(f"| dev ndcg@10 | {b:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {values[-1] - b:+.4f} |")
    for r in rounds:
        if any(r.get("mining", {}).values()):
            print(f"| mining (round {r['round']}) | " + ", ".join(f"{k} {v}" for k, v in r["mining"].items()) + pad + " |")
    for step, seconds in result["seconds"].items():
        print(f"| time: {step} | {seconds:.0f} s |{pad} |")
    print(f"| time: total | {sum(result['seconds'].values()):.0f} s |{pad} |")
    print_significance(result)


def save_plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = _rounds(result)
    curve = result.get("dev_curve") or []
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16 if curve else 11, 4))
    left, right = axes[0], axes[-1]
    steps, losses = zip(*result["losses"]) if result["losses"] else ((), ())
    left.plot(steps, losses, marker="o", markersize=3)
    loss_name = result.get("args", {}).get("loss_fn", "infonce")
    left.set(title=f"training loss ({loss_name})", xlabel="step", ylabel="loss")
    for ax in axes[:-1]:
        _mark_rounds_and_refreshes(ax, rounds)
    if curve:
        x, y = zip(*curve)
        axes[1].plot(x, y, marker="o", color="tab:green")
        axes[1].set(title="dev nDCG@10 over training", xlabel="step", ylabel="nDCG@10")
    xs = range(len(METRICS))
    bars = [("base", result["base"])] + [("fine-tuned" if len(rounds) == 1 else f"round {r['round']}", r["metrics"])
                                         for r in rounds]
    width = 0.8 / len(bars)
    for i, (label, metrics) in enumerate(bars):
        right.bar([x - 0.4 + width * (i + 0.5) for x in xs], [metrics[m] for m in METRICS], width=width, label=label)
    right.set_xticks(list(xs), METRICS)
    data = os.path.basename(os.path.normpath(result.get("args", {}).get("data_dir", ""))) or "BEIR"
    right.set(title=f"{data} {result.get('eval_on', 'test')}", ylim=(0, 1))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mark_rounds_and_refreshes(ax, rounds: List[Dict[str, Any]]) -> None:
    """A dashed line where each round ends, a dotted one at each online refresh of the negatives."""
    for i, r in enumerate(rounds[:-1]):
        if "steps" in r:
            ax.axvline(r["steps"], color="grey", linestyle="--", label="new round" if i == 0 else None)
    refreshes = [e["step"] for r in rounds for e in r.get("refreshes", [])]
    for i, step in enumerate(refreshes):
        ax.axvline(step, color="tab:orange", linestyle=":", label="negatives refreshed" if i == 0 else None)
    if len(rounds) > 1 or refreshes:
        ax.legend(fontsize=8)


def card_info(result: Dict[str, Any], output_dir: str) -> Dict[str, Any]:
    """The model card's facts from the job's result and the saved model (models/model_card.py)."""
    from ..models.embedding_config import CONFIG_NAME
    from ..models.model_card import base_name
    from ..models.precision import cpu_class

    args = result.get("args", {})
    saved: Dict[str, Any] = {}
    for name in (CONFIG_NAME, "config.json"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                saved.update(json.load(f))
    split = result.get("eval_on", "test")
    sig = result.get("significance", {}).get(split, {})
    rows = []
    for m in METRICS:
        b, f = result["base"][m], result["fine_tuned"][m]
        row = {"metric": m, "base": f"{b:.4f}", "fine_tuned": f"{f:.4f}", "change": f"{f - b:+.4f}"}
        if m == "ndcg@10" and sig:
            row.update(base=f"{b:.4f} [{sig['base']['low']:.4f}, {sig['base']['high']:.4f}]",
                       fine_tuned=f"{f:.4f} [{sig['fine_tuned']['low']:.4f}, {sig['fine_tuned']['high']:.4f}]",
                       change=sig["change_text"])
        rows.append(row)
    leakage = [f"{name} split: {r['leaked_test_queries']} of {r['n_test']} queries have a training twin "
               f"({', '.join(f'{k} {v}' for k, v in r['counts'].items()) or 'none'}; near = cosine >= {r['threshold']})"
               for name, r in result.get("leakage", {}).items()]
    return {
        "name": os.path.basename(os.path.normpath(output_dir)), "base_model": base_name(args.get("model_name_or_path", "")),
        "dataset": os.path.basename(os.path.normpath(args.get("data_dir", ""))) or None,
        "model": {"dimension": saved.get("hidden_size"), "pooling": saved.get("pooling_method"),
                  "normalized": saved.get("normalize_embeddings"), "max_length": saved.get("max_length")},
        "training": {"training queries": result.get("training_queries"), "loss": args.get("loss_fn"),
                     "temperature": args.get("temperature"), "epochs": args.get("epochs"),
                     "batch size": args.get("batch_size"), "learning rate": args.get("learning_rate"),
                     "group size": args.get("train_group_size"), "rounds": args.get("rounds"),
                     "document tokens while training": args.get("train_document_max_length"),
                     "seed": args.get("seed"), "hardware": cpu_class(),
                     "time": f"{sum(result.get('seconds', {}).values()) / 60:.1f} min"},
        "evaluation": {"split": split, "metrics": result["fine_tuned"], "rows": rows,
                       "note": "nDCG@10 with its 95% bootstrap interval over the queries; change: paired, with a "
                               "paired permutation p-value." if sig else ""},
        "leakage": leakage}


def write_report(result: Dict[str, Any], output_dir: str) -> None:
    from ..models.model_card import write_card
    from .finetune_html import write_html_report

    os.makedirs(output_dir, exist_ok=True)
    card = card_info(result, output_dir)
    write_card(output_dir, card)
    save_plot(result, os.path.join(output_dir, "finetune.png"))
    write_html_report(result, output_dir, card, os.path.join(output_dir, "finetune.png"))
    with open(os.path.join(output_dir, "finetune_result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
