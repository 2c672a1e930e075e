"""Serve a saved model over HTTP (OpenAI-compatible embeddings, dynamic batching, limits, metrics).

    retrievals serve MODEL_DIR [--port 8000] [--api_key KEY] [--max_batch_tokens 16384] ...
    retrievals serve MODEL_DIR --index_dir INDEX_DIR [--nprobe 32]      # adds POST /v1/search
    retrievals serve MODEL_DIR --workers 4                              # 4 processes on one port
    python -m retrievals.pipelines.serve MODEL_DIR ...

The model's pooling, normalisation, instructions and max lengths come from its saved config.
Binds 127.0.0.1 unless ``--host`` says otherwise. The API key may also come from the
``RETRIEVALS_API_KEY`` environment variable (keeps it out of ``ps``). Server limits are the fields
of :class:`retrievals.serving.ServerConfig`, one flag each. ``--index_dir`` (an index built by
``retrievals index`` from this model's vectors) adds ``POST /v1/search``; an index made by another
model refuses to start, naming both.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

from ..models.embedding_model import AutoModelForEmbedding
from .backend_flags import BACKEND_HELP, CALIBRATION_HELP, backend_kwargs
from .cli import run_cli

logger = logging.getLogger(__name__)


@dataclass
class ServeArguments:
    model_name_or_path: str = field(metadata={"help": "Model directory saved by retrievals (or sentence-transformers)"})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000)
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where fast), fp32, bf16, fp16 or int8"})
    backend: Optional[str] = field(default=None, metadata={"help": BACKEND_HELP})
    calibration_file: Optional[str] = field(default=None, metadata={"help": CALIBRATION_HELP})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: CUDA if available)"})
    allow_pickle: bool = field(default=False, metadata={"help": "Allow pickle (*.bin) weights; they can run code"})
    quantization: Optional[str] = field(default=None, metadata={
        "help": "int8 (dynamic int8 on CPU, ~2.4x fp32 here), bnb-8bit or bnb-4bit (bitsandbytes, CUDA)"})
    index_dir: Optional[str] = field(default=None, metadata={
        "help": "Index (retrievals index) to serve POST /v1/search from; it must come from this model's vectors"})
    nprobe: Optional[int] = field(default=None, metadata={
        "help": "IVF lists probed per query (default: the index's own; more: better recall, slower)"})
    workers: int = field(default=1, metadata={
        "help": "Server processes sharing the port, each with its own model copy and batcher (memory x N)"})
    log_level: str = field(default="info")


def build_app(args: ServeArguments, config):
    """Load the model fully and build the app (in each worker process under ``--workers``)."""
    from ..serving import create_app

    kwargs = {"use_safetensors": False} if args.allow_pickle else {}
    model = AutoModelForEmbedding.from_pretrained(args.model_name_or_path, precision=args.precision,
                                                  device=args.device, quantization=args.quantization, **kwargs,
                                                  **backend_kwargs(args.backend, args.calibration_file))
    model.eval()
    if not config.served_model_name:
        config.served_model_name = os.path.basename(os.path.normpath(args.model_name_or_path))
    return create_app(model, config, index_dir=args.index_dir, nprobe=args.nprobe)


def run_serve(args: ServeArguments, config) -> None:
    """Bind the port (fail fast if taken), load the model fully, then serve until interrupted."""
    from ..serving import bind_socket, serve

    config.api_key = config.api_key or os.environ.get("RETRIEVALS_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach the port can use it", args.host)
    if args.workers != 1:  # serve_workers refuses fewer than 1
        from ..serving.workers import WorkerStartError, serve_workers

        try:
            status = serve_workers(partial(build_app, args, config), args.host, args.port, args.workers,
                                   log_level=args.log_level)
        except WorkerStartError as e:  # exit as that worker did (3: the warm-up failed, as without --workers)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(e.status) from None
        if status != 0:
            raise ValueError("a worker did not stop within the graceful timeout; the server stopped")
        return
    sock = bind_socket(args.host, args.port)
    try:
        app = build_app(args, config)
    except BaseException:
        sock.close()
        raise
    serve(app, sock=sock, log_level=args.log_level)


def main(argv: Optional[List[str]] = None) -> int:
    from ..serving import ServerConfig

    return run_cli([ServeArguments, ServerConfig], run_serve, flags(sys.argv[1:] if argv is None else argv))


def flags(argv: List[str]) -> List[str]:
    """``serve MODEL_DIR ...``: the leading positional model directory as ``--model_name_or_path``."""
    argv = list(argv)
    return ["--model_name_or_path", *argv] if argv and not argv[0].startswith("-") else argv


if __name__ == "__main__":
    sys.exit(main())
