"""The full HF sequence classifier in ONNX Runtime: the CPU baseline a user would pick.

:class:`OrtFullModel` exports the whole classifier (embeddings to logits) once, fuses it
with ONNX Runtime's transformer optimizer (its BERT defaults: EmbedLayerNormalization,
Attention with per-row lengths, SkipLayerNormalization, BiasGelu) and optionally quantizes
its weights to INT8 (dynamic quantization). The export, fusion, quantization and session
settings are the ones the layer executors use (:mod:`eekernels.engine.ort`).

    full = OrtFullModel(hf_model, int8=False, threads=2)
    logits = full(input_ids, attention_mask)  # torch [B, C]; dynamic batch and length
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from eekernels.engine.ort import (eager_attention, export_graph, fused_op_counts, make_session, optimize_graph,
                                  quantize_graph, require_onnxruntime, run_bound)

__all__ = ["OrtFullModel"]


class _Logits(nn.Module):
    """The HF classifier's forward reduced to its logits (what the graph computes)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


class OrtFullModel:
    """A whole HF ``*ForSequenceClassification`` model (BERT, RoBERTa, ALBERT) as one
    transformer-optimized ONNX Runtime session.

    Args:
        hf_model: the HF classifier (CPU, float32); its weights are read once, at export.
        int8: quantize the weights to INT8 (``quantize_dynamic``) after the fusion.
        threads: intra-op threads (default ``torch.get_num_threads()``).

    Right-padded batches only (the optimizer's BERT default reduces the mask to lengths),
    as HF tokenizers pad.
    """

    def __init__(self, hf_model: nn.Module, int8: bool = False, threads: Optional[int] = None):
        require_onnxruntime()
        if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be an HF sequence classifier, got {type(hf_model).__name__}")
        p = next(hf_model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise ValueError(f"hf_model must be a CPU float32 model, got {p.dtype} on {p.device}")
        cfg = hf_model.config
        self.num_labels = cfg.num_labels
        self.int8 = bool(int8)
        ids = torch.ones(2, 4, dtype=torch.long)
        axes = {"rows": {0: "batch", 1: "length"}}
        was_training = hf_model.training
        hf_model.eval()
        try:
            with eager_attention(cfg):
                graph = export_graph(_Logits(hf_model), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                                     ("input_ids", "attention_mask", "token_type_ids"), "logits",
                                     {"input_ids": axes["rows"], "attention_mask": axes["rows"],
                                      "token_type_ids": axes["rows"], "logits": {0: "batch"}})
        finally:
            hf_model.train(was_training)
        graph = optimize_graph(graph, cfg, raw_mask=False)
        if self.int8:
            graph = quantize_graph(graph)
        self.graph = graph
        self.fused = fused_op_counts(graph)
        self.session = make_session(graph, threads)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits float32 [B, C] of int [B, S] ``input_ids`` / ``attention_mask`` (1 = token)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be an int [B, S] torch.Tensor")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a [B, S] tensor like input_ids {tuple(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        # the optimizer drops inputs the graph does not read (RoBERTa's token types)
        feeds = {k: v.to(torch.long).contiguous() for k, v in feeds.items() if k in self._inputs}
        out = torch.empty(input_ids.shape[0], self.num_labels)
        return run_bound(self.session, feeds, "logits", out)
