"""pytest-benchmark: the fused exit head on every backend vs the eager torch sequence.

    python -m pytest benchmarks/test_bench_exit_head.py --benchmark-columns=median,iqr

CPU runs cover the C++ backend; on a CUDA machine the Triton and CUDA backends run at the
issue's two GPU shapes (N=512, H=768, C=2 with pooler; N=65536, H=1024, C=2 without), and
the "policy" criterion (ConsistentEE's policy network, P=32 hidden units) beside entropy
at N=128 and N=512, H=768, C=2 with pooler, to show what the policy network costs.
GPU timings here include a synchronize per call; benchmarks/exit_head_gpu.py measures
with CUDA events (do_bench) and reports bandwidth against the measured copy ceiling.
"""

import pytest
import torch

import eekernels
from eekernels.demo import default_head, default_policy, eager_exit_sequence, eager_policy_sequence
from eekernels.ops import exit_head

CUDA = torch.cuda.is_available()
# name: (N, H, C, pooler, P); P = 0: criterion "entropy", else "policy" with P hidden units
SHAPES = {
    "pooler-N512-H768-C2": (512, 768, 2, True, 0),
    "nopooler-N65536-H1024-C2": (65536, 1024, 2, False, 0),
    "pooler-N128-H768-C2": (128, 768, 2, True, 0),
    "policy-pooler-N128-H768-C2-P32": (128, 768, 2, True, 32),
    "policy-pooler-N512-H768-C2-P32": (512, 768, 2, True, 32),
}
CPU_SHAPES = {
    "pooler-N512-H768-C2": (512, 768, 2, True, 0),
    "nopooler-N8192-H1024-C2": (8192, 1024, 2, False, 0),
    "policy-pooler-N512-H768-C2-P32": (512, 768, 2, True, 32),
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
    n, h, c, pooler, p = shape
    dtype = torch.float16 if device == "cuda" else torch.float32
    hid, pw, pb, w, b = default_head(n, h, c, device, dtype)
    if not pooler:
        pw = pb = None
    if p:
        qw, qb, qo, qob = default_policy(h, p, device, dtype)
        thr = 0.5
        if provider == "eager":
            fn = lambda: eager_policy_sequence(hid, pw, pb, w, b, qw, qb, qo, qob, thr)  # noqa: E731
        else:
            fn = lambda: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="policy",  # noqa: E731
                                   threshold=thr, policy_weight=qw, policy_bias=qb, policy_out_weight=qo,
                                   policy_out_bias=qob, backend=provider)
    else:
        thr = 0.4
        if provider == "eager":
            fn = lambda: eager_exit_sequence(hid, pw, pb, w, b, thr)  # noqa: E731
        else:
            fn = lambda: exit_head(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy",  # noqa: E731
                                   threshold=thr, backend=provider)
    if device == "cuda":
        inner = fn
        fn = lambda: (inner(), torch.cuda.synchronize())  # noqa: E731
    benchmark.extra_info.update(provider=provider, N=n, H=h, C=c, pooler=pooler, P=p,
                                criterion="policy" if p else "entropy", dtype=str(dtype))
    benchmark(fn)
