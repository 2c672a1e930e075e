"""Every python / bash block of README.md and docs/*.md runs (tests/docs_blocks.py, tests/docs_runner.py).

Each block runs in a scratch copy of the repository root with its placeholders made real; the HTML
comment above a block says how it runs cheaply (a tiny model, a small SciFact, ``--max_steps 2`` ...).
The run must succeed (exit code 0, no exception); printed figures are not checked. Blocks that cannot
run in a test carry ``<!-- test: skip reason="..." -->`` and are listed in EXPECTED_SKIPS.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from docs_blocks import REPO, case_id, collect_cases
from docs_runner import case_servers, free_port, make_sandbox, run_block
from processes import one_ray_at_a_time

CASES, SKIPPED = collect_cases()
# (file, first command of the block): the blocks that do not run, each for the reason its comment gives
EXPECTED_SKIPS = {
    ("README.md", "pip install torch==2.13.0"),   # network: installs from the package registries
    ("README.md", "make demo"),                   # the 15-90 minute main job; make test is this suite itself
    ("docs/speed.md", "OMP_WAIT_POLICY=PASSIVE python benchmarks/peers.py --data_dir ../shared/data/scifact"),  # venvs
    ("docs/serving.md", "OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py --compare infinity --texts mixed "
                        "--infinity_engines torch,optimum"),  # makes infinity-emb's venv from the registries
}
SMALL_TEST_QUERIES, SMALL_TRAIN_QUERIES, SMALL_DOCS, SMALL_TEXT_CHARS = 10, 64, 120, 600


@pytest.fixture(scope="session")
def small_scifact(data_dir, tmp_path_factory) -> str:
    """A BEIR folder of real SciFact records: 10 test and 64 train queries (two batches of 32), their relevant
    documents and others up to 120, texts cut to 600 characters (encoding all 5,183 takes ~10 minutes here)."""
    source, root = os.path.join(data_dir, "scifact"), tmp_path_factory.mktemp("small") / "scifact"
    (root / "qrels").mkdir(parents=True)
    qrels, keep_docs = {}, []
    for split, limit in (("test", SMALL_TEST_QUERIES), ("train", SMALL_TRAIN_QUERIES)):
        with open(os.path.join(source, "qrels", f"{split}.tsv"), encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))[1:]
        queries = list(dict.fromkeys(r[0] for r in rows))[:limit]
        qrels[split] = [r for r in rows if r[0] in queries]
        keep_docs += [r[1] for r in qrels[split]]
        with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels[split]))
    keep_docs, kept = set(keep_docs), []
    with gzip.open(os.path.join(source, "corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["_id"] in keep_docs or len(kept) < SMALL_DOCS - len(keep_docs):
                kept.append(dict(doc, text=doc["text"][:SMALL_TEXT_CHARS]))
    with gzip.open(root / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in kept)
    query_ids = {r[0] for rows in qrels.values() for r in rows}
    with open(os.path.join(source, "queries.jsonl"), encoding="utf-8") as f:
        queries = [line for line in f if json.loads(line)["_id"] in query_ids]
    (root / "queries.jsonl").write_text("".join(queries), encoding="utf-8")
    return str(root)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """Each model saved once by this package (the stand-in for ``make demo``'s outputs/scifact-finetuned)."""
    cache, root = {}, tmp_path_factory.mktemp("saved")

    def saved(name: str, path: str) -> str:
        if name not in cache:
            from retrievals import AutoModelForEmbedding

            model = AutoModelForEmbedding.from_pretrained(path, pooling_method="mean" if name == "tiny" else None)
            cache[name] = str(root / name / "scifact-finetuned")
            model.save_pretrained(cache[name])
        return cache[name]

    return saved


def _docs_tiny_bert(path: str, hidden_size: int, intermediate_size: int) -> str:
    """conftest's tiny random BERT (2 layers) with 512 positions, so SciFact abstracts fit the max lengths."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from conftest import _save_tiny_bert

    _save_tiny_bert(path)
    config = BertConfig.from_pretrained(path)
    config.max_position_embeddings, config.hidden_size, config.intermediate_size = 512, hidden_size, intermediate_size
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def docs_tiny_bert(tmp_path_factory) -> str:
    return _docs_tiny_bert(str(tmp_path_factory.mktemp("docs_tiny_bert")), 32, 48)


@pytest.fixture(scope="session")
def docs_tiny_bert_384(tmp_path_factory) -> str:
    """384 dimensions like MiniLM, so its sizes (Matryoshka 384,256,128,64; maxsim 128) apply as written."""
    return _docs_tiny_bert(str(tmp_path_factory.mktemp("docs_tiny_bert_384")), 384, 96)


@pytest.fixture
def resources(request, data_dir, small_scifact, saved_models):
    """Lazy getters: a fixture is only built when a block needs it."""
    from test_seed_cli import t2_ranking

    models = {"minilm": "minilm_dir", "tiny": "docs_tiny_bert", "tiny-384": "docs_tiny_bert_384",
              "tiny-llama": "tiny_llama_dir"}
    out = {name: (lambda f=fixture: request.getfixturevalue(f)) for name, fixture in models.items()}
    out.update({f"saved:{name}": (lambda n=name, f=fixture: saved_models(n, request.getfixturevalue(f)))
                for name, fixture in models.items()})
    out.update(data=lambda: data_dir, small_scifact=lambda: small_scifact, train=t2_ranking,
               gguf=lambda: request.getfixturevalue("smollm_gguf"))
    return out


def _param(case):
    slow = any(block.has("slow") for block in case)
    return pytest.param(case, id=case_id(case), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_doc_block_runs(case, resources, tmp_path, monkeypatch):
    cwd = make_sandbox(str(tmp_path), case, resources)
    monkeypatch.chdir(cwd)
    port, default = free_port(), 600 if any(b.has("slow") for b in case) else 180
    starts_ray = any("--engine ray" in b.code for b in case)  # the Ray engine's tests count Ray processes
    with one_ray_at_a_time() if starts_ray else contextlib.nullcontext(), case_servers(case[0], cwd, port):
        for block in case:
            run_block(block, cwd, port, int(block.value("timeout", default)))
    for name in ("my-model", "run.trec", "train_scored.jsonl", "checkpoints"):  # outputs of the blocks
        assert not os.path.exists(os.path.join(REPO, name)), f"a block wrote {name} into the repository"


def test_skipped_blocks_are_exactly_the_expected_ones():
    skipped = {(block.path, block.first_line) for block in SKIPPED}
    assert skipped == EXPECTED_SKIPS, f"skipped now: {sorted(skipped)}"
    assert all(block.skip_reason.strip() for block in SKIPPED)


def test_every_page_has_blocks_and_the_readme_is_a_front_page():
    pages = {case[0].path for case in CASES}
    for page in ("README.md", "docs/models.md", "docs/training.md", "docs/pipelines.md", "docs/scaling.md",
                 "docs/serving.md", "docs/benchmarks.md", "docs/training-skills.md", "docs/distributed.md"):
        assert page in pages, f"{page} has no runnable block"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme) < 6000 and "make test" in readme and "make demo" in readme


def test_mkdocs_build_strict(tmp_path):
    """The site builds with no warning (broken links and anchors are warnings)."""
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
