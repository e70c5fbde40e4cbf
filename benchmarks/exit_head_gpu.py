"""GPU timing of the fused exit head against its floor (needs CUDA and triton).

    python benchmarks/exit_head_gpu.py --out results/   # writes exit_head_gpu.json/.csv

For each case it prints the median time (triton.testing.do_bench, CUDA events, warm) of
the eager torch sequence and of every fused GPU backend, the speed-up over eager, and the
achieved bandwidth (bytes that must move: hidden + weights read once, outputs written
once) against the device's measured copy bandwidth (a large device-to-device copy,
bytes read + written). The issue's targets: >= 4x over eager at N=512, H=768, C=2 with
pooler; >= 60% of copy bandwidth at N=65536, H=1024 without pooler.

The "policy" cases (ConsistentEE's policy network, P=32 hidden units, on the pooled state)
run at N=128 and N=512, H=768, C=2 with pooler beside the same shapes with "entropy"; the
last table prints policy time / entropy time per provider (what the policy network adds).
"""

import argparse
import csv
import json
import os
import sys

import torch

import eekernels
from eekernels.demo import default_head, default_policy, eager_exit_sequence, eager_policy_sequence
from eekernels.ops import exit_head

CASES = [
    # name, N, H, C, pooler, P (0: criterion "entropy"; else "policy" with P hidden units)
    ("pooler-N512-H768-C2", 512, 768, 2, True, 0),
    ("nopooler-N65536-H1024-C2", 65536, 1024, 2, False, 0),
    ("pooler-N128-H768-C2", 128, 768, 2, True, 0),
    ("nopooler-N4096-H768-C3", 4096, 768, 3, False, 0),
    ("nopooler-N8192-H1024-C1000", 8192, 1024, 1000, False, 0),
    ("policy-pooler-N128-H768-C2-P32", 128, 768, 2, True, 32),
    ("policy-pooler-N512-H768-C2-P32", 512, 768, 2, True, 32),
]
# policy case -> the entropy case of the same shape, for the overhead table
POLICY_VS = {"policy-pooler-N128-H768-C2-P32": "pooler-N128-H768-C2",
             "policy-pooler-N512-H768-C2-P32": "pooler-N512-H768-C2"}


def copy_bandwidth(do_bench) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far past L2
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def bytes_moved(n, h, c, pooler, p=0, elt=2):
    """Bytes that must move; the policy network adds its weights ([P, H], [P], [P], [1])."""
    x = n * h * elt + c * h * elt + c * elt + (h * h * elt + h * elt if pooler else 0)
    x += (p * h + 2 * p + 1) * elt if p else 0
    out = n * c * 4 + n * 4 + n * 1 + n * 8
    return x + out


def flops(n, h, c, pooler, p=0):
    """Multiply-adds x 2 of the dense layers (activations not counted)."""
    return 2 * n * h * c + (2 * n * h * h if pooler else 0) + (2 * n * h * p + 2 * n * p if p else 0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("exit_head_gpu: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth(do_bench)
    providers = ["eager"] + [b for b in ("triton", "cuda") if b in eekernels.available_backends()]
    rows = []
    for name, n, h, c, pooler, units in CASES:
        hid, pw, pb, w, b = default_head(n, h, c, "cuda", torch.float16)
        if not pooler:
            pw = pb = None
        if units:
            qw, qb, qo, qob = default_policy(h, units, "cuda", torch.float16)
            fns = {"eager": lambda: eager_policy_sequence(hid, pw, pb, w, b, qw, qb, qo, qob, 0.5)}
            for p in providers[1:]:
                fns[p] = (lambda p=p: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb,
                                                criterion="policy", threshold=0.5, policy_weight=qw,
                                                policy_bias=qb, policy_out_weight=qo,
                                                policy_out_bias=qob, backend=p))
        else:
            fns = {"eager": lambda: eager_exit_sequence(hid, pw, pb, w, b, 0.4)}
            for p in providers[1:]:
                fns[p] = (lambda p=p: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb,
                                                criterion="entropy", threshold=0.4, backend=p))
        t_eager = None
        for p, fn in fns.items():
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            t_eager = ms if p == "eager" else t_eager
            nbytes = bytes_moved(n, h, c, pooler, units)
            rows.append(dict(gpu=gpu, case=name, provider=p, N=n, H=h, C=c, pooler=pooler, P=units,
                             criterion="policy" if units else "entropy",
                             median_us=ms * 1e3, speedup_vs_eager=t_eager / ms,
                             floor_us=nbytes / bw * 1e6, bandwidth_frac=nbytes / (ms * 1e-3) / bw,
                             tflops=flops(n, h, c, pooler, units) / (ms * 1e-3) / 1e12))
    with open(os.path.join(args.out, "exit_head_gpu.json"), "w") as f:
        json.dump(dict(gpu=gpu, copy_bandwidth_GBps=bw / 1e9, torch=torch.__version__, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "exit_head_gpu.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"{gpu}: measured copy bandwidth {bw / 1e9:.0f} GB/s (read+write)")
    print(f"{'case':28s} {'provider':8s} {'us':>8s} {'x eager':>8s} {'floor us':>9s} {'%copy bw':>9s} {'TFLOP/s':>8s}")
    for r in rows:
        print(f"{r['case']:28s} {r['provider']:8s} {r['median_us']:8.1f} {r['speedup_vs_eager']:8.2f} "
              f"{r['floor_us']:9.1f} {100 * r['bandwidth_frac']:8.1f}% {r['tflops']:8.2f}")
    times = {(r["case"], r["provider"]): r["median_us"] for r in rows}
    print("policy network cost: policy time / entropy time at the same shape")
    for pcase, ecase in POLICY_VS.items():
        for p in providers:
            if (pcase, p) in times and (ecase, p) in times:
                tp, te = times[(pcase, p)], times[(ecase, p)]
                print(f"{pcase:32s} {p:8s} {tp:8.1f} us vs {te:8.1f} us entropy: x{tp / te:.3f} (+{tp - te:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
