"""A fixed-capacity early-exit engine with every decision on the device (no host sync).

The row engine (:mod:`eekernels.engine.batched`) compacts the active rows after each exit
layer, which needs the survivor count on the host: one sync per exit layer. At small
batches that sync and the per-layer launches dominate (DESIGN.md, "What the clock says"),
and a forward that syncs cannot be captured into one CUDA graph.

This engine keeps the batch at its capacity B and decides on the device instead:

- after each exit layer the exit rule runs on all B slots; rows that leave are written to
  their batch positions with ``scatter_exits`` (no sync), and the slots are re-ordered so
  that the rows still active come first (a stable argsort of the inactive flag and one
  gather of the per-row tensors: no sync either);
- each layer runs under ``torch.cond`` on the smallest row bucket (B, B/2, B/4, ... down to
  ``min_bucket``) that holds the active rows, and not at all once every row has left.
  The bucket choice reads the survivor count on the device, so under CUDA-graph capture
  (PyTorch inserts conditional IF nodes for ``torch.cond``,
  ``torch._higher_order_ops.cudagraph_conditional_nodes``) the whole early-exit forward can
  be one graph; eagerly, ``torch.cond`` evaluates the predicate itself.

Rows in a bucket that already left are computed and thrown away (at most the bucket's
slack); in exchange there is no host round trip. Results equal :func:`early_exit_forward`'s
to floating-point tolerance: each row's layer output does not depend on the other rows.

Status: correctness is tested on CPU (eager ``torch.cond``); the CUDA-graph capture and its
timing have not run on a GPU yet (see benchmarks/NOTES.md).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import metrics
from ..ops import scatter_exits
from ..models.layer_parts import layer_parts
from .batched import EarlyExitOutput, ExitHeadRule, ExitRule, check_inputs, leave_mask

__all__ = ["row_buckets", "fixed_capacity_forward"]


def row_buckets(capacity: int, min_bucket: int = 1) -> List[int]:
    """Bucket sizes, largest first: capacity, ceil(capacity/2), ... down to >= min_bucket."""
    if capacity < 1 or min_bucket < 1:
        raise ValueError(f"row_buckets: capacity and min_bucket must be >= 1, got {capacity}, {min_bucket}")
    out = [capacity]
    while out[-1] > min_bucket:
        nxt = max(min_bucket, (out[-1] + 1) // 2)
        if nxt == out[-1]:
            break
        out.append(nxt)
    return out


def _run_layer_bucketed(layer_fn, hidden: torch.Tensor, mask: Optional[torch.Tensor], count: torch.Tensor,
                        buckets: List[int]) -> torch.Tensor:
    """``layer_fn`` on the first c rows of ``hidden`` (c = the smallest bucket >= count, chosen
    on the device), the other rows passed through; nothing runs when count == 0."""
    b = hidden.shape[0]

    def compute(c):
        def fn(h, m, n):
            if c == b:
                return layer_fn(h, m)
            return torch.cat([layer_fn(h[:c], None if m is None else m[:c]), h[c:]])
        return fn

    def level(k):
        if k == len(buckets) - 1:
            return compute(buckets[k])

        def fn(h, m, n):
            return torch.cond(n <= buckets[k + 1], level(k + 1), compute(buckets[k]), (h, m, n))
        return fn

    def skip(h, m, n):
        return h.clone()

    m = mask if mask is not None else hidden.new_zeros(())
    if mask is None:
        def strip(fn):
            return lambda h, _m, n: fn(h, None, n)
        return torch.cond(count > 0, strip(level(0)), skip, (hidden, m, count))
    return torch.cond(count > 0, level(0), skip, (hidden, m, count))


def fixed_capacity_forward(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                           token_type_ids: Optional[torch.Tensor] = None, *, criterion: str = "entropy",
                           threshold: float = 0.0, backend: Optional[str] = None,
                           exit_profile: Optional[torch.Tensor] = None, rule: Optional[ExitRule] = None,
                           min_bucket: int = 1, with_metrics: bool = True) -> EarlyExitOutput:
    """Early-exit inference at fixed capacity with device-side decisions (module docstring).

    Arguments as :func:`eekernels.engine.early_exit_forward`; ``min_bucket`` is the smallest
    row bucket a layer runs on. ``with_metrics=False`` skips the speed-up metrics (they read
    the exit layers on the host); then ``layer_speedup``/``flops_speedup`` are NaN and
    ``layers_run`` is -1, and the call never synchronises (for CUDA-graph capture).

    The exit rule must keep its state per row (as :class:`ExitRule` requires); it sees all
    B slots, active rows first.
    """
    b, s = check_inputs(model, input_ids, attention_mask, exit_profile)
    dev = input_ids.device
    ad = model.adapter
    n_layers, c = model.num_layers, model.num_labels
    buckets = row_buckets(b, min_bucket)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = ad.embed(input_ids, token_type_ids)
            # The layers run as LayerParts (the HF modules and weights, split; plain torch that
            # torch.cond can trace) with a bool [B, S] key mask.
            mask = None if attention_mask is None else attention_mask.to(device=dev).bool()
            parts = [layer_parts(ad, i) for i in range(n_layers)]
            if rule is None:
                rule = ExitHeadRule(model, criterion, threshold, backend)
            state: Dict[str, torch.Tensor] = rule.initial_state(b, dev)
            out_logits = torch.zeros(b, c, dtype=torch.float32, device=dev)
            out_layer = torch.zeros(b, dtype=torch.int64, device=dev)
            batch_index = torch.arange(b, device=dev)
            active = torch.ones(b, dtype=torch.bool, device=dev)
            count = torch.tensor(b, device=dev)
            forced = None if exit_profile is None else exit_profile.to(device=dev, dtype=torch.int64)
            for i in range(n_layers):
                layer = i + 1
                hidden = _run_layer_bucketed(parts[i], hidden, mask, count, buckets)
                if layer not in model.exit_layers:
                    state = rule.observe(layer, hidden, state)
                    continue
                out = rule.decide(layer, hidden, state)
                leave = active & leave_mask(out.exit, layer, layer == n_layers, forced)
                scatter_exits(out_logits, out_layer, batch_index, leave, out.logits, layer, backend=backend)
                if layer == n_layers:
                    break
                active = active & ~leave
                # Active rows first, in their order (stable): one gather of every per-row tensor.
                order = torch.argsort((~active).to(torch.int8), stable=True)
                hidden = hidden.index_select(0, order)
                if mask is not None:
                    mask = mask.index_select(0, order)
                batch_index = batch_index.index_select(0, order)
                active = active.index_select(0, order)
                state = {k: v.index_select(0, order) for k, v in out.state.items()}
                if forced is not None:
                    forced = forced.index_select(0, order)
                count = active.sum()
    finally:
        model.train(was_training)
    if not with_metrics:
        nan = float("nan")
        return EarlyExitOutput(out_logits, out_layer, out_logits.argmax(dim=1), nan, nan, -1)
    seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
    cfg = model.config
    el = out_layer.cpu()
    return EarlyExitOutput(
        logits=out_logits, exit_layer=out_layer, pred=out_logits.argmax(dim=1),
        layer_speedup=metrics.layer_speedup(el, n_layers),
        flops_speedup=metrics.flops_speedup(el, seq_len, n_layers, cfg.hidden_size, cfg.intermediate_size, c,
                                            model.exit_layers),
        layers_run=int(el.sum()),
    )
