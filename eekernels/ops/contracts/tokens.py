"""The token ops' contract: the registered ops' schemas, the output tuples, the fakes and the
MPEE output width.

Kept apart from ``eekernels/ops/tokens.py`` (validation, reference, dispatch) so that the
backends' modules (``eekernels/triton/tokens.py``) import the contract without importing the
dispatcher that names them."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KEEP_EPS = 1e-6  # ceil(keep_ratio * n - eps): exact products such as 0.7 * 10 stay 7


class PackedTokens(NamedTuple):
    """Active tokens of a [B, S, H] batch packed without padding (varlen layout).

    Attributes:
        values: [nnz, H], the active tokens' states, sample-major, ascending position.
        index: int64 [nnz], each packed row's flat position b*S + s in the input.
        cu_seqlens: int32 [B+1], sample b's rows are ``values[cu_seqlens[b]:cu_seqlens[b+1]]``.
        max_seqlen: the largest number of active tokens of one sample (python int).
    """

    values: torch.Tensor
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


class PaddedTokens(NamedTuple):
    """Active tokens of a [B, S, H] batch packed into [B, M, H], M = the largest count.

    Attributes:
        values: [B, M, H]; slot k < lengths[b] holds sample b's k-th active token, the
            padding slots are 0.
        index: int64 [B, M], the flat input position b*S + s of each slot, -1 for padding.
        lengths: int64 [B], active tokens per sample.
    """

    values: torch.Tensor
    index: torch.Tensor
    lengths: torch.Tensor


class PrunedTokens(NamedTuple):
    """Result of :func:`mpee_prune`: the shrunk sequence, S' = 2 + ceil(keep_ratio * (S-1)).

    Attributes:
        hidden: [B, S', H]: [CLS], the kept tokens (ascending position), the fusion token,
            padding (0).
        valid: bool [B, S'], False for padding (and for a fusion token that fused nothing).
        memory: float32 [B, S'], the class-attention memory carried with each slot.
        source: int64 [B, S'], the input position of each slot, -1 for fusion and padding.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    memory: torch.Tensor
    source: torch.Tensor


def mpee_kept_width(seq_len: int, keep_ratio: float) -> int:
    """Output width of :func:`mpee_prune` for an input of padded width ``seq_len``."""
    return 2 + math.ceil(keep_ratio * (seq_len - 1) - KEEP_EPS)


#: Schemas of the registered ops: the C++ ``eekernels::<name>`` (csrc/register.cpp, the
#: same strings) and their Triton twins ``<name>_triton``.
SCHEMAS = {
    "pack_tokens": "(Tensor hidden, Tensor active) -> "
                   "(Tensor values, Tensor index, Tensor cu_seqlens, SymInt max_seqlen)",
    "pack_tokens_padded": "(Tensor hidden, Tensor active) -> (Tensor values, Tensor index, Tensor lengths)",
    "scatter_tokens": "(Tensor(a!) hidden, Tensor index, Tensor values) -> ()",
    "mpee_prune": "(Tensor hidden, Tensor valid, Tensor memory, Tensor attention, float keep_ratio) -> "
                  "(Tensor hidden, Tensor valid, Tensor memory, Tensor source)",
}


def pack_tokens_fake(hidden, active):
    """Fake (meta) outputs of the pack_tokens ops: nnz and max_seqlen are data-dependent."""
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


def scatter_tokens_fake(hidden, index, values):
    """Fake implementation of the scatter_tokens ops (in place, no outputs)."""
    return None


def mpee_prune_fake(hidden, valid, memory, attention, keep_ratio):
    """Fake outputs of the mpee_prune ops: the width is known from S and keep_ratio."""
    b, s, h = hidden.shape
    w = mpee_kept_width(s, keep_ratio)
    return (hidden.new_empty((b, w, h)), valid.new_empty((b, w)), memory.new_empty((b, w)),
            memory.new_empty((b, w), dtype=torch.int64))
