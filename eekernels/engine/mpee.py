"""MPEE's token-wise exit as a layer executor: class-attention memory and token pruning.

The row side is the loop's (:mod:`eekernels.engine.loop`): after each exit layer the rule
decides, exited rows' results are scattered and the survivors compacted. The token side
(mpee.txt eq. 5-8) is :class:`MPEEExecutor`, on the surviving rows:

- every layer up to the last pruning layer runs in pieces
  (:class:`~eekernels.hf.layer_parts.LayerParts`) so that the class attention
  ``A_class`` (eq. 5: the head mean of the [CLS] row of the attention probabilities)
  comes out of it, and the class-attention memory is updated (eq. 6)::

      A_m = (1 - beta) * A_m_prev + beta * A_class,   A_m_prev = 0 before layer 1

  (the memory starts at zero, so after layer 1 it is beta * A_class: eq. 6 applied
  uniformly from the first layer; only its ranking matters for the selection);
- after each pruning layer (:meth:`MPEEExecutor.after_step`, so after the exit decision,
  which reads only [CLS], and on the surviving rows only), :func:`eekernels.ops.mpee_prune`
  keeps [CLS] and the top ``ceil(keep_ratio * n)`` valid tokens by memory (eq. 7) and
  fuses the rest into one fusion token weighted by their raw class attention (eq. 8), in
  one fused op per backend. The sequence shrinks for the following layers (128 -> 91 ->
  65 -> 47 for keep_ratio 0.7); the fusion token's memory is the sum of the fused tokens';
- later layers run whole, on the shrunk sequence.

Host synchronisation: one read of whether ``attention_mask`` has padding at the start,
then the loop's survivor count per exit layer. ``mpee_prune`` never syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import backends
from ..ops import mpee_prune
from ..ops.tokens import mpee_kept_width
from .executors import PartsExecutor

__all__ = ["MPEEExecutor", "TokenPruning", "class_attention_memory"]


@dataclass(frozen=True)
class TokenPruning:
    """MPEE's token-wise exit settings.

    Attributes:
        prune_layers: 1-based layers after which tokens are pruned (the public MPEE code:
            4, 7, 10 of 12). A layer >= the model's depth never prunes (nothing follows it).
        keep_ratio: fraction of the valid non-[CLS] tokens kept, in (0, 1] (1 - R_ee of
            mpee.txt eq. 7); 1.0 keeps every token (the fusion slot stays empty).
        beta: class-attention memory weight of eq. 6, in [0, 1].
    """

    prune_layers: Tuple[int, ...] = (4, 7, 10)
    keep_ratio: float = 0.7
    beta: float = 0.5

    def __post_init__(self):
        layers = tuple(sorted(set(int(p) for p in self.prune_layers)))
        if any(p < 1 for p in layers):
            raise ValueError(f"TokenPruning: prune_layers must be 1-based layers >= 1, got {self.prune_layers}")
        if isinstance(self.keep_ratio, bool) or not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"TokenPruning: keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not (0.0 <= float(self.beta) <= 1.0):
            raise ValueError(f"TokenPruning: beta must be in [0, 1], got {self.beta}")
        object.__setattr__(self, "prune_layers", layers)
        object.__setattr__(self, "keep_ratio", float(self.keep_ratio))
        object.__setattr__(self, "beta", float(self.beta))

    def active_layers(self, num_layers: int) -> Tuple[int, ...]:
        """The pruning layers that prune in a ``num_layers``-layer model (those < num_layers)."""
        return tuple(p for p in self.prune_layers if p < num_layers)

    def widths(self, seq_len: int, num_layers: int) -> List[int]:
        """Padded sequence width entering each layer for an input of width ``seq_len``."""
        out, s = [], seq_len
        prune = set(self.active_layers(num_layers))
        for layer in range(1, num_layers + 1):
            out.append(s)
            if layer in prune:
                s = mpee_kept_width(s, self.keep_ratio)
        return out


def class_attention_memory(prev: Optional[torch.Tensor], attention: torch.Tensor, beta: float) -> torch.Tensor:
    """mpee.txt eq. 6: ``(1 - beta) * prev + beta * attention``; ``prev`` None means zero."""
    if prev is None:
        return beta * attention
    return (1.0 - beta) * prev + beta * attention


def _token_backend(backend: Optional[str], device: torch.device) -> Optional[str]:
    """``backend`` if it implements mpee_prune here, else None (automatic choice)."""
    if backend is None:
        return None
    try:
        backends.resolve(backend, device, op="mpee_prune")
        return backend
    except backends.BackendUnavailableError:
        return None


class MPEEExecutor(PartsExecutor):
    """:class:`~eekernels.engine.executors.PartsExecutor` with MPEE's token-wise exit.

    Per-row tensors it adds to the rows: ``amem`` (A_m, float32 [N, S]) and ``a_cls``
    (A_class of the last layer). Reports ``widths`` (padded width entering each layer)
    and ``tokens_run`` (row-tokens computed over all layers) in the output's extras.
    """

    name = "mpee"

    def __init__(self, adapter, pruning: TokenPruning, parts=None):
        super().__init__(adapter, parts)
        self.pruning = pruning
        self.prune = set(pruning.active_layers(adapter.num_layers))
        self.last_memory_layer = max(self.prune) if self.prune else 0  # class attention is needed up to here

    def start(self, input_ids, attention_mask, token_type_ids):
        rows = super().start(input_ids, attention_mask, token_type_ids)
        # dense: every slot of every row is a real token, so attention needs no mask (tracked
        # on the host: after a prune the rows stay dense iff every row fused a token)
        if "valid" in rows.tensors and bool(rows.tensors["valid"].all()):
            del rows.tensors["valid"]
        rows.context.update(widths=[], tokens_run=0)
        return rows

    def layer(self, step, rows):
        width = rows.hidden.shape[1]
        rows.context["widths"].append(width)
        rows.context["tokens_run"] += rows.count * width
        p = self.parts[step - 1]
        if step > self.last_memory_layer:
            rows.hidden = p(rows.hidden, rows.valid)
            return
        k, v = p.keys_values(rows.hidden)
        q = p.queries(rows.hidden)
        ctx = p.attention(q, k, v, rows.valid)
        a_cls = p.class_attention(q[:, :, :1], k, rows.valid)  # eq. 5
        rows.tensors["amem"] = class_attention_memory(rows.tensors.get("amem"), a_cls, self.pruning.beta)  # eq. 6
        rows.tensors["a_cls"] = a_cls
        rows.hidden = p.output(ctx, rows.hidden)

    def after_step(self, step, rows):
        if step not in self.prune:
            return
        width = rows.hidden.shape[1]
        dense = "valid" not in rows.tensors
        valid = rows.valid if not dense else torch.ones(rows.hidden.shape[:2], dtype=torch.bool,
                                                        device=rows.hidden.device)
        backend = _token_backend(rows.context.get("backend"), rows.hidden.device)
        pr = mpee_prune(rows.hidden, valid, rows.tensors["amem"], rows.tensors["a_cls"], self.pruning.keep_ratio,
                        backend=backend)  # eq. 7-8
        rows.hidden, rows.tensors["amem"] = pr.hidden, pr.memory
        rows.tensors.pop("a_cls")
        rows.tensors.pop("ends", None)  # tokens moved: the padding no longer starts where it did
        if step == self.last_memory_layer:  # no later layer reads the memory
            rows.tensors.pop("amem")
        if dense and (mpee_kept_width(width, self.pruning.keep_ratio) - 2) < width - 1:
            rows.tensors.pop("valid", None)  # every row fused a token: still no padding
        else:
            rows.tensors["valid"] = pr.valid

    def extras(self, rows):
        return {"widths": list(rows.context["widths"]), "tokens_run": int(rows.context["tokens_run"])}
