"""exit_head: every backend against the reference spec (evaluated in float64)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import eekernels
from eekernels.demo import default_policy
from eekernels.ops import exit_head, exit_head_reference
from eekernels.ops.exit_head import ExitHeadArgs, ExitHeadOutput

from ..helpers import DTYPES, RTOL, kernel_backends, poison_allocator, rel_err, threshold_between

CRITERIA = ("entropy", "max_prob", "patience")


def make_inputs(n, h, c, dtype, device, *, pooler, memory, patience, seed, strided=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    if strided:  # [CLS] slice of a [N, S, H] tensor: row stride S*H
        hidden = rnd(n, 3, h).to(dtype)[:, 1]
    else:
        hidden = rnd(n, h).to(dtype)
    args = dict(
        hidden=hidden,
        weight=rnd(c, h, scale=2.0 / math.sqrt(h)).to(dtype),
        bias=rnd(c, scale=0.5).to(dtype),
    )
    if pooler:
        args["pooler_weight"] = rnd(h, h, scale=1.5 / math.sqrt(h)).to(dtype)
        args["pooler_bias"] = rnd(h, scale=0.3).to(dtype)
    if memory:
        args["memory"] = rnd(n, c)
        args["memory_lambda"] = 0.9
    if patience:
        args["prev_pred"] = torch.randint(-1, c, (n,), generator=g).to(device)
        args["counter"] = torch.randint(0, 4, (n,), generator=g, dtype=torch.int32).to(device)
    return args


def spec(args, **kw):
    """The reference evaluated in float64 on the same (already rounded) inputs."""
    a = dict(args)
    for k in ("hidden", "weight", "bias", "pooler_weight", "pooler_bias", "memory"):
        if k in a:
            a[k] = a[k].double()
    hidden, weight, bias = a.pop("hidden"), a.pop("weight"), a.pop("bias")
    return exit_head_reference(hidden, weight, bias, **a, **kw)


def second_gap(logits: torch.Tensor) -> torch.Tensor:
    """Gap between the largest and second-largest logit of each row (inf for C=1)."""
    if logits.shape[1] == 1:
        return torch.full((logits.shape[0],), math.inf, dtype=logits.dtype, device=logits.device)
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def check_against_spec(out: ExitHeadOutput, ref: ExitHeadOutput, dtype, criterion, threshold):
    n, c = ref.logits.shape
    assert out.logits.dtype == torch.float32 and out.logits.shape == (n, c)
    assert out.score.dtype == torch.float32 and out.score.shape == (n,)
    assert out.exit.dtype == torch.bool and out.exit.shape == (n,)
    assert out.pred.dtype == torch.int64 and out.pred.shape == (n,)
    out = ExitHeadOutput(*(t.cpu() if t is not None else None for t in out))
    ref = ExitHeadOutput(*(t.cpu() if t is not None else None for t in ref))
    tol = RTOL[dtype]
    err = rel_err(out.logits, ref.logits)
    assert err <= tol, f"logits relative error {err:.3g} > {tol}"
    # Predictions may differ only where the top two logits are within rounding.
    scale = ref.logits.abs().amax(dim=1).clamp_min(1.0)
    close_call = second_gap(ref.logits) <= 4 * tol * scale
    assert ((out.pred == ref.pred) | close_call).all(), "argmax differs beyond rounding"
    fin = torch.isfinite(ref.score)
    score_tol = 1e-4 if dtype == torch.float32 else 5e-2 * max(1.0, math.log(c))
    if criterion == "patience":
        assert out.counter is not None and out.counter.dtype == torch.int32
        assert ((out.counter == ref.counter) | close_call).all()
        assert torch.equal(out.score[~close_call], ref.score[~close_call].float())
        borderline = close_call
    else:
        assert out.counter is None
        diff = (out.score.double() - ref.score).abs()
        assert (diff[fin] <= score_tol * (1 + ref.score[fin].abs())).all(), f"score off by {diff[fin].max():.3g}"
        assert torch.isnan(out.score[~fin]).all()
        if math.isfinite(threshold):
            borderline = (ref.score - threshold).abs() <= score_tol * (1 + abs(threshold))
        else:
            borderline = torch.zeros_like(out.exit)
    agree = (out.exit == ref.exit) | borderline
    assert agree.all(), f"{int((~agree).sum())} exit decisions differ away from the threshold"
    return borderline


def thresholds_for(criterion, ref_scores):
    """Edges (0, inf) and one inside the score range so that some rows exit and some don't,
    strictly between two distinct scores (where there are two)."""
    if criterion == "patience":
        return (0.0, 2.0, math.inf)
    try:
        mid = threshold_between(ref_scores, min_gap=1e-3)
    except AssertionError:  # N = 1, or every score alike: the edges alone
        return (0.0, math.inf)
    return (0.0, mid, math.inf)


# Every N, H and C value of the issue is crossed (64 shapes); dtype, criterion and options
# rotate over them so each value meets each dtype/criterion several times.
SHAPES = list(itertools.product((1, 3, 64, 1000), (1, 32, 768, 1000), (1, 2, 3, 1000)))


def shape_cases():
    cases = []
    for i, (n, h, c) in enumerate(SHAPES):
        dtype = DTYPES[i % 3]
        crit = CRITERIA[(i // 3) % 3]
        pooler = (i % 2 == 0) and n * h * h <= 64 * 1000 * 1000
        opts = dict(pooler=pooler, tanh=(i % 4 == 1), memory=(i % 5 == 2), strided=(i % 7 == 3))
        cases.append(pytest.param(n, h, c, dtype, crit, opts, id=f"N{n}-H{h}-C{c}-{str(dtype)[6:]}-{crit}-{i}"))
    return cases


def run_case(backend, device, n, h, c, dtype, crit, opts, seed):
    args = make_inputs(n, h, c, dtype, device, pooler=opts["pooler"], memory=opts["memory"],
                       patience=(crit == "patience"), seed=seed, strided=opts["strided"])
    ref0 = spec(args, criterion=crit, threshold=0.0, tanh_logits=opts["tanh"])
    for thr in thresholds_for(crit, ref0.score):
        ref = spec(args, criterion=crit, threshold=thr, tanh_logits=opts["tanh"])
        poison_allocator(device)
        out = exit_head(**args, criterion=crit, threshold=thr, tanh_logits=opts["tanh"], backend=backend)
        check_against_spec(out, ref, dtype, crit, thr)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("n,h,c,dtype,crit,opts", shape_cases())
def test_shapes_cpu(backend, n, h, c, dtype, crit, opts):
    if backend == "triton" and n * c * h > 64 * 1000 * 1000 // 2 and opts["pooler"]:
        pytest.skip("too slow for the Triton interpreter; covered on GPU")
    run_case(backend, "cpu", n, h, c, dtype, crit, opts, seed=hash((n, h, c)) % 10_000)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("crit", CRITERIA)
@pytest.mark.parametrize("pooler,tanh,memory", list(itertools.product((False, True), repeat=3)))
def test_options_cpu(backend, dtype, crit, pooler, tanh, memory):
    opts = dict(pooler=pooler, tanh=tanh, memory=memory, strided=False)
    run_case(backend, "cpu", 29, 96, 7, dtype, crit, opts, seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n,h,c,dtype,crit,opts", shape_cases())
def test_shapes_gpu(backend, n, h, c, dtype, crit, opts):
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable: {eekernels.backend_report()[backend]}")
    run_case(backend, "cuda", n, h, c, dtype, crit, opts, seed=hash((n, h, c)) % 10_000)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("crit", CRITERIA)
@pytest.mark.parametrize("pooler,tanh,memory", list(itertools.product((False, True), repeat=3)))
def test_options_gpu(backend, dtype, crit, pooler, tanh, memory):
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable: {eekernels.backend_report()[backend]}")
    opts = dict(pooler=pooler, tanh=tanh, memory=memory, strided=True)
    run_case(backend, "cuda", 29, 96, 7, dtype, crit, opts, seed=7)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("crit", CRITERIA)
def test_non_finite_rows(device, crit):
    """NaN/inf rows: score NaN (0 for patience), never exit, pred -1, counter reset."""
    n, h, c = 6, 16, 3
    args = make_inputs(n, h, c, torch.float32, device, pooler=False, memory=False,
                       patience=(crit == "patience"), seed=3)
    args["hidden"][1, 4] = float("nan")
    args["hidden"][3, 0] = float("inf")
    args["hidden"][4, :] = -float("inf")
    thr = math.inf if crit == "entropy" else 0.0  # every finite row exits
    ref = spec(args, criterion=crit, threshold=thr)
    bad = torch.tensor([False, True, False, True, True, False])
    assert torch.equal(ref.exit.cpu(), ~bad)
    assert (ref.pred.cpu()[bad] == -1).all()
    for backend in ["torch"] + kernel_backends(device):
        out = exit_head(**args, criterion=crit, threshold=thr, backend=backend)
        assert torch.equal(out.exit.cpu(), ~bad), backend
        assert (out.pred.cpu()[bad] == -1).all(), backend
        if crit == "patience":
            assert (out.counter.cpu()[bad] == 0).all() and (out.score.cpu()[bad] == 0).all()
        else:
            assert torch.isnan(out.score.cpu()[bad]).all(), backend
            assert torch.isfinite(out.score.cpu()[~bad]).all(), backend


@pytest.mark.parametrize("c", [5, 8, 31, 32, 33, 64, 95, 1000])
@pytest.mark.parametrize("crit", CRITERIA + ("policy",))
def test_argmax_ties_and_non_finite_at_every_lane(c, crit):
    """Logits set value by value (identity classifier: x I + 0 is exact): the prediction is
    the first of tied maxima, and one NaN / +-inf anywhere in a row, first lane, last lane
    of a block or the tail, makes it non-finite; around the row scan's lane widths."""
    positions = sorted({0, 1, 7, 8, 31, 32, 33, c // 2, c - 2, c - 1} & set(range(c)))
    rows = []
    for p in positions:
        row = torch.linspace(-3.0, 2.0, c)[torch.randperm(c, generator=torch.Generator().manual_seed(p))]
        row[p] = 5.0
        rows.append(row.clone())  # a single maximum at p
        for q in (p + 1, c - 1):
            if q < c and q != p:
                tied = row.clone()
                tied[q] = 5.0  # tied with a later one: pred stays p
                rows.append(tied)
        for bad in (float("nan"), float("inf"), -float("inf")):
            poisoned = row.clone()
            poisoned[p] = bad
            rows.append(poisoned)
    hidden = torch.stack(rows)
    n = hidden.shape[0]
    args = dict(hidden=hidden, weight=torch.eye(c), bias=torch.zeros(c))
    if crit == "patience":
        args.update(prev_pred=torch.zeros(n, dtype=torch.long), counter=torch.zeros(n, dtype=torch.int32))
    if crit == "policy":
        qw, qb, qo, qob = default_policy(c, 4, "cpu", torch.float32)
        args.update(policy_weight=qw, policy_bias=qb, policy_out_weight=qo, policy_out_bias=qob)
    thr = 0.5 if crit in ("max_prob", "policy") else 1.0
    ref = spec(args, criterion=crit, threshold=thr)
    finite = torch.isfinite(hidden).all(1)
    assert torch.equal(ref.pred[finite], hidden[finite].argmax(1)) and (ref.pred[~finite] == -1).all()
    for backend in ["torch"] + kernel_backends("cpu"):
        out = exit_head(**args, criterion=crit, threshold=thr, backend=backend)
        assert torch.equal(out.pred, ref.pred), backend
        assert not out.exit[~finite].any(), backend


@pytest.mark.parametrize("device", _devices())
def test_empty_batch(device):
    args = make_inputs(0, 8, 2, torch.float32, device, pooler=True, memory=True, patience=True, seed=1)
    for backend in ["torch"] + kernel_backends(device):
        out = exit_head(**args, criterion="patience", threshold=1, backend=backend)
        assert out.logits.shape == (0, 2) and out.exit.shape == (0,) and out.counter.shape == (0,)


def test_threshold_edges_semantics():
    """entropy: 0 never exits, inf always; max_prob: 0 always, inf never; patience inf never."""
    args = make_inputs(50, 16, 4, torch.float32, "cpu", pooler=False, memory=False, patience=False, seed=5)
    for backend in ["torch"] + kernel_backends("cpu"):
        assert not exit_head(**args, criterion="entropy", threshold=0.0, backend=backend).exit.any()
        assert exit_head(**args, criterion="entropy", threshold=math.inf, backend=backend).exit.all()
        assert exit_head(**args, criterion="max_prob", threshold=0.0, backend=backend).exit.all()
        assert not exit_head(**args, criterion="max_prob", threshold=math.inf, backend=backend).exit.any()
        assert not exit_head(**args, criterion="patience", threshold=math.inf, backend=backend).exit.any()


#: What a score exactly equal to the threshold does (the contract of ``exit_head``).
TIE_EXITS = {"entropy": False, "max_prob": True, "patience": True, "policy": False}


@pytest.mark.parametrize("crit", CRITERIA + ("policy",))
def test_tie_at_the_threshold(crit):
    """A score equal to the threshold: entropy (<) and policy (>) stay, max_prob (>=) and
    patience (>=) exit; on every backend, with the tie constructed from each backend's own
    float32 scores (a threshold that is a float32 value compares exactly)."""
    from .test_exit_head_policy import policy_params

    n = 40
    args = make_inputs(n, 24, 3, torch.float32, "cpu", pooler=True, memory=False, patience=(crit == "patience"),
                       seed=11)
    if crit == "policy":
        args.update(policy_params(24, 8, torch.float32, "cpu", seed=11))
    # two rows with exactly representable scores as well: zero logits give max_prob 1/2 exactly
    # with C = 2 (below), and patience counters are integers
    for backend in ["torch"] + kernel_backends("cpu"):
        first = exit_head(**args, criterion=crit, threshold=0.0, backend=backend)
        for k in (0, n // 2, n - 1):
            tie = float(first.score[k])  # a float32 value: no rounding on the way in
            out = exit_head(**args, criterion=crit, threshold=tie, backend=backend)
            assert float(out.score[k]) == tie, (backend, k)  # deterministic
            assert bool(out.exit[k]) == TIE_EXITS[crit], (backend, crit, k, tie)
            above, below = out.score > tie, out.score < tie
            if crit in ("entropy",):
                assert torch.equal(out.exit, below), backend
            elif crit == "policy":
                assert torch.equal(out.exit, above), backend
            else:
                assert torch.equal(out.exit, ~below), backend
    if crit == "max_prob":
        zero = dict(hidden=torch.randn(5, 8), weight=torch.zeros(2, 8), bias=torch.zeros(2))
        for backend in ["torch"] + kernel_backends("cpu"):
            out = exit_head(**zero, criterion="max_prob", threshold=0.5, backend=backend)
            assert (out.score == 0.5).all() and out.exit.all(), backend
            assert not exit_head(**zero, criterion="max_prob", threshold=float(torch.nextafter(
                torch.tensor(0.5), torch.tensor(1.0))), backend=backend).exit.any(), backend


def test_patience_counts_consecutive_layers():
    """PABEE over three layers: counter 0, 1, 2 when the prediction holds, reset on change."""
    h, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.zeros(3)
    for backend in ["torch"] + kernel_backends("cpu"):
        o1 = exit_head(h, w, b, criterion="patience", threshold=2, backend=backend)
        assert (o1.counter == 0).all() and not o1.exit.any()
        o2 = exit_head(h, w, b, criterion="patience", threshold=2, prev_pred=o1.pred, counter=o1.counter, backend=backend)
        assert (o2.counter == 1).all() and not o2.exit.any()
        o3 = exit_head(h, w, b, criterion="patience", threshold=2, prev_pred=o2.pred, counter=o2.counter, backend=backend)
        assert (o3.counter == 2).all() and o3.exit.all()
        o4 = exit_head(-h, w, b, criterion="patience", threshold=2, prev_pred=o3.pred, counter=o3.counter, backend=backend)
        changed = o4.pred != o3.pred
        assert changed.any()
        assert torch.equal(o4.counter, torch.where(changed, 0, 3).to(torch.int32))


def test_entropy_matches_definition():
    z = torch.tensor([[0.0, 0.0], [10.0, -10.0], [1.0, 2.0]])
    w = torch.eye(2)
    out = exit_head(z, w, torch.zeros(2), criterion="entropy", threshold=0.5, backend="cpu")
    p = torch.softmax(z, 1)
    expect = -(p * p.log()).sum(1)
    assert torch.allclose(out.score, expect, atol=1e-6)
    assert abs(out.score[0].item() - math.log(2)) < 1e-6
    assert out.exit.tolist() == [False, True, False]  # H([.27, .73]) = 0.58 > 0.5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(hidden=a["hidden"][:, :-1]), ValueError, "H="),
        (lambda a: a.update(hidden=a["hidden"][None]), ValueError, "2 dims"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, "2 dims"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "dtype"),
        (lambda a: a.update(hidden=a["hidden"].int()), TypeError, "dtype"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "meta"),
        (lambda a: a.update(pooler_weight=torch.randn(8, 8)), ValueError, "together"),
        (lambda a: a.update(pooler_weight=torch.randn(7, 8), pooler_bias=torch.randn(8)), ValueError, "pooler_weight"),
        (lambda a: a.update(memory=torch.randn(5, 3)), ValueError, "memory"),
        (lambda a: a.update(memory=torch.randn(4, 3).half()), TypeError, "memory"),
        (lambda a: a.update(memory=torch.randn(4, 3), memory_lambda=1.5), ValueError, "memory_lambda"),
        (lambda a: a.update(threshold=-0.1), ValueError, "threshold"),
        (lambda a: a.update(threshold=float("nan")), ValueError, "threshold"),
        (lambda a: a.update(criterion="margin"), ValueError, "unknown criterion"),
        (lambda a: a.update(prev_pred=torch.zeros(4, dtype=torch.long)), ValueError, "patience"),
        (lambda a: a.update(criterion="patience", counter=torch.zeros(4, dtype=torch.long)), TypeError, "counter"),
        (lambda a: a.update(criterion="patience", prev_pred=torch.zeros(3, dtype=torch.long)), ValueError, "prev_pred"),
        (lambda a: a.update(backend="tpu"), ValueError, "unknown backend"),
        (lambda a: a.update(pooling="max"), ValueError, "unknown pooling"),
        (lambda a: a.update(pooling=1), TypeError, "pooling must be a string"),
        (lambda a: a.update(pooling="mean"), ValueError, "pooling='mean' .* 3 dims"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 8)), ValueError, "2 dims .*pooling='mean'"),
        (lambda a: a.update(token_mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "token_mask goes only"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 8), pooling="mean", token_mask=torch.ones(4, 5)), TypeError,
         "token_mask must have dtype"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 8), pooling="mean", token_mask=torch.ones(4, 6, dtype=torch.bool)),
         ValueError, r"token_mask must be \[N, S\]"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 8), pooling="mean", token_mask=torch.ones(5, dtype=torch.bool)),
         ValueError, "token_mask must have 2 dims"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 8), pooling="mean",
                            token_mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError, "token_mask"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 8).int(), pooling="mean"), TypeError, "hidden must have dtype"),
        (lambda a: a.update(hidden=torch.randn(4, 5, 7), pooling="mean"), ValueError, "H=7"),
        (lambda a: a.update(hidden=torch.randn(3, 5, 8), pooling="mean", memory=torch.randn(4, 3)), ValueError,
         "memory"),
    ],
)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_bad_input_clear_error(backend, mutate, exc, match):
    """Every backend names the problem; on "cpu" the kernel's own checks refuse the call
    first (eager CPU calls are not validated in Python until the kernel refuses)."""
    a = dict(hidden=torch.randn(4, 8), weight=torch.randn(3, 8), bias=torch.randn(3), backend=backend)
    mutate(a)
    with pytest.raises(exc, match=match):
        exit_head(**a)


