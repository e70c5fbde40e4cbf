"""The fused exit head: one call per layer decides which rows leave the model.

For N active rows it maps each row's state h to

    h      = hidden[n]                pooling "cls": the row's [CLS] (or any [N, H]) state
           = mean of hidden[n, s] over the tokens s with token_mask[n, s]
                                      pooling "mean": hidden [N, S, H], float32, 0 without a token
    x      = tanh(Wp h + bp)          if a pooler is given, else h
    z      = W x + b                  classifier logits
    z      = tanh(z)                  if ``tanh_logits``          (mpee.txt eq. 9)
    z      = (1-lam) m_prev + lam z   if ``memory`` is given      (mpee.txt eq. 10)
    p      = softmax(z)
    score  = entropy(p) in nats       criterion "entropy"   (DeeBERT; exit when score <  threshold)
           = max(p)                   criterion "max_prob"  (Right-Tool; exit when score >= threshold)
           = counter                  criterion "patience"  (PABEE; exit when counter >= threshold)
           = sigmoid(wo . GELU(Wq x + bq) + bo)
                                      criterion "policy"    (ConsistentEE; exit when score > threshold)

and returns float32 logits, the score, the exit mask, the argmax prediction and (for
patience) the updated counter. "policy" is ConsistentEE's policy network, a two-layer MLP
on the classifier's input ``x`` (P hidden units, exact erf GELU; an instance exits when
p(exit) > 0.5). With pooling "mean" the mean is taken in float32 (never rounded to a half
type) over the tokens the mask marks; tokens outside it are never read into the sum, and a
row without a real token pools to zeros (:func:`masked_mean`, which the models' training
path shares). ``exit_head_reference`` is the specification; the C++ CPU, Triton and CUDA
kernels compute the same thing (the mean in a first pass, then the head fused per row).

Ties. Every backend rounds the threshold to float32 and compares it with the float32 score
(patience: the integer counter with the threshold). A score exactly equal to the threshold
exits for "max_prob" and "patience" (``>=``) and does not for "entropy" (``<``) and
"policy" (``>``). A threshold chosen on observed scores should therefore sit between two of
them, never on one: a score recomputed in another batch, with other padding, thread count
or backend may differ in its last bit (:func:`eekernels.calibration.midpoint_thresholds`).

Defined behaviour for non-finite values: a row whose final logits contain NaN or +-inf
never exits; its score is NaN (entropy, max_prob, policy) or 0 (patience), its prediction
is -1 and its patience counter is reset to 0. With "policy", a row whose policy score is
NaN also never exits and has score NaN, but keeps its prediction (the logits are finite).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _extension, backends
from ._checks import FLOAT_DTYPES, check_tensor, needs_autograd, real_number
from ._registry import register_op
from .contracts.exit_head import CRITERIA, DEFAULT_THRESHOLD, POOLINGS, ExitHeadArgs, ExitHeadOutput, exit_head_fake

__all__ = [
    "CRITERIA",
    "DEFAULT_THRESHOLD",
    "POOLINGS",
    "ExitHeadArgs",
    "ExitHeadOutput",
    "exit_head",
    "exit_head_reference",
    "masked_mean",
]

# --------------------------------------------------------------------------- reference


def masked_mean(hidden: torch.Tensor, valid: Optional[torch.Tensor],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, H]: the mean of each row's tokens of ``hidden`` [N, S, H] where ``valid`` (bool
    [N, S]; None: every token) is True, accumulated and returned in ``dtype``. A row without
    a real token (or S = 0) gives zeros; a token outside the mask is never summed (a NaN in
    the padding does not reach the mean). Differentiable.

    The one definition of mean pooling: the exit head's reference (pooling "mean") and the
    models' training path (:func:`eekernels.nn.layer_summary`) both use it."""
    x = hidden.to(dtype)
    if valid is None:
        return x.sum(dim=1) / max(hidden.shape[1], 1)
    total = torch.where(valid[..., None], x, 0.0).sum(dim=1)
    return total / valid.sum(dim=1, keepdim=True).to(dtype).clamp_min(1.0)


