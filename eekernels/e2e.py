"""The end-to-end benchmark: batched early exit against the full model, wall clock.

BERT-base shape by default (12 layers, H=768, 12 heads, FFN 3072; random weights, fp16 on
GPU), sequence 128, batch sizes 1, 8, 32, 128, 512, under controlled exit profiles: in
profile ``frac=0.1`` a tenth of the rows still active exits after each layer. For each
batch size and profile it times, on the same inputs:

- the HF eager full model (``model.hf(...)``),
- the fastest full-model path PyTorch offers here (``torch.compile``, mode
  "reduce-overhead" on CUDA, i.e. CUDA graphs),
- the early-exit engine (``model.early_exit(..., exit_profile=...)``: every exit head runs,
  its decision is replaced by the profile so the exits are controlled),

and reports the ideal layer speed-up (past-future.txt eq. 15), the realized speed-up vs
each baseline, efficiency = realized (vs the fastest baseline) / ideal, and samples/s.
Writes ``e2e.json`` and ``e2e.png``. Run: ``eekernels bench`` or ``python benchmarks/e2e.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import metrics


def profile_exit_layers(batch: int, num_layers: int, frac: float) -> torch.Tensor:
    """Exit layers [B] for the profile where ``frac`` of the rows still active exit after each
    layer: (1-frac)^l of the rows survive layer l. Row i takes the quantile (i+0.5)/B, so
    every batch size (B=1 too) gets the same distribution; survivors exit at the last layer."""
    q = (torch.arange(batch, dtype=torch.float64) + 0.5) / batch
    layers = torch.full((batch,), num_layers, dtype=torch.long)
    for layer in range(num_layers - 1, 0, -1):
        layers[q < 1 - (1 - frac) ** layer] = layer
    return layers


def histogram_exit_layers(batch: int, num_layers: int, histogram: Dict[int, int], source_layers: int) -> torch.Tensor:
    """Exit layers [B] drawn from a measured exit histogram (layer -> count) of a model with
    ``source_layers`` layers, rescaled to ``num_layers`` by relative depth (layer l of n
    becomes max(1, round(l * num_layers / n))). Row i takes the quantile (i+0.5)/B of the
    measured distribution, so every batch size gets the same distribution."""
    if not histogram or sum(histogram.values()) <= 0:
        raise ValueError("histogram_exit_layers: the exit histogram is empty")
    if any(l < 1 or l > source_layers for l in histogram):
        raise ValueError(f"histogram_exit_layers: layers must be in [1, {source_layers}], got {sorted(histogram)}")
    layers = sorted(histogram)
    counts = torch.tensor([histogram[l] for l in layers], dtype=torch.float64)
    cdf = counts.cumsum(0) / counts.sum()
    q = (torch.arange(batch, dtype=torch.float64) + 0.5) / batch
    pick = torch.searchsorted(cdf, q).clamp(max=len(layers) - 1)
    src = torch.tensor(layers, dtype=torch.float64)[pick]
    return (src * num_layers / source_layers).round().clamp(1, num_layers).long()


def load_measured_profile(path: str) -> Tuple[str, Dict[int, int], int]:
    """(label, histogram, number of layers) from a report of ``eekernels eval --report``."""
    with open(path) as f:
        rep = json.load(f)
    try:
        hist = {int(k): int(v) for k, v in rep["exit_histogram"].items()}
        n = int(rep["num_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an `eekernels eval --report` file (needs exit_histogram and num_layers): {e}")
    label = f"measured ({os.path.basename(path)}, mean exit {rep.get('mean_exit_layer', float('nan')):.2f}/{n})"
    return label, hist, n


def build_model(num_layers=12, hidden=768, heads=12, intermediate=3072, num_labels=2, max_positions=512,
                device="cpu", dtype=torch.float32, seed=0):
    """A random-weight BERT classifier of the given shape, converted with exits after every layer."""
    from transformers import BertConfig, BertForSequenceClassification

    from .models import convert

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                     intermediate_size=intermediate, num_labels=num_labels, max_position_embeddings=max_positions,
                     attn_implementation="sdpa")
    hf = BertForSequenceClassification(cfg).eval()
    return convert(hf).to(device=device, dtype=dtype).eval()


def time_fn(fn: Callable, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call: CUDA events on GPU, perf_counter on CPU."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
        else:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: Methods the e2e benchmark can run on the same backbone and exit profiles.
E2E_METHODS = ("early-exit", "fixed-capacity", "graphed", "past-future", "consistentee", "cascadebert")


class GraphedEarlyExit:
    """The fixed-capacity engine (:mod:`eekernels.engine.graphed`) captured as one CUDA graph
    per input shape (``torch.cond`` -> conditional IF nodes); a call copies the inputs into
    the graph's static buffers and replays it. CUDA only."""

    def __init__(self, model, backend: Optional[str] = None):
        self.model, self.backend, self.graphs = model, backend, {}

    def _capture(self, ids, mask, prof):
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            ControlFlowOpWarmupDispatchMode,
            CUDAGraphCaptureControlFlowOpDispatchMode,
        )

        from .engine.graphed import fixed_capacity_forward

        static = [ids.clone(), mask.clone(), prof.clone()]

        def fwd():
            return fixed_capacity_forward(self.model, static[0], static[1], exit_profile=static[2],
                                          backend=self.backend, with_metrics=False)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ControlFlowOpWarmupDispatchMode():
            for _ in range(2):
                fwd()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), CUDAGraphCaptureControlFlowOpDispatchMode():
            out = fwd()
        return graph, static, out

    def __call__(self, ids, mask, prof):
        key = tuple(ids.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, mask, prof.to(ids.device))
        graph, static, out = self.graphs[key]
        static[0].copy_(ids)
        static[1].copy_(mask)
        static[2].copy_(prof)
        graph.replay()
        return out


