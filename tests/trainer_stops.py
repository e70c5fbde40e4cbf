"""Trainer callbacks for the resume tests of staged trainings: a kill at a chosen step of a
chosen Trainer run, and the first step each run takes."""

from __future__ import annotations

import transformers


class StopAtStep(transformers.TrainerCallback):
    """Raises inside the ``run``-th Trainer run it sees (1-based) once that run has reached
    ``step``: a kill, as far as a schedule's record is concerned."""

    def __init__(self, run: int, step: int = 0):
        self.run, self.step, self.runs = run, step, 0

    def on_train_begin(self, args, state, control, **kw):
        self.runs += 1

    def on_step_end(self, args, state, control, **kw):
        if self.runs == self.run and state.global_step >= self.step:
            raise KeyboardInterrupt(f"stopped in run {self.run} at step {state.global_step}")


class FirstSteps(transformers.TrainerCallback):
    """The first step each Trainer run it sees ends (a run continued from checkpoint-k ends
    step k + 1 first)."""

    def __init__(self):
        self.first = []

    def on_train_begin(self, args, state, control, **kw):
        self.first.append(None)

    def on_step_end(self, args, state, control, **kw):
        if self.first[-1] is None:
            self.first[-1] = state.global_step
