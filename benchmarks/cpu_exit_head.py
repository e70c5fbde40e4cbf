"""The fused C++ exit head against the eager torch sequence on CPU, over a grid of sizes.

    python benchmarks/cpu_exit_head.py --out benchmarks/results/cpu_exit_head [--threads 2] [--quick]
    python benchmarks/cpu_exit_head.py --pooling mean --out DIR [--threads 1] [--quick]

For each N (rows), H (hidden), C (classes), with and without the pooler, and criterion
(entropy, patience, policy with P = 32 units) it times the eager sequence (pooler
linear + tanh, classifier linear, softmax, the criterion's statistic, argmax, compare) and
``exit_head(..., backend="cpu")`` in one process, alternating the two call by call, and
reports eager / fused (> 1: fused is faster) of the minimum and of the median times. Writes
``cpu_exit_head.csv`` and ``cpu_exit_head.json`` (the table, threads, torch version).

``--pooling mean``: the exit reads the masked mean of a layer's token states [N, S, H]
(H = 384, C = 2, pooler, entropy; N in 1, 8, 32, 128 and S in 25, 64 tokens, each row
1 to S real tokens, the rest padding): the eager sequence is
``layer_summary(states, valid, "mean")`` then the one above, the fused path
``exit_head(states, ..., pooling="mean", token_mask=valid, backend="cpu")``, and a third
path timed in the same rounds, what the models ran before the op took the mean
(``layer_summary`` then the fused head on [N, H]: ``before_*`` columns, before / fused).
Writes ``cpu_exit_head_mean.csv`` / ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_rows  # noqa: E402
from eekernels._atomic import write_json, write_text  # noqa: E402
from eekernels.demo import default_head, default_policy, eager_exit_sequence, eager_policy_sequence  # noqa: E402
from eekernels.nn import layer_summary  # noqa: E402
from eekernels.ops import exit_head  # noqa: E402

POLICY_UNITS = 32
CPU = torch.device("cpu")


def eager_patience_sequence(hidden, pooler_weight, pooler_bias, weight, bias, prev_pred, counter, threshold):
    """The unfused PABEE step, op by op: pooler, classifier, argmax, counter update, compare."""
    pooled = hidden
    if pooler_weight is not None:
        pooled = torch.tanh(torch.nn.functional.linear(hidden, pooler_weight, pooler_bias))
    logits = torch.nn.functional.linear(pooled, weight, bias).float()
    pred = logits.argmax(dim=-1)
    new_counter = torch.where(pred == prev_pred, counter + 1, torch.zeros_like(counter))
    return logits, new_counter, new_counter >= threshold


def paths(n, h, c, pooler, criterion):
    """(eager, fused) callables for one grid point."""
    hid, pw, pb, w, b = default_head(n, h, c, CPU, torch.float32)
    if not pooler:
        pw = pb = None
    if criterion == "policy":
        qw, qb, qo, qob = default_policy(h, POLICY_UNITS, CPU, torch.float32)
        return (lambda: eager_policy_sequence(hid, pw, pb, w, b, qw, qb, qo, qob, 0.5),
                lambda: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="policy",
                                  policy_weight=qw, policy_bias=qb, policy_out_weight=qo,
                                  policy_out_bias=qob, backend="cpu"))
    if criterion == "patience":
        prev = torch.zeros(n, dtype=torch.long)
        cnt = torch.ones(n, dtype=torch.int32)
        return (lambda: eager_patience_sequence(hid, pw, pb, w, b, prev, cnt, 2),
                lambda: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="patience",
                                  threshold=2, prev_pred=prev, counter=cnt, backend="cpu"))
    return (lambda: eager_exit_sequence(hid, pw, pb, w, b, 0.4),
            lambda: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy",
                              threshold=0.4, backend="cpu"))


def mean_paths(n, s, h, c):
    """(eager, fused, before) callables of a mean-pooled exit over token states [n, s, h]
    with ragged padding (each row 1..s real tokens), pooler and entropy. ``before``: what
    the models ran before the op took the mean (layer_summary, then the fused head on [n, h])."""
    _, pw, pb, w, b = default_head(n, h, c, CPU, torch.float32)
    g = torch.Generator().manual_seed(n * 1000 + s)
    states = torch.randn(n, s, h, generator=g)
    lengths = torch.randint(1, s + 1, (n,), generator=g)
    valid = torch.arange(s)[None] < lengths[:, None]
    head = dict(pooler_weight=pw, pooler_bias=pb, criterion="entropy", threshold=0.4, backend="cpu")
    return (lambda: eager_exit_sequence(layer_summary(states, valid, "mean"), pw, pb, w, b, 0.4),
            lambda: exit_head(states, w, b, pooling="mean", token_mask=valid, **head),
            lambda: exit_head(layer_summary(states, valid, "mean"), w, b, **head))


def measure(eager, fused, calls: int, before=None) -> dict:
    """Seconds per call of each path, the paths alternating call by call (``calls`` each).

    On a shared machine most samples are inflated by other processes (and two OpenMP
    threads on oversubscribed cores stall at barriers), so the minimum is reported beside
    the median: the least disturbed call of each path, measured in the same moments.
    ``before`` (optional) is a third path, timed in the same rounds: before / fused."""
    te, tf, tb = [], [], []
    fns = [(eager, te), (fused, tf)] + ([(before, tb)] if before is not None else [])
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for fn, _ in fns:
                fn()
        for _ in range(calls):
            for fn, out in fns:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    row = dict(eager_min_us=min(te) * 1e6, fused_min_us=min(tf) * 1e6, ratio_min=min(te) / min(tf),
               eager_med_us=statistics.median(te) * 1e6, fused_med_us=statistics.median(tf) * 1e6,
               ratio_med=statistics.median(te) / statistics.median(tf))
    if before is not None:
        row.update(before_min_us=min(tb) * 1e6, before_ratio_min=min(tb) / min(tf),
                   before_ratio_med=statistics.median(tb) / statistics.median(tf))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for cpu_exit_head.csv / .json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20, help="fewest timed calls of each path per point")
    ap.add_argument("--quick", action="store_true", help="a few small sizes, 2 rounds (a smoke run)")
    ap.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                    help="mean: the exit reads the masked mean of [N, S, 384] token states (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls_min = 5 if args.quick else args.calls
    rows = []
    if args.pooling == "mean":
        grid = list(itertools.product((1, 8) if args.quick else (1, 8, 32, 128), (25, 64), (384,), (2,)))
        for n, s, h, c in tqdm(grid, desc="mean-pooled exit head grid", unit="point"):
            eager, fused, before = mean_paths(n, s, h, c)
            calls = max(calls_min, min(400, int(0.15 / max(1e-6, _one_call(eager)))))
            rows.append(dict(N=n, S=s, H=h, C=c, pooler=True, criterion="entropy", pooling="mean",
                             **measure(eager, fused, calls, before)))
    else:
        ns, hs, cs = ((1, 64), (384,), (2, 1000)) if args.quick else ((1, 4, 16, 64, 256, 1024), (384, 768),
                                                                      (2, 3, 1000))
        grid = list(itertools.product(ns, hs, cs, (True, False), ("entropy", "patience", "policy")))
        for n, h, c, pooler, crit in tqdm(grid, desc="exit head grid", unit="point"):
            eager, fused = paths(n, h, c, pooler, crit)
            # about 0.3 s per point: fewer calls where one call is long
            calls = max(calls_min, min(400, int(0.15 / max(1e-6, _one_call(eager)))))
            rows.append(dict(N=n, H=h, C=c, pooler=pooler, criterion=crit, **measure(eager, fused, calls)))
    print_rows(rows)
    slower = [r for r in rows if r["ratio_min"] < 1.0]
    print(f"fused slower than eager (by minimum times) at {len(slower)} of {len(rows)} points; "
          f"lowest ratio {min(r['ratio_min'] for r in rows):.2f}x")
    os.makedirs(args.out, exist_ok=True)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
    name = "cpu_exit_head" if args.pooling == "cls" else "cpu_exit_head_mean"
    write_text(os.path.join(args.out, f"{name}.csv"), buf.getvalue())
    write_json(os.path.join(args.out, f"{name}.json"),
               dict(threads=args.threads, calls_min=calls_min, torch=torch.__version__, pooling=args.pooling,
                    rows=rows))
    return 0


def _one_call(fn) -> float:
    with torch.no_grad():
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
