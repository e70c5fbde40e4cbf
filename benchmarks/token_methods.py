"""Token-level methods in the end-to-end benchmark: HashEE and MPEE rows, and a single-layer study.

- :func:`hashee_e2e_rows`: HashEE with the frequency hash on a BERT classifier (BERT-base
  shape by default, random weights, fp16 on GPU) against the full model (HF eager and
  ``torch.compile``, CUDA graphs on GPU), per batch size and sequence length: FLOPs
  speed-up (hashee.txt Table 10), realized speed-up vs the fastest full-model baseline,
  efficiency = realized / FLOPs speed-up. Inputs and the table's corpus are drawn from
  the same Zipf distribution over the vocabulary (a stand-in for text: frequent types
  exit first), [CLS] ... [SEP], no padding.
- :func:`token_layer_rows`: one encoder layer with a given fraction of active tokens:
  the full layer, plain torch (gather the active tokens, SDPA with queries on them,
  scatter back), the "pack" path (token ops) and the "sorted" path.
- :func:`mpee_rows`: MPEE (token pruning after layers 4, 7, 10 keeping 70%, and row exits
  by profile) against the full model: FLOPs speed-up (mpee.txt eq. 15) vs realized.

All return lists of dicts and run on CPU at tiny sizes (tests) and on GPU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from common import BERT_SPECIAL_IDS, device_name, random_bert, time_fn
from eekernels import metrics
from exit_profiles import profile_exit_layers

__all__ = ["EFFICIENCY_TARGET", "build_mpee_model", "hashee_e2e_rows", "mpee_rows", "token_layer_rows",
           "zipf_token_ids"]


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

    from eekernels.methods.hashee import HashEEModel
    from eekernels.nn.token_hash import build_hash_table

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    hf = random_bert(num_layers, hidden, heads, intermediate, vocab_size=vocab_size,
                     max_positions=max(512, max(seq_lens)), device=dev, dtype=dtype)
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
        info = model.early_exit(ids, mask, executor=layouts[0], backend=backend)
        active = info.extras["active_tokens"]
        t_eager = time_fn(lambda: hf(input_ids=ids, attention_mask=mask), dev, repeats)
        t_comp = time_fn(lambda: compiled(input_ids=ids, attention_mask=mask), dev, repeats) if compiled else None
        best = min(t_eager, t_comp) if t_comp is not None else t_eager
        for layout in layouts:
            t = time_fn(lambda: model.early_exit(ids, mask, executor=layout, backend=backend), dev, repeats)
            rows.append(dict(
                method="hashee", hash="frequency", layout=layout,
                device=device_name(dev), dtype=str(dtype), batch=b, seq_len=s, flops_speedup=info.flops_speedup,
                t_hf_eager_ms=t_eager * 1e3, t_full_compiled_ms=None if t_comp is None else t_comp * 1e3,
                t_hashee_ms=t * 1e3, realized_vs_eager=t_eager / t, realized_vs_best=best / t,
                efficiency=(best / t) / info.flops_speedup, samples_per_s=b / t,
                active_frac=(active.sum(0).double() / mask.sum().cpu()).tolist()))
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

    from eekernels.engine.tokens import plan_token_exit
    from eekernels.hf.layer_parts import layer_parts
    from eekernels.ops import pack_tokens_padded, scatter_tokens

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                     attn_implementation="sdpa")
    parts = layer_parts(BertLayer(cfg).eval().to(device=dev, dtype=dtype), 0)
    x = torch.randn(batch, seq_len, hidden, device=dev, dtype=dtype)
    t_full = time_fn(lambda: parts(x), dev, repeats)
    name = device_name(dev)
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


#: realized speed-up (vs the fastest full model) over FLOPs speed-up asked for at B=128
EFFICIENCY_TARGET = 0.9


def build_mpee_model(num_layers=12, hidden=768, heads=12, intermediate=3072, num_labels=2, max_positions=512,
                     device="cpu", dtype=torch.float32, seed=0, **options):
    """A random-weight BERT classifier of the given shape converted to MPEE (``options``:
    :class:`~eekernels.methods.mpee.MPEEModel`'s, e.g. prune_layers, keep_ratio)."""
    from eekernels.methods.mpee import convert_mpee

    hf = random_bert(num_layers, hidden, heads, intermediate, num_labels, max_positions, seed=seed)
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
        fracs: exit profiles (:func:`exit_profiles.profile_exit_layers`): in profile ``frac``
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
            device=device_name(dev), dtype=str(dtype),
            method="mpee", batch=b, seq_len=s, exit_frac=frac, prune_layers=list(model.prune_layers),
            keep_ratio=model.keep_ratio, widths=list(out.extras["widths"]),
            ideal_layer_speedup=metrics.layer_speedup(prof, n_layers), flops_speedup=out.flops_speedup,
            t_hf_eager_ms=t_eager * 1e3, t_full_compiled_ms=None if t_comp is None else t_comp * 1e3,
            t_mpee_ms=t_mpee * 1e3, realized_vs_eager=t_eager / t_mpee, realized_vs_best=realized,
            efficiency=eff, samples_per_s=b / t_mpee, meets_target=eff >= EFFICIENCY_TARGET,
        ))
    return rows
