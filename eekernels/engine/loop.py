"""The early-exit layer loop: written once, every engine variant and method plugs into it.

For a batch of B samples::

    rows = executor.start(batch)                      # embeddings, masks
    for step in 1 .. last exit point:
        placement.run_layer(executor, step, rows)     # layer `step` on the active rows only
        if step is an exit point:
            decision = rule.decide(step, rows)        # fused exit head (+ the method's extras)
            placement.leave(...)                      # scatter the leavers' logits and exit
                                                      # step to their batch positions; compact
                                                      # (or reorder) the rest
        else:
            rows.state = rule.observe(step, rows)
        executor.after_step(step, rows)               # token pruning, ...

Three seams:

- the **executor** (:mod:`eekernels.engine.executors`) runs the layers: HF modules, their
  split parts, a token-packing executor (HashEE), class-attention pruning (MPEE), a
  cascade of members (CascadeBERT), a faster runtime;
- the **rule** (:mod:`eekernels.engine.rules`) decides at the exit points: entropy,
  max-prob, patience, a policy network, Past-Future's merged states, a cascade member's
  confidence;
- the **placement** says what leaving means: :class:`RowCompaction` (the default: the
  survivors are compacted, so later layers compute on them alone; one host read of the
  survivor count per exit point) or :class:`~eekernels.engine.fixed.FixedCapacity` (the
  batch keeps its capacity and every decision stays on the device, for CUDA-graph capture).

A "step" is a layer of the encoder; for a cascade it runs on through the members' layers
(member 2's first layer is step L_1 + 1), so exit points are cumulative depths.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..ops import scatter_exits
from .rows import Rows
from .rules import ExitRule, leave_mask

__all__ = ["EarlyExitOutput", "RowCompaction", "check_inputs", "run_early_exit"]


@dataclass
class EarlyExitOutput:
    """Per-sample results of batched early-exit inference over B samples, for every method.

    Attributes:
        logits: float32 [B, C], each sample's logits at its exit.
        exit_layer: int64 [B], the 1-based layer each sample left after (for a cascade the
            layers run in every member tried: cumulative).
        pred: int64 [B], argmax of ``logits``.
        layer_speedup: past-future.txt eq. 15 over this batch (cascades: every member tried).
        flops_speedup: full-model FLOPs over executed FLOPs, per-sample lengths, each method's
            extra work (heads, pooling, class attention) and savings (pruned tokens) counted.
        layers_run: row-layers actually computed (the sum of ``exit_layer``).
        extras: what a method reports beside these (e.g. ``exit_member`` of a cascade,
            ``widths`` of MPEE's shrinking sequence, ``active_tokens`` of HashEE).
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    pred: torch.Tensor
    layer_speedup: float
    flops_speedup: float
    layers_run: int
    extras: Dict[str, Any] = field(default_factory=dict)


def _config_limit(model, key: str) -> Optional[int]:
    """The smallest ``config.<key>`` of the model's HF models (vocab sizes), None if unknown."""
    values = [getattr(getattr(m, "config", None), key, None) for m in model.hf_models().values()]
    values = [v for v in values if isinstance(v, int)]
    return min(values) if values else None


def _model_device(model) -> Optional[torch.device]:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


def check_inputs(model, input_ids, attention_mask, token_type_ids, exit_profile, who: str = "early_exit",
                 values: bool = True, device: Optional[torch.device] = None) -> None:
    """Validate a batch for ``model`` with errors that name the argument and say what was
    expected (``who``: the public function, first in every message).

    Types, shapes and devices always; on the CPU also the values (token ids and token types
    within the model's vocabularies, a 0/1 mask with a token in every row:
    :func:`check_values`), unless ``values`` is False: the caller checks them (the
    ort-graph engine, inside its graph, where they cost less than here after a run has
    left the caches cold). On an accelerator no tensor value is read (no host
    synchronisation, CUDA-graph capture stays possible). ``device``: where the inputs must
    be (default: the model's; an engine that runs elsewhere names its own, which also skips
    finding the model's, ~0.1 ms in a call after a run has left the caches cold)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{who}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"{who}: input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{who}: input_ids must hold integer token ids, got {input_ids.dtype}")
    b, s = input_ids.shape
    if b < 1:
        raise ValueError(f"{who}: empty batch (input_ids has 0 rows)")
    if s < 1:
        raise ValueError(f"{who}: input_ids has length 0; each sequence needs at least the [CLS] token")
    max_pos = model.max_positions()
    if max_pos is not None and s > max_pos:
        raise ValueError(f"{who}: input_ids has sequence length {s}, more than the model's max_position_embeddings "
                         f"{max_pos}; truncate the input")
    if device is None:
        device = _model_device(model)
        if device is not None and input_ids.device != device:
            raise ValueError(f"{who}: input_ids is on {input_ids.device} but the model is on {device}; move one of them")
    elif input_ids.device != device:
        raise ValueError(f"{who}: this engine runs on {device}, but input_ids is on {input_ids.device}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (b, s):
            raise ValueError(f"{who}: {name} must be [{b}, {s}] like input_ids, got {tuple(t.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{who}: {name} is on {t.device} but input_ids is on {input_ids.device}")
    if attention_mask is not None and attention_mask.dtype.is_complex:
        raise TypeError(f"{who}: attention_mask must be bool, integer or float 0/1, got {attention_mask.dtype}")
    if token_type_ids is not None and (token_type_ids.dtype.is_floating_point or token_type_ids.dtype.is_complex
                                       or token_type_ids.dtype == torch.bool):
        raise TypeError(f"{who}: token_type_ids must hold integer token types, got {token_type_ids.dtype}")
    if exit_profile is not None:
        profile = torch.as_tensor(exit_profile)
        if tuple(profile.shape) != (b,):
            raise ValueError(f"{who}: exit_profile must be [{b}], got {tuple(profile.shape)}")
        if profile.dtype.is_floating_point or profile.dtype.is_complex or profile.dtype == torch.bool:
            raise TypeError(f"{who}: exit_profile must hold integer 1-based layers, got {profile.dtype}")
    if values and input_ids.device.type == "cpu":
        check_values(model, input_ids, attention_mask, token_type_ids, who)


def cpu_values(t: torch.Tensor) -> np.ndarray:
    """The values of CPU tensor ``t`` as a numpy array: its own memory where numpy has the
    dtype (bfloat16 and other torch-only dtypes are widened to float32). Reading a small
    tensor through numpy skips torch's per-op dispatch, a few microseconds each."""
    if t.requires_grad:
        t = t.detach()
    try:
        return t.numpy()
    except TypeError:
        return t.float().numpy()


#: integer input -> the config field that bounds its values
_VOCAB_KEYS = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size"}


def value_limits(model) -> Dict[str, int]:
    """The exclusive upper bound of each integer input's values that the model knows:
    ``input_ids`` (its vocabulary) and ``token_type_ids`` (its token-type vocabulary)."""
    limits = {name: _config_limit(model, key) for name, key in _VOCAB_KEYS.items()}
    return {name: limit for name, limit in limits.items() if limit is not None}


def check_values(model, input_ids, attention_mask, token_type_ids, who: str) -> None:
    """A ValueError naming the first bad value of a CPU batch: a token id or token type
    outside the model's vocabularies, a mask entry other than 0 / 1, a row without a token."""
    limits = value_limits(model)
    for name, t in (("input_ids", input_ids), ("token_type_ids", token_type_ids)):
        if t is not None and name in limits:
            values = cpu_values(t)
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= limits[name]:
                raise ValueError(f"{who}: {name} must lie in [0, {limits[name]}) (the model's {_VOCAB_KEYS[name]}), "
                                 f"got values in [{lo}, {hi}]")
    if attention_mask is not None:
        mask = cpu_values(attention_mask)
        if mask.dtype.kind in "iu":  # integers: a range check
            not_binary = mask.min() < 0 or mask.max() > 1
        else:  # floats (a bool mask is 0/1)
            not_binary = mask.dtype != np.bool_ and not ((mask == 0) | (mask == 1)).all()
        if not_binary:
            raise ValueError(f"{who}: attention_mask must hold only 0 (padding) and 1 (token)")
        if not mask.any(axis=1).all():
            empty = np.flatnonzero(~mask.any(axis=1))
            raise ValueError(f"{who}: attention_mask row {int(empty[0])} has no token; every row needs at least "
                             f"the [CLS] token")


class RowCompaction:
    """Rows that leave are gone: their logits and exit step are scattered to their batch
    positions, and the survivors are compacted, so later layers compute on them alone.

    Args:
        trim: after each compaction, cut the padded length to the longest row still active
            (the batch's longest sentence may have left): later layers then compute no
            padding the survivors do not need. Rows carry ``ends`` (one past each row's last
            real token), so any padding side works.

    Host synchronisation: one read of the survivor count per exit point (``compact_rows``),
    and with ``trim`` one read of the survivors' longest length. No boolean-mask indexing.
    On the CPU, where reading a flag costs nothing, an exit point that no row leaves skips
    the scatter and the compaction (their copies of every row tensor).
    """

    name = "rows"

    def __init__(self, trim: bool = True):
        self.trim = trim

    def start(self, rows: Rows) -> None:
        valid = rows.valid
        if self.trim and valid is not None and valid.shape[1] == rows.hidden.shape[1]:
            pos = torch.arange(1, valid.shape[1] + 1, device=valid.device)
            rows.tensors["ends"] = (valid * pos).amax(dim=1)

    def run_layer(self, executor, step: int, rows: Rows) -> None:
        executor.layer(step, rows)

    def leave(self, rows: Rows, leave: torch.Tensor, logits: torch.Tensor, step: int, last: bool,
              out_logits: torch.Tensor, out_layer: torch.Tensor, backend: Optional[str]) -> bool:
        """Scatter the leavers; compact (and trim) the rest. False when no row remains."""
        if not last and leave.device.type == "cpu" and not bool(leave.any()):
            return True  # nobody leaves: nothing to scatter or move (a host read is free on the CPU)
        scatter_exits(out_logits, out_layer, rows.tensors["batch_index"], leave, logits, step, backend=backend)
        if last or not rows.compact(~leave, backend):
            return False
        ends = rows.tensors.get("ends")
        if ends is not None and ends.shape[0] and rows.hidden.shape[1] == rows.valid.shape[1]:
            rows.trim(max(int(ends.max()), 1))
        return True


_MODE_LOCK = threading.Lock()
#: model -> [early_exit calls running, training mode before the first of them]
_RUNNING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _any_training(module: torch.nn.Module) -> bool:
    """Whether ``module`` or any submodule is in training mode: a plain walk of ``_modules``
    (``modules()`` with its memo and generators costs ~0.5 ms a call on MiniLM, a tenth
    of a one-row early-exit call)."""
    stack = [module]
    while stack:
        m = stack.pop()
        if m.training:
            return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the duration of an early-exit call. Calls from several threads share
    one switch: the first switches to eval, the last restores the mode (a call restoring it
    while another runs would run that one with dropout)."""
    with _MODE_LOCK:
        entry = _RUNNING.setdefault(model, [0, model.training])
        if entry[0] == 0:
            # train(False) walks every module (milliseconds a call on a real model): switch
            # only when some module trains; entry[1] None: nothing to restore
            entry[1] = model.training if _any_training(model) else None
            if entry[1] is not None:
                model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _MODE_LOCK:
            entry[0] -= 1
            if entry[0] == 0 and entry[1] is not None:
                model.train(entry[1])


def run_early_exit(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   token_type_ids: Optional[torch.Tensor] = None, *, rule: ExitRule, executor,
                   placement=None, exit_profile: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                   with_metrics: bool = True) -> EarlyExitOutput:
    """Batched early-exit inference of ``model`` (see the module docstring).

    Args:
        model: an :class:`~eekernels.models.base.EarlyExitBase` (its ``exit_points``,
            ``num_labels`` and ``speedups`` are read).
        input_ids: int [B, S]; attention_mask: [B, S] (1 = token) or None; token_type_ids.
        rule, executor, placement: the three seams (placement default :class:`RowCompaction`).
        exit_profile: for benchmarks, int [B] of 1-based steps: row i leaves at the first
            exit point >= exit_profile[i]. The rule still runs (its cost counts); only its
            decision is replaced, so a controlled exit profile can be timed.
        backend: the ops' backend (default: automatic).
        with_metrics: False skips the speed-ups (they read the exit layers on the host):
            then they are NaN and ``layers_run`` is -1, and the call never synchronises
            with a fixed-capacity placement (CUDA-graph capture).
    """
    check_inputs(model, input_ids, attention_mask, token_type_ids, exit_profile)
    placement = placement if placement is not None else RowCompaction()
    b, s = input_ids.shape
    dev = input_ids.device
    points = model.exit_points
    exit_set, last_step = set(points), points[-1]
    with _eval_mode(model), torch.no_grad(), executor.running():
        rows = executor.start(input_ids, attention_mask, token_type_ids)
        rows.context["backend"] = backend
        rows.tensors["batch_index"] = torch.arange(b, device=dev)
        if exit_profile is not None:
            rows.tensors["forced"] = torch.as_tensor(exit_profile).to(device=dev, dtype=torch.int64)
        rows.state = rule.initial_state(b, dev)
        out_logits = torch.empty(b, model.num_labels, dtype=torch.float32, device=dev)
        out_layer = torch.zeros(b, dtype=torch.int64, device=dev)
        placement.start(rows)
        for step in range(1, last_step + 1):
            placement.run_layer(executor, step, rows)
            if step in exit_set:
                last = step == last_step
                decision = rule.decide(step, rows)
                leave = leave_mask(decision.exit, step, last, rows.tensors.get("forced"))
                rows.state = decision.state
                if not placement.leave(rows, leave, decision.logits, step, last, out_logits, out_layer, backend):
                    break
            else:
                rows.state = rule.observe(step, rows)
            executor.after_step(step, rows)
    extras = executor.extras(rows)
    if not with_metrics:
        nan = float("nan")
        return EarlyExitOutput(out_logits, out_layer, out_logits.argmax(dim=1), nan, nan, -1, extras)
    el = out_layer.cpu()
    seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
    layer_sp, flops_sp = model.speedups(el, seq_len, extras)
    return EarlyExitOutput(out_logits, out_layer, out_logits.argmax(dim=1), layer_sp, flops_sp, int(el.sum()),
                           extras)
