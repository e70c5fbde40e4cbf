"""exit_head with criterion "policy" (ConsistentEE's policy network) on every backend.

The policy network (consistentee.txt: "a policy network is introduced to an intermediate
layer besides an internal classifier ... shares the same input", a two-layer MLP, exit
when p(exit) > 0.5) is checked against the reference evaluated in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import eekernels
from eekernels.ops import exit_head, exit_head_reference
from eekernels.ops.exit_head import CRITERIA, DEFAULT_THRESHOLD, ExitHeadOutput

from ..helpers import DTYPES, kernel_backends, poison_allocator
from .test_exit_head import check_against_spec, make_inputs

POLICY_KEYS = ("policy_weight", "policy_bias", "policy_out_weight", "policy_out_bias")
FLOAT_KEYS = ("hidden", "weight", "bias", "pooler_weight", "pooler_bias", "memory") + POLICY_KEYS
#: Absolute tolerance on the policy probability (the kernels compute it in float32 from
#: the same, already rounded, inputs; half inputs only change the summation order).
SCORE_TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def policy_params(h, p, dtype, device, seed):
    """Random policy network [P, H], [P], [P], [1] whose exit probabilities spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    return dict(
        policy_weight=rnd(p, h, scale=2.0 / math.sqrt(h)),
        policy_bias=rnd(p, scale=0.5),
        policy_out_weight=rnd(p, scale=3.0 / math.sqrt(p)),
        policy_out_bias=rnd(1, scale=0.3),
    )


def make_policy_inputs(n, h, c, p, dtype, device, *, pooler=False, memory=False, strided=False, seed=0):
    args = make_inputs(n, h, c, dtype, device, pooler=pooler, memory=memory, patience=False, seed=seed,
                       strided=strided)
    args.update(policy_params(h, p, dtype, device, seed))
    return args


def spec(args, **kw):
    """The reference in float64 on the same inputs."""
    a = {k: (v.double() if k in FLOAT_KEYS else v) for k, v in args.items()}
    return exit_head_reference(a.pop("hidden"), a.pop("weight"), a.pop("bias"), criterion="policy", **a, **kw)


def check_policy(out: ExitHeadOutput, ref: ExitHeadOutput, dtype, threshold):
    """Shapes/dtypes, logits and argmax (shared checker), then the policy score and the
    exit decision with a tolerance of a float32 computation."""
    check_against_spec(out, ref, dtype, "policy", threshold)
    score, rscore = out.score.cpu().double(), ref.score.cpu()
    fin = torch.isfinite(rscore)
    assert torch.isnan(score[~fin]).all()
    assert ((score[fin] >= 0) & (score[fin] <= 1)).all()
    tol = SCORE_TOL[dtype]
    err = (score[fin] - rscore[fin]).abs()
    assert (err <= tol).all(), f"policy score off by {err.max():.3g} > {tol}"
    borderline = (rscore - threshold).abs() <= tol
    agree = (out.exit.cpu() == ref.exit.cpu()) | borderline
    assert agree.all(), f"{int((~agree).sum())} exit decisions differ away from the threshold"
    assert not (out.exit.cpu() & ~fin).any(), "a row with a non-finite score exited"
    return borderline


THRESHOLDS = (0.0, 0.5, 1.0)


def run_policy_case(backend, device, n, h, c, p, dtype, opts, seed):
    args = make_policy_inputs(n, h, c, p, dtype, device, pooler=opts["pooler"], memory=opts["memory"],
                              strided=opts["strided"], seed=seed)
    exits = []
    for thr in THRESHOLDS:
        ref = spec(args, threshold=thr, tanh_logits=opts["tanh"])
        poison_allocator(device)
        out = exit_head(**args, criterion="policy", threshold=thr, tanh_logits=opts["tanh"], backend=backend)
        assert out.counter is None
        check_policy(out, ref, dtype, thr)
        exits.append(out.exit.cpu())
    assert not exits[2].any(), "threshold 1: p(exit) > 1 never holds"


# N x H x C crossed (27 shapes); P, dtype and the options rotate over them so each P meets
# each dtype and each option on several shapes.
POLICY_SHAPES = list(itertools.product((1, 3, 64), (1, 32, 200), (1, 2, 3)))
PS = (1, 7, 32, 33)


