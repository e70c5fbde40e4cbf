"""pytest-benchmark: token ops on every backend vs plain torch gather / index_copy_.

    python -m pytest benchmarks/test_bench_tokens.py --benchmark-columns=median,iqr

Providers per op:

* ``plain``: what one writes in torch (benchmarks/token_baselines.py): ``nonzero`` +
  ``index_select`` (pack), a cumsum + ``scatter_`` (padded pack), ``index_copy_``
  (scatter), a vectorised sort/cumsum/scatter version of MPEE pruning (no syncs);
* ``torch``: the reference (the spec; mpee_prune's reference loops over samples);
* ``cpu`` / ``triton`` / ``cuda``: ``eekernels.ops.<op>(..., backend=...)``.

GPU: B = 128, S = 128 and 512, H = 768, float16, half of the tokens active (pack,
scatter) or keep_ratio 0.5 (mpee_prune); each call is followed by a synchronize. CPU:
B = 16, S = 128, H = 256, float32, the C++ backend only (the Triton interpreter is not a
speed measurement). benchmarks/tokens_gpu.py measures the GPU cases against the copy
bandwidth.
"""

import pytest
import torch
from token_baselines import mpee_prune_torch, pack_tokens_padded_torch, pack_tokens_torch, scatter_tokens_torch

import eekernels
from eekernels.ops import (
    mpee_prune,
    mpee_prune_reference,
    pack_tokens,
    pack_tokens_padded,
    pack_tokens_padded_reference,
    pack_tokens_reference,
    scatter_tokens,
    scatter_tokens_reference,
)

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(128, 128, 768), (128, 512, 768)]
CPU_SHAPES = [(16, 128, 256)]
OPS = ("pack_tokens", "pack_tokens_padded", "scatter_tokens", "mpee_prune")


def _providers(device, op):
    provs = ["plain"] + eekernels.backends.runnable_backends(device, include_reference=False)
    if not (device == "cuda" and op == "mpee_prune"):  # the looped reference: too slow to time on GPU
        provs.insert(1, "torch")
    return provs


def _cases():
    out = []
    for device, shapes in (("cpu", CPU_SHAPES),) + ((("cuda", GPU_SHAPES),) if CUDA else ()):
        for b, s, h in shapes:
            for op in OPS:
                for prov in _providers(device, op):
                    out.append(pytest.param(device, op, (b, s, h), prov, id=f"{op}-{device}-B{b}-S{s}-H{h}-{prov}"))
    return out


def _inputs(device, b, s, h):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    hidden = torch.randn(b, s, h, generator=g).to(dtype)
    active = torch.rand(b, s, generator=g) < 0.5
    memory = torch.rand(b, s, generator=g)
    attention = torch.rand(b, s, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    return [t.to(device) for t in (hidden, active, valid, memory, attention)], dtype


def _timed(device, fn):
    if device == "cuda":
        inner = fn
        return lambda: (inner(), torch.cuda.synchronize())
    return fn


@pytest.mark.parametrize("device,op,shape,provider", _cases())
def test_token_op(benchmark, device, op, shape, provider):
    b, s, h = shape
    (hidden, active, valid, memory, attention), dtype = _inputs(device, b, s, h)
    row = h * hidden.element_size()
    nnz = int(active.sum())
    if op == "pack_tokens":
        fns = {"plain": lambda: pack_tokens_torch(hidden, active),
               "torch": lambda: pack_tokens_reference(hidden, active)}
        default = lambda p: pack_tokens(hidden, active, backend=p)  # noqa: E731
        moved = 2 * nnz * row
    elif op == "pack_tokens_padded":
        fns = {"plain": lambda: pack_tokens_padded_torch(hidden, active),
               "torch": lambda: pack_tokens_padded_reference(hidden, active)}
        default = lambda p: pack_tokens_padded(hidden, active, backend=p)  # noqa: E731
        moved = nnz * row + b * int(active.sum(1).max()) * row
    elif op == "scatter_tokens":
        index = pack_tokens_reference(hidden, active).index
        values = torch.randn(nnz, h, device=device).to(dtype)
        fns = {"plain": lambda: scatter_tokens_torch(hidden, index, values),
               "torch": lambda: scatter_tokens_reference(hidden, index, values)}
        default = lambda p: scatter_tokens(hidden, index, values, backend=p)  # noqa: E731
        moved = 2 * nnz * row
    else:
        fns = {"plain": lambda: mpee_prune_torch(hidden, valid, memory, attention, 0.5),
               "torch": lambda: mpee_prune_reference(hidden, valid, memory, attention, 0.5)}
        default = lambda p: mpee_prune(hidden, valid, memory, attention, 0.5, backend=p)  # noqa: E731
        width = eekernels.ops.mpee_kept_width(s, 0.5)
        moved = b * s * row + b * width * row
    fn = fns.get(provider) or (lambda: default(provider))
    benchmark.extra_info.update(op=op, provider=provider, B=b, S=s, H=h, dtype=str(dtype), bytes_moved=moved)
    benchmark(_timed(device, fn))
