"""The fused exit head: one call per layer decides which rows leave the model.

For N active rows it maps each row's [CLS] (or pooled) state ``hidden[n]`` to

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
patience) the updated counter. The "policy" criterion is ConsistentEE's policy network
(consistentee.txt: "a policy network is introduced to an intermediate layer besides an
internal classifier. This policy network shares the same input with the internal
classifier", a two-layer MLP; an instance exits when p(exit) > 0.5): a hidden layer of P
units with exact (erf) GELU, then one output unit and a sigmoid, on the classifier's input
``x``. ``exit_head_reference`` below is the specification; the
C++ CPU, Triton and CUDA kernels compute the same thing in one fused pass per row.

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
from typing import NamedTuple, Optional

import torch

from .. import backends

__all__ = [
    "CRITERIA",
    "DEFAULT_THRESHOLD",
    "ExitHeadOutput",
    "exit_head",
    "exit_head_reference",
]

#: Criterion name -> integer code used by the compiled kernels.
CRITERIA = {"entropy": 0, "max_prob": 1, "patience": 2, "policy": 3}

#: Threshold used when ``threshold`` is None: 0.0 as before for the classifier criteria,
#: 0.5 for the policy network (consistentee.txt: exit when p(exit) > 0.5).
DEFAULT_THRESHOLD = {"entropy": 0.0, "max_prob": 0.0, "patience": 0.0, "policy": 0.5}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExitHeadOutput(NamedTuple):
    """Result of :func:`exit_head` for N rows and C classes.

    Attributes:
        logits: float32 [N, C], the final logits (after tanh and the memory blend, so
            this is also the next layer's classifier memory for MPEE).
        score: float32 [N], the criterion's score (entropy in nats, max probability, the
            patience counter as a float, or the policy network's exit probability).
        exit: bool [N], True where the row exits at this layer.
        pred: int64 [N], argmax of the logits (first index on ties; -1 for non-finite rows).
        counter: int32 [N], the updated patience counter ("patience" only, else None).
    """

    logits: torch.Tensor
    score: torch.Tensor
    exit: torch.Tensor
    pred: torch.Tensor
    counter: Optional[torch.Tensor]


# --------------------------------------------------------------------------- reference


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
) -> ExitHeadOutput:
    """Plain-PyTorch exit head: the specification every backend is tested against.

    Arithmetic is float32 throughout (inputs of half types are upcast; float64 inputs
    stay float64, which the tests use as the high-precision spec), and it is
    differentiable, so it serves training. Arguments are as for :func:`exit_head`
    (already validated).
    """
    if threshold is None:
        threshold = DEFAULT_THRESHOLD[criterion]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(acc)
    if pooler_weight is not None:
        x = torch.tanh(torch.nn.functional.linear(x, pooler_weight.to(acc), pooler_bias.to(acc)))
    z = torch.nn.functional.linear(x, weight.to(acc), bias.to(acc))
    if tanh_logits:
        z = torch.tanh(z)  # mpee.txt eq. 9
    if memory is not None:
        z = (1.0 - memory_lambda) * memory.to(acc) + memory_lambda * z  # mpee.txt eq. 10

    finite = torch.isfinite(z).all(dim=1)
    zd = z.detach()
    pred = torch.where(finite, zd.argmax(dim=1), torch.full_like(finite, -1, dtype=torch.long))
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
        if prev_pred is None:
            prev_pred = torch.full((n,), -1, dtype=torch.long, device=z.device)
        if counter is None:
            counter = torch.zeros(n, dtype=torch.int32, device=z.device)
        same = (pred == prev_pred) & (pred >= 0)
        new_counter = torch.where(same, counter + 1, torch.zeros_like(counter)).to(torch.int32)
        score = new_counter.to(z.dtype)
        exit_ = new_counter.double() >= threshold
    else:  # policy
        # ConsistentEE's policy network on the classifier's input x (consistentee.txt: it
        # "shares the same input with the internal classifier"; a two-layer MLP):
        # u = GELU(Wq x + bq) (exact erf GELU), p(exit) = sigmoid(wo . u + bo).
        u = torch.nn.functional.gelu(
            torch.nn.functional.linear(x, policy_weight.to(acc), policy_bias.to(acc)))
        score = torch.sigmoid(u @ policy_out_weight.to(acc) + policy_out_bias.to(acc))
        # sigmoid maps +-inf to 1 / 0, so only NaN is a non-finite policy score.
        finite = finite & ~torch.isnan(score)
        exit_ = score > threshold  # strict: exit when p(exit) > 0.5 by default
    nan = torch.full_like(score, math.nan)
    if criterion != "patience":
        score = torch.where(finite, score, nan)
    exit_ = exit_ & finite
    return ExitHeadOutput(z, score, exit_, pred, new_counter)


def exit_head_empty_outputs(hidden: torch.Tensor, weight: torch.Tensor, criterion_code: int):
    """Uninitialised outputs of the compiled ops' schema (logits, score, exit, pred, counter);
    the fake (meta) implementation of every registered exit_head op. ``counter`` is [N] for
    patience and [0] otherwise."""
    n, c = hidden.shape[0], weight.shape[0]
    new = hidden.new_empty
    return (
        new((n, c), dtype=torch.float32),
        new((n,), dtype=torch.float32),
        new((n,), dtype=torch.bool),
        new((n,), dtype=torch.int64),
        new((n if criterion_code == CRITERIA["patience"] else 0,), dtype=torch.int32),
    )


# --------------------------------------------------------------------------- validation


def _check_tensor(name, t, ndim, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"exit_head: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"exit_head: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"exit_head: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"exit_head: {name} is on {t.device} but hidden is on {device}")


_POLICY_NAMES = ("policy_weight", "policy_bias", "policy_out_weight", "policy_out_bias")


def _validate_policy_args(hidden, criterion, policy_weight, policy_bias, policy_out_weight, policy_out_bias):
    """The policy network's parameters: all four with criterion "policy", none otherwise.

    Shapes: policy_weight [P, H] (P >= 1), policy_bias [P], policy_out_weight [P] (the
    output unit's weight row, 1-D), policy_out_bias [1]; dtype and device of ``hidden``.
    """
    given = [name for name, t in zip(_POLICY_NAMES, (policy_weight, policy_bias, policy_out_weight,
                                                      policy_out_bias)) if t is not None]
    if criterion != "policy":
        if given:
            raise ValueError(f"exit_head: {', '.join(given)} given with criterion={criterion!r}; "
                             "the policy network's parameters go only with criterion='policy'")
        return
    if len(given) != 4:
        missing = [name for name in _POLICY_NAMES if name not in given]
        raise ValueError(f"exit_head: criterion='policy' needs {', '.join(_POLICY_NAMES)}; missing "
                         f"{', '.join(missing)}")
    dev, dt = hidden.device, hidden.dtype
    h = hidden.shape[1]
    _check_tensor("policy_weight", policy_weight, 2, (dt,), dev)
    p = policy_weight.shape[0]
    if p < 1 or policy_weight.shape[1] != h:
        raise ValueError(f"exit_head: policy_weight must be [P, {h}] with P >= 1, got {tuple(policy_weight.shape)}")
    _check_tensor("policy_bias", policy_bias, 1, (dt,), dev)
    if policy_bias.shape[0] != p:
        raise ValueError(f"exit_head: policy_bias must be [{p}] (P={p}), got {tuple(policy_bias.shape)}")
    _check_tensor("policy_out_weight", policy_out_weight, 1, (dt,), dev)
    if policy_out_weight.shape[0] != p:
        raise ValueError(f"exit_head: policy_out_weight must be [{p}] (P={p}; pass a [1, P] weight as "
                         f"weight[0]), got {tuple(policy_out_weight.shape)}")
    _check_tensor("policy_out_bias", policy_out_bias, 1, (dt,), dev)
    if policy_out_bias.shape[0] != 1:
        raise ValueError(f"exit_head: policy_out_bias must be [1], got {tuple(policy_out_bias.shape)}")


def validate_exit_head_args(
    hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
    criterion, threshold, prev_pred, counter,
    policy_weight=None, policy_bias=None, policy_out_weight=None, policy_out_bias=None,
):
    """Raise a clear TypeError/ValueError for any bad argument; return nothing.

    Runs on the host before any kernel and never reads tensor values (no device sync).
    """
    _check_tensor("hidden", hidden, 2, _FLOAT_DTYPES)
    dev, dt = hidden.device, hidden.dtype
    n, h = hidden.shape
    _check_tensor("weight", weight, 2, (dt,), dev)
    c = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"exit_head: weight is {tuple(weight.shape)} but hidden has H={h}; expected [C, {h}]")
    if c < 1 or h < 1:
        raise ValueError(f"exit_head: need C >= 1 and H >= 1, got C={c}, H={h}")
    _check_tensor("bias", bias, 1, (dt,), dev)
    if bias.shape[0] != c:
        raise ValueError(f"exit_head: bias has {bias.shape[0]} entries, weight has C={c} rows")
    if (pooler_weight is None) != (pooler_bias is None):
        raise ValueError("exit_head: pooler_weight and pooler_bias must be given together")
    if pooler_weight is not None:
        _check_tensor("pooler_weight", pooler_weight, 2, (dt,), dev)
        if tuple(pooler_weight.shape) != (h, h):
            raise ValueError(f"exit_head: pooler_weight must be [{h}, {h}], got {tuple(pooler_weight.shape)}")
        _check_tensor("pooler_bias", pooler_bias, 1, (dt,), dev)
        if pooler_bias.shape[0] != h:
            raise ValueError(f"exit_head: pooler_bias must have {h} entries, got {pooler_bias.shape[0]}")
    if memory is not None:
        _check_tensor("memory", memory, 2, (torch.float32,), dev)
        if tuple(memory.shape) != (n, c):
            raise ValueError(f"exit_head: memory must be [{n}, {c}] (rows, classes), got {tuple(memory.shape)}")
    lam = float(memory_lambda)
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"exit_head: memory_lambda must be in [0, 1], got {memory_lambda}")
    if criterion not in CRITERIA:
        raise ValueError(f"exit_head: unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    if threshold is not None:
        thr = float(threshold)
        if math.isnan(thr) or thr < 0.0:
            raise ValueError(f"exit_head: threshold must be a number >= 0 (inf allowed), got {threshold}")
        if criterion == "policy" and thr > 1.0:
            raise ValueError(f"exit_head: the policy threshold is a probability and must be in [0, 1], got {threshold}")
    _validate_policy_args(hidden, criterion, policy_weight, policy_bias, policy_out_weight, policy_out_bias)
    if criterion != "patience" and (prev_pred is not None or counter is not None):
        raise ValueError("exit_head: prev_pred/counter are patience state; pass them only with criterion='patience'")
    if prev_pred is not None:
        _check_tensor("prev_pred", prev_pred, 1, (torch.int64,), dev)
        if prev_pred.shape[0] != n:
            raise ValueError(f"exit_head: prev_pred must have N={n} entries, got {prev_pred.shape[0]}")
    if counter is not None:
        _check_tensor("counter", counter, 1, (torch.int32,), dev)
        if counter.shape[0] != n:
            raise ValueError(f"exit_head: counter must have N={n} entries, got {counter.shape[0]}")


# --------------------------------------------------------------------------- dispatch


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    backend: Optional[str] = None,
) -> ExitHeadOutput:
    """Fused exit head + exit criterion for N active rows.

    Args:
        hidden: [N, H] float32/float16/bfloat16, each row's [CLS] or pooled state.
            Rows may be strided (e.g. ``states[:, 0]``); the last dim is made contiguous.
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
        backend: "torch", "cpu", "triton" or "cuda"; default: :func:`eekernels.get_backend`
            or the fastest available for ``hidden``'s device.

    Returns:
        :class:`ExitHeadOutput` (logits, score, exit, pred, counter).

    When autograd is recording and any input requires grad, the differentiable reference
    runs whatever the backend, so training through the same modules gets true gradients
    (the policy network's parameters included).
    """
    validate_exit_head_args(
        hidden, weight, bias, pooler_weight, pooler_bias, memory, memory_lambda,
        criterion, threshold, prev_pred, counter,
        policy_weight, policy_bias, policy_out_weight, policy_out_bias,
    )
    if threshold is None:
        threshold = DEFAULT_THRESHOLD[criterion]
    kwargs = dict(
        pooler_weight=pooler_weight, pooler_bias=pooler_bias, tanh_logits=bool(tanh_logits),
        memory=memory, memory_lambda=float(memory_lambda), criterion=criterion,
        threshold=float(threshold), prev_pred=prev_pred, counter=counter,
    )
    policy = dict(policy_weight=policy_weight, policy_bias=policy_bias,
                  policy_out_weight=policy_out_weight, policy_out_bias=policy_out_bias)
    if _needs_autograd(hidden, weight, bias, pooler_weight, pooler_bias, memory, *policy.values()):
        return exit_head_reference(hidden, weight, bias, **kwargs, **policy)
    name = backends.resolve(backend, hidden.device)
    if name == "torch":
        return exit_head_reference(hidden, weight, bias, **kwargs, **policy)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    if pooler_weight is not None:
        pooler_weight, pooler_bias = pooler_weight.contiguous(), pooler_bias.contiguous()
    if memory is not None:
        memory = memory.contiguous()
    kwargs.update(pooler_weight=pooler_weight, pooler_bias=pooler_bias, memory=memory)
    if criterion == "policy":
        kwargs.update({k: v.contiguous() for k, v in policy.items()})
    return backends.implementation("exit_head", name)(hidden, weight, bias, **kwargs)
