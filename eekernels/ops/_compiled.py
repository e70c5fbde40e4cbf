"""Python side of the compiled ops in ``eekernels._C``: calling them, and their fake
(meta) implementations so they trace under ``torch.compile`` and CUDA-graph capture.

The same op serves the "cpu" and "cuda" backends: the dispatcher picks the CPU or CUDA
kernel from the tensors' device.
"""

from __future__ import annotations

import torch

from .compaction import CompactedRows
from .exit_head import CRITERIA, ExitHeadOutput, exit_head_empty_outputs
from .tokens import PackedTokens, PaddedTokens, PrunedTokens, mpee_kept_width

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

    @torch.library.register_fake("eekernels::pack_tokens")
    def _pack_tokens_fake(hidden, active):
        return pack_tokens_fake(hidden, active)

    @torch.library.register_fake("eekernels::pack_tokens_padded")
    def _pack_tokens_padded_fake(hidden, active):
        return pack_tokens_padded_fake(hidden, active)

    @torch.library.register_fake("eekernels::scatter_tokens")
    def _scatter_tokens_fake(hidden, index, values):
        return None

    @torch.library.register_fake("eekernels::mpee_prune")
    def _mpee_prune_fake(hidden, valid, memory, attention, keep_ratio):
        return mpee_prune_fake(hidden, valid, memory, attention, keep_ratio)

    _fakes_registered = True


def pack_tokens_fake(hidden, active):
    """Fake outputs of the pack_tokens ops (C++ and Triton): nnz and max_seqlen are
    data-dependent sizes."""
    ctx = torch.library.get_ctx()
    nnz, max_seqlen = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    b, _, h = hidden.shape
    return (hidden.new_empty((nnz, h)), hidden.new_empty((nnz,), dtype=torch.int64),
            hidden.new_empty((b + 1,), dtype=torch.int32), max_seqlen)


def pack_tokens_padded_fake(hidden, active):
    """Fake outputs of the pack_tokens_padded ops: the padded width M is data-dependent."""
    m = torch.library.get_ctx().new_dynamic_size()
    b, _, h = hidden.shape
    return (hidden.new_empty((b, m, h)), hidden.new_empty((b, m), dtype=torch.int64),
            hidden.new_empty((b,), dtype=torch.int64))


def mpee_prune_fake(hidden, valid, memory, attention, keep_ratio):
    """Fake outputs of the mpee_prune ops: the width is known from S and keep_ratio."""
    b, s, h = hidden.shape
    w = mpee_kept_width(s, keep_ratio)
    return (hidden.new_empty((b, w, h)), valid.new_empty((b, w)), memory.new_empty((b, w)),
            memory.new_empty((b, w), dtype=torch.int64))


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


def pack_tokens_compiled(hidden, active) -> PackedTokens:
    """pack_tokens through ``torch.ops.eekernels.pack_tokens`` (C++ CPU or CUDA kernel)."""
    return PackedTokens(*torch.ops.eekernels.pack_tokens(hidden, active))


def pack_tokens_padded_compiled(hidden, active) -> PaddedTokens:
    """pack_tokens_padded through ``torch.ops.eekernels.pack_tokens_padded`` (C++ CPU or CUDA)."""
    return PaddedTokens(*torch.ops.eekernels.pack_tokens_padded(hidden, active))


def scatter_tokens_compiled(hidden, index, values) -> torch.Tensor:
    """scatter_tokens through ``torch.ops.eekernels.scatter_tokens`` (in place; returns hidden)."""
    torch.ops.eekernels.scatter_tokens(hidden, index, values)
    return hidden


def mpee_prune_compiled(hidden, valid, memory, attention, keep_ratio) -> PrunedTokens:
    """mpee_prune through ``torch.ops.eekernels.mpee_prune`` (C++ CPU or fused CUDA kernel)."""
    return PrunedTokens(*torch.ops.eekernels.mpee_prune(hidden, valid, memory, attention, float(keep_ratio)))
