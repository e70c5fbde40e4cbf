"""MPEE rows for the end-to-end benchmark (see :mod:`eekernels.e2e`).

For each sequence length, batch size and exit profile it times, on the same inputs:

- the HF eager full model and the fastest full-model path PyTorch offers here
  (``torch.compile``; mode "reduce-overhead", i.e. CUDA graphs, on CUDA),
- the MPEE engine (``MPEEModel.early_exit`` with ``exit_profile``: every exit head runs,
  its decision is replaced by the profile; tokens are pruned after the pruning layers),

and reports the FLOPs speed-up (mpee.txt eq. 15: full over executed FLOPs, per sample,
shrinking sequence included), the realized speed-up against each baseline, and
efficiency = realized (vs the fastest full model) / FLOPs speed-up. The target on GPU is
efficiency >= 0.9 at B=128. Profile ``frac=0.0`` is token pruning alone (no row exits).

Call :func:`mpee_rows` from the e2e benchmark; it runs on CPU at tiny sizes too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["EFFICIENCY_TARGET", "build_mpee_model", "mpee_rows"]

#: realized speed-up (vs the fastest full model) over FLOPs speed-up asked for at B=128
EFFICIENCY_TARGET = 0.9


def build_mpee_model(num_layers=12, hidden=768, heads=12, intermediate=3072, num_labels=2, max_positions=512,
                     device="cpu", dtype=torch.float32, seed=0, **options):
    """A random-weight BERT classifier of the given shape converted to MPEE (``options``:
    :class:`~eekernels.methods.mpee.MPEEModel`'s, e.g. prune_layers, keep_ratio)."""
    from transformers import BertConfig, BertForSequenceClassification

    from .mpee import convert_mpee

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                     intermediate_size=intermediate, num_labels=num_labels, max_position_embeddings=max_positions,
                     attn_implementation="sdpa")
    hf = BertForSequenceClassification(cfg).eval()
    return convert_mpee(hf, **options).to(device=device, dtype=dtype).eval()


def mpee_rows(batch_sizes: Sequence[int] = (32, 128), seq_lens: Sequence[int] = (128, 512),
              fracs: Sequence[float] = (0.0, 0.1), device: Optional[str] = None, num_layers: int = 12,
              hidden: int = 768, heads: int = 12, intermediate: int = 3072,
              prune_layers: Sequence[int] = (4, 7, 10), keep_ratio: float = 0.7, repeats: int = 20,
              warmup: int = 3, compile_baseline: bool = True, backend: Optional[str] = None,
              progress: bool = False, model=None) -> List[dict]:
    """Time MPEE against the full model; one dict per (seq_len, batch, profile).

    Args:
        batch_sizes, seq_lens: the grid (default B 32 and 128, S 128 and 512).
        fracs: exit profiles (:func:`eekernels.e2e.profile_exit_layers`): in profile ``frac``
            that fraction of the still-active rows exits after each layer; 0.0 = no row exits.
        device: default CUDA when available; fp16 on CUDA, float32 on CPU.
        num_layers, hidden, heads, intermediate: the model shape (default BERT-base).
        prune_layers, keep_ratio: MPEE's token-wise exit.
        compile_baseline: also time ``torch.compile`` of the full model.
        model: an :class:`~eekernels.methods.mpee.MPEEModel` to use instead of building one.

    Row keys: device, dtype, method ("mpee"), batch, seq_len, exit_frac, prune_layers,
    keep_ratio, widths (padded width entering each layer), ideal_layer_speedup,
    flops_speedup, t_hf_eager_ms, t_full_compiled_ms (None without compile), t_mpee_ms,
    realized_vs_eager, realized_vs_best, efficiency (realized_vs_best / flops_speedup),
    samples_per_s, meets_target (efficiency >= EFFICIENCY_TARGET; reported, not asserted).
    """
    from tqdm import tqdm

    from .. import metrics
    from ..e2e import profile_exit_layers, time_fn

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if model is None:
        model = build_mpee_model(num_layers, hidden, heads, intermediate, device=dev, dtype=dtype,
                                 max_positions=max(512, max(seq_lens)), prune_layers=tuple(prune_layers),
                                 keep_ratio=keep_ratio)
    n_layers = model.num_layers
    hf = model.hf
    compiled = None
    if compile_baseline:
        compiled = torch.compile(hf, mode="reduce-overhead" if dev.type == "cuda" else "default")
    rows = []
    jobs = [(s, b, f) for s in seq_lens for b in batch_sizes for f in fracs]
    for s, b, frac in tqdm(jobs, desc="e2e mpee", disable=not progress):
        g = torch.Generator().manual_seed(b * 7919 + s)
        vocab = model.config.vocab_size
        ids = torch.randint(min(1000, vocab // 2), vocab, (b, s), generator=g).to(dev)
        mask = torch.ones_like(ids)
        prof = profile_exit_layers(b, n_layers, frac)
        out = model.early_exit(ids, mask, exit_profile=prof, backend=backend)
        t_eager = time_fn(lambda: hf(input_ids=ids, attention_mask=mask), dev, repeats, warmup)
        t_comp = None
        if compiled is not None:
            t_comp = time_fn(lambda: compiled(input_ids=ids, attention_mask=mask), dev, repeats, warmup)
        t_mpee = time_fn(lambda: model.early_exit(ids, mask, exit_profile=prof, backend=backend), dev, repeats,
                         warmup)
        best = min(t_eager, t_comp) if t_comp is not None else t_eager
        realized = best / t_mpee
        eff = realized / out.flops_speedup
        rows.append(dict(
            device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", dtype=str(dtype),
            method="mpee", batch=b, seq_len=s, exit_frac=frac, prune_layers=list(model.prune_layers),
            keep_ratio=model.keep_ratio, widths=list(out.widths),
            ideal_layer_speedup=metrics.layer_speedup(prof, n_layers), flops_speedup=out.flops_speedup,
            t_hf_eager_ms=t_eager * 1e3, t_full_compiled_ms=None if t_comp is None else t_comp * 1e3,
            t_mpee_ms=t_mpee * 1e3, realized_vs_eager=t_eager / t_mpee, realized_vs_best=realized,
            efficiency=eff, samples_per_s=b / t_mpee, meets_target=eff >= EFFICIENCY_TARGET,
        ))
    return rows
