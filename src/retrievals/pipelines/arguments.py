"""Command-line flags of the ``embed`` pipeline, defined once as dataclasses for ``HfArgumentParser``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments

from ..models.precision import cpu_has_fast_bf16

logger = logging.getLogger(__name__)


def unescape(text: Optional[str]) -> Optional[str]:
    r"""Shell-quoted ``"...\nQuery: "`` arrives with a literal backslash-n; make it a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t") if text else text


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Model directory, .gguf file or hub id"})
    pooling_method: Optional[str] = field(default=None, metadata={"help": "cls, mean, last, max, weightedmean"})
    query_instruction: Optional[str] = field(default=None, metadata={"help": "Prefix for queries (\\n allowed)"})
    document_instruction: Optional[str] = field(default=None, metadata={"help": "Prefix for documents"})
    query_max_length: int = field(default=64, metadata={"help": "Query tokens (instruction included)"})
    document_max_length: int = field(default=512, metadata={"help": "Document tokens (instruction included)"})
    truncate_dim: Optional[int] = field(default=None, metadata={
        "help": "Default embedding size saved with the model (Matryoshka: encode and serve this prefix)"})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights (peft)"})
    lora_rank: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma list or all-linear"})
    merge_lora: bool = field(default=True, metadata={"help": "Save the final model with adapters merged"})
    trust_remote_code: bool = field(default=False)
    multi_vector_dim: Optional[int] = field(default=None, metadata={
        "help": "Multi-vector (ColBERT-style) model: project every token to this size (e.g. 128); train with "
                "--loss_fn maxsim; --do_eval then re-ranks the dense top-100 by maxsim"})
    quantization: Optional[str] = field(default=None, metadata={
        "help": "Weight quantisation for inference: int8 (dynamic, CPU), bnb-8bit or bnb-4bit (bitsandbytes, CUDA); "
                "int8 cannot train, bnb needs --use_lora to train"})
    embedding_quantization: Optional[str] = field(default=None, metadata={
        "help": "--do_eval searches int8 or binary corpus embeddings, then rescores the candidates"})
    rescore_multiplier: int = field(default=4, metadata={"help": "Candidates per query = 100 x this (rescoring)"})
    rescore_with_float: bool = field(default=False, metadata={
        "help": "Rescore with the float corpus embeddings instead of the quantised ones"})

    def __post_init__(self) -> None:
        self.query_instruction = unescape(self.query_instruction)
        self.document_instruction = unescape(self.document_instruction)


@dataclass
class DataArguments:
    data_name_or_path: Optional[str] = field(default=None, metadata={"help": "Training JSONL/CSV file or folder"})
    query_key: str = field(default="query")
    positive_key: str = field(default="positive")
    negative_key: str = field(default="negative")
    label_key: str = field(default="label", metadata={
        "help": "Score column for --loss_fn cosent; class label column (string or int) for --loss_fn arcface"})
    text_key: str = field(default="text", metadata={"help": "Text column of point-wise data (--loss_fn arcface)"})
    documents_key: str = field(default="documents", metadata={
        "help": "List-wise data for --loss_fn listwise_kl: records {query, documents, scores} (first document = "
                "positive); records without it are read as {query, positive, negative, pos_scores, neg_scores}"})
    scores_key: str = field(default="scores", metadata={"help": "Teacher scores of --documents_key"})
    train_group_size: int = field(default=1, metadata={"help": "1 positive + (n-1) sampled negatives per query"})
    skip_invalid: bool = field(default=False, metadata={"help": "Skip (and count) invalid records instead of failing"})
    eval_data_dir: Optional[str] = field(default=None, metadata={"help": "BEIR-layout folder for --do_eval/--do_encode"})
    eval_split: str = field(default="test")
    on_leak: str = field(default="warn", metadata={
        "help": "With --do_train --do_eval: training queries that copy an --eval_data_dir query: warn, error or "
                "drop (trains on a copy of the file without them)"})
    leak_threshold: float = field(default=0.95, metadata={"help": "Cosine (the model being trained) of a near copy"})
    report_html: bool = field(default=False, metadata={
        "help": "With --do_train --do_eval: also evaluate the base model and write report.html, the model card and "
                "the figures (as finetune_beir does)"})
    dev_data_dir: Optional[str] = field(default=None, metadata={
        "help": "BEIR-layout folder evaluated during training with --eval_strategy steps|epoch (default: "
                "--eval_data_dir); its metrics are eval_ndcg@10 ... for --metric_for_best_model ndcg@10"})
    dev_split: str = field(default="dev", metadata={"help": "qrels split of --dev_data_dir used during training"})
    pos_scores_key: str = field(default="pos_scores", metadata={
        "help": "Teacher scores of the positives (list aligned with --positive_key) for --loss_fn listwise_kl/margin_mse"})
    neg_scores_key: str = field(default="neg_scores", metadata={
        "help": "Teacher scores of the negatives (list aligned with --negative_key) for --loss_fn listwise_kl/margin_mse"})
    hn_refresh_steps: int = field(default=0, metadata={
        "help": "Every K optimizer steps re-mine each query's negatives from --candidate_pool with the current "
                "weights (online hard-negative refresh; 0 = off)"})
    candidate_pool: Optional[str] = field(default=None, metadata={
        "help": "JSONL of {_id, title, text}: the corpus --hn_refresh_steps mines from"})
    range_for_sampling: str = field(default="2-200", metadata={"help": "Ranks the refresh samples from, 'start-end'"})
    hn_negative_number: int = field(default=15, metadata={"help": "Negatives per query kept by each refresh"})
    max_positive_ratio: Optional[float] = field(default=None, metadata={
        "help": "Refresh false-negative rule: drop candidates scoring above this fraction of the positive's score"})
    positive_margin: Optional[float] = field(default=None, metadata={
        "help": "Refresh false-negative rule: drop candidates scoring above the positive's score minus this"})


