"""pytest-benchmark: row compaction on every backend vs plain torch boolean indexing.

    python -m pytest benchmarks/test_bench_compaction.py --benchmark-columns=median,iqr

What one engine step compacts: hidden states [N, S, H], the attention mask [N, S]
(int64), the batch index [N] (int64) and the logit memory [N, 2] (float32), keeping a
random half of the rows. Providers:

* ``bool_index``: ``[t[keep] for t in tensors]`` (eager torch; syncs once per tensor on GPU)
* ``torch``: the reference (``keep.nonzero()`` once, then ``index_select``-style gathers)
* ``cpu`` / ``triton`` / ``cuda``: ``eekernels.ops.compact_rows`` (one scan + one fused
  gather launch; one device->host read of the count)

GPU: N = 128, 256, 512 at S = 128, H = 768, float16; each call is followed by a
synchronize (the ops sync anyway). CPU: smaller rows (S = 32, H = 256, float32), the C++
backend only (the Triton interpreter is not a speed measurement). Also scatter_exits
(exited rows' logits to their batch positions) against its reference.
"""

import pytest
import torch

import eekernels
from eekernels.ops import compact_rows, compact_rows_reference, scatter_exits, scatter_exits_reference

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(n, 128, 768) for n in (128, 256, 512)]
CPU_SHAPES = [(n, 32, 256) for n in (128, 512)]


def _providers(device):
    return ["bool_index", "torch"] + eekernels.backends.runnable_backends(device, include_reference=False)


def _cases():
    out = []
    for device, shapes in (("cpu", CPU_SHAPES),) + ((("cuda", GPU_SHAPES),) if CUDA else ()):
        for n, s, h in shapes:
            for prov in _providers(device):
                out.append(pytest.param(device, (n, s, h), prov, id=f"{device}-N{n}-S{s}-H{h}-{prov}"))
    return out


def _inputs(device, n, s, h):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    tensors = [
        torch.randn(n, s, h, generator=g).to(dtype),
        torch.randint(0, 2, (n, s), generator=g),
        torch.arange(n),
        torch.randn(n, 2, generator=g),
    ]
    keep = torch.rand(n, generator=g) < 0.5
    return keep.to(device), [t.to(device) for t in tensors], dtype


def _timed(device, fn):
    if device == "cuda":
        inner = fn
        return lambda: (inner(), torch.cuda.synchronize())
    return fn


@pytest.mark.parametrize("device,shape,provider", _cases())
def test_compact_rows(benchmark, device, shape, provider):
    n, s, h = shape
    keep, tensors, dtype = _inputs(device, n, s, h)
    if provider == "bool_index":
        fn = lambda: [t[keep] for t in tensors]  # noqa: E731
    elif provider == "torch":
        fn = lambda: compact_rows_reference(keep, tensors)  # noqa: E731
    else:
        fn = lambda: compact_rows(keep, tensors, backend=provider)  # noqa: E731
    moved = 2 * sum(t[0].numel() * t.element_size() for t in tensors) * int(keep.sum())
    benchmark.extra_info.update(provider=provider, N=n, S=s, H=h, dtype=str(dtype), bytes_moved=moved)
    benchmark(_timed(device, fn))


def _scatter_cases():
    out = []
    for device in ("cpu",) + (("cuda",) if CUDA else ()):
        for prov in [p for p in _providers(device) if p != "bool_index"]:
            out.append(pytest.param(device, prov, id=f"{device}-N512-C2-{prov}"))
    return out


@pytest.mark.parametrize("device,provider", _scatter_cases())
def test_scatter_exits(benchmark, device, provider):
    n, b, c = 512, 1024, 2
    g = torch.Generator().manual_seed(1)
    out_logits = torch.zeros(b, c).to(device)
    out_layer = torch.zeros(b, dtype=torch.int32).to(device)
    batch_index = torch.randperm(b, generator=g)[:n].to(device)
    exit_ = (torch.rand(n, generator=g) < 0.5).to(device)
    logits = torch.randn(n, c, generator=g).to(device)
    args = (out_logits, out_layer, batch_index, exit_, logits, 3)
    if provider == "torch":
        fn = lambda: scatter_exits_reference(*args)  # noqa: E731
    else:
        fn = lambda: scatter_exits(*args, backend=provider)  # noqa: E731
    benchmark.extra_info.update(provider=provider, N=n, B=b, C=c)
    benchmark(_timed(device, fn))
