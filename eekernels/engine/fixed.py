"""Fixed capacity: every exit decision stays on the device (no host sync), for small batches.

:class:`~eekernels.engine.loop.RowCompaction` compacts the active rows after each exit
point, which needs the survivor count on the host: one sync per exit point. At small
batches that sync and the per-layer launches dominate (DESIGN.md, "What the clock says"),
and a forward that syncs cannot be captured into one CUDA graph.

:class:`FixedCapacity` keeps the batch at its capacity B instead:

- after each exit point the rule runs on all B slots; rows that leave are written to their
  batch positions with ``scatter_exits`` (no sync), and the slots are reordered so that
  the rows still active come first (a stable argsort of the inactive flag and one gather
  of the per-row tensors: no sync either);
- each layer runs under ``torch.cond`` on the smallest row bucket (B, B/2, B/4, ... down to
  ``min_bucket``) that holds the active rows, and not at all once every row has left. The
  bucket choice reads the survivor count on the device, so under CUDA-graph capture
  (PyTorch inserts conditional IF nodes for ``torch.cond``,
  ``torch._higher_order_ops.cudagraph_conditional_nodes``) the whole early-exit forward can
  be one graph (:mod:`eekernels.engine.graphed`); eagerly, ``torch.cond`` evaluates the
  predicate itself.

Rows in a bucket that already left are computed and thrown away (at most the bucket's
slack); in exchange there is no host round trip. Results equal the row engine's to
floating-point tolerance: each row's layer output does not depend on the other rows.
The executor must offer :meth:`~eekernels.engine.executors.LayerExecutor.layer_fn` (a pure
layer function ``torch.cond`` can trace): :class:`~eekernels.engine.executors.PartsExecutor`.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..ops import scatter_exits
from .rows import Rows

__all__ = ["FixedCapacity", "row_buckets", "run_layer_bucketed"]


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


def run_layer_bucketed(layer_fn: Callable, hidden: torch.Tensor, mask: Optional[torch.Tensor], count: torch.Tensor,
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

    # Static shapes for the branches: after a shape change dynamo would mark dimensions
    # dynamic, and recompiling nested conds with dynamic shapes fails ("lift_tracked_freevar_to_
    # input should not be called on root SubgraphTracer", torch 2.13) when a second model of
    # another width runs in the same process. Each shape gets its own graph instead.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        if mask is None:  # torch.cond takes tensors only: a placeholder, dropped again inside
            def strip(fn):
                return lambda h, _m, n: fn(h, None, n)
            return torch.cond(count > 0, strip(level(0)), skip, (hidden, hidden.new_zeros(()), count))
        return torch.cond(count > 0, level(0), skip, (hidden, mask, count))


class FixedCapacity:
    """The placement that keeps all B slots (see the module docstring).

    Args:
        min_bucket: the smallest row bucket a layer runs on.
    """

    name = "fixed"

    def __init__(self, min_bucket: int = 1):
        if isinstance(min_bucket, bool) or not isinstance(min_bucket, int) or min_bucket < 1:
            raise ValueError(f"FixedCapacity: min_bucket must be an int >= 1, got {min_bucket!r}")
        self.min_bucket = min_bucket

    def start(self, rows: Rows) -> None:
        b = rows.count
        self.buckets = row_buckets(b, self.min_bucket)
        rows.tensors["active"] = torch.ones(b, dtype=torch.bool, device=rows.hidden.device)
        self.count = torch.tensor(b, device=rows.hidden.device)

    def run_layer(self, executor, step: int, rows: Rows) -> None:
        rows.hidden = run_layer_bucketed(executor.layer_fn(step), rows.hidden, executor.mask(rows), self.count,
                                         self.buckets)

    def leave(self, rows: Rows, leave: torch.Tensor, logits: torch.Tensor, step: int, last: bool,
              out_logits: torch.Tensor, out_layer: torch.Tensor, backend: Optional[str]) -> bool:
        """Scatter the active leavers; move the rows still active to the front."""
        active = rows.tensors["active"]
        leave = active & leave
        scatter_exits(out_logits, out_layer, rows.tensors["batch_index"], leave, logits, step, backend=backend)
        if last:
            return False
        rows.tensors["active"] = active & ~leave
        rows.reorder(torch.argsort((~rows.tensors["active"]).to(torch.int8), stable=True))
        self.count = rows.tensors["active"].sum()
        return True
