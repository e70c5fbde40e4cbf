"""GPU timing of the fused exit head against its floor (needs CUDA and triton).

    python benchmarks/exit_head_gpu.py --out results/   # writes exit_head_gpu.json/.csv

For each case it prints the median time (triton.testing.do_bench, CUDA events, warm) of
the eager torch sequence and of every fused GPU backend, the speed-up over eager, and the
achieved bandwidth (bytes that must move: hidden + weights read once, outputs written
once) against the device's measured copy bandwidth (a large device-to-device copy,
bytes read + written). The issue's targets: >= 4x over eager at N=512, H=768, C=2 with
pooler; >= 60% of copy bandwidth at N=65536, H=1024 without pooler.
"""

import argparse
import csv
import json
import os
import sys

import torch

import eekernels
from eekernels.demo import default_head, eager_exit_sequence
from eekernels.ops import exit_head

CASES = [
    # name, N, H, C, pooler
    ("pooler-N512-H768-C2", 512, 768, 2, True),
    ("nopooler-N65536-H1024-C2", 65536, 1024, 2, False),
    ("pooler-N128-H768-C2", 128, 768, 2, True),
    ("nopooler-N4096-H768-C3", 4096, 768, 3, False),
    ("nopooler-N8192-H1024-C1000", 8192, 1024, 1000, False),
]


def copy_bandwidth(do_bench) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far past L2
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def bytes_moved(n, h, c, pooler, elt=2):
    x = n * h * elt + c * h * elt + c * elt + (h * h * elt + h * elt if pooler else 0)
    out = n * c * 4 + n * 4 + n * 1 + n * 8
    return x + out


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
    for name, n, h, c, pooler in CASES:
        hid, pw, pb, w, b = default_head(n, h, c, "cuda", torch.float16)
        if not pooler:
            pw = pb = None
        fns = {"eager": lambda: eager_exit_sequence(hid, pw, pb, w, b, 0.4)}
        for p in providers[1:]:
            fns[p] = (lambda p=p: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb,
                                            criterion="entropy", threshold=0.4, backend=p))
        t_eager = None
        for p, fn in fns.items():
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            t_eager = ms if p == "eager" else t_eager
            nbytes = bytes_moved(n, h, c, pooler)
            flops = 2 * n * h * c + (2 * n * h * h if pooler else 0)
            rows.append(dict(gpu=gpu, case=name, provider=p, N=n, H=h, C=c, pooler=pooler,
                             median_us=ms * 1e3, speedup_vs_eager=t_eager / ms,
                             floor_us=nbytes / bw * 1e6, bandwidth_frac=nbytes / (ms * 1e-3) / bw,
                             tflops=flops / (ms * 1e-3) / 1e12))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
