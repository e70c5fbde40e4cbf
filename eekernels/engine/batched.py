"""Batched early-exit inference over an HF encoder, layer by layer, on the rows still active.

After each exit layer the fused exit head decides which rows leave; their logits and exit
layer are scattered to their batch positions, and the survivors (hidden states, attention
mask, batch positions and the exit rule's per-row state) are compacted so that the next layer computes on
them alone. At the last layer every remaining row exits with the model's own head.

Host synchronisation: one device->host read of the survivor count per exit layer (inside
``compact_rows``, to size the compacted tensors). No boolean-mask indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .. import metrics
from ..ops import compact_rows, exit_head, scatter_exits


@dataclass
class EarlyExitOutput:
    """Per-sample results of batched early-exit inference over B samples.

    Attributes:
        logits: float32 [B, C], each sample's logits at its exit layer.
        exit_layer: int64 [B], 1-based layer at which each sample exited.
        pred: int64 [B], argmax of ``logits``.
        layer_speedup: past-future.txt eq. 15 over this batch.
        flops_speedup: full-model FLOPs over executed FLOPs (per-sample lengths).
        layers_run: row-layers actually computed (sum of exit layers).
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    pred: torch.Tensor
    layer_speedup: float
    flops_speedup: float
    layers_run: int


def check_inputs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 exit_profile: Optional[torch.Tensor]):
    """Validate an engine call's inputs (clear errors, no tensor reads); returns (B, S)."""
    if input_ids.dim() != 2:
        raise ValueError(f"early_exit: input_ids must be [B, S], got {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    if s < 1:
        raise ValueError("early_exit: the sequence needs at least the [CLS] token")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and s > max_pos:
        raise ValueError(f"early_exit: sequence length {s} exceeds the model's max_position_embeddings {max_pos}; "
                         f"truncate the input")
    if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
        raise ValueError(f"early_exit: attention_mask must be [{b}, {s}], got {tuple(attention_mask.shape)}")
    if exit_profile is not None and tuple(exit_profile.shape) != (b,):
        raise ValueError(f"early_exit: exit_profile must be [{b}], got {tuple(exit_profile.shape)}")
    return b, s


def leave_mask(decision_exit: torch.Tensor, layer: int, last: bool, forced: Optional[torch.Tensor]) -> torch.Tensor:
    """Which active rows leave after ``layer``: all at the last layer, else the benchmark's
    forced profile (``forced <= layer``) when given, else the rule's decision."""
    if last:
        return torch.ones_like(decision_exit)
    if forced is not None:
        return forced <= layer
    return decision_exit


def compact_named(keep: torch.Tensor, rows: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor],
                  backend: Optional[str]):
    """``compact_rows`` over named per-row tensors plus an exit rule's state; returns
    (rows, state) of the kept rows, or None when no row is kept."""
    names = list(rows) + [f"state.{k}" for k in state]
    packed = compact_rows(keep, list(rows.values()) + list(state.values()), backend=backend)
    if packed.index.numel() == 0:
        return None
    out = dict(zip(names, packed.tensors))
    return ({k: out[k] for k in rows}, {k: out[f"state.{k}"] for k in state})


@dataclass
class ExitDecision:
    """What an exit rule says about the N active rows at one exit layer.

    Attributes:
        logits: float32 [N, C], each row's logits at this layer.
        exit: bool [N], True for the rows that leave here.
        state: the rule's per-row state after this layer (name -> tensor with N rows); the
            engine compacts it with the rows that stay.
    """

    logits: torch.Tensor
    exit: torch.Tensor
    state: Dict[str, torch.Tensor]


