"""Train, encode and evaluate an embedding model from the command line.

    python -m retrievals.pipelines.embed --output_dir OUT --model_name_or_path MODEL --do_train \\
        --data_name_or_path train.jsonl --positive_key positive --negative_key negative \\
        --train_group_size 4 --temperature 0.02 --use_inbatch_negative false ...
    torchrun --nproc_per_node 2 -m retrievals.pipelines.embed ...   (distributed, through the Trainer)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

import numpy as np
from transformers.trainer_utils import set_seed

from ..data.beir import load_beir
from ..data.collators import ListwiseCollator, PointwiseCollator, RetrievalCollator, ScoredPairCollator
from ..data.datasets import ListwiseDataset, PointwiseDataset, RetrievalDataset, ScoredPairDataset
from ..data.records import iter_records
from ..evaluation.retrieval import RetrievalEvaluator, evaluate_dims, evaluate_retrieval
from ..losses import CachedLoss, CrossBatchMemory, MatryoshkaLoss, get_loss
from ..losses.matryoshka import parse_dims
from ..models.embedding_model import AutoModelForEmbedding
from ..models.multi_vector import MultiVectorModel
from ..trainer import RetrievalTrainer
from ..trainer.checkpoints import last_complete_checkpoint, warn_if_world_size_changed
from .arguments import DataArguments, EmbedTrainingArguments, ModelArguments
from .check_data import check_training_file
from .cli import leave_process_group, run_cli
from .multi_vector import evaluate_multi_vector, maxsim_loss_kwargs, wrap_multi_vector

logger = logging.getLogger(__name__)

SCORED_LOSSES = {"cosent"}
PAIRLESS_EVAL_LOSSES = {"listwise_kl", "margin_mse", "arcface"}


def load_model(model_args: ModelArguments) -> AutoModelForEmbedding:
    model = AutoModelForEmbedding.from_pretrained(
        model_args.model_name_or_path, pooling_method=model_args.pooling_method,
        query_instruction=model_args.query_instruction, document_instruction=model_args.document_instruction,
        max_length=model_args.document_max_length, query_max_length=model_args.query_max_length,
        trust_remote_code=model_args.trust_remote_code, quantization=model_args.quantization,
        device=None if str(model_args.quantization or "").lower().startswith("bnb") else "cpu",
        backend="torch",  # a training process encodes (mining, refresh, dev) with its own forward
    )
    _cap_lengths(model, model_args)
    if model_args.use_lora and getattr(model, "quantization", None) == "int8":
        raise ValueError("--quantization int8 is for inference only and cannot take --use_lora; "
                         "on CUDA use --quantization bnb-4bit with --use_lora (QLoRA)")
    if model_args.use_lora:
        from ..models.lora import add_lora

        add_lora(model, rank=model_args.lora_rank, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                 target_modules=model_args.lora_target_modules)
    return model


def _cap_lengths(model, model_args: ModelArguments) -> None:
    """An encoder's absolute position embeddings bound its input: flags (defaults included) above that
    limit are lowered to it with a warning, instead of failing deep inside the model on the first long text."""
    from ..models.loading import is_decoder_model, position_limit

    backbone = getattr(model, "model", model)
    limit = position_limit(backbone.config, model.tokenizer)
    if limit is None or is_decoder_model(backbone.config):
        return
    cfg = model.embedding_config
    for name in ("max_length", "query_max_length"):
        value = getattr(cfg, name)
        if value and value > limit:
            logger.warning("%s %d exceeds the model's %d positions; using %d", name, value, limit, limit)
            setattr(cfg, name, limit)
    # the collators read the flags: keep them equal to what the model saves
    model_args.document_max_length = cfg.max_length
    model_args.query_max_length = min(model_args.query_max_length, cfg.max_length)


def build_loss(args: EmbedTrainingArguments, model=None, dataset=None):
    """The named loss, wrapped as the flags ask: memory bank, then Matryoshka, then gradient cache.
    ``arcface`` is built from the point-wise ``dataset`` (classes, counts) and ``model`` (size, centres)."""
    kwargs: Dict[str, Any] = {}
    name = args.loss_fn.lower()
    if name == "arcface":
        if not isinstance(dataset, PointwiseDataset):
            raise ValueError("--loss_fn arcface trains from point-wise data: pass --do_train --data_name_or_path")
        from .pointwise import build_arcface

        if args.memory_bank_size or args.cached_mini_batch_size:
            raise ValueError("--loss_fn arcface cannot take --memory_bank_size or --cached_mini_batch_size")
        return build_arcface(model, dataset, args)
    if name in ("infonce", "simcse"):
        kwargs = {"temperature": args.temperature, "negatives_cross_device": args.negatives_cross_device,
                  "similarity": args.similarity}
        if name == "infonce":
            kwargs["use_inbatch_negative"] = args.use_inbatch_negative
    elif name == "logistic":
        kwargs = {"temperature": args.temperature}
    elif name == "listwise_kl":
        kwargs = {"temperature": args.temperature, "teacher_temperature": args.teacher_temperature,
                  "similarity": args.similarity}
    kwargs.update(maxsim_loss_kwargs(args) if name == "maxsim" else {})
    loss = get_loss(name, **kwargs)
    if args.memory_bank_size:
        if args.matryoshka_dims:
            raise ValueError("--memory_bank_size and --matryoshka_dims cannot be combined (the bank holds one size)")
        loss = CrossBatchMemory(loss, size=args.memory_bank_size)
    if args.matryoshka_dims:
        try:
            weights = [float(w) for w in args.matryoshka_weights.split(",")] if args.matryoshka_weights else None
        except ValueError:
            raise ValueError(f"--matryoshka_weights must be comma-separated numbers, got {args.matryoshka_weights!r}") \
                from None
        loss = MatryoshkaLoss(loss, parse_dims(args.matryoshka_dims), weights=weights)
    if args.cached_mini_batch_size:
        loss = CachedLoss(loss, mini_batch_size=args.cached_mini_batch_size)
    return loss


def build_dataset(data_args: DataArguments, loss_name: str):
    if not data_args.data_name_or_path:
        raise ValueError("--do_train needs --data_name_or_path")
    if loss_name.lower() in SCORED_LOSSES:
        return ScoredPairDataset(data_args.data_name_or_path, query_key=data_args.query_key,
                                 document_key=data_args.positive_key, label_key=data_args.label_key,
                                 skip_invalid=data_args.skip_invalid), ScoredPairCollator
    if loss_name.lower() == "arcface":
        return PointwiseDataset(data_args.data_name_or_path, text_key=data_args.text_key, label_key=data_args.label_key,
                                skip_invalid=data_args.skip_invalid), PointwiseCollator
    if loss_name.lower() == "listwise_kl" and _first_record_has(data_args.data_name_or_path, data_args.documents_key):
        return ListwiseDataset(data_args.data_name_or_path, query_key=data_args.query_key,
                               documents_key=data_args.documents_key, scores_key=data_args.scores_key,
                               group_size=data_args.train_group_size if data_args.train_group_size > 1 else None,
                               skip_invalid=data_args.skip_invalid), ListwiseCollator
    distill = loss_name.lower() in ("listwise_kl", "margin_mse")  # trained from teacher scores in the file
    if distill and data_args.train_group_size < 2:
        raise ValueError(f"--loss_fn {loss_name} compares a positive with negatives: set --train_group_size >= 2")
    return RetrievalDataset(data_args.data_name_or_path, query_key=data_args.query_key,
                            positive_key=data_args.positive_key, negative_key=data_args.negative_key,
                            train_group_size=data_args.train_group_size, skip_invalid=data_args.skip_invalid,
                            with_teacher_scores=distill, pos_scores_key=data_args.pos_scores_key,
                            neg_scores_key=data_args.neg_scores_key), RetrievalCollator


def _first_record_has(source: str, key: str) -> bool:
    """Whether the first record of a training file has ``key`` (the list-wise layout)."""
    for _origin, record in iter_records(source):
        return key in record
    return False


def check_output_dir(args: EmbedTrainingArguments) -> Optional[str]:
    """The checkpoint to resume from, if any; refuse a non-empty output dir without permission."""
    if args.resume_from_checkpoint:
        warn_if_world_size_changed(args.resume_from_checkpoint, args.world_size)
        return args.resume_from_checkpoint
    if not args.do_train or not os.path.isdir(args.output_dir) or not os.listdir(args.output_dir):
        return None
    if args.overwrite_output_dir:
        return None
    last = last_complete_checkpoint(args.output_dir, args.world_size)
    if last is None:
        raise ValueError(f"Output directory {args.output_dir!r} is not empty; pass --overwrite_output_dir")
    logger.info("Resuming from %s", last)
    return last


def dev_evaluation(data_args: DataArguments, args: EmbedTrainingArguments) -> Dict[str, Any]:
    """With ``--eval_strategy steps|epoch``: the BEIR dev split as an evaluator (``eval_ndcg@10`` ...) and
    its (query, relevant document) pairs as the eval-loss dataset (for the losses trained from pairs)."""
    if args.eval_strategy == "no":
        return {}
    folder = data_args.dev_data_dir or data_args.eval_data_dir
    if not folder:
        raise ValueError(f"--eval_strategy {args.eval_strategy.value} needs --dev_data_dir (or --eval_data_dir): "
                         "a BEIR-layout folder with qrels/{--dev_split}.tsv")
    data = load_beir(folder, split=data_args.dev_split)
    texts = dict(zip(data.corpus_ids(), data.corpus_texts()))
    pairs = [{"query": data.queries[qid], "positive": [texts[d] for d, rel in docs.items() if rel > 0 and d in texts]}
             for qid, docs in data.qrels.items()]
    pairs = [p for p in pairs if p["positive"]]
    if args.loss_fn.lower() in SCORED_LOSSES | PAIRLESS_EVAL_LOSSES:
        pairs = []  # these losses need labels / teacher scores that dev pairs do not have
    return {"evaluator": RetrievalEvaluator(data), "eval_dataset": RetrievalDataset(pairs) if pairs else None}


def refresh_callbacks(model, dataset, data_args: DataArguments, args: EmbedTrainingArguments) -> List[Any]:
    """``--hn_refresh_steps K``: the online hard-negative refresh over ``--candidate_pool``."""
    if not data_args.hn_refresh_steps:
        return []
    if not data_args.candidate_pool:
        raise ValueError("--hn_refresh_steps needs --candidate_pool (a JSONL of {_id, title, text})")
    if not isinstance(dataset, RetrievalDataset) or isinstance(model, MultiVectorModel):
        raise ValueError(f"--hn_refresh_steps works with single-vector retrieval losses, not --loss_fn {args.loss_fn}")
    from ..mining.false_negatives import FalseNegativeFilter
    from ..mining.hard_negatives import parse_range
    from ..mining.refresh import NegativeRefreshCallback
    from .build_hn import read_pool

    rules = FalseNegativeFilter(data_args.max_positive_ratio, data_args.positive_margin)
    return [NegativeRefreshCallback(model, dataset, read_pool(data_args.candidate_pool), data_args.hn_refresh_steps,
                                    range_for_sampling=parse_range(data_args.range_for_sampling),
                                    negative_number=data_args.hn_negative_number, seed=args.seed,
                                    false_negatives=rules if rules.uses_positive_scores else None)]


def train(model, model_args, data_args, args: EmbedTrainingArguments) -> RetrievalTrainer:
    dataset, collator_cls = build_dataset(data_args, args.loss_fn)
    if len(dataset) < args.per_device_train_batch_size * max(1, args.world_size) and args.dataloader_drop_last:
        raise ValueError(f"{len(dataset)} examples are fewer than one batch "
                         f"({args.per_device_train_batch_size} x {args.world_size}) with --dataloader_drop_last")
    collator = collator_cls(model.tokenizer, query_max_length=model_args.query_max_length,
                            document_max_length=model_args.document_max_length)
    trainer = RetrievalTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                               loss_fn=build_loss(args, model, dataset),
                               callbacks=refresh_callbacks(model, dataset, data_args, args),
                               **dev_evaluation(data_args, args))
    trainer.train(resume_from_checkpoint=check_output_dir(args))
    return trainer


def encode_corpus_to_disk(model, data_dir: str, output_dir: str) -> str:
    data = load_beir(data_dir, split="test")
    ids = data.corpus_ids()
    embeddings = model.encode_corpus(data.corpus_texts(), show_progress_bar=True)
    path = os.path.join(output_dir, "corpus_embeddings.npy")
    np.save(path, embeddings.astype(np.float32))
    with open(os.path.join(output_dir, "corpus_ids.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f)
    return path


def run_embed(model_args: ModelArguments, data_args: DataArguments, args: EmbedTrainingArguments) -> Dict[str, Any]:
    """Train (``do_train``), save, encode (``do_encode``) and evaluate (``do_eval``); returns a summary."""
    set_seed(args.seed)  # random inits (LoRA's A, a projection head) equal on every rank and in every run
    model = load_model(model_args)
    model = wrap_multi_vector(model, model_args, args)
    if model_args.truncate_dim:
        model.embedding_config.truncate_dim = model_args.truncate_dim
    result: Dict[str, Any] = {}
    if args.do_train and getattr(args, "final_eval", args.do_eval) and data_args.eval_data_dir and data_args.data_name_or_path:
        data_args.data_name_or_path, result["leakage"] = check_training_file(
            data_args.data_name_or_path, data_args.eval_data_dir, data_args.eval_split,
            model if hasattr(model, "encode_queries") else None, data_args.leak_threshold,  # multi-vector: no cosine
            data_args.on_leak, data_args.query_key, data_args.positive_key, args.output_dir)
    if args.do_train:
        trainer = train(model, model_args, data_args, args)
        result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        saved = trainer.save_embedding_model(args.output_dir, merge_lora=model_args.merge_lora)  # every rank joins
        if saved is not None:  # rank 0; an unsharded copy when FSDP trained a sharded model
            model = saved
            if isinstance(trainer.train_dataset, PointwiseDataset):
                from .pointwise import save_head

                save_head(args.output_dir, trainer.loss_fn, trainer.train_dataset)
    leave_process_group()
    if not args.process_index == 0:
        return result
    if args.do_encode:
        if not data_args.eval_data_dir:
            raise ValueError("--do_encode needs --eval_data_dir (a BEIR-layout folder)")
        os.makedirs(args.output_dir, exist_ok=True)
        result["embeddings_file"] = encode_corpus_to_disk(model, data_args.eval_data_dir, args.output_dir)
    final_eval = getattr(args, "final_eval", args.do_eval)
    if final_eval and isinstance(model, MultiVectorModel):
        return evaluate_multi_vector(model, data_args, result)
    if final_eval:
        if not data_args.eval_data_dir:
            raise ValueError("--do_eval needs --eval_data_dir (a BEIR-layout folder)")
        data = load_beir(data_args.eval_data_dir, split=data_args.eval_split)
        if model_args.embedding_quantization:
            from ..evaluation.quantized_search import evaluate_quantized_retrieval

            result["metrics"] = evaluate_quantized_retrieval(
                model, data, precision=model_args.embedding_quantization,
                rescore_multiplier=model_args.rescore_multiplier, rescore_with_float=model_args.rescore_with_float,
            ).metrics
        else:
            final = evaluate_retrieval(model, data)
            result["metrics"] = final.metrics
            if data_args.report_html and args.do_train:
                from .embed_report import write_embed_report

                result["report"] = write_embed_report(
                    load_model(model_args), final, data, trainer, args.output_dir, data_args.eval_split,
                    model_args.model_name_or_path, data_args.eval_data_dir, result.get("leakage"))
        print(json.dumps(result["metrics"], indent=2))
        if args.eval_dims:
            result["metrics_by_dim"] = evaluate_dims(model, data, parse_dims(args.eval_dims))
            print(json.dumps(result["metrics_by_dim"], indent=2))
    return result


ARGUMENT_TYPES = (ModelArguments, DataArguments, EmbedTrainingArguments)


def parse_args(argv: List[str]):
    """``(ModelArguments, DataArguments, EmbedTrainingArguments)`` from command-line flags."""
    from transformers import HfArgumentParser

    return HfArgumentParser(ARGUMENT_TYPES).parse_args_into_dataclasses(args=argv)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(ARGUMENT_TYPES, run_embed, argv)


if __name__ == "__main__":
    sys.exit(main())
