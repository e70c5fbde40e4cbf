"""pytest-benchmark: the fused exit head on every backend vs the eager torch sequence.

    python -m pytest benchmarks/test_bench_exit_head.py --benchmark-columns=median,iqr

CPU runs cover the C++ backend; on a CUDA machine the Triton and CUDA backends run at the
issue's two GPU shapes (N=512, H=768, C=2 with pooler; N=65536, H=1024, C=2 without).
GPU timings here include a synchronize per call; benchmarks/exit_head_gpu.py measures
with CUDA events (do_bench) and reports bandwidth against the measured copy ceiling.
"""

import pytest
import torch

import eekernels
from eekernels.demo import default_head, eager_exit_sequence
from eekernels.ops import exit_head

CUDA = torch.cuda.is_available()
SHAPES = {
    "pooler-N512-H768-C2": (512, 768, 2, True),
    "nopooler-N65536-H1024-C2": (65536, 1024, 2, False),
}
CPU_SHAPES = {
    "pooler-N512-H768-C2": (512, 768, 2, True),
    "nopooler-N8192-H1024-C2": (8192, 1024, 2, False),
}


def _providers(device):
    return ["eager", "torch"] + eekernels.backends.runnable_backends(device, include_reference=False)


def _cases():
    out = []
    for device, shapes in (("cpu", CPU_SHAPES),) + ((("cuda", SHAPES),) if CUDA else ()):
        for sname, shape in shapes.items():
            for prov in _providers(device):
                out.append(pytest.param(device, shape, prov, id=f"{device}-{sname}-{prov}"))
    return out


@pytest.mark.parametrize("device,shape,provider", _cases())
def test_exit_head(benchmark, device, shape, provider):
    n, h, c, pooler = shape
    dtype = torch.float16 if device == "cuda" else torch.float32
    hid, pw, pb, w, b = default_head(n, h, c, device, dtype)
    if not pooler:
        pw = pb = None
    thr = 0.4
    if provider == "eager":
        fn = lambda: eager_exit_sequence(hid, pw, pb, w, b, thr)  # noqa: E731
    else:
        fn = lambda: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy",  # noqa: E731
                               threshold=thr, backend=provider)
    if device == "cuda":
        inner = fn
        fn = lambda: (inner(), torch.cuda.synchronize())  # noqa: E731
    benchmark.extra_info.update(provider=provider, N=n, H=h, C=c, pooler=pooler, dtype=str(dtype))
    benchmark(fn)

