"""Batched early exit with class-attention token pruning (MPEE's two perspectives at once).

The row side is the batched engine's (:mod:`eekernels.engine.batched`): after each exit
layer an :class:`~eekernels.engine.batched.ExitRule` decides, exited rows' results are
scattered to their batch positions and the survivors are compacted. The token side is
MPEE's token-wise exit (mpee.txt eq. 5-8), run on the surviving rows:

- every layer up to the last pruning layer is run in pieces
  (:class:`~eekernels.models.layer_parts.LayerParts`) so that the class attention
  ``A_class`` (eq. 5: the head mean of the [CLS] row of the attention probabilities)
  comes out of it, and the class-attention memory is updated (eq. 6)::

      A_m = (1 - beta) * A_m_prev + beta * A_class,   A_m_prev = 0 before layer 1

  (the memory starts at zero, so after layer 1 it is beta * A_class: eq. 6 applied
  uniformly from the first layer; only its ranking matters for the selection);
- after each pruning layer, :func:`eekernels.ops.mpee_prune` keeps [CLS] and the top
  ``ceil(keep_ratio * n)`` valid tokens by memory (eq. 7) and fuses the rest into one
  fusion token weighted by their raw class attention (eq. 8), in one fused op per
  backend. The sequence shrinks for the following layers (128 -> 91 -> 65 -> 47 for
  keep_ratio 0.7); the fusion token's memory is the sum of the fused tokens' memories;
- later layers run whole, on the shrunk sequence.

At a layer that both prunes and exits, the exit decision comes first (it reads only
[CLS], which pruning never changes), so only the surviving rows are pruned.

Host synchronisation: one read of whether ``attention_mask`` has padding at the start,
then one survivor count per exit layer (``compact_rows``). ``mpee_prune`` never syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .. import backends, metrics
from ..ops import mpee_prune, scatter_exits
from ..ops.tokens import mpee_kept_width
from .batched import EarlyExitOutput, ExitRule, check_inputs, compact_named, leave_mask

__all__ = ["TokenExitOutput", "TokenPruning", "class_attention_memory", "token_pruning_forward"]


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


@dataclass
class TokenExitOutput(EarlyExitOutput):
    """:class:`~eekernels.engine.batched.EarlyExitOutput` plus the token side.

    Attributes:
        widths: padded sequence width entering each layer (the batch's shape, not a
            sample's valid count).
        tokens_run: row-tokens actually computed, summed over layers (padded widths).
    """

    widths: List[int] = field(default_factory=list)
    tokens_run: int = 0


def _token_backend(backend: Optional[str], device: torch.device) -> Optional[str]:
    """``backend`` if it implements mpee_prune here, else None (automatic choice)."""
    if backend is None:
        return None
    try:
        backends.resolve(backend, device, op="mpee_prune")
        return backend
    except backends.BackendUnavailableError:
        return None


def token_pruning_forward(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          token_type_ids: Optional[torch.Tensor] = None, *, rule: ExitRule,
                          pruning: TokenPruning, backend: Optional[str] = None,
                          exit_profile: Optional[torch.Tensor] = None, parts: Optional[Sequence] = None
                          ) -> TokenExitOutput:
    """Batched early exit with MPEE token pruning (see the module docstring).

    Args:
        model: an early-exit model with ``adapter``, ``config``, ``num_layers``,
            ``num_labels`` and ``exit_layers`` (e.g. :class:`eekernels.methods.mpee.MPEEModel`).
        input_ids: int64 [B, S]; attention_mask [B, S] (1 = token) or None; token_type_ids or None.
        rule: the layer-wise exit rule (decides on the active rows' [CLS] states).
        pruning: :class:`TokenPruning`.
        backend: the ops' backend (default automatic); ``mpee_prune`` uses it when it has an
            implementation there, else the automatic choice.
        exit_profile: for benchmarks, int [B] of 1-based layers: row i exits at the first exit
            layer >= exit_profile[i]; the exit rule still runs, only its decision is replaced.
        parts: the model's :class:`LayerParts` per layer (default: built from the adapter).

    Returns:
        :class:`TokenExitOutput`; ``flops_speedup`` counts each sample's shrinking sequence
        (mpee.txt eq. 15), its exit heads, class attention and fusion.
    """
    from ..models.layer_parts import layer_parts

    b, s = check_inputs(model, input_ids, attention_mask, exit_profile)
    dev = input_ids.device
    n_layers, c = model.num_layers, model.num_labels
    exit_layers = set(model.exit_layers)
    prune = set(pruning.active_layers(n_layers))
    last_memory_layer = max(prune) if prune else 0  # class attention is needed up to here
    if parts is None:
        parts = [layer_parts(model.adapter, i) for i in range(n_layers)]
    tok_backend = _token_backend(backend, dev)
    beta, keep = pruning.beta, pruning.keep_ratio
    widths: List[int] = []
    layers_run = tokens_run = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = model.adapter.embed(input_ids, token_type_ids)
            # dense: every slot of every row is a real token, so attention needs no mask
            # (tracked on the host: after a prune the rows stay dense iff every row fused a token).
            dense = attention_mask is None or bool(attention_mask.all())
            valid = None if dense else attention_mask.to(torch.bool)
            amem = None  # class-attention memory A_m [N, S], float32
            out_logits = torch.empty(b, c, dtype=torch.float32, device=dev)
            out_layer = torch.zeros(b, dtype=torch.int64, device=dev)
            batch_index = torch.arange(b, device=dev)
            state = rule.initial_state(b, dev)
            forced = None if exit_profile is None else exit_profile.to(device=dev, dtype=torch.int64)
            for i in range(n_layers):
                layer = i + 1
                n_rows, width = hidden.shape[0], hidden.shape[1]
                widths.append(width)
                layers_run += n_rows
                tokens_run += n_rows * width
                p = parts[i]
                a_cls = None
                if layer <= last_memory_layer:
                    k, v = p.keys_values(hidden)
                    q = p.queries(hidden)
                    ctx = p.attention(q, k, v, valid)
                    a_cls = p.class_attention(q[:, :, :1], k, valid)  # eq. 5
                    amem = class_attention_memory(amem, a_cls, beta)  # eq. 6
                    hidden = p.output(ctx, hidden)
                else:
                    hidden = p(hidden, valid)
                last = layer == n_layers
                if layer in exit_layers or last:
                    out = rule.decide(layer, hidden, state)
                    exit_mask = leave_mask(out.exit, layer, last, forced)
                    scatter_exits(out_logits, out_layer, batch_index, exit_mask, out.logits, layer, backend=backend)
                    if last:
                        break
                    rows = {"hidden": hidden, "batch_index": batch_index}
                    if valid is not None:
                        rows["valid"] = valid
                    if layer < last_memory_layer or layer in prune:
                        rows["amem"] = amem
                    if layer in prune:
                        rows["a_cls"] = a_cls
                    if forced is not None:
                        rows["forced"] = forced
                    kept = compact_named(~exit_mask, rows, out.state, backend)
                    if kept is None:
                        break
                    rows, state = kept
                    hidden, batch_index = rows["hidden"], rows["batch_index"]
                    valid = rows.get("valid")
                    amem, a_cls = rows.get("amem"), rows.get("a_cls")
                    forced = rows.get("forced")
                else:
                    state = rule.observe(layer, hidden, state)
                if layer in prune:
                    n_tok = width - 1  # non-[CLS] slots (all valid when dense)
                    if valid is None:
                        valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=dev)
                    pr = mpee_prune(hidden, valid, amem, a_cls, keep, backend=tok_backend)  # eq. 7-8
                    hidden, valid, amem = pr.hidden, pr.valid, pr.memory
                    dense = dense and (mpee_kept_width(width, keep) - 2) < n_tok
                    if dense:
                        valid = None
    finally:
        model.train(was_training)

    cfg = model.config
    seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
    el = out_layer.cpu()
    tokens = metrics.mpee_token_counts(seq_len, n_layers, prune, keep)
    hsz = cfg.hidden_size
    layer_ids = torch.arange(1, n_layers + 1)
    # class attention (q_cls . k, 2*n*H) up to the last pruning layer, fusion (2*n*H) at pruning layers
    extra = 2.0 * tokens.double() * hsz * ((layer_ids <= last_memory_layer).double()
                                            + torch.tensor([float(l in prune) for l in layer_ids.tolist()]))
    flops = metrics.flops_speedup_tokens(el, tokens, seq_len, hsz, cfg.intermediate_size, c,
                                         sorted(exit_layers | {n_layers}), extra_flops=extra)
    return TokenExitOutput(
        logits=out_logits,
        exit_layer=out_layer,
        pred=out_logits.argmax(dim=1),
        layer_speedup=metrics.layer_speedup(el, n_layers),
        flops_speedup=flops,
        layers_run=layers_run,
        widths=widths,
        tokens_run=tokens_run,
    )
