"""Triton implementation of the token ops (spec: ``eekernels/ops/tokens.py``).

pack_tokens / pack_tokens_padded(hidden, active):

1. ``_pack_scan_kernel``, one program: a prefix sum (``tl.cumsum``) over the flat [B*S]
   mask in blocks with a running carry writes the flat positions of the active tokens
   (int64, ascending), ``cu_seqlens[b]`` (the exclusive prefix at position b*S), then,
   after a barrier, each sample's length and the largest one, and [nnz, max_len] into a
   two-element device tensor.
2. The host reads those two numbers (``tolist()``: the op's one device->host sync) and
   allocates the outputs.
3. ``_gather_kernel`` (varlen: packed row k <- hidden[index[k] // S, index[k] % S]) or
   ``_gather_padded_kernel`` (slot (b, k) <- the k-th active token of sample b, or zeros
   and index -1): [BR rows, BH columns] tiles; hidden may have any B/S strides. Triton
   marks integer arguments divisible by 16 (H, strides) as such, so aligned fp16/bf16
   rows are moved with 16-byte vector loads/stores.

scatter_tokens(hidden, index, values): one ``_scatter_kernel`` launch over [BR, BH] tiles of
the flattened index/values; entries < 0 (padding) or >= B*S are masked off. No sync.

mpee_prune(hidden, valid, memory, attention, keep_ratio): ONE fused ``_mpee_kernel``
launch, one program per sample (mpee.txt eq. 7-8):

- n = valid non-[CLS] tokens, m = ceil(keep_ratio * n - 1e-6) in float64 (keep_ratio and
  the epsilon come in a float64 tensor: Triton's float scalars are float32);
- rank of token i = number of candidates j that beat it (higher memory, or equal memory
  and lower position; memory compared through an integer key that orders NaN last and
  ties -0.0 with 0.0), counted over [BS, BS] tiles; kept iff rank < m;
- a block prefix sum over the kept flags (position order, running carry) gives each kept
  token's output slot 1 + #kept before it; its row, memory, position are written; the
  fused flags go to a small int8 workspace [B, S];
- after a barrier the fusion token sum_i attention[i] * hidden[i] over the fused tokens is
  accumulated in float32 per column tile; then [CLS] (slot 0) and padding slots.

The host wrappers launch directly; under ``torch.compile`` they call the custom ops
``eekernels::{pack_tokens,pack_tokens_padded,scatter_tokens,mpee_prune}_triton`` (schemas
and fakes of ``eekernels.ops.tokens``).
"""


import torch
import triton
import triton.language as tl

from ._launch import device_guard, next_pow2, opaque_launcher
from ..ops.contracts.tokens import (KEEP_EPS, SCHEMAS, PackedTokens, PaddedTokens, PrunedTokens, mpee_kept_width,
                                    mpee_prune_fake, pack_tokens_fake, pack_tokens_padded_fake, scatter_tokens_fake)

__all__ = ["mpee_prune_triton", "pack_tokens_padded_triton", "pack_tokens_triton", "scatter_tokens_triton"]


# --------------------------------------------------------------------------- device code


