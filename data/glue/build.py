"""Rebuild the shipped GLUE subsets from the TSV copies listed in data/glue/README.md.

Usage: python data/glue/build.py /path/to/shared/data/glue
Writes <task>/{train,validation}.jsonl in the Hugging Face `glue` schema (same column names and label ids).
"""
import csv
import json
import random
import sys
from pathlib import Path


OUT = Path(__file__).resolve().parent
SST2_TRAIN_ROWS = 4000  # seeded sample of the 67,349 training sentences; all other splits are complete
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def read_tsv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_jsonl(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for idx, row in enumerate(rows):
            f.write(json.dumps({**row, "idx": idx}, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(OUT)}: {len(rows)} rows")


def main(src):
    src = Path(src)
    sst2_train = read_tsv(src / "SST-2/train.tsv")
    random.Random(0).shuffle(sst2_train)
    for split, rows in (("train", sst2_train[:SST2_TRAIN_ROWS]), ("validation", read_tsv(src / "SST-2/dev.tsv"))):
        write_jsonl([{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in rows], OUT / f"sst2/{split}.jsonl")
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = read_tsv(src / "MRPC" / name)
        write_jsonl(
            [{"sentence1": r["#1 String"], "sentence2": r["#2 String"], "label": int(r["Quality"])} for r in rows],
            OUT / f"mrpc/{split}.jsonl",
        )
        rows = read_tsv(src / "RTE" / name)
        write_jsonl(
            [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": RTE_LABELS[r["label"]]} for r in rows],
            OUT / f"rte/{split}.jsonl",
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/glue")
