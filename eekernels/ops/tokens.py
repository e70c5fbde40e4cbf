"""Token gather/scatter for token-level early exit (HashEE, MPEE).

A token-level method decides per token which states keep computing. The saving is only
real when the layer computes on the active tokens alone, so the active tokens of all
samples are packed, the layer runs on the pack, and the results are scattered back.

``pack_tokens(hidden, active)`` -> :class:`PackedTokens` (varlen, no padding)::

    index      = active.reshape(-1).nonzero()[:, 0]      # int64 [nnz], flat b*S + s, ascending
    values     = hidden.reshape(B*S, H)[index]           # [nnz, H]
    cu_seqlens = [0, cumsum(active.sum(1))]              # int32 [B+1]
    max_seqlen = max(active.sum(1))                      # python int

``pack_tokens_padded(hidden, active)`` -> :class:`PaddedTokens` ([B, M, H], M = max count)::

    slot k < lengths[b] of sample b holds its k-th active token (ascending position);
    index[b, k] = b*S + s for it and -1 for the padding slots, whose values are 0.

``scatter_tokens(hidden, index, values)`` (in place) writes computed rows back::

    for every j with index[j] >= 0:  hidden.reshape(B*S, H)[index[j]] = values[j]

Tokens not named in ``index`` keep their states exactly (HashEE: exited tokens still
serve as keys and values with the state of their exit layer). ``index`` may be the
varlen [nnz] or the padded [B, M] index; ``values`` is then [nnz, H] or [B, M, H].

``mpee_prune(hidden, valid, memory, attention, keep_ratio)`` -> :class:`PrunedTokens`,
MPEE's token-wise exit (mpee.txt eq. 6-8) after a pruning layer, per sample b:

- n_b = valid non-[CLS] tokens, m_b = ceil(keep_ratio * n_b) (computed as
  ``ceil(keep_ratio * n_b - 1e-6)`` so that 0.7 * 10 keeps 7), p_b = n_b - m_b;
- slot 0: the [CLS] token (position 0, always kept);
- slots 1..m_b: the m_b valid non-[CLS] tokens with the highest ``memory`` (eq. 7; ties
  to the lower position), in ascending position order;
- slot 1 + m_b: the fusion token (eq. 8), sum over the p_b other valid non-[CLS] tokens of
  ``attention[b, i] * hidden[b, i]`` (the raw, unnormalised class attention, as the public
  code); its memory is the sum of theirs; it is valid iff p_b >= 1;
- the remaining slots are padding: hidden 0, valid False, memory 0.

The output width is S' = 2 + ceil(keep_ratio * (S - 1)) from the padded width S alone, so
no host synchronisation is needed (128 -> 91 -> 65 -> 47 for keep_ratio 0.7). ``source``
[B, S'] gives each slot's input position (-1 for the fusion token and padding).

The ``*_reference`` functions below are the specification; the compiled and Triton
backends compute the same thing.

Synchronisation: ``pack_tokens`` and ``pack_tokens_padded`` read the token counts back
once (the output sizes depend on them); ``scatter_tokens`` and ``mpee_prune`` never do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends
from ._checks import FLOAT_DTYPES, check_tensor, needs_autograd
from ._registry import register_op
from .contracts.tokens import (KEEP_EPS, PackedTokens, PaddedTokens, PrunedTokens,
                               mpee_kept_width, mpee_prune_fake, pack_tokens_fake, pack_tokens_padded_fake,
                               scatter_tokens_fake)

__all__ = [
    "PackedTokens",
    "PaddedTokens",
    "PrunedTokens",
    "mpee_kept_width",
    "mpee_prune",
    "mpee_prune_differentiable",
    "mpee_prune_reference",
    "pack_tokens",
    "pack_tokens_padded",
    "pack_tokens_padded_reference",
    "pack_tokens_reference",
    "scatter_tokens",
    "scatter_tokens_reference",
]

# --------------------------------------------------------------------------- reference


def pack_tokens_reference(hidden: torch.Tensor, active: torch.Tensor) -> PackedTokens:
    """Plain-PyTorch varlen packing: the specification (syncs once on GPU)."""
    b, s, h = hidden.shape
    counts = active.sum(dim=1)
    index = active.reshape(-1).nonzero().reshape(-1)
    values = hidden.reshape(b * s, h)[index]
    cu = torch.zeros(b + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = counts.cumsum(0).to(torch.int32)
    max_seqlen = int(counts.max()) if b else 0
    return PackedTokens(values, index, cu, max_seqlen)


def pack_tokens_padded_reference(hidden: torch.Tensor, active: torch.Tensor) -> PaddedTokens:
    """Plain-PyTorch padded packing: the specification (syncs once on GPU)."""
    b, s, h = hidden.shape
    lengths = active.sum(dim=1)
    m = int(lengths.max()) if b else 0
    # Rank of each active token within its sample; inactive tokens go nowhere.
    rank = active.long().cumsum(dim=1) - 1
    index = torch.full((b, m), -1, dtype=torch.int64, device=hidden.device)
    bi, si = active.nonzero(as_tuple=True)
    index[bi, rank[bi, si]] = bi * s + si
    values = hidden.new_zeros(b, m, h)
    values[bi, rank[bi, si]] = hidden[bi, si]
    return PaddedTokens(values, index, lengths.to(torch.int64))


def scatter_tokens_reference(hidden: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch scatter of packed rows into ``hidden`` (in place): the specification."""
    b, s, h = hidden.shape
    flat_index = index.reshape(-1)
    rows = values.reshape(-1, h)
    used = flat_index >= 0
    hidden.view(b * s, h)[flat_index[used]] = rows[used].to(hidden.dtype)
    return hidden


