"""Memory of N processes that open the same flat index: mapped (``LoadedIndex``, IO_FLAG_MMAP_IFC) or read
into memory (``mmap=False``, what IO_FLAG_MMAP gave a flat index). Prints each set's summed RSS and PSS
(PSS splits shared pages between the processes that map them: the machine's real cost).

    python benchmarks/index_mmap.py --vectors 200000 --dim 384 --processes 2 3 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile

import numpy as np


def _pss_rss_kb(pid: int) -> tuple:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:"):
                fields[parts[0]] = int(parts[1])
    return fields["Pss:"], fields["Rss:"]


def _worker(index_dir: str, mmap: bool, ready, done) -> None:
    from retrievals.index import LoadedIndex

    index = LoadedIndex(index_dir, mmap=mmap)
    index.search(np.ones((4, index.manifest.dimension), np.float32), 10)  # touch every vector
    ready.set()
    done.wait()


def build(n: int, dim: int, root: str) -> str:
    """A flat index of ``n`` random unit vectors with its manifests, written as build_index writes them."""
    import faiss
    import pyarrow as pa

    from retrievals.index.faiss_index import FORMAT_VERSION, IDS_NAME, INDEX_MANIFEST, INDEX_NAME
    from retrievals.index.manifest import write_json_atomic

    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(x)
    faiss.write_index(index, os.path.join(root, INDEX_NAME))
    with pa.OSFile(os.path.join(root, IDS_NAME), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("id", pa.string())])) as w:
        w.write_batch(pa.record_batch([pa.array([str(i) for i in range(n)])], names=["id"]))
    write_json_atomic(os.path.join(root, INDEX_MANIFEST), {
        "index_type": "flat", "factory": "Flat", "count": n, "dimension": dim, "nlist": None, "nprobe": None,
        "expected_recall_at_10": None, "recall_sample": 0, "build_seconds": 0.0, "format_version": FORMAT_VERSION,
        "vectors": {"model": "random", "model_fingerprint": "-", "dtype": "float32", "document_instruction": "",
                    "normalized": True, "folder": root}})
    return root


def measure(index_dir: str, processes: int, mmap: bool) -> tuple:
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    readies = [ctx.Event() for _ in range(processes)]
    procs = [ctx.Process(target=_worker, args=(index_dir, mmap, r, done)) for r in readies]
    try:
        for p in procs:
            p.start()
        for r in readies:
            assert r.wait(300), "a worker did not open the index"
        pss, rss = zip(*(_pss_rss_kb(p.pid) for p in procs))
        return sum(pss) / 1024, sum(rss) / 1024
    finally:
        done.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        build(args.vectors, args.dim, root)
        size = os.path.getsize(os.path.join(root, "index.faiss")) / 2 ** 20
        print(f"flat index: {args.vectors} x {args.dim} float32, {size:.0f} MiB")
        print("| processes | read into memory: PSS / RSS MiB (sum) | mapped: PSS / RSS MiB (sum) |")
        print("|---|---|---|")
        for n in args.processes:
            (pl, rl), (pm, rm) = measure(root, n, False), measure(root, n, True)
            print(f"| {n} | {pl:,.0f} / {rl:,.0f} | {pm:,.0f} / {rm:,.0f} |")


if __name__ == "__main__":
    main()
