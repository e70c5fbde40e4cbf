"""Ragged batch compaction for the batched early-exit engine.

After each layer the engine holds N active rows and the exit head's bool mask ``exit``
[N]. Two ops move the rows around:

``scatter_exits(out_logits, out_layer, batch_index, exit, logits, layer)`` (in place)
    writes the exited rows' results to their original batch positions::

        for i with exit[i]:  out_logits[batch_index[i]] = logits[i]
                             out_layer[batch_index[i]]  = layer

``compact_rows(keep, tensors)``
    keeps the surviving rows (``keep = ~exit``) of every per-row tensor, in stable
    (ascending) order::

        index = keep.nonzero()[:, 0]           # int64 [M]
        out   = [t[index] for t in tensors]    # each [M, ...], new contiguous tensors

``compact_rows_reference`` and ``scatter_exits_reference`` below are the specification;
the C++ CPU, Triton and CUDA kernels compute the same thing.

Synchronisation. ``compact_rows`` returns tensors whose size M depends on the mask, so the
host must learn M to allocate them: every backend reads the survivor count back from the
device exactly once per call (on the GPU backends, after a device-side prefix scan that
writes ``index`` and the count; the CUDA kernel writes the count straight into pinned host
memory, then the host synchronises the stream). It therefore cannot be captured in a CUDA
graph. ``scatter_exits`` never synchronises (one kernel on the GPU, no host reads).

Strides. The kernels take any stride for the first (row) dimension, including the
strided rows of a slice such as ``states[:, 0]``. A tensor whose rows are not contiguous
in memory themselves (e.g. a transposed [S, N] tensor seen as [N, S]) is copied to a
contiguous tensor by the Python wrapper first (one extra copy; pass row-contiguous
tensors to avoid it). Rows are copied as raw bytes, so every dtype is supported
(float32/16, bfloat16, int64/32, bool, ...); conjugate/negative-bit views are resolved
first.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import backends
from ._checks import check_tensor, needs_autograd
from ._registry import register_op
from .contracts.compaction import CompactedRows, compact_rows_fake, scatter_exits_fake

__all__ = [
    "CompactedRows",
    "compact_rows",
    "compact_rows_reference",
    "scatter_exits",
    "scatter_exits_reference",
]

_LAYER_DTYPES = (torch.int32, torch.int64)

# --------------------------------------------------------------------------- reference


def compact_rows_reference(keep: torch.Tensor, tensors: Sequence[torch.Tensor]) -> CompactedRows:
    """Plain-PyTorch compaction: the specification (differentiable; syncs on GPU)."""
    index = keep.nonzero().reshape(-1)
    return CompactedRows(index, [t[index].contiguous() for t in tensors])


def scatter_exits_reference(
    out_logits: torch.Tensor,
    out_layer: torch.Tensor,
    batch_index: torch.Tensor,
    exit: torch.Tensor,
    logits: torch.Tensor,
    layer: int,
) -> None:
    """Plain-PyTorch scatter of exited rows into the batch-sized outputs: the specification."""
    rows = batch_index[exit]
    out_logits[rows] = logits[exit].to(out_logits.dtype)
    out_layer[rows] = layer


# --------------------------------------------------------------------------- validation


def validate_compact_rows_args(keep, tensors) -> None:
    """Raise a clear TypeError/ValueError for any bad argument (never reads tensor values)."""
    op = "compact_rows"
    check_tensor("keep", op, keep, ndim=1, dtypes=(torch.bool,))
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    n = keep.shape[0]
    for j, t in enumerate(tensors):
        check_tensor(f"tensors[{j}]", op, t, min_dim=1, device=keep.device)
        if t.shape[0] != n:
            raise ValueError(f"{op}: tensors[{j}] has {t.shape[0]} rows (shape {tuple(t.shape)}) but keep has N={n}")
        if t.is_quantized:
            raise TypeError(f"{op}: tensors[{j}] is quantized ({t.dtype}); not supported")


def validate_scatter_exits_args(out_logits, out_layer, batch_index, exit, logits, layer) -> None:
    """Raise a clear TypeError/ValueError for any bad argument (never reads tensor values)."""
    op = "scatter_exits"
    check_tensor("logits", op, logits, ndim=2, dtypes=(torch.float32,))
    dev = logits.device
    n, c = logits.shape
    check_tensor("out_logits", op, out_logits, ndim=2, dtypes=(torch.float32,), device=dev)
    if out_logits.shape[1] != c:
        raise ValueError(f"{op}: out_logits is {tuple(out_logits.shape)} but logits has C={c}; expected [B, {c}]")
    if c > 1 and out_logits.stride(1) != 1:
        raise ValueError(f"{op}: out_logits is written in place, so its last dim must be contiguous (stride 1), "
                         f"got strides {out_logits.stride()}")
    b = out_logits.shape[0]
    check_tensor("out_layer", op, out_layer, ndim=1, dtypes=_LAYER_DTYPES, device=dev)
    if out_layer.shape[0] != b:
        raise ValueError(f"{op}: out_layer has {out_layer.shape[0]} entries but out_logits has B={b} rows")
    check_tensor("batch_index", op, batch_index, ndim=1, dtypes=(torch.int64,), device=dev)
    if batch_index.shape[0] != n:
        raise ValueError(f"{op}: batch_index has {batch_index.shape[0]} entries but logits has N={n} rows")
    check_tensor("exit", op, exit, ndim=1, dtypes=(torch.bool,), device=dev)
    if exit.shape[0] != n:
        raise ValueError(f"{op}: exit has {exit.shape[0]} entries but logits has N={n} rows")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{op}: layer must be an int (1-based layer number), got {type(layer).__name__}")
    if layer < 1:
        raise ValueError(f"{op}: layer is 1-based and must be >= 1, got {layer}")
    if out_layer.dtype == torch.int32 and layer > 2**31 - 1:
        raise ValueError(f"{op}: layer {layer} does not fit out_layer's int32")
    if torch.compiler.is_compiling():  # storage identity is not traceable
        return
    for name, t in (("out_logits", out_logits), ("out_layer", out_layer)):
        for other_name, other in (("logits", logits), ("batch_index", batch_index), ("exit", exit)):
            if t.numel() and other.numel() and t.untyped_storage().data_ptr() == other.untyped_storage().data_ptr():
                raise ValueError(f"{op}: {name} must not share memory with {other_name}")


# --------------------------------------------------------------------------- dispatch


def _rows_contiguous(t: torch.Tensor) -> bool:
    """True when each row t[i] (all dims but the first) is one contiguous block."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _prepare_rows(t: torch.Tensor) -> torch.Tensor:
    """What the kernels take: resolved conj/neg bits, rows contiguous (any row stride)."""
    if t.is_complex():  # only complex tensors carry lazy conj/neg bits
        t = t.resolve_conj().resolve_neg()
    if not _rows_contiguous(t):
        t = t.contiguous()
    return t


