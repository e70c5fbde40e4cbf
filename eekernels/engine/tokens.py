"""Token-level early exit through an encoder: each token runs layers 1..e(token), then keeps
its state, which later layers still use as keys and values (HashEE, hashee.txt A.4 eq. 1-5).

Two implementations of the same math:

- :func:`token_exit_masked`, the reference and the training path: every layer runs on
  every token (full compute, differentiable); after layer l the states of the tokens that
  exited before l are put back (``Copy`` of eq. 5).
- :class:`TokenExitExecutor`, inference on the layer loop: per layer, keys and values come
  from all tokens, while queries, attention output and FFN run on the active tokens only,
  and the results are written back.

:class:`TokenExitExecutor` has two layouts:

- ``"sorted"`` (default): the exit layers are known before the first layer runs, so the
  tokens of each sample are permuted once by exit layer (latest first, padding last). The
  tokens still active at layer l are then a prefix of every sample: the layer's queries
  are the slice ``h[:, :M_l]`` (M_l = largest active count of a sample), keys/values the
  slice ``h[:, :max_len]``. No gather or scatter per layer; one permutation at the start,
  its inverse at the end; one host synchronisation in all (the per-layer sizes). Attention
  is invariant to permuting keys, so this is the same math.
- ``"pack"``: per layer, :func:`eekernels.ops.pack_tokens_padded` gathers the active
  tokens and :func:`eekernels.ops.scatter_tokens` writes them back (one sync per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..ops import pack_tokens_padded, scatter_tokens
from .executors import PartsExecutor
from .rows import Rows

__all__ = ["LAYOUTS", "TokenExitExecutor", "TokenExitPlan", "active_token_counts", "plan_token_exit",
           "token_exit_masked"]

LAYOUTS = ("sorted", "pack")


def _check_inputs(hidden: torch.Tensor, token_exit: torch.Tensor, valid: Optional[torch.Tensor], op: str):
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be [B, S, H], got {tuple(hidden.shape)}")
    if token_exit.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: token_exit must be [B, S] = {tuple(hidden.shape[:2])}, got {tuple(token_exit.shape)}")
    if token_exit.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: token_exit must hold integer (1-based) layers, got {token_exit.dtype}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != hidden.shape[:2]):
        raise ValueError(f"{op}: valid must be bool [B, S] = {tuple(hidden.shape[:2])}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")


def active_token_counts(token_exit: torch.Tensor, valid: Optional[torch.Tensor], num_layers: int) -> torch.Tensor:
    """int64 [B, L]: m_b(l), the real tokens of sample b that compute layer l (exit >= l)."""
    layers = torch.arange(1, num_layers + 1, device=token_exit.device)
    act = token_exit[:, None, :] >= layers[None, :, None]  # [B, L, S]
    if valid is not None:
        act = act & valid[:, None, :]
    return act.sum(dim=-1)


def token_exit_masked(layers: Sequence[Callable[[torch.Tensor], torch.Tensor]], hidden: torch.Tensor,
                      token_exit: torch.Tensor) -> torch.Tensor:
    """Reference / training form: full compute, exited tokens copied forward (eq. 5).

    Args:
        layers: layer l (0-based list) as ``f(hidden [B, S, H]) -> [B, S, H]`` with its own
            attention mask bound (e.g. the HF layer module).
        hidden: [B, S, H] layer-1 input (embeddings).
        token_exit: int [B, S], each token's 1-based exit layer.

    Returns [B, S, H]: token (b, s) holds its state after layer ``token_exit[b, s]``.
    Differentiable; gradients of exited tokens flow through the copies.
    """
    _check_inputs(hidden, token_exit, None, "token_exit_masked")
    h = hidden
    for i, f in enumerate(layers):
        active = (token_exit >= i + 1)[..., None]
        h = torch.where(active, f(h), h)
    return h


@dataclass
class TokenExitPlan:
    """Everything the sorted layout needs, computed once before the first layer.

    Attributes:
        order: int64 [B, S], slot k of sample b holds input position ``order[b, k]``
            (exit layer descending, padding last, ties in position order).
        counts: int64 [B, L] active tokens per sample and layer (on the device).
        max_active: M_l per layer (host ints): the query width of layer l.
        min_active: the smallest count per layer (host ints): M_l == min means no slot to mask.
        key_len: the longest real length (host int); keys/values use slots [0, key_len).
        key_valid: bool [B, key_len] over the sorted slots, or None when no padding is left.
    """

    order: torch.Tensor
    counts: torch.Tensor
    max_active: List[int]
    min_active: List[int]
    key_len: int
    key_valid: Optional[torch.Tensor]


def plan_token_exit(token_exit: torch.Tensor, valid: Optional[torch.Tensor], num_layers: int) -> TokenExitPlan:
    """The sorted layout's plan (one device->host read for all layers)."""
    b, s = token_exit.shape
    if valid is None:
        valid = torch.ones(b, s, dtype=torch.bool, device=token_exit.device)
    key = torch.where(valid, token_exit.long(), torch.zeros((), dtype=torch.long, device=token_exit.device))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    counts = active_token_counts(token_exit, valid, num_layers)
    lengths = valid.sum(dim=1)
    host = torch.cat([counts.max(dim=0).values, counts.min(dim=0).values,
                      lengths.max()[None], lengths.min()[None]]).tolist() if b else [0] * (2 * num_layers + 2)
    key_len, min_len = host[2 * num_layers], host[2 * num_layers + 1]
    key_valid = None
    if min_len < key_len:  # some padding remains inside [0, key_len): mask it
        key_valid = torch.arange(key_len, device=token_exit.device)[None, :] < lengths[:, None]
    return TokenExitPlan(order, counts, host[:num_layers], host[num_layers:2 * num_layers], key_len, key_valid)


