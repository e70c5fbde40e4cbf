"""Property-based fuzzing (hypothesis) of every op on every CPU backend.

Each op has a strategy that draws one *case* (plain Python values: sizes, dtype, options,
thresholds, layouts, poisoned entries and a seed; hypothesis shrinks these) and a check
that builds the tensors from the case and compares a backend with the specification:

- ``exit_head`` against the reference evaluated in float64 (the tolerance conventions of
  tests/ops/test_exit_head.py and tests/ops/test_exit_head_policy.py), plus the non-finite contract
  (such a row never exits, its prediction is -1, its score NaN, or 0 with its patience
  counter reset);
- ``compact_rows``, ``scatter_exits``, ``pack_tokens``, ``pack_tokens_padded`` and
  ``scatter_tokens`` (pure data movement) bit for bit against their references;
- ``mpee_prune`` as tests/ops/test_token_ops.py does (kept rows bit for bit, the fusion token
  within RTOL); on the "torch" backend the vectorised ``mpee_prune_differentiable`` is the
  one compared with the per-sample reference.

The data-movement ops' "torch" backend *is* their reference, so only the kernels are
fuzzed there. Near ties: an exit decision whose reference score lies within the checkers'
float tolerance of the threshold (for patience: whose top two logits are within rounding)
may differ; those rows are excluded from the exit comparison only, and counted.

CI runs :data:`CI_EXAMPLES` derandomized examples per op and backend; ``tests/fuzz_long.py``
runs the same properties for as many examples as asked and writes the table of
tests/README.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eekernels.ops import (  # noqa: E402
    compact_rows,
    exit_head,
    mpee_prune_differentiable,
    pack_tokens_padded_reference,
    pack_tokens_reference,
)

from ..helpers import kernel_backends, poison_allocator  # noqa: E402
from .test_compaction import MASKS as KEEP_MASKS  # noqa: E402
from .test_compaction import check_compacted, make_keep, make_scatter, run_scatter  # noqa: E402
from .test_compaction import rnd as rnd_any_dtype  # noqa: E402
from .test_exit_head import check_against_spec, make_inputs, make_token_mask  # noqa: E402
from .test_exit_head import spec as exit_head_spec  # noqa: E402
from .test_exit_head_policy import check_policy, policy_params  # noqa: E402
from .test_exit_head_policy import spec as policy_spec  # noqa: E402
from .test_token_ops import MASKS as ACTIVE_MASKS  # noqa: E402
from .test_token_ops import check_pack, check_pack_padded, check_prune, check_scatter, make_active  # noqa: E402
from .test_token_ops import mpee_inputs  # noqa: E402
from .test_token_ops import rnd as rnd_float  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ANY_DTYPES = {**DTYPES, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}

#: How a tensor is laid out in memory (same values): see :func:`relayout`.
LAYOUTS = ("contiguous", "offset", "padded_rows", "every_other", "reversed_dims")


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another memory layout, inside a buffer whose other elements hold a
    sentinel (NaN for floats), so that a kernel reading outside the view shows up.

    "offset": contiguous at storage offset 3; "padded_rows": the last dim contiguous but
    each row two elements longer, at offset 1 (a slice such as ``states[:, :, a:b]``);
    "every_other": last-dim stride 2; "reversed_dims": every dim's stride reversed (no dim
    contiguous, e.g. a transposed matrix)."""
    sentinel = math.nan if t.dtype.is_floating_point else (True if t.dtype == torch.bool else 0x5A)
    if kind == "contiguous":
        return t.contiguous()
    if kind == "offset":
        buf = t.new_full((t.numel() + 3,), sentinel)
        view = buf[3:].view(t.shape)
    elif kind == "padded_rows":
        buf = t.new_full((*t.shape[:-1], t.shape[-1] + 2), sentinel)
        view = buf[..., 1:1 + t.shape[-1]]
    elif kind == "every_other":
        buf = t.new_full((*t.shape[:-1], 2 * t.shape[-1]), sentinel)
        view = buf[..., ::2]
    elif kind == "reversed_dims":
        dims = tuple(reversed(range(t.dim())))
        view = t.new_full(tuple(t.shape[d] for d in dims), sentinel).permute(dims)
    else:
        raise ValueError(f"relayout: unknown kind {kind!r}")
    view.copy_(t)
    return view


@dataclass
class Outcome:
    """What one checked example adds to the tallies: rows excused as near ties and, of
    those, the rows whose exit decision actually differed from the reference."""

    near_ties: int = 0
    near_tie_flips: int = 0


