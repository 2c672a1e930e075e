"""The one command-line wrapper the pipelines share: parse dataclass flags, run, report errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from transformers import HfArgumentParser


def run_cli(argument_types: Sequence[type], run: Callable[..., Any], argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` into ``argument_types`` and call ``run(*parsed)``. Bad input (missing file,
    malformed record, unknown flag or value) prints ``error: ...`` and returns 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parsed = HfArgumentParser(list(argument_types)).parse_args_into_dataclasses(args=argv)
        run(*parsed)
    except (FileNotFoundError, ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
