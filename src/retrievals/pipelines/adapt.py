"""``finetune_beir --no_labels``: adapt a model to a corpus without one labelled query. The train split's
queries and qrels are never read; a local LM writes queries for the documents (:mod:`.synthesize`, kept in
``--synthetic_dir`` and resumed there), the base model's consistency filter keeps those whose document it
finds in its top-k, and the main job trains on them as it would on labelled ones (mining, rules, a
cross-encoder teacher and ``--loss_fn margin_mse`` for pseudo-labels, rounds). A dev split, when asked
for, is carved from the synthetic queries (``--dev_kind disjoint`` keeps one document's queries together).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional, Tuple

import numpy as np

from ..data.beir import BeirDataset, load_qrels, split_queries
from ..data.jsonl import iter_jsonl, require_str
from ..synthesis.job import is_done
from .finetune_args import FinetuneArguments
from .synthesize import SynthesizeArguments, run_synthesize

logger = logging.getLogger(__name__)


def synthetic_dir(args: FinetuneArguments) -> str:
    return args.synthetic_dir or os.path.join(args.output_dir, "synthetic")


def read_synthetic(folder: str, corpus_split: BeirDataset) -> BeirDataset:
    """The synthetic queries of ``folder`` (``queries.jsonl``, ``qrels/train.tsv``) over ``corpus_split``'s
    corpus; a query whose document is not in that corpus is refused (another corpus's synthesis)."""
    qrels = load_qrels(os.path.join(folder, "qrels", "train.tsv"))
    path = os.path.join(folder, "queries.jsonl")
    queries = {str(r.get("_id")): require_str(r, "text", path, n) for n, r in iter_jsonl(path)}
    foreign = sorted({d for rels in qrels.values() for d in rels if d not in corpus_split.corpus})
    if foreign:
        raise ValueError(f"{folder}: {len(foreign)} synthetic queries name documents that are not in the corpus "
                         f"(another corpus's synthesis?), e.g. {foreign[:3]}")
    if not qrels:
        raise ValueError(f"{folder}: no synthetic query passed the filters (see synthesis.json's counts)")
    return replace(corpus_split, queries={q: queries[q] for q in qrels}, qrels=qrels)


def synthetic_splits(args: FinetuneArguments, model, corpus_split: BeirDataset, corpus_vectors: np.ndarray
                     ) -> Tuple[BeirDataset, Optional[BeirDataset]]:
    """``(train, dev)`` from synthetic queries, generating them first unless ``--synthetic_dir`` holds a
    finished synthesis (a killed one resumes). ``model`` and its ``corpus_vectors`` run the consistency filter."""
    folder = synthetic_dir(args)
    if not is_done(folder):
        syn = SynthesizeArguments(
            corpus=args.data_dir, output_dir=folder, generator=args.generator, template=args.synthetic_template,
            per_document=args.queries_per_document, max_documents=args.synthetic_documents, seed=args.seed,
            consistency_top_k=args.consistency_top_k, empty_documents=args.empty_documents)
        run_synthesize(syn, model=model, corpus_ids=corpus_split.corpus_ids(), corpus_vectors=corpus_vectors)
    else:
        logger.info("synthetic queries read from %s (a finished synthesis)", folder)
    train = read_synthetic(folder, corpus_split)
    dev = None
    if args.dev_fraction:
        train, dev = split_queries(train, args.dev_fraction, args.dev_seed, args.dev_kind)
        logger.info("dev split of the synthetic queries (%s): %d held out, %d trained on", args.dev_kind,
                    len(dev.queries), len(train.queries))
    return train, dev
