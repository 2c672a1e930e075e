"""The package as a whole: light imports for the pipelines that do not train, every public name resolves,
no import circle between modules, no module over 360 lines."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _modules() -> dict:
    found = {}
    for root, _, files in os.walk(os.path.join(SRC, "retrievals")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                found[os.path.relpath(path, SRC)[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return found


def _import_graph(modules: dict) -> dict:
    """module -> the package modules it imports, at module level or inside functions."""
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                stem = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for t in names if t in modules and t != module
                        and not module.startswith(t + ".") and not t.startswith(module + ".")}
        graph[module] = targets
    return graph


def test_no_import_circle_and_no_long_module():
    modules = _modules()
    try:
        list(graphlib.TopologicalSorter(_import_graph(modules)).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")
    long = {m: n for m, p in modules.items() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > 360}
    assert not long, long


def test_the_circle_check_finds_a_circle():
    assert _import_graph(_modules())  # the graph is not empty
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())


def test_pipelines_that_do_not_train_do_not_load_the_trainer_stack():
    """``retrievals serve/eval/encode/index/search`` start without transformers' Trainer or peft (~2 s of
    imports per process: every serve worker, every Ray actor)."""
    code = ("import sys, retrievals, retrievals.pipelines.serve, retrievals.pipelines.eval, retrievals.pipelines.encode,"
            " retrievals.pipelines.index, retrievals.pipelines.search\n"
            "print(sorted(m for m in ('transformers.trainer', 'transformers.trainer_utils', 'peft', 'datasets')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_public_name_resolves():
    import retrievals
    from retrievals.data.collators import PairCollator
    from retrievals.trainer import RetrievalTrainer

    assert retrievals.PairCollator is PairCollator and retrievals.RetrievalTrainer is RetrievalTrainer
    assert all(getattr(retrievals, name) is not None for name in retrievals.__all__)
    assert set(retrievals.__all__) <= set(dir(retrievals))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchModel'"):
        retrievals.NoSuchModel  # noqa: B018
    from retrievals.evaluation import RetrievalEvaluatorCallback  # the lazily imported callback

    assert RetrievalEvaluatorCallback.__name__ == "RetrievalEvaluatorCallback"
