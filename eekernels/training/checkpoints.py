"""Where a training keeps its HF ``Trainer`` checkpoints, and which of them a resumed run may use.

A checkpoint is whole once its ``trainer_state.json`` parses and names the checkpoint's own
step (Trainer writes that file last); anything else is what a kill inside a save left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

__all__ = ["checkpoints_dir", "drop_torn_checkpoints", "last_checkpoint", "last_checkpoint_in"]


def checkpoints_dir(out: str) -> str:
    """The staging area of ``out``'s training checkpoints: a hidden directory beside it (the
    output directory itself is replaced in one step at the end, see :mod:`eekernels._atomic`)."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.checkpoints")


def _complete(checkpoint: str, step: int) -> bool:
    # Trainer writes trainer_state.json last: a checkpoint is whole once it parses and
    # names the checkpoint's own step.
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return json.load(f).get("global_step") == step
    except (OSError, ValueError):
        return False


def _checkpoints(area: str):
    """(step, path, complete) of every Trainer checkpoint folder directly in ``area``."""
    found = []
    for name in os.listdir(area) if os.path.isdir(area) else []:
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m:
            path = os.path.join(area, name)
            found.append((int(m.group(1)), path, _complete(path, int(m.group(1)))))
    return sorted(found)


def last_checkpoint_in(area: str) -> Optional[str]:
    """The last complete Trainer checkpoint directly in ``area`` (None: none)."""
    complete = [path for _, path, ok in _checkpoints(area) if ok]
    return complete[-1] if complete else None


def drop_torn_checkpoints(area: str) -> None:
    """Delete what a kill inside a save left in ``area``: Trainer's rotation keeps the
    highest-numbered checkpoints, so a torn one would outlive the good ones a resumed run writes."""
    for _, path, ok in _checkpoints(area):
        if not ok:
            shutil.rmtree(path, ignore_errors=True)


def last_checkpoint(out: str) -> Optional[str]:
    """The last complete checkpoint in ``out``'s staging area (None: none)."""
    return last_checkpoint_in(checkpoints_dir(out))
