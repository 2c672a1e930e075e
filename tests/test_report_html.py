"""report.html renders in headless Chromium (Debian's package, installed by `make test`): the table, the
plots (decoded images), the leakage result and the examples; a screenshot is saved."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from retrievals.pipelines.finetune_report import write_report

pytestmark = pytest.mark.slow


def _result():
    rows = [{"step": s, "diag_accuracy": 0.5 + s / 40, "diag_margin": -0.1 + s / 100, "diag_positive_rank": 3 - s / 10,
             "diag_doc_cosine": 0.4, "diag_effective_rank": 20.0 + s, "diag_logit_range": 12.0} for s in range(1, 11)]
    hit = {"id": "d1", "title": "Aspirin & the <heart>", "relevant": True}
    metrics = {"ndcg@10": 0.70, "mrr@10": 0.66, "recall@100": 0.93, "map@100": 0.65}
    return {
        "eval_on": "test", "base": {k: v - 0.05 for k, v in metrics.items()}, "fine_tuned": metrics,
        "rounds": [{"round": 1, "metrics": metrics, "steps": 10, "diagnostics": rows}],
        "losses": [(r["step"], 2.0 - r["step"] / 10) for r in rows], "dev_curve": [], "seconds": {"fine-tune": 60.0},
        "training_queries": 728, "args": {"model_name_or_path": "all-MiniLM-L6-v2", "data_dir": "data/scifact",
                                          "loss_fn": "infonce", "epochs": 3},
        "significance": {"test": {"queries": 300, "base": {"mean": 0.65, "low": 0.6, "high": 0.7},
                                  "fine_tuned": {"mean": 0.7, "low": 0.65, "high": 0.75},
                                  "change": {"difference": 0.05, "p_value": 0.0001},
                                  "change_text": "+0.0500 [+0.0300, +0.0700], p < 0.001"}},
        "leakage": {"test": {"leaked_test_queries": 0, "n_test": 300, "counts": {}, "threshold": 0.95}},
        "examples": {"wins": [{"query": "does aspirin help?", "id": "q1", "before": 0.0, "after": 1.0,
                               "hits_before": [{**hit, "relevant": False}], "hits_after": [hit]}], "losses": []},
    }


def test_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is missing: `make system-deps` installs Debian's package"
    write_report(_result(), str(tmp_path))
    page = tmp_path / "report.html"
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # nothing fetched
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="2:true"' in dom.stdout  # the training and diagnostics plots decoded
    assert "<td>+0.0500 [+0.0300, +0.0700], p &lt; 0.001</td>" in dom.stdout
    assert "Aspirin &amp; the &lt;heart&gt;" in dom.stdout and "0 of 300 queries" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.exists() and os.path.getsize(shot) > 20_000