@dataclass
class PretrainArguments:
    """Flags of the ``pretrain`` pipeline: the raw corpus and how pairs are made from it."""

    corpus: str = field(metadata={
        "help": "Raw corpus, read as a stream: JSONL (.jsonl, .jsonl.gz) of {_id, title, text}, Parquet, a folder of "
                "them, or plain text (.txt, .txt.gz) with one document per line"})
    pair_strategy: str = field(default="crop", metadata={
        "help": "crop (two independent random word spans of a document), title_body (title -> body; crop when a "
                "document has no title) or dropout (the same text twice, unsupervised SimCSE)"})
    crop_min_ratio: float = field(default=0.1, metadata={"help": "Shortest span, as a fraction of the document's words"})
    crop_max_ratio: float = field(default=0.5, metadata={"help": "Longest span, as a fraction of the document's words"})
    shuffle_buffer: int = field(default=10000, metadata={
        "help": "Documents held to shuffle the stream (the memory bound; 1 = file order)"})
    skip_invalid: bool = field(default=False, metadata={"help": "Skip (and count) invalid records instead of failing"})
    scan_corpus: bool = field(default=True, metadata={
        "help": "Read the corpus once before training: counts logged, a malformed record fails before step 1"})


@dataclass
class EmbedTrainingArguments(TrainingArguments):
    loss_fn: str = field(default="infonce", metadata={"help": "Loss name (see retrievals.losses.LOSSES)"})
    temperature: float = field(default=0.05)
    similarity: str = field(default="cosine", metadata={
        "help": "Scores of infonce/simcse/listwise_kl: cosine (embeddings normalised in the loss) or dot"})
    teacher_temperature: float = field(default=1.0, metadata={"help": "Teacher score temperature for listwise_kl"})
    use_inbatch_negative: bool = field(default=True)
    negatives_cross_device: bool = field(default=False, metadata={"help": "Gather documents from all ranks"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir"})
    do_encode: bool = field(default=False, metadata={"help": "Write corpus embeddings and ids of --eval_data_dir"})
    matryoshka_dims: Optional[str] = field(default=None, metadata={
        "help": "Train nested sizes, e.g. 384,256,128,64 (the loss is applied to each prefix, re-normalised)"})
    matryoshka_weights: Optional[str] = field(default=None, metadata={"help": "Weights of --matryoshka_dims (default 1 each)"})
    cached_mini_batch_size: int = field(default=0, metadata={
        "help": "Gradient cache: embed the batch in chunks of this size (0: off); same gradients, less memory"})
    memory_bank_size: int = field(default=0, metadata={
        "help": "Cross-batch negatives: keep this many recent documents as extra negatives (0: off; infonce only)"})
    arcface_scale: float = field(default=30.0, metadata={"help": "ArcFace logit scale"})
    arcface_margin: Optional[float] = field(default=None, metadata={
        "help": "Fixed ArcFace margin; unset: dynamic per-class margins from the data's class counts in "
                "[--arcface_margin_min, --arcface_margin_max] (rarer class, larger margin)"})
    arcface_margin_min: float = field(default=0.05)
    arcface_margin_max: float = field(default=0.5)
    arcface_init: str = field(default="xavier", metadata={
        "help": "ArcFace class centres at start: xavier, class_mean (each class's normalised mean embedding under "
                "the starting model) or a .safetensors/.npy file of [classes, dim] centres (e.g. a saved arcface_head)"})
    layerwise_lr_decay: Optional[float] = field(default=None, metadata={
        "help": "Layer-wise learning rates: the top layer gets --learning_rate, each layer below this factor once "
                "more, the embeddings the lowest (e.g. 0.9)"})
    head_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the loss's own parameters (ArcFace centres); default --learning_rate"})
    eval_dims: Optional[str] = field(default=None, metadata={
        "help": "--do_eval also at these embedding sizes, e.g. 384,256,128,64 (nDCG@10 per size)"})

    def __post_init__(self) -> None:
        # The Trainer turns do_eval on for any --eval_strategy; the final test evaluation runs only when asked.
        self.final_eval = bool(self.do_eval)
        self._cpu_precision()
        if self.report_to is None or self.report_to == "all":
            self.report_to = []
        super().__post_init__()

    def _cpu_precision(self) -> None:
        """Without CUDA (or with ``--use_cpu``), ``--fp16`` / ``--bf16`` mean bf16 autocast on this CPU where
        it has bf16 units, fp32 with a warning where not (emulated bf16 is ~25x slower than fp32 there): the
        seed's commands run unchanged on a CPU-only machine."""
        on_cpu = self.use_cpu or not torch.cuda.is_available()
        if not on_cpu or not (self.fp16 or self.bf16) or (self.bf16 and self.use_cpu and cpu_has_fast_bf16()):
            return
        asked = "--fp16" if self.fp16 else "--bf16"
        fast = cpu_has_fast_bf16()
        logger.warning("%s on CPU: training %s", asked, "with bf16 autocast" if fast else
                       "in fp32 (this CPU has no fast bf16 units)")
        self.fp16, self.bf16, self.use_cpu = False, fast, True

