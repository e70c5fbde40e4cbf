"""Token-level early exit through an encoder: each token runs layers 1..e(token), then keeps
its state, which later layers still use as keys and values (HashEE, hashee.txt A.4 eq. 1-5).

Two implementations of the same math:

- :func:`token_exit_masked`, the reference and the training path: every layer runs on
  every token (full compute, differentiable); after layer l the states of the tokens that
  exited before l are put back (``Copy`` of eq. 5).
- :func:`token_exit_packed`, inference: per layer, keys and values come from all tokens
  (eq. 1, ``H^l W_K``, ``H^l W_V``), while queries, attention output and FFN run on the
  active tokens only (eq. 1-4 with ``h^l``), and the results are written back (eq. 5).

:func:`token_exit_packed` has two layouts:

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

__all__ = ["LAYOUTS", "TokenExitPlan", "active_token_counts", "plan_token_exit", "token_exit_masked",
           "token_exit_packed"]

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


def token_exit_packed(parts: Sequence, hidden: torch.Tensor, token_exit: torch.Tensor,
                      valid: Optional[torch.Tensor] = None, *, layout: str = "sorted",
                      backend: Optional[str] = None) -> torch.Tensor:
    """Inference with token packing: queries, attention output and FFN on active tokens only.

    Args:
        parts: one :class:`~eekernels.models.layer_parts.LayerParts` per layer.
        hidden: [B, S, H] layer-1 input (embeddings); not modified.
        token_exit: int [B, S] 1-based exit layer of each token (<= len(parts) computes
            that many layers; larger values mean full depth).
        valid: bool [B, S], False for padding (never computed, never a key), or None.
        layout: "sorted" (default, no per-layer gather/scatter) or "pack" (the token ops).
        backend: backend of the token ops (layout "pack").

    Returns [B, S, H] in input order: each real token's state after its exit layer. Padding
    positions hold unspecified values. Run under ``torch.no_grad()`` (the training path is
    :func:`token_exit_masked`).
    """
    _check_inputs(hidden, token_exit, valid, "token_exit_packed")
    if layout not in LAYOUTS:
        raise ValueError(f"token_exit_packed: layout must be one of {LAYOUTS}, got {layout!r}")
    n_layers = len(parts)
    b, s, hdim = hidden.shape
    if layout == "pack":
        h = hidden.contiguous().clone()
        kv_valid = None if valid is None or bool(valid.all()) else valid
        for i, p in enumerate(parts):
            active = token_exit >= i + 1
            if valid is not None:
                active = active & valid
            packed = pack_tokens_padded(h, active, backend=backend)
            if packed.values.shape[1] == 0:
                break  # no token computes this layer (nor any later one)
            k, v = p.keys_values(h)  # eq. 1: K, V from every token's current state
            out = p.output(p.attention(p.queries(packed.values), k, v, kv_valid), packed.values)  # eq. 1-4
            scatter_tokens(h, packed.index, out.contiguous(), backend=backend)  # eq. 5
        return h

    plan = plan_token_exit(token_exit, valid, n_layers)
    idx = plan.order[..., None].expand(b, s, hdim)
    h = torch.gather(hidden, 1, idx)  # slot order: exit layer descending, padding last
    kl = plan.key_len
    slots = torch.arange(max(plan.max_active + [0]), device=hidden.device)
    for i, p in enumerate(parts):
        m = plan.max_active[i]
        if m == 0:
            break  # active sets shrink with depth: nothing computes from here on
        x_q = h[:, :m]  # active tokens are each sample's first counts[b, i] slots
        k, v = p.keys_values(h[:, :kl])  # eq. 1: keys/values of every real token
        out = p.output(p.attention(p.queries(x_q), k, v, plan.key_valid), x_q)  # eq. 1-4
        if plan.min_active[i] == m:
            h[:, :m] = out  # every slot < m is active in every sample
        else:  # eq. 5: slots past a sample's own count keep their (exited) state
            keep = (slots[:m][None, :] < plan.counts[:, i, None])[..., None]
            h[:, :m] = torch.where(keep, out, x_q)
    result = torch.empty_like(h)
    result.scatter_(1, idx, h)  # back to input order
    return result