def exit_head_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pooler_weight: Optional[torch.Tensor] = None,
    pooler_bias: Optional[torch.Tensor] = None,
    tanh_logits: bool = False,
    memory: Optional[torch.Tensor] = None,
    memory_lambda: float = 1.0,
    criterion: str = "entropy",
    threshold: Optional[float] = None,
    prev_pred: Optional[torch.Tensor] = None,
    counter: Optional[torch.Tensor] = None,
    policy_weight: Optional[torch.Tensor] = None,
    policy_bias: Optional[torch.Tensor] = None,
    policy_out_weight: Optional[torch.Tensor] = None,
    policy_out_bias: Optional[torch.Tensor] = None,
    pooling: str = "cls",
    token_mask: Optional[torch.Tensor] = None,
) -> ExitHeadOutput:
    """Plain-PyTorch exit head: the specification every backend is tested against.

    Arithmetic is float32 throughout (inputs of half types are upcast; float64 inputs
    stay float64, which the tests use as the high-precision spec), and it is
    differentiable, so it serves training. Arguments are as for :func:`exit_head`
    (not validated here).
    """
    return _reference(ExitHeadArgs(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
                                   tanh_logits, criterion, threshold, prev_pred, counter, policy_weight,
                                   policy_bias, policy_out_weight, policy_out_bias, token_mask, pooling))


def _reference(a: ExitHeadArgs) -> ExitHeadOutput:
    criterion = a.criterion
    threshold = DEFAULT_THRESHOLD[criterion] if a.threshold is None else a.threshold
    acc = torch.float64 if a.hidden.dtype == torch.float64 else torch.float32
    linear = torch.nn.functional.linear
    x = a.hidden.to(acc) if a.pooling == "cls" else masked_mean(a.hidden, a.token_mask, acc)
    if a.pooler_weight is not None:
        x = torch.tanh(linear(x, a.pooler_weight.to(acc), a.pooler_bias.to(acc)))
    z = linear(x, a.weight.to(acc), a.bias.to(acc))
    if a.tanh_logits:
        z = torch.tanh(z)  # mpee.txt eq. 9
    if a.memory is not None:
        z = (1.0 - a.memory_lambda) * a.memory.to(acc) + a.memory_lambda * z  # mpee.txt eq. 10

    finite = torch.isfinite(z).all(dim=1)
    pred = torch.where(finite, z.detach().argmax(dim=1), torch.full_like(finite, -1, dtype=torch.long))
    new_counter = None
    if criterion == "entropy":
        logp = torch.log_softmax(z, dim=1)
        score = -(logp.exp() * logp).sum(dim=1)
        exit_ = score < threshold
    elif criterion == "max_prob":
        score = torch.softmax(z, dim=1).max(dim=1).values
        exit_ = score >= threshold
    elif criterion == "patience":  # PABEE: consecutive layers with an unchanged prediction
        n = z.shape[0]
        prev_pred = torch.full((n,), -1, dtype=torch.long, device=z.device) if a.prev_pred is None else a.prev_pred
        counter = torch.zeros(n, dtype=torch.int32, device=z.device) if a.counter is None else a.counter
        same = (pred == prev_pred) & (pred >= 0)
        new_counter = torch.where(same, counter + 1, torch.zeros_like(counter)).to(torch.int32)
        score = new_counter.to(z.dtype)
        exit_ = new_counter.double() >= threshold
    else:  # policy: p(exit) = sigmoid(wo . GELU(Wq x + bq) + bo), exact (erf) GELU
        v = linear(x, a.policy_weight.to(acc), a.policy_bias.to(acc))
        # exact GELU written out: torch's vectorised float32 gelu gives NaN at +inf (the
        # kernels and the float64 reference give inf, so an inf row's policy score is 1)
        u = 0.5 * v * (1.0 + torch.erf(v * math.sqrt(0.5)))
        score = torch.sigmoid(u @ a.policy_out_weight.to(acc) + a.policy_out_bias.to(acc))
        # sigmoid maps +-inf to 1 / 0, so only NaN is a non-finite policy score.
        finite = finite & ~torch.isnan(score)
        exit_ = score > threshold  # strict: exit when p(exit) > 0.5 by default
    if criterion != "patience":
        score = torch.where(finite, score, torch.full_like(score, math.nan))
    return ExitHeadOutput(z, score, exit_ & finite, pred, new_counter)


