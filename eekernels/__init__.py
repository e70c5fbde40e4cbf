"""eekernels: early exit for transformer encoders that makes the wall clock move.

Kernels (C++ CPU, Triton, CUDA) for the fused exit head and friends, chosen per call
through a small backend registry::

    import eekernels
    eekernels.available_backends()        # e.g. ['torch', 'cpu']
    out = eekernels.ops.exit_head(cls_states, clf.weight, clf.bias,
                                  criterion="entropy", threshold=0.3)
    out.logits, out.score, out.exit, out.pred

See README.md and DESIGN.md for the layout and the op contracts.
"""

from . import ops
from .backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_report,
    get_backend,
    set_backend,
)

__version__ = "0.1.0"


def load(path: str, **hf_kwargs):
    """Load a model of any method from a directory its ``save_pretrained`` wrote."""
    from .methods.registry import load_model

    return load_model(path, **hf_kwargs)[0]


def __getattr__(name):
    # The HF integration imports transformers: load it only when asked for.
    if name in ("convert", "EarlyExitModel"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'eekernels' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "EarlyExitModel",
    "available_backends",
    "backend_report",
    "convert",
    "get_backend",
    "load",
    "ops",
    "set_backend",
]
