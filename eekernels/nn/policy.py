"""The ConsistentEE policy network: a two-layer MLP that says "exit" or "continue".

consistentee.txt ("Policy Network", "We use a two-layer Multi-Layer Perceptron"): the
network sees the same state as the layer's internal classifier (the pooled [CLS] state)
and gives pi(Exit | s_t). Its shape, H -> P -> 1 with GELU and a sigmoid (P = 32 by
default), is the one the fused exit head evaluates with ``criterion="policy"``:

    score = sigmoid(w2 . gelu(W1 x + b1) + b2)
"""

from __future__ import annotations

import torch
from torch import nn


class PolicyNet(nn.Module):
    """pi(Exit | x) for a batch of states x [N, H].

    Args:
        hidden: input size H (the classifier's input size).
        inner: width P of the hidden layer (32 as in the authors' code).

    ``fc1`` (H -> P) and ``fc2`` (P -> 1) are plain ``nn.Linear`` modules, so their
    weights go to the exit-head op as they are.
    """

    def __init__(self, hidden: int, inner: int = 32):
        super().__init__()
        if hidden < 1 or inner < 1:
            raise ValueError(f"PolicyNet: hidden and inner must be >= 1, got {hidden}, {inner}")
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid exit logit [N] in float32 (log pi(Exit) = logsigmoid(logit),
        log pi(Continue) = logsigmoid(-logit), numerically stable for the policy gradient)."""
        if x.dim() != 2 or x.shape[1] != self.fc1.in_features:
            raise ValueError(f"PolicyNet: expected states [N, {self.fc1.in_features}], got {tuple(x.shape)}")
        h = nn.functional.gelu(self.fc1(x))  # exact (erf) GELU
        return self.fc2(h).squeeze(-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pi(Exit | x), float32 [N] in [0, 1]."""
        return torch.sigmoid(self.logit(x))
