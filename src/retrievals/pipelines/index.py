"""Build a faiss index over a vectors folder (from ``retrievals.pipelines.encode``).

    python -m retrievals.pipelines.index --vectors VEC --output_dir IDX [--index_type auto|flat|ivf|ivf_sq8|ivf_pq
        --nlist 4096 --nprobe 512]

``auto`` picks exact (flat) search below 1M vectors and IVF above; the choice and the recall@10 it
reaches on sampled stored vectors are printed. The index opens memory-mapped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional

from ..index.faiss_index import IndexManifest, build_index
from .cli import run_cli


@dataclass
class IndexArguments:
    vectors: str = field(metadata={"help": "Vectors folder written by retrievals.pipelines.encode"})
    output_dir: str = field(metadata={"help": "Index folder: index.faiss, ids.arrow, index.json"})
    index_type: str = field(default="auto", metadata={"help": "auto, flat, ivf, ivf_sq8 or ivf_pq"})
    nlist: Optional[int] = field(default=None, metadata={"help": "IVF lists (default ~4 sqrt(n), a power of two)"})
    nprobe: Optional[int] = field(default=None, metadata={
        "help": "IVF lists searched per query (default: the smallest reaching recall@10 0.998 on the sample)"})
    train_size: Optional[int] = field(default=None, metadata={"help": "Vectors sampled to train IVF / PQ"})
    recall_sample: int = field(default=500, metadata={"help": "Stored vectors used as queries to measure recall@10"})
    target_recall: float = field(default=0.998, metadata={
        "help": "Default nprobe: the smallest reaching this share of the all-lists recall@10 (lower = faster)"})
    seed: int = field(default=0)


def run_index(args: IndexArguments) -> IndexManifest:
    manifest = build_index(args.vectors, args.output_dir, index_type=args.index_type, nlist=args.nlist,
                           nprobe=args.nprobe, train_size=args.train_size, recall_sample=args.recall_sample,
                           target_recall=args.target_recall,
                           seed=args.seed)
    recall = "1.000 (exact search)" if manifest.expected_recall_at_10 is None else (
        f"{manifest.expected_recall_at_10:.3f} at nprobe {manifest.nprobe} of {manifest.nlist} lists "
        f"(measured on {manifest.recall_sample} stored vectors as queries)")
    print(f"index {manifest.index_type} ({manifest.factory}) of {manifest.count} vectors in {args.output_dir} "
          f"({manifest.build_seconds:.1f} s); expected recall@10 {recall}")
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([IndexArguments], run_index, argv)


if __name__ == "__main__":
    sys.exit(main())