def method_runner(method: str, model, backend: Optional[str], cascade_small: int = 2):
    """(early_exit(ids, mask, profile), ideal(profile), no_exit_profile(B)) for ``method``
    built on ``model``'s HF classifier (random weights: only the clock matters here).

    Per-layer methods take the profile as is. CascadeBERT (a ``cascade_small``-layer member
    cut from the model, then the full model) maps it to the cascade: a row whose profile
    exit is <= ``cascade_small`` leaves after the small member, every other row runs both
    (cascadebert.txt section 4.1 counts every layer of every member tried).
    """
    n = model.num_layers
    if method in ("fixed-capacity", "graphed"):
        from .engine.graphed import fixed_capacity_forward

        if method == "graphed":
            if model.hf.device.type != "cuda":
                raise ValueError("e2e method 'graphed' captures a CUDA graph: it needs --device cuda")
            run = GraphedEarlyExit(model, backend)
        else:
            def run(ids, mask, prof):
                return fixed_capacity_forward(model, ids, mask, exit_profile=prof, backend=backend)
        return (run, lambda prof: metrics.layer_speedup(prof, n), lambda b: torch.full((b,), n, dtype=torch.long))
    if method == "early-exit":
        ee = model
    elif method == "past-future":
        from .methods.past_future import convert as convert_past_future

        ee = convert_past_future(model.hf, strategy="concat")
    elif method == "consistentee":
        from .methods.consistentee import ConsistentEEModel

        ee = ConsistentEEModel.from_hf(model.hf)
    elif method == "cascadebert":
        from .methods.cascadebert import CascadeModel

        dev, dt = model.hf.device, model.hf.dtype
        cm = CascadeModel.from_first_layers(model.hf, [cascade_small]).to(device=dev, dtype=dt).eval()
        small, full = cm.exit_points

        def to_cascade(prof):
            return torch.where(prof <= cascade_small, torch.full_like(prof, small), torch.full_like(prof, full))

        return (lambda ids, mask, prof: cm.early_exit(ids, mask, threshold=1.0, exit_profile=to_cascade(prof),
                                                      backend=backend),
                lambda prof: metrics.cascade_layer_speedup(to_cascade(prof), n),
                lambda b: torch.full((b,), n, dtype=torch.long))
    else:
        raise ValueError(f"unknown e2e method {method!r}; choose from {E2E_METHODS}")
    ee = ee.to(device=model.hf.device, dtype=model.hf.dtype).eval()
    return (lambda ids, mask, prof: ee.early_exit(ids, mask, exit_profile=prof, backend=backend),
            lambda prof: metrics.layer_speedup(prof, n),
            lambda b: torch.full((b,), n, dtype=torch.long))


