"""An internal exit head: pooler dense + tanh, then classifier (the shape of HF's BERT
head), so one layer's exit decision is one call of :func:`eekernels.ops.exit_head`."""

from __future__ import annotations

import torch
from torch import nn


class ExitHead(nn.Module):
    """Pooler (dense + tanh) and classifier on a layer's [CLS] state.

    Args:
        hidden: hidden size H.
        num_labels: classes C (1 for regression).
        dropout: dropout on the pooled state in training (as HF's BertForSequenceClassification).
        tanh_logits: apply tanh to the classifier output (MPEE's exit classifier, mpee.txt
            eq. 9); the exit_head op takes the same flag.
    """

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1, tanh_logits: bool = False):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)
        self.tanh_logits = bool(tanh_logits)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        """Differentiable logits [N, C] (float of the model's dtype) for training."""
        z = self.classifier(self.dropout(torch.tanh(self.pooler(cls_state))))
        return torch.tanh(z) if self.tanh_logits else z  # mpee.txt eq. 9
