"""Triton implementation of the fused exit head (spec: ``eekernels/ops/exit_head.py``).

One kernel launch computes, for a block of ``BLOCK_N`` rows per program and in one pass:

    x      = tanh(Wp h + bp)          optional pooler; float32, never rounded back to half
    z      = W x + b                  classifier, float32 accumulation (tl.dot)
    z      = tanh(z)                  if ``tanh_logits``               (mpee.txt eq. 9)
    z      = (1-lam) m_prev + lam z   if ``memory`` is given           (mpee.txt eq. 10)
    logits = z                        stored as float32 [N, C]
    online softmax statistics over class tiles (csrc/common/exit_head_epilogue.h):
        m = running max, s = sum exp(z - m), t = sum exp(z - m) (z - m), first argmax
    entropy = max(log(s) - t/s, 0), max_prob = 1/s, patience counter, exit mask, pred.

Rows whose final logits contain NaN/+-inf: score NaN (0 for patience), exit False,
pred -1, counter 0.

Kernel structure (all paths share the logit epilogue ``_logit_tile`` and ``_decide``):

* no pooler: for each class tile ``c`` of BLOCK_C classes, accumulate the
  [BLOCK_N, BLOCK_C] logits with tl.dot over BLOCK_K-wide tiles of ``hidden`` (input
  dtype) and ``W^T`` (input dtype), float32 accumulator.
* pooler, C <= 64 ("fused"): there is a single class tile, so the pooler output is
  never materialised: for each BLOCK_J-wide column tile j of the pooler,
  ``p_j = tanh(h Wp_j^T + bp_j)`` (float32) and ``logits += p_j W[:, j]^T``.
* pooler, C > 64 ("scratch"): phase 1 writes the float32 pooled rows [BLOCK_N, H] of
  this program to a scratch buffer [N, H] (allocated by the launcher), then
  ``tl.debug_barrier()``, then phase 2 runs the no-pooler loop reading the pooled rows
  back (each program only reads rows it wrote itself).

Precision: float32 inputs use ``input_precision="ieee"`` everywhere (TF32 would miss the
1e-5 tolerance). Half inputs (fp16/bf16) feed tensor-core dots in the input dtype with a
float32 accumulator; the float32 pooled activations are split ``p = hi + lo`` with both
parts in the input dtype and multiplied as ``hi W + lo W`` (two half dots), which keeps
~16 (bf16) / ~22 (fp16) mantissa bits of ``p`` instead of 8 / 11.

Block table (``_config``); all tiles are powers of two >= 16 (tl.dot minimum):

=========== ========================= ===============================================
BLOCK_N     16 if N <= 512            many small programs while the grid is below the
            32 if N <= 2048           SM count (132 on H100): every program streams the
            64 otherwise              whole W (and Wp) from L2, so only larger N
                                      amortise it over more rows
BLOCK_C     clamp(next_pow2(C), 16,   one class tile for the usual C <= 64; for large C
            128 if BLOCK_N <= 32      (vocab-like heads) 128/64-wide tiles keep the
            else 64)                  fp32 accumulator at <= 64 registers per thread
BLOCK_K     clamp(next_pow2(H), 16,   reduction tile over H (32 for fp32: the ieee dot
            64 half / 32 fp32)        is an FMA loop and holds both operands in registers)
BLOCK_J     clamp(next_pow2(H), 16,   pooler output-column tile
            64)
num_warps   4
=========== ========================= ===============================================

Under the Triton interpreter (TRITON_INTERPRET=1, which CI uses) the same table is used,
so CI exercises the GPU configurations' masks and loop structure; interpreter time is
dominated by the number of tile iterations (see tests for slow shapes).

The host wrapper ``exit_head_triton`` allocates the outputs and launches directly (no
other torch ops, no host syncs). Under ``torch.compile`` it calls the custom op
``torch.ops.eekernels.exit_head_triton`` (registered at import, with a fake kernel) so
the launch is opaque to Dynamo/Inductor and capturable in CUDA graphs.
"""

import functools
import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.exit_head import CRITERIA, ExitHeadOutput

__all__ = ["exit_head_triton"]


# --------------------------------------------------------------------------- device code


