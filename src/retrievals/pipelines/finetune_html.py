"""``report.html`` of a fine-tune: one self-contained page (plots inline as PNG data, no script or style
from the network). It shows the before/after table with intervals and p-value, the training loss and the
dev metric, the training diagnostics, the leakage check, and example queries with their top hits before
and after (the largest wins and losses)."""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Dict, List, Optional

__all__ = ["pick_examples", "write_html_report"]


def pick_examples(data, base_top: Dict[str, Any], top: Dict[str, Any], base_scores: Dict[str, Any],
                  scores: Dict[str, Any], split: str, count: int = 3) -> Dict[str, List[Dict[str, Any]]]:
    """The ``count`` queries of ``split`` whose nDCG@10 rose most (wins) and fell most (losses), each with its
    top 3 documents before and after (id, title, judged relevant)."""
    if data is None or split not in top or split not in base_top:
        return {}
    change = {q: scores[split][q] - base_scores[split][q] for q in scores[split]}
    order = sorted(change, key=change.get)

    def hits(ids):
        out = []
        for doc in ids:
            entry = data.corpus.get(doc, {})
            out.append({"id": doc, "title": (entry.get("title") or entry.get("text", ""))[:120],
                        "relevant": data.qrels.get(q, {}).get(doc, 0) > 0})
        return out

    picked: Dict[str, List[Dict[str, Any]]] = {"wins": [], "losses": []}
    for kind, ids in (("wins", order[::-1][:count]), ("losses", order[:count])):
        for q in ids:
            if (kind == "wins" and change[q] <= 0) or (kind == "losses" and change[q] >= 0):
                continue
            picked[kind].append({"query": data.queries[q], "id": q, "before": base_scores[split][q],
                                 "after": scores[split][q], "hits_before": hits(base_top[split].get(q, [])),
                                 "hits_after": hits(top[split].get(q, []))})
    return picked


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _diagnostics_figure(result: Dict[str, Any]) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [d for r in result.get("rounds", []) for d in r.get("diagnostics", [])]
    if not rows:
        return None
    panels = [("diag_accuracy", "in-batch accuracy"), ("diag_margin", "positive - hardest negative"),
              ("diag_positive_rank", "positive's mean rank"), ("diag_doc_cosine", "documents' mean cosine"),
              ("diag_effective_rank", "effective rank (documents)"), ("diag_logit_range", "logit range")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6))
    steps = [d["step"] for d in rows]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [d.get(key, float("nan")) for d in rows], marker="o", markersize=2)
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _hits(items: List[Dict[str, Any]]) -> str:
    return "<ol>" + "".join(f"<li class=\"{'rel' if h['relevant'] else ''}\">{html.escape(h['title'])} "
                            f"<small>({html.escape(h['id'])}{', relevant' if h['relevant'] else ''})</small></li>"
                            for h in items) + "</ol>"


def write_html_report(result: Dict[str, Any], output_dir: str, card: Dict[str, Any],
                      training_png: Optional[str] = None) -> str:
    """Write ``output_dir/report.html``; ``card``: :func:`finetune_report.card_info`'s facts (one source for
    the table), ``training_png``: the job's plot file."""
    e = html.escape
    evaluation = card.get("evaluation", {})
    rows = "".join(f"<tr><td>{e(r['metric'])}</td><td>{e(r['base'])}</td><td>{e(r['fine_tuned'])}</td>"
                   f"<td>{e(r['change'])}</td></tr>" for r in evaluation.get("rows", []))
    parts = [f"<h1>{e(card.get('name', 'fine-tune'))}</h1>",
             f"<p>Base model <code>{e(str(card.get('base_model')))}</code>, {e(str(card.get('dataset')))} "
             f"{e(evaluation.get('split', 'test'))} split. {e(card.get('training', {}).get('hardware', ''))}, "
             f"{e(card.get('training', {}).get('time', ''))}.</p>",
             "<h2>Before and after</h2>", f"<p>{e(evaluation.get('note', ''))}</p>",
             f"<table id=\"metrics\"><tr><th>metric</th><th>base</th><th>fine-tuned</th><th>change</th></tr>{rows}</table>"]
    if training_png and os.path.exists(training_png):
        with open(training_png, "rb") as f:
            parts += ["<h2>Training</h2>", "<img class=\"plot\" alt=\"training loss and dev metric\" "
                      f"src=\"data:image/png;base64,{base64.b64encode(f.read()).decode('ascii')}\">"]
    diagnostics = _diagnostics_figure(result)
    if diagnostics:
        parts += ["<h2>Training diagnostics</h2>", "<img class=\"plot\" alt=\"training diagnostics\" "
                  f"src=\"data:image/png;base64,{diagnostics}\">"]
    parts += ["<h2>Leakage check</h2>", "<ul>" + "".join(f"<li>{e(line)}</li>" for line in card.get("leakage", []))
              + "</ul>" if card.get("leakage") else "<p>not run</p>"]
    for kind, title in (("wins", "Largest wins"), ("losses", "Largest losses")):
        examples = result.get("examples", {}).get(kind, [])
        if examples:
            parts.append(f"<h2>{title}</h2>")
            for ex in examples:
                parts.append(f"<h3>{e(ex['query'])} <small>nDCG@10 {ex['before']:.3f} &rarr; {ex['after']:.3f}</small></h3>"
                             f"<div class=\"pair\"><div><b>before</b>{_hits(ex['hits_before'])}</div>"
                             f"<div><b>after</b>{_hits(ex['hits_after'])}</div></div>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 10px;text-align:left}.plot{max-width:100%}"
             ".pair{display:flex;gap:2em}.pair>div{flex:1}.rel{color:#0a0;font-weight:bold}")
    check = ("window.addEventListener('load',()=>{const imgs=[...document.images];document.body.dataset.images="
             "imgs.length+':'+imgs.every(i=>i.complete&&i.naturalWidth>0)});")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{e(card.get('name', 'report'))}</title>"
            f"<style>{style}</style><script>{check}</script></head><body>" + "\n".join(parts) + "</body></html>")
    path = os.path.join(output_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
