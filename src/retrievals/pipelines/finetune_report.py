"""What ``finetune_beir`` prints and saves: the table, the plot (loss with each round and refresh, the dev
metric over training, the metrics before and after) and the JSON figures."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def _rounds(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    return result.get("rounds") or [{"round": 1, "metrics": result["fine_tuned"]}]


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


def write_report(result: Dict[str, Any], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    save_plot(result, os.path.join(output_dir, "finetune.png"))
    with open(os.path.join(output_dir, "finetune_result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