@triton.jit
def _tanh(x):
    """float32 tanh, ~1e-7 relative: odd Taylor series for |x| < 0.25 (no cancellation),
    else sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 0.61] (no overflow)."""
    ax = tl.abs(x)
    xs = tl.where(ax < 0.25, x, 0.0)  # series argument; keeps inf/NaN out of it
    x2 = xs * xs
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925 + ...
    poly = -0.008863235529902197 * x2 + 0.021869488536155203
    poly = poly * x2 - 0.05396825396825397
    poly = poly * x2 + 0.13333333333333333
    poly = poly * x2 - 0.3333333333333333
    small = xs + xs * (x2 * poly)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(ax < 0.25, small, big)  # NaN -> big -> NaN


@triton.jit
def _dot_in(a, wt, IS_F32: tl.constexpr, UPCAST: tl.constexpr):
    """a [M, K] times wt [K, N], both in the input dtype, float32 result.

    UPCAST (interpreter + bfloat16 only): the Triton interpreter multiplies bfloat16 tiles
    as their raw uint16 bits, so upcast and use an exact float32 dot instead; products of
    bf16 values are exact in float32, so this matches the GPU's bf16 x bf16 -> fp32 MMA.
    """
    if IS_F32:
        return tl.dot(a, wt, input_precision="ieee")
    elif UPCAST:
        return tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, wt)


@triton.jit
def _dot_f32_lhs(x, wt, IS_F32: tl.constexpr, UPCAST: tl.constexpr):
    """x [M, K] float32 times wt [K, N] (input dtype), float32 result.

    Half weights: x = hi + lo with hi, lo in the weights' dtype, two half dots, so the
    float32 pooled activations keep ~16 (bf16) / ~22 (fp16) bits instead of 8 / 11.
    """
    if IS_F32:
        return tl.dot(x, wt, input_precision="ieee")
    else:
        hi = x.to(wt.dtype)
        lo = (x - hi.to(tl.float32)).to(wt.dtype)
        return _dot_in(hi, wt, IS_F32, UPCAST) + _dot_in(lo, wt, IS_F32, UPCAST)