@triton.jit
def _pack_scan_kernel(active_ptr, index_ptr, cu_ptr, len_ptr, stats_ptr, B, S, TOTAL, BLOCK: tl.constexpr):
    """index[0:nnz] = flat positions of the active tokens; cu[0:B+1]; len[0:B];
    stats = [nnz, max len]. One program."""
    carry = tl.zeros((), dtype=tl.int32)
    for start in range(0, TOTAL, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < TOTAL
        a = tl.load(active_ptr + offs, mask=inside, other=0).to(tl.int32)
        incl = carry + tl.cumsum(a, axis=0)
        tl.store(index_ptr + (incl - 1).to(tl.int64), offs.to(tl.int64), mask=a != 0)
        first = inside & (offs % S == 0)  # a sample starts here: cu[b] = actives before it
        tl.store(cu_ptr + offs // S, incl - a, mask=first)
        carry += tl.sum(a, axis=0)
    tl.store(cu_ptr + B, carry)
    tl.debug_barrier()  # cu is read back below by other threads of this program
    longest = tl.zeros((), dtype=tl.int32)
    for start in range(0, B, BLOCK):
        bs = start + tl.arange(0, BLOCK)
        ok = bs < B
        n = tl.load(cu_ptr + bs + 1, mask=ok, other=0) - tl.load(cu_ptr + bs, mask=ok, other=0)
        tl.store(len_ptr + bs, n.to(tl.int64), mask=ok)
        longest = tl.maximum(longest, tl.max(n, axis=0))
    tl.store(stats_ptr, carry.to(tl.int64))
    tl.store(stats_ptr + 1, longest.to(tl.int64))


@triton.jit
def _gather_kernel(hidden_ptr, index_ptr, out_ptr, R, S, H, stride_b, stride_s,
                   BR: tl.constexpr, BH: tl.constexpr):
    """out[k] = hidden[index[k] // S, index[k] % S] for a [BR, BH] tile."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < R
    p = tl.load(index_ptr + rows, mask=row_ok, other=0)
    b = p // S
    src = b * stride_b + (p - b * S) * stride_s
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    ok = row_ok[:, None] & (cols < H)[None, :]
    v = tl.load(hidden_ptr + src[:, None] + cols[None, :], mask=ok)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], v, mask=ok)


@triton.jit
def _gather_padded_kernel(hidden_ptr, flat_index_ptr, cu_ptr, out_ptr, out_index_ptr, B, M, S, H,
                          stride_b, stride_s, BR: tl.constexpr, BH: tl.constexpr):
    """Slot (b, k) of [B, M]: the k-th active token of sample b, else zeros and index -1."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < B * M
    b = rows // M
    k = rows - b * M
    lo = tl.load(cu_ptr + b, mask=row_ok, other=0).to(tl.int64)
    hi = tl.load(cu_ptr + b + 1, mask=row_ok, other=0).to(tl.int64)
    has = row_ok & (k < hi - lo)
    p = tl.load(flat_index_ptr + lo + k, mask=has, other=-1)
    src = b * stride_b + (p - b * S) * stride_s
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    col_ok = (cols < H)[None, :]
    v = tl.load(hidden_ptr + src[:, None] + cols[None, :], mask=has[:, None] & col_ok, other=0)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], v, mask=row_ok[:, None] & col_ok)
    if tl.program_id(1) == 0:
        tl.store(out_index_ptr + rows, p, mask=row_ok)


