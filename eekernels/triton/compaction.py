"""Triton implementation of row compaction (spec: ``eekernels/ops/compaction.py``).

compact_rows(keep, tensors), three steps:

1. ``_scan_kernel``, one program: a prefix sum (``tl.cumsum``) over the keep mask in
   blocks of ``BLOCK`` flags with a running carry writes the positions of the kept rows
   to ``index`` (int64, ascending) and the survivor count M to a one-element device tensor.
   One program loops over N / BLOCK blocks: ample for batches of rows (N up to ~1e5).
2. The host reads M (``count.item()``: the op's one device->host synchronisation) and
   allocates the [M, ...] outputs.
3. ``_gather_kernel``: one launch copies the kept rows of up to ``_SLOTS`` tensors
   (more tensors: one launch per group). Rows are raw bytes: each tensor's pointers are
   bitcast to the widest word (8, 4, 2 or 1 bytes) dividing its addresses, row size and
   row stride, so every dtype works. Each program copies a [BR, BW] tile of words (BR
   rows, BW words of each) from ``src + index[row] * stride`` to the contiguous output;
   a 16-byte alignment hint (``V``) lets the compiler emit 16-byte vector loads/stores
   when addresses, row size and stride are 16-byte multiples. Programs are laid out
   slot after slot (``end_k`` = cumulative program count).

scatter_exits(out_logits, out_layer, batch_index, exit, logits, layer): one launch of
``_scatter_kernel`` over [BR rows, BC classes] tiles; rows with ``exit`` False or an
out-of-range batch position are masked off; the programs of the first class tile also
write ``layer``. No host synchronisation.

The host wrappers launch directly; under ``torch.compile`` they call the custom ops
``eekernels::compact_rows_triton`` / ``eekernels::scatter_exits_triton`` (schemas and
fakes of ``eekernels.ops.compaction``).
"""

from typing import List

import torch
import triton
import triton.language as tl

from ._launch import device_guard, next_pow2, opaque_launcher
from ..ops.contracts.compaction import (COMPACT_ROWS_SCHEMA, SCATTER_EXITS_SCHEMA, CompactedRows,
                                        compact_rows_fake, scatter_exits_fake)

__all__ = ["compact_rows_triton", "scatter_exits_triton"]

_SLOTS = 4  # tensors per gather launch


# --------------------------------------------------------------------------- device code


