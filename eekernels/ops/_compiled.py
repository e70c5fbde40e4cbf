"""Python side of the compiled ops in ``eekernels._C``: calling them, and their fake
(meta) implementations so they trace under ``torch.compile`` and CUDA-graph capture.

The same op serves the "cpu" and "cuda" backends: the dispatcher picks the CPU or CUDA
kernel from the tensors' device.
"""

from __future__ import annotations

import torch

from .exit_head import CRITERIA, ExitHeadOutput

_fakes_registered = False


def register_fakes() -> None:
    """Register fake implementations for the ops defined in csrc/register.cpp (once)."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("eekernels::exit_head")
    def _exit_head_fake(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                        tanh_logits, criterion, threshold, prev_pred, counter):
        n, c = hidden.shape[0], weight.shape[0]
        new = hidden.new_empty
        return (
            new((n, c), dtype=torch.float32),
            new((n,), dtype=torch.float32),
            new((n,), dtype=torch.bool),
            new((n,), dtype=torch.int64),
            new((n if criterion == CRITERIA["patience"] else 0,), dtype=torch.int32),
        )

    _fakes_registered = True


def exit_head_compiled(hidden, weight, bias, *, pooler_weight, pooler_bias, tanh_logits, memory,
                       memory_lambda, criterion, threshold, prev_pred, counter) -> ExitHeadOutput:
    """exit_head through ``torch.ops.eekernels.exit_head`` (C++ CPU or CUDA kernel)."""
    logits, score, exit_, pred, cnt = torch.ops.eekernels.exit_head(
        hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda, tanh_logits,
        CRITERIA[criterion], threshold, prev_pred, counter,
    )
    return ExitHeadOutput(logits, score, exit_, pred, cnt if criterion == "patience" else None)
