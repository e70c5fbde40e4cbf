"""A training made of several HF ``Trainer`` runs ("steps"), resumable between and inside them.

Methods whose paper trains in stages (ConsistentEE's rounds, CascadeBERT's members one after
another) run each stage as its own Trainer run in ``output_dir/<step name>``. After each
step the schedule writes one record (atomically): the steps finished, what the schedule has
gathered so far (losses, measurements: any ``torch.save``-able dict) and the model's
``state_dict``. A resumed run loads the record, skips the finished steps and continues the
interrupted one from its own last complete checkpoint. Each Trainer seeds itself from its
``args.seed``, so a run resumed between steps ends with the weights an uninterrupted run
would have.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

import torch

from .checkpoints import drop_torn_checkpoints, last_checkpoint_in

__all__ = ["StepSchedule", "schedule_resume_point"]


def schedule_resume_point(output_dir: str, record_file: str) -> Optional[str]:
    """What an interrupted schedule in ``output_dir`` left to go on from: its record
    ``record_file``, else a complete Trainer checkpoint in a step's folder (before the first
    step ends there is no record, and only that step has a folder; None: nothing)."""
    record = os.path.join(output_dir, record_file)
    if os.path.isfile(record):
        return record
    steps = sorted(os.scandir(output_dir), key=lambda e: e.name) if os.path.isdir(output_dir) else []
    found = (last_checkpoint_in(e.path) for e in steps if e.is_dir())
    return next((c for c in found if c is not None), None)


class StepSchedule:
    """The record of one staged training in ``output_dir``.

    Args:
        output_dir: the staging area (each step's Trainer writes under ``output_dir/<step>``).
        record_file: the record's file name in ``output_dir`` (one per method).
        model: the model the steps train; on ``resume`` its weights are loaded from the record.
        resume: load the record (when there is one) and continue the interrupted step from its
            last complete checkpoint; otherwise the record is ignored and overwritten.

    Attributes:
        done: the names of the finished steps, in order.
        state: what the schedule gathered so far (restored on resume; the caller's to fill).
    """

    def __init__(self, output_dir: str, record_file: str, model, resume: bool):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, record_file)
        self.model = model
        self.resume = resume
        self.done: List[str] = []
        self.state: Dict[str, Any] = {}
        if resume and os.path.isfile(self.path):
            record = torch.load(self.path, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(record["model"])
            except RuntimeError as e:  # another model's weights (other options, another method)
                raise ValueError(f"{self.path} holds the weights of another model than this training's "
                                 f"({str(e).splitlines()[0]}); train again without resuming") from None
            # ("result": ConsistentEE's records before this module held the same dict)
            self.done, self.state = list(record["done"]), dict(record.get("state", record.get("result", {})))

    def finished(self, step: str) -> bool:
        """Whether ``step`` ended in a run this record remembers."""
        return step in self.done

    def step_dir(self, step: str) -> str:
        """Where ``step``'s Trainer writes its checkpoints."""
        return os.path.join(self.output_dir, step)

    def checkpoint(self, step: str) -> Optional[str]:
        """The checkpoint ``step``'s Trainer continues from (None: it starts afresh)."""
        if not self.resume:
            return None
        drop_torn_checkpoints(self.step_dir(step))
        return last_checkpoint_in(self.step_dir(step))

    def step_args(self, args, step: str, **overrides):
        """``args`` (``TrainingArguments``) for ``step``'s Trainer: its own folder, its
        checkpoint to continue from (``resume_from_checkpoint``), and ``overrides``."""
        return dataclasses.replace(args, output_dir=self.step_dir(step),
                                   resume_from_checkpoint=self.checkpoint(step), **overrides)

    def finish(self, step: str) -> None:
        """Record ``step`` as finished, with the model and :attr:`state` as they are now."""
        if step not in self.done:
            self.done.append(step)
        os.makedirs(self.output_dir, exist_ok=True)
        tmp = self.path + ".tmp"
        torch.save({"done": list(self.done), "state": self.state, "model": self.model.state_dict()}, tmp)
        os.replace(tmp, self.path)
