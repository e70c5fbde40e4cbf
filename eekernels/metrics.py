"""Speed-up metrics of early exit.

- :func:`layer_speedup`: past-future.txt eq. 15, ``sum_i n*m_i / sum_i i*m_i`` with m_i
  the number of samples exiting at layer i of an n-layer model.
- :func:`encoder_layer_flops` / :func:`flops_speedup`: FLOPs of the full model over FLOPs
  executed, counted per sample with its own (unpadded) length (mpee.txt eq. 15).
- :func:`mpee_token_counts` / :func:`flops_speedup_tokens`: the same when the sequence
  shrinks layer by layer (MPEE's token-wise exit).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["encoder_layer_flops", "exit_head_flops", "flops_speedup", "flops_speedup_tokens", "layer_speedup",
           "mpee_token_counts"]


def layer_speedup(exit_layer: torch.Tensor, num_layers: int) -> float:
    """Layer speed-up (past-future.txt eq. 15) of 1-based exit layers over ``num_layers``."""
    exit_layer = torch.as_tensor(exit_layer)
    if exit_layer.numel() == 0:
        raise ValueError("layer_speedup: no samples")
    if int(exit_layer.min()) < 1 or int(exit_layer.max()) > num_layers:
        raise ValueError(f"layer_speedup: exit layers must be in [1, {num_layers}]")
    return float(num_layers * exit_layer.numel() / exit_layer.double().sum())


def encoder_layer_flops(seq_len: torch.Tensor, hidden: int, intermediate: int) -> torch.Tensor:
    """FLOPs (2 per multiply-add) of one transformer encoder layer per sample of ``seq_len`` tokens:
    Q/K/V/output projections 8·S·H², the FFN 4·S·H·I, attention scores and weighted sum 4·S²·H."""
    s = torch.as_tensor(seq_len, dtype=torch.float64)
    return 8 * s * hidden**2 + 4 * s * hidden * intermediate + 4 * s**2 * hidden


def exit_head_flops(hidden: int, num_labels: int, pooler: bool = True) -> int:
    """FLOPs of one exit head on one sample (pooler dense + classifier)."""
    return (2 * hidden * hidden if pooler else 0) + 2 * hidden * num_labels


def flops_speedup(exit_layer: torch.Tensor, seq_len: torch.Tensor, num_layers: int, hidden: int,
                  intermediate: int, num_labels: int, exit_layers: Optional[list] = None,
                  pooler: bool = True) -> float:
    """Full-model FLOPs over executed FLOPs, per sample with its own length.

    The full model runs ``num_layers`` layers and one head; an early-exit sample runs layers
    1..e and the exit heads at every exit layer <= e (``exit_layers``, default all layers).
    """
    e = torch.as_tensor(exit_layer, dtype=torch.float64)
    per_layer = encoder_layer_flops(seq_len, hidden, intermediate)
    head = exit_head_flops(hidden, num_labels, pooler)
    exits = torch.tensor(sorted(exit_layers) if exit_layers else list(range(1, num_layers + 1)), dtype=torch.float64)
    heads_run = (exits[None, :] <= e[:, None]).sum(dim=1)
    full = (num_layers * per_layer + head).sum()
    run = (e * per_layer + heads_run * head).sum()
    return float(full / run)


def mpee_token_counts(seq_len: torch.Tensor, num_layers: int, prune_layers, keep_ratio: float) -> torch.Tensor:
    """Tokens each layer computes on, per sample, under MPEE's token-wise exit (mpee.txt eq. 7-8).

    A sample with n valid tokens ([CLS] included) that is pruned after a layer keeps [CLS],
    ceil(keep_ratio * (n-1)) tokens and one fusion token when at least one token was fused
    (the per-sample rule of :func:`eekernels.ops.mpee_prune`). Returns int64 [B, num_layers]:
    entry [b, l-1] is the token count entering layer l.
    """
    from .ops.tokens import mpee_kept_width

    n = torch.as_tensor(seq_len, dtype=torch.int64).clone()
    out = torch.empty(n.shape[0], num_layers, dtype=torch.int64)
    prune = set(int(p) for p in prune_layers)
    for layer in range(1, num_layers + 1):
        out[:, layer - 1] = n
        if layer in prune and layer < num_layers:
            kept = torch.tensor([mpee_kept_width(int(v), keep_ratio) - 2 for v in n.tolist()], dtype=torch.int64)
            fused = (n - 1 - kept) > 0
            n = 1 + kept + fused.long()
    return out


def flops_speedup_tokens(exit_layer: torch.Tensor, tokens: torch.Tensor, full_seq_len: torch.Tensor,
                         hidden: int, intermediate: int, num_labels: int, exit_layers: Optional[list] = None,
                         pooler: bool = True, extra_flops: Optional[torch.Tensor] = None) -> float:
    """FLOPs speed-up (mpee.txt eq. 15 as full / executed) when the token count changes by layer.

    Args:
        exit_layer: int [B], 1-based exit layer of each sample.
        tokens: int [B, L], tokens entering each layer per sample (e.g. :func:`mpee_token_counts`).
        full_seq_len: int [B], each sample's length in the full model (every layer).
        exit_layers: the layers with an exit head (default all).
        extra_flops: optional float [B, L] of per-layer FLOPs beyond the encoder layer
            (e.g. class attention and token fusion), counted for the layers a sample ran.
    """
    e = torch.as_tensor(exit_layer, dtype=torch.int64)
    tok = torch.as_tensor(tokens, dtype=torch.float64)
    b, n_layers = tok.shape
    ran = torch.arange(1, n_layers + 1)[None, :] <= e[:, None]  # [B, L]
    per = encoder_layer_flops(tok, hidden, intermediate)
    if extra_flops is not None:
        per = per + torch.as_tensor(extra_flops, dtype=torch.float64)
    head = exit_head_flops(hidden, num_labels, pooler)
    exits = torch.tensor(sorted(exit_layers) if exit_layers else list(range(1, n_layers + 1)), dtype=torch.int64)
    heads_run = (exits[None, :] <= e[:, None]).sum(dim=1).double()
    full = (n_layers * encoder_layer_flops(full_seq_len, hidden, intermediate) + head).sum()
    run = ((per * ran).sum(dim=1) + heads_run * head).sum()
    return float(full / run)
