"""A tiny text task in files for the train / eval commands and the recipes: a tiny WordPiece
vocabulary, a 4-layer BERT, sentiment-like TSV/CSV files and an NLI-like JSONL pair task."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

FILLERS = ["the", "a", "movie", "film", "plot", "was", "is", "very", "quite", "story", "actor", "scene", "and",
           "it", "this", "that", "of", "with", "music", "ending"]
WORDS = ["good", "bad", "yes", "no", "maybe"] + FILLERS
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", '"'] + WORDS
N_LAYERS = 4


# ---------------------------------------------------------------------- fixtures
def make_tokenizer(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    # transformers 5: the vocabulary file is the ``vocab`` argument (``vocab_file=`` is ignored).
    return transformers.BertTokenizerFast(vocab=str(d / "vocab.txt"))


def tiny_config(num_labels=2):
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                   intermediate_size=48, vocab_size=len(VOCAB), max_position_embeddings=64,
                                   num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def sentiment_rows(n, seed):
    """Label 1 iff the review's first word is "good"; learnable by layer 1."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.randint(0, 1)
        words = [("good" if lab else "bad")] + [rng.choice(FILLERS) for _ in range(rng.randint(2, 7))]
        rows.append((" ".join(words), lab))
    return rows


def write_tsv(path: Path, header, rows, bom=False):
    text = "\t".join(header) + "\n" + "".join("\t".join(str(x) for x in r) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def nli_rows(n, seed):
    rng = random.Random(seed)
    names = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}
    out = []
    for _ in range(n):
        key = rng.choice(sorted(names))
        out.append({"premise": " ".join(rng.choice(FILLERS) for _ in range(rng.randint(2, 6))),
                    "hypothesis": key + " " + " ".join(rng.choice(FILLERS) for _ in range(rng.randint(1, 4))),
                    "label": names[key]})
    return out


def make_files(d: Path) -> dict:
    """A tiny learnable text task in files: a tokenizer, a plain HF classifier and a base
    encoder to start from, TSV / CSV / JSONL train and dev files."""
    torch.manual_seed(0)
    tok = make_tokenizer(d / "vocab")
    clf = d / "tiny-clf"  # a plain HF classifier: what `train` starts from
    transformers.BertForSequenceClassification(tiny_config()).save_pretrained(clf)
    tok.save_pretrained(clf)
    base = d / "tiny-base"  # a base encoder (no classification head)
    transformers.BertModel(tiny_config()).save_pretrained(base)
    tok.save_pretrained(base)
    f = {"dir": d, "clf": clf, "base": base}
    f["train"] = write_tsv(d / "train.tsv", ["sentence", "label"], sentiment_rows(192, 1))
    f["dev"] = write_tsv(d / "dev.tsv", ["sentence", "label"], sentiment_rows(64, 2), bom=True)
    with open(d / "dev.csv", "w", newline="", encoding="utf-8") as fh:  # quoted CSV, string labels
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for s, lab in sentiment_rows(40, 3):
            w.writerow([s + ', "quoted", with commas', "pos" if lab else "neg"])
    f["csv"] = d / "dev.csv"
    for name, n, seed in (("nli_train", 150, 4), ("nli_dev", 45, 5)):
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in nli_rows(n, seed)))
        f[name] = p
    return f
