"""GPU timing of the token ops against their bandwidth floor (needs CUDA and triton).

    python benchmarks/tokens_gpu.py --out results/   # writes tokens_gpu.json/.csv

For B = 128, S = 128 and 512, H = 768, float16 and an active fraction of 25/50/75%
(pack_tokens, pack_tokens_padded, scatter_tokens: that fraction of the tokens active,
random per token; mpee_prune: keep_ratio = the fraction, all tokens valid), it prints the
median time (triton.testing.do_bench, CUDA events, warm) of plain torch
(benchmarks/token_baselines.py) and of every GPU backend, the speed-up over plain torch,
and the achieved bandwidth (the bytes that must move, below) against the device's
measured copy bandwidth (a 1 GiB device-to-device copy, bytes read + written).

Bytes that must move (rows of H * 2 bytes; masks and indices are counted too):
  pack_tokens          read nnz rows + write nnz rows
  pack_tokens_padded   read nnz rows + write B * M rows (M = the longest sample)
  scatter_tokens       read nnz rows (values) + write nnz rows
  mpee_prune           read B * S rows (kept rows are copied, the others fused)
                       + write B * S' rows, S' = 2 + ceil(ratio * (S - 1))
The pack ops include their one device->host read of the counts (as plain torch's nonzero).
"""

import argparse
import csv
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eekernels  # noqa: E402
from eekernels.ops import mpee_kept_width, mpee_prune, pack_tokens, pack_tokens_padded, scatter_tokens  # noqa: E402
from token_baselines import (  # noqa: E402
    mpee_prune_torch,
    pack_tokens_padded_torch,
    pack_tokens_torch,
    scatter_tokens_torch,
)

B, H = 128, 768
SEQS = (128, 512)
FRACTIONS = (0.25, 0.5, 0.75)
OPS = ("pack_tokens", "pack_tokens_padded", "scatter_tokens", "mpee_prune")


def copy_bandwidth(do_bench) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far past L2
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def bytes_moved(op, b, s, h, nnz, longest, ratio, elt=2):
    row = h * elt
    if op == "pack_tokens":
        return 2 * nnz * row + b * s + nnz * 8 + (b + 1) * 4
    if op == "pack_tokens_padded":
        return nnz * row + b * longest * row + b * s + b * longest * 8 + b * 8
    if op == "scatter_tokens":
        return 2 * nnz * row + nnz * 8
    w = mpee_kept_width(s, ratio)
    return b * s * row + b * s * (1 + 4 + 4) + b * w * (row + 1 + 4 + 8)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tokens_gpu: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth(do_bench)
    backends = [p for p in ("triton", "cuda") if p in eekernels.available_backends()]
    rows = []
    g = torch.Generator().manual_seed(0)
    for s in SEQS:
        hidden = torch.randn(B, s, H, generator=g).to(torch.float16).cuda()
        valid = torch.ones(B, s, dtype=torch.bool, device="cuda")
        memory = torch.rand(B, s, generator=g).cuda()
        attention = torch.rand(B, s, generator=g).cuda()
        for frac in FRACTIONS:
            active = (torch.rand(B, s, generator=g) < frac).cuda()
            counts = active.sum(1)
            nnz, longest = int(counts.sum()), int(counts.max())
            index = active.reshape(-1).nonzero().reshape(-1)
            values = torch.randn(nnz, H, generator=g).to(torch.float16).cuda()
            target = hidden.clone()
            for op in OPS:
                if op == "pack_tokens":
                    fns = {"torch": lambda: pack_tokens_torch(hidden, active)}
                    fns.update({p: (lambda p=p: pack_tokens(hidden, active, backend=p)) for p in backends})
                elif op == "pack_tokens_padded":
                    fns = {"torch": lambda: pack_tokens_padded_torch(hidden, active)}
                    fns.update({p: (lambda p=p: pack_tokens_padded(hidden, active, backend=p)) for p in backends})
                elif op == "scatter_tokens":
                    fns = {"torch": lambda: scatter_tokens_torch(target, index, values)}
                    fns.update({p: (lambda p=p: scatter_tokens(target, index, values, backend=p)) for p in backends})
                else:
                    fns = {"torch": lambda: mpee_prune_torch(hidden, valid, memory, attention, frac)}
                    fns.update({p: (lambda p=p: mpee_prune(hidden, valid, memory, attention, frac, backend=p))
                                for p in backends})
                nbytes = bytes_moved(op, B, s, H, nnz, longest, frac)
                t_torch = None
                for p, fn in fns.items():
                    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                    t_torch = ms if p == "torch" else t_torch
                    rows.append(dict(gpu=gpu, op=op, provider=p, B=B, S=s, H=H, fraction=frac, nnz=nnz,
                                     median_us=ms * 1e3, speedup_vs_torch=t_torch / ms, bytes=nbytes,
                                     floor_us=nbytes / bw * 1e6, bandwidth_frac=nbytes / (ms * 1e-3) / bw))
    with open(os.path.join(args.out, "tokens_gpu.json"), "w") as f:
        json.dump(dict(gpu=gpu, copy_bandwidth_GBps=bw / 1e9, torch=torch.__version__, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "tokens_gpu.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"{gpu}: measured copy bandwidth {bw / 1e9:.0f} GB/s (read+write)")
    print(f"{'op':20s} {'S':>4s} {'frac':>5s} {'provider':8s} {'us':>8s} {'x torch':>8s} {'floor us':>9s} {'%copy bw':>9s}")
    for r in rows:
        print(f"{r['op']:20s} {r['S']:4d} {r['fraction']:5.2f} {r['provider']:8s} {r['median_us']:8.1f} "
              f"{r['speedup_vs_torch']:8.2f} {r['floor_us']:9.1f} {100 * r['bandwidth_frac']:8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
