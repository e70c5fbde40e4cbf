"""Triton implementation of the fused exit head (spec: ``eekernels/ops/exit_head.py``).

One launch; each program computes, for its ``BLOCK_N`` rows and in one pass:

    x      = tanh(Wp h + bp)          optional pooler; float32, never rounded back to half
    z      = W x + b                  classifier, float32 accumulation (tl.dot)
    z      = tanh(z)                  if ``tanh_logits``               (mpee.txt eq. 9)
    z      = (1-lam) m_prev + lam z   if ``memory`` is given           (mpee.txt eq. 10)
    online softmax statistics over class tiles (as csrc/common/exit_head_epilogue.h):
        m = running max, s = sum exp(z - m), t = sum exp(z - m) (z - m), first argmax
    entropy = max(log(s) - t/s, 0), max_prob = 1/s, patience counter, exit mask, pred
    policy  = sigmoid(wo . GELU(Wq x + bq) + bo)   criterion "policy" (P units, erf GELU)

Pooling "mean" (``hidden`` [N, S, H]): a first launch, ``_token_mean_kernel``, writes each
row's masked mean of its tokens to a float32 [N, H] buffer (grid: row blocks x H blocks,
a loop over the S tokens, float32 sums; masked tokens are never loaded), and the head below
reads that buffer (``X_F32``: float32 rows against weights of the input dtype, through the
hi/lo split of ``_dot_f32_lhs``, so the mean is never rounded to a half type).

Structure (every path shares the per-tile logit epilogue ``_logit_tile`` and the exit
decision at the end of ``_exit_head_kernel``):

* ``POOL = 0``, no pooler: per tile of BLOCK_C classes, tl.dot over BLOCK_K-wide tiles of
  ``hidden`` and ``W^T`` (input dtype), float32 accumulator.
* ``POOL = 1``, pooler and C <= 64 (one class tile): for each BLOCK_J-wide column tile j
  of the pooler, ``p_j = tanh(h Wp_j^T + bp_j)`` and ``logits += p_j W[:, j]^T``; the
  pooled rows are never stored.
* ``POOL = 2``, pooler and C > 64: the program writes its float32 pooled rows to a scratch
  [N, H], ``tl.debug_barrier()``, then runs the ``POOL = 0`` loop on them (each program
  reads back only the rows it wrote).
* ``POLICY = 1`` (P <= BLOCK_P): the P units are more outputs accumulated from the very x
  tiles the classifier loads, so x is read once. ``POLICY = 2`` (large P): after the
  classes, a loop over P tiles re-reads the program's x rows (with a pooler, from the
  ``POOL = 2`` scratch). Each tile folds ``wo . GELU(acc + bq)`` into a running sum.

Precision: float32 inputs use ``input_precision="ieee"`` (TF32 would miss the 1e-5
tolerance). Half inputs feed tensor-core dots in the input dtype with a float32
accumulator; float32 pooled activations are split ``hi + lo`` (fp16) or ``hi + lo + lo2``
(bf16) in the input dtype, which keeps ~22 / ~24 of their mantissa bits instead of 11 / 8,
so half results differ from the float32 reference only by summation order. Under the
interpreter (TRITON_INTERPRET=1, which CI uses) bfloat16 tiles are multiplied as raw bits,
so there bf16 operands are upcast to float32 (``UPCAST``; exact, like the GPU's bf16 MMA).
Scores are compared with the float32 threshold of ``_threshold32``, which makes the
comparison equal the spec's.

Block choice (``_config``). Tiles are powers of two >= 16 (tl.dot's minimum); np2 = next
power of two, "half" = fp16/bf16. Why these values: benchmarks/NOTES.md, Triton exit head.

============== ==================================================================
BLOCK_N        16 if N <= 512, 32 if N <= 2048, else 64 (more programs while the grid
               is below the SM count: every program streams all of W and Wp)
POOL = 0       BLOCK_C = clamp(np2(C), 16, 128 if BLOCK_N == 16 else 64; 32 for fp32
               with BLOCK_N == 64); BLOCK_K = clamp(np2(H), 16, 64 half / 32 fp32)
POOL = 1       BLOCK_C = max(np2(C), 16); BLOCK_K = BLOCK_J = clamp(np2(H), 16, 64 half /
               32 fp32)
POOL = 2       BLOCK_C = 64 if BLOCK_N == 16 else 32; BLOCK_K = clamp(np2(H), 16, 32);
               BLOCK_J = clamp(np2(H), 16, 64)
num_warps      8 if BLOCK_N * BLOCK_C >= 2048 or BLOCK_N == 64, else 4
policy         POLICY = 1 with BLOCK_P = max(np2(P), 16) when np2(P) <= 64 (32 with
               POOL = 1 or fp32), else POLICY = 2 with BLOCK_P = 32
interpreter    BLOCK_N = clamp(np2(N), 16, 128), BLOCK_C = clamp(np2(C), 16, 256),
               BLOCK_K = BLOCK_J = clamp(np2(H), 16, 256), POLICY = 1 up to np2(P) = 32:
               its cost is per tile iteration, not per element
============== ==================================================================

``exit_head_triton`` allocates the outputs and launches directly (no other torch ops, no
host syncs); under ``torch.compile`` it calls the custom op ``eekernels::exit_head_triton``
(schema and fake of ``eekernels.ops.exit_head``), opaque to Dynamo/Inductor and capturable
in CUDA graphs.
"""

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ._launch import device_guard, next_pow2, opaque_launcher
from ..ops.contracts.exit_head import CRITERIA, EXIT_HEAD_SCHEMA, ExitHeadArgs, ExitHeadOutput, exit_head_fake

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
def _gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(): the policy network's hidden activation."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _sigmoid(a):
    """Logistic sigmoid without overflow (exp of -|a| only): +-inf -> 1 / 0, NaN -> NaN."""
    e = tl.exp(-tl.abs(a))
    r = 1.0 / (1.0 + e)
    return tl.where(a >= 0.0, r, e * r)