def run(batch_sizes: List[int], fracs: List[float], seq_len: int = 128, device: Optional[str] = None,
        num_layers: int = 12, hidden: int = 768, heads: int = 12, intermediate: int = 3072,
        repeats: int = 20, compile_baseline: bool = True, backend: Optional[str] = None,
        out_dir: Optional[str] = None, progress: bool = True,
        measured: Optional[List[str]] = None, methods: Sequence[str] = ("early-exit",)) -> List[dict]:
    """Run the benchmark; returns one dict per (method, batch size, profile) and writes
    JSON/PNG to out_dir.

    Profiles: for each ``frac`` in ``fracs``, that fraction of the active rows exits after
    every layer; for each path in ``measured``, the exit histogram of a trained model's
    ``eekernels eval --report`` JSON, rescaled to ``num_layers`` by relative depth.
    ``methods``: any of :data:`E2E_METHODS`, on the same backbone, inputs and profiles.
    Each row also has ``t_no_exit_ms`` (the method with every row forced to the last
    layer) and ``overhead_vs_eager`` = t_no_exit / HF eager - 1: what the method's heads
    and its engine cost when nothing exits.
    """
    from tqdm import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = build_model(num_layers, hidden, heads, intermediate, device=dev, dtype=dtype,
                        max_positions=max(512, seq_len))
    hf = model.hf
    compiled = None
    if compile_baseline:
        mode = "reduce-overhead" if dev.type == "cuda" else "default"
        compiled = torch.compile(hf, mode=mode)
    profiles = [(f"{frac * 100:g}% exit/layer", frac, lambda b, f=frac: profile_exit_layers(b, num_layers, f))
                for frac in fracs]
    for path in measured or []:
        label, hist, n = load_measured_profile(path)
        profiles.append((label, None, lambda b, h=hist, n=n: histogram_exit_layers(b, num_layers, h, n)))
    runners = {m: method_runner(m, model, backend) for m in methods}
    rows = []
    baselines = {}  # per batch size: the full model's times (same inputs for every method and profile)
    jobs = [(m, b, p) for m in methods for b in batch_sizes for p in profiles]
    for method, b, (label, frac, make_profile) in tqdm(jobs, desc="e2e", disable=not progress):
        early_exit, ideal_of, no_exit = runners[method]
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(1000, 30000, (b, seq_len), generator=g).to(dev)
        mask = torch.ones_like(ids)
        prof = make_profile(b)
        ideal = ideal_of(prof)
        if b not in baselines:
            t_eager = time_fn(lambda: hf(input_ids=ids, attention_mask=mask), dev, repeats)
            t_comp = time_fn(lambda: compiled(input_ids=ids, attention_mask=mask), dev, repeats) if compiled else None
            baselines[b] = (t_eager, t_comp)
        t_eager, t_comp = baselines[b]
        t_ee = time_fn(lambda: early_exit(ids, mask, prof), dev, repeats)
        key = (method, b)
        if key not in baselines:
            baselines[key] = time_fn(lambda: early_exit(ids, mask, no_exit(b)), dev, repeats)
        t_no_exit = baselines[key]
        best = min(t_eager, t_comp) if t_comp is not None else t_eager
        row = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", dtype=str(dtype),
                   method=method, batch=b, seq_len=seq_len, profile=label, exit_frac=frac, ideal_layer_speedup=ideal,
                   t_hf_eager_ms=t_eager * 1e3, t_full_compiled_ms=None if t_comp is None else t_comp * 1e3,
                   t_early_exit_ms=t_ee * 1e3, realized_vs_eager=t_eager / t_ee, realized_vs_best=best / t_ee,
                   efficiency=(best / t_ee) / ideal, samples_per_s=b / t_ee,
                   t_no_exit_ms=t_no_exit * 1e3, overhead_vs_eager=t_no_exit / t_eager - 1.0)
        rows.append(row)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "e2e.json"), "w") as f:
            json.dump(dict(torch=torch.__version__, layers=num_layers, hidden=hidden, rows=rows), f, indent=1)
        plot(rows, os.path.join(out_dir, "e2e.png"))
    return rows


