"""Row compaction's contract: the registered ops' schemas, the output tuple, the fakes.

Kept apart from ``eekernels/ops/compaction.py`` (validation, reference, dispatch) so that the
backends' modules (``eekernels/triton/compaction.py``) import the contract without importing the
dispatcher that names them."""

from __future__ import annotations

from typing import List, NamedTuple

import torch

#: Schemas of the registered ops: the C++ ``eekernels::compact_rows`` / ``scatter_exits``
#: (csrc/register.cpp, the same strings) and their Triton twins ``*_triton``.
COMPACT_ROWS_SCHEMA = "(Tensor keep, Tensor[] tensors) -> (Tensor index, Tensor[] rows)"
SCATTER_EXITS_SCHEMA = ("(Tensor(a!) out_logits, Tensor(b!) out_layer, Tensor batch_index, Tensor exit, "
                        "Tensor logits, int layer) -> ()")


class CompactedRows(NamedTuple):
    """Result of :func:`compact_rows` for M kept rows out of N.

    Attributes:
        index: int64 [M], the positions of the kept rows in the input, ascending.
        tensors: the compacted tensors, ``tensors[j][k] == input[j][index[k]]``, each a new
            contiguous tensor [M, ...] with the input's dtype and device.
    """

    index: torch.Tensor
    tensors: List[torch.Tensor]


def compact_rows_fake(keep, tensors):
    """Fake (meta) implementation of the compact_rows ops: M is a data-dependent size."""
    m = torch.library.get_ctx().new_dynamic_size()
    return keep.new_empty((m,), dtype=torch.int64), [t.new_empty((m, *t.shape[1:])) for t in tensors]


def scatter_exits_fake(*args):
    """Fake implementation of the scatter_exits ops (in place, no outputs)."""
    return None