@triton.jit
def _policy_wt(q_ptr, ks, k_ok, p0, P, H, BLOCK_P: tl.constexpr):
    """Wq^T tile [BLOCK_K, BLOCK_P]: element (k, p) = Wq[p0 + p, k] (zero outside)."""
    ps = p0 + tl.arange(0, BLOCK_P)
    return tl.load(q_ptr + ps[None, :].to(tl.int64) * H + ks[:, None],
                   mask=k_ok[:, None] & (ps < P)[None, :], other=0.0)


@triton.jit
def _policy_units(accp, p0, qb_ptr, qo_ptr, P, BLOCK_P: tl.constexpr):
    """sum_p wo[p] * GELU(accp[:, p] + bq[p]) over units p0 .. p0 + BLOCK_P (consistentee.txt:
    the policy network is a two-layer MLP); padded units are forced to 0 (an inf in x
    times a zero-padded Wq row is NaN)."""
    ps = p0 + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    bq = tl.load(qb_ptr + ps, mask=p_ok, other=0.0).to(tl.float32)
    wo = tl.load(qo_ptr + ps, mask=p_ok, other=0.0).to(tl.float32)
    v = _gelu(accp + bq[None, :]) * wo[None, :]
    return tl.sum(tl.where(p_ok[None, :], v, 0.0), axis=1)


@triton.jit
def _dot_in(a, wt, IS_F32: tl.constexpr, UPCAST: tl.constexpr):
    """a [M, K] times wt [K, N], both in the input dtype, float32 result.

    UPCAST (interpreter + bfloat16 only, 1 or 2): the Triton interpreter multiplies
    bfloat16 tiles as their raw uint16 bits, so upcast and use an exact float32 dot instead;
    products of bf16 values are exact in float32, so this matches the GPU's bf16 MMA.
    """
    if IS_F32:
        return tl.dot(a, wt, input_precision="ieee")
    elif UPCAST != 0:
        return tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, wt)


@triton.jit
def _dot_f32_lhs(x, wt, IS_F32: tl.constexpr, UPCAST: tl.constexpr):
    """x [M, K] float32 times wt [K, N] (input dtype), float32 result.

    Half weights: x = hi + lo (+ lo2 for bf16) with the parts in the weights' dtype and
    one half dot each, so the float32 pooled activations keep ~22 (fp16) / ~24 (bf16)
    mantissa bits instead of 11 / 8; products of half values are exact in float32.
    """
    if IS_F32:
        return tl.dot(x, wt, input_precision="ieee")
    elif UPCAST == 1:
        # interpreter + bf16: one exact float32 dot (what the split below approximates to
        # ~2^-24); the interpreter's bf16 conversions are slow, so skip the split there.
        return tl.dot(x, wt.to(tl.float32), input_precision="ieee")
    else:
        hi = x.to(wt.dtype)
        hf = hi.to(tl.float32)
        # an infinite x (an inf token in pooling "mean"'s input) is all hi: inf - inf would
        # make the remainder, and so the row, NaN where the spec has +-inf
        r = tl.where(hf == x, 0.0, x - hf)
        lo = r.to(wt.dtype)
        acc = _dot_in(hi, wt, IS_F32, UPCAST) + _dot_in(lo, wt, IS_F32, UPCAST)
        if wt.dtype == tl.bfloat16:
            lo2 = (r - lo.to(tl.float32)).to(wt.dtype)
            acc += _dot_in(lo2, wt, IS_F32, UPCAST)
        return acc