def plot(rows: List[dict], path: str) -> None:
    """Efficiency and realized speed-up against batch size, one line per exit profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, (method, prof) in enumerate(dict.fromkeys((r.get("method", "early-exit"), r["profile"]) for r in rows)):
        rs = [r for r in rows if (r.get("method", "early-exit"), r["profile"]) == (method, prof)]
        label = prof if method == "early-exit" else f"{method}, {prof}"
        bs = [r["batch"] for r in rs]
        color = f"C{k}"  # one colour per exit profile in both panels
        axes[0].plot(bs, [r["efficiency"] for r in rs], marker="o", color=color, label=label)
        axes[1].plot(bs, [r["realized_vs_best"] for r in rs], marker="o", color=color, label=f"realized, {label}")
        axes[1].plot(bs, [r["ideal_layer_speedup"] for r in rs], linestyle="--", color=color, label=f"ideal, {label}")
    for ax, title in zip(axes, ("efficiency = realized / ideal", "speed-up vs fastest full model")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(1.0, color="gray", linewidth=0.8)
    fig.suptitle(f"eekernels e2e on {rows[0]['device']} ({rows[0]['dtype']}, seq {rows[0]['seq_len']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: List[dict]) -> None:
    print(f"{'method':>12s} {'B':>5s} {'profile':>24s} {'ideal':>6s} {'eager ms':>9s} {'best ms':>8s} {'EE ms':>8s} "
          f"{'vs eager':>8s} {'vs best':>8s} {'eff':>5s} {'samples/s':>10s} {'overhead':>8s}")
    for r in rows:
        best = min(r["t_hf_eager_ms"], r["t_full_compiled_ms"] or float("inf"))
        print(f"{r['method'][:12]:>12s} {r['batch']:5d} {r['profile'][:24]:>24s} {r['ideal_layer_speedup']:6.2f} {r['t_hf_eager_ms']:9.2f} "
              f"{best:8.2f} {r['t_early_exit_ms']:8.2f} {r['realized_vs_eager']:8.2f} {r['realized_vs_best']:8.2f} "
              f"{r['efficiency']:5.2f} {r['samples_per_s']:10.1f} {r['overhead_vs_eager']:+8.1%}")


TOKEN_METHODS = ("hashee", "mpee")


def run_token_methods(methods: Sequence[str], batch_sizes: List[int], seq_lens: List[int],
                      device: Optional[str] = None, repeats: int = 20, backend: Optional[str] = None,
                      compile_baseline: bool = True, tiny: bool = False) -> List[dict]:
    """Token-level rows: HashEE (frequency hash) and MPEE (prune after 4, 7, 10 keeping 70%,
    no row exits) against the full model; efficiency = realized (vs the fastest full model)
    / FLOPs speed-up. Prints a table per method; returns all rows (key ``method``)."""
    from .bench_tokens import hashee_e2e_rows, print_rows
    from .methods.mpee_bench import mpee_rows

    unknown = [m for m in methods if m not in TOKEN_METHODS]
    if unknown:
        raise ValueError(f"unknown token-level method(s) {unknown}; choose from {TOKEN_METHODS}")
    rows = []
    for m in methods:
        if m == "hashee":
            shape = dict(num_layers=3, hidden=64, heads=4, intermediate=128, vocab_size=1000) if tiny else {}
            got = hashee_e2e_rows(batch_sizes, seq_lens, device=device, repeats=repeats,
                                  compile_baseline=compile_baseline, backend=backend, **shape)
            got = [dict(r, method="hashee") for r in got]
        else:
            shape = dict(num_layers=4, hidden=64, heads=4, intermediate=128, prune_layers=(1, 2)) if tiny else {}
            got = mpee_rows(batch_sizes, seq_lens, fracs=(0.0,), device=device, repeats=repeats,
                            compile_baseline=compile_baseline, backend=backend, **shape)
        print(f"== {m}")
        print_rows(got)
        rows += got
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32,128,512")
    p.add_argument("--exit-fracs", default="0.1,0.2", help="fraction of active rows exiting per layer")
    p.add_argument("--measured-profile", action="append", default=[], metavar="REPORT_JSON",
                   help="also run the exit histogram of a trained model: a report written by "
                        "`eekernels eval --report` (rescaled to the benchmark's depth); repeatable")
    p.add_argument("--methods", default="early-exit",
                   help=f"comma-separated methods on the same backbone and profiles: {', '.join(E2E_METHODS)}")
    p.add_argument("--token-methods", default="",
                   help="token-level rows too (comma-separated: hashee, mpee): BERT-base shape at --token-seq-lens "
                        "and --token-batch-sizes, FLOPs speed-up vs realized; written to e2e_tokens.json")
    p.add_argument("--token-seq-lens", default="128,512")
    p.add_argument("--token-batch-sizes", default="32,128")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backend", default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--tiny", action="store_true", help="a 4-layer H=64 model (smoke test on CPU)")
    p.add_argument("--out", default="e2e-results")


def main(args: argparse.Namespace) -> int:
    shape = dict(num_layers=4, hidden=64, heads=4, intermediate=128) if args.tiny else {}
    rows = run([int(x) for x in args.batch_sizes.split(",")], [float(x) for x in args.exit_fracs.split(",")],
               seq_len=args.seq_len, device=args.device, repeats=args.repeats, backend=args.backend,
               compile_baseline=not args.no_compile, out_dir=args.out, measured=args.measured_profile,
               methods=[m.strip() for m in args.methods.split(",") if m.strip()], **shape)
    print_table(rows)
    print(f"wrote {os.path.join(args.out, 'e2e.json')} and e2e.png")
    token_methods = [m.strip() for m in args.token_methods.split(",") if m.strip()]
    if token_methods:
        token_rows = run_token_methods(token_methods, [int(x) for x in args.token_batch_sizes.split(",")],
                                       [int(x) for x in args.token_seq_lens.split(",")], device=args.device,
                                       repeats=args.repeats, backend=args.backend,
                                       compile_baseline=not args.no_compile, tiny=args.tiny)
        path = os.path.join(args.out, "e2e_tokens.json")
        with open(path, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=token_rows), f, indent=1)
        print(f"wrote {path}")
    return 0