def _sizes(small: tuple, high: int):
    """The listed edge sizes (0, 1, odd) or any size up to ``high``."""
    return st.one_of(st.sampled_from(small), st.integers(min(small), high))


# Strategies are built once here: building them inside each draw costs more than the check.
SEEDS = st.integers(0, 2**31 - 1)
BOOLS = st.booleans()
FLOAT_DTYPE = st.sampled_from(tuple(DTYPES))
LAYOUT = st.sampled_from(LAYOUTS)
BIG = st.integers(0, 10**6)  # a row/column/position, taken modulo the size


# --------------------------------------------------------------------------- exit_head

CRITERIA = ("entropy", "max_prob", "patience", "policy")
#: Where a row's non-finite value goes: one entry of hidden set to NaN/+inf/-inf, a whole
#: hidden row -inf, or a NaN in the memory row.
POISONS = ("nan", "inf", "-inf", "row-inf", "memory-nan")


def _threshold(criterion: str, c: int):
    """Thresholds at the edges of each criterion's range and anywhere inside it."""
    if criterion == "entropy":  # entropy in [0, log C]
        top = math.log(c)
        return st.one_of(st.sampled_from((0.0, math.inf, top, top / 2, 1e-30)),
                         st.floats(0.0, top + 0.1, allow_nan=False))
    if criterion == "max_prob":  # max probability in [1/C, 1]
        return st.one_of(st.sampled_from((0.0, 1.0, 1.0 / c, math.inf)), st.floats(0.0, 1.0))
    if criterion == "patience":  # integer counters
        return st.one_of(st.integers(0, 6).map(float), st.just(math.inf))
    return st.one_of(st.sampled_from((0.0, 0.5, 1.0)), st.floats(0.0, 1.0))  # policy: a probability


THRESHOLDS = {(crit, c): _threshold(crit, c) for crit in CRITERIA for c in range(1, 8)}
EH_N, EH_H, EH_P = _sizes((0, 1, 3, 17, 33), 48), _sizes((1, 3, 24, 33, 100), 130), _sizes((1, 7, 33), 40)
EH_LAMBDA = st.one_of(st.sampled_from((0.0, 1.0)), st.floats(0.0, 1.0))
EH_POISON = st.lists(st.tuples(BIG, st.sampled_from(POISONS), BIG), max_size=3)
#: pooling "mean": S tokens (0: every row pools to zeros), the token mask (None: every
#: token; see tests/ops/test_exit_head.py MASK_KINDS), extra tokens past a trimmed view (the
#: engine's). Edges listed commonest first: the few derandomized CI examples favour the
#: first entries.
EH_S = _sizes((5, 1, 7, 0), 40)
EH_MASK = st.sampled_from(("ragged", "random", "empty-rows", "none", "all", "alternating"))
EH_TRIM = st.sampled_from((3, 0, 1))


@st.composite
def exit_head_cases(draw):
    criterion = draw(st.sampled_from(CRITERIA))
    n, h, c, memory = draw(EH_N), draw(EH_H), draw(st.integers(1, 7)), draw(BOOLS)
    mean = draw(BOOLS)
    return dict(
        criterion=criterion, n=n, h=h, c=c, dtype=draw(FLOAT_DTYPE), pooler=draw(BOOLS), tanh_logits=draw(BOOLS),
        memory=memory, memory_lambda=draw(EH_LAMBDA) if memory else 1.0, threshold=draw(THRESHOLDS[criterion, c]),
        policy_units=draw(EH_P) if criterion == "policy" else 0,
        scale=draw(st.sampled_from((0.01, 1.0, 8.0))),  # 8: saturated softmax, large logits
        hidden_layout=draw(LAYOUT), weight_layout=draw(LAYOUT), poison=draw(EH_POISON) if n else [],
        pooling="mean" if mean else "cls", s=draw(EH_S) if mean else 0, mask=draw(EH_MASK) if mean else "none",
        mask_layout=draw(LAYOUT) if mean else "contiguous", trim=draw(EH_TRIM) if mean else 0,
        seed=draw(SEEDS),
    )