# --------------------------------------------------------------------------- validation

_POLICY_NAMES = ExitHeadArgs._fields[12:16]


def _check(name, t, ndim, dtypes, device):
    check_tensor(name, "exit_head", t, ndim=ndim, dtypes=dtypes, device=device)


def _validate_policy(a: ExitHeadArgs) -> None:
    """The policy network's parameters: all four with criterion "policy", none otherwise.

    Shapes: policy_weight [P, H] (P >= 1), policy_bias [P], policy_out_weight [P] (the
    output unit's weight row, 1-D), policy_out_bias [1]; dtype and device of ``hidden``.
    """
    if a.criterion != "policy" and a.policy_weight is None and a.policy_bias is None \
            and a.policy_out_weight is None and a.policy_out_bias is None:
        return  # the common case, checked without building lists (this runs every call)
    given = [name for name in _POLICY_NAMES if getattr(a, name) is not None]
    if a.criterion != "policy":
        if given:
            raise ValueError(f"exit_head: {', '.join(given)} given with criterion={a.criterion!r}; "
                             "the policy network's parameters go only with criterion='policy'")
        return
    if len(given) != 4:
        missing = [name for name in _POLICY_NAMES if name not in given]
        raise ValueError(f"exit_head: criterion='policy' needs {', '.join(_POLICY_NAMES)}; missing "
                         f"{', '.join(missing)}")
    dev, dt, h = a.hidden.device, (a.hidden.dtype,), a.hidden.shape[-1]
    _check("policy_weight", a.policy_weight, 2, dt, dev)
    p = a.policy_weight.shape[0]
    if p < 1 or a.policy_weight.shape[1] != h:
        raise ValueError(f"exit_head: policy_weight must be [P, {h}] with P >= 1, got {tuple(a.policy_weight.shape)}")
    _check("policy_bias", a.policy_bias, 1, dt, dev)
    if a.policy_bias.shape[0] != p:
        raise ValueError(f"exit_head: policy_bias must be [{p}] (P={p}), got {tuple(a.policy_bias.shape)}")
    _check("policy_out_weight", a.policy_out_weight, 1, dt, dev)
    if a.policy_out_weight.shape[0] != p:
        raise ValueError(f"exit_head: policy_out_weight must be [{p}] (P={p}; pass a [1, P] weight as "
                         f"weight[0]), got {tuple(a.policy_out_weight.shape)}")
    _check("policy_out_bias", a.policy_out_bias, 1, dt, dev)
    if a.policy_out_bias.shape[0] != 1:
        raise ValueError(f"exit_head: policy_out_bias must be [1], got {tuple(a.policy_out_bias.shape)}")


def _validate_pooling(a: ExitHeadArgs) -> None:
    """``pooling``, ``hidden``'s shape and dtype for it, and ``token_mask`` (bool [N, S],
    with pooling "mean" only)."""
    if not isinstance(a.pooling, str):
        raise TypeError(f"exit_head: pooling must be a string, one of {sorted(POOLINGS)}, "
                        f"got {type(a.pooling).__name__}")
    if a.pooling not in POOLINGS:
        raise ValueError(f"exit_head: unknown pooling {a.pooling!r}; choose one of {sorted(POOLINGS)}")
    if a.pooling == "cls":
        if isinstance(a.hidden, torch.Tensor) and a.hidden.dim() == 3:
            raise ValueError(f"exit_head: hidden must have 2 dims ([N, H]) with pooling='cls', got shape "
                             f"{tuple(a.hidden.shape)}; pass pooling='mean' to pool [N, S, H] token states")
        _check("hidden", a.hidden, 2, FLOAT_DTYPES, None)
        if a.token_mask is not None:
            raise ValueError("exit_head: token_mask goes only with pooling='mean' (it marks the tokens to average)")
        return
    if isinstance(a.hidden, torch.Tensor) and a.hidden.dim() != 3:
        raise ValueError(f"exit_head: pooling='mean' averages token states, so hidden must have 3 dims "
                         f"[N, S, H], got shape {tuple(a.hidden.shape)}")
    _check("hidden", a.hidden, 3, FLOAT_DTYPES, None)
    if a.token_mask is not None:
        _check("token_mask", a.token_mask, 2, (torch.bool,), a.hidden.device)
        if tuple(a.token_mask.shape) != tuple(a.hidden.shape[:2]):
            raise ValueError(f"exit_head: token_mask must be [N, S] = {list(a.hidden.shape[:2])} (hidden's rows "
                             f"and tokens), got {list(a.token_mask.shape)}")