@triton.jit
def _scatter_kernel(hidden_ptr, index_ptr, values_ptr, R, TOTAL, H, BR: tl.constexpr, BH: tl.constexpr):
    """hidden[index[j]] = values[j] for index[j] in [0, B*S); other entries are skipped."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < R
    p = tl.load(index_ptr + rows, mask=row_ok, other=-1)
    use = row_ok & (p >= 0) & (p < TOTAL)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    ok = use[:, None] & (cols < H)[None, :]
    v = tl.load(values_ptr + rows[:, None] * H + cols[None, :], mask=ok)
    tl.store(hidden_ptr + p[:, None] * H + cols[None, :], v, mask=ok)


@triton.jit
def _memory_key(v):
    """int32 key ordering float32 memory like a stable sort of -memory: larger first,
    -0.0 == 0.0, NaN below everything."""
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(v == 0.0, 0, key)
    return tl.where(v != v, -2147483647 - 1, key)


@triton.jit
def _mpee_kernel(hidden_ptr, valid_ptr, mem_ptr, att_ptr, ratio_ptr, fused_ptr,
                 out_h_ptr, out_valid_ptr, out_mem_ptr, out_src_ptr,
                 S, H, W, stride_b, stride_s, BS: tl.constexpr, BH: tl.constexpr):
    """MPEE prune + fusion of one sample (program b); see the module docstring."""
    b = tl.program_id(0).to(tl.int64)
    valid_row = valid_ptr + b * S
    mem_row = mem_ptr + b * S
    att_row = att_ptr + b * S
    hid_row = hidden_ptr + b * stride_b
    out_row = b * W  # first output slot of this sample
    ar = tl.arange(0, BS)

    # n: valid non-[CLS] tokens; m = ceil(keep_ratio * n - eps) (eq. 7), in float64.
    n = tl.zeros((), dtype=tl.int32)
    for start in range(1, S, BS):
        i = start + ar
        n += tl.sum((tl.load(valid_row + i, mask=i < S, other=0) != 0).to(tl.int32), axis=0)
    ratio = tl.load(ratio_ptr)
    eps = tl.load(ratio_ptr + 1)
    m = tl.math.ceil(ratio * n.to(tl.float64) - eps).to(tl.int32)
    m = tl.minimum(tl.maximum(m, 0), n)

    # Kept tokens: rank by (memory desc, position asc); slots by a running prefix sum.
    carry = tl.zeros((), dtype=tl.int32)
    fused_mem = tl.zeros((), dtype=tl.float32)
    for start in range(1, S, BS):
        i = start + ar
        i_in = i < S
        cand_i = tl.load(valid_row + i, mask=i_in, other=0) != 0
        mem_i = tl.load(mem_row + i, mask=i_in, other=0.0)
        key_i = _memory_key(mem_i)
        rank = tl.zeros((BS,), dtype=tl.int32)
        for jstart in range(1, S, BS):
            j = jstart + ar
            j_in = j < S
            cand_j = tl.load(valid_row + j, mask=j_in, other=0) != 0
            key_j = _memory_key(tl.load(mem_row + j, mask=j_in, other=0.0))
            beats = (key_j[:, None] > key_i[None, :]) | ((key_j[:, None] == key_i[None, :]) & (j[:, None] < i[None, :]))
            rank += tl.sum((cand_j[:, None] & beats).to(tl.int32), axis=0)
        kept = cand_i & (rank < m)
        fused = cand_i & (rank >= m)
        k32 = kept.to(tl.int32)
        slot = 1 + carry + tl.cumsum(k32, axis=0) - k32
        tl.store(out_src_ptr + out_row + slot, i.to(tl.int64), mask=kept)
        tl.store(out_valid_ptr + out_row + slot, kept.to(tl.uint8), mask=kept)
        tl.store(out_mem_ptr + out_row + slot, mem_i, mask=kept)
        tl.store(fused_ptr + b * S + i, fused.to(tl.int8), mask=i_in)
        fused_mem += tl.sum(tl.where(fused, mem_i, 0.0), axis=0)
        for hstart in range(0, H, BH):
            cols = hstart + tl.arange(0, BH)
            ok = kept[:, None] & (cols < H)[None, :]
            v = tl.load(hid_row + i[:, None] * stride_s + cols[None, :], mask=ok)
            tl.store(out_h_ptr + (out_row + slot)[:, None] * H + cols[None, :], v, mask=ok)
        carry += tl.sum(k32, axis=0)

    tl.debug_barrier()  # the fused flags are read back by other threads of this program

    # Fusion token (eq. 8) at slot 1 + m: sum of attention[i] * hidden[i], float32.
    has_fusion = n > m
    fslot = out_row + 1 + m
    for hstart in range(0, H, BH):
        cols = hstart + tl.arange(0, BH)
        col_ok = cols < H
        acc = tl.zeros((BH,), dtype=tl.float32)
        for start in range(1, S, BS):
            i = start + ar
            f = tl.load(fused_ptr + b * S + i, mask=i < S, other=0) != 0
            w = tl.load(att_row + i, mask=f, other=0.0)
            x = tl.load(hid_row + i[:, None] * stride_s + cols[None, :], mask=f[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(w[:, None] * x.to(tl.float32), axis=0)
        acc = tl.where(has_fusion, acc, 0.0)
        tl.store(out_h_ptr + fslot * H + cols, acc.to(out_h_ptr.dtype.element_ty), mask=col_ok)
        # [CLS] row at slot 0
        cls = tl.load(hid_row + cols, mask=col_ok)
        tl.store(out_h_ptr + out_row * H + cols, cls, mask=col_ok)
    tl.store(out_valid_ptr + fslot, has_fusion.to(tl.uint8))
    tl.store(out_mem_ptr + fslot, tl.where(has_fusion, fused_mem, 0.0))
    tl.store(out_src_ptr + fslot, tl.full((), -1, tl.int64))
    tl.store(out_valid_ptr + out_row, tl.full((), 1, tl.uint8))
    tl.store(out_mem_ptr + out_row, tl.load(mem_row))
    tl.store(out_src_ptr + out_row, tl.zeros((), dtype=tl.int64))

    # Padding slots 2 + m .. W - 1.
    for start in range(0, W, BS):
        slots = start + ar
        pad = (slots >= 2 + m) & (slots < W)
        tl.store(out_valid_ptr + out_row + slots, tl.zeros((BS,), dtype=tl.uint8), mask=pad)
        tl.store(out_mem_ptr + out_row + slots, tl.zeros((BS,), dtype=tl.float32), mask=pad)
        tl.store(out_src_ptr + out_row + slots, tl.full((BS,), -1, tl.int64), mask=pad)
        for hstart in range(0, H, BH):
            cols = hstart + tl.arange(0, BH)
            ok = pad[:, None] & (cols < H)[None, :]
            tl.store(out_h_ptr + (out_row + slots)[:, None] * H + cols[None, :],
                     tl.zeros((BS, BH), dtype=out_h_ptr.dtype.element_ty), mask=ok)


_INTERPRETED = type(_scatter_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------- host code




def _row_tile(rows: int, h: int):
    """[BR, BH] tile for row copies: large under the interpreter (cost per program)."""
    if _INTERPRETED:
        bh = min(next_pow2(h), 4096)
        return max(1, min(next_pow2(rows), (1 << 15) // bh)), bh
    bh = min(next_pow2(h), 512)
    return max(1, min(next_pow2(rows), 4096 // bh)), bh


def _scan(hidden, active):
    """Launch the scan; returns (flat index [B*S], cu int32 [B+1], lengths int64 [B], nnz, max_len)."""
    b, s, _ = hidden.shape
    dev = hidden.device
    total = b * s
    index = torch.empty((total,), dtype=torch.int64, device=dev)
    cu = torch.zeros((b + 1,), dtype=torch.int32, device=dev)
    lengths = torch.zeros((b,), dtype=torch.int64, device=dev)
    if total == 0:
        return index, cu, lengths, 0, 0
    if total > 2**31 - 1:
        raise ValueError(f"pack_tokens: B*S={total} does not fit the int32 scan")
    stats = torch.empty((2,), dtype=torch.int64, device=dev)
    block = min(next_pow2(max(total, b)), 4096 if _INTERPRETED else 2048)
    _pack_scan_kernel[(1,)](active, index, cu, lengths, stats, b, s, total, BLOCK=max(block, 16),
                            num_warps=8 if block >= 1024 else 4)
    nnz, longest = stats.tolist()  # the one device->host read: output sizes depend on it
    return index, cu, lengths, int(nnz), int(longest)


def _pack_launch(hidden, active):
    b, s, h = hidden.shape
    with device_guard(hidden.device):
        index, cu, _, nnz, longest = _scan(hidden, active)
        values = torch.empty((nnz, h), dtype=hidden.dtype, device=hidden.device)
        if nnz and h:
            br, bh = _row_tile(nnz, h)
            _gather_kernel[(triton.cdiv(nnz, br), triton.cdiv(h, bh))](
                hidden, index, values, nnz, s, h, hidden.stride(0), hidden.stride(1), BR=br, BH=bh, num_warps=4)
    return values, index[:nnz], cu, longest


def _pack_padded_launch(hidden, active):
    b, s, h = hidden.shape
    with device_guard(hidden.device):
        flat, cu, lengths, _, m = _scan(hidden, active)
        values = torch.empty((b, m, h), dtype=hidden.dtype, device=hidden.device)
        index = torch.empty((b, m), dtype=torch.int64, device=hidden.device)
        if b * m:
            br, bh = _row_tile(b * m, max(h, 1))
            _gather_padded_kernel[(triton.cdiv(b * m, br), max(1, triton.cdiv(h, bh)))](
                hidden, flat, cu, values, index, b, m, s, h, hidden.stride(0), hidden.stride(1),
                BR=br, BH=bh, num_warps=4)
    return values, index, lengths


def _scatter_launch(hidden, index, values) -> None:
    b, s, h = hidden.shape
    r = index.numel()
    if r == 0 or h == 0:
        return
    br, bh = _row_tile(r, h)
    with device_guard(hidden.device):
        _scatter_kernel[(triton.cdiv(r, br), triton.cdiv(h, bh))](
            hidden, index, values, r, b * s, h, BR=br, BH=bh, num_warps=4)


def _mpee_launch(hidden, valid, memory, attention, keep_ratio):
    b, s, h = hidden.shape
    w = mpee_kept_width(s, keep_ratio)
    dev = hidden.device
    out_h = torch.empty((b, w, h), dtype=hidden.dtype, device=dev)
    out_valid = torch.empty((b, w), dtype=torch.bool, device=dev)
    out_mem = torch.empty((b, w), dtype=torch.float32, device=dev)
    out_src = torch.empty((b, w), dtype=torch.int64, device=dev)
    if b == 0:
        return out_h, out_valid, out_mem, out_src
    # keep_ratio and eps as float64 on the device (a fill, no sync): m is computed exactly.
    ratio = torch.full((2,), KEEP_EPS, dtype=torch.float64, device=dev)
    ratio[0] = float(keep_ratio)
    fused = torch.empty((b, s), dtype=torch.int8, device=dev)
    if _INTERPRETED:
        bs, bh = min(max(next_pow2(s), 16), 256), min(max(next_pow2(h), 16), 1024)
    else:
        bs, bh = 64, min(max(next_pow2(h), 16), 128)
    with device_guard(dev):
        _mpee_kernel[(b,)](hidden, valid, memory, attention, ratio, fused, out_h, out_valid.view(torch.uint8),
                           out_mem, out_src,
                           s, h, w, hidden.stride(0), hidden.stride(1), BS=bs, BH=bh, num_warps=4)
    return out_h, out_valid, out_mem, out_src


# --------------------------------------------------------------------------- entry points

_pack = opaque_launcher("pack_tokens_triton", _pack_launch, SCHEMAS["pack_tokens"], pack_tokens_fake)
_pack_padded = opaque_launcher("pack_tokens_padded_triton", _pack_padded_launch, SCHEMAS["pack_tokens_padded"],
                               pack_tokens_padded_fake)
_scatter = opaque_launcher("scatter_tokens_triton", _scatter_launch, SCHEMAS["scatter_tokens"],
                           scatter_tokens_fake, mutates_args=("hidden",))
_prune = opaque_launcher("mpee_prune_triton", _mpee_launch, SCHEMAS["mpee_prune"], mpee_prune_fake)


def pack_tokens_triton(hidden: torch.Tensor, active: torch.Tensor) -> PackedTokens:
    """pack_tokens with the Triton kernels; arguments as for ``eekernels.ops.pack_tokens``
    (already validated; hidden's last dim contiguous, active contiguous)."""
    return PackedTokens(*_pack(hidden, active))


def pack_tokens_padded_triton(hidden: torch.Tensor, active: torch.Tensor) -> PaddedTokens:
    """pack_tokens_padded with the Triton kernels (arguments validated and prepared)."""
    return PaddedTokens(*_pack_padded(hidden, active))


def scatter_tokens_triton(hidden: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """scatter_tokens in one Triton launch (in place; returns hidden). Arguments validated,
    index and values contiguous."""
    _scatter(hidden, index, values)
    return hidden


def mpee_prune_triton(hidden, valid, memory, attention, keep_ratio: float) -> PrunedTokens:
    """mpee_prune in one fused Triton launch (arguments validated and prepared)."""
    return PrunedTokens(*_prune(hidden, valid, memory, attention, float(keep_ratio)))
