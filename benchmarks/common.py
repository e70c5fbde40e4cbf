"""Shared pieces of the benchmark scripts: timing, random-weight models, tables."""

from __future__ import annotations

import csv
import io
import os
import statistics
import time
from typing import Callable, List

import torch

BERT_SPECIAL_IDS = (0, 100, 101, 102, 103)  # [PAD], [UNK], [CLS], [SEP], [MASK] of the BERT vocabulary


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def time_fn(fn: Callable, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call: CUDA events on GPU, perf_counter on CPU."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_bert(num_layers=12, hidden=768, heads=12, intermediate=3072, num_labels=2, max_positions=512,
                vocab_size=30522, device="cpu", dtype=torch.float32, seed=0):
    """A random-weight HF BERT classifier of the given shape (SDPA attention), eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                     intermediate_size=intermediate, num_labels=num_labels, max_position_embeddings=max_positions,
                     vocab_size=vocab_size, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg).eval().to(device=device, dtype=dtype)


def print_rows(rows: List[dict]) -> None:
    """A plain-text table of a list of flat dict rows."""
    if not rows:
        return
    keys = [k for k, v in rows[0].items() if k not in ("device", "dtype") and not isinstance(v, list)]
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max([12, len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    print("  ".join(f"{k:>{w}s}" for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(f"{v:>{w}s}" for v, w in zip(c, widths)))


def write_csv(path: str, rows: List[dict]) -> None:
    """Flat dict rows as CSV (columns: the union of keys, first-seen order), atomically."""
    from eekernels._atomic import write_text

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Save a matplotlib figure to ``path`` atomically (beside it, then rename) and close it."""
    import matplotlib.pyplot as plt

    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