def validate_exit_head_args(a: ExitHeadArgs) -> None:
    """Raise a clear TypeError/ValueError for any bad argument; return nothing.

    Runs on the host before any kernel and never reads tensor values (no device sync).
    """
    _validate_pooling(a)
    dev, dt = a.hidden.device, (a.hidden.dtype,)
    n, h = a.hidden.shape[0], a.hidden.shape[-1]
    _check("weight", a.weight, 2, dt, dev)
    c = a.weight.shape[0]
    if a.weight.shape[1] != h:
        raise ValueError(f"exit_head: weight is {tuple(a.weight.shape)} but hidden has H={h}; expected [C, {h}]")
    if c < 1 or h < 1:
        raise ValueError(f"exit_head: need C >= 1 and H >= 1, got C={c}, H={h}")
    _check("bias", a.bias, 1, dt, dev)
    if a.bias.shape[0] != c:
        raise ValueError(f"exit_head: bias has {a.bias.shape[0]} entries, weight has C={c} rows")
    if (a.pooler_weight is None) != (a.pooler_bias is None):
        raise ValueError("exit_head: pooler_weight and pooler_bias must be given together")
    if a.pooler_weight is not None:
        _check("pooler_weight", a.pooler_weight, 2, dt, dev)
        if tuple(a.pooler_weight.shape) != (h, h):
            raise ValueError(f"exit_head: pooler_weight must be [{h}, {h}], got {tuple(a.pooler_weight.shape)}")
        _check("pooler_bias", a.pooler_bias, 1, dt, dev)
        if a.pooler_bias.shape[0] != h:
            raise ValueError(f"exit_head: pooler_bias must have {h} entries, got {a.pooler_bias.shape[0]}")
    if a.memory is not None:
        _check("memory", a.memory, 2, (torch.float32,), dev)
        if tuple(a.memory.shape) != (n, c):
            raise ValueError(f"exit_head: memory must be [{n}, {c}] (rows, classes), got {tuple(a.memory.shape)}")
    if not (0.0 <= real_number("exit_head", "memory_lambda", a.memory_lambda) <= 1.0):
        raise ValueError(f"exit_head: memory_lambda must be in [0, 1], got {a.memory_lambda}")
    if a.criterion not in CRITERIA:
        raise ValueError(f"exit_head: unknown criterion {a.criterion!r}; choose one of {sorted(CRITERIA)}")
    if a.threshold is not None:
        thr = real_number("exit_head", "threshold", a.threshold)
        if math.isnan(thr) or thr < 0.0:
            raise ValueError(f"exit_head: threshold must be a number >= 0 (inf allowed), got {a.threshold}")
        if a.criterion == "policy" and thr > 1.0:
            raise ValueError(f"exit_head: the policy threshold is a probability and must be in [0, 1], "
                             f"got {a.threshold}")
    _validate_policy(a)
    if a.criterion != "patience" and (a.prev_pred is not None or a.counter is not None):
        raise ValueError("exit_head: prev_pred/counter are patience state; pass them only with criterion='patience'")
    for name, t, dtype in (("prev_pred", a.prev_pred, torch.int64), ("counter", a.counter, torch.int32)):
        if t is not None:
            _check(name, t, 1, (dtype,), dev)
            if t.shape[0] != n:
                raise ValueError(f"exit_head: {name} must have N={n} entries, got {t.shape[0]}")


# --------------------------------------------------------------------------- dispatch


