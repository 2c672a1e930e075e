"""Unsupervised contrastive pre-training on a raw corpus (Contriever / E5 / unsupervised SimCSE style).

    python -m retrievals.pipelines.pretrain --model_name_or_path MODEL --corpus corpus.jsonl.gz \\
        --output_dir OUT --pair_strategy crop --crop_min_ratio 0.1 --crop_max_ratio 0.5 \\
        --max_steps 1000 --per_device_train_batch_size 64 --learning_rate 1e-5 --temperature 0.05

Pairs come from the documents themselves (:mod:`retrievals.data.pretrain`), streamed
(:mod:`retrievals.data.pretrain_stream`), trained with in-batch InfoNCE by ``RetrievalTrainer``;
``--max_steps`` is required (the stream has no end). Checkpoints and resume are the Trainer's; a
resumed run continues the pair stream where the checkpoint left it.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Any, Dict, List, Optional

from transformers.trainer_utils import set_seed

from ..data.collators import PairCollator
from ..data.corpus import CorpusOptions
from ..data.pretrain import CropBounds, check_strategy
from ..data.pretrain_stream import PretrainPairs, StreamPositionCallback, is_plain_text, scan_corpus
from ..trainer import RetrievalTrainer
from .arguments import EmbedTrainingArguments, ModelArguments, PretrainArguments
from .cli import leave_process_group, run_cli
from .embed import build_loss, check_output_dir, load_model

logger = logging.getLogger(__name__)

PRETRAIN_LOSSES = ("infonce", "simcse")


def check_arguments(pretrain_args: PretrainArguments, args: EmbedTrainingArguments) -> None:
    check_strategy(pretrain_args.pair_strategy)
    CropBounds(pretrain_args.crop_min_ratio, pretrain_args.crop_max_ratio)
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError("--max_steps is required: the pair stream has no end (e.g. --max_steps 1000)")
    if args.loss_fn.lower() not in PRETRAIN_LOSSES:
        raise ValueError(f"--loss_fn {args.loss_fn} needs labelled data; pre-training uses one of "
                         f"{', '.join(PRETRAIN_LOSSES)} (in-batch negatives)")
    if not args.use_inbatch_negative:
        raise ValueError("pre-training pairs have no hard negatives: keep --use_inbatch_negative true")
    if args.eval_strategy != "no":
        raise ValueError("pre-training has no dev data: evaluate the saved model with retrievals.pipelines.eval")


def corpus_summary(pretrain_args: PretrainArguments, options: CorpusOptions) -> Optional[Dict[str, int]]:
    """``--scan_corpus``: the corpus counts, logged (and a malformed record fails before training)."""
    if not pretrain_args.scan_corpus:
        return None
    counts = scan_corpus(pretrain_args.corpus, options)
    logger.info("corpus %s: %d documents; %d empty skipped, %d invalid skipped; %d with a title and a body",
                pretrain_args.corpus, counts["documents"], counts["empty"], counts["invalid"], counts["titled"])
    if not counts["documents"]:
        raise ValueError(f"{pretrain_args.corpus}: no non-empty documents to make pairs from")
    untitled = counts["documents"] - counts["titled"]
    if pretrain_args.pair_strategy == "title_body" and untitled:
        logger.warning("title_body: %d of %d documents lack a title or a body; they are cropped instead",
                       untitled, counts["documents"])
    return counts


def run_pretrain(model_args: ModelArguments, pretrain_args: PretrainArguments,
                 args: EmbedTrainingArguments) -> Dict[str, Any]:
    """Pre-train ``model_args.model_name_or_path`` on pairs from ``pretrain_args.corpus`` for
    ``args.max_steps`` steps, save it in ``args.output_dir``; returns the corpus counts and the losses."""
    check_arguments(pretrain_args, args)
    args.do_train = True
    options = CorpusOptions(skip_invalid=pretrain_args.skip_invalid)
    if is_plain_text(pretrain_args.corpus) and pretrain_args.pair_strategy == "title_body":
        logger.warning("title_body on a plain-text corpus: no document has a title, every pair is cropped")
    counts = corpus_summary(pretrain_args, options)
    set_seed(args.seed)  # random inits (LoRA's A) equal on every rank and in every run
    model = load_model(model_args)
    dataset = PretrainPairs(pretrain_args.corpus, strategy=pretrain_args.pair_strategy,
                            bounds=CropBounds(pretrain_args.crop_min_ratio, pretrain_args.crop_max_ratio),
                            seed=args.seed, shuffle_buffer=pretrain_args.shuffle_buffer,
                            batch_size=args.per_device_train_batch_size, options=options)
    query_max_length = model_args.query_max_length
    if pretrain_args.pair_strategy == "dropout" and query_max_length != model_args.document_max_length:
        logger.info("dropout pairs: both views truncated at --document_max_length %d", model_args.document_max_length)
        query_max_length = model_args.document_max_length
    collator = PairCollator(model.tokenizer, query_max_length=query_max_length,
                            document_max_length=model_args.document_max_length)
    resume = check_output_dir(args)
    # The stream skips the consumed examples itself (no pairs built, nothing tokenized); the Trainer must not
    # skip batches too. --ignore_data_skip keeps its meaning: a resumed run starts the stream from the top.
    follow_stream = not args.ignore_data_skip
    args.ignore_data_skip = True
    position = StreamPositionCallback(dataset)
    trainer = RetrievalTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                               loss_fn=build_loss(args), callbacks=[position] if follow_stream else [])
    if resume and follow_stream:
        position.restore_rng = partial(trainer._load_rng_state, resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_embedding_model(args.output_dir, merge_lora=model_args.merge_lora)  # every rank joins
    leave_process_group()
    return {"corpus": counts, "steps": trainer.state.global_step,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


ARGUMENT_TYPES = (ModelArguments, PretrainArguments, EmbedTrainingArguments)


def parse_args(argv: List[str]):
    """``(ModelArguments, PretrainArguments, EmbedTrainingArguments)`` from command-line flags."""
    from transformers import HfArgumentParser

    return HfArgumentParser(ARGUMENT_TYPES).parse_args_into_dataclasses(args=argv)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(ARGUMENT_TYPES, run_pretrain, argv)


if __name__ == "__main__":
    sys.exit(main())
