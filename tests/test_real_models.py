"""Real models from PyPI packages: all-MiniLM-L6-v2 and SmolLM2-135M (GGUF). Marked slow."""

import os

import numpy as np
import pytest

from retrievals import AutoModelForEmbedding
from retrievals.data.sts import load_sts
from retrievals.evaluation.sts import evaluate_sts
from retrievals.pipelines.eval import EvalArguments, run_eval

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_minilm_stsb_spearman(minilm_dir, data_dir, precision):
    model = AutoModelForEmbedding.from_pretrained(minilm_dir, max_length=128, precision=precision)
    pairs = load_sts(os.path.join(data_dir, "stsb", "stsb-en-test.csv"))
    spearman = evaluate_sts(model, pairs)["spearman"]
    assert abs(spearman - 0.8183) < 0.005, spearman


@pytest.mark.parametrize("precision,min_cosine", [("fp32", 0.9999), ("bf16", 0.999)])
def test_smollm2_last_pooling_left_equals_right(smollm_gguf, precision, min_cosine):
    # fp32 checks the padding logic; bf16 adds rounding noise from differently shaped kernels
    model = AutoModelForEmbedding.from_pretrained(smollm_gguf, pooling_method="last", precision=precision)
    assert model.embedding_config.append_eos
    texts = ["short", "a somewhat longer sentence about proteins and diets", "summit define",
             "The highest point of a mountain is called its summit, and climbers aim for it."]
    model.embedding_config.padding_side = "right"
    right = model.encode(texts, batch_size=4)
    model.embedding_config.padding_side = "left"
    left = model.encode(texts, batch_size=4)
    cosine = (left * right).sum(1)
    assert cosine.min() > min_cosine, cosine
    assert not np.allclose(right[0], right[1], atol=1e-3)


def test_scifact_main_job(minilm_dir, data_dir, tmp_path):
    # a fixed subset (test-judged documents + every 6th other, 1,097 documents) keeps this test a few minutes
    # on a CPU without bf16 units; sentence-transformers 6.2 fp32 + pytrec_eval give nDCG@10 0.7873 and
    # recall@100 0.9867 on it (ST encode, ST's own pooling and truncation, not our code); full corpus: 0.6451
    from scifact_subset import write_scifact_subset

    subset = write_scifact_subset(os.path.join(data_dir, "scifact"), str(tmp_path / "scifact"))
    args = EvalArguments(model_name_or_path=minilm_dir, data_dir=subset, output_file=str(tmp_path / "m.json"))
    metrics = run_eval(args)
    assert abs(metrics["ndcg@10"] - 0.7873) < 0.005, metrics
    assert abs(metrics["recall@100"] - 0.9867) < 0.01, metrics
