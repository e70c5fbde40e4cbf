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
    from .demo import run_exit_head_demo

    return run_exit_head_demo(rows=args.rows, hidden=args.hidden, classes=args.classes,
                              device=args.device, repeats=args.repeats)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eekernels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="which backends work here, and why not")
    e.set_defaults(fn=_cmd_env)
    d = sub.add_parser("demo", help="run the fused exit head on every backend on an embedded default and time it")
    d.add_argument("--rows", type=int, default=512)
    d.add_argument("--hidden", type=int, default=768)
    d.add_argument("--classes", type=int, default=2)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--repeats", type=int, default=50)
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
