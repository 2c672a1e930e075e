"""Run the documentation's code blocks (tests/docs_blocks.py) in a scratch copy of the repository root.

The scratch folder links every top-level entry of the repository (so ``examples/``, ``benchmarks/``,
``Makefile`` and ``.venv`` are there), has ``../shared/data`` beside it (the real data; ``data small``
swaps in a small SciFact), and turns the placeholders of ``PLACEHOLDERS`` that a block mentions into
real files. Outputs stay in the scratch folder. ``retrievals ...``, ``python -m retrievals...`` and
``python script.py`` lines run in-process through their ``main`` (a process start costs ~15 s here)
unless the block has shell syntax or the ``subprocess`` directive; anything else runs through bash.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Dict, Iterator, List, Optional

from docs_blocks import REPO, Block
from processes import run, stop_group

# placeholder written in the docs -> what the scratch folder holds under that name
PLACEHOLDERS: Dict[str, str] = {
    "path/to/all-MiniLM-L6-v2": "model",                    # the `model` directive's model (default MiniLM)
    "sentence-transformers/all-MiniLM-L6-v2": "model",      # the hub id, resolved as a local folder first
    "path/to/SmolLM2-135M-Instruct.Q4_1.gguf": "gguf",      # the packaged SmolLM2 GGUF (`model tiny-llama`: that)
    "outputs/scifact-finetuned": "finetuned",               # the model, saved by this package (make demo's output)
    "train.jsonl": "train",                                 # records in the seed's t2_ranking.jsonl shape
    "train_hn.jsonl": "train",
}
NOT_LINKED = {".git", "outputs", "site", "checkpoints", "build", "dist", ".pytest_cache", ".ruff_cache"}
SHELL_SYNTAX = re.compile(r"[|&;<>$`(){}]")
PORT_8000 = re.compile(r"((?:127\.0\.0\.1|localhost):|--port\s+)8000\b")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def block_env() -> Dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), VIRTUAL_ENV=os.path.dirname(bin_dir),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def make_sandbox(root: str, case: List[Block], resources: Dict[str, Callable[[], str]]) -> str:
    """``root/repo`` (returned, the working directory) and ``root/shared/data``; placeholders created."""
    first = case[0]
    repo, data = os.path.join(root, "repo"), os.path.join(root, "shared", "data")
    os.makedirs(repo)
    os.makedirs(data)
    for entry in os.listdir(REPO):
        if entry not in NOT_LINKED:
            os.symlink(os.path.join(REPO, entry), os.path.join(repo, entry))
    real_data = resources["data"]()
    for entry in os.listdir(real_data):
        small = entry == "scifact" and first.value("data") == "small"
        os.symlink(resources["small_scifact"]() if small else os.path.join(real_data, entry), os.path.join(data, entry))
    text = "\n".join(b.code + " ".join(" ".join(a) for _, a in b.directives) for b in case)
    model = first.value("model", "minilm")
    for name, kind in PLACEHOLDERS.items():
        if name not in text:
            continue
        target = os.path.join(repo, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if kind == "model":
            os.symlink(resources[model](), target)
        elif kind == "gguf":  # a folder named *.gguf loads as a folder
            os.symlink(resources["tiny-llama" if model == "tiny-llama" else "gguf"](), target)
        elif kind == "finetuned":
            shutil.copytree(resources["saved:" + model](), target)
        else:
            resources["train"](target)
    return repo


def prepare(block: Block, port: int) -> str:
    """The block's text after ``sub``, ``append``/``append-to`` and the port substitution."""
    text = block.code
    for old, new in block.args("sub"):
        assert old in text, f"{block.path}:{block.line}: sub {old!r}: not in the block"
        text = text.replace(old, new)
    text = PORT_8000.sub(lambda m: m.group(1) + str(port), text)
    if block.lang != "bash":
        return text
    lines = []
    for line in logical_lines(text):
        code, comment = split_comment(line)
        if code.strip():
            extra = [shlex.join(a) for a in block.args("append")]
            extra += [shlex.join(a[1:]) for a in block.args("append-to") if a[0] in code + " "]
            code = " ".join([code.rstrip(), *extra])
        lines.append(code + (f"  {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


def logical_lines(text: str) -> List[str]:
    """Lines with backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    return out + ([current] if current else [])


def split_comment(line: str) -> tuple:
    """``code  # comment`` -> (code, "# comment"), respecting quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line, ""


def command(line: str) -> Optional[tuple]:
    """(env assignments, argv) of a simple command line, or None where it needs a shell."""
    code, _ = split_comment(line)
    if not code.strip() or SHELL_SYNTAX.search(re.sub(r"\"[^\"]*\"|'[^']*'", "", code)):
        return None
    tokens = shlex.split(code)
    env = {}
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    return (env, tokens) if tokens else None


def in_process(argv: List[str]) -> bool:
    return bool(argv) and (argv[0] == "retrievals" or (argv[0] == "python" and len(argv) > 1 and (
        (argv[1] == "-m" and len(argv) > 2 and argv[2].startswith("retrievals")) or argv[1].endswith(".py"))))


def is_server(argv: List[str]) -> bool:
    return argv[:2] == ["retrievals", "serve"] or argv[:3] == ["python", "-m", "retrievals.pipelines.serve"]


@contextlib.contextmanager
def environment(extra: Dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"{what}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_main(argv: List[str]) -> int:
    """The entry point a command line names, called in this process; its exit status."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    try:
        if argv[0] == "retrievals":
            from retrievals.cli import main
            return main(argv[1:]) or 0
        if argv[1] == "-m":
            return importlib.import_module(argv[2]).main(argv[3:]) or 0
        sys.argv = argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))
        runpy.run_path(argv[1], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


class Server:
    """A server command line started in the background, in its own process group; ``wait`` for /health,
    ``stop`` with SIGTERM (then the rest of its group, its workers, is stopped too)."""

    def __init__(self, line: str, cwd: str, log: str, port: Optional[int] = None):
        env, argv = command(line)
        env = dict(block_env(), **env)
        if "--port" in argv:
            self.port = int(argv[argv.index("--port") + 1])
        else:
            self.port = port or free_port()
            argv = [*argv, "--port", str(self.port)]
        self.log_path, self.line = log, shlex.join(argv)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([shutil.which(argv[0], path=env["PATH"]), *argv[1:]], cwd=cwd, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"{self.line} exited with {self.proc.returncode}:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{self.line}: no /health after {timeout} s:\n{self.log()}"
            time.sleep(0.5)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> int:
        """The server's exit status after SIGTERM (or SIGKILL if it did not stop within 60 s); nothing of its
        process group is left running afterwards."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        stop_group(self.proc)
        return self.proc.returncode


@contextlib.contextmanager
def case_servers(block: Block, cwd: str, port: int) -> Iterator[None]:
    """The ``server`` directives of a case's first block, running while the case's blocks run."""
    servers: List[Server] = []
    try:
        for i, args in enumerate(block.args("server")):
            line = PORT_8000.sub(lambda m: m.group(1) + str(port), shlex.join(args))
            servers.append(Server(line, cwd, os.path.join(cwd, f"server-{i}.log"), port))
        for server in servers:
            server.wait()
        yield
    finally:
        for server in servers:
            server.stop()


def check_servers(lines: List[str], cwd: str, where: str) -> None:
    """``serve``: start these server lines together, wait for each /health, stop each: exit 0 expected."""
    servers = []
    try:
        for i, line in enumerate(lines):
            servers.append(Server(line, cwd, os.path.join(cwd, f"serve-{i}.log")))
        for server in servers:
            server.wait()
    finally:
        codes = [server.stop() for server in servers]
    for server, rc in zip(servers, codes):
        assert rc == 0, f"{where}: {server.line!r} exited {rc} on SIGTERM:\n{server.log()}"


def run_block(block: Block, cwd: str, port: int, timeout: int) -> None:
    """Run one block in ``cwd`` (the scratch repository root); fail on a non-zero exit or an exception."""
    where = f"{block.path}:{block.line}"
    text = prepare(block, port)
    env = {k: v for pair in block.args("env") for k, v in (p.split("=", 1) for p in pair)}
    with environment(env), time_limit(timeout, where):
        if block.lang == "python":
            exec(compile(text, where, "exec"), {"__name__": "__main__"})
        else:
            run_bash(block, text, cwd, env, timeout)


def run_shell(args: List[str], cwd: str, env: Dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run through bash in its own process group; when it ends, times out or fails, nothing of the group is left."""
    return run(args, timeout, cwd=cwd, env=env)


def run_bash(block: Block, text: str, cwd: str, env: Dict[str, str], timeout: int) -> None:
    where = f"{block.path}:{block.line}"
    lines = [line for line in logical_lines(text) if split_comment(line)[0].strip()]
    commands = [command(line) for line in lines]
    serve = block.has("serve")
    if not serve and (block.has("subprocess") or not all(c and in_process(c[1]) for c in commands)):
        text = re.sub(r"(?m)^(\s*)make\b", r"\1make -o .venv/.installed", text)  # never re-install the venv
        proc = run_shell(["bash", "-e", "-o", "pipefail", "-c", text], cwd, dict(block_env(), **env), timeout)
        print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n")
        assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return
    pending: List[str] = []  # consecutive server lines, started together
    for line, parsed in [*zip(lines, commands), ("", None)]:
        if serve and parsed and is_server(parsed[1]):
            pending.append(line)
            continue
        if pending:
            check_servers(pending, cwd, where)
            pending = []
        if not line:
            break
        assert parsed, f"{where}: a block with 'serve' runs line by line; {line!r} needs a shell"
        line_env, argv = parsed
        if in_process(argv) and not block.has("subprocess"):
            with environment(line_env):
                rc = run_main(argv)
            assert rc == 0, f"{where}: {line!r} returned {rc}"
        else:
            proc = run_shell(["bash", "-e", "-c", line], cwd, dict(block_env(), **env), timeout)
            print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n")
            assert proc.returncode == 0, f"{where}: {line!r} exited {proc.returncode}"
