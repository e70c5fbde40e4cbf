"""Shared test utilities: backends under test, tolerances, poisoning, comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

import eekernels

#: The real task data (GLUE, IMDb) beside the checkout; tests that read it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Norm-wise relative error allowed on float outputs, per input dtype.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def kernel_backends(device: str):
    """The non-reference backends that can run on ``device`` in this process."""
    return eekernels.backends.runnable_backends(device, include_reference=False)


def poison_allocator(device: str, nbytes: int = 32 << 20) -> None:
    """Fill then free a block so that freshly allocated outputs hold garbage (NaN bytes)
    rather than zeros: an output element a kernel forgets to write then fails the test."""
    t = torch.full((nbytes // 4,), float("nan"), device=device)
    del t


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over finite entries of ref (NaN never passes).

    The tests draw O(1) logits, so the denominator is at least sqrt(numel): a tiny output
    that is small only by cancellation (N=1, C=1) is judged by its absolute error."""
    out = out.double()
    ref = ref.double()
    fin = torch.isfinite(ref)
    if torch.isnan(out[fin]).any():
        return float("inf")
    num = (out[fin] - ref[fin]).norm()
    den = max(float(ref[fin].norm()), float(fin.sum()) ** 0.5)
    return float(num) / den if den > 0 else float(num)


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape, device and bit pattern (NaNs, -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.dtype.is_floating_point:
        it = _INT_VIEW[a.element_size()]
        return torch.equal(a.contiguous().view(it), b.contiguous().view(it))
    return torch.equal(a, b)


def threshold_between(scores, quantile: float = 0.5, min_gap: float = 1e-4) -> float:
    """A threshold strictly between two neighbouring distinct scores, never on one.

    The finite ``scores`` are sorted; among the gaps between neighbours that are at least
    ``min_gap`` wide, the one nearest the ``quantile`` of the sorted scores is taken and its
    midpoint returned. Every score then sits at least ``min_gap / 2`` from the threshold, far
    beyond float32 noise (padding, batch composition, thread count and backend change the
    last bits of a score), so which side a sample falls on cannot flip. The quantile keeps
    samples on both sides, so exits spread over layers.
    """
    s = torch.as_tensor(scores).detach().double().flatten().cpu()
    s = s[torch.isfinite(s)].sort().values
    if s.numel() < 2:
        raise AssertionError(f"threshold_between: need at least 2 finite scores, got {s.numel()}")
    gaps = s[1:] - s[:-1]
    wide = (gaps >= min_gap).nonzero().flatten()
    if wide.numel() == 0:
        raise AssertionError(f"threshold_between: no two scores are {min_gap} apart (range {float(s[0])}..{float(s[-1])})")
    target = quantile * (s.numel() - 1)
    k = int(wide[(wide.double() + 0.5 - target).abs().argmin()])
    return float((s[k] + s[k + 1]) / 2)
