"""Calibration: the threshold (or patience) that meets a speed-up or accuracy target.

One full forward over the dev set gives every exit's logits; the exit rule is then
replayed for each candidate threshold with the same op semantics the engine uses
(:func:`eekernels.ops.exit_head_reference` on the logits), so a calibrated threshold gives
the engine exactly the exit layers it was calibrated on.

Candidate thresholds are midpoints between neighbouring distinct scores of the dev set
(:func:`midpoint_thresholds`), never a sample's own score: a score recomputed in another
batch, with other padding, threads or backend differs in its last bits, and a threshold
sitting on it would send that sample either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .metrics import binary_f1
from .ops import exit_head_reference
from .ops._checks import real_number


@dataclass
class CalibrationResult:
    """The chosen threshold and what it gives on the calibration set.

    Attributes:
        threshold: the threshold (the patience for "patience").
        layer_speedup: past-future.txt eq. 15 on the set.
        accuracy: accuracy with early exit; ``full_accuracy`` of the last layer alone.
        table: (threshold, layer_speedup, accuracy) for every candidate examined, and the F1
            of class ``positive_label`` as a fourth entry when :func:`calibrate` was given one.
    """

    criterion: str
    threshold: float
    layer_speedup: float
    accuracy: float
    full_accuracy: float
    table: List[tuple] = field(default_factory=list)


def simulate_exits(exit_logits: torch.Tensor, exit_layers: Sequence[int], num_layers: int, criterion: str,
                   threshold: float):
    """Replay the exit rule on precomputed logits [E, B, C]; returns (exit_layer [B], logits [B, C])."""
    e, b, c = exit_logits.shape
    eye, zeros = torch.eye(c, dtype=exit_logits.dtype), torch.zeros(c, dtype=exit_logits.dtype)
    out_layer = torch.full((b,), num_layers, dtype=torch.long)
    out_logits = exit_logits[-1].clone()
    done = torch.zeros(b, dtype=torch.bool)
    prev = cnt = None
    for j, layer in enumerate(exit_layers[:-1]):
        o = exit_head_reference(exit_logits[j], eye, zeros, criterion=criterion, threshold=threshold,
                                prev_pred=prev, counter=cnt)
        prev, cnt = (o.pred, o.counter) if criterion == "patience" else (None, None)
        new = o.exit & ~done
        out_layer[new] = layer
        out_logits[new] = exit_logits[j][new]
        done |= o.exit
    return out_layer, out_logits


#: Smallest gap between two neighbouring scores that a candidate threshold is placed in: a
#: sample's score then sits at least half of it away from the threshold, far beyond float32
#: noise between backends and batch compositions.
MIN_SCORE_GAP = 1e-5


def midpoint_thresholds(scores: torch.Tensor, candidates: int = 200, min_gap: float = MIN_SCORE_GAP) -> List[float]:
    """Up to ``candidates`` thresholds spread over the quantiles of ``scores``, each the
    midpoint of a gap of at least ``min_gap`` between two neighbouring sorted finite scores
    (so no score lies within ``min_gap / 2`` of a threshold). Ascending; empty when no two
    scores are that far apart."""
    s = scores.detach().double().flatten().cpu()
    s = s[torch.isfinite(s)].sort().values
    if s.numel() < 2:
        return []
    wide = ((s[1:] - s[:-1]) >= min_gap).nonzero().flatten()
    if wide.numel() == 0:
        return []
    # gap k lies between sorted positions k and k+1: take the gaps nearest evenly spaced ranks
    ranks = torch.linspace(0, s.numel() - 1, candidates, dtype=torch.float64)
    pos = torch.searchsorted(wide.double() + 0.5, ranks).clamp(max=wide.numel() - 1)
    lower = (pos - 1).clamp(min=0)
    nearer = torch.where((wide[lower].double() + 0.5 - ranks).abs() < (wide[pos].double() + 0.5 - ranks).abs(),
                         lower, pos)
    k = wide[nearer].unique()
    return ((s[k] + s[k + 1]) / 2).tolist()


def collect_exit_logits(model, input_ids, attention_mask=None, token_type_ids=None, batch_size: int = 64,
                        progress: bool = True) -> torch.Tensor:
    """Every exit's float32 logits [E, B, C] for a dataset (no grad, eval mode)."""
    from tqdm import tqdm

    was = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for s in tqdm(range(0, input_ids.shape[0], batch_size), desc="calibration forward", disable=not progress):
                sl = slice(s, s + batch_size)
                out = model(input_ids[sl], None if attention_mask is None else attention_mask[sl],
                            None if token_type_ids is None else token_type_ids[sl])
                chunks.append(out.exit_logits.float().cpu())
    finally:
        model.train(was)
    return torch.cat(chunks, dim=1)


def exit_accuracies(model, enc, batch_size: int = 64, progress: bool = False) -> List[float]:
    """Accuracy of every exit of ``model`` on an encoded set (in the order of ``model.exit_points``)."""
    dev = next(model.parameters()).device
    tt = enc.get("token_type_ids")
    z = collect_exit_logits(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                            None if tt is None else tt.to(dev), batch_size=batch_size, progress=progress)
    return (model.exit_predictions(z).argmax(-1) == enc["labels"][None]).float().mean(dim=1).tolist()