@triton.jit
def _dot_x(a, wt, X_F32: tl.constexpr, IS_F32: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of the head's input rows times wt (input dtype): the rows are in the input
    dtype, or float32 (``X_F32``: the mean of pooling "mean")."""
    if X_F32:
        return _dot_f32_lhs(a, wt, IS_F32, UPCAST)
    else:
        return _dot_in(a, wt, IS_F32, UPCAST)


# S and N change every call (trimmed padding, exits): do not specialise on them.
@triton.jit(do_not_specialize=["N", "S"])
def _token_mean_kernel(h_ptr, stride_hn, stride_hs, m_ptr, stride_mn, stride_ms, out_ptr, N, S, H,
                       HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r, :] = mean of h[r, t, :] over the tokens t with m[r, t] (every token without a
    mask), float32, 0 for a row without one; a masked token is never loaded. Program: BLOCK_R
    rows x BLOCK_H columns, a loop over the tokens in order (as the C++ kernel)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    col_ok = cols < H
    rows64 = rows.to(tl.int64)
    hp = h_ptr + rows64[:, None] * stride_hn + cols[None, :]  # token 0; pointers step in 64 bits
    mp = m_ptr + rows64 * stride_mn
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_R], dtype=tl.float32)
    for _ in range(0, S):
        if HAS_MASK:
            take = row_ok & (tl.load(mp, mask=row_ok, other=0).to(tl.int32) != 0)
        else:
            take = row_ok
        x = tl.load(hp, mask=take[:, None] & col_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
        cnt += tl.where(take, 1.0, 0.0)
        hp += stride_hs
        mp += stride_ms
    mean = acc / tl.maximum(cnt, 1.0)[:, None]
    tl.store(out_ptr + rows64[:, None] * H + cols[None, :], mean, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _pooler_tile(h_ptr, stride_hn, wp_ptr, bp_ptr, rows64, row_ok, j0, H,
                 X_F32: tl.constexpr, IS_F32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pooled columns j0..j0+BLOCK_J of BLOCK_N rows: tanh(h Wp[j]^T + bp[j]), float32.
    Columns >= H are forced to 0 (an inf in h times a zero-padded Wp column is NaN)."""
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
        acc += _dot_x(a, wt, X_F32, IS_F32, UPCAST)
    bp = tl.load(bp_ptr + cols_j, mask=j_ok, other=0.0).to(tl.float32)
    return tl.where(j_ok[None, :], _tanh(acc + bp[None, :]), 0.0)


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


# N changes every layer as rows exit: do not specialise on it (fewer compiled variants).
@triton.jit(do_not_specialize=["N"])
def _exit_head_kernel(
    h_ptr, stride_hn, w_ptr, b_ptr, wp_ptr, bp_ptr, mem_ptr, prev_ptr, cnt_ptr, scratch_ptr,
    q_ptr, qb_ptr, qo_ptr, qob_ptr,
    logits_ptr, score_ptr, exit_ptr, pred_ptr, cnt_out_ptr,
    N, H, C, P, mem_a, mem_lam, thr,
    POOL: tl.constexpr,  # 0 none, 1 fused (single class tile), 2 scratch
    POLICY: tl.constexpr,  # 0 none, 1 fused (single P tile, same loads as the classes), 2 tiled
    TANH_LOGITS: tl.constexpr, HAS_MEMORY: tl.constexpr, CRITERION: tl.constexpr,
    HAS_PREV: tl.constexpr, HAS_COUNTER: tl.constexpr, IS_F32: tl.constexpr,
    UPCAST: tl.constexpr, X_F32: tl.constexpr,  # h_ptr holds float32 rows (the mean), weights maybe half
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
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
    accp = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)  # policy pre-activations (fused)
    pol = tl.zeros([BLOCK_N], dtype=tl.float32)  # wo . GELU(Wq x + bq)

    if POOL == 1:
        # C <= BLOCK_C: logits = sum_j tanh(h Wp_j^T + bp_j) W[:, j]^T, no scratch.
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < C
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, H, BLOCK_J):
            p = _pooler_tile(h_ptr, stride_hn, wp_ptr, bp_ptr, rows64, row_ok, j0, H,
                             X_F32, IS_F32, UPCAST, BLOCK_N, BLOCK_J, BLOCK_K)
            js = j0 + tl.arange(0, BLOCK_J)
            wt = tl.load(w_ptr + cols[None, :].to(tl.int64) * H + js[:, None],
                         mask=(js < H)[:, None] & c_ok[None, :], other=0.0)
            acc += _dot_f32_lhs(p, wt, IS_F32, UPCAST)
            if POLICY == 1:  # the policy reads the same pooled tile (its input is x too)
                qt = _policy_wt(q_ptr, js, js < H, 0, P, H, BLOCK_P)
                accp += _dot_f32_lhs(p, qt, IS_F32, UPCAST)
        m, s, t, arg, bad = _logit_tile(acc, rows64, row_ok, 0, b_ptr, mem_ptr, logits_ptr,
                                        C, mem_a, mem_lam, m, s, t, arg, bad,
                                        TANH_LOGITS, HAS_MEMORY, BLOCK_C)
    else:
        if POOL == 2:
            # phase 1: pooled rows of this program -> float32 scratch [N, H]
            for j0 in range(0, H, BLOCK_J):
                p = _pooler_tile(h_ptr, stride_hn, wp_ptr, bp_ptr, rows64, row_ok, j0, H,
                                 X_F32, IS_F32, UPCAST, BLOCK_N, BLOCK_J, BLOCK_K)
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
                    if POLICY == 1:
                        if c0 == 0:  # first class tile: the policy shares its x tiles
                            qt = _policy_wt(q_ptr, ks, k_ok, 0, P, H, BLOCK_P)
                            accp += _dot_f32_lhs(x, qt, IS_F32, UPCAST)
                else:
                    a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :],
                                mask=a_mask, other=0.0)
                    acc += _dot_x(a, wt, X_F32, IS_F32, UPCAST)
                    if POLICY == 1:
                        if c0 == 0:
                            qt = _policy_wt(q_ptr, ks, k_ok, 0, P, H, BLOCK_P)
                            accp += _dot_x(a, qt, X_F32, IS_F32, UPCAST)
            m, s, t, arg, bad = _logit_tile(acc, rows64, row_ok, c0, b_ptr, mem_ptr,
                                            logits_ptr, C, mem_a, mem_lam, m, s, t, arg, bad,
                                            TANH_LOGITS, HAS_MEMORY, BLOCK_C)
        if POLICY == 2:
            # Large P: tiles of BLOCK_P units, each re-reading this program's x rows.
            for p0 in range(0, P, BLOCK_P):
                accq = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < H
                    a_mask = row_ok[:, None] & k_ok[None, :]
                    qt = _policy_wt(q_ptr, ks, k_ok, p0, P, H, BLOCK_P)
                    if POOL == 2:
                        x = tl.load(scratch_ptr + rows64[:, None] * H + ks[None, :],
                                    mask=a_mask, other=0.0)
                        accq += _dot_f32_lhs(x, qt, IS_F32, UPCAST)
                    else:
                        a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :],
                                    mask=a_mask, other=0.0)
                        accq += _dot_x(a, qt, X_F32, IS_F32, UPCAST)
                pol += _policy_units(accq, p0, qb_ptr, qo_ptr, P, BLOCK_P)
    if POLICY == 1:
        pol = _policy_units(accp, 0, qb_ptr, qo_ptr, P, BLOCK_P)

    # ---- exit decision (exit_head_epilogue.h decide) ----
    finite = (bad == 0) & (arg >= 0)
    pred = tl.where(finite, arg, -1).to(tl.int64)
    s = tl.where(finite, s, 1.0)  # s >= 1 on finite rows; keeps log/div of 0 off the rest
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
    elif CRITERION == 3:  # policy (ConsistentEE): exit when p(exit) > threshold, strictly
        bo = tl.load(qob_ptr).to(tl.float32)
        pscore = _sigmoid(pol + bo)
        ok = finite & (pscore == pscore)  # a NaN policy score never exits
        score = tl.where(ok, pscore, float("nan"))
        ex = ok & (score > thr)
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

