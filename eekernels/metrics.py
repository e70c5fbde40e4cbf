"""Speed-up metrics of early exit.

- :func:`layer_speedup`: past-future.txt eq. 15, ``sum_i n*m_i / sum_i i*m_i`` with m_i
  the number of samples exiting at layer i of an n-layer model.
- :func:`encoder_layer_flops` / :func:`flops_speedup`: FLOPs of the full model over FLOPs
  executed, counted per sample with its own (unpadded) length (mpee.txt eq. 15).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["encoder_layer_flops", "exit_head_flops", "flops_speedup", "layer_speedup"]


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


# ------------------------------------------------------------------ token-level exit (HashEE)


def token_exit_layer_macs(n: torch.Tensor, m: torch.Tensor, hidden: int, intermediate: int,
                          heads: int) -> torch.Tensor:
    """MACs of one encoder layer on a sample of ``n`` tokens of which ``m`` compute (hashee.txt A.4).

    The full layer (m = n): Q/K/V projections 3·n·d², attention 2·n²·(h + d) (scores and
    weighted sum 2·n²·d, plus n²·h each for scaling and softmax, as Table 10 counts it),
    output projection n·d², FFN 2·n·d·d_ff, two LayerNorms 2·n·d each. Table 10's savings
    are subtracted: (n-m)·d² (queries), 2·n·(n-m)·(h+d), (n-m)·d² (output projection),
    2·(n-m)·d per LayerNorm, 2·(n-m)·d·d_ff (FFN). Keys and values always run on all n.
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    m = torch.as_tensor(m, dtype=torch.float64)
    d, dff, h = float(hidden), float(intermediate), float(heads)
    full = 4 * n * d**2 + 2 * n**2 * (h + d) + 2 * n * d * dff + 4 * n * d
    saved = 2 * (n - m) * d**2 + 2 * n * (n - m) * (h + d) + 2 * (n - m) * d * dff + 4 * (n - m) * d
    return full - saved


def token_exit_flops_speedup(active_counts: torch.Tensor, seq_len: torch.Tensor, hidden: int, intermediate: int,
                             heads: int) -> torch.Tensor:
    """Per-sample FLOPs speed-up of token-level exit (hashee.txt Table 10; FLOPs = 2·MACs).

    Args:
        active_counts: [B, L], m_b(l): the tokens of sample b computing layer l.
        seq_len: [B], each sample's real length n_b.

    Returns float64 [B]: L·FLOPs(n_b, n_b) / sum_l FLOPs(n_b, m_b(l)). Embeddings and the
    classifier head are the same in both and left out (HashEE has no internal classifiers).
    """
    m = torch.as_tensor(active_counts, dtype=torch.float64).cpu()
    n = torch.as_tensor(seq_len, dtype=torch.float64).cpu()
    if m.dim() != 2 or n.shape != m.shape[:1]:
        raise ValueError(f"token_exit_flops_speedup: active_counts [B, L] and seq_len [B], got "
                         f"{tuple(m.shape)} and {tuple(n.shape)}")
    if bool((m > n[:, None]).any()) or bool((m < 0).any()):
        raise ValueError("token_exit_flops_speedup: active counts must be in [0, seq_len]")
    run = token_exit_layer_macs(n[:, None], m, hidden, intermediate, heads).sum(dim=1)
    full = m.shape[1] * token_exit_layer_macs(n, n, hidden, intermediate, heads)
    return full / run


def token_exit_flops_speedup_total(active_counts: torch.Tensor, seq_len: torch.Tensor, hidden: int,
                                   intermediate: int, heads: int) -> float:
    """Batch FLOPs speed-up of token-level exit: total full FLOPs over total executed FLOPs."""
    m = torch.as_tensor(active_counts, dtype=torch.float64).cpu()
    n = torch.as_tensor(seq_len, dtype=torch.float64).cpu()
    run = token_exit_layer_macs(n[:, None], m, hidden, intermediate, heads).sum()
    full = m.shape[1] * token_exit_layer_macs(n, n, hidden, intermediate, heads).sum()
    return float(full / run)


__all__ += ["token_exit_flops_speedup", "token_exit_flops_speedup_total", "token_exit_layer_macs"]
