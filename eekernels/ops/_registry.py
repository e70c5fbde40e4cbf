"""How an op module declares one of its registered ops (``torch.ops.eekernels.<name>``)."""

from __future__ import annotations

from typing import Callable

import torch

from .. import _extension
from ..backends import register_implementation


def register_op(name: str, compiled: Callable, triton: str, fake: Callable) -> None:
    """``compiled`` (a call of the C++ op, which picks its CPU or CUDA kernel from the
    tensors' device) serves the "cpu" and "cuda" backends, ``triton`` ("module:function",
    imported on first use) the "triton" backend, and ``fake`` becomes the C++ op's fake
    (meta) implementation once the extension loads, so the op traces under torch.compile."""
    register_implementation(name, ("cpu", "cuda"), compiled)
    register_implementation(name, "triton", triton)
    _extension.on_load(lambda: torch.library.register_fake(f"eekernels::{name}", fake))
