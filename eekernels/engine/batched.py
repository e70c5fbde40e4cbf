"""Batched early-exit inference over an HF encoder, layer by layer, on the rows still active.

After each exit layer the fused exit head decides which rows leave; their logits and exit
layer are scattered to their batch positions, and the survivors (hidden states, attention
mask, batch positions, patience state) are compacted so that the next layer computes on
them alone. At the last layer every remaining row exits with the model's own head.

Host synchronisation: one device->host read of the survivor count per exit layer (inside
``compact_rows``, to size the compacted tensors). No boolean-mask indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import metrics
from ..ops import compact_rows, exit_head, scatter_exits


@dataclass
class EarlyExitOutput:
    """Per-sample results of batched early-exit inference over B samples.

    Attributes:
        logits: float32 [B, C], each sample's logits at its exit layer.
        exit_layer: int64 [B], 1-based layer at which each sample exited.
        pred: int64 [B], argmax of ``logits``.
        layer_speedup: past-future.txt eq. 15 over this batch.
        flops_speedup: full-model FLOPs over executed FLOPs (per-sample lengths).
        layers_run: row-layers actually computed (sum of exit layers).
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    pred: torch.Tensor
    layer_speedup: float
    flops_speedup: float
    layers_run: int


def early_exit_forward(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       token_type_ids: Optional[torch.Tensor] = None, *, criterion: str = "entropy",
                       threshold: float = 0.0, backend: Optional[str] = None,
                       exit_profile: Optional[torch.Tensor] = None) -> EarlyExitOutput:
    """Run ``model`` (an :class:`~eekernels.models.EarlyExitModel`) with early exit.

    Args:
        input_ids: int64 [B, S].
        attention_mask: [B, S] (1 = token, 0 = padding) or None.
        token_type_ids: [B, S] or None.
        criterion, threshold: the exit rule (see :func:`eekernels.ops.exit_head`): entropy
            (DeeBERT), max_prob (Right-Tool) or patience (PABEE, threshold = patience).
        backend: the ops' backend (default: automatic).
        exit_profile: for benchmarks, int [B] of 1-based layers: row i exits at the first exit
            layer >= exit_profile[i]. The exit head still runs (its cost counts); only its
            decision is replaced, so a controlled exit profile can be timed.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"early_exit: input_ids must be [B, S], got {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and s > max_pos:
        raise ValueError(f"early_exit: sequence length {s} exceeds the model's max_position_embeddings {max_pos}; truncate the input")
    if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
        raise ValueError(f"early_exit: attention_mask must be [{b}, {s}], got {tuple(attention_mask.shape)}")
    if exit_profile is not None and tuple(exit_profile.shape) != (b,):
        raise ValueError(f"early_exit: exit_profile must be [{b}], got {tuple(exit_profile.shape)}")
    dev = input_ids.device
    ad = model.adapter
    n_layers = model.num_layers
    c = model.num_labels
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = ad.embed(input_ids, token_type_ids)
            mask = ad.attention_mask(attention_mask, hidden)
            out_logits = torch.empty(b, c, dtype=torch.float32, device=dev)
            out_layer = torch.zeros(b, dtype=torch.int64, device=dev)
            batch_index = torch.arange(b, device=dev)
            prev_pred = counter = None
            forced = None if exit_profile is None else exit_profile.to(device=dev, dtype=torch.int64)
            layers_run = 0
            for i in range(n_layers):
                layer = i + 1
                layers_run += hidden.shape[0]
                hidden = ad.layer(i)(hidden, mask)
                if layer not in model.exit_layers:
                    continue
                head = model.head(layer)
                last = layer == n_layers
                out = exit_head(
                    hidden[:, 0], head.classifier.weight, head.classifier.bias,
                    pooler_weight=head.pooler.weight, pooler_bias=head.pooler.bias,
                    criterion=criterion, threshold=threshold,
                    prev_pred=prev_pred, counter=counter, backend=backend,
                )
                if last:
                    exit_mask = torch.ones_like(out.exit)  # the last layer takes all
                elif forced is not None:
                    exit_mask = forced <= layer
                else:
                    exit_mask = out.exit
                scatter_exits(out_logits, out_layer, batch_index, exit_mask, out.logits, layer, backend=backend)
                if last:
                    break
                # Everything that follows the rows. HF masks are None (no padding) or per-row
                # [N, 1, q, k]; a broadcast mask (first dim 1 with N > 1) stays as it is.
                rows = {"hidden": hidden, "batch_index": batch_index}
                if mask is not None and mask.shape[0] == hidden.shape[0]:
                    rows["mask"] = mask
                if criterion == "patience":
                    rows["prev_pred"], rows["counter"] = out.pred, out.counter
                if forced is not None:
                    rows["forced"] = forced
                packed = compact_rows(~exit_mask, list(rows.values()), backend=backend)
                if packed.index.numel() == 0:
                    break
                rows = dict(zip(rows, packed.tensors))
                hidden, batch_index = rows["hidden"], rows["batch_index"]
                mask = rows.get("mask", mask)
                prev_pred, counter = rows.get("prev_pred"), rows.get("counter")
                forced = rows.get("forced")
    finally:
        model.train(was_training)
    seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
    cfg = model.config
    el = out_layer.cpu()
    return EarlyExitOutput(
        logits=out_logits,
        exit_layer=out_layer,
        pred=out_logits.argmax(dim=1),
        layer_speedup=metrics.layer_speedup(el, n_layers),
        flops_speedup=metrics.flops_speedup(el, seq_len, n_layers, cfg.hidden_size, cfg.intermediate_size, c,
                                            model.exit_layers),
        layers_run=layers_run,
    )
