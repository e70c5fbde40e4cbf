"""Layer executors: what runs encoder layer i on the active rows for the layer loop.

The loop (:mod:`eekernels.engine.loop`) never calls an HF module itself: it asks an
executor to embed the batch (:meth:`LayerExecutor.start`), to run each layer on the rows
still active (:meth:`LayerExecutor.layer`) and, after the exit handling of a layer, to
adjust the rows (:meth:`LayerExecutor.after_step`: MPEE prunes tokens there). Engines that
run a layer under ``torch.cond`` use :meth:`LayerExecutor.layer_fn`, a pure function of
the hidden states and the executor's per-row mask.

Executors here:

- :class:`HFExecutor` (default): the HF layer modules with HF's own attention mask.
- :class:`PartsExecutor`: the same modules and weights split into
  :class:`~eekernels.hf.layer_parts.LayerParts` (plain torch with a bool key mask), which
  ``torch.cond`` traces and token-level methods extend.

Another executor may run the same layer through a faster engine; exit heads, compaction and
bookkeeping stay eekernels ops. :mod:`eekernels.engine.ort` has ``"ort"`` and
``"ort-int8"`` (ONNX Runtime sessions, imported only when one is built).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Optional

import torch

from ..hf.adapters import EncoderAdapter
from ..hf.layer_parts import layer_parts
from .rows import Rows

__all__ = ["HFExecutor", "LayerExecutor", "PartsExecutor", "valid_tokens"]


def valid_tokens(attention_mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """bool [B, S] of the real tokens, or None when ``attention_mask`` is None (no padding)."""
    if attention_mask is None:
        return None
    return attention_mask.to(device=device).bool()


class LayerExecutor:
    """Runs one encoder's layers on the active rows (subclasses bind how).

    Args:
        adapter: the encoder's :class:`~eekernels.hf.adapters.EncoderAdapter`.
    """

    #: the name ``early_exit(executor=...)`` selects it by
    name = ""
    #: True when the layers run outside torch (no ``torch.cond`` tracing): engine="rows" only
    rows_only = False

    def __init__(self, adapter: EncoderAdapter):
        self.adapter = adapter

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def start(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
              token_type_ids: Optional[torch.Tensor]) -> Rows:
        """Embed the batch: the rows before layer 1 (``valid`` set when there is padding)."""
        hidden = self.adapter.embed(input_ids, token_type_ids)
        rows = Rows(hidden)
        valid = valid_tokens(attention_mask, hidden.device)
        if valid is not None:
            rows.tensors["valid"] = valid
        self.prepare(rows, attention_mask)
        return rows

    def running(self) -> ContextManager[None]:
        """The context one early-exit call runs in (entered before the embedding, left after
        the last layer): where an executor that runs layers outside torch sets up what they
        need for the call. Nothing here."""
        return contextlib.nullcontext()

    def attach_exit_heads(self, model) -> None:
        """Offer ``model``'s exit heads to run inside the layers: an executor that can
        (:class:`~eekernels.engine.ort.OrtExecutor`) computes the logits of the exit after
        each of ``model.exit_points`` (``model.exit_logits``) with the layer and leaves them
        in ``rows.context["exit_logits"]`` as (step, logits [N, C]), which the rule's
        :func:`~eekernels.engine.rules.head_exit` reads. Here the layers run alone."""

    def prepare(self, rows: Rows, attention_mask: Optional[torch.Tensor]) -> None:
        """Add the executor's own per-row tensors (its mask form) to freshly embedded rows."""

    def mask(self, rows: Rows) -> Optional[torch.Tensor]:
        """The executor's per-row attention mask of ``rows`` (None without padding)."""
        return rows.tensors.get("mask")

    def layer_fn(self, step: int) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """Layer ``step`` (1-based) as a pure ``f(hidden, mask) -> hidden``, ``mask`` as
        :meth:`mask` gives it."""
        raise NotImplementedError

    def layer(self, step: int, rows: Rows) -> None:
        """Run layer ``step`` (1-based) on the active rows, in place on ``rows``."""
        rows.hidden = self.layer_fn(step)(rows.hidden, self.mask(rows))

    def after_step(self, step: int, rows: Rows) -> None:
        """Called after the exit handling of ``step`` on the rows that stay."""

    def extras(self, rows: Rows) -> Dict[str, object]:
        """What the executor measured during the call (token counts, widths), for the output."""
        return {}


class HFExecutor(LayerExecutor):
    """The HF layer modules as they are, with the mask HF's forward builds for its
    attention implementation (None when there is no padding)."""

    name = "hf"

    def prepare(self, rows, attention_mask):
        mask = self.adapter.attention_mask(attention_mask, rows.hidden)
        if mask is not None and mask.shape[0] == rows.count:
            rows.tensors["mask"] = mask  # per-row [N, 1, q, k]: compacted with the rows
        else:
            rows.context["shared_mask"] = mask  # None, or one mask broadcast over every row

    def mask(self, rows):
        return rows.tensors["mask"] if "mask" in rows.tensors else rows.context.get("shared_mask")

    def layer_fn(self, step):
        return self.adapter.layer(step - 1)


class PartsExecutor(LayerExecutor):
    """Each layer as :class:`~eekernels.hf.layer_parts.LayerParts` (the HF modules and
    weights, split) with a bool [N, S] key mask: plain torch, so ``torch.cond`` traces it,
    and the pieces (keys/values, queries, class attention) serve token-level methods."""

    name = "parts"

    def __init__(self, adapter: EncoderAdapter, parts=None):
        super().__init__(adapter)
        self.parts = parts if parts is not None else [layer_parts(adapter, i) for i in range(adapter.num_layers)]

    def mask(self, rows):
        return rows.valid

    def layer_fn(self, step):
        return self.parts[step - 1]