# bf16 dots under the interpreter: 0 native (GPU), 1 float32 dots (fast; the default when
# interpreted), 2 float32 dots that emulate the GPU's hi/lo/lo2 split exactly (tests).
_BF16_INTERPRETER_MODE = 1 if _INTERPRETED else 0

_FUSED_MAX_C = 64  # pooler + C <= this: single class tile, no scratch buffer


def _tile(x: int, cap: int = 1 << 30) -> int:
    """clamp(next_pow2(x), 16, cap): a block size (tl.dot needs >= 16)."""
    return min(max(next_pow2(x), 16), cap)


def _policy_config(p: int, has_pooler: bool, pool: int, is_f32: bool, interpreted: bool):
    """(POOL, POLICY, BLOCK_P) for a policy network of p hidden units (p = 0: none)."""
    if p == 0:
        return pool, 0, 16
    # A 64-unit fused tile spills on sm_90 with float32 inputs (8-48 bytes of stack).
    fused_max = 32 if interpreted or pool == 1 or is_f32 else 64
    if next_pow2(p) <= fused_max:
        return pool, 1, _tile(p)
    # Tiled: the fused pooler cannot re-read its (never stored) pooled rows: use scratch.
    return (2 if has_pooler else pool), 2, 32


@functools.lru_cache(maxsize=4096)
def _config(n: int, h: int, c: int, is_f32: bool, has_pooler: bool, interpreted: bool = False,
            p: int = 0):
    """(POOL, BLOCK_N, BLOCK_C, BLOCK_K, BLOCK_J, num_warps, POLICY, BLOCK_P); see the
    module docstring. ``p``: the policy network's hidden units (0 without it)."""
    pool, policy, block_p = _policy_config(
        p, has_pooler, 0 if not has_pooler else (1 if c <= _FUSED_MAX_C else 2), is_f32, interpreted)
    if interpreted:
        # Interpreter: time is per tile *iteration*, not per element, so use big tiles.
        block_n = _tile(n, 128)
        block_c = _tile(c) if pool == 1 else _tile(c, 256)
        block_k = block_j = _tile(h, 256)
        return pool, block_n, block_c, block_k, block_j, 4, policy, block_p
    # GPU table: caps that keep the tiles in registers on sm_90 (benchmarks/NOTES.md).
    block_n = 16 if n <= 512 else (32 if n <= 2048 else 64)
    kmax = 32 if is_f32 else 64
    if pool == 0:
        cmax = 128 if block_n == 16 else (32 if block_n == 64 and is_f32 else 64)
        block_c = _tile(c, cmax)
        block_k, block_j = _tile(h, kmax), 16  # block_j unused
    elif pool == 1:
        block_c = _tile(c)
        block_k = block_j = _tile(h, kmax)
    else:
        block_c = 64 if block_n == 16 else 32
        block_k, block_j = _tile(h, 32), _tile(h, 64)
    num_warps = 8 if block_n * block_c >= 2048 or block_n == 64 else 4
    return pool, block_n, block_c, block_k, block_j, num_warps, policy, block_p


