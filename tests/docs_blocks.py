"""The code blocks of README.md and docs/*.md, with the ``<!-- test: ... -->`` directives above them.

A ```python, ```bash, ```shell or ```sh block is a test; any other fence (```text, ```json ...) is not.
Directives sit in HTML comments right above the opening fence, several per comment separated by ``;``:

    slow                      the block's test is marked slow
    model tiny|tiny-384|tiny-llama|minilm   what the model placeholders are (default minilm)
    data small                ../shared/data/scifact is a small SciFact subset
    append ARGS...            appended to every command line of a bash block
    append-to WORD ARGS...    appended to the command lines that contain WORD
    sub OLD NEW               text replacement in the block (OLD must occur)
    env NAME=VALUE...         environment of the block
    serve                     the block's server commands are started, awaited (/health), stopped (SIGTERM)
    server COMMAND...         a server that runs while the block runs
    subprocess                run the bash block through bash even where it could run in-process
    continue                  run after the previous block of the page, in the same scratch folder
    timeout SECONDS           limit for the block (default: 180, slow 600)
    skip reason="..."         not run (tests/test_docs.py holds the exact list)
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = {"python": "python", "bash": "bash", "shell": "bash", "sh": "bash"}
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
DIRECTIVE_LINE = re.compile(r"^<!--\s*test:(.*?)-->\s*$")
MODELS = ("minilm", "tiny", "tiny-384", "tiny-llama")
# directive name -> (minimum, maximum) number of arguments (None: any number)
DIRECTIVES: Dict[str, Tuple[int, Optional[int]]] = {
    "slow": (0, 0), "model": (1, 1), "data": (1, 1), "append": (1, None), "append-to": (2, None),
    "sub": (2, 2), "env": (1, None), "serve": (0, 0), "server": (1, None), "subprocess": (0, 0),
    "continue": (0, 0), "timeout": (1, 1), "skip": (1, 1),
}


@dataclass
class Block:
    path: str                      # relative to the repository root
    line: int                      # 1-based line of the opening fence
    lang: str                      # python or bash
    code: str
    directives: List[Tuple[str, List[str]]] = field(default_factory=list)

    @property
    def first_line(self) -> str:
        """The first line of code that is not blank or a comment: the block's name in the skip list."""
        for line in self.code.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return line.split(" #")[0].strip()
        return ""

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.directives)

    def args(self, name: str) -> List[List[str]]:
        return [a for n, a in self.directives if n == name]

    def value(self, name: str, default: Optional[str] = None) -> Optional[str]:
        found = self.args(name)
        return found[-1][0] if found else default

    @property
    def skip_reason(self) -> Optional[str]:
        reason = self.value("skip")
        return None if reason is None else reason.split("=", 1)[-1]


def parse_directives(text: str) -> List[Tuple[str, List[str]]]:
    """``slow; model tiny; sub "a b" c`` -> [("slow", []), ("model", ["tiny"]), ("sub", ["a b", "c"])]."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    groups: List[List[str]] = [[]]
    for token in lexer:
        if token == ";":
            groups.append([])
        else:
            groups[-1].append(token)
    out = []
    for name, *args in (g for g in groups if g):
        if name not in DIRECTIVES:
            raise ValueError(f"unknown test directive {name!r}; valid: {', '.join(DIRECTIVES)}")
        low, high = DIRECTIVES[name]
        if len(args) < low or (high is not None and len(args) > high):
            raise ValueError(f"test directive {name!r} takes {low}..{high if high is not None else 'n'} "
                             f"arguments, got {args}")
        if name == "model" and args[0] not in MODELS:
            raise ValueError(f"model {args[0]!r}; valid: {', '.join(MODELS)}")
        if name == "data" and args[0] != "small":
            raise ValueError(f"data {args[0]!r}; valid: small")
        if name == "skip" and not (args[0].startswith("reason=") and args[0].split("=", 1)[1].strip()):
            raise ValueError('skip needs reason="..."')
        out.append((name, args))
    return out


def read_blocks(path: str) -> List[Block]:
    """Every runnable block of one Markdown file, with its directives."""
    rel = os.path.relpath(path, REPO)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{rel}:{i + 1}: code block never closed")
        lang = RUNNABLE.get(match.group(1).lower())
        if lang:
            directives, k = [], i - 1
            while k >= 0 and DIRECTIVE_LINE.match(lines[k]):
                try:
                    directives = parse_directives(DIRECTIVE_LINE.match(lines[k]).group(1)) + directives
                except ValueError as e:
                    raise ValueError(f"{rel}:{k + 1}: {e}") from None
                k -= 1
            blocks.append(Block(rel, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", directives))
        i = end + 1
    return blocks


def doc_files() -> List[str]:
    """README.md and every page under docs/ (found by glob, so pages added later are covered)."""
    return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))


def collect_cases() -> Tuple[List[List[Block]], List[Block]]:
    """Runnable cases (a block plus the blocks that ``continue`` it) and the skipped blocks."""
    cases: List[List[Block]] = []
    skipped: List[Block] = []
    for path in doc_files():
        previous: Optional[List[Block]] = None
        for block in read_blocks(path):
            if block.skip_reason is not None:
                skipped.append(block)
                previous = None
            elif block.has("continue"):
                if previous is None:
                    raise ValueError(f"{block.path}:{block.line}: 'continue' needs a runnable block before it")
                previous.append(block)
            else:
                previous = [block]
                cases.append(previous)
    return cases, skipped


def case_id(case: List[Block]) -> str:
    return f"{case[0].path}:{case[0].line}"