def exit_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pooler_weight: Optional[torch.Tensor] = None,
    pooler_bias: Optional[torch.Tensor] = None,
    tanh_logits: bool = False,
    memory: Optional[torch.Tensor] = None,
    memory_lambda: float = 1.0,
    criterion: str = "entropy",
    threshold: Optional[float] = None,
    prev_pred: Optional[torch.Tensor] = None,
    counter: Optional[torch.Tensor] = None,
    policy_weight: Optional[torch.Tensor] = None,
    policy_bias: Optional[torch.Tensor] = None,
    policy_out_weight: Optional[torch.Tensor] = None,
    policy_out_bias: Optional[torch.Tensor] = None,
    pooling: str = "cls",
    token_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> ExitHeadOutput:
    """Fused exit head + exit criterion for N active rows.

    Args:
        hidden: float32/float16/bfloat16, [N, H] each row's [CLS] or pooled state
            (pooling "cls"), or [N, S, H] each row's token states (pooling "mean").
            Rows and tokens may be strided (e.g. ``states[:, 0]``, or a trimmed
            ``states[:, :s]``); the last dim is made contiguous.
        weight, bias: classifier, [C, H] and [C], same dtype and device as ``hidden``.
        pooler_weight, pooler_bias: optional pooler [H, H] and [H] (dense + tanh, as HF's
            BertPooler) applied before the classifier.
        tanh_logits: apply tanh to the classifier output (mpee.txt eq. 9).
        memory: optional float32 [N, C] classifier memory of the previous exit; the
            logits become ``(1-memory_lambda)*memory + memory_lambda*z`` (mpee.txt eq. 10).
        memory_lambda: the blend weight lambda in [0, 1].
        criterion: "entropy" (exit when entropy < threshold), "max_prob" (exit when
            max softmax probability >= threshold), "patience" (exit when the counter
            of consecutive unchanged predictions >= threshold) or "policy" (exit when
            the policy network's exit probability > threshold; ConsistentEE).
        threshold: a number >= 0; ``inf`` is allowed (entropy: always exit; max_prob and
            patience: never exit); 0 never exits for entropy and always for max_prob.
            For "policy" a probability in [0, 1] (1 never exits). ``None`` (default):
            0.0, or 0.5 for "policy" (consistentee.txt: exit when p(exit) > 0.5).
            Compared in float32; at a tie (score == threshold) max_prob and patience
            exit, entropy and policy do not (see the module docstring).
        prev_pred, counter: patience state from the previous layer (int64 [N], int32 [N]);
            ``None`` means "first exit" (-1 and 0).
        policy_weight, policy_bias, policy_out_weight, policy_out_bias: ConsistentEE's
            policy network, [P, H], [P], [P] and [1], same dtype and device as ``hidden``;
            required with criterion "policy" and rejected otherwise. On the classifier's
            input x (after the pooler): score = sigmoid(policy_out_weight .
            GELU(policy_weight x + policy_bias) + policy_out_bias), exact (erf) GELU,
            float32. A ``torch.nn.Linear(P, 1)`` output layer passes ``weight[0]``.
        pooling: what the head reads of each row: "cls" (default), ``hidden`` [N, H] as
            given; "mean", the masked mean of the row's tokens of ``hidden`` [N, S, H],
            accumulated and kept in float32 (also for half inputs), zeros for a row without
            a real token (:func:`masked_mean`). The pooler, classifier and policy network
            then read the mean.
        token_mask: bool [N, S], True for the real tokens to average (pooling "mean"
            only; any strides); ``None``: every token. Tokens outside the mask are not
            summed, so padding (whatever it holds) never changes a row's mean.
        backend: "torch", "cpu", "triton" or "cuda"; default: :func:`eekernels.get_backend`
            or the fastest available for ``hidden``'s device.

    Returns:
        :class:`ExitHeadOutput` (logits, score, exit, pred, counter).

    When autograd is recording and any input requires grad, the differentiable reference
    runs whatever the backend, so training through the same modules gets true gradients
    (the policy network's parameters included).
    """
    if type(hidden) is torch.Tensor and hidden.is_cpu:
        out = _cpu_kernel_call(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda, tanh_logits,
                               criterion, threshold, prev_pred, counter, policy_weight, policy_bias,
                               policy_out_weight, policy_out_bias, token_mask, pooling, backend)
        if out is not None:
            return out
    a = ExitHeadArgs(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda, tanh_logits,
                     criterion, threshold, prev_pred, counter, policy_weight, policy_bias, policy_out_weight,
                     policy_out_bias, token_mask, pooling)
    validate_exit_head_args(a)
    # One tuple per call, built after validation: at a few rows the host-side work of this
    # wrapper is a good part of the call (benchmarks/NOTES.md, "CPU exit head through BLAS").
    a = ExitHeadArgs(hidden, weight, bias, pooler_weight, pooler_bias, memory, float(memory_lambda),
                     bool(tanh_logits), criterion,
                     float(DEFAULT_THRESHOLD[criterion] if threshold is None else threshold), prev_pred, counter,
                     policy_weight, policy_bias, policy_out_weight, policy_out_bias, token_mask, pooling)
    if needs_autograd(*a):
        return _reference(a)
    name = backends.resolve(backend, hidden.device)
    if name == "torch":
        return _reference(a)
    return backends.implementation("exit_head", name)(a)


