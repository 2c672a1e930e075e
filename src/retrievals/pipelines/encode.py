"""Encode a corpus of any size into Parquet shards of vectors (resumable, bounded memory).

    python -m retrievals.pipelines.encode --model_name_or_path MODEL --corpus corpus.jsonl \\
        --output_dir VEC [--engine local|ray --num_workers 2 --ray_address auto] [--dtype float32|int8|binary]

Re-running the same command resumes: finished shards are checked (checksums) and kept, the rest is
encoded; a vectors folder of another job (model, input, settings) is refused.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from ..data.corpus import EMPTY_DOCUMENTS_HELP, CorpusOptions
from ..index.encode import encode_to_shards
from ..index.encode_job import EncodeJob
from ..index.manifest import VectorsManifest
from .backend_flags import BACKEND_HELP, CALIBRATION_HELP
from .cli import run_cli

logger = logging.getLogger(__name__)


@dataclass
class EncodeArguments:
    model_name_or_path: str = field(metadata={"help": "Embedding model (its saved pooling and instructions are used)"})
    corpus: str = field(metadata={"help": "Corpus: .jsonl, .jsonl.gz, .parquet, or a folder of them (_id, title, text)"})
    output_dir: str = field(metadata={"help": "Vectors folder: Parquet shards + manifest.json"})
    engine: str = field(default="local", metadata={"help": "local (no set-up) or ray (pip install 'retrievals[ray]')"})
    num_workers: int = field(default=2, metadata={"help": "Ray actors, one model each"})
    ray_address: Optional[str] = field(default=None, metadata={"help": "Ray cluster to join (default: a local one)"})
    num_gpus_per_worker: float = field(default=0, metadata={"help": "GPUs each Ray actor reserves (0: CPU actors)"})
    batch_size: int = field(default=32, metadata={"help": "Texts per forward pass"})
    chunk_rows: int = field(default=1024, metadata={"help": "Texts handed to the model per call"})
    shard_size: int = field(default=65_536, metadata={"help": "Vectors per Parquet shard"})
    dtype: str = field(default="float32", metadata={"help": "Stored form: float32, int8 or binary"})
    store_text: bool = field(default=False, metadata={"help": "Keep each document's text in the shards"})
    precision: Optional[str] = field(default=None, metadata={"help": "auto (bf16 where fast), fp32, bf16, fp16, int8"})
    backend: Optional[str] = field(default=None, metadata={"help": BACKEND_HELP})
    calibration_file: Optional[str] = field(default=None, metadata={"help": CALIBRATION_HELP})
    id_key: str = field(default="_id")
    text_key: str = field(default="text")
    title_key: Optional[str] = field(default="title", metadata={"help": "Prepended to the text when present"})
    skip_invalid: bool = field(default=False, metadata={"help": "Skip (and count) malformed records instead of failing"})
    empty_documents: str = field(default="skip", metadata={"help": EMPTY_DOCUMENTS_HELP + "; skipped ones are "
                                                                   "listed in skipped.jsonl"})


def run_encode(args: EncodeArguments) -> VectorsManifest:
    """Encode ``args.corpus`` into ``args.output_dir``; returns the finished manifest."""
    options = CorpusOptions(id_key=args.id_key, text_key=args.text_key, title_key=args.title_key or None,
                            skip_invalid=args.skip_invalid, empty_documents=args.empty_documents)
    job = EncodeJob(corpus=args.corpus, output_dir=args.output_dir, model_name_or_path=args.model_name_or_path,
                    shard_size=args.shard_size, chunk_rows=args.chunk_rows, batch_size=args.batch_size,
                    dtype=args.dtype, store_text=args.store_text, precision=args.precision, corpus_options=options,
                    backend=args.backend, calibration_file=args.calibration_file)
    engine_kwargs = {"num_workers": args.num_workers, "ray_address": args.ray_address,
                     "num_gpus_per_worker": args.num_gpus_per_worker} if args.engine == "ray" else {}
    manifest = encode_to_shards(job, engine=args.engine, **engine_kwargs)  # its default encoder uses the job's settings
    print(f"{manifest.count} vectors ({manifest.dimension}-d {manifest.dtype}) in {len(manifest.shards)} shards "
          f"in {args.output_dir}; {manifest.skipped} records skipped")
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([EncodeArguments], run_encode, argv)


if __name__ == "__main__":
    sys.exit(main())
