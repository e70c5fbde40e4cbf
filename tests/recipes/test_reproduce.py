"""python/reproduce.py --quick end to end on the tiny text task (CPU): every method of the
grid trains, is measured and lands in results.csv/json, curves.json and the task's PNG;
a second run redoes nothing."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from ..text_task import make_files  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "python" / "reproduce.py"


def _recipe_module(name: str):
    """The recipe imported as module ``name`` (registered first: its dataclasses look their
    module up)."""
    spec = importlib.util.spec_from_file_location(name, RECIPE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_task(tmp_path: Path) -> dict:
    """The tiny text task's files, with its train and dev files as task TINY of ``tmp_path/data``."""
    f = make_files(tmp_path / "files")
    data = tmp_path / "data" / "TINY"
    data.mkdir(parents=True)
    shutil.copy(f["train"], data / "train.tsv")
    shutil.copy(f["dev"], data / "dev.tsv")
    return f


def test_reproduce_quick_grid_runs_and_resumes(tmp_path):
    f = tiny_task(tmp_path)
    out = tmp_path / "out"
    argv = [sys.executable, str(RECIPE), "--out", str(out), "--tasks", "TINY", "--data-dir", str(tmp_path / "data"),
            "--model", str(f["clf"]), "--quick"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {row["method"] for row in rows}
    assert {"deebert", "right-tool", "pabee", "static-2", "static-3", "static-4", "past-future", "mpee",
            "consistentee", "cascadebert", "hashee"} <= methods, methods
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["layer_speedup"]) > 0
    static = {row["method"]: float(row["layer_speedup"]) for row in rows if row["method"].startswith("static")}
    assert static == {"static-2": 2.0, "static-3": 4 / 3, "static-4": 1.0}  # k of the tiny model's 4 layers
    curves = json.loads((out / "curves.json").read_text())["TINY"]
    assert {"deebert", "right-tool", "pabee", "past-future", "mpee", "cascadebert"} <= set(curves)
    assert (out / "TINY.png").stat().st_size > 1000
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | TINY acc 1x | TINY acc 2x | TINY acc 3x |"), table[0]
    labelled = {line.split(" | ")[0].lstrip("| ") for line in table[2:]}
    assert {"full model", "DeeBERT (entropy)", "PABEE (patience)", "Past-Future (entropy)", "MPEE (entropy)",
            "ConsistentEE (policy)", "CascadeBERT (max-prob)", "HashEE (frequency hash)",
            "static, first 2 layers"} <= labelled, labelled
    assert all(line.count("|") == 5 for line in table), table  # method + three columns
    stamp = (out / "results.json").stat().st_mtime_ns
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # resumes: nothing is retrained
    assert r.returncode == 0 and "training loss" not in r.stdout, r.stdout[-2000:]
    assert (out / "results.json").stat().st_mtime_ns >= stamp
    # a later call for one method rewrites the outputs with every finished run, not only its own
    r = subprocess.run(argv + ["--methods", "deebert"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    again = list(csv.DictReader(open(out / "results.csv")))
    assert {row["method"] for row in again} == methods and len(again) == len(rows)
    # the static baselines' speed-ups over the full depth are their layer counts only
    assert all(row["wallclock_speedup"] == "" for row in again if row["method"].startswith("static"))


def test_parts_cover_every_model_longest_first():
    mod = _recipe_module("reproduce_recipe_parts")
    assert {mod.part_key(m) for m in mod.MODELS} == set(mod.PART_ORDER)
    got = mod.parts(["A", "B"], mod.GRID_METHODS)
    assert got[:4] == [("A", "consistentee"), ("B", "consistentee"), ("A", "cascadebert"), ("B", "cascadebert")]
    assert ("A", "deebert,right-tool,pabee") in got and ("B", "static") in got and len(got) == 14
    assert mod.parts(["A"], ["pabee", "static"]) == [("A", "pabee"), ("A", "static")]


def test_workers_run_the_parts_side_by_side_into_one_folder(tmp_path):
    """--workers 2: each part its own call (one thread each on two CPUs), logs per part, and the
    outputs of every part in the folder at the end; a bad part fails the call and names its log."""
    f = tiny_task(tmp_path)
    out = tmp_path / "out"
    argv = [sys.executable, str(RECIPE), "--out", str(out), "--tasks", "TINY", "--data-dir", str(tmp_path / "data"),
            "--model", str(f["clf"]), "--quick", "--workers", "2", "--methods", "deebert,pabee,static,hashee"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["TINY-deebert.log", "TINY-hashee.log",
                                                                  "TINY-static.log"]
    methods = {row["method"] for row in csv.DictReader(open(out / "results.csv"))}
    assert methods == {"deebert", "pabee", "static-2", "static-3", "static-4", "hashee"}, methods
    bad = [*argv[:-1], "deebert,mpee"]
    (out / "data" / "TINY" / "dev.tsv").write_text("sentence\tlabel\nonly one row\t9\n")  # the folder's copy
    r = subprocess.run(bad, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1 and "error: part TINY mpee failed" in r.stderr and "TINY-mpee.log" in r.stderr, \
        r.stderr[-2000:]


def test_reproduce_refuses_unknown_methods(tmp_path):
    r = subprocess.run([sys.executable, str(RECIPE), "--out", str(tmp_path), "--methods", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown method" in r.stderr and "Traceback" not in r.stderr


def test_results_table_places_each_point():
    """results_table: calibrated points in their column with the reached speed-up where it
    differs, a static model by its layer speed-up, HashEE by its FLOPs speed-up, ConsistentEE
    at the paper's p > 0.5 first, MRPC by F1."""
    mod = _recipe_module("reproduce_recipe")

    def row(task, method, point, acc, layer, flops=None, f1=None, full=0.9):
        return dict(task=task, method=method, point=point, accuracy=acc, f1=f1, full_accuracy=full,
                    layer_speedup=layer, flops_speedup=flops if flops is not None else layer)

    rows = [row("SST-2", "deebert", "1x", 0.9, 1.0), row("SST-2", "deebert", "2x", 0.88, 2.0),
            row("SST-2", "deebert", "3x", 0.85, 3.4), row("SST-2", "static-3", "model", 0.8, 2.0),
            row("SST-2", "hashee", "model", 0.87, 1.0, flops=1.9),
            row("SST-2", "consistentee", "p>0.3", 0.86, 2.1), row("SST-2", "consistentee", "p>0.5", 0.87, 1.7),
            row("MRPC", "deebert", "1x", 0.8, 1.0, f1=0.86, full=0.8)]
    table = mod.results_table(rows).splitlines()
    assert table[0] == ("| method | SST-2 acc 1x | SST-2 acc 2x | SST-2 acc 3x | MRPC F1 1x | MRPC F1 2x | "
                        "MRPC F1 3x |")
    split = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    cells = {c[0]: c[1:] for c in split}
    assert cells["full model"] == ["90.0", "", "", "86.0", "", ""]
    assert cells["DeeBERT (entropy)"] == ["90.0", "88.0", "85.0 (3.40x)", "86.0", "-", "-"]
    assert cells["static, first 3 layers"][:3] == ["-", "80.0", "-"]
    assert cells["HashEE (frequency hash)"][:3] == ["-", "87.0 (1.90x FLOPs)", "-"]
    assert cells["ConsistentEE (policy)"][:3] == ["-", "87.0 (1.70x, p>0.5)", "-"]


def test_train_resumes_a_killed_training_where_the_method_can(tmp_path, monkeypatch):
    """A training that left a checkpoint goes on from it (``resume``) for methods trained in
    one Trainer run, ConsistentEE and CascadeBERT (several runs) from their schedule's
    progress record; CascadeBERT's DAR folds are cached in the part's folder besides."""
    import types

    import eekernels.training.finetune as ft
    from eekernels.methods.registry import CASCADE_PROGRESS_FILE
    from eekernels.training.consistentee import PROGRESS_FILE

    from dataclasses import replace

    mod = _recipe_module("reproduce_recipe_train")
    calls = []
    monkeypatch.setattr(ft, "finetune", lambda cfg, log=None: calls.append(cfg) or types.SimpleNamespace(summary={}))

    def stopped(run_dir, record=None, step=""):
        """``run_dir`` as a killed training leaves it: a complete Trainer checkpoint in its
        staging area (in ``step``'s folder for a training in steps), or a schedule's ``record`` there."""
        area = ft.checkpoints_dir(str(run_dir / "model"))
        os.makedirs(os.path.join(area, step, "checkpoint-200"))
        with open(os.path.join(area, step, "checkpoint-200", "trainer_state.json"), "w") as f:
            json.dump({"global_step": 200}, f)
        if record is not None:
            open(os.path.join(area, record), "wb").close()
        return run_dir

    models = {m.key: m for m in mod.MODELS}
    task = mod.TASKS["SST-2"]
    files = {"train": "unused", "dev": "unused"}
    for key in ("early-exit", "past-future"):
        summary = mod.train(models[key], task, files, "backbone", stopped(tmp_path / key), quick=True, num_layers=6)
        assert calls[-1].resume is True and summary["resumed"] is True, key
    for key, record in (("consistentee", PROGRESS_FILE), ("cascadebert", CASCADE_PROGRESS_FILE)):
        mod.train(models[key], task, files, "backbone", stopped(tmp_path / f"{key}-fresh"), quick=True, num_layers=6)
        assert calls[-1].resume is False, key  # a Trainer checkpoint outside its steps is not the schedule's
        mod.train(models[key], task, files, "backbone", stopped(tmp_path / f"{key}-stopped", record), quick=True,
                  num_layers=6)
        assert calls[-1].resume is True, key
    assert calls[-1].method_options["difficulty_cache"] == str(tmp_path / "cascadebert-stopped" / "difficulty")
    mod.train(models["early-exit"], task, files, "backbone", tmp_path / "fresh", quick=True, num_layers=6)
    assert calls[-1].resume is False  # nothing to go on from
    assert "two_stage" not in calls[-1].method_options
    # --two-stage: the early-exit model trains in DeeBERT's two stages, the static models as before
    two = replace(task, two_stage=True)
    mod.train(models["early-exit"], two, files, "backbone", tmp_path / "two", quick=True, num_layers=6)
    assert calls[-1].method_options["two_stage"] is True
    mod.train(models["early-exit"], two, files, "backbone", stopped(tmp_path / "two-stopped", step="final"), quick=True,
              num_layers=6)
    assert calls[-1].resume is True  # its first stage's checkpoint, before any record


def test_schedule_overrides_and_a_folder_keeps_its_schedule(tmp_path):
    """--train-rows / --epochs / --random-batches replace the task's subset, epochs and batches;
    bad values are named; a
    folder made with one schedule refuses another (its cached subset and runs would be reused)."""
    mod = _recipe_module("reproduce_recipe_schedule")

    def overrides(*argv):
        return mod.schedule_overrides(mod.parse_args(["--out", str(tmp_path), *argv]))

    assert overrides() == {}
    assert overrides("--train-rows", "all", "--epochs", "2") == {"train_rows": None, "epochs": 2.0}
    assert overrides("--train-rows", "5000") == {"train_rows": 5000}
    assert overrides("--two-stage", "--methods", "deebert,pabee") == {"two_stage": True}
    assert overrides("--random-batches") == {"group_by_length": False}
    with pytest.raises(ValueError, match="--two-stage trains the early-exit model .* not past-future"):
        overrides("--two-stage", "--methods", "deebert,past-future")
    with pytest.raises(ValueError, match="--two-stage"):
        overrides("--two-stage")  # every method by default
    for argv, message in ((("--train-rows", "0"), "--train-rows"), (("--train-rows", "-3"), "--train-rows"),
                          (("--train-rows", "half"), "--train-rows"), (("--epochs", "0"), "--epochs"),
                          (("--epochs", "nan"), "--epochs")):
        with pytest.raises(ValueError, match=message):
            overrides(*argv)
    sst2 = mod.TASKS["SST-2"]
    mod.check_schedule(tmp_path, sst2)
    mod.check_schedule(tmp_path, sst2)  # the same schedule again: fine
    from dataclasses import replace

    with pytest.raises(ValueError, match="use another --out"):
        mod.check_schedule(tmp_path, replace(sst2, train_rows=None, epochs=2.0))
    with pytest.raises(ValueError, match="use another --out"):
        mod.check_schedule(tmp_path, replace(sst2, two_stage=True))
    with pytest.raises(ValueError, match="use another --out"):
        mod.check_schedule(tmp_path, replace(sst2, group_by_length=False))
    with pytest.raises(ValueError, match="use another --out"):
        mod.check_schedule(tmp_path, replace(sst2, lr=5e-5))
    # a folder recorded before length-grouped batches and recorded rates holds random-batch runs at 5e-5 / 5e-4
    old = tmp_path / "old"
    mod.write_json(old / "data" / "SST-2" / "schedule.json", {"train_rows": 20000, "epochs": 1.0})
    mod.check_schedule(old, replace(sst2, group_by_length=False, lr=5e-5, head_lr=5e-4))
    with pytest.raises(ValueError, match="'batches': 'random'"):
        mod.check_schedule(old, sst2)
    grouped = tmp_path / "grouped"  # the thirteenth session's folders: grouped, rates not recorded
    mod.write_json(grouped / "data" / "MRPC" / "schedule.json",
                   {"train_rows": None, "epochs": 3.0, "batches": "length-grouped"})
    mod.check_schedule(grouped, mod.TASKS["MRPC"])
    r = subprocess.run([sys.executable, str(RECIPE), "--out", str(tmp_path), "--train-rows", "half"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --train-rows must be" in r.stderr and "Traceback" not in r.stderr


def test_merge_writes_the_outputs_of_several_folders(tmp_path):
    """--merge: the outputs of other folders join this call's; a (task, method) in several is
    taken whole from the last folder, and from --out's own runs before any; a folder without
    results, or a --quick one among real ones, is a one-line error before any training."""
    mod = _recipe_module("reproduce_recipe_merge")
    f = make_files(tmp_path / "files")

    def row(task, method, point, acc, layer):
        return dict(task=task, method=method, criterion="entropy", point=point, threshold=0.1, accuracy=acc,
                    f1=acc if task == "MRPC" else None,
                    full_accuracy=0.9, layer_speedup=layer, flops_speedup=layer, wallclock_speedup=layer,
                    mean_exit_layer=6 / layer, exit_histogram={}, train_seconds=1.0, train_cpu_s=1.0)

    def folder(name, rows, curves, quick=False):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"backbone": "b", "quick": quick, "rows": rows}))
        (d / "curves.json").write_text(json.dumps(curves))
        return str(d)

    curve = [{"threshold": 0.1, "layer_speedup": 1.0, "accuracy": 0.9}, {"threshold": 0.5, "layer_speedup": 2.0,
                                                                         "accuracy": 0.85}]
    a = folder("a", [row("SST-2", "deebert", "1x", 0.90, 1.0), row("SST-2", "deebert", "2x", 0.88, 2.0),
                     row("MRPC", "pabee", "1x", 0.80, 1.0)], {"SST-2": {"deebert": curve}, "MRPC": {"pabee": curve}})
    b = folder("b", [row("SST-2", "deebert", "1x", 0.91, 1.0), row("RTE", "cascadebert", "1x", 0.6, 1.0)],
               {"SST-2": {"deebert": curve[:1]}})
    out = tmp_path / "out"
    base = [sys.executable, str(RECIPE), "--out", str(out), "--model", str(f["clf"]), "--methods", ""]
    r = subprocess.run(base + ["--merge", a, b], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = [(r["task"], r["method"], r["point"], r["accuracy"]) for r in rows]
    # SST-2's deebert whole from b (its 2x point, only in a, is gone); the grid's task order
    assert got == [("SST-2", "deebert", "1x", 0.91), ("MRPC", "pabee", "1x", 0.80), ("RTE", "cascadebert", "1x", 0.6)]
    curves = json.loads((out / "curves.json").read_text())
    assert curves["SST-2"]["deebert"] == curve[:1] and curves["MRPC"]["pabee"] == curve
    assert "| DeeBERT (entropy) | 91.0 |" in (out / "results.md").read_text()
    assert all((out / f"{t}.png").stat().st_size > 1000 for t in ("SST-2", "MRPC", "RTE"))
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 3

    # --out's own runs win over every merged folder
    own = ([row("MRPC", "pabee", "1x", 0.7, 1.0)], {"MRPC": {"pabee": curve[:1]}})
    rows, curves = mod.combined(mod.merge_results([Path(a)], quick=False), own)
    assert [(r["task"], r["method"], r["accuracy"]) for r in rows] == [
        ("SST-2", "deebert", 0.90), ("SST-2", "deebert", 0.88), ("MRPC", "pabee", 0.7)]
    assert curves["MRPC"]["pabee"] == curve[:1] and curves["SST-2"]["deebert"] == curve

    quick = folder("q", [row("SST-2", "deebert", "1x", 0.5, 1.0)], {}, quick=True)
    for argv, message in (([str(tmp_path / "files")], "no results.json there"), ([a, quick], "--quick")):
        r = subprocess.run(base + ["--merge", *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_mrpc_plot_draws_f1(tmp_path, monkeypatch):
    """An F1 task's PNG plots F1: a curve that carries it as a line, one swept before curves
    carried F1 through its measured rows (dashed), the full model at the 1x row's F1."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    mod = _recipe_module("reproduce_recipe_plot")
    drawn = {}
    real_plot, real_scatter = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.scatter

    def plot(ax, x, y, **kw):
        drawn[kw.get("label")] = (list(x), list(y), kw.get("linestyle"))
        return real_plot(ax, x, y, **kw)

    def scatter(ax, x, y, **kw):
        drawn[kw.get("label", "point")] = (list(x), list(y), None)
        return real_scatter(ax, x, y, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)

    def row(method, point, acc, f1, layer):
        return dict(task="MRPC", method=method, criterion="entropy", point=point, accuracy=acc, f1=f1,
                    full_accuracy=0.75, layer_speedup=layer, flops_speedup=layer)

    rows = [row("deebert", "1x", 0.76, 0.84, 1.0), row("deebert", "2x", 0.70, 0.81, 2.0),
            row("pabee", "1x", 0.74, 0.83, 1.0), row("pabee", "2x", 0.66, 0.79, 2.0)]
    curves = {"deebert": [{"layer_speedup": 1.0, "accuracy": 0.76, "f1": 0.84},
                          {"layer_speedup": 1.5, "accuracy": 0.73, "f1": 0.82}],
              "pabee": [{"layer_speedup": 1.0, "accuracy": 0.74}, {"layer_speedup": 1.7, "accuracy": 0.70}]}
    mod.plot("MRPC", rows, curves, tmp_path / "MRPC.png")
    assert (tmp_path / "MRPC.png").stat().st_size > 1000
    assert drawn["deebert"] == ([1.0, 1.5], [84.0, 82.0], None)
    assert drawn["pabee"] == ([1.0, 2.0], [83.0, 79.0], "--")
    assert drawn["full model"] == ([1.0], [84.0], None)
    mod.plot("SST-2", [dict(r, task="SST-2") for r in rows], curves, tmp_path / "SST-2.png")
    assert drawn["pabee"] == ([1.0, 1.7], [74.0, 70.0], None) and drawn["full model"] == ([1.0], [75.0], None)
