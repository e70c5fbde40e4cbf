"""Labelled text datasets from files (GLUE-style TSV, quoted CSV, JSON lines).

:func:`read_examples` reads one file into :class:`LabelledTexts` (texts or sentence pairs,
integer labels, label names); :func:`encode` tokenizes them into padded tensors.

Formats, by extension:

- ``.tsv`` (and ``.txt``, e.g. MRPC's ``msr_paraphrase_train.txt``): a header line, then
  one example per line, fields split on TAB with **no quoting** (GLUE's own readers use
  ``quotechar=None``: sentences contain ``"``), read as ``utf-8-sig`` (MRPC starts with a BOM).
- ``.csv``: the ``csv`` module, quoted fields (IMDb), header line.
- ``.jsonl``: one JSON object per line (MNLI / SNLI).
- ``.parquet``: only where ``pyarrow`` is installed.

Columns are found automatically when not given: the label among :data:`LABEL_COLUMNS`,
the text among :data:`TEXT_COLUMNS` (sentence pairs first, so QNLI's ``question`` +
``sentence`` is a pair, not ``sentence`` alone).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["LABEL_COLUMNS", "TEXT_COLUMNS", "Encoded", "EncodedDataset", "LabelledTexts", "batches", "check_labels",
           "collate_trimmed", "encode", "encode_quietly", "load_tokenizer", "max_length_for", "read_examples"]

#: Label columns tried in order when none is given.
LABEL_COLUMNS = ("label", "Quality", "gold_label", "labels")
#: Text columns tried in order when none are given (pairs first).
TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("#1 String", "#2 String"),
    ("sentence",),
    ("text",),
)
FORMATS = (".tsv", ".txt", ".csv", ".jsonl", ".parquet")

Text = Union[str, Tuple[str, str]]


@dataclass
class LabelledTexts:
    """Examples read from one file.

    Attributes:
        texts: one string per example, or a (first, second) tuple for sentence pairs.
        labels: class indices, 0 .. len(label_names) - 1 (None for a file read without
            labels: ``read_examples(..., require_labels=False)`` of an unlabelled file).
        label_names: string labels: the sorted unique raw strings (or the names given to
            :func:`read_examples`); integer labels: ``str(i)`` for i in 0 .. max label.
        text_columns: the text column(s) used (1 or 2).
        label_column: the label column used.
        path: the file read.
    """

    texts: List[Text]
    labels: Optional[List[int]]
    label_names: List[str]
    text_columns: Tuple[str, ...]
    label_column: str
    path: str = ""
    columns: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


class Encoded(dict):
    """A dict of tensors (``input_ids``, ``attention_mask``, ``token_type_ids`` where the
    tokenizer gives them, ``labels``) with ``num_truncated``: how many examples were cut to
    ``max_length``, and ``pad_token_id``: the id the padding columns carry."""

    num_truncated: int = 0
    max_length: int = 0
    pad_token_id: int = 0


# ---------------------------------------------------------------------- reading rows
def _columns_str(cols: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in cols) if cols else "(none)"


def _check_utf8(path: str) -> None:
    """A ValueError naming the line and byte when ``path`` is not UTF-8 text."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {col}: byte 0x{data[e.start]:02x} is not UTF-8 text; "
                         f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_tsv(path: str):
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: empty file (no header line)")
    header = lines[0].split("\t")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if line == "":
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {lineno}: {len(fields)} tab-separated fields, the header has "
                             f"{len(header)} ({_columns_str(header)}); TSV fields are not quoted, so a TAB "
                             f"or newline inside a field breaks the row")
        rows.append((lineno, dict(zip(header, fields))))
    return header, rows


def _read_csv(path: str):
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise ValueError(f"{path}: empty file (no header line)")
            start = reader.line_num + 1
            for fields in reader:
                lineno, start = start, reader.line_num + 1
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise ValueError(f"{path}, line {lineno}: {len(fields)} comma-separated fields, the header "
                                     f"has {len(header)} ({_columns_str(header)})")
                rows.append((lineno, dict(zip(header, fields))))
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: malformed CSV: {e}") from None
    return header, rows