@functools.lru_cache(maxsize=256)
def _threshold32(x: float, patience: bool) -> float:
    """The float32 threshold the kernel compares its float32 score with (x >= 0, inf ok).

    entropy / max_prob: the spec's ``score < threshold`` / ``score >= threshold`` compare a
    float32 tensor with a Python float, which torch does in float32 after rounding the
    threshold to nearest (overflow -> inf); do the same.
    patience: the spec compares ``counter.double() >= threshold`` in double; for a float32
    value v (every int32 counter a layer count can reach), ``v >= x`` <=> ``v >= ceil32(x)``
    with ceil32(x) the smallest float32 >= x, so rounding the threshold up is exact.
    """
    try:
        f = struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.inf
    if patience and f < x:
        bits = struct.unpack("<I", struct.pack("<f", f))[0] + 1
        f = struct.unpack("<f", struct.pack("<I", bits))[0]
    return f


def _mean_config(n: int, h: int, interpreted: bool):
    """(BLOCK_R, BLOCK_H) of ``_token_mean_kernel``: on a GPU 4 rows x up to 256 columns a
    program (coalesced rows, enough programs at a few rows; not tuned on hardware yet); in
    the interpreter, whose cost is per loop iteration, up to 64 rows x 1024 columns."""
    if interpreted:
        return min(max(next_pow2(n), 2), 64), _tile(h, 1024)
    return 4, _tile(h, 256)


