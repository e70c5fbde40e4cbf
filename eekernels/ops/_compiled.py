"""Python side of the compiled ops in ``eekernels._C``: calling them, and their fake
(meta) implementations so they trace under ``torch.compile`` and CUDA-graph capture.

The same op serves the "cpu" and "cuda" backends: the dispatcher picks the CPU or CUDA
kernel from the tensors' device.
"""

from __future__ import annotations

import torch

from .compaction import CompactedRows
from .exit_head import CRITERIA, ExitHeadOutput, exit_head_empty_outputs

_fakes_registered = False


def register_fakes() -> None:
    """Register fake implementations for the ops defined in csrc/register.cpp (once)."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("eekernels::exit_head")
    def _exit_head_fake(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                        tanh_logits, criterion, threshold, prev_pred, counter, policy_weight=None,
                        policy_bias=None, policy_out_weight=None, policy_out_bias=None):
        return exit_head_empty_outputs(hidden, weight, criterion)

    @torch.library.register_fake("eekernels::compact_rows")
    def _compact_rows_fake(keep, tensors):
        m = torch.library.get_ctx().new_dynamic_size()  # survivor count: data-dependent
        index = keep.new_empty((m,), dtype=torch.int64)
        return index, [t.new_empty((m, *t.shape[1:])) for t in tensors]

    @torch.library.register_fake("eekernels::scatter_exits")
    def _scatter_exits_fake(out_logits, out_layer, batch_index, exit, logits, layer):
        return None

    _fakes_registered = True


def exit_head_compiled(hidden, weight, bias, *, pooler_weight, pooler_bias, tanh_logits, memory,
                       memory_lambda, criterion, threshold, prev_pred, counter, policy_weight=None,
                       policy_bias=None, policy_out_weight=None, policy_out_bias=None) -> ExitHeadOutput:
    """exit_head through ``torch.ops.eekernels.exit_head`` (C++ CPU or CUDA kernel)."""
    logits, score, exit_, pred, cnt = torch.ops.eekernels.exit_head(
        hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda, tanh_logits,
        CRITERIA[criterion], threshold, prev_pred, counter,
        policy_weight, policy_bias, policy_out_weight, policy_out_bias,
    )
    return ExitHeadOutput(logits, score, exit_, pred, cnt if criterion == "patience" else None)


def compact_rows_compiled(keep, tensors) -> CompactedRows:
    """compact_rows through ``torch.ops.eekernels.compact_rows`` (C++ CPU or CUDA kernel)."""
    index, rows = torch.ops.eekernels.compact_rows(keep, tensors)
    return CompactedRows(index, list(rows))


def scatter_exits_compiled(out_logits, out_layer, batch_index, exit, logits, layer) -> None:
    """scatter_exits through ``torch.ops.eekernels.scatter_exits`` (C++ CPU or CUDA kernel)."""
    torch.ops.eekernels.scatter_exits(out_logits, out_layer, batch_index, exit, logits, layer)
