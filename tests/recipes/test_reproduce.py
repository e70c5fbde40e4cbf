"""python/reproduce.py --quick end to end on the tiny text task (CPU): every method of the
grid trains, is measured and lands in results.csv/json, curves.json and the task's PNG;
a second run redoes nothing."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from ..text_task import make_files  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "python" / "reproduce.py"


def test_reproduce_quick_grid_runs_and_resumes(tmp_path):
    f = make_files(tmp_path / "files")
    data = tmp_path / "data" / "TINY"
    data.mkdir(parents=True)
    shutil.copy(f["train"], data / "train.tsv")
    shutil.copy(f["dev"], data / "dev.tsv")
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


def test_reproduce_refuses_unknown_methods(tmp_path):
    r = subprocess.run([sys.executable, str(RECIPE), "--out", str(tmp_path), "--methods", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown method" in r.stderr and "Traceback" not in r.stderr