def _read_jsonl(path: str):
    header: List[str] = []
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            if not header:
                header = list(obj)
            rows.append((lineno, obj))
    if not rows:
        raise ValueError(f"{path}: empty file (no JSON lines)")
    return header, rows


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs the pyarrow package (pip install pyarrow), "
                         f"or convert the file to .tsv/.csv/.jsonl") from None
    table = pq.read_table(path)
    header = list(table.column_names)
    rows = [(i + 1, r) for i, r in enumerate(table.to_pylist())]  # "line" = row number (1-based)
    return header, rows


def _raw_label(value, path, lineno, column) -> str:
    if value is None:
        raise ValueError(f"{path}, line {lineno}: empty label in column {column!r}")
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(value).strip()
    if s == "":
        raise ValueError(f"{path}, line {lineno}: empty label in column {column!r}")
    return s


def _as_int(s: str) -> Optional[int]:
    try:
        return int(s)
    except ValueError:
        return None


def read_examples(path, text_columns: Optional[Union[str, Sequence[str]]] = None,
                  label_column: Optional[str] = None, label_names: Optional[Sequence[str]] = None,
                  require_labels: bool = True) -> LabelledTexts:
    """Read a labelled text-classification file (or, with ``require_labels=False``, one
    that may have no labels: a file without a label column, or whose labels are all -1 as
    GLUE test files mark them, comes back with ``labels=None``).

    Args:
        path: a ``.tsv`` (or TAB-separated ``.txt``), ``.csv``, ``.jsonl`` (or, with pyarrow, ``.parquet``) file.
        text_columns: one or two column names (a sequence or a comma-separated string);
            default: the first of :data:`TEXT_COLUMNS` present.
        label_column: default: the first of :data:`LABEL_COLUMNS` present.
        label_names: map labels with these names (e.g. a trained model's) instead of
            deriving them: raw label ``label_names[i]`` becomes ``i``. Integer labels that are
            not among the names are kept as integers.

    Raises:
        ValueError: missing/empty/unknown-format file, missing columns (naming the columns
            there are), an unlabeled file, a row with the wrong number of fields (its line),
            negative labels (-1 marks unlabeled rows), labels not among ``label_names``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a data file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown format {ext or '(no extension)'!r}; supported: {', '.join(FORMATS)} "
                         f"(.tsv: TAB-separated with a header line, no quoting)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    if ext != ".parquet":
        _check_utf8(path)
    reader = {".tsv": _read_tsv, ".txt": _read_tsv, ".csv": _read_csv, ".jsonl": _read_jsonl,
              ".parquet": _read_parquet}[ext]
    header, rows = reader(path)
    cols = _columns_str(header)

    # ---- columns
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in header), None)
        if label_column is None and not require_labels:
            label_column = ""
        elif label_column is None:
            raise ValueError(f"{path}: no label column (looked for {', '.join(LABEL_COLUMNS)}): this looks like an "
                             f"unlabeled (test) file; available columns: {cols}. Give --label-column if the "
                             f"labels are under another name")
    elif label_column not in header:
        raise ValueError(f"{path}: label column {label_column!r} not found; available columns: {cols}")
    if text_columns is None:
        tc = next((c for c in TEXT_COLUMNS if all(x in header for x in c)), None)
        if tc is None:
            known = "; ".join("+".join(c) for c in TEXT_COLUMNS)
            raise ValueError(f"{path}: no text column found (looked for {known}); available columns: {cols}. "
                             f"Give --text-columns")
    else:
        if isinstance(text_columns, str):
            text_columns = [c.strip() for c in text_columns.split(",") if c.strip()]
        tc = tuple(text_columns)
        if not 1 <= len(tc) <= 2:
            raise ValueError(f"{path}: give one or two text columns (a sentence or a pair), got {list(tc)}")
        missing = [c for c in tc if c not in header]
        if missing:
            raise ValueError(f"{path}: text column {', '.join(map(repr, missing))} not found; "
                             f"available columns: {cols}")
    if label_column and label_column in tc:
        raise ValueError(f"{path}: column {label_column!r} is both a text and the label column")
    if not rows:
        raise ValueError(f"{path}: no rows (only a header line)")

    # ---- rows
    texts: List[Text] = []
    raw: List[str] = []
    label_cols = (label_column,) if label_column else ()
    for lineno, row in rows:
        for c in tc + label_cols:
            if c not in row:  # JSON lines: each object has its own keys
                raise ValueError(f"{path}, line {lineno}: no field {c!r}; this row has {_columns_str(list(row))}")
        vals = []
        for c in tc:
            v = row[c]
            if v is None:
                raise ValueError(f"{path}, line {lineno}: empty text in column {c!r}")
            vals.append(str(v))
        texts.append(vals[0] if len(vals) == 1 else (vals[0], vals[1]))
        if label_column:
            raw.append(_raw_label(row[label_column], path, lineno, label_column))

    # ---- labels
    ints = [_as_int(s) for s in raw]
    all_int = all(i is not None for i in ints)
    if not require_labels and (not label_column or (all_int and all(i == -1 for i in ints))):
        return LabelledTexts(texts=texts, labels=None, label_names=[str(n) for n in label_names or []],
                             text_columns=tc, label_column=label_column, path=path, columns=list(header))
    if all_int:
        neg = [(rows[k][0], i) for k, i in enumerate(ints) if i < 0]
        if neg:
            raise ValueError(f"{path}: {len(neg)} row(s) have a negative label (first: line {neg[0][0]}, label "
                             f"{neg[0][1]}); -1 marks unlabeled (test) rows, which cannot be trained or scored")
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        if all(s in index for s in raw):
            labels = [index[s] for s in raw]
        elif all_int:
            labels = list(ints)  # integer labels kept; the caller checks them against its classes
        else:
            unknown = sorted({s for s in raw if s not in index})
            raise ValueError(f"{path}: label(s) {unknown[:10]} in column {label_column!r} are not among the "
                             f"expected labels {names}")
    elif all_int:
        labels = list(ints)
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        labels = [index[s] for s in raw]
    return LabelledTexts(texts=texts, labels=labels, label_names=names, text_columns=tc,
                         label_column=label_column, path=path, columns=list(header))


# ---------------------------------------------------------------------- tokenizing
def encode(tokenizer, examples: LabelledTexts, max_length: int = 128) -> Encoded:
    """Tokenize ``examples``: truncation to ``max_length``, padding to the longest in the set.

    Returns an :class:`Encoded` dict of tensors ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (where the tokenizer returns them) and ``labels``; its
    ``num_truncated`` says how many examples were cut (a warning is issued as well).
    """
    import torch

    if max_length < 2:
        raise ValueError(f"encode: max_length must be >= 2, got {max_length}")
    if len(examples) == 0:
        raise ValueError("encode: no examples")
    if examples.is_pair:
        first = [t[0] for t in examples.texts]
        second = [t[1] for t in examples.texts]
    else:
        first, second = list(examples.texts), None
    # Lengths before truncation (cheap with a fast tokenizer), to count what gets cut.
    full = tokenizer(first, second, truncation=False, padding=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)
    num_truncated = sum(len(ids) > max_length for ids in full["input_ids"])
    enc = tokenizer(first, second, truncation=True, max_length=max_length, padding="longest",
                    return_tensors="pt")
    out = Encoded()
    out["input_ids"] = enc["input_ids"]
    out["attention_mask"] = enc["attention_mask"]
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    if examples.labels is not None:
        out["labels"] = torch.tensor(examples.labels, dtype=torch.long)
    out.num_truncated = int(num_truncated)
    out.max_length = int(max_length)
    out.pad_token_id = int(tokenizer.pad_token_id or 0)
    if num_truncated:
        warnings.warn(f"{examples.path or 'encode'}: {num_truncated} of {len(examples)} examples are longer than "
                      f"{max_length} tokens and were truncated", UserWarning, stacklevel=2)
    return out


# ---------------------------------------------------------------------- batching
class EncodedDataset:
    """An :class:`Encoded` set as a map-style dataset of dict rows (what HF ``Trainer`` takes).

    Each row's token columns are cut to that row's own length, so HF's ``LengthGroupedSampler``
    (``train_sampling_strategy="group_by_length"``) sees the real lengths and :meth:`collate`
    pads a batch only to its longest row."""

    TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, enc: Encoded):
        self.enc = enc
        self.keys = [k for k in self.TOKEN_COLUMNS + ("labels",) if k in enc]
        self.lengths = enc["attention_mask"].sum(dim=1).clamp(min=1).tolist()
        self.collate = functools.partial(collate_trimmed, pad_token_id=getattr(enc, "pad_token_id", 0))

    def __len__(self):
        return self.enc["input_ids"].shape[0]

    def __getitem__(self, i):
        n = self.lengths[i]
        return {k: self.enc[k][i, :n] if k in self.TOKEN_COLUMNS else self.enc[k][i] for k in self.keys}


def collate_trimmed(rows, pad_token_id: int = 0):
    """Stack dict rows, the token columns padded (ids with ``pad_token_id``, mask and segment ids
    with 0) to the longest row that carries a token: dynamic padding. Rows may come cut to their
    own lengths (:class:`EncodedDataset`) or padded alike; padding columns no row uses are cut."""
    import torch

    first = rows[0]
    width = max(max(int(r["attention_mask"].sum()) for r in rows), 1)
    batch = {}
    for k in first:
        if k not in EncodedDataset.TOKEN_COLUMNS:
            batch[k] = torch.stack([r[k] for r in rows])
            continue
        fill = pad_token_id if k == "input_ids" else 0
        out = torch.full((len(rows), width), fill, dtype=first[k].dtype)
        for j, r in enumerate(rows):
            n = min(r[k].shape[0], width)
            out[j, :n] = r[k][:n]
        batch[k] = out
    return batch


def batches(enc: Encoded, batch_size: int, device=None):
    """(input_ids, attention_mask, token_type_ids) per batch of ``batch_size`` rows in order,
    on ``device``, each trimmed to its own longest row (dynamic padding)."""
    n = enc["input_ids"].shape[0]
    out = []
    for s in range(0, n, batch_size):
        mask = enc["attention_mask"][s:s + batch_size]
        width = max(int(mask.sum(dim=1).max()), 1)
        ids = enc["input_ids"][s:s + batch_size, :width].to(device)
        tt = enc.get("token_type_ids")
        tt = None if tt is None else tt[s:s + batch_size, :width].to(device)
        out.append((ids, mask[:, :width].to(device), tt))
    return out


def load_tokenizer(path: str):
    """The tokenizer saved in a local model directory (offline), or a ValueError saying what is missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, ...
        raise ValueError(f"could not load a tokenizer from {path} (it needs vocab.txt / tokenizer.json and "
                         f"tokenizer_config.json): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def max_length_for(config, requested: int, log=print) -> int:
    """``requested``, capped by what the model's position embeddings allow."""
    if requested < 2:
        raise ValueError(f"--max-length must be >= 2, got {requested}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is None:
        return requested
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        max_pos -= (getattr(config, "pad_token_id", 1) or 0) + 1  # positions start after the padding index
    if requested > max_pos:
        log(f"note: --max-length {requested} exceeds the model's {max_pos} positions; using {max_pos}")
        return max_pos
    return requested


def encode_quietly(tokenizer, examples: LabelledTexts, max_length: int, what: str, log=print) -> Encoded:
    """:func:`encode` with its truncation warning turned into one ``log`` line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = encode(tokenizer, examples, max_length=max_length)
    if enc.num_truncated:
        log(f"{what}: {enc.num_truncated} of {len(examples)} examples truncated to {max_length} tokens")
    return enc


def check_labels(labels, num_labels: int, path: str, names: Optional[List[str]] = None) -> None:
    """A ValueError when a label is outside the model's classes."""
    bad = sorted({int(x) for x in labels if not 0 <= int(x) < num_labels})
    if bad:
        known = f" ({', '.join(names)})" if names else ""
        raise ValueError(f"{path}: label(s) {bad[:10]} are outside the model's {num_labels} classes "
                         f"0..{num_labels - 1}{known}")
