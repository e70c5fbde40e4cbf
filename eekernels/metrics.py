"""Speed-up metrics of early exit.

- :func:`layer_speedup`: past-future.txt eq. 15, ``sum_i n*m_i / sum_i i*m_i`` with m_i
  the number of samples exiting at layer i of an n-layer model.
- :func:`encoder_layer_flops` / :func:`flops_speedup`: FLOPs of the full model over FLOPs
  executed, counted per sample with its own (unpadded) length (mpee.txt eq. 15).
- :func:`memorized_layer`: ConsistentEE's hardness of a sample (consistentee.txt eq. 7).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["encoder_layer_flops", "exit_head_flops", "flops_speedup", "layer_speedup", "memorized_layer"]


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


def memorized_layer(pred: torch.Tensor, labels: torch.Tensor, exit_layers, num_layers: int) -> torch.Tensor:
    """Memorized layer of each sample (consistentee.txt eq. 7): the first exit layer k from
    which every exit at or after k predicts the label; ``num_layers`` when the last exit is
    wrong (never memorized).

    Args:
        pred: int [E, B], the prediction of each exit (in the order of ``exit_layers``).
        labels: int [B].
        exit_layers: the E ascending 1-based layers of the exits (the last is ``num_layers``).
        num_layers: L, the backbone's depth.

    Returns:
        int64 [B] with values in [1, L].
    """
    pred = torch.as_tensor(pred)
    labels = torch.as_tensor(labels)
    layers = torch.as_tensor(list(exit_layers), dtype=torch.int64)
    if pred.dim() != 2 or labels.dim() != 1 or pred.shape != (layers.numel(), labels.numel()):
        raise ValueError(f"memorized_layer: pred must be [E, B] = [{layers.numel()}, {labels.numel()}] "
                         f"with labels [B], got pred {tuple(pred.shape)} and labels {tuple(labels.shape)}")
    if layers.numel() == 0 or int(layers[-1]) != num_layers or bool((layers[1:] <= layers[:-1]).any()):
        raise ValueError(f"memorized_layer: exit_layers must ascend and end at num_layers={num_layers}, got {layers.tolist()}")
    correct = pred.to(labels.device) == labels[None, :]
    # suffix[e, b]: exits e..E-1 all correct (a cumulative product from the last exit backwards)
    suffix = correct.flip(0).long().cumprod(dim=0).flip(0).bool()
    first = torch.where(suffix.any(dim=0), suffix.long().argmax(dim=0), torch.full_like(labels, layers.numel() - 1, dtype=torch.int64))
    return layers.to(labels.device)[first]
