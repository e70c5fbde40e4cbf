"""The end-to-end benchmark: batched early exit against the full model, wall clock.

    python benchmarks/e2e.py --out e2e-results            # GPU: BERT-base shape, fp16
    python benchmarks/e2e.py --tiny --device cpu --batch-sizes 1,8 --repeats 3
    eekernels bench ...                                    # the same, from a source checkout

BERT-base shape by default (12 layers, H=768, 12 heads, FFN 3072; random weights, fp16 on
GPU), sequence 128, batch sizes 1, 8, 32, 128, 512, under controlled exit profiles: in
profile ``frac=0.1`` a tenth of the rows still active exits after each layer. For each
batch size and profile it times, on the same inputs:

- the HF eager full model (``model.hf(...)``),
- the fastest full-model path PyTorch offers here (``torch.compile``, mode
  "reduce-overhead" on CUDA, i.e. CUDA graphs),
- the early-exit engine (``model.early_exit(..., exit_profile=...)``: every exit head runs,
  its decision is replaced by the profile so the exits are controlled; methods
  ``fixed-capacity`` and ``graphed`` are ``engine="fixed"`` and ``engine="graphed"``),

and reports the ideal layer speed-up (past-future.txt eq. 15), the realized speed-up vs
each baseline, efficiency = realized (vs the fastest baseline) / ideal, and samples/s.
Writes ``e2e.json`` and ``e2e.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

import torch

from common import device_name, print_rows, random_bert, time_fn
from eekernels import metrics
from eekernels.models import convert
from exit_profiles import histogram_exit_layers, load_measured_profile, profile_exit_layers

#: Methods the e2e benchmark can run on the same backbone and exit profiles.
E2E_METHODS = ("early-exit", "fixed-capacity", "graphed", "past-future", "consistentee", "cascadebert")


def method_runner(method: str, model, backend: Optional[str], cascade_small: int = 2):
    """(early_exit(ids, mask, profile), ideal(profile), no_exit_profile(B)) for ``method``
    built on ``model``'s HF classifier (random weights: only the clock matters here).

    Per-layer methods take the profile as is. CascadeBERT (a ``cascade_small``-layer member
    cut from the model, then the full model) maps it to the cascade: a row whose profile
    exit is <= ``cascade_small`` leaves after the small member, every other row runs both
    (cascadebert.txt section 4.1 counts every layer of every member tried).
    """
    n = model.num_layers
    engine = {"fixed-capacity": "fixed", "graphed": "graphed"}.get(method, "rows")
    if method in ("early-exit", "fixed-capacity", "graphed"):
        ee = model
    elif method == "past-future":
        from eekernels.methods.past_future import convert as convert_past_future

        ee = convert_past_future(model.hf, strategy="concat")
    elif method == "consistentee":
        from eekernels.methods.consistentee import ConsistentEEModel

        ee = ConsistentEEModel.from_hf(model.hf)
    elif method == "cascadebert":
        from eekernels.methods.cascadebert import CascadeModel

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
    return (lambda ids, mask, prof: ee.early_exit(ids, mask, exit_profile=prof, backend=backend, engine=engine),
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
    model = convert(random_bert(num_layers, hidden, heads, intermediate, device=dev, dtype=dtype,
                                max_positions=max(512, seq_len)))
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
        row = dict(device=device_name(dev), dtype=str(dtype),
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
    from token_methods import hashee_e2e_rows, mpee_rows

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
