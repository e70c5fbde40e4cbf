"""kill -9 during `eekernels train` never leaves a half-written output directory: --out holds
the previous model or the new one, loadable, whenever the process dies; and `train --resume`
continues a killed run from its last checkpoint to the model an uninterrupted run ends with."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

import eekernels  # noqa: E402
from eekernels.training.finetune import checkpoints_dir, last_checkpoint  # noqa: E402

from ..text_task import make_files  # noqa: E402


def train_cmd(f, out, steps, *extra):
    return [sys.executable, "-m", "eekernels", "train", "--model", str(f["clf"]), "--train", str(f["train"]),
            "--out", str(out), "--max-steps", str(steps), "--batch-size", "8", "--cpu", "--logging-steps", "1",
            *map(str, extra)]


def weights(out):
    """Every tensor of a saved model, by name (the HF backbone's and the method's)."""
    from safetensors.torch import load_file

    return {**load_file(str(out / "model.safetensors")), **{f"ee.{k}": v for k, v in
                                                             load_file(str(out / "eekernels.safetensors")).items()}}


def test_kill_9_leaves_the_previous_or_the_new_model(tmp_path):
    """Kills at moments spread from start-up to the final save (a checkpoint is written every
    step, so some land inside a checkpoint write): --out stays loadable, and the staging
    area holds nothing that --resume would take for a whole checkpoint unless it is one."""
    from safetensors.torch import load_file

    f = make_files(tmp_path / "data")
    out = tmp_path / "out"
    subprocess.run(train_cmd(f, out, 1), check=True, capture_output=True, timeout=900)
    first = (out / "eekernels.safetensors").read_bytes()
    t0 = time.time()
    subprocess.run(train_cmd(f, tmp_path / "timing", 6, "--save-steps", 1), check=True, capture_output=True,
                   timeout=900)
    duration = time.time() - t0
    outcomes = set()
    for frac in (0.5, 0.7, 0.9, 1.1):  # from start-up to the final save
        p = subprocess.Popen(train_cmd(f, out, 6, "--save-steps", 1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
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
        checkpoint = last_checkpoint(str(out))
        if checkpoint is not None:  # what --resume would start from is whole
            assert load_file(os.path.join(checkpoint, "model.safetensors"))
    assert "previous" in outcomes  # some kills hit before the swap


def wait_for(cond, proc, timeout=600.0):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, "the training run ended before it could be killed"
        assert time.time() - t0 < timeout, "timed out waiting for the training run"
        time.sleep(0.01)


def test_resume_after_kill_9_ends_with_the_uninterrupted_model(tmp_path):
    """Killed after a checkpoint, resumed with --resume: the same weights as one
    uninterrupted run with the same seed (same data order, optimizer and scheduler state,
    RNG). The kill also left a later checkpoint half-written (what a kill inside Trainer's
    save leaves: weights and trainer_state.json cut short), which resuming must skip."""
    f = make_files(tmp_path / "data")
    steps, every = 40, 5
    args = ("--save-steps", every, "--seed", "3", "--lr", "1e-3")
    full = tmp_path / "full"
    subprocess.run(train_cmd(f, full, steps, *args), check=True, capture_output=True, timeout=900)
    assert not os.path.exists(checkpoints_dir(str(full)))  # a finished run leaves no staging area

    out = tmp_path / "out"
    area = checkpoints_dir(str(out))
    p = subprocess.Popen(train_cmd(f, out, steps, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: last_checkpoint(str(out)) is not None, p)
    finally:
        p.kill()  # SIGKILL
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()  # killed before its final save
    resumed_from = last_checkpoint(str(out))
    step = int(resumed_from.rsplit("-", 1)[1])
    assert step < steps
    torn = os.path.join(area, f"checkpoint-{step + 10 * every}")
    shutil.copytree(resumed_from, torn)
    for name in ("model.safetensors", "trainer_state.json"):
        with open(os.path.join(torn, name), "r+b") as fh:
            fh.truncate(os.path.getsize(os.path.join(torn, name)) // 2)
    assert last_checkpoint(str(out)) == resumed_from  # skipped; --resume removes it
    from safetensors.torch import load_file

    at_checkpoint = load_file(os.path.join(resumed_from, "model.safetensors"))

    r = subprocess.run(train_cmd(f, out, steps, *args, "--resume"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {resumed_from}" in r.stdout
    a, b = weights(full), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not os.path.exists(area)
    # the comparison can fail: training moved the weights on from the checkpoint it resumed
    final = eekernels.load(str(out)).state_dict()
    assert any(not torch.allclose(final[k], v, rtol=1e-5, atol=1e-6) for k, v in at_checkpoint.items())


def test_resume_with_nothing_to_resume_is_a_user_error(tmp_path):
    f = make_files(tmp_path / "data")
    r = subprocess.run(train_cmd(f, tmp_path / "out", 2, "--resume"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 2
    assert "--resume: no checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