@triton.jit
def _scan_kernel(keep_ptr, index_ptr, count_ptr, N, BLOCK: tl.constexpr):
    """index[0:M] = positions i with keep[i], ascending; count[0] = M. One program."""
    carry = tl.zeros((), dtype=tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        k = tl.load(keep_ptr + offs, mask=offs < N, other=0).to(tl.int32)
        pos = carry + tl.cumsum(k, axis=0) - 1  # inclusive scan - 1 = output slot
        tl.store(index_ptr + pos.to(tl.int64), offs.to(tl.int64), mask=k != 0)
        carry += tl.sum(k, axis=0)
    tl.store(count_ptr, carry.to(tl.int64))


@triton.jit
def _word_ptr(p, WORD: tl.constexpr):
    if WORD == 8:
        return p.to(tl.pointer_type(tl.int64), bitcast=True)
    elif WORD == 4:
        return p.to(tl.pointer_type(tl.int32), bitcast=True)
    elif WORD == 2:
        return p.to(tl.pointer_type(tl.int16), bitcast=True)
    else:
        return p.to(tl.pointer_type(tl.int8), bitcast=True)


@triton.jit
def _gather_slot(pid, index_ptr, M, src, dst, n_words, stride, n_col_blocks,
                 WORD: tl.constexpr, V: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
    """Copy the [BR, BW] word tile ``pid`` of one tensor's kept rows."""
    s = _word_ptr(src, WORD)
    d = _word_ptr(dst, WORD)
    n_words = tl.multiple_of(n_words, V)
    stride = tl.multiple_of(stride, V)
    rb = pid // n_col_blocks
    cb = pid - rb * n_col_blocks
    rows = rb.to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < M
    src_rows = tl.load(index_ptr + rows, mask=row_ok, other=0)
    cols = cb * BW + tl.arange(0, BW)
    cols = tl.max_contiguous(tl.multiple_of(cols, BW), BW)
    ok = row_ok[:, None] & (cols < n_words)[None, :]
    v = tl.load(s + src_rows[:, None] * stride + cols[None, :], mask=ok)
    tl.store(d + rows[:, None] * n_words + cols[None, :], v, mask=ok)


@triton.jit
def _gather_kernel(
    index_ptr, M,
    src0, dst0, nw0, st0, ncb0, end0,
    src1, dst1, nw1, st1, ncb1, end1,
    src2, dst2, nw2, st2, ncb2, end2,
    src3, dst3, nw3, st3, ncb3, end3,
    NUM: tl.constexpr,
    WORD0: tl.constexpr, V0: tl.constexpr, BR0: tl.constexpr, BW0: tl.constexpr,
    WORD1: tl.constexpr, V1: tl.constexpr, BR1: tl.constexpr, BW1: tl.constexpr,
    WORD2: tl.constexpr, V2: tl.constexpr, BR2: tl.constexpr, BW2: tl.constexpr,
    WORD3: tl.constexpr, V3: tl.constexpr, BR3: tl.constexpr, BW3: tl.constexpr,
):
    """Programs [end_{k-1}, end_k) copy tensor k's tiles (k < NUM)."""
    pid = tl.program_id(0)
    if pid < end0:
        _gather_slot(pid, index_ptr, M, src0, dst0, nw0, st0, ncb0, WORD0, V0, BR0, BW0)
    if NUM > 1:
        if (pid >= end0) & (pid < end1):
            _gather_slot(pid - end0, index_ptr, M, src1, dst1, nw1, st1, ncb1, WORD1, V1, BR1, BW1)
    if NUM > 2:
        if (pid >= end1) & (pid < end2):
            _gather_slot(pid - end1, index_ptr, M, src2, dst2, nw2, st2, ncb2, WORD2, V2, BR2, BW2)
    if NUM > 3:
        if (pid >= end2) & (pid < end3):
            _gather_slot(pid - end2, index_ptr, M, src3, dst3, nw3, st3, ncb3, WORD3, V3, BR3, BW3)


@triton.jit
def _scatter_kernel(out_logits_ptr, out_layer_ptr, bidx_ptr, exit_ptr, logits_ptr,
                    N, C, B, layer, stride_out, stride_in, stride_layer,
                    BR: tl.constexpr, BC: tl.constexpr):
    """out_logits[bidx[i]] = logits[i], out_layer[bidx[i]] = layer for exited rows i."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < N
    ex = tl.load(exit_ptr + rows, mask=row_ok, other=0) != 0
    b = tl.load(bidx_ptr + rows, mask=row_ok & ex, other=-1)
    ok = row_ok & ex & (b >= 0) & (b < B)  # out-of-range positions are skipped (never written)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    ok2 = ok[:, None] & (cols < C)[None, :]
    v = tl.load(logits_ptr + rows[:, None] * stride_in + cols[None, :], mask=ok2)
    tl.store(out_logits_ptr + b[:, None] * stride_out + cols[None, :], v, mask=ok2)
    if tl.program_id(1) == 0:
        lay = tl.zeros([BR], dtype=out_layer_ptr.dtype.element_ty) + layer
        tl.store(out_layer_ptr + b * stride_layer, lay, mask=ok)


_INTERPRETED = type(_scan_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------- host code




def _word(ptr: int, row_bytes: int, stride_bytes: int, dst_ptr: int) -> int:
    for w in (8, 4, 2, 1):
        if ptr % w == 0 and dst_ptr % w == 0 and row_bytes % w == 0 and stride_bytes % w == 0:
            return w
    return 1


def _slot(t: torch.Tensor, out: torch.Tensor, m: int):
    """Launch parameters of one tensor: (runtime args, constexprs, programs)."""
    esize = t.element_size()
    row_bytes = out.numel() // m * esize
    stride_bytes = t.stride(0) * esize
    w = _word(t.data_ptr(), row_bytes, stride_bytes, out.data_ptr())
    aligned16 = all(x % 16 == 0 for x in (t.data_ptr(), out.data_ptr(), row_bytes, stride_bytes))
    v = 16 // w if (aligned16 and w > 1) else 1
    n_words = row_bytes // w
    # Tile of words: 16 KB on the GPU; large tiles under the interpreter (its cost is per
    # program, not per element).
    tile = (1 << 16) if _INTERPRETED else (16384 // w)
    bw = min(next_pow2(n_words), tile)
    br = max(1, min(tile // bw, next_pow2(m)))
    n_col_blocks = triton.cdiv(n_words, bw)
    programs = triton.cdiv(m, br) * n_col_blocks
    return (t, out, n_words, stride_bytes // w, n_col_blocks), (w, v, br, bw), programs


def _launch_gather(index: torch.Tensor, m: int, group) -> None:
    args, consts, end = [], [], 0
    for rt, ce, programs in group:
        end += programs
        args += [*rt, end]
        consts.append(ce)
    num = len(group)
    while len(consts) < _SLOTS:  # unused slots: never reached (end == total programs)
        args += [*group[0][0], end]
        consts.append((1, 1, 1, 1))
    kw = {"NUM": num}
    for k, (w, v, br, bw) in enumerate(consts):
        kw.update({f"WORD{k}": w, f"V{k}": v, f"BR{k}": br, f"BW{k}": bw})
    _gather_kernel[(end,)](index, m, *args, **kw, num_warps=4)


def _compact_launch(keep: torch.Tensor, tensors: List[torch.Tensor]):
    n = keep.shape[0]
    dev = keep.device
    index = torch.empty((n,), dtype=torch.int64, device=dev)
    with device_guard(dev):
        if n == 0:
            m = 0
        else:
            count = torch.empty((1,), dtype=torch.int64, device=dev)
            block = min(next_pow2(n), 4096 if _INTERPRETED else 2048)
            _scan_kernel[(1,)](keep, index, count, n, BLOCK=max(block, 16),
                               num_warps=8 if block >= 1024 else 4)
            m = int(count.item())  # the one device->host read: output sizes depend on it
        outs = [torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=dev) for t in tensors]
        if m > 0:
            slots = [_slot(t, o, m) for t, o in zip(tensors, outs) if o.numel() > 0]
            for g in range(0, len(slots), _SLOTS):
                _launch_gather(index, m, slots[g:g + _SLOTS])
    return index[:m], outs


def _scatter_launch(out_logits, out_layer, batch_index, exit, logits, layer) -> None:
    n, c = logits.shape
    if n == 0:
        return
    if _INTERPRETED:
        bc = min(next_pow2(c), 4096)
        br = max(1, min(next_pow2(n), (1 << 16) // bc))
    else:
        bc = min(next_pow2(c), 512)
        br = max(1, min(next_pow2(n), 2048 // bc))
    grid = (triton.cdiv(n, br), max(1, triton.cdiv(c, bc)))
    with device_guard(logits.device):
        _scatter_kernel[grid](
            out_logits, out_layer, batch_index, exit, logits,
            n, c, out_logits.shape[0], int(layer),
            out_logits.stride(0), logits.stride(0), out_layer.stride(0),
            BR=br, BC=bc, num_warps=4,
        )


# --------------------------------------------------------------------------- entry points

_compact = opaque_launcher("compact_rows_triton", _compact_launch, COMPACT_ROWS_SCHEMA, compact_rows_fake)
_scatter = opaque_launcher("scatter_exits_triton", _scatter_launch, SCATTER_EXITS_SCHEMA, scatter_exits_fake,
                           mutates_args=("out_logits", "out_layer"))


def compact_rows_triton(keep: torch.Tensor, tensors: List[torch.Tensor]) -> CompactedRows:
    """compact_rows with the Triton kernels; arguments as for ``eekernels.ops.compact_rows``
    (already validated; ``keep`` contiguous, every tensor's rows contiguous)."""
    index, outs = _compact(keep, tensors)
    return CompactedRows(index, list(outs))


def scatter_exits_triton(out_logits, out_layer, batch_index, exit, logits, layer) -> None:
    """scatter_exits in one Triton launch; arguments as for ``eekernels.ops.scatter_exits``
    (already validated; batch_index and exit contiguous, logits' last dim contiguous)."""
    _scatter(out_logits, out_layer, batch_index, exit, logits, int(layer))
