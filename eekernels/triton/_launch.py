"""Host-side helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import contextlib

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