@triton.jit
def _pooler_tile(h_ptr, stride_hn, wp_ptr, bp_ptr, rows64, row_ok, j0, H,
                 IS_F32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pooled columns j0..j0+BLOCK_J of BLOCK_N rows: tanh(h Wp[j]^T + bp[j]), float32.
    Columns >= H come out exactly 0 (masked loads give 0, tanh(0) = 0)."""
    cols_j = j0 + tl.arange(0, BLOCK_J)
    j_ok = cols_j < H
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Wp^T tile [BLOCK_K, BLOCK_J]: element (k, j) = Wp[j, k]
        wt = tl.load(wp_ptr + cols_j[None, :].to(tl.int64) * H + ks[:, None],
                     mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        acc += _dot_in(a, wt, IS_F32, UPCAST)
    bp = tl.load(bp_ptr + cols_j, mask=j_ok, other=0.0).to(tl.float32)
    return _tanh(acc + bp[None, :])


@triton.jit
def _logit_tile(acc, rows64, row_ok, c0, b_ptr, mem_ptr, logits_ptr, C, mem_a, mem_lam,
                m, s, t, arg, bad,
                TANH_LOGITS: tl.constexpr, HAS_MEMORY: tl.constexpr, BLOCK_C: tl.constexpr):
    """Bias, tanh, memory blend, store; merge the tile into the online softmax stats."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok2 = row_ok[:, None] & col_ok[None, :]
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    z = acc + b[None, :]
    if TANH_LOGITS:
        z = _tanh(z)  # mpee.txt eq. 9
    off = rows64[:, None] * C + cols[None, :]
    if HAS_MEMORY:
        mem = tl.load(mem_ptr + off, mask=ok2, other=0.0)
        z = mem_a * mem + mem_lam * z  # mpee.txt eq. 10: (1-lam) m_prev + lam z
    tl.store(logits_ptr + off, z, mask=ok2)

    # Online softmax (exit_head_epilogue.h stats_merge): non-finite logits only count.
    fin = tl.abs(z) < float("inf")
    use = col_ok[None, :] & fin
    bad += tl.sum(tl.where(col_ok[None, :] & (~fin), 1, 0), axis=1)
    zs = tl.where(use, z, float("-inf"))
    m_t = tl.max(zs, axis=1)
    # first index of the tile max; a later tile only wins with a strictly larger max
    arg_t = tl.min(tl.where(use & (zs == m_t[:, None]), cols[None, :], 2147483647), axis=1)
    arg = tl.where(m_t > m, arg_t, arg)
    m_new = tl.maximum(m, m_t)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep sums 0
    alpha = tl.exp(m - m_ref)
    d_old = tl.where(m == float("-inf"), 0.0, m - m_ref)
    diff = tl.where(use, zs - m_ref[:, None], 0.0)
    e = tl.where(use, tl.exp(diff), 0.0)
    t = alpha * (t + s * d_old) + tl.sum(e * diff, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, arg, bad


@triton.jit
def _exit_head_kernel(
    h_ptr, stride_hn, w_ptr, b_ptr, wp_ptr, bp_ptr, mem_ptr, prev_ptr, cnt_ptr, scratch_ptr,
    logits_ptr, score_ptr, exit_ptr, pred_ptr, cnt_out_ptr,
    N, H, C, mem_a, mem_lam, thr,
    POOL: tl.constexpr,  # 0 none, 1 fused (single class tile), 2 scratch
    TANH_LOGITS: tl.constexpr, HAS_MEMORY: tl.constexpr, CRITERION: tl.constexpr,
    HAS_PREV: tl.constexpr, HAS_COUNTER: tl.constexpr, IS_F32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    arg = tl.full([BLOCK_N], -1, tl.int32)
    bad = tl.zeros([BLOCK_N], dtype=tl.int32)

    if POOL == 1:
        # C <= BLOCK_C: logits = sum_j tanh(h Wp_j^T + bp_j) W[:, j]^T, no scratch.
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < C
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, H, BLOCK_J):
            p = _pooler_tile(h_ptr, stride_hn, wp_ptr, bp_ptr, rows64, row_ok, j0, H,
                             IS_F32, UPCAST, BLOCK_N, BLOCK_J, BLOCK_K)
            js = j0 + tl.arange(0, BLOCK_J)
            wt = tl.load(w_ptr + cols[None, :].to(tl.int64) * H + js[:, None],
                         mask=(js < H)[:, None] & c_ok[None, :], other=0.0)
            acc += _dot_f32_lhs(p, wt, IS_F32, UPCAST)
        m, s, t, arg, bad = _logit_tile(acc, rows64, row_ok, 0, b_ptr, mem_ptr, logits_ptr,
                                        C, mem_a, mem_lam, m, s, t, arg, bad,
                                        TANH_LOGITS, HAS_MEMORY, BLOCK_C)
    else:
        if POOL == 2:
            # phase 1: pooled rows of this program -> float32 scratch [N, H]
            for j0 in range(0, H, BLOCK_J):
                p = _pooler_tile(h_ptr, stride_hn, wp_ptr, bp_ptr, rows64, row_ok, j0, H,
                                 IS_F32, UPCAST, BLOCK_N, BLOCK_J, BLOCK_K)
                js = j0 + tl.arange(0, BLOCK_J)
                tl.store(scratch_ptr + rows64[:, None] * H + js[None, :], p,
                         mask=row_ok[:, None] & (js < H)[None, :])
            tl.debug_barrier()  # phase 2 reads rows other threads of this program wrote
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            c_ok = cols < C
            acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                a_mask = row_ok[:, None] & k_ok[None, :]
                wt = tl.load(w_ptr + cols[None, :].to(tl.int64) * H + ks[:, None],
                             mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                if POOL == 2:
                    x = tl.load(scratch_ptr + rows64[:, None] * H + ks[None, :],
                                mask=a_mask, other=0.0)
                    acc += _dot_f32_lhs(x, wt, IS_F32, UPCAST)
                else:
                    a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :],
                                mask=a_mask, other=0.0)
                    acc += _dot_in(a, wt, IS_F32, UPCAST)
            m, s, t, arg, bad = _logit_tile(acc, rows64, row_ok, c0, b_ptr, mem_ptr,
                                            logits_ptr, C, mem_a, mem_lam, m, s, t, arg, bad,
                                            TANH_LOGITS, HAS_MEMORY, BLOCK_C)

    # ---- exit decision (exit_head_epilogue.h decide) ----
    finite = (bad == 0) & (arg >= 0)
    pred = tl.where(finite, arg, -1).to(tl.int64)
    if CRITERION == 2:  # patience (PABEE)
        if HAS_PREV:
            prev = tl.load(prev_ptr + rows, mask=row_ok, other=-1)
        else:
            prev = tl.full([BLOCK_N], -1, tl.int64)
        if HAS_COUNTER:
            cnt = tl.load(cnt_ptr + rows, mask=row_ok, other=0)
        else:
            cnt = tl.zeros([BLOCK_N], dtype=tl.int32)
        same = (pred == prev) & (pred >= 0)
        new_cnt = tl.where(same, cnt + 1, 0).to(tl.int32)
        score = new_cnt.to(tl.float32)
        ex = finite & (score >= thr)
        tl.store(cnt_out_ptr + rows, new_cnt, mask=row_ok)
    elif CRITERION == 1:  # max_prob: max softmax probability = 1/s
        score = tl.where(finite, 1.0 / s, float("nan"))
        ex = finite & (score >= thr)
    else:  # entropy in nats = log(s) - t/s, >= 0
        ent = tl.maximum(tl.log(s) - t / s, 0.0)
        score = tl.where(finite, ent, float("nan"))
        ex = finite & (score < thr)
    tl.store(score_ptr + rows, score, mask=row_ok)
    tl.store(exit_ptr + rows, ex, mask=row_ok)
    tl.store(pred_ptr + rows, pred, mask=row_ok)


# --------------------------------------------------------------------------- host code

# triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set at import.
_INTERPRETED = type(_exit_head_kernel).__name__ == "InterpretedFunction"


def _np2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_FUSED_MAX_C = 64  # pooler + C <= this: single class tile, no scratch buffer


@functools.lru_cache(maxsize=4096)
def _config(n: int, h: int, c: int, is_f32: bool, has_pooler: bool, interpreted: bool = False):
    """(POOL, BLOCK_N, BLOCK_C, BLOCK_K, BLOCK_J, num_warps); see the module docstring."""
    if interpreted:
        # Interpreter: time is per tile *iteration*, not per element, so use big tiles.
        block_n = min(max(_np2(n), 16), 128)
        block_c = min(max(_np2(c), 16), 256)
        block_k = block_j = min(max(_np2(h), 16), 256)
    else:
        block_n = 16 if n <= 512 else (32 if n <= 2048 else 64)
        block_c = min(max(_np2(c), 16), 128 if block_n <= 32 else 64)
        block_k = min(max(_np2(h), 16), 32 if is_f32 else 64)
        block_j = min(max(_np2(h), 16), 64)
    if not has_pooler:
        pool = 0
    elif c <= _FUSED_MAX_C:
        pool = 1
        block_c = max(_np2(c), 16)
    else:
        pool = 2
    return pool, block_n, block_c, block_k, block_j, 4


@functools.lru_cache(maxsize=256)
def _f32_ceil(x: float) -> float:
    """Smallest float32 >= x (x >= 0, inf allowed).

    The spec compares the float32 score with the double threshold; the kernel compares in
    float32, and for a float32 score ``score < x`` <=> ``score < ceil32(x)`` and
    ``score >= x`` <=> ``score >= ceil32(x)``, so rounding the threshold up is exact.
    """
    if x > 3.4028234663852886e38:
        return math.inf
    f = struct.unpack("<f", struct.pack("<f", x))[0]
    if f < x:
        f = struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", f))[0] + 1))[0]
    return f


def _launch(hidden, weight, bias, pooler_weight, pooler_bias, tanh_logits, memory,
            memory_lambda, criterion, threshold, prev_pred, counter):
    """Allocate outputs and launch; returns (logits, score, exit, pred, counter-or-[0])."""
    n, h = hidden.shape
    c = weight.shape[0]
    dev = hidden.device
    logits = torch.empty((n, c), dtype=torch.float32, device=dev)
    score = torch.empty((n,), dtype=torch.float32, device=dev)
    exit_ = torch.empty((n,), dtype=torch.bool, device=dev)
    pred = torch.empty((n,), dtype=torch.int64, device=dev)
    patience = criterion == 2
    cnt_out = torch.empty((n if patience else 0,), dtype=torch.int32, device=dev)
    if n == 0:
        return logits, score, exit_, pred, cnt_out
    is_f32 = hidden.dtype == torch.float32
    has_pooler = pooler_weight is not None
    pool, block_n, block_c, block_k, block_j, num_warps = _config(n, h, c, is_f32, has_pooler, _INTERPRETED)
    scratch = torch.empty((n, h), dtype=torch.float32, device=dev) if pool == 2 else logits
    lam = float(memory_lambda)
    _exit_head_kernel[(triton.cdiv(n, block_n),)](
        hidden, hidden.stride(0), weight, bias,
        pooler_weight if has_pooler else weight, pooler_bias if has_pooler else bias,
        memory if memory is not None else logits,
        prev_pred if prev_pred is not None else pred,  # dummies are never read
        counter if counter is not None else score,
        scratch, logits, score, exit_, pred, cnt_out if patience else score,
        n, h, c, 1.0 - lam, lam, _f32_ceil(float(threshold)),
        POOL=pool, TANH_LOGITS=bool(tanh_logits), HAS_MEMORY=memory is not None,
        CRITERION=criterion, HAS_PREV=patience and prev_pred is not None,
        HAS_COUNTER=patience and counter is not None, IS_F32=is_f32,
        UPCAST=_INTERPRETED and hidden.dtype == torch.bfloat16,
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_J=block_j,
        num_warps=num_warps,
    )
    return logits, score, exit_, pred, cnt_out


# --------------------------------------------------------------------------- custom op

_OP_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor bias, Tensor? pooler_weight, Tensor? pooler_bias, "
    "bool tanh_logits, Tensor? memory, float memory_lambda, int criterion, float threshold, "
    "Tensor? prev_pred, Tensor? counter) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _fake(hidden, weight, bias, pooler_weight, pooler_bias, tanh_logits, memory,
          memory_lambda, criterion, threshold, prev_pred, counter):
    n, c = hidden.shape[0], weight.shape[0]
    new = hidden.new_empty
    return (
        new((n, c), dtype=torch.float32),
        new((n,), dtype=torch.float32),
        new((n,), dtype=torch.bool),
        new((n,), dtype=torch.int64),
        new((n if criterion == 2 else 0,), dtype=torch.int32),
    )