@pytest.mark.parametrize("case", ["sparse hidden", "sparse weight", "H=0", "prev_pred with entropy",
                                  "counter with max_prob", "bool threshold"])
def test_bad_input_the_kernel_refuses_alone(case):
    """Bad calls that only the C++ checks stand between and a kernel reading garbage: the
    op refuses them when called directly, and the wrapper names them."""
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    a = dict(hidden=torch.randn(4, 8), weight=torch.randn(3, 8), bias=torch.randn(3))
    mutate, exc, match = {
        "sparse hidden": (dict(hidden=torch.randn(4, 8).to_sparse()), TypeError, "dense"),
        "sparse weight": (dict(weight=torch.randn(3, 8).to_sparse()), TypeError, "dense"),
        "H=0": (dict(hidden=torch.randn(4, 0), weight=torch.randn(3, 0)), ValueError, "H >= 1"),
        "prev_pred with entropy": (dict(prev_pred=torch.zeros(4, dtype=torch.long)), ValueError, "patience"),
        "counter with max_prob": (dict(counter=torch.zeros(4, dtype=torch.int32), criterion="max_prob"), ValueError,
                                  "patience"),
        "bool threshold": (dict(threshold=True), TypeError, "threshold must be a real number"),
    }[case]
    a.update(mutate)
    with pytest.raises(exc, match=match):
        exit_head(**a, backend="cpu")
    if case != "bool threshold":
        op = ExitHeadArgs(a["hidden"], a["weight"], a["bias"], None, None, None, 1.0, False, a.get("criterion", "entropy"),
                          0.5, a.get("prev_pred"), a.get("counter"))
        with pytest.raises(RuntimeError):
            torch.ops.eekernels.exit_head.default(*op.op_args())


