"""The ``retrievals`` command: ``retrievals <command> [flags]``, one command per pipeline."""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "serve": ("retrievals.pipelines.serve", "serve a saved model over HTTP (OpenAI-compatible embeddings)"),
    "embed": ("retrievals.pipelines.embed", "fine-tune an embedding model"),
    "pretrain": ("retrievals.pipelines.pretrain", "unsupervised contrastive pre-training on a raw corpus"),
    "build_hn": ("retrievals.pipelines.build_hn", "mine hard negatives for a training file"),
    "eval": ("retrievals.pipelines.eval", "evaluate on a BEIR folder or an STS file"),
    "finetune_beir": ("retrievals.pipelines.finetune_beir", "base eval, mining, fine-tune, eval on a BEIR folder"),
    "encode": ("retrievals.pipelines.encode", "encode a corpus of any size into Parquet shards of vectors"),
    "index": ("retrievals.pipelines.index", "build a faiss index over a vectors folder"),
    "search": ("retrievals.pipelines.search", "search an index with a file of queries (TREC run or JSONL)"),
    "synthesize": ("retrievals.pipelines.synthesize", "generate queries for a corpus with a local LM (no labels needed)"),
    "check-data": ("retrievals.pipelines.check_data", "find training queries that leak into a test split"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<14} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        message = "usage: retrievals <command> [flags]   (retrievals <command> --help for its flags)\n\ncommands:\n"
        print(message + "\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
