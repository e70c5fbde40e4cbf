"""Row compaction (compact_rows, scatter_exits): every backend against the reference.

Rows are copied as raw bytes, so outputs must match the reference bit for bit (float
inputs include NaN, inf and -0.0 to check that)."""

from __future__ import annotations

import pytest
import torch

import eekernels
from eekernels.ops import (
    CompactedRows,
    compact_rows,
    compact_rows_reference,
    scatter_exits,
    scatter_exits_reference,
)

from ..helpers import kernel_backends, poison_allocator, same_bits

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)
NS = (0, 1, 2, 7, 513)
MASKS = ("all", "none", "random", "alternate")
S, H = 5, 33  # odd trailing sizes


def rnd(shape, dtype, g, device="cpu"):
    """Fresh random values (never zeros); floats carry a few NaN/inf/-0.0 entries."""
    if dtype == torch.bool:
        return (torch.rand(shape, generator=g) < 0.5).to(device)
    if not dtype.is_floating_point:
        return torch.randint(-(2**30), 2**30, shape, generator=g).to(dtype).to(device)
    t = torch.randn(shape, generator=g)
    flat = t.view(-1)
    if flat.numel() >= 8:
        flat[1], flat[3], flat[5], flat[7] = float("nan"), float("inf"), -0.0, float("-inf")
    return t.to(dtype).to(device)


def make_keep(n, kind, g, device="cpu"):
    if kind == "all":
        k = torch.ones(n, dtype=torch.bool)
    elif kind == "none":
        k = torch.zeros(n, dtype=torch.bool)
    elif kind == "alternate":
        k = torch.arange(n) % 2 == 1
    else:
        k = torch.rand(n, generator=g) < 0.5
    return k.to(device)



def mixed_tensors(n, g, device="cpu"):
    """Per-row tensors as the engine holds them, plus non-contiguous views (10 tensors:
    more than one Triton gather launch)."""
    return [
        rnd((n, S, H), torch.float16, g, device),                  # hidden states
        rnd((n, S), torch.int64, g, device),                       # attention mask
        rnd((n,), torch.int64, g, device),                         # batch index
        rnd((n,), torch.int32, g, device),                         # patience counter
        rnd((n, 3), torch.float32, g, device),                     # logit memory [N, C]
        rnd((S, n), torch.bool, g, device).t(),                    # transposed: rows not contiguous
        rnd((n, 3, H), torch.bfloat16, g, device)[:, 1],           # [CLS]-like slice: row stride 3H
        rnd((n, 7), torch.int32, g, device)[:, 2],                 # column of a matrix: stride 7
        rnd((1, S), torch.float32, g, device).expand(n, S),        # broadcast rows: row stride 0
        rnd((n + 1, S, H), torch.float32, g, device)[1:],          # storage offset
    ]


def check_compacted(out: CompactedRows, keep, tensors):
    ref = compact_rows_reference(keep, tensors)
    assert isinstance(out, CompactedRows)
    assert out.index.dtype == torch.int64 and out.index.dim() == 1
    assert torch.equal(out.index, ref.index), "kept indices differ"
    assert len(out.tensors) == len(tensors)
    for j, (o, r) in enumerate(zip(out.tensors, ref.tensors)):
        assert o.is_contiguous(), f"tensors[{j}] output not contiguous"
        assert same_bits(o, r), f"tensors[{j}] ({r.dtype}, {tuple(r.shape)}) differs from the reference"


