"""The ``eekernels`` command (also ``python -m eekernels``)."""

from __future__ import annotations

import argparse
import sys


def _cmd_env(args) -> int:
    import torch

    from . import backends

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    for name, status in backends.backend_report().items():
        print(f"  {name:7s} {status}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_engine_demo

    return run_engine_demo(batch=args.batch, seq_len=args.seq_len, target_speedup=args.target_speedup,
                           device=args.device, repeats=args.repeats, backend=args.backend)


def _cmd_op_demo(args) -> int:
    from .demo import run_exit_head_demo

    return run_exit_head_demo(rows=args.rows, hidden=args.hidden, classes=args.classes,
                              device=args.device, repeats=args.repeats)


def _cmd_bench(args) -> int:
    from . import e2e

    return e2e.main(args)


def _cmd_train(args) -> int:
    from .train_eval import run_train

    return run_train(args)


def _cmd_eval(args) -> int:
    from .train_eval import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eekernels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="which backends work here, and why not")
    e.set_defaults(fn=_cmd_env)
    d = sub.add_parser("demo", help="batched early exit on an embedded default: exits, speed-ups, wall clock")
    d.add_argument("--batch", type=int, default=128)
    d.add_argument("--seq-len", type=int, default=64)
    d.add_argument("--target-speedup", type=float, default=2.0)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--backend", default=None)
    d.set_defaults(fn=_cmd_demo)
    o = sub.add_parser("op-demo", help="the fused exit head on every backend vs the eager torch sequence")
    o.add_argument("--rows", type=int, default=512)
    o.add_argument("--hidden", type=int, default=768)
    o.add_argument("--classes", type=int, default=2)
    o.add_argument("--device", default=None)
    o.add_argument("--repeats", type=int, default=50)
    o.set_defaults(fn=_cmd_op_demo)
    bench = sub.add_parser("bench", help="the end-to-end benchmark (GPU; --tiny for a CPU smoke run)")
    from . import e2e

    e2e.add_arguments(bench)
    bench.set_defaults(fn=_cmd_bench)
    from . import train_eval

    t = sub.add_parser("train", help="fine-tune an early-exit model on a TSV/CSV/JSONL file (HF Trainer)")
    train_eval.add_train_arguments(t)
    t.set_defaults(fn=_cmd_train)
    ev = sub.add_parser("eval", help="batched early-exit evaluation of a trained model on a labelled file")
    train_eval.add_eval_arguments(ev)
    ev.set_defaults(fn=_cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
