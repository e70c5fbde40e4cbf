"""Exit profiles for the benchmarks: which layer each row of a batch leaves after.

Benchmarks time the engine with its decisions replaced by a profile
(``early_exit(..., exit_profile=...)``), so the exits are controlled. Row i of a batch
of B takes the quantile (i + 0.5) / B of the profile's distribution, so every batch size
(B = 1 too) gets the same distribution.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["cascade_exit_profile", "histogram_exit_layers", "load_measured_profile", "profile_exit_layers",
           "stratified_exit_layers"]


def _quantiles(batch: int) -> torch.Tensor:
    return (torch.arange(batch, dtype=torch.float64) + 0.5) / batch


def profile_exit_layers(batch: int, num_layers: int, frac: float) -> torch.Tensor:
    """Exit layers [B] for the profile where ``frac`` of the rows still active exit after each
    layer: (1-frac)^l of the rows survive layer l; survivors exit at the last layer."""
    q = _quantiles(batch)
    layers = torch.full((batch,), num_layers, dtype=torch.long)
    for layer in range(num_layers - 1, 0, -1):
        layers[q < 1 - (1 - frac) ** layer] = layer
    return layers


def histogram_exit_layers(batch: int, num_layers: int, histogram: Dict[int, int], source_layers: int) -> torch.Tensor:
    """Exit layers [B] drawn from a measured exit histogram (layer -> count) of a model with
    ``source_layers`` layers, rescaled to ``num_layers`` by relative depth (layer l of n
    becomes max(1, round(l * num_layers / n)))."""
    return _histogram_at(_quantiles(batch), num_layers, histogram, source_layers)


def _histogram_at(q: torch.Tensor, num_layers: int, histogram: Dict[int, int], source_layers: int) -> torch.Tensor:
    """The exit layer at each quantile ``q`` of a measured histogram, rescaled by depth."""
    if not histogram or sum(histogram.values()) <= 0:
        raise ValueError("histogram_exit_layers: the exit histogram is empty")
    if any(l < 1 or l > source_layers for l in histogram):
        raise ValueError(f"histogram_exit_layers: layers must be in [1, {source_layers}], got {sorted(histogram)}")
    layers = sorted(histogram)
    counts = torch.tensor([histogram[l] for l in layers], dtype=torch.float64)
    cdf = counts.cumsum(0) / counts.sum()
    pick = torch.searchsorted(cdf, q).clamp(max=len(layers) - 1)
    src = torch.tensor(layers, dtype=torch.float64)[pick]
    return (src * num_layers / source_layers).round().clamp(1, num_layers).long()


def stratified_exit_layers(num_rows: int, batch: int, num_layers: int, histogram: Dict[int, int],
                           source_layers: int) -> List[torch.Tensor]:
    """Exit layers for ``num_rows`` rows taken in batches of ``batch`` in order: one [b]
    tensor per batch, the measured histogram over the whole run at every batch size.

    Rows are ranked position-major (position j of every batch before position j + 1; within
    a position, batches in golden-ratio order so neighbouring batches get distant
    quantiles), and the rank's quantile picks the layer: each batch still spans the
    distribution as in :func:`histogram_exit_layers`, and B = 1 mixes the layers over the
    run instead of sending every row to the median layer (so the ideal speed-up does not
    depend on B, nor on the order of the rows' lengths).
    """
    if num_rows < 1 or batch < 1:
        raise ValueError(f"stratified_exit_layers: num_rows and batch must be >= 1, got {num_rows}, {batch}")
    r = torch.arange(num_rows)
    k = (r // batch).double()
    spread = torch.frac(k * 0.6180339887498949)
    order = torch.argsort((r % batch).double() * 2 + spread, stable=True)
    rank = torch.empty(num_rows, dtype=torch.long)
    rank[order] = r
    layers = _histogram_at((rank.double() + 0.5) / num_rows, num_layers, histogram, source_layers)
    return list(layers.split(batch))


def load_measured_profile(path: str) -> Tuple[str, Dict[int, int], int]:
    """(label, histogram, number of layers) from a report of ``eekernels eval --report``."""
    with open(path) as f:
        rep = json.load(f)
    try:
        hist = {int(k): int(v) for k, v in rep["exit_histogram"].items()}
        n = int(rep["num_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an `eekernels eval --report` file (needs exit_histogram and num_layers): {e}")
    label = f"measured ({os.path.basename(path)}, mean exit {rep.get('mean_exit_layer', float('nan')):.2f}/{n})"
    return label, hist, n


def cascade_exit_profile(batch: int, exit_points: Sequence[int], fractions: Sequence[float]) -> torch.Tensor:
    """An ``exit_profile`` [B] for a cascade's ``early_exit``: ``fractions[j]`` is the share
    of the batch emitted by member j (one entry per member but the last, which takes the
    rest; their sum must be <= 1). Returns the cumulative layer budgets ``exit_points[j]``."""
    pts = list(exit_points)
    fr = [float(f) for f in fractions]
    if batch < 1:
        raise ValueError(f"cascade_exit_profile: batch must be >= 1, got {batch}")
    if len(fr) != len(pts) - 1 or any(not (0.0 <= f <= 1.0) for f in fr) or sum(fr) > 1.0 + 1e-12:
        raise ValueError(f"cascade_exit_profile: need {len(pts) - 1} fractions in [0, 1] summing to <= 1, got {fractions}")
    edges = torch.tensor(fr, dtype=torch.float64).cumsum(0)
    member = torch.searchsorted(edges, _quantiles(batch), right=True)  # rows with q < edges[0] -> member 0, ...
    return torch.tensor(pts, dtype=torch.long)[member]
