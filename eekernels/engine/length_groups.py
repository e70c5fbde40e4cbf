"""Length groups: one batch run as a few sub-batches of similar length, to skip padding.

A batch padded to its longest row spends most of its token slots on padding when lengths
vary: 38-52% of SST-2's slots at B = 8-128 in dev order (benchmarks/NOTES.md, "Padding").
The row engine trims the padded width as rows leave, but never regroups rows. Here the rows
are sorted by length and cut into contiguous groups; each group runs the row engine alone,
trimmed to its own longest row, and the results go back to the batch's order.

Where to cut is a small optimisation (:func:`length_groups`): a group costs its token slots
(rows x its longest length) plus a fixed ``overhead`` in token slots, what a call of the
engine costs beyond its tokens (per-layer launches, exit heads, host syncs). So a batch of
similar lengths stays one group, and a long, ragged batch splits where the slots saved pay
for another call.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .loop import EarlyExitOutput

__all__ = ["DEFAULT_GROUP_OVERHEAD", "group_rows", "length_groups", "run_length_grouped"]

#: a call's cost beyond its tokens, in token slots (benchmarks/NOTES.md, "Length groups")
DEFAULT_GROUP_OVERHEAD = 128


def length_groups(lengths: torch.Tensor, overhead: Optional[float] = None) -> List[torch.Tensor]:
    """Row indices of each group, shortest rows first, minimising
    sum over groups of (overhead + rows x longest length).

    With the rows sorted by length, an optimal grouping is contiguous in that order, so
    cost[j] = min_i cost[i] + overhead + (j - i) x sorted[j - 1] over the first j rows
    (an O(B^2) dynamic programme, one vectorised step per row).

    Args:
        lengths: int [B], each row's real length (>= 0).
        overhead: a group's fixed cost in token slots (>= 0; default
            :data:`DEFAULT_GROUP_OVERHEAD`); 0 splits into runs of equal length, a very large
            value keeps one group.
    """
    if overhead is None:
        overhead = DEFAULT_GROUP_OVERHEAD
    if lengths.dim() != 1:
        raise ValueError(f"length_groups: lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if not overhead >= 0:
        raise ValueError(f"length_groups: overhead must be >= 0, got {overhead}")
    b = lengths.numel()
    if b == 0:
        return []
    order = torch.argsort(lengths.cpu(), stable=True)
    sorted_len = lengths.cpu()[order].numpy().astype(np.float64)
    cost = np.zeros(b + 1)
    cut = np.zeros(b + 1, dtype=np.int64)
    starts = np.arange(b)
    for j in range(1, b + 1):
        options = cost[:j] + overhead + (j - starts[:j]) * sorted_len[j - 1]
        i = int(np.argmin(options))
        cost[j], cut[j] = options[i], i
    bounds, j = [], b
    while j > 0:
        bounds.append((int(cut[j]), j))
        j = int(cut[j])
    return [order[i:j] for i, j in reversed(bounds)]


def group_rows(attention_mask: torch.Tensor, overhead: Optional[float] = None) -> List[Tuple[torch.Tensor, int]]:
    """(row indices on the mask's device, width) of each length group of a padded batch
    (:func:`length_groups` of its real lengths): the width is one past the last column any
    of the group's rows uses. Cutting only trailing columns keeps every token in its column,
    so absolute position ids stay right with left padding (where nothing is cut)."""
    real = attention_mask.bool()
    out = []
    for idx in length_groups(real.sum(dim=1), overhead):
        idx = idx.to(real.device)
        used = real.index_select(0, idx).any(dim=0).nonzero()
        out.append((idx, int(used.max()) + 1 if used.numel() else 1))
    return out


def run_length_grouped(run: Callable[..., EarlyExitOutput], model, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], token_type_ids: Optional[torch.Tensor],
                       exit_profile: Optional[torch.Tensor], overhead: Optional[float] = None,
                       with_metrics: bool = True) -> EarlyExitOutput:
    """``run(ids, mask, token_type_ids, exit_profile, with_metrics)`` (the row engine) on each
    length group of the batch (:func:`group_rows`), merged back into the batch's order; the
    speed-ups over the whole batch.

    Raises ValueError for a model whose outputs carry per-call extras (token counts, widths:
    MPEE, HashEE, cascades), which do not merge across groups. ``overhead``: a group's fixed
    cost in token slots (default :data:`DEFAULT_GROUP_OVERHEAD`); ``with_metrics`` False: no
    speed-ups (NaN, ``layers_run`` -1), as ``run`` itself."""
    if attention_mask is None:  # every row has the full length: nothing to regroup
        return run(input_ids, attention_mask, token_type_ids, exit_profile, with_metrics)
    b = input_ids.shape[0]
    groups = group_rows(attention_mask, overhead)
    if len(groups) <= 1:
        return run(input_ids, attention_mask, token_type_ids, exit_profile, with_metrics)
    dev = input_ids.device
    logits = exit_layer = None
    for idx, width in groups:
        def take(t):  # the group's rows, up to the last column any of them uses
            return None if t is None else t.index_select(0, idx)[:, :width]

        profile = None if exit_profile is None else torch.as_tensor(exit_profile).to(dev).index_select(0, idx)
        out = run(take(input_ids), take(attention_mask), take(token_type_ids), profile, False)
        if out.extras:
            raise ValueError(f"early_exit(group_by_length=True): a {model.method} model reports "
                             f"{sorted(out.extras)} per call, which do not merge across length groups; "
                             "run it with group_by_length=False")
        if logits is None:
            logits = out.logits.new_empty((b, out.logits.shape[1]))
            exit_layer = out.exit_layer.new_empty(b)
        logits[idx] = out.logits
        exit_layer[idx] = out.exit_layer
    if not with_metrics:
        return EarlyExitOutput(logits, exit_layer, logits.argmax(dim=1), math.nan, math.nan, -1, {})
    el = exit_layer.cpu()
    layer_sp, flops_sp = model.speedups(el, attention_mask.sum(dim=1).cpu(), {})
    return EarlyExitOutput(logits, exit_layer, logits.argmax(dim=1), layer_sp, flops_sp, int(el.sum()), {})
