"""``eekernels demo``: the README's main job, batched early exit on an embedded default."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--target-speedup", type=float, default=2.0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default=None)


def run(args) -> int:
    from ..demo import run_engine_demo

    return run_engine_demo(batch=args.batch, seq_len=args.seq_len, target_speedup=args.target_speedup,
                           device=args.device, repeats=args.repeats, backend=args.backend)
