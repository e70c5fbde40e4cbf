"""Imitation of future states and the adaptive merging gate (past-future.txt 3.2-3.3).

- :class:`ImitationLearners`: one feed-forward layer per layer j (``Learner_j``, eq. 2)
  mapping the exit layer's state s_i to an approximation ``s^i_j`` of the real state s_j
  of every later layer j > i. The learners of all layers are one stacked weight
  ``[n-1, H, H]``, so the approximations of every future layer for the rows still
  active are a single matmul.
- :func:`cosine_imitation_loss`: the imitation loss, eq. 3-5.
- :class:`MergingGate`: ``alpha = sigmoid(FFN(s_p))`` (eq. 7) and
  ``z_i = alpha s_p + (1 - alpha) s_f`` (eq. 8).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["ImitationLearners", "MergingGate", "cosine_imitation_loss"]


class ImitationLearners(nn.Module):
    """``Learner_j(s) = W_j s + b_j`` for the layers j = 2..n (eq. 2).

    Layer 1 is never in the future of an exit (j > i >= 1), so it has no learner;
    ``weight[j - 2]`` is ``W_j``. The weights start as the identity and the biases as
    zero: before training every approximated future state is the present state s_i.

    Args:
        hidden: H.
        num_layers: n, the encoder's depth (>= 2).
    """

    def __init__(self, hidden: int, num_layers: int):
        super().__init__()
        if num_layers < 2 or hidden < 1:
            raise ValueError(f"ImitationLearners: need num_layers >= 2 and hidden >= 1, got {num_layers}, {hidden}")
        self.hidden, self.num_layers = hidden, num_layers
        self.weight = nn.Parameter(torch.eye(hidden).repeat(num_layers - 1, 1, 1))  # [n-1, H_out, H_in]
        self.bias = nn.Parameter(torch.zeros(num_layers - 1, hidden))

    def future(self, s: torch.Tensor, layer: int) -> torch.Tensor:
        """Approximations ``s^i_{i+1..n}`` of the future states from ``s`` = s_i [N, H],
        ``i = layer`` (1-based, < n): one matmul against the stacked weights of layers
        i+1..n. Returns [N, n-i, H]."""
        n, h = self.num_layers, self.hidden
        if not 1 <= layer < n:
            raise ValueError(f"ImitationLearners.future: layer must be in [1, {n - 1}] (layer {n} has no future), got {layer}")
        if s.dim() != 2 or s.shape[1] != h:
            raise ValueError(f"ImitationLearners.future: s must be [N, {h}], got {tuple(s.shape)}")
        w = self.weight[layer - 1:]  # W_{i+1..n}: a contiguous slice, [n-i, H, H]
        out = nn.functional.linear(s, w.reshape(-1, h), self.bias[layer - 1:].reshape(-1))
        return out.view(s.shape[0], n - layer, h)

    def all_future(self, states: torch.Tensor) -> torch.Tensor:
        """Every learner applied to every given state (training): ``states`` [B, m, H]
        (m source states, e.g. the exit layers' s_i) -> [B, m, n-1, H], where
        ``out[:, a, j - 2]`` is ``Learner_j(states[:, a])``. One matmul."""
        b, m, h = states.shape
        if h != self.hidden:
            raise ValueError(f"ImitationLearners.all_future: states must be [B, m, {self.hidden}], got {tuple(states.shape)}")
        out = nn.functional.linear(states, self.weight.reshape(-1, h), self.bias.reshape(-1))
        return out.view(b, m, self.num_layers - 1, h)


def cosine_imitation_loss(states: torch.Tensor, approx: torch.Tensor, sources: Sequence[int],
                          detach_teacher: bool = True) -> torch.Tensor:
    """The imitation loss L_cos of past-future.txt eq. 3-5, averaged over the batch.

    Args:
        states: the real states s_1..s_n, [B, n, H] (the teachers).
        approx: ``ImitationLearners.all_future(states[:, sources - 1])``, [B, m, n-1, H].
        sources: the m exit layers i (1-based, each < n) whose future is imitated.
        detach_teacher: the real state s_j is a fixed teacher (no gradient into it).

    eq. 3: ``l^{i,j} = 1 - cos(s^i_j, s_j)``; eq. 4: ``L^i = mean over j = i+1..n``;
    eq. 5: ``L_cos = mean over the exit layers i``. eq. 5 writes i = 2..n with the
    normaliser 1/(n-1), but L^n has no j > n to average; we read it as the n-1 exits that
    have a future, i = 1..n-1 (with every layer an exit); with exits at a subset of
    layers, the mean runs over those below n.
    """
    b, n, h = states.shape
    sources = list(sources)
    if not sources:
        raise ValueError("cosine_imitation_loss: need at least one source layer")
    if any(not 1 <= i < n for i in sources):
        raise ValueError(f"cosine_imitation_loss: source layers must be in [1, {n - 1}], got {sources}")
    if tuple(approx.shape) != (b, len(sources), n - 1, h):
        raise ValueError(f"cosine_imitation_loss: approx must be [{b}, {len(sources)}, {n - 1}, {h}], got {tuple(approx.shape)}")
    teacher = states[:, 1:]  # s_2..s_n, aligned with the learners
    if detach_teacher:
        teacher = teacher.detach()
    cos = nn.functional.cosine_similarity(approx.float(), teacher[:, None].float(), dim=-1)  # [B, m, n-1]
    src = torch.tensor(sources, device=states.device)
    target_layer = torch.arange(2, n + 1, device=states.device)
    future = (target_layer[None, :] > src[:, None]).float()  # [m, n-1]: j > i
    per_exit = ((1.0 - cos) * future).sum(dim=2) / future.sum(dim=1)  # eq. 4, [B, m]
    return per_exit.mean()  # eq. 5 (and the batch mean)


class MergingGate(nn.Module):
    """``alpha = sigmoid(FFN(s_p))`` (eq. 7), ``z = alpha s_p + (1 - alpha) s_f`` (eq. 8).

    FFN is one linear layer H -> 1: alpha is a scalar per sample, the reliability of
    the past state (section 3.3). Its bias starts at 0 (alpha near 0.5).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.ffn = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.ffn.bias.zero_()

    def alpha(self, s_p: torch.Tensor) -> torch.Tensor:
        """eq. 7: [N, H] -> [N, 1]."""
        return torch.sigmoid(self.ffn(s_p))

    def forward(self, s_p: torch.Tensor, s_f: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eq. 8 as one lerp: ``s_f + alpha (s_p - s_f)``, [N, H]."""
        if s_p.shape != s_f.shape:
            raise ValueError(f"MergingGate: s_p {tuple(s_p.shape)} and s_f {tuple(s_f.shape)} must have the same shape")
        if alpha is None:
            alpha = self.alpha(s_p)
        return torch.lerp(s_f, s_p, alpha)