def _exit_head_compiled(a: ExitHeadArgs) -> ExitHeadOutput:
    a = a.for_kernels()
    # The overload itself, not the packet: the packet resolves the overload on every call.
    return ExitHeadOutput.from_op(torch.ops.eekernels.exit_head.default(*a.op_args()), a.criterion)


#: Types of the numbers the CPU fast path passes on as they are (others take the full path,
#: where :func:`real_number` reads them or names the problem).
_PLAIN_NUMBERS = (float, int)


def _cpu_kernel_call(hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda, tanh_logits,
                     criterion, threshold, prev_pred, counter, policy_weight, policy_bias, policy_out_weight,
                     policy_out_bias, token_mask, pooling, backend) -> Optional[ExitHeadOutput]:
    """The C++ kernel called straight through its pybind binding, for the common eager CPU
    call (:func:`exit_head`'s arguments, ``hidden`` a plain CPU tensor); or None, and the call
    takes the full path.

    At a few rows the Python validation, the dispatcher's boxing of 18 arguments and the
    argument tuples cost as much as the head itself (benchmarks/NOTES.md, "CPU exit head
    through BLAS"). The kernel checks every argument itself (csrc/common/exit_head_checks.h
    refuses all that :func:`validate_exit_head_args` refuses), so nothing is validated here
    first: when the kernel refuses, the full path validates and names the problem, or serves
    a call the kernel does not take as it is (a strided weight, which it copies). None too
    for another backend, autograd, a tracer (which must see the op) and arguments of other
    types (a NumPy threshold, say).
    """
    code = CRITERIA.get(criterion) if type(criterion) is str else None
    pool = POOLINGS.get(pooling) if type(pooling) is str else None
    if (code is None or pool is None or type(tanh_logits) is not bool or type(memory_lambda) not in _PLAIN_NUMBERS
            or (threshold is not None and type(threshold) not in _PLAIN_NUMBERS)):
        return None
    if (backend if backend is not None else backends.resolve(None, hidden.device)) != "cpu":
        return None
    ext = _extension.load()
    if ext is None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return None
    if torch.is_grad_enabled() and needs_autograd(hidden, weight, bias, pooler_weight, pooler_bias, memory,
                                                  policy_weight, policy_bias, policy_out_weight, policy_out_bias):
        return None
    try:
        out = ext.exit_head_cpu(hidden, weight, bias, pooler_weight, pooler_bias, memory, float(memory_lambda),
                                tanh_logits, code, float(DEFAULT_THRESHOLD[criterion] if threshold is None
                                                         else threshold), prev_pred, counter, policy_weight,
                                policy_bias, policy_out_weight, policy_out_bias, token_mask, pool)
    except (RuntimeError, TypeError):
        return None
    return ExitHeadOutput.from_op(out, criterion)


register_op("exit_head", _exit_head_compiled, "eekernels.triton.exit_head:exit_head_triton", exit_head_fake)
