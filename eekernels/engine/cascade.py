"""A cascade of complete encoders as one layer executor (CascadeBERT's member sequence).

The loop's steps run on through the members' layers: member 1's layers are steps
1..L_1, member 2's are L_1 + 1 .. L_1 + L_2, and so on, so a row that leaves after member
j has run ``exit_points[j] = L_1 + ... + L_j`` layers (cascadebert.txt section 4.1 counts
every layer of every member tried). At a member's first layer the rows still active are
embedded afresh with that member's embeddings from their input ids (the rows carry
``input_ids``, ``attention_mask`` and ``token_type_ids`` for that), so an emitted row is
never computed by a larger member.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from .executors import HFExecutor
from .rows import Rows

__all__ = ["CascadeExecutor"]


class CascadeExecutor(HFExecutor):
    """The members' HF layer modules, smallest member first.

    Args:
        adapters: one :class:`~eekernels.hf.adapters.EncoderAdapter` per member, by growing depth.
    """

    name = "cascade"

    def __init__(self, adapters: Sequence):
        super().__init__(adapters[0])
        self.adapters = list(adapters)
        self.steps: List[Tuple[int, int]] = [(j, i) for j, a in enumerate(self.adapters) for i in range(a.num_layers)]

    def member_of(self, step: int) -> int:
        """The 0-based member whose layer is ``step``."""
        return self.steps[step - 1][0]

    def start(self, input_ids, attention_mask, token_type_ids):
        rows = super().start(input_ids, attention_mask, token_type_ids)
        rows.tensors["input_ids"] = input_ids
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None:
                rows.tensors[name] = t
        return rows

    def _enter(self, j: int, rows: Rows) -> None:
        """Embed the active rows with member j and build its mask."""
        ad = self.adapters[j]
        rows.hidden = ad.embed(rows.tensors["input_ids"], rows.tensors.get("token_type_ids"))
        rows.tensors.pop("mask", None)
        mask = ad.attention_mask(rows.tensors.get("attention_mask"), rows.hidden)
        if mask is not None and mask.shape[0] == rows.count:
            rows.tensors["mask"] = mask
            rows.context["shared_mask"] = None
        else:
            rows.context["shared_mask"] = mask

    def layer(self, step, rows):
        j, i = self.steps[step - 1]
        if i == 0 and j > 0:
            self._enter(j, rows)
        rows.hidden = self.adapters[j].layer(i)(rows.hidden, self.mask(rows))