def compact_rows(keep: torch.Tensor, tensors: Sequence[torch.Tensor], *, backend=None) -> CompactedRows:
    """Keep the rows where ``keep`` is True of every tensor in ``tensors``, in stable order.

    Args:
        keep: bool [N], True for the rows that stay (the survivors, e.g. ``~exit``).
        tensors: list of tensors whose first dim is N, any trailing shape and dtype, all on
            ``keep``'s device (hidden states [N, S, H], attention masks [N, S], per-row
            state [N] / [N, C], ...). Any row stride is taken as is; tensors whose rows
            are not contiguous themselves are copied to contiguous first.
        backend: "torch", "cpu", "triton" or "cuda"; default: :func:`eekernels.get_backend`
            or the fastest available for ``keep``'s device.

    Returns:
        :class:`CompactedRows` (index int64 [M], tensors [M, ...] contiguous). N = 0 and
        M = 0 are fine.

    Synchronises once: the host reads the survivor count M (see the module docstring).
    When autograd is recording and a tensor requires grad, the differentiable reference
    runs, whatever the backend.
    """
    validate_compact_rows_args(keep, tensors)
    tensors = list(tensors)
    if needs_autograd(*tensors):
        return compact_rows_reference(keep, tensors)
    name = backends.resolve(backend, keep.device)
    if name == "torch":
        return compact_rows_reference(keep, tensors)
    keep = keep.contiguous()
    tensors = [_prepare_rows(t) for t in tensors]
    return backends.implementation("compact_rows", name)(keep, tensors)


def scatter_exits(
    out_logits: torch.Tensor,
    out_layer: torch.Tensor,
    batch_index: torch.Tensor,
    exit: torch.Tensor,
    logits: torch.Tensor,
    layer: int,
    *,
    backend=None,
) -> None:
    """Write the exited rows' logits and exit layer to their batch positions, in place.

    For every i with ``exit[i]``: ``out_logits[batch_index[i]] = logits[i]`` and
    ``out_layer[batch_index[i]] = layer``; nothing else is written.

    Args:
        out_logits: float32 [B, C], the batch-sized logits output (written in place; its
            last dim must be contiguous, any row stride).
        out_layer: int32 or int64 [B], the batch-sized exit-layer output (in place, any stride).
        batch_index: int64 [N], each active row's original batch position. The values must
            be unique and in [0, B); this is not checked on the GPU (it would need a host
            read): there, rows with an out-of-range position are skipped and duplicate
            positions leave either row's result. The CPU backends raise on out-of-range values.
        exit: bool [N], True for the rows that exit at this layer.
        logits: float32 [N, C], the exit head's logits of the active rows.
        layer: the 1-based number of the layer the rows exit at (>= 1).
        backend: as for :func:`compact_rows`.

    No host synchronisation on the GPU backends (one fused kernel).
    """
    validate_scatter_exits_args(out_logits, out_layer, batch_index, exit, logits, layer)
    if needs_autograd(out_logits, logits):
        scatter_exits_reference(out_logits, out_layer, batch_index, exit, logits, layer)
        return
    name = backends.resolve(backend, logits.device)
    if name == "torch":
        scatter_exits_reference(out_logits, out_layer, batch_index, exit, logits, layer)
        return
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    batch_index, exit = batch_index.contiguous(), exit.contiguous()
    backends.implementation("scatter_exits", name)(out_logits, out_layer, batch_index, exit, logits, int(layer))


def _compact_rows_compiled(keep, tensors) -> CompactedRows:
    index, rows = torch.ops.eekernels.compact_rows(keep, tensors)
    return CompactedRows(index, list(rows))


def _scatter_exits_compiled(*args) -> None:
    torch.ops.eekernels.scatter_exits(*args)


register_op("compact_rows", _compact_rows_compiled, "eekernels.triton.compaction:compact_rows_triton",
            compact_rows_fake)
register_op("scatter_exits", _scatter_exits_compiled, "eekernels.triton.compaction:scatter_exits_triton",
            scatter_exits_fake)
