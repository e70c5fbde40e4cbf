"""``eekernels env``: which backends work here, and why the others don't."""

from __future__ import annotations


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    import torch

    from .. import backends

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    for name, status in backends.backend_report().items():
        print(f"  {name:7s} {status}")
    return 0
