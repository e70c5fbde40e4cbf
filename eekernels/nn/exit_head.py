"""An internal exit head: pooler dense + tanh, then classifier (the shape of HF's BERT
head), so one layer's exit decision is one call of :func:`eekernels.ops.exit_head`; and
what the head reads of its layer (:func:`layer_summary`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.exit_head import POOLINGS as _OP_POOLINGS
from ..ops.exit_head import masked_mean

#: what an exit reads of its layer: the [CLS] state, or the mean of the real tokens
#: (sentence-transformer backbones such as all-MiniLM-L6-v2 were trained with mean pooling,
#: so their early [CLS] states carry little)
POOLINGS = tuple(_OP_POOLINGS)  # ("cls", "mean"), the exit_head op's poolings


def layer_summary(hidden: torch.Tensor, valid: Optional[torch.Tensor], pooling: str = "cls") -> torch.Tensor:
    """[N, H] of a layer's states [N, S, H]: the [CLS] state, or the masked mean of the real
    tokens (``valid`` bool [N, S]; None: every token), accumulated in float32, returned in
    the states' dtype; a row without a real token pools to zeros. Differentiable: the
    training path. Inference passes the states to the fused exit head instead
    (``eekernels.ops.exit_head(..., pooling="mean", token_mask=valid)``), whose reference
    takes the same mean (:func:`eekernels.ops.exit_head.masked_mean`) but keeps it in
    float32 for half types."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return masked_mean(hidden, valid).to(hidden.dtype)


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
