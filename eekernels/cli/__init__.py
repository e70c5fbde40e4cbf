"""The ``eekernels`` command (also ``python -m eekernels``): one small module per subcommand.

Each subcommand module has ``add_arguments(parser)`` and ``run(args) -> exit status``;
the work itself is in the library (:mod:`eekernels.training.finetune`,
:mod:`eekernels.evaluation`, :mod:`eekernels.demo`), so Python users call the same code.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, env, eval as eval_cmd, op_demo, train

#: name -> (module, help)
COMMANDS = {
    "env": (env, "which backends work here, and why not"),
    "demo": (demo, "batched early exit on an embedded default: exits, speed-ups, wall clock"),
    "op-demo": (op_demo, "the fused exit head on every backend vs the eager torch sequence"),
    "bench": (bench, "the end-to-end benchmark (runs benchmarks/e2e.py of a source checkout)"),
    "train": (train, "fine-tune an early-exit model on a TSV/CSV/JSONL file (HF Trainer)"),
    "eval": (eval_cmd, "batched early-exit evaluation of a trained model on a labelled file"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eekernels", description="Early exit for transformer encoders that makes the "
                                                             "wall clock move.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        mod.add_arguments(sp)
        sp.set_defaults(fn=mod.run)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(COMMANDS[args.command][0], "PASS_THROUGH", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
