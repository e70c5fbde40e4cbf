"""Exit rules: how a method decides, at its exit points, which active rows leave.

A rule sees the active rows only (:class:`~eekernels.engine.rows.Rows`). Per-row state it
needs across layers (patience counters, pooled past states, classifier memory, ...) lives
in ``rows.state``, which the loop compacts together with the hidden states, so a rule never
indexes rows itself. Methods subclass :class:`ExitRule` (see :mod:`eekernels.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..ops import exit_head
from .rows import Rows

__all__ = ["ExitDecision", "ExitHeadRule", "ExitRule", "LastLayerRule", "leave_mask"]


@dataclass
class ExitDecision:
    """What an exit rule says about the N active rows at one exit point.

    Attributes:
        logits: float32 [N, C], each row's logits here.
        exit: bool [N], True for the rows that leave here.
        state: the rule's per-row state after this point (name -> tensor with N rows).
    """

    logits: torch.Tensor
    exit: torch.Tensor
    state: Dict[str, torch.Tensor]


class ExitRule:
    """A method's exit decision; the layer loop calls it."""

    def initial_state(self, batch_size: int, device: torch.device) -> Dict[str, torch.Tensor]:
        """Per-row state before the first layer (tensors with ``batch_size`` rows)."""
        return {}

    def observe(self, step: int, rows: Rows) -> Dict[str, torch.Tensor]:
        """Called after every layer that is not an exit point; returns the updated state."""
        return rows.state

    def decide(self, step: int, rows: Rows) -> ExitDecision:
        """Called after each exit point (1-based ``step``) with the active rows."""
        raise NotImplementedError


#: head_exit keywords a layer graph's logits already answer (any other changes the logits)
_CRITERION_STATE = ("prev_pred", "counter")


def head_exit(model, layer: int, rows: Rows, *, criterion: str, threshold: float, backend: Optional[str],
              **kwargs):
    """The fused exit head of ``model``'s exit after ``layer`` on the active rows, on what
    ``model.exit_input`` gives (a row's [CLS] state, or the layer's states with
    ``pooling="mean"`` and the rows' ``token_mask``: the op takes the mean of the real tokens).
    ``kwargs`` go to :func:`eekernels.ops.exit_head` (memory, patience state, policy network...).

    When the layer executor computed this exit's logits inside the layer
    (``rows.context["exit_logits"]``, see
    :meth:`~eekernels.engine.executors.LayerExecutor.attach_exit_heads`) and ``kwargs`` hold
    only the criterion's state, the op applies just the criterion: the logits go through an
    identity classifier (C x C, exact)."""
    given = rows.context.pop("exit_logits", None)
    if (given is not None and given[0] == layer
            and all(v is None for k, v in kwargs.items() if k not in _CRITERION_STATE)):
        logits = given[1]
        c = logits.shape[1]
        return exit_head(logits, torch.eye(c, dtype=logits.dtype), torch.zeros(c, dtype=logits.dtype),
                         criterion=criterion, threshold=threshold, backend=backend, **kwargs)
    x, pooling = model.exit_input(layer, rows.hidden, rows.valid)
    return exit_head(x, **head_weights(model.head(layer)), criterion=criterion, threshold=threshold,
                     backend=backend, **pooling, **kwargs)


def head_weights(head) -> Dict[str, Optional[torch.Tensor]]:
    """The weight keywords of :func:`eekernels.ops.exit_head` (and its reference) for an exit
    head's pooler and classifier Linear modules (a head without a pooler: None)."""
    pooler = head.pooler
    return {"weight": head.classifier.weight, "bias": head.classifier.bias,
            "pooler_weight": None if pooler is None else pooler.weight,
            "pooler_bias": None if pooler is None else pooler.bias}


class ExitHeadRule(ExitRule):
    """The classic rules through the fused exit head: entropy (DeeBERT), max-prob
    (Right-Tool) or patience (PABEE, ``threshold`` = patience), with the model's heads."""

    def __init__(self, model, criterion: str = "entropy", threshold: float = 0.0, backend: Optional[str] = None):
        self.model, self.criterion, self.threshold, self.backend = model, criterion, threshold, backend

    def decide(self, step, rows):
        out = head_exit(self.model, step, rows, criterion=self.criterion, threshold=self.threshold,
                        backend=self.backend, prev_pred=rows.state.get("prev_pred"),
                        counter=rows.state.get("counter"))
        state = {"prev_pred": out.pred, "counter": out.counter} if self.criterion == "patience" else {}
        return ExitDecision(out.logits, out.exit, state)


class LastLayerRule(ExitRule):
    """No sample leaves early: the model's own head at the last layer (HashEE)."""

    def __init__(self, classify):
        self.classify = classify

    def decide(self, step, rows):
        logits = self.classify(rows).float()
        return ExitDecision(logits, torch.ones(rows.count, dtype=torch.bool, device=logits.device), {})


def leave_mask(decision_exit: torch.Tensor, step: int, last: bool, forced: Optional[torch.Tensor]) -> torch.Tensor:
    """Which active rows leave after ``step``: all at the last exit point, else the
    benchmark's forced profile (``forced <= step``) when given, else the rule's decision."""
    if last:
        return torch.ones_like(decision_exit)
    if forced is not None:
        return forced <= step
    return decision_exit