def calibrate(model, input_ids, labels, attention_mask=None, token_type_ids=None, *, criterion: Optional[str] = None,
              target_speedup: Optional[float] = None, max_accuracy_drop: Optional[float] = None,
              batch_size: int = 64, candidates: int = 200, positive_label: Optional[int] = None,
              progress: bool = True) -> CalibrationResult:
    """Pick the threshold for ``criterion`` (default: the model's own) on a labelled dev set.

    Works for every method with an exit threshold: one training forward gives every exit's
    logits (:func:`collect_exit_logits`), and the model's own rule is replayed on them for
    each candidate (:meth:`~eekernels.models.base.EarlyExitBase.simulate_exits`).

    Exactly one of:
        target_speedup: the most accurate threshold whose layer speed-up is >= this.
        max_accuracy_drop: the fastest threshold whose accuracy is >= full accuracy - this.

    ``positive_label``: also score every candidate by the F1 of that class (GLUE's MRPC
    metric: class 1), as a fourth entry of each ``table`` row; the choice stays by accuracy.
    """
    from .engine.loop import check_inputs
    if not all(callable(getattr(model, name, None)) for name in ("early_exit", "simulate_exits")):
        raise TypeError(f"calibrate: model must be an eekernels early-exit model (eekernels.convert, eekernels.load), "
                        f"got {type(model).__name__}")
    if (target_speedup is None) == (max_accuracy_drop is None):
        raise ValueError("calibrate: give exactly one of target_speedup and max_accuracy_drop")
    target_speedup, max_accuracy_drop = (None if v is None else real_number("calibrate", name, v) for name, v in
                                         (("target_speedup", target_speedup), ("max_accuracy_drop", max_accuracy_drop)))
    for name, v in (("batch_size", batch_size), ("candidates", candidates)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"calibrate: {name} must be an int >= 1, got {v!r}")
    if not model.criteria:
        raise ValueError(f"calibrate: a {model.method} model has no exit threshold to calibrate")
    criterion = model.criteria[0] if criterion is None else criterion
    if criterion not in ("entropy", "max_prob", "patience") or criterion not in model.criteria:
        calibratable = [c for c in model.criteria if c in ("entropy", "max_prob", "patience")]
        raise ValueError(f"calibrate: criterion {criterion!r} cannot be calibrated for a {model.method} model; "
                         f"choose one of {calibratable}")
    best_possible = model.num_layers / model.exit_points[0]
    # below 1 every threshold qualifies (running every layer is 1x): a slip, not a target
    if target_speedup is not None and not (1.0 <= target_speedup <= best_possible):
        raise ValueError(f"calibrate: target_speedup must be in [1, {best_possible:g}] for this model "
                         f"(1: the full model; {best_possible:g}: every row at the first exit), got {target_speedup}")
    if positive_label is not None and (isinstance(positive_label, bool) or not isinstance(positive_label, int)
                                       or not 0 <= positive_label < model.num_labels):
        raise ValueError(f"calibrate: positive_label must be a class id in [0, {model.num_labels}), "
                         f"got {positive_label!r}")
    if max_accuracy_drop is not None and not (0.0 <= max_accuracy_drop <= 1.0):
        raise ValueError(f"calibrate: max_accuracy_drop must be in [0, 1], got {max_accuracy_drop}")
    check_inputs(model, input_ids, attention_mask, token_type_ids, None, who="calibrate")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"calibrate: labels must be integer class ids, got {labels.dtype}")
    if tuple(labels.shape) != (input_ids.shape[0],):
        raise ValueError(f"calibrate: labels must be [{input_ids.shape[0]}] (one per row of input_ids), "
                         f"got {tuple(labels.shape)}")
    labels = labels.long().cpu()
    if int(labels.min()) < 0 or int(labels.max()) >= model.num_labels:
        raise ValueError(f"calibrate: labels must lie in [0, {model.num_labels}) (the model's classes), got values "
                         f"in [{int(labels.min())}, {int(labels.max())}]")
    z = collect_exit_logits(model, input_ids, attention_mask, token_type_ids, batch_size, progress)
    full_acc = float((model.exit_predictions(z)[-1].argmax(-1) == labels).float().mean())

    if criterion == "patience":
        cands = [float(p) for p in range(len(model.exit_points))]
    else:
        e, b, c = z[:-1].shape
        # the scores as the engine's rule computes them (float32), then thresholds between them
        score = exit_head_reference(z[:-1].reshape(e * b, c), torch.eye(c), torch.zeros(c),
                                    criterion=criterion).score
        lo, hi = model.threshold_bounds(criterion)
        cands = [lo] + [t for t in midpoint_thresholds(score, candidates) if lo < t < hi] + [hi]
    table = []
    for t in cands:
        el, lg = model.simulate_exits(z, criterion, t)
        pred = lg.argmax(-1)
        row = (t, model.layer_speedup(el), float((pred == labels).float().mean()))
        table.append(row if positive_label is None else row + (binary_f1(pred, labels, positive_label),))
    best = choose_threshold(table, full_acc, target_speedup, max_accuracy_drop, "calibrate")
    return CalibrationResult(criterion, best[0], best[1], best[2], full_acc, table)


def choose_threshold(table, full_acc: float, target_speedup: Optional[float], max_accuracy_drop: Optional[float],
                     who: str = "calibrate"):
    """The (threshold, speed-up, accuracy) row of ``table`` that calibration picks: the most
    accurate one reaching ``target_speedup`` (the fastest, with a warning, when none does),
    or the fastest whose accuracy is within ``max_accuracy_drop`` of ``full_acc``."""
    if target_speedup is not None:
        ok = [r for r in table if r[1] >= target_speedup - 1e-12]
        if not ok:
            best = max(table, key=lambda r: r[1])
            warnings.warn(f"{who}: no threshold reaches layer speed-up {target_speedup}; "
                          f"the fastest gives {best[1]:.3f}", RuntimeWarning, stacklevel=3)
            return best
        return max(ok, key=lambda r: (r[2], -r[1]))
    ok = [r for r in table if r[2] >= full_acc - max_accuracy_drop - 1e-12]
    return max(ok, key=lambda r: (r[1], r[2]))