def _mean_states(case: dict, hidden: torch.Tensor):
    """pooling "mean": token states [N, S, H] (the poisoned [N, H] rows spread over the
    tokens) and the token mask, in the case's layouts. Masked tokens and the ``trim`` tokens
    past the view are NaN: a kernel that reads one shows up (tokens outside the mask are
    never summed; the spec does the same)."""
    n, s, h = case["n"], case["s"], case["h"]
    g = torch.Generator().manual_seed(case["seed"] + 3)
    scale = torch.rand(n, s, 1, generator=g) * 2  # tokens differ, each a multiple of its row
    states = (hidden.float()[:, None, :] * scale + torch.randn(n, s, h, generator=g) * 0.1 * case["scale"])
    states = states.to(hidden.dtype)
    non_finite = ~torch.isfinite(hidden)  # the poison stays where it was put, in every token
    states = torch.where(non_finite[:, None, :], hidden[:, None, :], states)
    kind = case["mask"]
    if kind == "all":
        valid = torch.ones(n, s, dtype=torch.bool)
    elif kind == "alternating":
        valid = (torch.arange(n)[:, None] + torch.arange(s)[None]) % 2 == 0
    else:
        valid = make_token_mask(n, s, kind, g)
    if valid is not None:
        states[~valid] = math.nan
    buf = torch.full((n, s + case["trim"], h), math.nan, dtype=hidden.dtype)
    buf[:, :s] = states
    states = relayout(buf, case["hidden_layout"])[:, :s]
    return states, None if valid is None else relayout(valid, case["mask_layout"])


def build_exit_head(case: dict) -> dict:
    """The keyword arguments of ``exit_head`` for ``case`` (tensors on the CPU)."""
    n, h, c, dtype = case["n"], case["h"], case["c"], DTYPES[case["dtype"]]
    args = make_inputs(n, h, c, dtype, "cpu", pooler=case["pooler"], memory=case["memory"],
                       patience=case["criterion"] == "patience", seed=case["seed"])
    if case["criterion"] == "policy":
        args.update(policy_params(h, case["policy_units"], dtype, "cpu", case["seed"]))
    if case["memory"]:
        args["memory_lambda"] = case["memory_lambda"]
    hidden = (args["hidden"].float() * case["scale"]).to(dtype)
    for row, kind, col in case["poison"]:
        row, col = row % n, col % h
        if kind == "row-inf":
            hidden[row] = -math.inf
        elif kind == "memory-nan":
            if case["memory"]:
                args["memory"][row, col % c] = math.nan
        else:
            hidden[row, col] = float(kind)
    if case.get("pooling", "cls") == "mean":
        args["hidden"], args["token_mask"] = _mean_states(case, hidden)
        args["pooling"] = "mean"
    else:
        args["hidden"] = relayout(hidden, case["hidden_layout"])
    for key in ("weight", "pooler_weight", "policy_weight"):
        if key in args:
            args[key] = relayout(args[key], case["weight_layout"])
    return args


def check_exit_head(backend: str, case: dict) -> Outcome:
    args = build_exit_head(case)
    crit, thr = case["criterion"], case["threshold"]
    kw = dict(criterion=crit, threshold=thr, tanh_logits=case["tanh_logits"])
    dtype = DTYPES[case["dtype"]]
    poison_allocator("cpu", 1 << 20)
    out = exit_head(**args, **kw, backend=backend)
    if crit == "policy":
        ref = policy_spec(args, threshold=thr, tanh_logits=case["tanh_logits"])
        borderline = check_policy(out, ref, dtype, thr)
    else:
        ref = exit_head_spec(args, **kw)
        borderline = check_against_spec(out, ref, dtype, crit, thr)
    # The non-finite contract, row by row (the checkers compare finite entries only). Which
    # non-finite value is not part of it: a subnormal memory_lambda is 0 in float32, so an
    # inf logit of the float64 spec is NaN (0 * inf) in the kernels.
    assert torch.equal(out.logits.isfinite(), ref.logits.isfinite()), "non-finite logits differ"
    bad = ~torch.isfinite(ref.logits).all(dim=1)
    assert not out.exit[bad].any(), "a row with non-finite logits exited"
    assert (out.pred[bad] == -1).all(), "a row with non-finite logits has a prediction"
    if crit == "patience":
        assert (out.counter[bad] == 0).all() and (out.score[bad] == 0).all(), "patience not reset"
    else:
        assert out.score[bad].isnan().all(), "a row with non-finite logits has a score"
    # Edges no tolerance may blur: entropy < 0, p(exit) > 1 and a finite score >= inf never hold.
    never = {"entropy": thr == 0.0, "policy": thr == 1.0}.get(crit, thr == math.inf)
    if never:
        assert not out.exit.any(), f"{crit} exits at threshold {thr}"
    return Outcome(int(borderline.sum()), int(((out.exit != ref.exit) & borderline).sum()))