def mpee_prune_reference(hidden: torch.Tensor, valid: torch.Tensor, memory: torch.Tensor,
                         attention: torch.Tensor, keep_ratio: float) -> PrunedTokens:
    """Plain-PyTorch MPEE token pruning + fusion (mpee.txt eq. 7-8): the specification."""
    b, s, h = hidden.shape
    width = mpee_kept_width(s, keep_ratio)
    dev = hidden.device
    out_h = hidden.new_zeros(b, width, h)
    out_valid = torch.zeros(b, width, dtype=torch.bool, device=dev)
    out_mem = torch.zeros(b, width, dtype=torch.float32, device=dev)
    out_src = torch.full((b, width), -1, dtype=torch.int64, device=dev)
    for r in range(b):
        cand = valid[r, 1:].nonzero().reshape(-1) + 1  # valid non-[CLS] positions, ascending
        n = cand.numel()
        m = math.ceil(keep_ratio * n - KEEP_EPS)
        # Highest memory first, ties to the lower position: a stable sort of -memory.
        order = torch.sort(-memory[r, cand].float(), stable=True).indices
        kept = cand[order[:m]].sort().values
        fused = cand[order[m:]]
        out_h[r, 0] = hidden[r, 0]
        out_valid[r, 0] = True
        out_mem[r, 0] = memory[r, 0]
        out_src[r, 0] = 0
        out_h[r, 1:1 + m] = hidden[r, kept]
        out_valid[r, 1:1 + m] = True
        out_mem[r, 1:1 + m] = memory[r, kept].float()
        out_src[r, 1:1 + m] = kept
        if fused.numel():
            w = attention[r, fused].float()
            out_h[r, 1 + m] = (w[:, None] * hidden[r, fused].float()).sum(0).to(hidden.dtype)
            out_valid[r, 1 + m] = True
            out_mem[r, 1 + m] = memory[r, fused].float().sum()
    return PrunedTokens(out_h, out_valid, out_mem, out_src)


