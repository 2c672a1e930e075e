"""A fixed SciFact test subset for the slow real-model tests: every judged document plus every 6th other."""

import gzip
import json
import os
import shutil


def write_scifact_subset(scifact_dir: str, out_dir: str, every: int = 6) -> str:
    """Write ``out_dir`` as a BEIR folder: the test qrels' documents and every ``every``-th other document
    (in corpus order), all queries, the test qrels. About 1,200 of SciFact's 5,183 documents."""
    judged = set()
    with open(os.path.join(scifact_dir, "qrels", "test.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            judged.add(line.split("\t")[1])
    os.makedirs(os.path.join(out_dir, "qrels"), exist_ok=True)
    with gzip.open(os.path.join(scifact_dir, "corpus.jsonl.gz"), "rt", encoding="utf-8") as f, \
            open(os.path.join(out_dir, "corpus.jsonl"), "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if json.loads(line)["_id"] in judged or i % every == 0:
                out.write(line)
    shutil.copy(os.path.join(scifact_dir, "queries.jsonl"), os.path.join(out_dir, "queries.jsonl"))
    shutil.copy(os.path.join(scifact_dir, "qrels", "test.tsv"), os.path.join(out_dir, "qrels", "test.tsv"))
    return out_dir