@pytest.mark.parametrize("case", ["strided weight", "strided bias", "strided pooler", "numpy threshold",
                                  "tensor threshold", "int memory_lambda", "column hidden"])
def test_cpu_calls_the_kernel_refuses_as_given_still_run(case):
    """What the contract takes and the kernel does not take as it is (non-contiguous
    weights, which the full path copies; numbers of other types) gives the reference's
    result through the wrapper."""
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    import numpy as np

    g = torch.Generator().manual_seed(5)
    a = dict(hidden=torch.randn(6, 8, generator=g), weight=torch.randn(3, 8, generator=g),
             bias=torch.randn(3, generator=g), threshold=0.7, memory=torch.randn(6, 3, generator=g),
             memory_lambda=0.5)
    a.update({
        "strided weight": dict(weight=torch.randn(8, 3, generator=g).t()),
        "strided bias": dict(bias=torch.randn(3, 2, generator=g)[:, 0]),
        "strided pooler": dict(pooler_weight=torch.randn(8, 8, generator=g).t(), pooler_bias=torch.randn(8, generator=g)),
        "numpy threshold": dict(threshold=np.float32(0.7)),
        "tensor threshold": dict(threshold=torch.tensor(0.7)),
        "int memory_lambda": dict(memory_lambda=1),
        "column hidden": dict(hidden=torch.randn(8, 6, generator=g).t()),
    }[case])
    got = exit_head(**a, backend="cpu")
    want = exit_head(**a, backend="torch")
    torch.testing.assert_close(got.logits, want.logits, rtol=RTOL[torch.float32], atol=1e-6)
    torch.testing.assert_close(got.score, want.score, rtol=RTOL[torch.float32], atol=1e-6)
    assert torch.equal(got.pred, want.pred)