def mpee_prune_differentiable(hidden: torch.Tensor, valid: torch.Tensor, memory: torch.Tensor,
                              attention: torch.Tensor, keep_ratio: float) -> PrunedTokens:
    """The same result as :func:`mpee_prune_reference`, vectorised over the batch with no
    host synchronisation (stable sorts for the ranks, a cumsum for the slots, scatters for
    the rows, a masked weighted sum for the fusion token). Differentiable in ``hidden``
    and ``attention``: the training path (the reference's per-sample loop syncs per row).
    """
    b, s, h = hidden.shape
    width = mpee_kept_width(s, keep_ratio)
    dev = hidden.device
    cand = valid.clone()
    cand[:, 0] = False  # [CLS] is kept apart
    n = cand.sum(dim=1)
    m = torch.ceil(keep_ratio * n.double() - KEEP_EPS).long()
    pos = torch.arange(s, device=dev).expand(b, s)
    # Rank = place in the reference's order: candidates first; among them memory descending,
    # NaN last, ties to the lower position. Three stable sorts, least significant key first.
    mem = memory.float()
    nan = torch.isnan(mem)
    order = torch.sort(torch.where(nan, float("-inf"), mem), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(nan.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    order = order.gather(1, torch.sort((~cand).gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, pos.contiguous())
    kept = cand & (rank < m[:, None])
    fused = cand & ~kept
    spare = width  # one extra column collects the tokens that go nowhere; cut at the end
    dest = torch.where(kept, kept.long().cumsum(dim=1), spare)
    dest[:, 0] = 0
    has_fusion = fused.any(dim=1)
    fusion_slot = torch.where(has_fusion, 1 + m, spare)[:, None]
    out_h = hidden.new_zeros(b, width + 1, h).scatter(1, dest[:, :, None].expand(b, s, h), hidden)
    weights = torch.where(fused, attention.float(), 0.0)
    fusion = torch.einsum("bs,bsh->bh", weights, hidden.float()).to(hidden.dtype)  # eq. 8
    out_h = out_h.scatter(1, fusion_slot[:, :, None].expand(b, 1, h), fusion[:, None, :])
    out_mem = mem.new_zeros(b, width + 1).scatter(1, dest, torch.where(kept | (pos == 0), mem, 0.0))
    out_mem = out_mem.scatter(1, fusion_slot, torch.where(fused, mem, 0.0).sum(dim=1, keepdim=True))
    out_valid = torch.zeros(b, width + 1, dtype=torch.bool, device=dev).scatter(1, dest, kept | (pos == 0))
    out_valid = out_valid.scatter(1, fusion_slot, has_fusion[:, None])
    out_src = torch.full((b, width + 1), -1, dtype=torch.int64, device=dev).scatter(
        1, dest, torch.where(kept | (pos == 0), pos, -1))
    out_src = out_src.scatter(1, fusion_slot, torch.full_like(fusion_slot, -1))
    return PrunedTokens(out_h[:, :width], out_valid[:, :width], out_mem[:, :width], out_src[:, :width])


# --------------------------------------------------------------------------- validation


def _check_hidden_active(op, hidden, active, active_name="active"):
    check_tensor("hidden", op, hidden, 3, FLOAT_DTYPES)
    check_tensor(active_name, op, active, 2, (torch.bool,), hidden.device)
    if tuple(active.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{op}: {active_name} must be [B, S] = {tuple(hidden.shape[:2])}, got {tuple(active.shape)}")


def validate_pack_tokens_args(hidden, active, op="pack_tokens") -> None:
    """Raise a clear TypeError/ValueError for any bad argument (never reads tensor values)."""
    _check_hidden_active(op, hidden, active)


def validate_scatter_tokens_args(hidden, index, values) -> None:
    """Raise a clear TypeError/ValueError for any bad argument (never reads tensor values)."""
    op = "scatter_tokens"
    check_tensor("hidden", op, hidden, 3, FLOAT_DTYPES)
    if not hidden.is_contiguous():
        raise ValueError(f"{op}: hidden is written in place and must be contiguous, got strides {hidden.stride()}")
    if not isinstance(index, torch.Tensor) or index.dim() not in (1, 2):
        raise ValueError(f"{op}: index must be an int64 tensor [nnz] or [B, M]")
    check_tensor("index", op, index, index.dim(), (torch.int64,), hidden.device)
    check_tensor("values", op, values, index.dim() + 1, FLOAT_DTYPES, hidden.device)
    if tuple(values.shape[:-1]) != tuple(index.shape) or values.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"{op}: values must be {tuple(index.shape) + (hidden.shape[-1],)} for index "
                         f"{tuple(index.shape)} and H={hidden.shape[-1]}, got {tuple(values.shape)}")
    if values.dtype != hidden.dtype:
        raise TypeError(f"{op}: values ({values.dtype}) must have hidden's dtype ({hidden.dtype})")
    if not torch.compiler.is_compiling() and values.numel() and hidden.numel() \
            and values.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
        raise ValueError(f"{op}: values must not share memory with hidden")


def validate_mpee_prune_args(hidden, valid, memory, attention, keep_ratio) -> None:
    """Raise a clear TypeError/ValueError for any bad argument (never reads tensor values)."""
    op = "mpee_prune"
    _check_hidden_active(op, hidden, valid, "valid")
    if hidden.shape[1] < 1:
        raise ValueError(f"{op}: the sequence needs at least the [CLS] token, got S=0")
    for name, t in (("memory", memory), ("attention", attention)):
        check_tensor(name, op, t, 2, (torch.float32,), hidden.device)
        if tuple(t.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{op}: {name} must be [B, S] = {tuple(hidden.shape[:2])}, got {tuple(t.shape)}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise TypeError(f"{op}: keep_ratio must be a float, got {type(keep_ratio).__name__}")
    if not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(f"{op}: keep_ratio must be in (0, 1] (MPEE keeps ceil(ratio * n) tokens), got {keep_ratio}")


# --------------------------------------------------------------------------- dispatch


def _rows_contiguous(hidden: torch.Tensor) -> torch.Tensor:
    """What the kernels take for ``hidden``: a contiguous last dim (any B and S strides)."""
    return hidden if hidden.shape[-1] <= 1 or hidden.stride(-1) == 1 else hidden.contiguous()


def pack_tokens(hidden: torch.Tensor, active: torch.Tensor, *, backend: Optional[str] = None) -> PackedTokens:
    """Pack the active tokens of ``hidden`` [B, S, H] into [nnz, H] (varlen, no padding).

    Args:
        hidden: float32/float16/bfloat16 [B, S, H].
        active: bool [B, S], True for the tokens that keep computing.
        backend: "torch", "cpu", "triton" or "cuda"; default: automatic.

    Returns:
        :class:`PackedTokens`. Synchronises once (the host reads nnz and max_seqlen).
    """
    validate_pack_tokens_args(hidden, active)
    name = backends.resolve(backend, hidden.device, op="pack_tokens")
    if name == "torch" or (needs_autograd(hidden)):
        return pack_tokens_reference(hidden, active)
    return backends.implementation("pack_tokens", name)(_rows_contiguous(hidden), active.contiguous())


def pack_tokens_padded(hidden: torch.Tensor, active: torch.Tensor, *, backend: Optional[str] = None) -> PaddedTokens:
    """Pack the active tokens of ``hidden`` [B, S, H] into [B, M, H], M = the largest count.

    Same arguments as :func:`pack_tokens`; returns :class:`PaddedTokens`. Synchronises once.
    """
    validate_pack_tokens_args(hidden, active, op="pack_tokens_padded")
    name = backends.resolve(backend, hidden.device, op="pack_tokens_padded")
    if name == "torch" or (needs_autograd(hidden)):
        return pack_tokens_padded_reference(hidden, active)
    return backends.implementation("pack_tokens_padded", name)(_rows_contiguous(hidden), active.contiguous())


def scatter_tokens(hidden: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Write packed rows back into ``hidden`` [B, S, H] in place; returns ``hidden``.

    Args:
        hidden: contiguous [B, S, H], updated in place; tokens not in ``index`` are untouched.
        index: int64 [nnz] or [B, M] of flat positions b*S + s (-1: skip), as returned by
            :func:`pack_tokens` / :func:`pack_tokens_padded`. Each position at most once.
        values: [nnz, H] or [B, M, H], hidden's dtype.

    Never synchronises. Under autograd the (differentiable, in-place) reference runs.
    """
    validate_scatter_tokens_args(hidden, index, values)
    name = backends.resolve(backend, hidden.device, op="scatter_tokens")
    if name == "torch" or needs_autograd(hidden, values):
        return scatter_tokens_reference(hidden, index, values)
    return backends.implementation("scatter_tokens", name)(hidden, index.contiguous(), values.contiguous())


def mpee_prune(hidden: torch.Tensor, valid: torch.Tensor, memory: torch.Tensor, attention: torch.Tensor,
               keep_ratio: float = 0.7, *, backend: Optional[str] = None) -> PrunedTokens:
    """MPEE token-wise exit (mpee.txt eq. 7-8): keep the top tokens by class-attention
    memory, fuse the rest into one token weighted by their class attention.

    Args:
        hidden: [B, S, H] states after the pruning layer, [CLS] at position 0.
        valid: bool [B, S], False for padding (never kept, never fused).
        memory: float32 [B, S], the class-attention memory A_m of eq. 6.
        attention: float32 [B, S], this layer's class attention A_class (fusion weights).
        keep_ratio: fraction of the valid non-[CLS] tokens kept, in (0, 1] (1 - R_ee).
        backend: "torch", "cpu", "triton" or "cuda"; default: automatic.

    Returns:
        :class:`PrunedTokens` of width 2 + ceil(keep_ratio * (S - 1)). Never synchronises
        (the "torch" backend's per-sample reference does). Under autograd (``hidden`` or
        ``attention`` requiring grad) the vectorised, differentiable
        :func:`mpee_prune_differentiable` runs, with no host syncs either.
    """
    validate_mpee_prune_args(hidden, valid, memory, attention, keep_ratio)
    keep_ratio = float(keep_ratio)
    name = backends.resolve(backend, hidden.device, op="mpee_prune")
    if needs_autograd(hidden, attention):
        return mpee_prune_differentiable(hidden, valid, memory, attention, keep_ratio)
    if name == "torch":
        return mpee_prune_reference(hidden, valid, memory, attention, keep_ratio)
    return backends.implementation("mpee_prune", name)(_rows_contiguous(hidden), valid.contiguous(),
                                                       memory.contiguous(), attention.contiguous(), keep_ratio)


def _scatter_tokens_compiled(hidden, index, values) -> torch.Tensor:
    torch.ops.eekernels.scatter_tokens(hidden, index, values)
    return hidden


register_op("pack_tokens", lambda *a: PackedTokens(*torch.ops.eekernels.pack_tokens(*a)),
            "eekernels.triton.tokens:pack_tokens_triton", pack_tokens_fake)
register_op("pack_tokens_padded", lambda *a: PaddedTokens(*torch.ops.eekernels.pack_tokens_padded(*a)),
            "eekernels.triton.tokens:pack_tokens_padded_triton", pack_tokens_padded_fake)
register_op("scatter_tokens", _scatter_tokens_compiled, "eekernels.triton.tokens:scatter_tokens_triton",
            scatter_tokens_fake)
register_op("mpee_prune", lambda *a: PrunedTokens(*torch.ops.eekernels.mpee_prune(*a)),
            "eekernels.triton.tokens:mpee_prune_triton", mpee_prune_fake)
