"""Token ops (pack_tokens, pack_tokens_padded, scatter_tokens, mpee_prune): every backend
against the reference.

Packing and scattering copy rows, so they must match the reference bit for bit (inputs
carry NaN, inf and -0.0 to check that); mpee_prune's kept rows, positions, flags and
memories too, and its fusion token (a float32 weighted sum) within RTOL."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import eekernels
from eekernels.ops import (
    PackedTokens,
    PaddedTokens,
    PrunedTokens,
    mpee_kept_width,
    mpee_prune,
    mpee_prune_differentiable,
    mpee_prune_reference,
    pack_tokens,
    pack_tokens_padded,
    pack_tokens_padded_reference,
    pack_tokens_reference,
    scatter_tokens,
    scatter_tokens_reference,
)

from ..helpers import DTYPES, RTOL, kernel_backends, poison_allocator, rel_err, same_bits

# (B, S, H): S in {1, 2, 7, 130}, H in {1, 24, 200}; B = 1 included.
SHAPES = [(1, 1, 1), (3, 2, 24), (1, 7, 200), (4, 7, 1), (2, 130, 24)]
MASKS = ("all", "none", "random", "ragged")


def seed(*parts) -> int:
    """A seed derived from the test case (stable across processes)."""
    return zlib.crc32(repr(parts).encode())


def rnd(shape, dtype, g, device="cpu"):
    """Fresh random values; floats carry NaN/inf/-0.0 entries when there is room."""
    t = torch.randn(shape, generator=g)
    flat = t.view(-1)
    if flat.numel() >= 8:
        flat[1], flat[3], flat[5], flat[7] = float("nan"), float("inf"), -0.0, float("-inf")
    return t.to(dtype).to(device)


def make_active(b, s, kind, g, device="cpu"):
    if kind == "all":
        a = torch.ones(b, s, dtype=torch.bool)
    elif kind == "none":
        a = torch.zeros(b, s, dtype=torch.bool)
    elif kind == "ragged":  # sample r keeps a prefix of its own length (one sample empty)
        lengths = torch.randint(0, s + 1, (b,), generator=g)
        lengths[0] = 0
        a = torch.arange(s)[None, :] < lengths[:, None]
    else:
        a = torch.rand(b, s, generator=g) < 0.5
    return a.to(device)



# --------------------------------------------------------------------------- pack / scatter


def check_pack(backend, hidden, active):
    ref = pack_tokens_reference(hidden, active)
    out = pack_tokens(hidden, active, backend=backend)
    assert isinstance(out, PackedTokens)
    assert same_bits(out.values, ref.values), "packed values differ"
    assert torch.equal(out.index, ref.index) and out.index.dtype == torch.int64
    assert torch.equal(out.cu_seqlens, ref.cu_seqlens) and out.cu_seqlens.dtype == torch.int32
    assert out.max_seqlen == ref.max_seqlen and isinstance(out.max_seqlen, int)
    return out


def check_pack_padded(backend, hidden, active):
    ref = pack_tokens_padded_reference(hidden, active)
    out = pack_tokens_padded(hidden, active, backend=backend)
    assert isinstance(out, PaddedTokens)
    assert same_bits(out.values, ref.values), "padded values differ"
    assert torch.equal(out.index, ref.index) and out.index.dtype == torch.int64
    assert torch.equal(out.lengths, ref.lengths) and out.lengths.dtype == torch.int64
    return out


def check_scatter(backend, hidden, index, values):
    ref = hidden.clone()
    scatter_tokens_reference(ref, index, values)
    out = hidden.clone()
    ret = scatter_tokens(out, index, values, backend=backend)
    assert ret is out
    assert same_bits(out, ref), "scattered hidden differs"


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}".format(*s))
def test_pack_and_scatter_cpu(backend, shape, mask, dtype):
    b, s, h = shape
    g = torch.Generator().manual_seed(seed(shape, mask, dtype))
    hidden = rnd((b, s, h), dtype, g)
    active = make_active(b, s, mask, g)
    poison_allocator("cpu")
    packed = check_pack(backend, hidden, active)
    padded = check_pack_padded(backend, hidden, active)
    # Scatter new values back, varlen and padded (-1 slots skipped).
    check_scatter(backend, hidden, packed.index, rnd(tuple(packed.values.shape), dtype, g))
    check_scatter(backend, hidden, padded.index, rnd(tuple(padded.values.shape), dtype, g))


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_pack_noncontiguous_hidden(backend):
    g = torch.Generator().manual_seed(11)
    active = make_active(3, 9, "random", g)
    strided = rnd((3, 18, 24), torch.float16, g)[:, ::2]            # S stride 2H
    offset = rnd((4, 9, 30), torch.float32, g)[1:, :, 3:27]          # storage offset, row stride 30
    transposed = rnd((3, 24, 9), torch.bfloat16, g).transpose(1, 2)  # last dim not contiguous
    for hidden in (strided, offset, transposed):
        poison_allocator("cpu")
        check_pack(backend, hidden, active)
        check_pack_padded(backend, hidden, active)
    # a non-contiguous mask
    check_pack(backend, strided, make_active(9, 3, "random", g).t())


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_scatter_leaves_other_tokens_untouched(backend):
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    before = hidden.clone()
    index = torch.tensor([[4, -1], [0, -1]])
    values = torch.full((2, 2, 2), -5.0)
    scatter_tokens(hidden, index, values, backend=backend)
    expect = before.clone()
    expect[1, 1] = -5.0
    expect[0, 0] = -5.0
    assert torch.equal(hidden, expect)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_scatter_non_contiguous_values(backend):
    g = torch.Generator().manual_seed(12)
    hidden = rnd((2, 5, 8), torch.float32, g)
    index = torch.tensor([7, 0, 3])
    values = rnd((8, 3), torch.float32, g).t()  # [3, 8], transposed
    check_scatter(backend, hidden, index, values)


def test_scatter_cpu_rejects_out_of_range_index():
    if "cpu" not in kernel_backends("cpu"):
        pytest.skip("C++ extension unavailable")
    hidden = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        scatter_tokens(hidden, torch.tensor([0, 6]), torch.ones(2, 4), backend="cpu")
    assert not hidden.any()  # nothing written


def test_scatter_triton_skips_out_of_range_index():
    if "triton" not in kernel_backends("cpu"):
        pytest.skip("triton interpreter unavailable")
    hidden = torch.zeros(2, 3, 4)
    scatter_tokens(hidden, torch.tensor([1, 6, -3]), torch.ones(3, 4), backend="triton")
    assert hidden.view(6, 4)[1].eq(1).all() and hidden.sum() == 4


# --------------------------------------------------------------------------- mpee_prune


def mpee_inputs(b, s, h, dtype, g, device="cpu", ties=True, padding=True):
    hidden = rnd((b, s, h), dtype, g).nan_to_num(0.0, 1.0, -1.0)  # the fusion sums stay finite
    if padding:  # trailing padding of random length; sample 0 has only [CLS]
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        lengths[0] = 1
        valid = torch.arange(s)[None, :] < lengths[:, None]
    else:
        valid = torch.ones(b, s, dtype=torch.bool)
    if ties:  # few distinct values: many ties in memory
        memory = torch.randint(0, 4, (b, s), generator=g).float() / 4
    else:
        memory = torch.rand(b, s, generator=g)
    attention = torch.rand(b, s, generator=g)
    return [t.to(device) for t in (hidden, valid, memory, attention)]


def check_prune(backend, hidden, valid, memory, attention, keep_ratio, fn=None):
    """``mpee_prune`` on ``backend`` (or ``fn(hidden, valid, memory, attention, keep_ratio)``)
    against the reference."""
    ref = mpee_prune_reference(hidden, valid, memory, attention, keep_ratio)
    if fn is None:
        out = mpee_prune(hidden, valid, memory, attention, keep_ratio, backend=backend)
    else:
        out = fn(hidden, valid, memory, attention, keep_ratio)
    assert isinstance(out, PrunedTokens)
    width = mpee_kept_width(hidden.shape[1], keep_ratio)
    assert out.hidden.shape == (hidden.shape[0], width, hidden.shape[2]) and out.hidden.dtype == hidden.dtype
    assert torch.equal(out.source, ref.source) and out.source.dtype == torch.int64
    assert torch.equal(out.valid, ref.valid) and out.valid.dtype == torch.bool
    fusion = ref.valid & (ref.source < 0)  # the fusion slots: a weighted sum, not a copy
    assert same_bits(out.hidden[~fusion], ref.hidden[~fusion]), "kept/padding rows differ"
    assert same_bits(out.memory[~fusion], ref.memory[~fusion]), "kept/padding memory differs"
    if fusion.any():
        tol = RTOL[hidden.dtype]
        assert rel_err(out.hidden[fusion], ref.hidden[fusion]) <= tol, "fusion token differs"
        assert rel_err(out.memory[fusion], ref.memory[fusion]) <= 1e-5, "fusion memory differs"
    return out


RATIOS = (1.0, 0.7, 0.05, 1e-9)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}".format(*s))
def test_mpee_prune_cpu(backend, shape, dtype):
    b, s, h = shape
    g = torch.Generator().manual_seed(seed(shape, dtype))
    for k, ratio in enumerate(RATIOS):
        args = mpee_inputs(b, s, h, dtype, g, ties=k % 2 == 0, padding=k < 2)
        poison_allocator("cpu")
        check_prune(backend, *args, ratio)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_mpee_prune_memory_order_edge_cases(backend):
    """Ties go to the lower position; -0.0 ties with 0.0; NaN memory ranks last; -inf
    before NaN; an invalid token is never kept nor fused, whatever its memory."""
    nan, inf = float("nan"), float("inf")
    memory = torch.tensor([[9.0, nan, 0.0, -0.0, 1.0, -inf, 1.0, 5.0, 0.5]])
    valid = torch.tensor([[True, True, True, True, True, True, True, False, True]])
    hidden = torch.randn(1, 9, 3)
    attention = torch.rand(1, 9)
    for ratio in (0.2, 0.5, 0.7, 1.0):
        out = check_prune(backend, hidden, valid, memory, attention, ratio)
    out = mpee_prune(hidden, valid, memory, attention, 0.5, backend=backend)  # 7 candidates -> keep 4
    assert out.source[0, :5].tolist() == [0, 2, 4, 6, 8]  # [CLS]; 1.0, 1.0, 0.5, then 0.0 (pos 2 before -0.0)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_mpee_prune_width_chain(backend):
    """keep_ratio 0.7 across three pruning layers: 128 -> 91 -> 65 -> 47."""
    g = torch.Generator().manual_seed(21)
    hidden, valid, memory, attention = mpee_inputs(2, 128, 8, torch.float32, g, ties=False)
    widths = []
    for _ in range(3):
        out = check_prune(backend, hidden, valid, memory, attention, 0.7)
        widths.append(out.hidden.shape[1])
        hidden, valid, memory = out.hidden, out.valid, out.memory
        attention = torch.rand(valid.shape, generator=g)
    assert widths == [91, 65, 47]


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_mpee_prune_noncontiguous_inputs(backend):
    g = torch.Generator().manual_seed(22)
    hidden, valid, memory, attention = mpee_inputs(3, 10, 16, torch.float16, g)
    check_prune(backend, hidden.transpose(0, 1).contiguous().transpose(0, 1), valid, memory.t().contiguous().t(),
                attention, 0.6)
    wide = rnd((3, 10, 40), torch.float16, g).nan_to_num(0.0, 1.0, -1.0)
    check_prune(backend, wide[:, :, 8:24], valid, memory, attention, 0.6)  # row stride 40


def test_mpee_kept_width_matches_docstring():
    assert [mpee_kept_width(s, 0.7) for s in (128, 91, 65)] == [91, 65, 47]
    assert mpee_kept_width(1, 0.5) == 2 and mpee_kept_width(11, 0.7) == 9  # 0.7 * 10 keeps 7
    assert mpee_kept_width(11, 1.0) == 12


# --------------------------------------------------------------------------- bad input


def _pack_ok():
    return dict(hidden=torch.randn(2, 3, 4), active=torch.ones(2, 3, dtype=torch.bool))


PACK_BAD = [
    (dict(hidden=torch.randn(2, 3)), ValueError, "hidden must have 3 dims"),
    (dict(hidden=torch.randn(2, 3, 4, dtype=torch.float64)), TypeError, "hidden must have dtype"),
    (dict(active=torch.ones(2, 3)), TypeError, "active must have dtype"),
    (dict(active=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"active must be \[B, S\]"),
    (dict(active=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "one device"),
    (dict(hidden=[1.0]), TypeError, "must be a torch.Tensor"),
]


@pytest.mark.parametrize("change,exc,match", PACK_BAD)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_pack_bad_input(backend, change, exc, match):
    args = _pack_ok()
    args.update(change)
    for fn in (pack_tokens, pack_tokens_padded):
        with pytest.raises(exc, match=match):
            fn(**args, backend=backend)


def _scatter_ok():
    return dict(hidden=torch.zeros(2, 3, 4), index=torch.tensor([0, 4]), values=torch.ones(2, 4))


SCATTER_BAD = [
    (dict(index=torch.tensor([0, 4], dtype=torch.int32)), TypeError, "index must have dtype"),
    (dict(index=torch.zeros(1, 1, 2, dtype=torch.int64)), ValueError, "index must be an int64 tensor"),
    (dict(values=torch.ones(3, 4)), ValueError, "values must be"),
    (dict(values=torch.ones(2, 5)), ValueError, "values must be"),
    (dict(values=torch.ones(2, 2, 4)), ValueError, "values must have 2 dims"),
    (dict(values=torch.ones(2, 4, dtype=torch.float16)), TypeError, "must have hidden's dtype"),
    (dict(hidden=torch.zeros(2, 4, 3).transpose(1, 2)), ValueError, "must be contiguous"),
    (dict(index=torch.tensor([0, 4], device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("change,exc,match", SCATTER_BAD)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_scatter_bad_input(backend, change, exc, match):
    args = _scatter_ok()
    args.update(change)
    with pytest.raises(exc, match=match):
        scatter_tokens(**args, backend=backend)


def test_scatter_rejects_aliasing():
    hidden = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="share memory"):
        scatter_tokens(hidden, torch.tensor([0, 1]), hidden.view(6, 4)[2:4], backend="torch")


def _prune_ok():
    return dict(hidden=torch.randn(2, 5, 4), valid=torch.ones(2, 5, dtype=torch.bool),
                memory=torch.rand(2, 5), attention=torch.rand(2, 5), keep_ratio=0.7)


PRUNE_BAD = [
    (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be in \(0, 1\]"),
    (dict(keep_ratio=1.5), ValueError, r"keep_ratio must be in \(0, 1\]"),
    (dict(keep_ratio=float("nan")), ValueError, r"keep_ratio must be in \(0, 1\]"),
    (dict(keep_ratio=True), TypeError, "keep_ratio must be a float"),
    (dict(keep_ratio=torch.tensor(0.5)), TypeError, "keep_ratio must be a float"),
    (dict(memory=torch.rand(2, 5).half()), TypeError, "memory must have dtype"),
    (dict(attention=torch.rand(2, 4)), ValueError, r"attention must be \[B, S\]"),
    (dict(valid=torch.ones(2, 5)), TypeError, "valid must have dtype"),
    (dict(hidden=torch.randn(2, 0, 4), valid=torch.ones(2, 0, dtype=torch.bool), memory=torch.rand(2, 0),
          attention=torch.rand(2, 0)), ValueError, "at least the \\[CLS\\] token"),
    (dict(hidden=torch.randn(5, 4)), ValueError, "hidden must have 3 dims"),
    (dict(memory=torch.rand(2, 5, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("change,exc,match", PRUNE_BAD)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_mpee_prune_bad_input(backend, change, exc, match):
    args = _prune_ok()
    args.update(change)
    with pytest.raises(exc, match=match):
        mpee_prune(**args, backend=backend)


def test_compiled_ops_check_direct_calls():
    """The C++ ops guard direct torch.ops calls with errors, not crashes."""
    if "cpu" not in kernel_backends("cpu"):
        pytest.skip("C++ extension unavailable")
    ops = torch.ops.eekernels
    h, a = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="last dim must be contiguous"):
        ops.pack_tokens(h.transpose(1, 2).contiguous().transpose(1, 2), a)
    with pytest.raises(RuntimeError, match="active must be a bool"):
        ops.pack_tokens_padded(h, a.int())
    with pytest.raises(RuntimeError, match="does not match index"):
        ops.scatter_tokens(h, torch.tensor([0, 1]), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="keep_ratio must be in"):
        ops.mpee_prune(h, a, torch.rand(2, 3), torch.rand(2, 3), 0.0)
    with pytest.raises(RuntimeError, match="memory must be float32"):
        ops.mpee_prune(h, a, torch.rand(2, 3).double(), torch.rand(2, 3), 0.5)


# --------------------------------------------------------------------------- custom ops, torch.compile


def _ops(backend):
    if backend in ("cpu", "cuda"):
        ops = torch.ops.eekernels
        return ops.pack_tokens.default, ops.pack_tokens_padded.default, ops.scatter_tokens.default, \
            ops.mpee_prune.default
    import eekernels.triton.tokens  # noqa: F401  (registers the ops)

    ops = torch.ops.eekernels
    return ops.pack_tokens_triton.default, ops.pack_tokens_padded_triton.default, \
        ops.scatter_tokens_triton.default, ops.mpee_prune_triton.default


def _opcheck_all(backend, device):
    pack, padded, scatter, prune = _ops(backend)
    g = torch.Generator().manual_seed(31)
    utils = ("test_schema", "test_faketensor")
    hidden = rnd((3, 6, 8), torch.float16, g, device)
    active = make_active(3, 6, "random", g, device)
    torch.library.opcheck(pack, (hidden, active), test_utils=utils)
    torch.library.opcheck(padded, (hidden, active), test_utils=utils)
    index = pack_tokens_reference(hidden, active).index
    torch.library.opcheck(scatter, (hidden.clone(), index, rnd((index.numel(), 8), torch.float16, g, device)),
                          test_utils=utils)
    args = mpee_inputs(3, 6, 8, torch.float32, g, device)
    torch.library.opcheck(prune, (*args, 0.7), test_utils=utils)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    """Schemas (incl. scatter_tokens' mutation of hidden) and fake implementations."""
    _opcheck_all(backend, "cpu")


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_torch_compile_traces_scatter_and_prune(backend):
    g = torch.Generator().manual_seed(32)
    hidden, valid, memory, attention = mpee_inputs(2, 9, 8, torch.float32, g, ties=False)
    index = torch.tensor([[1, 3, -1], [9 + 2, 9 + 5, 9 + 8]])
    values = torch.randn(2, 3, 8, generator=g)

    if backend == "triton":
        # backends.resolve("triton") imports triton (not traceable): call the Triton entry
        # points, which use their registered custom ops under torch.compile.
        from eekernels.triton.tokens import mpee_prune_triton, scatter_tokens_triton

        def step(hidden, values, valid, memory, attention):
            scatter_tokens_triton(hidden, index, values)
            out = mpee_prune_triton(hidden, valid, memory, attention, 0.7)
            return out.hidden * 2, out.valid, out.memory, out.source
    else:
        def step(hidden, values, valid, memory, attention):
            scatter_tokens(hidden, index, values, backend=backend)
            out = mpee_prune(hidden, valid, memory, attention, 0.7, backend=backend)
            return out.hidden * 2, out.valid, out.memory, out.source

    eager_h, comp_h = hidden.clone(), hidden.clone()
    r_eager = step(eager_h, values, valid, memory, attention)
    r_comp = torch.compile(step, backend="aot_eager", fullgraph=True)(comp_h, values, valid, memory, attention)
    assert torch.equal(eager_h, comp_h)  # the in-place scatter happened under compile too
    assert all(torch.equal(x, y) for x, y in zip(r_eager, r_comp))
    assert r_comp[0].shape[1] == mpee_kept_width(9, 0.7)


# --------------------------------------------------------------------------- GPU


def _gpu_backend(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES + [(128, 128, 768), (64, 512, 768), (3, 130, 200), (5, 4099, 24)],
                         ids=lambda s: "B{}-S{}-H{}".format(*s))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_pack_and_scatter_gpu(backend, shape, mask, dtype):
    _gpu_backend(backend)
    b, s, h = shape
    g = torch.Generator().manual_seed(seed(shape, mask, dtype))
    hidden = rnd((b, s, h), dtype, g, "cuda")
    active = make_active(b, s, mask, g, "cuda")
    poison_allocator("cuda")
    packed = check_pack(backend, hidden, active)
    padded = check_pack_padded(backend, hidden, active)
    check_scatter(backend, hidden, packed.index, rnd(tuple(packed.values.shape), dtype, g, "cuda"))
    check_scatter(backend, hidden, padded.index, rnd(tuple(padded.values.shape), dtype, g, "cuda"))
    check_pack(backend, rnd((b, 2 * s, h + 8), dtype, g, "cuda")[:, ::2, 4:4 + h], active)  # strided, offset


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(128, 128, 768), (16, 512, 768), (3, 130, 200), (2, 9000, 24)],
                         ids=lambda s: "B{}-S{}-H{}".format(*s))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_mpee_prune_gpu(backend, shape, dtype):
    _gpu_backend(backend)
    b, s, h = shape
    g = torch.Generator().manual_seed(seed(shape, dtype))
    for k, ratio in enumerate(RATIOS):
        args = mpee_inputs(b, s, h, dtype, g, "cuda", ties=k % 2 == 0, padding=k < 2)
        poison_allocator("cuda")
        check_prune(backend, *args, ratio)
    hidden, valid, memory, attention = mpee_inputs(b, s, h + 3, dtype, g, "cuda")
    check_prune(backend, hidden[:, :, 1:h + 1], valid, memory, attention, 0.7)  # misaligned rows


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scatter_and_prune_gpu_never_sync(backend):
    _gpu_backend(backend)
    g = torch.Generator().manual_seed(41)
    hidden, valid, memory, attention = mpee_inputs(8, 128, 64, torch.float16, g, "cuda")
    index = pack_tokens_reference(hidden, valid).index
    values = rnd((index.numel(), 64), torch.float16, g, "cuda")
    scatter_tokens(hidden, index, values, backend=backend)  # warm-up (compiles)
    mpee_prune(hidden, valid, memory, attention, 0.7, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scatter_tokens(hidden, index, values, backend=backend)
        mpee_prune(hidden, valid, memory, attention, 0.7, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_opcheck_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for backend in kernel_backends("cuda"):
        _opcheck_all(backend, "cuda")


def test_keep_count_is_exact_for_products():
    """ceil(0.7 * 10) keeps 7, not 8 (the 1e-6 guard): the spec the kernels follow."""
    assert math.ceil(0.7 * 10 - 1e-6) == 7
    hidden, valid = torch.randn(1, 11, 2), torch.ones(1, 11, dtype=torch.bool)
    memory, attention = torch.rand(1, 11), torch.rand(1, 11)
    for backend in ["torch"] + kernel_backends("cpu"):
        out = mpee_prune(hidden, valid, memory, attention, 0.7, backend=backend)
        assert int(out.valid.sum()) == 1 + 7 + 1, backend


# --------------------------------------------------------------------------- mpee_prune under autograd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}".format(*s))
def test_mpee_prune_differentiable_equals_reference(shape, dtype):
    b, s, h = shape
    g = torch.Generator().manual_seed(seed(shape, dtype) + 1)
    for k, ratio in enumerate(RATIOS):
        args = mpee_inputs(b, s, h, dtype, g, ties=k % 2 == 0, padding=k < 2)
        check_prune(None, *args, ratio, fn=mpee_prune_differentiable)


def test_mpee_prune_differentiable_memory_order_edge_cases():
    nan, inf = float("nan"), float("inf")
    memory = torch.tensor([[9.0, nan, 0.0, -0.0, 1.0, -inf, 1.0, 5.0, 0.5], [nan, 2.0, -inf, nan, 0.0, 1.0, -inf, 3, 3]])
    valid = torch.tensor([[True, True, True, True, True, True, True, False, True], [True] * 7 + [False] * 2])
    hidden, attention = torch.randn(2, 9, 3), torch.rand(2, 9)
    for ratio in (0.2, 0.5, 0.7, 1.0):
        check_prune(None, hidden, valid, memory, attention, ratio, fn=mpee_prune_differentiable)


def test_mpee_prune_under_autograd_has_the_references_gradients():
    g = torch.Generator().manual_seed(7)
    hidden, valid, memory, attention = mpee_inputs(3, 11, 5, torch.float32, g, ties=True, padding=True)
    weight = torch.randn(3, mpee_kept_width(11, 0.6), 5, generator=g)
    grads = []
    for fn in (mpee_prune_reference, mpee_prune):  # mpee_prune under autograd: the vectorised form
        hd, at = hidden.clone().requires_grad_(), attention.clone().requires_grad_()
        out = fn(hd, valid, memory, at, 0.6)
        (out.hidden * weight).sum().backward()
        grads.append((hd.grad, at.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and grads[0][0].abs().sum() > 0
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5) and grads[0][1].abs().sum() > 0