class ExitRule:
    """How a method decides at its exit layers; the batched engine calls it.

    A rule sees the active rows only. Per-row state it needs across layers (patience
    counters, pooled past states, classifier memory, ...) lives in the ``state`` dict,
    which the engine compacts together with the hidden states, so a rule never indexes
    rows itself. Methods subclass this (see :mod:`eekernels.methods`).
    """

    def initial_state(self, batch_size: int, device: torch.device) -> Dict[str, torch.Tensor]:
        """Per-row state before the first layer (tensors with ``batch_size`` rows)."""
        return {}

    def observe(self, layer: int, hidden: torch.Tensor, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Called after every layer that is not an exit layer; returns the updated state."""
        return state

    def decide(self, layer: int, hidden: torch.Tensor, state: Dict[str, torch.Tensor]) -> ExitDecision:
        """Called after each exit layer (1-based ``layer``) with the active rows' states."""
        raise NotImplementedError


class ExitHeadRule(ExitRule):
    """The classic rules through the fused exit head: entropy (DeeBERT), max-prob
    (Right-Tool) or patience (PABEE, ``threshold`` = patience), with the model's heads."""

    def __init__(self, model, criterion: str = "entropy", threshold: float = 0.0, backend: Optional[str] = None):
        self.model, self.criterion, self.threshold, self.backend = model, criterion, threshold, backend

    def decide(self, layer, hidden, state):
        head = self.model.head(layer)
        out = exit_head(
            hidden[:, 0], head.classifier.weight, head.classifier.bias,
            pooler_weight=head.pooler.weight, pooler_bias=head.pooler.bias,
            criterion=self.criterion, threshold=self.threshold,
            prev_pred=state.get("prev_pred"), counter=state.get("counter"), backend=self.backend,
        )
        new_state = {"prev_pred": out.pred, "counter": out.counter} if self.criterion == "patience" else {}
        return ExitDecision(out.logits, out.exit, new_state)


def early_exit_forward(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       token_type_ids: Optional[torch.Tensor] = None, *, criterion: str = "entropy",
                       threshold: float = 0.0, backend: Optional[str] = None,
                       exit_profile: Optional[torch.Tensor] = None,
                       rule: Optional[ExitRule] = None) -> EarlyExitOutput:
    """Run ``model`` (an :class:`~eekernels.models.EarlyExitModel`) with early exit.

    Args:
        input_ids: int64 [B, S].
        attention_mask: [B, S] (1 = token, 0 = padding) or None.
        token_type_ids: [B, S] or None.
        criterion, threshold: the exit rule (see :func:`eekernels.ops.exit_head`): entropy
            (DeeBERT), max_prob (Right-Tool) or patience (PABEE, threshold = patience).
        backend: the ops' backend (default: automatic).
        exit_profile: for benchmarks, int [B] of 1-based layers: row i exits at the first exit
            layer >= exit_profile[i]. The exit head still runs (its cost counts); only its
            decision is replaced, so a controlled exit profile can be timed.
        rule: a method's :class:`ExitRule` (then ``criterion``/``threshold`` are unused);
            default: :class:`ExitHeadRule` with ``criterion`` and ``threshold``.
    """
    b, s = check_inputs(model, input_ids, attention_mask, exit_profile)
    dev = input_ids.device
    ad = model.adapter
    n_layers = model.num_layers
    c = model.num_labels
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = ad.embed(input_ids, token_type_ids)
            mask = ad.attention_mask(attention_mask, hidden)
            out_logits = torch.empty(b, c, dtype=torch.float32, device=dev)
            out_layer = torch.zeros(b, dtype=torch.int64, device=dev)
            batch_index = torch.arange(b, device=dev)
            if rule is None:
                rule = ExitHeadRule(model, criterion, threshold, backend)
            state = rule.initial_state(b, dev)
            forced = None if exit_profile is None else exit_profile.to(device=dev, dtype=torch.int64)
            layers_run = 0
            for i in range(n_layers):
                layer = i + 1
                layers_run += hidden.shape[0]
                hidden = ad.layer(i)(hidden, mask)
                if layer not in model.exit_layers:
                    state = rule.observe(layer, hidden, state)
                    continue
                last = layer == n_layers
                out = rule.decide(layer, hidden, state)
                exit_mask = leave_mask(out.exit, layer, last, forced)
                scatter_exits(out_logits, out_layer, batch_index, exit_mask, out.logits, layer, backend=backend)
                if last:
                    break
                # Everything that follows the rows. HF masks are None (no padding) or per-row
                # [N, 1, q, k]; a broadcast mask (first dim 1 with N > 1) stays as it is.
                rows = {"hidden": hidden, "batch_index": batch_index}
                if mask is not None and mask.shape[0] == hidden.shape[0]:
                    rows["mask"] = mask
                if forced is not None:
                    rows["forced"] = forced
                kept = compact_named(~exit_mask, rows, out.state, backend)
                if kept is None:
                    break
                rows, state = kept
                hidden, batch_index = rows["hidden"], rows["batch_index"]
                mask = rows.get("mask", mask)
                forced = rows.get("forced")
    finally:
        model.train(was_training)
    seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
    cfg = model.config
    el = out_layer.cpu()
    return EarlyExitOutput(
        logits=out_logits,
        exit_layer=out_layer,
        pred=out_logits.argmax(dim=1),
        layer_speedup=metrics.layer_speedup(el, n_layers),
        flops_speedup=metrics.flops_speedup(el, seq_len, n_layers, cfg.hidden_size, cfg.intermediate_size, c,
                                            model.exit_layers),
        layers_run=layers_run,
    )