def test_compiled_op_checks_direct_calls():
    """torch.ops.eekernels.exit_head validates too, so a direct call cannot crash a kernel."""
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    h, w, b = torch.randn(4, 8), torch.randn(3, 7), torch.randn(3)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.eekernels.exit_head(h, w, b, None, None, None, 1.0, False, 0, 0.5, None, None)
    with pytest.raises(RuntimeError, match="criterion"):
        torch.ops.eekernels.exit_head(h, torch.randn(3, 8), b, None, None, None, 1.0, False, 7, 0.5, None, None)
    w8, none4 = torch.randn(3, 8), (None,) * 4
    with pytest.raises(RuntimeError, match="pooling must be"):
        torch.ops.eekernels.exit_head(h, w8, b, None, None, None, 1.0, False, 0, 0.5, None, None, *none4, None, 2)
    with pytest.raises(RuntimeError, match=r"\[N, S, H\] with pooling 1"):
        torch.ops.eekernels.exit_head(h, w8, b, None, None, None, 1.0, False, 0, 0.5, None, None, *none4, None, 1)
    with pytest.raises(RuntimeError, match=r"\[N, H\] with pooling 0"):
        torch.ops.eekernels.exit_head(h[:, None], w8, b, None, None, None, 1.0, False, 0, 0.5, None, None)
    with pytest.raises(RuntimeError, match="token_mask is given only"):
        torch.ops.eekernels.exit_head(h, w8, b, None, None, None, 1.0, False, 0, 0.5, None, None, *none4,
                                      torch.ones(4, 1, dtype=torch.bool), 0)
    h3 = torch.randn(4, 5, 8)
    for mask in (torch.ones(4, 6, dtype=torch.bool), torch.ones(4, 5)):
        with pytest.raises(RuntimeError, match="token_mask must be bool"):
            torch.ops.eekernels.exit_head(h3, w8, b, None, None, None, 1.0, False, 0, 0.5, None, None, *none4, mask, 1)
    with pytest.raises(RuntimeError, match="last dim must be contiguous"):
        torch.ops.eekernels.exit_head(torch.randn(4, 5, 16)[..., ::2], w8, b, None, None, None, 1.0, False, 0, 0.5,
                                      None, None, *none4, None, 1)


