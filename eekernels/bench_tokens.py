"""Token-level (HashEE) benchmarks: rows for the end-to-end benchmark and a single-layer study.

- :func:`hashee_e2e_rows`: HashEE with the frequency hash on a BERT classifier (BERT-base
  shape by default, random weights, fp16 on GPU) against the full model (HF eager and
  ``torch.compile``, CUDA graphs on GPU), per batch size and sequence length: FLOPs
  speed-up (hashee.txt Table 10), realized speed-up vs the fastest full-model baseline,
  efficiency = realized / FLOPs speed-up. Inputs and the table's corpus are drawn from
  the same Zipf distribution over the vocabulary (a stand-in for text: frequent types
  exit first), [CLS] ... [SEP], no padding.
- :func:`token_layer_rows`: one encoder layer with a given fraction of active tokens:
  the full layer, plain torch (gather the active tokens, SDPA with queries on them,
  scatter back), the "pack" path (token ops) and the "sorted" path (active tokens a
  prefix of every sample, as :func:`eekernels.engine.tokens.token_exit_packed` keeps them).

Both return lists of dicts and run on CPU at tiny sizes (tests) and on GPU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import metrics

__all__ = ["hashee_e2e_rows", "token_layer_rows", "zipf_token_ids", "print_rows"]

BERT_SPECIAL_IDS = (0, 100, 101, 102, 103)  # [PAD], [UNK], [CLS], [SEP], [MASK] of the BERT vocabulary


def zipf_token_ids(n: int, length: int, vocab_size: int, special_ids: Sequence[int] = BERT_SPECIAL_IDS,
                   s: float = 1.0, seed: int = 0, cls_id: Optional[int] = 101, sep_id: Optional[int] = 102):
    """int64 [n, length] token ids: Zipf(s) over the non-special ids (a fixed random rank order,
    seed 0, shared by every call), with [CLS] first and [SEP] last when given."""
    ok = torch.ones(vocab_size, dtype=torch.bool)
    ok[[i for i in special_ids if i < vocab_size]] = False
    types = ok.nonzero().reshape(-1)
    types = types[torch.randperm(types.numel(), generator=torch.Generator().manual_seed(0))]
    p = 1.0 / torch.arange(1, types.numel() + 1, dtype=torch.float64) ** s
    g = torch.Generator().manual_seed(seed)
    ids = types[torch.multinomial(p / p.sum(), n * length, replacement=True, generator=g)].reshape(n, length)
    if cls_id is not None:
        ids[:, 0] = cls_id
    if sep_id is not None:
        ids[:, -1] = sep_id
    return ids


def _bert(num_layers, hidden, heads, intermediate, vocab_size, max_positions, device, dtype, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                     intermediate_size=intermediate, vocab_size=vocab_size, num_labels=2,
                     max_position_embeddings=max_positions, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg).eval().to(device=device, dtype=dtype)


def hashee_e2e_rows(batch_sizes: Sequence[int] = (32, 128), seq_lens: Sequence[int] = (128, 512),
                    device: Optional[str] = None, num_layers: int = 12, hidden: int = 768, heads: int = 12,
                    intermediate: int = 3072, vocab_size: int = 30522, num_buckets: Optional[int] = None,
                    layouts: Sequence[str] = ("sorted", "pack"), repeats: int = 20,
                    compile_baseline: bool = True, backend: Optional[str] = None, corpus_texts: int = 2000,
                    zipf_s: float = 1.0, progress: bool = True) -> List[dict]:
    """Token-level rows for the e2e benchmark: HashEE (frequency hash) vs the full model.

    Returns one dict per (seq_len, batch, layout) with: method, hash, layout, device, dtype,
    batch, seq_len, flops_speedup (the ideal, Table 10), t_hf_eager_ms,
    t_full_compiled_ms, t_hashee_ms, realized_vs_eager, realized_vs_best, efficiency
    (= realized_vs_best / flops_speedup), samples_per_s, active_frac (mean fraction of
    tokens computing each layer).
    """
    from tqdm import tqdm

    from .e2e import time_fn
    from .methods.hashee import HashEEModel
    from .nn.token_hash import build_hash_table

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    hf = _bert(num_layers, hidden, heads, intermediate, vocab_size, max(512, max(seq_lens)), dev, dtype)
    corpus = zipf_token_ids(corpus_texts, 128, vocab_size, s=zipf_s, seed=1, cls_id=None, sep_id=None)
    table = build_hash_table("frequency", num_layers, num_buckets, token_ids=corpus, vocab_size=vocab_size,
                             special_ids=BERT_SPECIAL_IDS, progress=False)
    model = HashEEModel(hf, table).eval()
    compiled = None
    if compile_baseline:
        compiled = torch.compile(hf, mode="reduce-overhead" if dev.type == "cuda" else "default")
    rows = []
    jobs = [(s, b) for s in seq_lens for b in batch_sizes]
    for s, b in tqdm(jobs, desc="hashee e2e", disable=not progress):
        ids = zipf_token_ids(b, s, vocab_size, s=zipf_s, seed=1000 + b + s).to(dev)
        mask = torch.ones_like(ids)
        info = model.forward_packed(ids, mask, layout=layouts[0], backend=backend)
        t_eager = time_fn(lambda: hf(input_ids=ids, attention_mask=mask), dev, repeats)
        t_comp = time_fn(lambda: compiled(input_ids=ids, attention_mask=mask), dev, repeats) if compiled else None
        best = min(t_eager, t_comp) if t_comp is not None else t_eager
        for layout in layouts:
            t = time_fn(lambda: model.forward_packed(ids, mask, layout=layout, backend=backend, with_flops=False),
                        dev, repeats)
            rows.append(dict(
                method="hashee", hash="frequency", layout=layout,
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", dtype=str(dtype),
                batch=b, seq_len=s, flops_speedup=info.flops_speedup_total,
                t_hf_eager_ms=t_eager * 1e3, t_full_compiled_ms=None if t_comp is None else t_comp * 1e3,
                t_hashee_ms=t * 1e3, realized_vs_eager=t_eager / t, realized_vs_best=best / t,
                efficiency=(best / t) / info.flops_speedup_total, samples_per_s=b / t,
                active_frac=(info.active_tokens.sum(0).double() / info.seq_len.sum()).tolist()))
    return rows


def _active_mask(b: int, s: int, frac: float, seed: int, device) -> torch.Tensor:
    """bool [B, S]: exactly max(1, round(frac*S)) active tokens per sample at random positions, [CLS] among them."""
    m = max(1, round(frac * s))
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(b, s, generator=g)
    r[:, 0] = -1.0  # position 0 always active
    idx = r.argsort(dim=1)[:, :m]
    act = torch.zeros(b, s, dtype=torch.bool)
    act.scatter_(1, idx, True)
    return act.to(device)


def token_layer_rows(active_fracs: Sequence[float] = (0.5, 0.25), batch: int = 128, seq_len: int = 128,
                     device: Optional[str] = None, hidden: int = 768, heads: int = 12, intermediate: int = 3072,
                     repeats: int = 50, backend: Optional[str] = None) -> List[dict]:
    """One BERT layer with a fraction of active tokens per sample: time and efficiency of
    the full layer, plain torch (gather / SDPA with active queries / scatter), "pack"
    (the token ops) and "sorted" (active tokens already a prefix of every sample; the
    one permutation per forward is amortised over the layers and not timed here).

    Returns one dict per (fraction, variant): ideal (layer FLOPs speed-up, Table 10),
    t_ms, speedup (full / variant), efficiency = speedup / ideal.
    """
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from .e2e import time_fn
    from .engine.tokens import plan_token_exit
    from .models.layer_parts import layer_parts
    from .ops import pack_tokens_padded, scatter_tokens

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                     attn_implementation="sdpa")
    parts = layer_parts(BertLayer(cfg).eval().to(device=dev, dtype=dtype), 0)
    x = torch.randn(batch, seq_len, hidden, device=dev, dtype=dtype)
    t_full = time_fn(lambda: parts(x), dev, repeats)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    for frac in active_fracs:
        active = _active_mask(batch, seq_len, frac, seed=7, device=dev)
        m = int(active.sum(1).max())
        # plain torch: active positions per sample (precomputed), gather, layer, scatter
        pos = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :m]
        gidx = pos[..., None].expand(batch, m, hidden)

        def plain(h=x.clone()):
            xq = torch.gather(h, 1, gidx)
            k, v = parts.keys_values(h)
            out = parts.output(parts.attention(parts.queries(xq), k, v), xq)
            h.scatter_(1, gidx, out)

        def pack(h=x.clone()):
            p = pack_tokens_padded(h, active, backend=backend)
            k, v = parts.keys_values(h)
            out = parts.output(parts.attention(parts.queries(p.values), k, v), p.values)
            scatter_tokens(h, p.index, out, backend=backend)

        plan = plan_token_exit(active.long() + 1, None, 2)  # layer 2 = this layer's active set
        hs = torch.gather(x, 1, plan.order[..., None].expand(batch, seq_len, hidden)).contiguous()
        ms = plan.max_active[1]

        def sorted_(h=hs):
            xq = h[:, :ms]
            k, v = parts.keys_values(h)
            h[:, :ms] = parts.output(parts.attention(parts.queries(xq), k, v), xq)

        n = torch.tensor(float(seq_len))
        ideal = float(metrics.token_exit_layer_macs(n, n, hidden, intermediate, heads)
                      / metrics.token_exit_layer_macs(n, torch.tensor(float(round(frac * seq_len) or 1)),
                                                      hidden, intermediate, heads))
        for variant, fn in (("full", lambda: parts(x)), ("plain_torch", plain), ("pack", pack), ("sorted", sorted_)):
            t = t_full if variant == "full" else time_fn(fn, dev, repeats)
            rows.append(dict(device=name, dtype=str(dtype), batch=batch, seq_len=seq_len, active_frac=frac,
                             variant=variant, ideal=ideal, t_ms=t * 1e3, speedup=t_full / t,
                             efficiency=(t_full / t) / ideal))
    return rows


def print_rows(rows: List[dict]) -> None:
    """A plain-text table of either function's rows."""
    if not rows:
        return
    keys = [k for k, v in rows[0].items() if k not in ("device", "dtype") and not isinstance(v, list)]
    print("  ".join(f"{k[:12]:>12s}" for k in keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cells.append(f"{v:12.3f}" if isinstance(v, float) else f"{str(v)[:12]:>12s}")
        print("  ".join(cells))
