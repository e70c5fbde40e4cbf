"""What the layer loop carries from layer to layer: the active rows.

Every tensor in :class:`Rows` has one row per active sample, in the same order, and the
loop compacts (or reorders) all of them together when rows leave, so neither an executor
nor an exit rule ever indexes rows itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..ops import compact_rows

__all__ = ["Rows", "STATE_PREFIX"]

#: Names of the exit rule's state tensors inside one compaction call.
STATE_PREFIX = "state."


@dataclass
class Rows:
    """The active rows.

    Attributes:
        hidden: [N, S, H] the layer states of the active rows (S may shrink: token pruning,
            trimmed padding).
        tensors: per-row tensors that follow the rows: ``batch_index`` (each row's position
            in the batch), ``valid`` (bool [N, S], the real tokens; absent when there is no
            padding), the executor's own (an HF attention mask, input ids, memories...) and
            ``forced`` (a benchmark's exit profile).
        state: the exit rule's per-row state (patience counters, pooled past states,
            classifier memory, ...).
        context: what one call keeps that is not per row (a mask broadcast over all rows,
            the executor's running counts); executors keep nothing of a call themselves,
            so one model serves concurrent calls.
    """

    hidden: torch.Tensor
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    state: Dict[str, torch.Tensor] = field(default_factory=dict)
    context: Dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """N, the number of active rows."""
        return self.hidden.shape[0]

    @property
    def valid(self) -> Optional[torch.Tensor]:
        """bool [N, S], True for real tokens; None when every slot is a real token."""
        return self.tensors.get("valid")

    def compact(self, keep: torch.Tensor, backend: Optional[str] = None) -> bool:
        """Keep the rows where ``keep`` is True (stable order), every tensor at once with
        ``compact_rows`` (one host read of the survivor count). False when none is left."""
        names = list(self.tensors)
        packed = compact_rows(keep, [self.hidden] + list(self.tensors.values()) + list(self.state.values()),
                              backend=backend)
        if packed.index.numel() == 0:
            return False
        out = packed.tensors
        self.hidden = out[0]
        self.tensors = dict(zip(names, out[1:1 + len(names)]))
        self.state = dict(zip(self.state, out[1 + len(names):]))
        return True

    def trim(self, length: int) -> None:
        """Cut the sequence dimension to its first ``length`` slots (hidden states, and every
        per-row tensor with a sequence dimension: masks [N, S], HF masks [N, 1, S, S] or
        [N, 1, 1, S], token memories). The caller knows no real token lies beyond."""
        s = self.hidden.shape[1]
        if length >= s:
            return
        self.hidden = self.hidden[:, :length]
        for k, t in self.tensors.items():
            if t.dim() == 2 and t.shape[1] == s:
                self.tensors[k] = t[:, :length]
            elif t.dim() == 4 and t.shape[-1] == s:
                self.tensors[k] = t[..., :length, :length] if t.shape[-2] == s else t[..., :length]

    def reorder(self, order: torch.Tensor) -> None:
        """Permute every row tensor by ``order`` (no host sync)."""
        self.hidden = self.hidden.index_select(0, order)
        self.tensors = {k: v.index_select(0, order) for k, v in self.tensors.items()}
        self.state = {k: v.index_select(0, order) for k, v in self.state.items()}