# --------------------------------------------------------------------------- compaction


TRAILING = st.one_of(st.just(()), st.tuples(st.integers(1, 7)), st.tuples(st.integers(1, 7), st.integers(1, 40)))
ROWS = _sizes((0, 1, 3, 7, 33), 70)
COMPACT_TENSORS = st.lists(st.tuples(st.sampled_from(tuple(ANY_DTYPES)), TRAILING,
                                     st.sampled_from(LAYOUTS + ("broadcast",))), max_size=4)


@st.composite
def compact_rows_cases(draw):
    return dict(n=draw(ROWS), keep=draw(st.sampled_from(KEEP_MASKS)), tensors=draw(COMPACT_TENSORS), seed=draw(SEEDS))


def check_compact_rows(backend: str, case: dict) -> Outcome:
    g = torch.Generator().manual_seed(case["seed"])
    n = case["n"]
    keep = make_keep(n, case["keep"], g)
    tensors = []
    for dtype, trailing, layout in case["tensors"]:
        if layout == "broadcast":  # every row the same memory: row stride 0
            tensors.append(rnd_any_dtype((1, *trailing), ANY_DTYPES[dtype], g).expand(n, *trailing))
        else:
            tensors.append(relayout(rnd_any_dtype((n, *trailing), ANY_DTYPES[dtype], g), layout))
    poison_allocator("cpu", 1 << 20)
    check_compacted(compact_rows(keep, tensors, backend=backend), keep, tensors)
    return Outcome()


@st.composite
def scatter_exits_cases(draw):
    n = draw(ROWS)
    return dict(
        n=n, c=draw(st.integers(1, 7)), extra_rows=draw(st.integers(0, 5)),
        exit=draw(st.sampled_from(KEEP_MASKS)), layer_dtype=draw(st.sampled_from(("int32", "int64"))),
        strided=draw(BOOLS), layer=draw(st.sampled_from((1, 2, 12, 2**31 - 1))),
        nan_rows=draw(st.lists(BIG, max_size=3)) if n else [], seed=draw(SEEDS),
    )


def check_scatter_exits(backend: str, case: dict) -> Outcome:
    g = torch.Generator().manual_seed(case["seed"])
    args = make_scatter(case["n"], case["c"], case["extra_rows"], case["exit"], ANY_DTYPES[case["layer_dtype"]], g,
                        strided=case["strided"])
    for row in case["nan_rows"]:  # NaN/inf logits are copied like any others
        args[4][row % case["n"], row % case["c"]] = (math.nan, math.inf, -0.0)[row % 3]
    run_scatter(backend, args, case["layer"])
    return Outcome()


# --------------------------------------------------------------------------- token ops


TOK_B, TOK_S, TOK_H = _sizes((0, 1, 3), 5), _sizes((1, 2, 7), 40), _sizes((1, 3, 24), 70)


@st.composite
def token_cases(draw):
    return dict(
        b=draw(TOK_B), s=draw(TOK_S), h=draw(TOK_H), dtype=draw(FLOAT_DTYPE),
        active=draw(st.sampled_from(ACTIVE_MASKS)),
        hidden_layout=draw(LAYOUT), active_layout=draw(LAYOUT), padded=draw(BOOLS), permute=draw(BOOLS),
        values_layout=draw(LAYOUT), seed=draw(SEEDS),
    )


def _token_inputs(case: dict):
    g = torch.Generator().manual_seed(case["seed"])
    hidden = rnd_float((case["b"], case["s"], case["h"]), DTYPES[case["dtype"]], g)
    if case["b"] == 0:  # make_active's "ragged" needs a sample 0
        active = torch.zeros(0, case["s"], dtype=torch.bool)
    else:
        active = make_active(case["b"], case["s"], case["active"], g)
    return g, hidden, active


def check_pack_tokens(backend: str, case: dict) -> Outcome:
    _, hidden, active = _token_inputs(case)
    poison_allocator("cpu", 1 << 20)
    check_pack(backend, relayout(hidden, case["hidden_layout"]), relayout(active, case["active_layout"]))
    return Outcome()


def check_pack_tokens_padded(backend: str, case: dict) -> Outcome:
    _, hidden, active = _token_inputs(case)
    poison_allocator("cpu", 1 << 20)
    check_pack_padded(backend, relayout(hidden, case["hidden_layout"]), relayout(active, case["active_layout"]))
    return Outcome()