def _register_op():
    """Define ``eekernels::exit_head_triton`` once per process (safe on re-import)."""
    try:
        return torch.ops.eekernels.exit_head_triton
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("eekernels::exit_head_triton", _launch, mutates_args=(),
                                 schema=_OP_SCHEMA)
    op.register_fake(_fake)
    return torch.ops.eekernels.exit_head_triton


_op = _register_op()


# --------------------------------------------------------------------------- entry point


def exit_head_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pooler_weight: Optional[torch.Tensor] = None,
    pooler_bias: Optional[torch.Tensor] = None,
    tanh_logits: bool = False,
    memory: Optional[torch.Tensor] = None,
    memory_lambda: float = 1.0,
    criterion: str = "entropy",
    threshold: float = 0.0,
    prev_pred: Optional[torch.Tensor] = None,
    counter: Optional[torch.Tensor] = None,
) -> ExitHeadOutput:
    """Fused exit head in one Triton launch; arguments as for ``eekernels.ops.exit_head``
    (already validated; everything contiguous except ``hidden``'s row stride)."""
    code = CRITERIA[criterion]
    if torch.compiler.is_compiling():
        logits, score, exit_, pred, cnt = _op(
            hidden, weight, bias, pooler_weight, pooler_bias, bool(tanh_logits), memory,
            float(memory_lambda), code, float(threshold), prev_pred, counter)
    else:
        logits, score, exit_, pred, cnt = _launch(
            hidden, weight, bias, pooler_weight, pooler_bias, tanh_logits, memory,
            memory_lambda, code, threshold, prev_pred, counter)
    return ExitHeadOutput(logits, score, exit_, pred, cnt if code == 2 else None)