def policy_cases(extra=()):
    cases = []
    for i, ((n, h, c), p) in enumerate(itertools.product(POLICY_SHAPES, PS)):
        dtype = DTYPES[i % 3]
        opts = dict(pooler=(i // 3) % 2 == 0, tanh=(i % 5 == 1), memory=(i % 5 == 1), strided=(i % 7 == 3))
        cases.append(pytest.param(n, h, c, p, dtype, opts, id=f"N{n}-H{h}-C{c}-P{p}-{str(dtype)[6:]}-{i}"))
    for n, h, c, p, pooler in extra:
        for dtype in DTYPES:
            opts = dict(pooler=pooler, tanh=True, memory=True, strided=True)
            cases.append(pytest.param(n, h, c, p, dtype, opts, id=f"N{n}-H{h}-C{c}-P{p}-{str(dtype)[6:]}-extra"))
    return cases


# Large P (tiled policy loop in Triton, more than one chunk of units in CUDA), C > 64
# (Triton's scratch pooler path) and H not a power of two; on CPU also a few hundred rows
# (the row pass split over threads).
EXTRA_CPU = [(5, 40, 2, 256, True), (5, 40, 70, 33, True), (17, 24, 3, 100, False), (300, 40, 2, 32, True),
             (128, 24, 16, 7, False), (129, 33, 17, 5, True)]
EXTRA_GPU = [(512, 768, 2, 32, True), (128, 768, 2, 32, True), (1000, 1000, 1000, 33, True),
             (3000, 768, 3, 256, False), (600, 3, 65, 33, True), (4096, 1024, 2, 64, False)]


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("n,h,c,p,dtype,opts", policy_cases(EXTRA_CPU))
def test_policy_shapes_cpu(backend, n, h, c, p, dtype, opts):
    run_policy_case(backend, "cpu", n, h, c, p, dtype, opts, seed=hash((n, h, c, p)) % 10_000)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n,h,c,p,dtype,opts", policy_cases(EXTRA_GPU))
def test_policy_shapes_gpu(backend, n, h, c, p, dtype, opts):
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable: {eekernels.backend_report()[backend]}")
    run_policy_case(backend, "cuda", n, h, c, p, dtype, opts, seed=hash((n, h, c, p)) % 10_000)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_policy_is_criterion_3_with_default_threshold_half():
    assert CRITERIA["policy"] == 3
    assert DEFAULT_THRESHOLD["policy"] == 0.5 and DEFAULT_THRESHOLD["entropy"] == 0.0
    args = make_policy_inputs(40, 16, 3, 8, torch.float32, "cpu", seed=11)
    for backend in ["torch"] + kernel_backends("cpu"):
        out = exit_head(**args, criterion="policy", backend=backend)
        assert torch.equal(out.exit, out.score > 0.5), backend
        assert 0 < int(out.exit.sum()) < 40, "the test wants some rows on each side of 0.5"


def test_policy_matches_an_explicit_mlp():
    """The score is sigmoid(Linear(P, 1)(GELU(Linear(H, P)(x)))) with torch.nn modules
    (x = the pooled state when a pooler is given), and pred/logits are the classifier's."""
    torch.manual_seed(0)
    n, h, c, p = 9, 20, 3, 32
    hid = torch.randn(n, h)
    pooler, clf = torch.nn.Linear(h, h), torch.nn.Linear(h, c)
    mlp = torch.nn.Sequential(torch.nn.Linear(h, p), torch.nn.GELU(), torch.nn.Linear(p, 1))
    pol = dict(policy_weight=mlp[0].weight, policy_bias=mlp[0].bias, policy_out_weight=mlp[2].weight[0],
               policy_out_bias=mlp[2].bias)
    with torch.no_grad():
        x = torch.tanh(pooler(hid))
        expect = torch.sigmoid(mlp(x))[:, 0]
        for backend in ["torch"] + kernel_backends("cpu"):
            out = exit_head(hid, clf.weight, clf.bias, pooler_weight=pooler.weight, pooler_bias=pooler.bias,
                            criterion="policy", threshold=0.5, backend=backend, **pol)
            assert torch.allclose(out.score, expect, atol=1e-6), backend
            assert torch.equal(out.pred, clf(x).argmax(1)), backend
            assert torch.allclose(out.logits, clf(x), atol=1e-5), backend


@pytest.mark.parametrize("device", _devices())
def test_policy_non_finite_rows(device):
    """NaN/inf logits: score NaN, no exit, pred -1. NaN policy score with finite logits: score
    NaN, no exit, pred kept. Saturated sigmoid (+-1e4 pre-activation): finite 1 / 0."""
    n, h, c, p = 6, 16, 3, 7
    args = make_policy_inputs(n, h, c, p, torch.float32, device, seed=3)
    args["hidden"][1, 4] = float("nan")
    args["hidden"][3, 0] = float("inf")
    args["hidden"][4, :] = -float("inf")
    bad = torch.tensor([False, True, False, True, True, False])
    for backend in ["torch"] + kernel_backends(device):
        out = exit_head(**args, criterion="policy", threshold=0.0, backend=backend)
        assert torch.equal(out.exit.cpu(), ~bad), backend
        assert (out.pred.cpu()[bad] == -1).all() and (out.pred.cpu()[~bad] >= 0).all(), backend
        assert torch.isnan(out.score.cpu()[bad]).all() and torch.isfinite(out.score.cpu()[~bad]).all(), backend

    args = make_policy_inputs(n, h, c, p, torch.float32, device, seed=4)
    args["policy_bias"][2] = float("nan")
    ref = spec(args, threshold=0.0)
    assert torch.isnan(ref.score).all() and not ref.exit.any() and (ref.pred >= 0).all()
    for backend in ["torch"] + kernel_backends(device):
        poison_allocator(device)
        out = exit_head(**args, criterion="policy", threshold=0.0, backend=backend)
        assert torch.isnan(out.score.cpu()).all() and not out.exit.any(), backend
        assert torch.equal(out.pred.cpu(), ref.pred.cpu()), backend
        assert torch.isfinite(out.logits).all(), backend

    for bo, score, thr, exits in ((1e4, 1.0, 0.99, True), (1e4, 1.0, 1.0, False), (-1e4, 0.0, 0.0, False)):
        args = make_policy_inputs(n, h, c, p, torch.float32, device, seed=5)
        args["policy_out_bias"].fill_(bo)
        for backend in ["torch"] + kernel_backends(device):
            out = exit_head(**args, criterion="policy", threshold=thr, backend=backend)
            assert (out.score.cpu() == score).all(), (backend, bo, out.score)
            assert bool(out.exit.all()) == exits and bool(out.exit.any()) == exits, (backend, bo, thr)


@pytest.mark.parametrize("device", _devices())
def test_policy_empty_batch(device):
    args = make_policy_inputs(0, 8, 2, 5, torch.float32, device, pooler=True, memory=True, seed=1)
    for backend in ["torch"] + kernel_backends(device):
        out = exit_head(**args, criterion="policy", threshold=0.5, backend=backend)
        assert out.logits.shape == (0, 2) and out.score.shape == (0,) and out.counter is None


# --------------------------------------------------------------------------- autograd


def test_policy_gradients_flow_to_the_policy_parameters():
    """Training runs the differentiable reference: the gradients of the exit probability
    with respect to the policy network (and the input) are those of the torch.nn MLP."""
    torch.manual_seed(1)
    n, h, c, p = 7, 12, 3, 5
    hid = torch.randn(n, h, requires_grad=True)
    clf = torch.nn.Linear(h, c)
    mlp = torch.nn.Sequential(torch.nn.Linear(h, p), torch.nn.GELU(), torch.nn.Linear(p, 1))
    out = exit_head(hid, clf.weight, clf.bias, criterion="policy", policy_weight=mlp[0].weight,
                    policy_bias=mlp[0].bias, policy_out_weight=mlp[2].weight[0], policy_out_bias=mlp[2].bias,
                    backend="cpu")
    logp = torch.log(out.score)  # REINFORCE-style objective on the exit action
    (logp * torch.linspace(-1, 1, n)).sum().backward()
    got = [t.grad.clone() for t in (hid, *mlp.parameters())]
    for t in (hid, *mlp.parameters()):
        t.grad = None
    h2 = hid.detach().clone().requires_grad_(True)
    (torch.log(torch.sigmoid(mlp(h2)))[:, 0] * torch.linspace(-1, 1, n)).sum().backward()
    want = [h2.grad] + [t.grad for t in mlp.parameters()]
    for g, w in zip(got, want):
        assert g is not None and g.abs().sum() > 0
        assert torch.allclose(g, w, atol=1e-6)
    assert clf.weight.grad is None  # the score does not depend on the classifier


def test_policy_reference_gradcheck():
    torch.manual_seed(2)
    n, h, c, p = 4, 6, 2, 3
    d = dict(dtype=torch.float64)
    hid, w, b = torch.randn(n, h, **d), torch.randn(c, h, **d), torch.randn(c, **d)
    pw, pb = torch.randn(h, h, **d), torch.randn(h, **d)
    params = [torch.randn(p, h, **d), torch.randn(p, **d), torch.randn(p, **d), torch.randn(1, **d)]
    params = [t.requires_grad_(True) for t in params]

    def f(qw, qb, qo, qob):
        return exit_head_reference(hid, w, b, pooler_weight=pw, pooler_bias=pb, criterion="policy",
                                   policy_weight=qw, policy_bias=qb, policy_out_weight=qo,
                                   policy_out_bias=qob).score

    assert torch.autograd.gradcheck(f, params)


# --------------------------------------------------------------------------- registered ops


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_policy_opcheck(backend):
    """Schema, fake (meta) implementation and dispatch with the policy arguments."""
    n, h, c, p = 6, 16, 3, 7
    args = make_policy_inputs(n, h, c, p, torch.float32, "cpu", pooler=True, memory=True, seed=9)
    if backend == "cpu":
        op = torch.ops.eekernels.exit_head.default
    else:
        import eekernels.triton.exit_head  # noqa: F401  (registers the op)

        op = torch.ops.eekernels.exit_head_triton.default
    a = args
    base = (a["hidden"], a["weight"], a["bias"], a["pooler_weight"], a["pooler_bias"], a["memory"], 0.9, True,
            3, 0.5, None, None)
    torch.library.opcheck(op, base + tuple(a[k] for k in POLICY_KEYS), test_utils=("test_schema", "test_faketensor"))
    # by keyword too (the policy arguments default to None in the schema)
    out = op(*base, **{k: a[k] for k in POLICY_KEYS})
    assert out[4].shape == (0,)
    ref = spec(args, threshold=0.5, tanh_logits=True)
    assert (out[1].double() - ref.score).abs().max() < 1e-5


def test_policy_torch_compile_traces_the_op():
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    args = make_policy_inputs(6, 16, 3, 4, torch.float32, "cpu", seed=2)

    def f(x):
        o = exit_head(x, args["weight"], args["bias"], criterion="policy", threshold=0.5, backend="cpu",
                      **{k: args[k] for k in POLICY_KEYS})
        return o.score * 2, o.exit

    eager = f(args["hidden"])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(args["hidden"])
    assert torch.allclose(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_policy_compiled_op_checks_direct_calls():
    """torch.ops.eekernels.exit_head rejects bad policy arguments itself (no kernel crash)."""
    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    a = make_policy_inputs(4, 8, 3, 5, torch.float32, "cpu", seed=1)
    q = [a[k] for k in POLICY_KEYS]
    base = (a["hidden"], a["weight"], a["bias"], None, None, None, 1.0, False)
    op = torch.ops.eekernels.exit_head
    with pytest.raises(RuntimeError, match="needs policy_weight"):
        op(*base, 3, 0.5, None, None)
    with pytest.raises(RuntimeError, match="only with criterion 3"):
        op(*base, 0, 0.5, None, None, *q)
    with pytest.raises(RuntimeError, match=r"threshold must be in \[0, 1\]"):
        op(*base, 3, 1.5, None, None, *q)
    with pytest.raises(RuntimeError, match="policy_weight must be"):
        op(*base, 3, 0.5, None, None, q[0][:, :-1].contiguous(), *q[1:])
    with pytest.raises(RuntimeError, match="policy_out_weight must be"):
        op(*base, 3, 0.5, None, None, q[0], q[1], q[2][None], q[3])
    with pytest.raises(RuntimeError, match="policy_out_bias must be"):
        op(*base, 3, 0.5, None, None, q[0], q[1], q[2], torch.zeros(2))
    with pytest.raises(RuntimeError, match="dtype"):
        op(*base, 3, 0.5, None, None, q[0].double(), *q[1:])
    with pytest.raises(RuntimeError, match="contiguous"):
        op(*base, 3, 0.5, None, None, torch.randn(8, 5).t(), *q[1:])


# --------------------------------------------------------------------------- bad input


def _bad(**kw):
    def mutate(a):
        for k, v in kw.items():
            a[k] = v(a) if callable(v) else v
    return mutate


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (_bad(criterion="entropy"), ValueError, "only with criterion='policy'"),
        (_bad(criterion="patience"), ValueError, "only with criterion='policy'"),
        (lambda a: a.pop("policy_out_bias"), ValueError, "missing policy_out_bias"),
        (lambda a: [a.pop(k) for k in POLICY_KEYS], ValueError, "needs policy_weight"),
        (_bad(policy_weight=lambda a: a["policy_weight"][:, :-1]), ValueError, "policy_weight must be"),
        (_bad(policy_weight=lambda a: a["policy_weight"][:0]), ValueError, "P >= 1"),
        (_bad(policy_weight=lambda a: a["policy_weight"][0]), ValueError, "2 dims"),
        (_bad(policy_bias=lambda a: a["policy_bias"][:-1]), ValueError, "policy_bias must be"),
        (_bad(policy_out_weight=lambda a: a["policy_out_weight"][None]), ValueError, "1 dim,"),
        (_bad(policy_out_weight=lambda a: a["policy_out_weight"][:-1]), ValueError, "policy_out_weight must be"),
        (_bad(policy_out_bias=torch.zeros(2)), ValueError, "policy_out_bias must be"),
        (_bad(policy_out_bias=torch.tensor(0.0)), ValueError, "1 dim,"),
        (_bad(policy_weight=lambda a: a["policy_weight"].double()), TypeError, "dtype"),
        (_bad(policy_out_bias=lambda a: a["policy_out_bias"].half()), TypeError, "dtype"),
        (_bad(policy_bias=lambda a: a["policy_bias"].to("meta")), ValueError, "meta"),
        (_bad(policy_weight=[[1.0]]), TypeError, "torch.Tensor"),
        (_bad(threshold=1.5), ValueError, r"\[0, 1\]"),
        (_bad(threshold=math.inf), ValueError, r"\[0, 1\]"),
        (_bad(threshold=-0.1), ValueError, "threshold"),
        (_bad(threshold=float("nan")), ValueError, "threshold"),
        (_bad(prev_pred=torch.zeros(4, dtype=torch.long)), ValueError, "patience"),
    ],
)
def test_policy_bad_input_clear_error(mutate, exc, match):
    a = make_policy_inputs(4, 8, 3, 5, torch.float32, "cpu", seed=1)
    a["criterion"] = "policy"
    mutate(a)
    with pytest.raises(exc, match=match):
        exit_head(**a)


def test_other_criteria_keep_their_threshold_range_and_default():
    """Thresholds above 1 stay valid outside "policy"; threshold=None still means 0.0 there."""
    a = make_inputs(4, 8, 3, torch.float32, "cpu", pooler=False, memory=False, patience=False, seed=1)
    for backend in ["torch"] + kernel_backends("cpu"):
        assert exit_head(**a, criterion="entropy", threshold=2.5, backend=backend).exit.all()
        assert not exit_head(**a, criterion="entropy", backend=backend).exit.any()  # entropy < 0: never
        assert exit_head(**a, criterion="max_prob", backend=backend).exit.all()  # max_prob >= 0: always


@pytest.mark.parametrize("device", _devices())
def test_policy_inf_preactivation_scores_one_on_every_backend(device):
    """A policy pre-activation of +inf (finite tanh logits, an inf hidden entry) gives
    GELU(+inf) = inf and p(exit) = 1 on every backend, as in the float64 spec (torch's
    vectorised float32 gelu alone gives NaN there). Found by the op fuzz."""
    p = 16
    args = dict(hidden=torch.tensor([[math.inf], [math.inf]], device=device),
                weight=torch.ones(1, 1, device=device), bias=torch.zeros(1, device=device), tanh_logits=True,
                memory=torch.zeros(2, 1, device=device), memory_lambda=0.0,
                policy_weight=torch.ones(p, 1, device=device), policy_bias=torch.zeros(p, device=device),
                policy_out_weight=torch.ones(p, device=device), policy_out_bias=torch.zeros(1, device=device))
    for backend in ["torch"] + kernel_backends(device):
        out = exit_head(**args, criterion="policy", threshold=0.5, backend=backend)
        assert torch.equal(out.score.cpu(), torch.ones(2)), (backend, out.score)
        assert out.exit.all(), backend