# --------------------------------------------------------------------------- compact_rows, CPU


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("n", NS)
def test_compact_rows_mixed_cpu(backend, n, mask):
    g = torch.Generator().manual_seed(n * 10 + MASKS.index(mask))
    tensors = mixed_tensors(n, g)
    keep = make_keep(n, mask, g)
    poison_allocator("cpu")
    check_compacted(compact_rows(keep, tensors, backend=backend), keep, tensors)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("trailing", [(), (S,), (S, H)], ids=["N", "NxS", "NxSxH"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_compact_rows_dtypes_shapes_cpu(backend, dtype, trailing):
    g = torch.Generator().manual_seed(len(trailing) * 100 + ALL_DTYPES.index(dtype))
    n = 513
    base = rnd((n, *trailing), dtype, g)
    strided = rnd((n, 2, *trailing), dtype, g)[:, 1]  # row stride 2 * row size
    keep = make_keep(n, "random", g)
    poison_allocator("cpu")
    check_compacted(compact_rows(keep, [base, strided], backend=backend), keep, [base, strided])


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_compact_rows_misaligned_rows_cpu(backend):
    """Row sizes/strides/offsets that are not multiples of 16 or 8 bytes: narrower words."""
    g = torch.Generator().manual_seed(7)
    n = 37
    tensors = [
        rnd((n * 3 + 1,), torch.int8, g)[1:].view(n, 3),          # odd offset, 3-byte rows
        rnd((n, 9), torch.float16, g)[:, 1:8],                     # 2-byte aligned, 14-byte rows
        rnd((n, 5), torch.int32, g)[:, 1:4],                       # 4-byte aligned, 12-byte rows
        rnd((n, 0), torch.float32, g),                             # empty rows
    ]
    keep = make_keep(n, "random", g)
    check_compacted(compact_rows(keep, tensors, backend=backend), keep, tensors)


def test_compact_rows_default_backend_and_empty_list():
    keep = torch.tensor([True, False, True])
    out = compact_rows(keep, [])
    assert torch.equal(out.index, torch.tensor([0, 2])) and out.tensors == []
    x = torch.randn(3, 4)
    out = compact_rows(keep, (x,), backend="torch")
    assert torch.equal(out.tensors[0], x[[0, 2]])


def test_compact_rows_autograd_uses_reference():
    x = torch.randn(5, 3, requires_grad=True)
    keep = torch.tensor([True, False, True, True, False])
    out = compact_rows(keep, [x], backend="cpu" if "cpu" in eekernels.available_backends() else None)
    out.tensors[0].sum().backward()
    assert torch.equal(x.grad, keep.float()[:, None].expand(5, 3))


# --------------------------------------------------------------------------- scatter_exits, CPU


def make_scatter(n, c, b_extra, mask, layer_dtype, g, device="cpu", strided=False):
    b = n + b_extra
    out_buf = torch.randn(b, c + 3, generator=g)
    out_logits = out_buf[:, :c] if strided else out_buf[:, :c].contiguous()
    lay_buf = torch.randint(0, 50, (2 * b,), generator=g).to(layer_dtype)
    out_layer = lay_buf[::2] if strided else lay_buf[:b].clone()
    batch_index = torch.randperm(b, generator=g)[:n]
    exit_ = make_keep(n, mask, g)
    logits = torch.randn(c, n, generator=g).t() if strided else torch.randn(n, c, generator=g)
    args = [out_logits, out_layer, batch_index, exit_, logits]
    return [a.to(device) for a in args]


def run_scatter(backend, args, layer):
    out_logits, out_layer, batch_index, exit_, logits = args
    ref_logits, ref_layer = out_logits.clone(), out_layer.clone()
    scatter_exits_reference(ref_logits, ref_layer, batch_index, exit_, logits, layer)
    scatter_exits(out_logits, out_layer, batch_index, exit_, logits, layer, backend=backend)
    assert same_bits(out_logits, ref_logits), "out_logits differs from the reference"
    assert torch.equal(out_layer, ref_layer), "out_layer differs from the reference"


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("n", NS)
def test_scatter_exits_cpu(backend, n, mask):
    g = torch.Generator().manual_seed(1000 + n * 10 + MASKS.index(mask))
    for i, (c, layer_dtype, strided) in enumerate(((1, torch.int32, False), (2, torch.int64, True),
                                                   (33, torch.int32, True), (4, torch.int64, False))):
        args = make_scatter(n, c, 5, mask, layer_dtype, g, strided=strided)
        run_scatter(backend, args, layer=3 + i)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_scatter_exits_writes_only_exited_rows(backend):
    b, c = 6, 2
    out_logits = torch.full((b, c), -7.0)
    out_layer = torch.full((b,), -1, dtype=torch.int64)
    logits = torch.arange(6.0).view(3, 2)
    scatter_exits(out_logits, out_layer, torch.tensor([4, 0, 2]), torch.tensor([True, False, True]),
                  logits, 5, backend=backend)
    expect = torch.full((b, c), -7.0)
    expect[4], expect[2] = logits[0], logits[2]
    assert torch.equal(out_logits, expect)
    assert out_layer.tolist() == [-1, -1, 5, -1, 5, -1]


def test_scatter_exits_cpu_rejects_out_of_range_positions():
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    out_logits, out_layer = torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        scatter_exits(out_logits, out_layer, torch.tensor([0, 3]), torch.tensor([True, True]),
                      torch.ones(2, 2), 1, backend="cpu")
    assert not out_logits.any() and not out_layer.any()  # nothing written
    # a non-exited row's position is never used
    scatter_exits(out_logits, out_layer, torch.tensor([0, 99]), torch.tensor([True, False]),
                  torch.ones(2, 2), 1, backend="cpu")
    assert out_layer.tolist() == [1, 0, 0]


def test_scatter_exits_triton_skips_out_of_range_positions():
    if "triton" not in kernel_backends("cpu"):
        pytest.skip("triton interpreter unavailable")
    out_logits, out_layer = torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32)
    scatter_exits(out_logits, out_layer, torch.tensor([1, 3, -1]), torch.tensor([True, True, True]),
                  torch.ones(3, 2), 2, backend="triton")
    assert out_layer.tolist() == [0, 2, 0]
    assert out_logits[1].tolist() == [1.0, 1.0] and not out_logits[[0, 2]].any()


# --------------------------------------------------------------------------- bad input


def _keep():
    return torch.tensor([True, False, True])


COMPACT_BAD = [
    (lambda: (_keep().int(), [torch.randn(3)]), TypeError, "keep must have dtype"),
    (lambda: (_keep()[None], [torch.randn(3)]), ValueError, "keep must have 1 dim"),
    (lambda: ([True, False], [torch.randn(2)]), TypeError, "keep must be a torch.Tensor"),
    (lambda: (_keep(), torch.randn(3)), TypeError, "list or tuple"),
    (lambda: (_keep(), [torch.randn(4, 2)]), ValueError, r"tensors\[0\] has 4 rows"),
    (lambda: (_keep(), [torch.randn(3), torch.tensor(1.0)]), ValueError, "at least 1 dim"),
    (lambda: (_keep(), [torch.randn(3, device="meta")]), ValueError, "one device"),
    (lambda: (_keep(), [torch.randn(3, 2).to_sparse()]), TypeError, "dense"),
    (lambda: (_keep(), ["x"]), TypeError, "must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,exc,match", COMPACT_BAD)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_compact_rows_bad_input(backend, make, exc, match):
    keep, tensors = make()
    with pytest.raises(exc, match=match):
        compact_rows(keep, tensors, backend=backend)


def _scatter_ok():
    return dict(out_logits=torch.zeros(4, 2), out_layer=torch.zeros(4, dtype=torch.int32),
                batch_index=torch.tensor([0, 2, 3]), exit=torch.tensor([True, False, True]),
                logits=torch.randn(3, 2), layer=1)


SCATTER_BAD = [
    (dict(logits=torch.randn(3, 2).half()), TypeError, "logits must have dtype"),
    (dict(logits=torch.randn(3)), ValueError, "logits must have 2 dim"),
    (dict(out_logits=torch.zeros(4, 3)), ValueError, "expected \\[B, 2\\]"),
    (dict(out_logits=torch.zeros(4, 2, dtype=torch.float64)), TypeError, "out_logits must have dtype"),
    (dict(out_logits=torch.zeros(2, 4).t()), ValueError, "last dim must be contiguous"),
    (dict(out_layer=torch.zeros(4)), TypeError, "out_layer must have dtype"),
    (dict(out_layer=torch.zeros(5, dtype=torch.int64)), ValueError, "B=4"),
    (dict(batch_index=torch.tensor([0, 2, 3], dtype=torch.int32)), TypeError, "batch_index must have dtype"),
    (dict(batch_index=torch.tensor([0, 2])), ValueError, "batch_index has 2 entries"),
    (dict(exit=torch.tensor([1, 0, 1])), TypeError, "exit must have dtype"),
    (dict(exit=torch.tensor([True, False])), ValueError, "exit has 2 entries"),
    (dict(layer=0), ValueError, "must be >= 1"),
    (dict(layer=2.0), TypeError, "layer must be an int"),
    (dict(layer=True), TypeError, "layer must be an int"),
    (dict(layer=2**31), ValueError, "does not fit"),
    (dict(batch_index=torch.tensor([0, 2, 3], device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("change,exc,match", SCATTER_BAD)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_scatter_exits_bad_input(backend, change, exc, match):
    args = _scatter_ok()
    args.update(change)
    with pytest.raises(exc, match=match):
        scatter_exits(**args, backend=backend)


def test_scatter_exits_rejects_aliasing():
    buf = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="share memory"):
        scatter_exits(buf, torch.zeros(3, dtype=torch.int32), torch.tensor([0, 1, 2]),
                      torch.tensor([True, True, True]), buf, 1, backend="torch")


def test_compiled_ops_check_direct_calls():
    """The C++ ops guard direct torch.ops calls with errors, not crashes."""
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    ops = torch.ops.eekernels
    keep = _keep()
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.compact_rows(keep, [torch.randn(2, 3).t()])
    with pytest.raises(RuntimeError, match="N=3 rows"):
        ops.compact_rows(keep, [torch.randn(2)])
    with pytest.raises(RuntimeError, match="1-d bool"):
        ops.compact_rows(keep.int(), [])
    a = _scatter_ok()
    with pytest.raises(RuntimeError, match="layer is 1-based"):
        ops.scatter_exits(a["out_logits"], a["out_layer"], a["batch_index"], a["exit"], a["logits"], 0)
    with pytest.raises(RuntimeError, match="out_layer must be int32 or int64"):
        ops.scatter_exits(a["out_logits"], a["out_layer"].float(), a["batch_index"], a["exit"], a["logits"], 1)
    with pytest.raises(RuntimeError, match="exit must be contiguous bool"):
        ops.scatter_exits(a["out_logits"], a["out_layer"], a["batch_index"], a["exit"].int(), a["logits"], 1)


# --------------------------------------------------------------------------- custom ops


def _ops(backend):
    if backend == "cpu":
        return torch.ops.eekernels.compact_rows.default, torch.ops.eekernels.scatter_exits.default
    import eekernels.triton.compaction  # noqa: F401  (registers the ops)

    return torch.ops.eekernels.compact_rows_triton.default, torch.ops.eekernels.scatter_exits_triton.default


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    """Schema (incl. mutation of out_logits/out_layer) and fake implementations."""
    compact, scatter = _ops(backend)
    g = torch.Generator().manual_seed(3)
    keep = make_keep(9, "random", g)
    tensors = [rnd((9, 4, 5), torch.float16, g), rnd((9,), torch.int64, g), rnd((9, 3), torch.bool, g)]
    torch.library.opcheck(compact, (keep, tensors), test_utils=("test_schema", "test_faketensor"))
    args = make_scatter(9, 3, 4, "random", torch.int32, g)
    torch.library.opcheck(scatter, (*args, 4), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_torch_compile_traces_the_ops(backend):
    g = torch.Generator().manual_seed(4)
    n, b = 11, 14
    hidden, state = rnd((n, S, H), torch.float32, g).nan_to_num(), rnd((n,), torch.int64, g)
    logits, batch_index = torch.randn(n, 3, generator=g), torch.randperm(b, generator=g)[:n]
    exit_ = make_keep(n, "random", g)

    if backend == "triton":
        # backends.resolve("triton") imports triton (not traceable): call the Triton
        # entry points, which use their registered custom ops under torch.compile.
        from eekernels.triton.compaction import compact_rows_triton, scatter_exits_triton

        def step(hidden, state, logits, batch_index, exit_, out_logits, out_layer):
            scatter_exits_triton(out_logits, out_layer, batch_index, exit_, logits, 2)
            out = compact_rows_triton(~exit_, [hidden, state, batch_index])
            return out.index, out.tensors[0] * 2, out.tensors[1], out.tensors[2]
    else:
        def step(hidden, state, logits, batch_index, exit_, out_logits, out_layer):
            scatter_exits(out_logits, out_layer, batch_index, exit_, logits, 2, backend=backend)
            out = compact_rows(~exit_, [hidden, state, batch_index], backend=backend)
            return out.index, out.tensors[0] * 2, out.tensors[1], out.tensors[2]

    outs = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        ol, lay = torch.zeros(b, 3), torch.zeros(b, dtype=torch.int32)
        outs.append((fn(hidden, state, logits, batch_index, exit_, ol, lay), ol, lay))
    (r_eager, ol_e, lay_e), (r_comp, ol_c, lay_c) = outs
    assert all(torch.equal(x, y) for x, y in zip(r_eager, r_comp))
    assert torch.equal(ol_e, ol_c) and torch.equal(lay_e, lay_c)


# --------------------------------------------------------------------------- GPU


def _skip_without_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("n", NS + (4095, 4096, 4097, 20000))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compact_rows_gpu(backend, n, mask):
    _skip_without_cuda()
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable")
    g = torch.Generator().manual_seed(n + MASKS.index(mask))
    tensors = mixed_tensors(n, g, "cuda")
    tensors += [rnd((n, 128, 72), torch.float16, g, "cuda")]  # long rows (chunked copy)
    tensors += [rnd((n * 5 + 1,), torch.float16, g, "cuda")[1:].view(n, 5)]  # 2-byte aligned
    keep = make_keep(n, mask, g, "cuda")
    poison_allocator("cuda")
    check_compacted(compact_rows(keep, tensors, backend=backend), keep, tensors)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compact_rows_hidden_states_gpu(backend, dtype):
    _skip_without_cuda()
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable")
    g = torch.Generator().manual_seed(ALL_DTYPES.index(dtype))
    n = 512
    tensors = [rnd((n, 128, 768), dtype, g, "cuda"), rnd((n, 128), dtype, g, "cuda"),
               rnd((n, 3, 768), dtype, g, "cuda")[:, 0], rnd((n,), dtype, g, "cuda")]
    keep = make_keep(n, "random", g, "cuda")
    poison_allocator("cuda")
    check_compacted(compact_rows(keep, tensors, backend=backend), keep, tensors)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("n", NS + (4097,))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scatter_exits_gpu(backend, n, mask):
    _skip_without_cuda()
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable")
    g = torch.Generator().manual_seed(2000 + n + MASKS.index(mask))
    for i, (c, layer_dtype, strided) in enumerate(((1, torch.int32, False), (2, torch.int64, True),
                                                   (33, torch.int32, True), (1000, torch.int64, False))):
        args = make_scatter(n, c, 5, mask, layer_dtype, g, "cuda", strided=strided)
        run_scatter(backend, args, layer=1 + i)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scatter_exits_gpu_never_syncs(backend):
    _skip_without_cuda()
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable")
    g = torch.Generator().manual_seed(5)
    args = make_scatter(64, 2, 8, "random", torch.int64, g, "cuda")
    scatter_exits(*args, 1, backend=backend)  # warm-up (compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scatter_exits(*args, 2, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_opcheck_gpu():
    _skip_without_cuda()
    for backend in kernel_backends("cuda"):
        compact, scatter = _ops("cpu" if backend == "cuda" else backend)
        g = torch.Generator().manual_seed(6)
        keep = make_keep(9, "random", g, "cuda")
        tensors = [rnd((9, 4, 5), torch.float16, g, "cuda"), rnd((9,), torch.int64, g, "cuda")]
        torch.library.opcheck(compact, (keep, tensors), test_utils=("test_schema", "test_faketensor"))
        args = make_scatter(9, 3, 4, "random", torch.int32, g, "cuda")
        torch.library.opcheck(scatter, (*args, 4), test_utils=("test_schema", "test_faketensor"))
