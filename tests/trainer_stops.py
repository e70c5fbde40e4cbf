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


class MethodTraining:
    """A registry method's training (``spec.train``) of a fresh model on ``data`` into a
    staging area, ten steps per Trainer run with a checkpoint every four, ``callbacks``
    reaching every Trainer run of the method's schedule (through ``registry._trainer``)."""

    def __init__(self, monkeypatch, spec, options, make_hf, data):
        from eekernels.methods import registry

        self.spec, self.options, self.make_hf, self.data = spec, options, make_hf, data
        self.callbacks: list = []
        real_trainer = registry._trainer
        monkeypatch.setattr(registry, "_trainer", lambda *a, **kw: real_trainer(*a, callbacks=self.callbacks, **kw))

    def __call__(self, area, resume_from=None):
        """(model, losses) of one run into ``area``, continued from ``resume_from`` if given."""
        model = self.spec.build(self.make_hf(), None, self.options)
        args = transformers.TrainingArguments(
            output_dir=str(area), per_device_train_batch_size=16, max_steps=10, learning_rate=3e-3,
            logging_steps=5, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="steps",
            save_steps=4, resume_from_checkpoint=resume_from)
        return model, self.spec.train(model, args, self.data, None, self.options, lambda m: None)

    def stopped(self, area, stop):
        """Run into ``area`` until :class:`StopAtStep` ``(*stop)`` kills it; the method's resume
        point then (there was none before)."""
        import pytest

        assert self.spec.resume_point(str(area)) is None
        self.callbacks[:] = [StopAtStep(*stop)]
        with pytest.raises(KeyboardInterrupt):
            self(area)
        point = self.spec.resume_point(str(area))
        assert point is not None
        return point