def check_scatter_tokens(backend: str, case: dict) -> Outcome:
    """Scatter the packed rows of another batch (varlen or padded index, optionally in a
    permuted order, values in any layout) into a contiguous ``hidden``."""
    g, hidden, active = _token_inputs(case)
    source = rnd_float(tuple(hidden.shape), hidden.dtype, g)
    packed = (pack_tokens_padded_reference if case["padded"] else pack_tokens_reference)(source, active)
    index, values = packed.index, packed.values
    if case["permute"] and not case["padded"]:
        order = torch.randperm(index.shape[0], generator=g)
        index, values = index[order], values[order]
    check_scatter(backend, hidden, index, relayout(values, case["values_layout"]))
    return Outcome()


#: Special memory values: ties (-0.0 with 0.0) and the documented order (NaN ranks last).
MEMORY_SPECIALS = (math.nan, math.inf, -math.inf, -0.0, 0.0)


KEEP_RATIO = st.one_of(st.sampled_from((1.0, 0.7, 0.5, 0.05, 1e-9)), st.floats(1e-9, 1.0))
MEMORY_POKES = st.lists(st.tuples(BIG, st.integers(0, len(MEMORY_SPECIALS) - 1)), max_size=4)


@st.composite
def mpee_prune_cases(draw):
    return dict(
        b=draw(TOK_B), s=draw(TOK_S), h=draw(_sizes((1, 3, 24), 40)), dtype=draw(FLOAT_DTYPE), ties=draw(BOOLS),
        padding=draw(BOOLS), keep_ratio=draw(KEEP_RATIO), memory_specials=draw(MEMORY_POKES),
        hidden_layout=draw(LAYOUT), memory_layout=draw(LAYOUT), seed=draw(SEEDS),
    )


def check_mpee_prune(backend: str, case: dict) -> Outcome:
    g = torch.Generator().manual_seed(case["seed"])
    b, s = case["b"], case["s"]
    if b == 0:  # mpee_inputs makes sample 0 [CLS]-only; an empty batch has no sample 0
        hidden, valid = torch.zeros(0, s, case["h"], dtype=DTYPES[case["dtype"]]), torch.zeros(0, s, dtype=torch.bool)
        memory, attention = torch.zeros(0, s), torch.zeros(0, s)
    else:
        hidden, valid, memory, attention = mpee_inputs(b, s, case["h"], DTYPES[case["dtype"]], g, ties=case["ties"],
                                                       padding=case["padding"])
        for pos, k in case["memory_specials"]:
            memory.view(-1)[pos % memory.numel()] = MEMORY_SPECIALS[k]
    hidden = relayout(hidden, case["hidden_layout"])
    memory = relayout(memory, case["memory_layout"])
    poison_allocator("cpu", 1 << 20)
    if backend == "torch":
        check_prune(None, hidden, valid, memory, attention, case["keep_ratio"], fn=mpee_prune_differentiable)
    else:
        check_prune(backend, hidden, valid, memory, attention, case["keep_ratio"])
    return Outcome()


# --------------------------------------------------------------------------- the properties


@dataclass(frozen=True)
class Property:
    """One op's fuzz property: a strategy of cases, the check of one case on one backend,
    and the backends it runs on ("torch" only where the torch path is not the reference)."""

    strategy: Callable
    check: Callable[[str, dict], Outcome]
    with_torch: bool = False


PROPERTIES: Dict[str, Property] = {
    "exit_head": Property(exit_head_cases, check_exit_head, with_torch=True),
    "compact_rows": Property(compact_rows_cases, check_compact_rows),
    "scatter_exits": Property(scatter_exits_cases, check_scatter_exits),
    "pack_tokens": Property(token_cases, check_pack_tokens),
    "pack_tokens_padded": Property(token_cases, check_pack_tokens_padded),
    "scatter_tokens": Property(token_cases, check_scatter_tokens),
    "mpee_prune": Property(mpee_prune_cases, check_mpee_prune, with_torch=True),
}


def backends_for(op: str) -> List[str]:
    """The CPU backends ``op`` is fuzzed on in this process."""
    return (["torch"] if PROPERTIES[op].with_torch else []) + kernel_backends("cpu")


@dataclass
class Tally:
    """The figures of one fuzz run of one op on one backend."""

    op: str
    backend: str
    examples: int = 0
    mismatches: int = 0
    near_ties: int = 0
    near_tie_flips: int = 0
    seconds: float = 0.0
    failures: List[str] = field(default_factory=list)


