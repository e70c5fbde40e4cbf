"""The README's main job (``eekernels demo``): the fused exit head on an embedded default.

The default is a BERT-base-shaped exit head (pooler 768x768 + 2-class classifier, fixed
seed, no download) applied to 512 rows of synthetic [CLS] states. For every available
backend it checks the result against the reference, then times it beside the eager torch
sequence a typical early-exit implementation runs (pooler, classifier, softmax, entropy,
compare: one kernel launch each).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from . import backends
from .ops import exit_head, exit_head_reference


def eager_exit_sequence(hidden, pooler_weight, pooler_bias, weight, bias, threshold):
    """The unfused baseline: how DeeBERT-style code decides an exit, op by op
    (``pooler_weight=None`` skips the pooler)."""
    pooled = hidden
    if pooler_weight is not None:
        pooled = torch.tanh(torch.nn.functional.linear(hidden, pooler_weight, pooler_bias))
    logits = torch.nn.functional.linear(pooled, weight, bias).float()
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * torch.log(p)).sum(dim=-1)
    return logits, entropy, entropy < threshold


def default_head(rows: int, hidden: int, classes: int, device, dtype, seed: int = 0):
    """Synthetic [CLS] states and a pooler+classifier head (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    pw = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
    pb = torch.randn(hidden, generator=g) * 0.1
    w = torch.randn(classes, hidden, generator=g) * (3.0 / math.sqrt(hidden))
    b = torch.zeros(classes)
    return [t.to(device=device, dtype=dtype) for t in (h, pw, pb, w, b)]


def _time_call(fn, repeats: int, device) -> float:
    """Median seconds per call (synchronizing on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_exit_head_demo(rows: int = 512, hidden: int = 768, classes: int = 2,
                       device: Optional[str] = None, repeats: int = 50) -> int:
    """Run the demo; returns a process exit code (0 when every backend agrees)."""
    from tqdm import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    h, pw, pb, w, b = default_head(rows, hidden, classes, dev, dtype)
    ref = exit_head_reference(h, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy", threshold=0.0)
    threshold = float(ref.score.float().median())  # half the rows exit
    ref = exit_head_reference(h, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy", threshold=threshold)
    print(f"eekernels demo: exit head for {rows} rows, H={hidden}, C={classes}, pooler, {dtype}, on {dev}")
    print(f"  entropy threshold {threshold:.4f}: {int(ref.exit.sum())}/{rows} rows exit")
    report = backends.backend_report()
    runnable = [n for n in backends.BACKENDS if report[n] == "ok" and backends._runs_on(n, dev.type)]
    for n in backends.BACKENDS:
        if n not in runnable:
            why = report[n] if report[n] != "ok" else f"cannot run on {dev.type}"
            print(f"  backend {n:7s} skipped: {why}")

    status = 0
    results = []
    eager = lambda: eager_exit_sequence(h, pw, pb, w, b, threshold)  # noqa: E731
    jobs = [("eager torch sequence", eager)] + [
        (f"exit_head[{n}]", (lambda n=n: exit_head(h, w, b, pooler_weight=pw, pooler_bias=pb,
                                                   criterion="entropy", threshold=threshold, backend=n)))
        for n in runnable
    ]
    for name, fn in tqdm(jobs, desc="timing", unit="path"):
        out = fn()
        logits, exits = (out[0], out[2]) if isinstance(out, tuple) and not hasattr(out, "logits") else (out.logits, out.exit)
        err = float((logits.float() - ref.logits).norm() / ref.logits.norm())
        agree = float((exits == ref.exit).float().mean())
        if agree < 0.99 or err > 1e-2:
            status = 1
        results.append((name, _time_call(fn, repeats, dev), err, agree))
    base = results[0][1]
    print(f"  {'path':24s} {'median us':>10s} {'vs eager':>9s} {'rel.err':>9s} {'exit agree':>10s}")
    for name, t, err, agree in results:
        print(f"  {name:24s} {t * 1e6:10.1f} {base / t:8.2f}x {err:9.2e} {agree:10.3f}")
    if dev.type == "cpu":
        print("  (CPU timings; the GPU figures live in benchmarks/NOTES.md)")
    print("OK: every backend agrees with the reference" if status == 0 else "MISMATCH: see the table above")
    return status
