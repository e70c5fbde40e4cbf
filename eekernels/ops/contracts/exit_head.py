"""The exit head's contract: criteria, poolings, the registered ops' schema, the argument
and output tuples, the fake implementation.

Kept apart from ``eekernels/ops/exit_head.py`` (validation, reference, dispatch) so that the
backends' modules (``eekernels/triton/exit_head.py``) import the contract without importing the
dispatcher that names them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

#: Criterion name -> integer code used by the registered ops.
CRITERIA = {"entropy": 0, "max_prob": 1, "patience": 2, "policy": 3}
_CRITERION_NAMES = tuple(CRITERIA)  # code -> name

#: What the head reads of each row -> integer code used by the registered ops: "cls", the
#: row's state as given (``hidden`` [N, H], e.g. the [CLS] token's); "mean", the masked mean
#: of the row's tokens (``hidden`` [N, S, H], ``token_mask`` bool [N, S] or None for every
#: token), accumulated and kept in float32, zeros for a row without a real token.
POOLINGS = {"cls": 0, "mean": 1}
_POOLING_NAMES = tuple(POOLINGS)  # code -> name

#: Threshold used when ``threshold`` is None: 0.0 for the classifier criteria, 0.5 for the
#: policy network (consistentee.txt: exit when p(exit) > 0.5).
DEFAULT_THRESHOLD = {"entropy": 0.0, "max_prob": 0.0, "patience": 0.0, "policy": 0.5}

#: Schema of the registered exit_head ops: the C++ ``eekernels::exit_head``
#: (csrc/register.cpp, the same string) and the Triton ``eekernels::exit_head_triton``.
#: ``criterion`` is the code of :data:`CRITERIA`, ``pooling`` the code of :data:`POOLINGS`
#: (0: ``hidden`` is [N, H]; 1: ``hidden`` is [N, S, H] with its last dim contiguous and any
#: row and token strides, ``token_mask`` bool [N, S] with any strides, or None for every
#: token); the ``counter`` output is [N] int32 for patience and [0] otherwise.
EXIT_HEAD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor bias, Tensor? pooler_weight, Tensor? pooler_bias, "
    "Tensor? memory, float memory_lambda, bool tanh_logits, int criterion, float threshold, "
    "Tensor? prev_pred, Tensor? counter, Tensor? policy_weight=None, Tensor? policy_bias=None, "
    "Tensor? policy_out_weight=None, Tensor? policy_out_bias=None, Tensor? token_mask=None, "
    "int pooling=0) -> "
    "(Tensor logits, Tensor score, Tensor exit, Tensor pred, Tensor counter)"
)


class ExitHeadArgs(NamedTuple):
    """The arguments of one exit head call in the order of :data:`EXIT_HEAD_SCHEMA` (see
    :func:`exit_head` for their meaning), built once by :func:`exit_head` and handed to the
    validator, the reference and every backend. ``criterion`` and ``pooling`` are names here."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    pooler_weight: Optional[torch.Tensor] = None
    pooler_bias: Optional[torch.Tensor] = None
    memory: Optional[torch.Tensor] = None
    memory_lambda: float = 1.0
    tanh_logits: bool = False
    criterion: str = "entropy"
    threshold: Optional[float] = None
    prev_pred: Optional[torch.Tensor] = None
    counter: Optional[torch.Tensor] = None
    policy_weight: Optional[torch.Tensor] = None
    policy_bias: Optional[torch.Tensor] = None
    policy_out_weight: Optional[torch.Tensor] = None
    policy_out_bias: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    pooling: str = "cls"

    def op_args(self) -> tuple:
        """The positional arguments of the registered ops (criterion and pooling as their codes)."""
        return (*self[:8], CRITERIA[self.criterion], *self[9:17], POOLINGS[self.pooling])

    @classmethod
    def from_op_args(cls, args: tuple, kwargs: Optional[dict] = None) -> "ExitHeadArgs":
        """The inverse of :meth:`op_args`, from a registered op's arguments."""
        a = cls(**dict(zip(cls._fields, args)), **(kwargs or {}))
        pooling = a.pooling if isinstance(a.pooling, str) else _POOLING_NAMES[a.pooling]  # default: a name
        return a._replace(criterion=_CRITERION_NAMES[a.criterion], pooling=pooling)

    def for_kernels(self) -> "ExitHeadArgs":
        """What the kernels take: every tensor contiguous, except that ``hidden`` keeps its
        row (and token) strides (e.g. ``states[:, 0]``, or the engine's trimmed
        ``states[:, :s]``) when its last dim is contiguous, and ``token_mask`` is taken with
        any strides."""
        # Copies only what needs it: this runs on every call, where at a few rows the
        # host-side work is a good part of the call.
        fixed = {}
        for i in _TENSOR_FIELDS:
            t = self[i]
            if t is not None and not t.is_contiguous():
                fixed[self._fields[i]] = t.contiguous()
        if self.hidden.stride(-1) != 1:
            fixed["hidden"] = self.hidden.contiguous()
        return self._replace(**fixed) if fixed else self


#: Positions of the optional-or-not tensor arguments of :class:`ExitHeadArgs` after ``hidden``.
_TENSOR_FIELDS = tuple(i for i, name in enumerate(ExitHeadArgs._fields)
                       if name not in ("hidden", "memory_lambda", "tanh_logits", "criterion", "threshold",
                                       "token_mask", "pooling"))


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

    @classmethod
    def from_op(cls, outputs, criterion: str) -> "ExitHeadOutput":
        """From a registered op's five outputs (its [0] counter becomes None)."""
        logits, score, exit_, pred, counter = outputs
        return cls(logits, score, exit_, pred, counter if criterion == "patience" else None)


def exit_head_fake(*args, **kwargs):
    """Fake (meta) implementation of the registered exit_head ops: uninitialised outputs."""
    a = ExitHeadArgs.from_op_args(args, kwargs)
    n, c = a.hidden.shape[0], a.weight.shape[0]
    new = a.hidden.new_empty
    return (new((n, c), dtype=torch.float32), new((n,), dtype=torch.float32), new((n,), dtype=torch.bool),
            new((n,), dtype=torch.int64), new((n if a.criterion == "patience" else 0,), dtype=torch.int32))