def run_property(op: str, backend: str, examples: int, *, seed: Optional[int] = None, tally: Optional[Tally] = None,
                 shrink: bool = True) -> Tally:
    """Run ``op``'s property on ``backend`` for ``examples`` hypothesis examples.

    ``seed`` None: derandomized (the same examples every run, as CI wants); otherwise that
    seed. Without ``tally`` the first mismatch raises (shrunk, as hypothesis reports it);
    with one, every mismatch is counted and described in ``tally.failures`` instead, and
    the run goes on (no shrinking: rerun that seed without a tally to shrink); the first
    case of each kind of failure (up to five kinds) is kept in ``tally.failures``."""
    prop = PROPERTIES[op]
    t = tally if tally is not None else Tally(op, backend)
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink and tally is None else [])

    def one(case):
        t.examples += 1
        if tally is None:
            outcome = prop.check(backend, case)
        else:
            try:
                outcome = prop.check(backend, case)
            except Exception as exc:  # a crash is a mismatch too
                t.mismatches += 1
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                if len(t.failures) < 5 and not any(f.startswith(message) for f in t.failures):
                    t.failures.append(f"{message} | case={case!r}")  # the first case of each kind
                return
        t.near_ties += outcome.near_ties
        t.near_tie_flips += outcome.near_tie_flips

    test = given(prop.strategy())(one)
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=False)(test)
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    start = time.perf_counter()
    try:
        test()
    finally:
        t.seconds += time.perf_counter() - start
    return t


#: Examples per op and backend in CI: the Triton interpreter is much slower than the rest.
CI_EXAMPLES = {"torch": 40, "cpu": 40, "triton": 15}

CASES = [pytest.param(op, backend, id=f"{op}-{backend}") for op in PROPERTIES for backend in backends_for(op)]


@pytest.mark.parametrize("op,backend", CASES)
def test_fuzz(op, backend):
    t = run_property(op, backend, CI_EXAMPLES[backend])
    assert t.examples > 0


def test_relayout_keeps_values_and_changes_strides():
    t = torch.arange(24.0).view(2, 3, 4)
    for kind in LAYOUTS:
        v = relayout(t, kind)
        assert torch.equal(v, t), kind
        assert (kind == "contiguous") == (v.stride() == t.stride() and v.storage_offset() == 0), kind


def test_a_wrong_kernel_is_caught(monkeypatch):
    """The property can fail: an exit head whose class-0 logit is off by 1e-2 is found."""
    import sys

    here = sys.modules[__name__]
    real = here.exit_head

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(logits=out.logits + 1e-2 * (torch.arange(out.logits.shape[1]) == 0))

    monkeypatch.setattr(here, "exit_head", wrong)
    with pytest.raises(AssertionError):
        run_property("exit_head", "cpu", 40, shrink=False)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_empty_inputs_with_any_strides(backend):
    """Found by the fuzz: an empty input whose last dim is not contiguous (an empty slice
    ``x[:, ::2]``), or an exit-head input with H = 1 and a last-dim stride other than 1,
    reached the C++ checks unchanged (``.contiguous()`` keeps the strides of a tensor that
    is already contiguous in torch's sense) and was rejected. Every op takes them."""
    h3 = torch.zeros(0, 3, 8)[:, :, ::2]
    assert h3.stride(-1) == 2
    active = torch.zeros(0, 3, dtype=torch.bool)
    out = exit_head(torch.zeros(0, 8)[:, ::2], torch.randn(2, 4), torch.randn(2), backend=backend)
    assert out.logits.shape == (0, 2)
    column = torch.randn(1, 3).t()  # H = 1 read down a column: [3, 1] with strides (1, 3)
    out = exit_head(column, torch.ones(2, 1), torch.zeros(2), backend=backend)
    assert torch.equal(out.logits, column.expand(3, 2))
    assert compact_rows(torch.zeros(0, dtype=torch.bool), [h3], backend=backend).tensors[0].shape == (0, 3, 4)
    check_pack(backend, h3, active)
    check_pack_padded(backend, h3, active)
    check_prune(backend, h3, active, torch.zeros(0, 3), torch.zeros(0, 3), 0.5)
    logits_t = torch.zeros(0, 6)[:, ::2]  # [0, 3], last-dim stride 2
    run_scatter(backend, [torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.bool), logits_t], 1)
