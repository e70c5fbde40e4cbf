"""Metrics of early exit: its speed-ups, and the F1 that MRPC is scored by.

- :func:`layer_speedup`: past-future.txt eq. 15, ``sum_i n*m_i / sum_i i*m_i`` with m_i
  the number of samples exiting at layer i of an n-layer model.
- :func:`encoder_layer_flops` / :func:`flops_speedup`: FLOPs of the full model over FLOPs
  executed, counted per sample with its own (unpadded) length (mpee.txt eq. 15).
- :func:`mpee_token_counts` / :func:`flops_speedup_tokens`: the same when the sequence
  shrinks layer by layer (MPEE's token-wise exit).
- :func:`memorized_layer`: ConsistentEE's hardness of a sample (consistentee.txt eq. 7).
- CascadeBERT: cascade speed-ups, DIS (eq. 1-3) and ECE.
- :func:`binary_f1`: F1 of one class (GLUE's MRPC metric).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["binary_f1", "encoder_layer_flops", "exit_head_flops", "flops_speedup", "flops_speedup_tokens", "layer_speedup",
           "memorized_layer", "mpee_token_counts"]


def binary_f1(pred: torch.Tensor, labels: torch.Tensor, positive: int = 1) -> float:
    """F1 of class ``positive`` (GLUE's MRPC metric), 0 when it is never predicted nor true."""
    tp = int(((pred == positive) & (labels == positive)).sum())
    fp = int(((pred == positive) & (labels != positive)).sum())
    fn = int(((pred != positive) & (labels == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def layer_speedup(exit_layer: torch.Tensor, num_layers: int) -> float:
    """Layer speed-up (past-future.txt eq. 15) of 1-based exit layers (a CPU tensor or array)
    over ``num_layers``."""
    exit_layer = np.asarray(exit_layer)  # numpy: a few microseconds on the per-call path
    if exit_layer.size == 0:
        raise ValueError("layer_speedup: no samples")
    if exit_layer.min() < 1 or exit_layer.max() > num_layers:
        raise ValueError(f"layer_speedup: exit layers must be in [1, {num_layers}]")
    return float(num_layers * exit_layer.size / exit_layer.sum(dtype=np.float64))


def encoder_layer_flops(seq_len: torch.Tensor, hidden: int, intermediate: int) -> torch.Tensor:
    """FLOPs (2 per multiply-add) of one transformer encoder layer per sample of ``seq_len`` tokens:
    Q/K/V/output projections 8·S·H², the FFN 4·S·H·I, attention scores and weighted sum 4·S²·H.
    A numpy ``seq_len`` gives a numpy array (the per-call path), anything else a float64 tensor."""
    s = seq_len.astype(np.float64) if isinstance(seq_len, np.ndarray) else torch.as_tensor(seq_len, dtype=torch.float64)
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


# --------------------------------------------------------------------------- CascadeBERT
# Appended for the CascadeBERT method (cascadebert.txt): speed-ups of a model cascade,
# the Difficulty Inversion Score (eq. 1-3) and the expected calibration error (eq. 7).

__all__ += [
    "cascade_flops_speedup",
    "cascade_layer_speedup",
    "difficulty_inversion_score",
    "dis_from_logits",
    "ece_from_logits",
    "expected_calibration_error",
]


def cascade_layer_speedup(exit_layer: torch.Tensor, full_layers: int) -> float:
    """Layer speed-up of a model cascade (cascadebert.txt section 4.1).

    ``exit_layer`` [B] holds, per sample, the layers run in *every* model tried (a sample
    that leaves the 2-layer model after trying it counts 2; one that goes on to the 12-layer
    model counts 2 + 12 = 14). The speed-up is ``full_layers * B / sum(exit_layer)``, with
    ``full_layers`` the depth of the largest model; it is below 1 when most samples go
    through several models.
    """
    exit_layer = torch.as_tensor(exit_layer)
    if exit_layer.numel() == 0:
        raise ValueError("cascade_layer_speedup: no samples")
    if full_layers < 1 or int(exit_layer.min()) < 1:
        raise ValueError("cascade_layer_speedup: full_layers and every exit_layer must be >= 1")
    return float(full_layers * exit_layer.numel() / exit_layer.double().sum())


def cascade_flops_speedup(exit_member: torch.Tensor, seq_len: torch.Tensor, members: list) -> float:
    """FLOPs of the largest model over FLOPs executed by a cascade, per sample with its own length.

    Args:
        exit_member: int [B], 0-based index of the model each sample left from; it ran
            every model ``0..exit_member`` (its layers and its head).
        seq_len: [B] unpadded lengths.
        members: one ``(num_layers, hidden, intermediate, num_labels)`` per model, smallest
            first; the last is the full model the speed-up is measured against.

    Embedding look-ups are left out (cascadebert.txt section 4.1: ~0.3M FLOPs, negligible).
    """
    if not members:
        raise ValueError("cascade_flops_speedup: no members")
    e = torch.as_tensor(exit_member, dtype=torch.long).cpu()
    if e.numel() == 0 or int(e.min()) < 0 or int(e.max()) >= len(members):
        raise ValueError(f"cascade_flops_speedup: exit_member must be non-empty and in [0, {len(members) - 1}]")
    s = torch.as_tensor(seq_len, dtype=torch.float64).cpu()
    per_member = torch.stack([n * encoder_layer_flops(s, h, i) + exit_head_flops(h, c)
                              for n, h, i, c in members])  # [M, B]
    tried = torch.arange(len(members))[:, None] <= e[None, :]  # [M, B]
    run = (per_member * tried).sum()
    full = per_member[-1].sum()
    return float(full / run)


def difficulty_inversion_score(confidence: torch.Tensor, difficulty: torch.Tensor) -> float:
    """Difficulty Inversion Score, DIS (cascadebert.txt eq. 1-3): the share of (difficult,
    easy) pairs whose confidences are ranked the right way (the easy one more confident).

    Args:
        confidence: [N] confidence scores c(x) (e.g. the maximum class probability, eq. 4).
        difficulty: [N] d(x): 1 (or True) for difficult instances (the model gets them wrong),
            0 for easy ones.

    A pair (x_i difficult, x_j easy) is an inversion when c(x_i) > c(x_j); DI-Sum (eq. 2)
    counts them over the confidence-sorted instances and DIS = 1 - DI-Sum / K (eq. 3) with
    K = #easy * #difficult. (Eq. 1 as printed, with c(x_i) < c(x_j), would contradict the
    sorted sum of eq. 2 and the text; we follow the text: "the proportion of instance pairs
    that are correctly ranked".) A pair with equal confidences counts as half an inversion,
    so the score does not depend on how ties are sorted. Returns NaN when there are no easy
    or no difficult instances (K = 0). O(N log N).
    """
    c = torch.as_tensor(confidence).detach().double().reshape(-1).cpu()
    d = torch.as_tensor(difficulty).detach().reshape(-1).cpu()
    if c.shape != d.shape:
        raise ValueError(f"difficulty_inversion_score: confidence has {c.numel()} entries, difficulty {d.numel()}")
    if not bool(((d == 0) | (d == 1)).all()):
        raise ValueError("difficulty_inversion_score: difficulty must hold 0 (easy) and 1 (difficult) only")
    if bool(torch.isnan(c).any()):
        raise ValueError("difficulty_inversion_score: confidence holds NaN")
    hard = d == 1
    easy_c, _ = c[~hard].sort()
    hard_c = c[hard]
    k = easy_c.numel() * hard_c.numel()
    if k == 0:
        return float("nan")
    below = torch.searchsorted(easy_c, hard_c, right=False)  # easy strictly less confident
    at_most = torch.searchsorted(easy_c, hard_c, right=True)
    inversions = below.double().sum() + 0.5 * (at_most - below).double().sum()
    return float(1.0 - inversions / k)


def dis_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """DIS of a classifier on labelled data: c(x) = max softmax probability (eq. 4) and
    d(x) = 1 where the prediction is wrong (cascadebert.txt section 2.2)."""
    z = torch.as_tensor(logits).detach().float()
    p = z.softmax(-1)
    conf, pred = p.max(-1)
    return difficulty_inversion_score(conf, (pred != torch.as_tensor(labels).to(pred.device)).long())


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error (cascadebert.txt appendix B, eq. 7; Guo et al. 2017).

    ``ECE = sum_k (b_k / n) |acc(k) - conf(k)|`` over ``n_bins`` equal-width confidence bins
    ((k-1)/n_bins, k/n_bins] (the first bin also takes confidence 0); ``acc(k)`` is the share
    of correct predictions in bin k and ``conf(k)`` its mean confidence. The paper uses 10
    bins and reports it in percent (this returns a fraction in [0, 1]).

    Args:
        confidence: [N] predicted-class probabilities in [0, 1].
        correct: [N] bool (or 0/1), whether each prediction is right.
    """
    if n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be >= 1, got {n_bins}")
    c = torch.as_tensor(confidence).detach().double().reshape(-1).cpu()
    ok = torch.as_tensor(correct).detach().reshape(-1).cpu().double()
    if c.shape != ok.shape or c.numel() == 0:
        raise ValueError("expected_calibration_error: need one 'correct' flag per confidence, and at least one")
    if bool(torch.isnan(c).any()) or float(c.min()) < 0 or float(c.max()) > 1:
        raise ValueError("expected_calibration_error: confidences must be in [0, 1]")
    # bin k (0-based) holds (k/n_bins, (k+1)/n_bins]; ceil(c * n_bins) - 1, with 0 in bin 0
    b = (torch.ceil(c * n_bins).long() - 1).clamp(0, n_bins - 1)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, c)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, ok)
    # sum_k (b_k/n)|acc_k - conf_k| = sum_k |acc_sum_k - conf_sum_k| / n
    return float((acc_sum - conf_sum).abs().sum() / c.numel())


def ece_from_logits(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of a classifier's logits [N, C] on labels [N] (max softmax probability as confidence)."""
    z = torch.as_tensor(logits).detach().float()
    conf, pred = z.softmax(-1).max(-1)
    return expected_calibration_error(conf, pred == torch.as_tensor(labels).to(pred.device), n_bins)

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
