import json
import os
import sys

import numpy as np

from processes import run
from retrievals import AutoModelForEmbedding
from retrievals.pipelines import build_hn, embed

WORDS = "cat dog fish sky sun moon ocean blue red green".split()


def write_pairs(path, n=48, with_negatives=True):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.choice(WORDS, 2, replace=False)
            rec = {"query": f"{a} {b}", "positive": [f"the {a} and the {b}"]}
            if with_negatives:
                rec["negative"] = [f"the {w}" for w in rng.choice([w for w in WORDS if w not in (a, b)], 3)]
            f.write(json.dumps(rec) + "\n")
    return str(path)


def common_flags(tmp_path, model_dir, data):
    return ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", model_dir, "--do_train",
            "--data_name_or_path", data, "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
            "--learning_rate", "5e-4", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
            "--report_to", "none"]


def test_embed_pipeline_seed_flags(tiny_bert_dir, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl")
    argv = common_flags(tmp_path, tiny_bert_dir, data) + [
        "--overwrite_output_dir", "--positive_key", "positive", "--negative_key", "negative", "--fp16",
        "--dataloader_drop_last", "True", "--query_max_length", "16", "--document_max_length", "24",
        "--train_group_size", "3", "--temperature", "0.02", "--use_inbatch_negative", "false",
        "--pooling_method", "cls", "--query_instruction", "query:\\n", "--document_instruction", "doc: ",
        "--gradient_accumulation_steps", "2", "--save_total_limit", "1"]
    assert embed.main(argv) == 0
    model = AutoModelForEmbedding.from_pretrained(tmp_path / "out")
    cfg = model.embedding_config
    assert (cfg.pooling_method, cfg.query_instruction, cfg.document_instruction) == ("cls", "query:\n", "doc: ")
    assert (cfg.query_max_length, cfg.max_length) == (16, 24)


def test_embed_pipeline_errors(tiny_bert_dir, tmp_path, capsys):
    assert embed.main(common_flags(tmp_path, tiny_bert_dir, str(tmp_path / "missing.jsonl"))) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a", "positive": \n')
    assert embed.main(common_flags(tmp_path, tiny_bert_dir, str(bad))) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    good = write_pairs(tmp_path / "good.jsonl")
    assert embed.main(common_flags(tmp_path, tiny_bert_dir, good) + ["--loss_fn", "nce"]) == 2
    assert "Unknown loss 'nce'" in capsys.readouterr().err
    assert embed.main(common_flags(tmp_path, tiny_bert_dir, good) + ["--no_such_flag", "1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err


def test_build_hn(tiny_bert_dir, tmp_path):
    records = [{"query": f"{a} {b}", "positive": [f"the {a} and the {b}"]} for a, b in zip(WORDS, WORDS[1:])]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    pool = tmp_path / "pool.jsonl"
    pool_texts = [f"the {a} and the {b}" for a in WORDS for b in WORDS if a != b] + ["THE cat  and the dog"]
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in pool_texts))

    def run(output, value_range="2-30"):
        return build_hn.main(["--model_name_or_path", tiny_bert_dir, "--input_file", str(inp), "--output_file",
                              str(tmp_path / output), "--positive_key", "positive", "--negative_key", "negative",
                              "--range_for_sampling", value_range, "--negative_number", "5",
                              "--candidate_pool", str(pool)])

    assert run("o1.jsonl") == 0 and run("o2.jsonl") == 0
    out1 = (tmp_path / "o1.jsonl").read_text()
    assert out1 == (tmp_path / "o2.jsonl").read_text()  # deterministic under the same seed
    for line in out1.splitlines():
        rec = json.loads(line)
        norm = {" ".join(p.split()).lower() for p in rec["positive"]}
        assert len(rec["negative"]) == 5 and len(set(rec["negative"])) == 5
        assert not norm & {" ".join(n.split()).lower() for n in rec["negative"]}
    # a range holding too few candidates is back-filled to the requested count
    assert run("o3.jsonl", "2-4") == 0
    assert all(len(json.loads(x)["negative"]) == 5 for x in (tmp_path / "o3.jsonl").read_text().splitlines())
    assert run("o4.jsonl", "200-2") == 2


def test_lora_decoder_merged_equals_adapter(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", with_negatives=False)
    argv = common_flags(tmp_path, tiny_llama_dir, data) + [
        "--pooling_method", "last", "--use_lora", "True", "--lora_target_modules", "q_proj,v_proj",
        "--query_instruction", "query: ", "--num_train_epochs", "3"]
    model_args, data_args, train_args = embed.parse_args(argv)
    model = embed.load_model(model_args)
    trainer = embed.train(model, model_args, data_args, train_args)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForEmbedding.from_pretrained(tmp_path / "merged", precision="fp32")
    texts = ["cat dog", "the sun and the moon"]
    a = model.encode(texts, is_query=True, precision="fp32")
    b = merged.encode(texts, is_query=True, precision="fp32")
    assert (a * b).sum(1).min() > 0.9999
    assert os.path.isfile(tmp_path / "merged" / "adapter" / "adapter_model.safetensors")


def test_torchrun_two_processes(tiny_bert_dir, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", with_negatives=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "retrievals.pipelines.embed"] + common_flags(tmp_path, tiny_bert_dir, data) + [
        "--negatives_cross_device", "True", "--ddp_backend", "gloo"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = run(cmd, timeout=300, env=env)  # a timeout stops the ranks too
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForEmbedding.from_pretrained(tmp_path / "out")
    assert model.encode("cat dog").shape == (32,)


def test_finetune_beir_main_job_on_tiny_data(tiny_bert_dir, word_beir, tmp_path):
    from retrievals.pipelines import finetune_beir

    root = word_beir
    out = tmp_path / "out"
    code = finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(root), "--output_dir", str(out),
                               "--epochs", "2", "--batch_size", "8", "--learning_rate", "1e-3",
                               "--range_for_sampling", "2-20", "--negative_number", "3"])
    assert code == 0
    result = json.loads((out / "finetune_result.json").read_text())
    assert set(result["base"]) == set(finetune_beir.METRICS) and result["losses"]
    assert (out / "finetune.png").stat().st_size > 1000
    assert AutoModelForEmbedding.from_pretrained(out).embedding_config.max_length == 256
    assert finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(tmp_path / "nope")]) == 2

    rounds = tmp_path / "rounds"
    code = finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(root), "--output_dir",
                               str(rounds), "--epochs", "2", "--batch_size", "8", "--learning_rate", "1e-3",
                               "--range_for_sampling", "2-20", "--negative_number", "3", "--rounds", "2"])
    assert code == 0
    result = json.loads((rounds / "finetune_result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2] and result["fine_tuned"] == result["rounds"][1]["metrics"]
    first, second = ([json.loads(line)["negative"] for line in open(rounds / f"round-{r}" / "train_hn.jsonl")]
                     for r in (1, 2))
    assert len(first) == len(second) == 60 and first != second
    from retrievals.data.beir import load_beir
    from retrievals.mining.hard_negatives import mine_hard_negatives

    test, train = load_beir(str(root), "test"), load_beir(str(root), "train")
    by_id = dict(zip(train.corpus_ids(), train.corpus_texts()))
    records = [{"query": train.queries[q], "positive": [by_id[d] for d, r in rels.items() if r > 0]}
               for q, rels in train.qrels.items()]
    round1, texts = AutoModelForEmbedding.from_pretrained(rounds / "round-1"), test.corpus_texts()
    again = mine_hard_negatives(round1, records, candidate_pool=texts, corpus_embeddings=round1.encode_corpus(texts),
                                range_for_sampling=(2, 20), negative_number=3, seed=43)
    assert [r["negative"] for r in again] == second  # round 2 mined with round 1's model (seed + 1)
    second_model = AutoModelForEmbedding.from_pretrained(rounds / "round-2").encode(["cat dog"])
    np.testing.assert_allclose(AutoModelForEmbedding.from_pretrained(rounds).encode(["cat dog"]), second_model)
    steps = [s for s, _ in result["losses"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one step axis across rounds
    assert finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--rounds", "0"]) == 2


def test_embed_do_encode_and_do_eval(tiny_bert_dir, tiny_beir_dir, tmp_path):
    root = tiny_beir_dir
    out = tmp_path / "enc"
    assert embed.main(["--output_dir", str(out), "--model_name_or_path", tiny_bert_dir, "--do_encode", "--do_eval",
                       "--eval_data_dir", str(root), "--report_to", "none"]) == 0
    ids = json.loads((out / "corpus_ids.json").read_text())
    assert ids == [f"doc-{w}" for w in WORDS]  # corpus ids, not row positions
    emb = np.load(out / "corpus_embeddings.npy")
    model = AutoModelForEmbedding.from_pretrained(tiny_bert_dir)
    np.testing.assert_allclose(emb[2], model.encode_corpus([{"title": "fish", "text": "the fish"}])[0], atol=1e-5)


def test_embed_resumes_from_last_checkpoint(tiny_bert_dir, tmp_path, capsys):
    import shutil

    data = write_pairs(tmp_path / "train.jsonl", with_negatives=False)
    flags = common_flags(tmp_path, tiny_bert_dir, data)
    flags[flags.index("--save_strategy") + 1] = "steps"
    flags += ["--max_steps", "6", "--save_steps", "2"]
    assert embed.main(flags) == 0
    uninterrupted = AutoModelForEmbedding.from_pretrained(tmp_path / "out", precision="fp32").encode(WORDS)
    shutil.rmtree(tmp_path / "out" / "checkpoint-6")  # as if killed after step 4
    model_args, data_args, train_args = embed.parse_args(flags)
    assert embed.check_output_dir(train_args).endswith("checkpoint-4")
    model = embed.load_model(model_args)
    trainer = embed.train(model, model_args, data_args, train_args)
    assert trainer.state.global_step == 6
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    # same final weights as the uninterrupted run: weights, optimizer, schedule and data order restored
    np.testing.assert_allclose(model.encode(WORDS, precision="fp32"), uninterrupted, atol=1e-5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "other")
    assert embed.main(flags) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err


def test_finetune_beir_with_fewer_train_queries_than_a_batch_says_so(tiny_bert_dir, tmp_path, capsys):
    from retrievals.pipelines import finetune_beir

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {w}"}) + "\n"
                                               for i, w in enumerate(WORDS)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": w}) + "\n" for i, w in enumerate(WORDS)))
    for split, ids in (("train", range(3)), ("test", range(3, 6))):
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in ids))
    code = finetune_beir.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(root), "--output_dir",
                               str(tmp_path / "out"), "--batch_size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "3 training queries" in err and "--batch_size 8" in err, err