# --------------------------------------------------------------------------- autograd, compile


def test_autograd_runs_reference_with_true_gradients():
    torch.manual_seed(0)
    h = torch.randn(5, 12, requires_grad=True)
    lin = torch.nn.Linear(12, 3)
    out = exit_head(h, lin.weight, lin.bias, tanh_logits=True, criterion="entropy", threshold=0.5, backend="cpu")
    out.logits.square().sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    (torch.tanh(lin(h2)).square().sum()).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_opcheck(backend):
    """Schema, fake (meta) implementation and dispatch of the registered custom op."""
    h, w, b = torch.randn(6, 16), torch.randn(3, 16), torch.randn(3)
    pw, pb = torch.randn(16, 16), torch.randn(16)
    mem = torch.randn(6, 3)
    prev, cnt = torch.randint(0, 3, (6,)), torch.zeros(6, dtype=torch.int32)
    if backend == "cpu":
        op = torch.ops.eekernels.exit_head.default
    else:
        import eekernels.triton.exit_head  # noqa: F401  (registers the op)

        op = torch.ops.eekernels.exit_head_triton.default
    for crit, p, c in ((0, None, None), (2, prev, cnt)):
        torch.library.opcheck(op, (h, w, b, pw, pb, mem, 0.9, True, crit, 0.5, p, c),
                              test_utils=("test_schema", "test_faketensor"))
    # pooling 1 (mean) on trimmed token states [6, 5, 16] and a token mask
    h3, valid = torch.randn(6, 7, 16)[:, :5], torch.rand(6, 5) < 0.7
    for crit, p, c, mask in ((0, None, None, valid), (2, prev, cnt, None)):
        torch.library.opcheck(op, (h3, w, b, pw, pb, mem, 0.9, True, crit, 0.5, p, c, None, None, None, None, mask, 1),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_torch_compile_traces_the_op(pooling):
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    h, w, b = torch.randn(6, 16), torch.randn(3, 16), torch.randn(3)
    kw = {}
    if pooling == "mean":
        h, kw = torch.randn(6, 5, 16), dict(pooling="mean", token_mask=torch.rand(6, 5) < 0.7)

    def f(x):
        o = exit_head(x, w, b, criterion="max_prob", threshold=0.6, backend="cpu", **kw)
        return o.logits * 2, o.exit

    eager = f(h)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(h)
    assert torch.allclose(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# --------------------------------------------------------------------------- backends


def test_available_backends_and_errors(monkeypatch):
    avail = eekernels.available_backends()
    assert avail[0] == "torch" and "cpu" in avail
    if not torch.cuda.is_available():
        with pytest.raises(eekernels.BackendUnavailableError, match="CUDA"):
            eekernels.set_backend("cuda")
        with pytest.raises(eekernels.BackendUnavailableError, match="cuda"):
            exit_head(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2), backend="cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(eekernels.BackendUnavailableError, match="TRITON_INTERPRET"):
            exit_head(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        eekernels.set_backend("opencl")


def test_env_default_falls_back_with_one_warning(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from eekernels import backends

    monkeypatch.setenv("EEKERNELS_BACKEND", "cuda")
    monkeypatch.setattr(backends, "_warned", set())
    a = (torch.randn(3, 4), torch.randn(2, 4), torch.randn(2))
    with pytest.warns(RuntimeWarning, match="default backend 'cuda' unavailable"):
        exit_head(*a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exit_head(*a)  # warned once only
    assert backends.resolve(None, torch.device("cpu")) == "cpu"


def test_set_backend_is_used():
    eekernels.set_backend("torch")
    assert eekernels.get_backend() == "torch"
    assert eekernels.backends.resolve(None, torch.device("cpu")) == "torch"


def test_cpu_direct_call_matches_the_op_and_tracing_sees_the_op():
    """Eager CPU calls skip the dispatcher (a pybind binding of the same kernel): same
    outputs bit for bit as the registered op; under a dispatch mode the op is called."""
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    from torch.utils._python_dispatch import TorchDispatchMode

    args = make_inputs(9, 20, 3, torch.float32, "cpu", pooler=True, memory=True, patience=True, seed=11,
                       strided=True)
    via_wrapper = exit_head(**args, criterion="patience", threshold=1, backend="cpu")
    a = ExitHeadArgs(args["hidden"], args["weight"], args["bias"], args["pooler_weight"], args["pooler_bias"],
                     args["memory"], 0.9, False, "patience", 1.0, args["prev_pred"], args["counter"]).for_kernels()
    via_op = ExitHeadOutput.from_op(torch.ops.eekernels.exit_head.default(*a.op_args()), "patience")
    for x, y in zip(via_wrapper, via_op):
        assert torch.equal(x, y)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        traced = exit_head(**args, criterion="patience", threshold=1, backend="cpu")
    assert "eekernels.exit_head.default" in seen.ops
    assert torch.equal(traced.logits, via_op.logits)

    # pooling "mean" through the direct binding and through the op: the same bits
    margs = make_mean_inputs(9, 6, 20, 3, torch.float32, "cpu", mask="random", pooler=True, memory=True, seed=12)
    via_wrapper = exit_head(**margs, criterion="entropy", threshold=0.5, backend="cpu")
    a = ExitHeadArgs(margs["hidden"], margs["weight"], margs["bias"], margs["pooler_weight"], margs["pooler_bias"],
                     margs["memory"], 0.9, False, "entropy", 0.5, token_mask=margs["token_mask"],
                     pooling="mean").for_kernels()
    assert a.hidden is margs["hidden"]  # trimmed token states go to the kernel as they are
    via_op = ExitHeadOutput.from_op(torch.ops.eekernels.exit_head.default(*a.op_args()), "entropy")
    for x, y in zip(via_wrapper[:4], via_op[:4]):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- mean pooling

#: Token masks of pooling="mean": none (every token), ragged prefixes (padding, some rows
#: with no token at all), random tokens, and random tokens with every third row empty.
MASK_KINDS = ("none", "ragged", "random", "empty-rows")


def make_token_mask(n, s, kind, g):
    if kind == "none":
        return None
    if kind == "ragged":
        lengths = torch.randint(0, s + 1, (n,), generator=g)
        return torch.arange(s)[None] < lengths[:, None]
    valid = torch.rand(n, s, generator=g) < 0.6
    if kind == "empty-rows":
        valid[::3] = False
    return valid


def make_mean_inputs(n, s, h, c, dtype, device, *, mask, trimmed=True, pooler=False, memory=False,
                     patience=False, policy_units=0, seed=0):
    """The arguments of a pooling="mean" call: token states [N, S, H] and a token mask of
    kind ``mask``. ``trimmed``: the states are the first S tokens of a [N, S + 3, H] buffer
    (the engine's trimmed padding: row stride (S + 3) H). Masked tokens and the tokens past
    the view hold NaN, so a kernel that reads one shows up."""
    args = make_inputs(n, h, c, dtype, device, pooler=pooler, memory=memory, patience=patience, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    states = torch.randn(n, s + (3 if trimmed else 0), h, generator=g).to(dtype)
    valid = make_token_mask(n, s, mask, g)
    if valid is not None:
        states[:, :s][~valid] = math.nan
    states[:, s:] = math.nan
    args.update(hidden=states.to(device)[:, :s], pooling="mean",
                token_mask=None if valid is None else valid.to(device))
    if policy_units:
        from .test_exit_head_policy import policy_params

        args.update(policy_params(h, policy_units, dtype, device, seed))
    return args


def policy_thresholds(ref_scores):
    """0, 1 and one strictly between two of the reference's policy scores."""
    try:
        return (0.0, threshold_between(ref_scores, min_gap=1e-3), 1.0)
    except AssertionError:
        return (0.0, 1.0)


def run_mean_case(backend, device, n, s, h, c, dtype, crit, opts, seed):
    from .test_exit_head_policy import check_policy
    from .test_exit_head_policy import spec as policy_spec

    args = make_mean_inputs(n, s, h, c, dtype, device, mask=opts["mask"], trimmed=opts["trimmed"],
                            pooler=opts["pooler"], memory=opts["memory"], patience=(crit == "patience"),
                            policy_units=opts.get("p", 7) if crit == "policy" else 0, seed=seed)
    tanh = opts["tanh"]
    if crit == "policy":
        ref0 = policy_spec(args, threshold=0.5, tanh_logits=tanh)
        thresholds = policy_thresholds(ref0.score)
    else:
        ref0 = spec(args, criterion=crit, threshold=0.0, tanh_logits=tanh)
        thresholds = thresholds_for(crit, ref0.score)
    for thr in thresholds:
        poison_allocator(device)
        out = exit_head(**args, criterion=crit, threshold=thr, tanh_logits=tanh, backend=backend)
        if crit == "policy":
            check_policy(out, policy_spec(args, threshold=thr, tanh_logits=tanh), dtype, thr)
        else:
            check_against_spec(out, spec(args, criterion=crit, threshold=thr, tanh_logits=tanh), dtype, crit, thr)


# N x S x H crossed (36 shapes: N = 0, 1, odd; S = 1 and odd; H = 1 and not a power of two);
# dtype, criterion, C, mask and the options rotate over them so each dtype meets each
# criterion three times.
MEAN_SHAPES = list(itertools.product((0, 1, 5, 33), (1, 7, 25), (1, 45, 100)))
ALL_CRITERIA = CRITERIA + ("policy",)


def mean_cases(extra=()):
    cases = []
    for i, (n, s, h) in enumerate(MEAN_SHAPES):
        dtype, crit = DTYPES[i % 3], ALL_CRITERIA[(i // 3) % 4]
        c = (2, 3, 1, 70)[(i // 2) % 4]  # 70 > 64: Triton's scratch pooler path
        opts = dict(mask=MASK_KINDS[(i // 4) % 4] if i % 4 else MASK_KINDS[i % 3 + 1], pooler=i % 2 == 0,
                    tanh=i % 4 == 1, memory=i % 5 == 2, trimmed=i % 5 != 0)
        cases.append(pytest.param(n, s, h, c, dtype, crit, opts,
                                  id=f"N{n}-S{s}-H{h}-C{c}-{str(dtype)[6:]}-{crit}-{opts['mask']}-{i}"))
    for n, s, h, c, crit, pooler, mask in extra:
        for dtype in DTYPES:
            opts = dict(mask=mask, pooler=pooler, tanh=False, memory=crit == "entropy", trimmed=True, p=33)
            cases.append(pytest.param(n, s, h, c, dtype, crit, opts,
                                      id=f"N{n}-S{s}-H{h}-C{c}-{str(dtype)[6:]}-{crit}-{mask}-extra"))
    return cases


# The size of the CPU benchmark (MiniLM, H = 384) and a large policy network.
MEAN_EXTRA_CPU = [(128, 64, 384, 2, "entropy", True, "ragged"), (9, 25, 384, 3, "policy", True, "empty-rows")]
MEAN_EXTRA_GPU = [(512, 128, 768, 2, "entropy", True, "ragged"), (1000, 64, 1000, 1000, "max_prob", True, "random"),
                  (3000, 25, 384, 3, "patience", False, "ragged"), (600, 33, 384, 2, "policy", True, "empty-rows"),
                  (64, 512, 1024, 2, "entropy", False, "none")]


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
@pytest.mark.parametrize("n,s,h,c,dtype,crit,opts", mean_cases(MEAN_EXTRA_CPU))
def test_mean_pooling_cpu(backend, n, s, h, c, dtype, crit, opts):
    run_mean_case(backend, "cpu", n, s, h, c, dtype, crit, opts, seed=hash((n, s, h, c)) % 10_000)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n,s,h,c,dtype,crit,opts", mean_cases(MEAN_EXTRA_GPU))
def test_mean_pooling_gpu(backend, n, s, h, c, dtype, crit, opts):
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable: {eekernels.backend_report()[backend]}")
    run_mean_case(backend, "cuda", n, s, h, c, dtype, crit, opts, seed=hash((n, s, h, c)) % 10_000)


@pytest.mark.parametrize("device", _devices())
def test_mean_pooling_equals_the_summary_then_the_head(device):
    """pooling="mean" gives what the models computed before (layer_summary, then the head on
    its [N, H]): bit for bit on "torch" (the same function), within float32 rounding and with
    the same exits (threshold between two scores) on every kernel; float32 inputs, for which
    layer_summary's result is the op's float32 mean."""
    from eekernels.nn import layer_summary

    args = make_mean_inputs(23, 11, 40, 3, torch.float32, device, mask="ragged", pooler=True, seed=4)
    hidden, valid = args.pop("hidden"), args.pop("token_mask")
    del args["pooling"]
    summary = layer_summary(hidden, valid, "mean")
    ref = exit_head(summary, **args, backend="torch")
    thr = threshold_between(ref.score, min_gap=1e-3)
    before = exit_head(summary, **args, threshold=thr, backend="torch")
    now = exit_head(hidden, **args, threshold=thr, pooling="mean", token_mask=valid, backend="torch")
    for x, y in zip(before[:4], now[:4]):
        assert torch.equal(x, y)
    for backend in kernel_backends(device):
        out = exit_head(hidden, **args, threshold=thr, pooling="mean", token_mask=valid, backend=backend)
        assert rel_err(out.logits.cpu(), before.logits.cpu()) <= 1e-6, backend
        assert torch.equal(out.exit.cpu(), before.exit.cpu()) and torch.equal(out.pred.cpu(), before.pred.cpu())


@pytest.mark.parametrize("device", _devices())
def test_mean_pooling_batched_equals_alone(device):
    """Padding never changes a row's mean: a padded batch with its token mask gives each row
    what the row gives alone, unpadded and without a mask (exits at a threshold between two
    scores exactly, logits to float32 rounding)."""
    args = make_inputs(12, 48, 3, torch.float32, device, pooler=True, memory=False, patience=False, seed=8)
    weights = {k: args[k] for k in ("weight", "bias", "pooler_weight", "pooler_bias")}
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(1, 10, (12,), generator=g)  # at least one token (as in the engine: [CLS])
    valid = torch.arange(9)[None] < lengths[:, None]
    hidden = torch.randn(12, 9, 48, generator=g)
    hidden[~valid] = math.nan  # padding
    hidden, valid = hidden.to(device), valid.to(device)
    for backend in ["torch"] + kernel_backends(device):
        ref = exit_head(hidden, **weights, pooling="mean", token_mask=valid, backend=backend)
        thr = threshold_between(ref.score, min_gap=1e-3)
        out = exit_head(hidden, **weights, pooling="mean", token_mask=valid, threshold=thr, backend=backend)
        for i in range(12):
            alone = exit_head(hidden[i:i + 1, :int(lengths[i])], **weights, pooling="mean", threshold=thr,
                              backend=backend)
            assert bool(alone.exit[0]) == bool(out.exit[i]), (backend, i)
            assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-6, atol=1e-6), (backend, i)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("crit", ALL_CRITERIA)
def test_mean_pooling_no_token_pools_to_zeros_and_padding_is_never_read(device, crit):
    """A row without a real token (all-False mask, or S = 0) pools to zeros: its logits are
    those of a zero state. Masked tokens hold inf and NaN and change nothing; a NaN in a real
    token makes its row non-finite (never exits, pred -1)."""
    from .test_exit_head_policy import policy_params

    n, s, h, c = 6, 5, 12, 3
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, s, h, generator=g)
    valid = torch.rand(n, s, generator=g) < 0.7
    valid[:, 0] = True
    valid[2] = False  # no token
    hidden[~valid] = math.inf
    hidden[~valid & (torch.arange(s) % 2 == 0)] = math.nan
    hidden[4, 0, 3] = math.nan  # a real token
    kw = dict(weight=torch.randn(c, h, generator=g), bias=torch.randn(c, generator=g), criterion=crit,
              threshold=math.inf if crit in ("entropy",) else 0.0)
    if crit == "policy":
        kw.update(policy_params(h, 5, torch.float32, "cpu", 3))
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    hidden, valid = hidden.to(device), valid.to(device)
    clean = torch.where(valid[..., None], hidden, 0.0).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    for backend in ["torch"] + kernel_backends(device):
        out = exit_head(hidden, **kw, pooling="mean", token_mask=valid, backend=backend)
        expect = exit_head(clean, **kw, backend="torch")
        bad = torch.arange(n, device=device) == 4
        assert rel_err(out.logits[~bad].cpu(), expect.logits[~bad].cpu()) <= 1e-6, backend
        assert not out.exit[4] and int(out.pred[4]) == -1, backend
        assert torch.equal(out.exit[~bad], expect.exit[~bad]), backend
        zero = exit_head(torch.zeros(1, h, device=device), **kw, backend="torch")
        assert torch.allclose(out.logits[2], zero.logits[0], atol=1e-6), backend
        empty = exit_head(hidden[:, :0], **kw, pooling="mean", backend=backend)  # S = 0: every row zeros
        assert torch.allclose(empty.logits, exit_head(torch.zeros(n, h, device=device), **kw,
                                                      backend="torch").logits, atol=1e-6), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("pooler", [False, True])
def test_triton_split_of_the_float32_mean_keeps_infinite_tokens(dtype, pooler, monkeypatch):
    """Found by the long fuzz: an inf token makes a row's float32 mean inf, and Triton's
    hi + lo split of float32 rows for half weights computed lo from inf - inf = NaN, so the
    row's logits were NaN where the spec's are +-inf (or +-1 after tanh). bfloat16 runs the
    split the GPU runs (interpreter mode 2: exact float32 products of the split parts)."""
    if "triton" not in kernel_backends("cpu"):
        pytest.skip("Triton unavailable")
    import eekernels.triton.exit_head as triton_exit_head

    monkeypatch.setattr(triton_exit_head, "_BF16_INTERPRETER_MODE", 2)
    args = make_mean_inputs(7, 5, 24, 3, dtype, "cpu", mask="random", pooler=pooler, seed=21)
    states, valid = args["hidden"], args["token_mask"]
    valid[:, 0] = True
    states[0, 0, 3], states[1, 0, :] = math.inf, -math.inf
    states[2, 0, 5], states[2, 0, 6] = math.inf, -math.inf  # inf - inf: NaN in the spec too
    for tanh in (False, True):
        out = exit_head(**args, tanh_logits=tanh, threshold=0.5, backend="triton")
        ref = spec(args, tanh_logits=tanh, threshold=0.5)
        assert torch.equal(out.logits.isfinite(), ref.logits.isfinite()), tanh
        check_against_spec(out, ref, dtype, "entropy", 0.5)
