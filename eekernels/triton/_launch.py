"""Host-side helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

_NO_GUARD = contextlib.nullcontext()


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): Triton block sizes."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def device_guard(dev: torch.device):
    """Triton launches on the current device; switch only when the tensors live elsewhere."""
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return _NO_GUARD


def opaque_launcher(name: str, launch: Callable, schema: str, fake: Callable, mutates_args=()) -> Callable:
    """``launch`` called directly in eager mode (no dispatcher overhead) and, under
    torch.compile, through the custom op ``eekernels::<name>`` (defined once per process,
    with ``fake``), which Dynamo/Inductor treat as opaque and CUDA graphs can capture."""
    try:
        op = getattr(torch.ops.eekernels, name)
    except (AttributeError, RuntimeError):
        torch.library.custom_op(f"eekernels::{name}", launch, mutates_args=mutates_args,
                                schema=schema).register_fake(fake)
        op = getattr(torch.ops.eekernels, name)
    return lambda *args: op(*args) if torch.compiler.is_compiling() else launch(*args)
