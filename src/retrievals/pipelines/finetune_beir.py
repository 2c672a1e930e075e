"""The main job: evaluate a model on a BEIR dataset, mine hard negatives for the train queries,
fine-tune, evaluate again, print a table, save a plot and keep the model.

    python -m retrievals.pipelines.finetune_beir --model_name_or_path DIR --data_dir ../shared/data/scifact

``--eval_on dev`` chooses recipes without touching the test split: a dev split is carved from the train
queries (``--dev_fraction``, ``--dev_kind random|disjoint``, ``--dev_seed``) and the rest is trained on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from transformers import TrainingArguments

from ..data.beir import BeirDataset, load_beir, split_queries
from ..data.collators import RetrievalCollator
from ..data.datasets import RetrievalDataset
from ..data.jsonl import write_jsonl
from ..evaluation.metrics import per_query
from ..evaluation.retrieval import evaluate_retrieval
from ..losses import get_loss
from ..mining.hard_negatives import mine_hard_negatives, parse_range
from ..models.embedding_model import AutoModelForEmbedding
from ..models.fingerprint import model_fingerprint
from ..models.precision import cpu_class, cpu_has_fast_bf16
from ..trainer import RetrievalTrainer
from .check_data import check_splits
from .cli import run_cli
from .finetune_args import DISTILLATION, LOSS_NAMES, FinetuneArguments  # noqa: F401  (LOSS_NAMES: public)
from .finetune_html import pick_examples
from .finetune_report import METRICS, print_table, significance, write_report  # noqa: F401  (METRICS: the table's, public)

logger = logging.getLogger(__name__)
# Seconds per document token on a 2-core CPU with all-MiniLM-L6-v2 at 256 tokens (10.6M weights outside the
# embeddings): (encoding, training: forward + backward + step per document token of a batch). With bf16 units
# (AMD EPYC, AVX512-BF16, bf16 autocast: the demo took 15 min 15 s, estimated 15 min) and without (a 2-core
# AVX2 CPU, the fp32 path: 670 s per corpus encode, 50 s per training step of the earlier 85-minute demo).
SECONDS_PER_TOKEN = {True: (0.083e-3, 0.51e-3), False: (0.505e-3, 3.05e-3)}
REFERENCE_WEIGHTS = 10.6e6


def load_splits(args: FinetuneArguments) -> Tuple[BeirDataset, Optional[BeirDataset], Optional[BeirDataset]]:
    """``(train, dev, test)``: ``dev`` carved from train when ``--dev_fraction`` (the rest is trained on);
    ``test`` is ``None`` with ``--eval_on dev``: the test split is not even read."""
    if args.no_labels:  # the corpus alone: queries come from synthesize (adapt.synthetic_splits)
        train = replace(load_beir(args.data_dir, "test", empty_documents=args.empty_documents), queries={}, qrels={})
    else:
        train = load_beir(args.data_dir, "train", empty_documents=args.empty_documents)
    dev = None
    if args.dev_fraction and not args.no_labels:
        train, dev = split_queries(train, args.dev_fraction, args.dev_seed, args.dev_kind)
        logger.info("dev split (%s, seed %d): %d queries held out of the train split, %d trained on",
                    args.dev_kind, args.dev_seed, len(dev.queries), len(train.queries))
    test = None
    if args.eval_on == "test":  # the corpus read once: every split shares it, and the vectors encoded from it
        test = replace(load_beir(args.data_dir, "test", with_corpus=False), corpus=train.corpus,
                       empty_documents=train.empty_documents)
    return train, dev, test


def run_finetune(args: FinetuneArguments) -> Dict[str, Any]:
    """Base eval, then ``rounds`` x (mine with the current model -> train -> eval); returns every round's
    metrics (the ``--eval_on`` split's, and the dev split's when there is one), timings, losses, mining
    counts and refreshes. Each round's negatives and model are kept in ``output_dir/round-<r>`` (with one
    round, the model is saved in ``output_dir`` only)."""
    train, dev, test = load_splits(args)
    model = load_base(args)
    corpus_emb = None
    if args.no_labels:
        from .adapt import synthetic_splits

        corpus_emb, _ = encode_corpus_cached(model, train.corpus_texts(), args.embedding_cache)
        train, dev = synthetic_splits(args, model, train, corpus_emb)
    sets = {name: data for name, data in (("dev", dev), ("test", test)) if data is not None}
    train, leakage = check_splits(train, sets, model, args.leak_threshold, args.on_leak, "finetune_beir")
    records = training_records(train)
    if len(records) < args.batch_size:  # before any encoding: the trainer would only say "max_steps must be set"
        raise ValueError(f"{args.data_dir}: {len(records)} training queries are fewer than one batch "
                         f"(--batch_size {args.batch_size}, the last partial batch is dropped); lower --batch_size")
    teacher = _load_teacher(args)
    timings: Dict[str, float] = {}
    texts = train.corpus_texts()
    per_token = SECONDS_PER_TOKEN[cpu_has_fast_bf16()][0] * _weights(model) / REFERENCE_WEIGHTS
    print(f"CPU: {cpu_class()}; estimated time: {estimate_seconds(args, len(texts), len(records), per_token) / 60:.0f} "
          "min", flush=True)
    start = time.perf_counter()
    cached = corpus_emb is not None
    if not cached:
        corpus_emb, cached = encode_corpus_cached(model, texts, args.embedding_cache)
    seconds, tokens = time.perf_counter() - start, len(texts) * args.document_max_length
    if not cached:
        rest = estimate_seconds(args, len(texts), len(records), seconds / tokens) - seconds
        print(f"Corpus encoded in {seconds:.0f} s; estimated time for the rest: {rest / 60:.0f} min", flush=True)
    base, base_queries, base_top = _evaluate(model, sets, corpus_emb)
    timings["evaluate base"] = time.perf_counter() - start
    dev_curve = [(0, base["dev"]["ndcg@10"])] if dev is not None else []
    rounds, losses, offset = [], [], 0
    for r in range(1, args.rounds + 1):
        suffix = f" (round {r})" if args.rounds > 1 else ""
        start = time.perf_counter()
        counts: Dict[str, int] = {}
        mined = mine_hard_negatives(model, records, candidate_pool=texts, corpus_embeddings=corpus_emb,
                                    range_for_sampling=parse_range(args.range_for_sampling),
                                    negative_number=args.negative_number, seed=args.seed + r - 1,
                                    false_negatives=args.rules(), teacher=teacher, report=counts)
        if args.loss_fn in DISTILLATION:
            from ..mining.teacher import score_records

            mined = score_records(teacher, mined)
        timings["mine hard negatives" + suffix] = time.perf_counter() - start
        if r > 1 and args.round_start == "base":
            model = load_base(args)  # mined by the trained model, trained from the base weights
        start = time.perf_counter()
        trainer, callbacks = _train(model, mined, args, texts, dev)
        timings["fine-tune" + suffix] = time.perf_counter() - start
        folder = os.path.join(args.output_dir, f"round-{r}") if args.rounds > 1 else args.output_dir
        model.save_pretrained(folder)
        if args.rounds > 1:
            write_jsonl(os.path.join(folder, "train_hn.jsonl"), mined)
        start = time.perf_counter()
        corpus_emb = model.encode_corpus(texts, show_progress_bar=True)
        evaluations, queries, top = _evaluate(model, sets, corpus_emb)
        timings["evaluate fine-tuned" + suffix] = time.perf_counter() - start
        round_losses = [(offset + h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        diagnostics = [{"step": offset + h["step"], **{k: v for k, v in h.items() if k.startswith("diag_")}}
                       for h in trainer.state.log_history if "loss" in h and "diag_accuracy" in h]
        refreshes = [{**entry, "step": offset + entry["step"]} for entry in callbacks.get("refresh", [])]
        dev_curve += [(offset + step, m["dev_ndcg@10"]) for step, m in callbacks.get("dev", [])
                      if step < trainer.state.global_step]
        offset += trainer.state.global_step
        if dev is not None:
            dev_curve.append((offset, evaluations["dev"]["ndcg@10"]))
        losses += round_losses
        rounds.append({"round": r, "metrics": evaluations[args.eval_on], "evaluations": evaluations,
                       "losses": round_losses, "mining": counts, "refreshes": refreshes, "steps": offset,
                       "ndcg@10_per_query": queries, "diagnostics": diagnostics})
        logger.info("round %d: %s nDCG@10 %.4f", r, args.eval_on, evaluations[args.eval_on]["ndcg@10"])
    if args.rounds > 1:
        model.save_pretrained(args.output_dir)
    return {"eval_on": args.eval_on, "base": base[args.eval_on], "base_evaluations": base,
            "base_ndcg@10_per_query": base_queries,
            "examples": pick_examples(sets.get(args.eval_on), base_top, top, base_queries, queries, args.eval_on),
            "fine_tuned": rounds[-1]["metrics"], "rounds": rounds, "dev_curve": dev_curve, "seconds": timings,
            "losses": losses, "training_queries": len(records), "leakage": leakage, "args": asdict(args)}


def encode_corpus_cached(model, texts: List[str], cache_dir: Optional[str]) -> Tuple[np.ndarray, bool]:
    """``(corpus vectors, read from the cache)``. The key hashes the model's fingerprint (weights, pooling,
    lengths, instructions), the precision it encodes in on this CPU and every text."""
    if not cache_dir:
        return model.encode_corpus(texts, show_progress_bar=True), False
    digest = hashlib.sha256(f"{model_fingerprint(model)}|{getattr(model, 'precision', None)}|"
                            f"{cpu_has_fast_bf16()}".encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    path = os.path.join(cache_dir, f"corpus-{digest.hexdigest()[:20]}.npy")
    if os.path.exists(path):
        logger.info("corpus vectors read from %s", path)
        return np.load(path), True
    vectors = np.asarray(model.encode_corpus(texts, show_progress_bar=True))
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path + ".part.npy", vectors)
    os.replace(path + ".part.npy", path)  # whole or absent, even when two runs share the folder
    return vectors, False


def estimate_seconds(args: FinetuneArguments, documents: int, queries: int, encode_per_token: float) -> float:
    """The job's expected seconds: corpus encodes (base, each round, each refresh) and training steps, from
    the seconds one document token takes to encode (training per token keeps the measured ratio to it)."""
    encode, train = SECONDS_PER_TOKEN[cpu_has_fast_bf16()]
    steps = int(queries // args.batch_size * args.epochs)
    refreshes = (steps - 1) // args.hn_refresh_steps if args.hn_refresh_steps else 0
    encodes = 1 + args.rounds * (1 + refreshes)
    step_tokens = args.batch_size * args.train_group_size * args.train_length
    return (encodes * documents * args.document_max_length + args.rounds * steps * step_tokens * train / encode) \
        * encode_per_token


def _weights(model) -> int:
    """Weights outside the input embeddings: what the time per token grows with."""
    embeddings = model.model.get_input_embeddings()
    skip = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    return sum(p.numel() for p in model.model.parameters() if id(p) not in skip)


def _evaluate(model, sets: Dict[str, BeirDataset], corpus_emb: np.ndarray) -> Tuple[Dict[str, Any], ...]:
    """``(metrics, nDCG@10 per query, top 3 document ids per query)`` of each split from one encoding of the
    shared corpus (per query: for paired comparisons and the report's examples)."""
    metrics, queries, top = {}, {}, {}
    for name, data in sets.items():
        result = evaluate_retrieval(model, data, corpus_embeddings=corpus_emb)
        metrics[name], queries[name] = result.metrics, per_query(result.run, data.qrels)["ndcg@10"]
        top[name] = {q: sorted(hits, key=hits.get, reverse=True)[:3] for q, hits in result.run.items()}
    return metrics, queries, top


def training_records(train: BeirDataset) -> List[Dict[str, Any]]:
    """``{query, positive}`` per judged training query. Positives are the judged documents of the corpus (an
    empty document skipped while loading is not one); a query left with none is left out, with a count."""
    by_id = dict(zip(train.corpus_ids(), train.corpus_texts()))
    records, without = [], 0
    for q, rels in train.qrels.items():
        positives = [by_id[d] for d, r in rels.items() if r > 0 and d in by_id]
        if positives:
            records.append({"query": train.queries[q], "positive": positives})
        else:
            without += 1
    if without:
        logger.warning("%d training queries have no judged positive in the corpus (empty documents are not read); "
                       "left out", without)
    return records


def load_base(args: FinetuneArguments) -> AutoModelForEmbedding:
    # a training process encodes (mining, evaluation) with torch: OpenVINO stays out of processes that train
    return AutoModelForEmbedding.from_pretrained(args.model_name_or_path, max_length=args.document_max_length,
                                                 query_max_length=args.query_max_length, backend="torch")


def _load_teacher(args: FinetuneArguments):
    if not args.teacher:
        return None
    from ..mining.teacher import load_teacher

    return load_teacher(args.teacher)


def _loss(args: FinetuneArguments):
    if args.loss_fn == "infonce":
        return get_loss("infonce", temperature=args.temperature, use_inbatch_negative=True)
    if args.loss_fn == "listwise_kl":
        return get_loss("listwise_kl", temperature=args.temperature, teacher_temperature=args.teacher_temperature)
    return get_loss("margin_mse")


def _train(model, records: List[dict], args: FinetuneArguments, texts: List[str],
           dev: Optional[BeirDataset]) -> Tuple[RetrievalTrainer, Dict[str, list]]:
    """Train one round; returns the trainer and the callbacks' histories (``refresh``, ``dev``)."""
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "checkpoints"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0.1,
        logging_steps=5, save_strategy="no", report_to=[], seed=args.seed, dataloader_drop_last=True,
        bf16=cpu_has_fast_bf16(), use_cpu=True, disable_tqdm=False,
    )
    dataset = RetrievalDataset(records, train_group_size=args.train_group_size, seed=args.seed,
                               with_teacher_scores=args.loss_fn in DISTILLATION)
    callbacks: Dict[str, Any] = {}
    if args.hn_refresh_steps:
        from ..mining.refresh import NegativeRefreshCallback

        callbacks["refresh"] = NegativeRefreshCallback(
            model, dataset, texts, args.hn_refresh_steps, range_for_sampling=parse_range(args.range_for_sampling),
            negative_number=args.negative_number, seed=args.seed, false_negatives=args.rules())
    if dev is not None and args.dev_eval_steps:
        from ..evaluation.callback import RetrievalEvaluatorCallback

        callbacks["dev"] = RetrievalEvaluatorCallback(model, dev, eval_steps=args.dev_eval_steps)
    trainer = RetrievalTrainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=list(callbacks.values()),
        data_collator=RetrievalCollator(model.tokenizer, query_max_length=args.query_max_length,
                                        document_max_length=args.train_length),
        loss_fn=_loss(args),
    )
    trainer.train()
    return trainer, {name: c.history for name, c in callbacks.items()}


def run_and_report(args: FinetuneArguments) -> Dict[str, Any]:
    """:func:`run_finetune`, then the table, the plot and the JSON figures in ``output_dir``."""
    result = run_finetune(args)
    result["significance"] = significance(result)
    print_table(result)
    write_report(result, args.output_dir)
    print(f"\nModel, plot and figures saved in {args.output_dir}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([FinetuneArguments], run_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
