"""kill -9 during `eekernels train` never leaves a half-written output directory: --out holds
the previous model or the new one, loadable, whenever the process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

import eekernels  # noqa: E402

from ..text_task import make_files  # noqa: E402


def train_cmd(f, out, steps):
    return [sys.executable, "-m", "eekernels", "train", "--model", str(f["clf"]), "--train", str(f["train"]),
            "--out", str(out), "--max-steps", str(steps), "--batch-size", "8", "--cpu", "--logging-steps", "1"]


def test_kill_9_leaves_the_previous_or_the_new_model(tmp_path):
    f = make_files(tmp_path / "data")
    out = tmp_path / "out"
    subprocess.run(train_cmd(f, out, 1), check=True, capture_output=True, timeout=300)
    first = (out / "eekernels.safetensors").read_bytes()
    t0 = time.time()
    subprocess.run(train_cmd(f, tmp_path / "timing", 6), check=True, capture_output=True, timeout=300)
    duration = time.time() - t0
    outcomes = set()
    for frac in (0.5, 0.9, 1.1):  # from start-up to the final save
        p = subprocess.Popen(train_cmd(f, out, 6), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(frac * duration)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        model = eekernels.load(str(out))  # always loadable
        assert model.exit_layers == [1, 2, 3, 4]
        now = (out / "eekernels.safetensors").read_bytes()
        outcomes.add("previous" if now == first else "new")
        first = now
        # what a killed run leaves is at most a hidden staging directory, removed by the next run
        assert len([n for n in os.listdir(tmp_path) if n.startswith(".out.staged-")]) <= 1
    assert "previous" in outcomes  # some kills hit before the swap
