"""The flags of ``finetune_beir`` (the main job), read by ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..data.beir import DEV_KINDS
from ..data.corpus import EMPTY_DOCUMENTS_HELP
from ..mining.false_negatives import FalseNegativeFilter
from .check_data import ON_LEAK_HELP

LOSS_NAMES = ("infonce", "listwise_kl", "margin_mse")
DISTILLATION = ("listwise_kl", "margin_mse")


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(metadata={"help": "Base model directory"})
    data_dir: str = field(default="../shared/data/scifact", metadata={"help": "BEIR folder with train and test qrels"})
    output_dir: str = field(default="outputs/scifact-finetuned")
    epochs: float = field(default=3)
    batch_size: int = field(default=32)
    learning_rate: float = field(default=3e-5)
    temperature: float = field(default=0.05)
    train_group_size: int = field(default=2, metadata={"help": "1 positive + (n-1) mined negatives per query"})
    range_for_sampling: str = field(default="10-100")
    negative_number: int = field(default=8)
    query_max_length: int = field(default=64)
    document_max_length: int = field(default=256)
    train_document_max_length: Optional[int] = field(default=None, metadata={
        "help": "Document tokens while training (default: --document_max_length, which evaluation always uses); "
                "128 trains about 2x faster"})
    seed: int = field(default=42)
    rounds: int = field(default=1, metadata={
        "help": "Rounds of (mine with the current model -> train -> evaluate); round r > 1 mines with round r-1's model"})
    round_start: str = field(default="continue", metadata={
        "help": "Weights each round > 1 trains from: 'continue' (the previous round's) or 'base'"})
    empty_documents: str = field(default="skip", metadata={"help": EMPTY_DOCUMENTS_HELP})
    eval_on: str = field(default="test", metadata={
        "help": "'test', or 'dev': choose a recipe on a dev split carved from train, never reading the test split"})
    dev_fraction: float = field(default=0.0, metadata={
        "help": "Train queries held out as a dev split (0: none; --eval_on dev needs one), e.g. 0.2"})
    dev_kind: str = field(default="random", metadata={
        "help": "'random' (seeded sample of train queries) or 'disjoint' (no judged document shared with training)"})
    dev_seed: int = field(default=0, metadata={"help": "Seed of the dev split (the same split whatever --seed)"})
    dev_eval_steps: int = field(default=0, metadata={
        "help": "Also evaluate the dev split every N steps (0: after each round only)"})
    hn_refresh_steps: int = field(default=0, metadata={
        "help": "Online refresh: mine new negatives with the model being trained every N steps (0: off)"})
    max_positive_ratio: Optional[float] = field(default=None, metadata={
        "help": "False negatives: drop candidates scoring above this fraction of the positive's score, e.g. 0.95"})
    positive_margin: Optional[float] = field(default=None, metadata={
        "help": "False negatives: drop candidates scoring above the positive's score minus this margin"})
    teacher: Optional[str] = field(default=None, metadata={
        "help": "Cross-encoder (or bi-encoder) scoring candidates: --teacher_threshold and distillation losses"})
    teacher_threshold: Optional[float] = field(default=None, metadata={
        "help": "False negatives: drop candidates the teacher scores above this"})
    loss_fn: str = field(default="infonce", metadata={"help": f"One of {', '.join(LOSS_NAMES)} (the last two: distil "
                                                              "the teacher's scores of positive and negatives)"})
    teacher_temperature: float = field(default=1.0, metadata={"help": "Teacher score temperature of listwise_kl"})
    on_leak: str = field(default="warn", metadata={"help": ON_LEAK_HELP})
    leak_threshold: float = field(default=0.95, metadata={"help": "Base-model cosine of a near-copied query"})
    no_labels: bool = field(default=False, metadata={
        "help": "Adapt without labelled queries: train on queries a local LM writes for the documents (the train "
                "qrels are never read); see --generator, --synthetic_dir"})
    synthetic_dir: Optional[str] = field(default=None, metadata={
        "help": "--no_labels: folder of the synthetic queries (a finished one is reused, a killed one resumed; "
                "default OUTPUT_DIR/synthetic)"})
    generator: str = field(default="smollm2", metadata={"help": "--no_labels: a causal/seq2seq LM folder, a .gguf "
                                                                 "file, or smollm2 (packaged)"})
    synthetic_template: str = field(default="question", metadata={"help": "--no_labels: question, claim or keyword"})
    queries_per_document: int = field(default=3, metadata={"help": "--no_labels: queries generated per document"})
    synthetic_documents: Optional[int] = field(default=None, metadata={
        "help": "--no_labels: generate for the first N documents only (generation is most of the time on a CPU)"})
    consistency_top_k: int = field(default=20, metadata={
        "help": "--no_labels: keep a synthetic query when the base model finds its document in this top-k (0: off)"})
    embedding_cache: Optional[str] = field(default=None, metadata={
        "help": "Folder keeping the base model's corpus vectors, keyed by the model's fingerprint, the texts and "
                "the precision: the next run with the same model and corpus reads them instead of encoding"})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.round_start not in ("continue", "base"):
            raise ValueError(f"--round_start must be 'continue' or 'base', got {self.round_start!r}")
        if self.eval_on not in ("test", "dev"):
            raise ValueError(f"--eval_on must be 'test' or 'dev', got {self.eval_on!r}")
        if self.eval_on == "dev" and not self.dev_fraction:
            raise ValueError("--eval_on dev needs a dev split: --dev_fraction, e.g. 0.2")
        if self.dev_kind not in DEV_KINDS:
            raise ValueError(f"--dev_kind must be one of {', '.join(DEV_KINDS)}, got {self.dev_kind!r}")
        if self.loss_fn not in LOSS_NAMES:
            raise ValueError(f"Unknown --loss_fn {self.loss_fn!r}; valid: {', '.join(LOSS_NAMES)}")
        if (self.loss_fn in DISTILLATION or self.teacher_threshold is not None) and not self.teacher:
            raise ValueError(f"--loss_fn {self.loss_fn} and --teacher_threshold need --teacher (a cross-encoder, "
                             "e.g. trained with `retrievals rerank`)")
        if self.loss_fn in DISTILLATION and (self.hn_refresh_steps or self.train_group_size < 2):
            raise ValueError(f"--loss_fn {self.loss_fn} distils scores of mined negatives: it needs "
                             "--train_group_size >= 2 and cannot take --hn_refresh_steps (refreshed negatives "
                             "have no teacher scores)")

        if self.no_labels:
            from ..synthesis.templates import get_template

            get_template(self.synthetic_template)
            if self.queries_per_document < 1:
                raise ValueError(f"--queries_per_document must be >= 1, got {self.queries_per_document}")

    @property
    def train_length(self) -> int:
        return self.train_document_max_length or self.document_max_length

    def rules(self) -> Optional[FalseNegativeFilter]:
        rules = FalseNegativeFilter(self.max_positive_ratio, self.positive_margin, self.teacher_threshold)
        return rules if rules.uses_positive_scores or rules.uses_teacher else None