def _token_mean(hidden: torch.Tensor, mask) -> torch.Tensor:
    """float32 [N, H]: the masked mean of ``hidden`` [N, S, H]'s tokens (pooling "mean")."""
    n, s, h = hidden.shape
    out = torch.empty((n, h), dtype=torch.float32, device=hidden.device)
    block_r, block_h = _mean_config(n, h, _INTERPRETED)
    has_mask = mask is not None
    _token_mean_kernel[(triton.cdiv(n, block_r), triton.cdiv(h, block_h))](
        hidden, hidden.stride(0), hidden.stride(1),
        mask if has_mask else hidden, mask.stride(0) if has_mask else 0, mask.stride(1) if has_mask else 0,
        out, n, s, h, HAS_MASK=has_mask, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4,
    )
    return out


def _launch(*op_args, **op_kwargs):
    """Allocate the outputs and launch; the arguments and outputs of :data:`EXIT_HEAD_SCHEMA`."""
    a = ExitHeadArgs.from_op_args(op_args, op_kwargs)
    hidden, weight = a.hidden, a.weight
    n, h = hidden.shape[0], hidden.shape[-1]
    c = weight.shape[0]
    dev = hidden.device
    logits = torch.empty((n, c), dtype=torch.float32, device=dev)
    score = torch.empty((n,), dtype=torch.float32, device=dev)
    exit_ = torch.empty((n,), dtype=torch.bool, device=dev)
    pred = torch.empty((n,), dtype=torch.int64, device=dev)
    patience = a.criterion == "patience"
    cnt_out = torch.empty((n if patience else 0,), dtype=torch.int32, device=dev)
    if n == 0:
        return logits, score, exit_, pred, cnt_out
    is_f32 = weight.dtype == torch.float32
    has_pooler = a.pooler_weight is not None
    has_policy = a.criterion == "policy"
    p = a.policy_weight.shape[0] if has_policy else 0
    pool, block_n, block_c, block_k, block_j, num_warps, policy, block_p = _config(
        n, h, c, is_f32, has_pooler, _INTERPRETED, p)
    scratch = torch.empty((n, h), dtype=torch.float32, device=dev) if pool == 2 else logits
    lam = float(a.memory_lambda)
    bias = a.bias
    with device_guard(dev):
        if a.pooling == "mean":  # the head reads the float32 mean instead of hidden
            hidden = _token_mean(hidden, a.token_mask)
        _exit_head_kernel[(triton.cdiv(n, block_n),)](
            hidden, hidden.stride(0), weight, bias,
            a.pooler_weight if has_pooler else weight, a.pooler_bias if has_pooler else bias,
            logits if a.memory is None else a.memory,  # dummies (never read) for absent inputs
            pred if a.prev_pred is None else a.prev_pred,
            score if a.counter is None else a.counter,
            scratch,
            a.policy_weight if has_policy else weight, a.policy_bias if has_policy else bias,
            a.policy_out_weight if has_policy else bias, a.policy_out_bias if has_policy else bias,
            logits, score, exit_, pred, cnt_out if patience else score,
            n, h, c, p, 1.0 - lam, lam, _threshold32(float(a.threshold), patience),
            POOL=pool, POLICY=policy, TANH_LOGITS=bool(a.tanh_logits), HAS_MEMORY=a.memory is not None,
            CRITERION=CRITERIA[a.criterion], HAS_PREV=patience and a.prev_pred is not None,
            HAS_COUNTER=patience and a.counter is not None, IS_F32=is_f32,
            UPCAST=_BF16_INTERPRETER_MODE if weight.dtype == torch.bfloat16 else 0,
            X_F32=hidden.dtype != weight.dtype,
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_J=block_j,
            BLOCK_P=block_p, num_warps=num_warps,
        )
    return logits, score, exit_, pred, cnt_out


_call = opaque_launcher("exit_head_triton", _launch, EXIT_HEAD_SCHEMA, exit_head_fake)


def exit_head_triton(a: ExitHeadArgs) -> ExitHeadOutput:
    """Fused exit head in one Triton launch; ``a`` validated by ``eekernels.ops.exit_head``
    and made contiguous here (:meth:`ExitHeadArgs.for_kernels`)."""
    return ExitHeadOutput.from_op(_call(*a.for_kernels().op_args()), a.criterion)
