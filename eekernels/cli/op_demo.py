"""``eekernels op-demo``: the fused exit head on every backend against the eager torch sequence."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=50)


def run(args) -> int:
    from ..demo import run_exit_head_demo

    return run_exit_head_demo(rows=args.rows, hidden=args.hidden, classes=args.classes, device=args.device,
                              repeats=args.repeats)
