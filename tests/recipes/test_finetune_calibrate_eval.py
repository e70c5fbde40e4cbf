"""python/finetune_calibrate_eval.py end to end on the tiny text task (CPU): it trains,
calibrates on dev, evaluates on a held-out file, writes its report, and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from ..text_task import make_files  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "python" / "finetune_calibrate_eval.py"


def run(*args):
    r = subprocess.run([sys.executable, str(RECIPE), *map(str, args)], capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


def test_recipe_trains_calibrates_evaluates_and_resumes(tmp_path):
    f = make_files(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--model", f["clf"], "--train", f["train"], "--dev", f["dev"], "--eval", f["train"], "--out", out,
            "--method", "early-exit", "--epochs", 3, "--batch-size", 16, "--lr", 1e-2, "--seed", 0, "--cpu",
            "--target-speedup", 2.0]
    rc, stdout, stderr = run(*argv)
    assert rc == 0, stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["method"] == "early-exit" and not r["in_sample"] and r["eval"] == str(f["train"])
    assert r["calibration"]["layer_speedup"] >= 2.0  # met on dev, where it was calibrated
    assert r["evaluation"]["threshold"] == r["threshold"] == r["calibration"]["threshold"]
    assert r["layer_speedup"] > 1.5  # the dev threshold carries over to the held-out file
    assert r["accuracy"] > 0.85 and r["full_accuracy"] > 0.9  # the task is learnable by layer 1
    assert r["train_cpu_s"] > 0 and set(r["dev_accuracy_per_exit"]) == {"1", "2", "3", "4"}
    rc, stdout, _ = run(*argv)  # a finished run is not redone
    assert rc == 0 and "reusing the trained model" in stdout


def test_recipe_bad_input_is_one_line(tmp_path):
    rc, _, stderr = run("--out", tmp_path / "x", "--train", tmp_path / "nope.tsv", "--dev", tmp_path / "nope.tsv",
                        "--model", tmp_path)
    assert rc == 2 and "error:" in stderr and "Traceback" not in stderr