class TokenExitExecutor(PartsExecutor):
    """Token-level exit as a layer executor: per layer, keys and values come from all tokens
    (eq. 1, ``H^l W_K``, ``H^l W_V``), while queries, attention output and FFN run on the
    tokens still active (eq. 1-4 with ``h^l``), and exited tokens keep their state (eq. 5).

    Args:
        adapter: the encoder's adapter.
        token_exit: ``f(input_ids) -> int [B, S]``, each token's 1-based exit layer (values
            beyond the depth mean full depth).
        layout: "sorted" (default: tokens permuted once by exit layer, no per-layer gather or
            scatter) or "pack" (:func:`eekernels.ops.pack_tokens_padded` /
            :func:`eekernels.ops.scatter_tokens` per layer, one sync per layer).
        parts: the encoder's :class:`~eekernels.hf.layer_parts.LayerParts` (default: built).

    After the last layer the states are back in input order. Reports ``active_tokens``
    (int64 [B, L], the real tokens of each sample computing each layer) in the extras.
    No sample leaves early: the rows are never compacted while tokens are permuted.
    """

    name = "tokens"

    def __init__(self, adapter, token_exit: Callable[[torch.Tensor], torch.Tensor], layout: str = "sorted",
                 parts=None):
        if layout not in LAYOUTS:
            raise ValueError(f"token exit: layout must be one of {LAYOUTS}, got {layout!r}")
        super().__init__(adapter, parts)
        self.token_exit, self.layout = token_exit, layout

    def start(self, input_ids, attention_mask, token_type_ids):
        token_exit = self.token_exit(input_ids)  # first: it checks the ids against the table
        rows = super().start(input_ids, attention_mask, token_type_ids)
        rows.tensors["input_ids"] = input_ids
        if attention_mask is not None:
            rows.tensors["attention_mask"] = attention_mask
        self.begin(rows, token_exit)
        return rows

    def begin(self, rows: Rows, token_exit: torch.Tensor) -> None:
        """Set up the token exit of ``rows`` (embedded) for ``token_exit`` [B, S]."""
        _check_inputs(rows.hidden, token_exit, rows.valid, "token exit")
        b, s, hdim = rows.hidden.shape
        rows.context["token_exit"] = token_exit
        rows.context["active_tokens"] = active_token_counts(token_exit, rows.valid, self.num_layers)
        if self.layout == "sorted":
            plan = plan_token_exit(token_exit, rows.valid, self.num_layers)
            rows.context["plan"] = plan
            rows.context["slots"] = torch.arange(max(plan.max_active + [0]), device=rows.hidden.device)
            rows.hidden = torch.gather(rows.hidden, 1, plan.order[..., None].expand(b, s, hdim))  # slot order
        else:
            valid = rows.valid
            rows.context["kv_valid"] = None if valid is None or bool(valid.all()) else valid
            rows.hidden = rows.hidden.contiguous().clone()

    def layer(self, step, rows):
        p, i = self.parts[step - 1], step - 1
        h = rows.hidden
        if self.layout == "pack":
            active = rows.context["token_exit"] >= step
            if rows.valid is not None:
                active = active & rows.valid
            packed = pack_tokens_padded(h, active, backend=rows.context.get("backend"))
            if packed.values.shape[1]:  # else no token computes this layer (nor any later one)
                k, v = p.keys_values(h)  # eq. 1: K, V from every token's current state
                out = p.output(p.attention(p.queries(packed.values), k, v, rows.context["kv_valid"]),
                               packed.values)  # eq. 1-4
                scatter_tokens(h, packed.index, out.contiguous(), backend=rows.context.get("backend"))  # eq. 5
            return
        plan = rows.context["plan"]
        m = plan.max_active[i]
        if m > 0:  # active sets shrink with depth: once empty, nothing computes
            x_q = h[:, :m]  # active tokens are each sample's first counts[b, i] slots
            k, v = p.keys_values(h[:, :plan.key_len])  # eq. 1: keys/values of every real token
            out = p.output(p.attention(p.queries(x_q), k, v, plan.key_valid), x_q)  # eq. 1-4
            if plan.min_active[i] == m:
                h[:, :m] = out  # every slot < m is active in every sample
            else:  # eq. 5: slots past a sample's own count keep their (exited) state
                keep = (rows.context["slots"][:m][None, :] < plan.counts[:, i, None])[..., None]
                h[:, :m] = torch.where(keep, out, x_q)
        if step == self.num_layers:  # back to input order for the model's head
            result = torch.empty_like(h)
            result.scatter_(1, plan.order[..., None].expand_as(h), h)
            rows.hidden = result

    def extras(self, rows):
        return {"active_tokens": rows.context["active_tokens"].cpu()}
