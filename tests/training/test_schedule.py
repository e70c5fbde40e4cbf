"""Staged trainings (:mod:`eekernels.training.schedule`): the record, and DeeBERT's two stages
stopped and resumed through the method registry."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.methods import registry  # noqa: E402
from eekernels.training.schedule import StepSchedule, schedule_resume_point  # noqa: E402

from ..tiny import ParityTask, tiny_classifier  # noqa: E402
from ..trainer_stops import FirstSteps, MethodTraining  # noqa: E402


def test_record_keeps_steps_state_and_weights(tmp_path):
    """``finish`` writes the finished steps, the state and the weights; a resumed schedule
    reads them back into a fresh model, a fresh one ignores them."""
    area = str(tmp_path / "area")
    model = torch.nn.Linear(3, 2)
    schedule = StepSchedule(area, "record.pt", model, resume=False)
    assert schedule_resume_point(area, "record.pt") is None
    schedule.state["first"] = 0.5
    schedule.finish("first")
    assert schedule_resume_point(area, "record.pt") == os.path.join(area, "record.pt")
    assert not os.path.exists(os.path.join(area, "record.pt.tmp"))
    other = torch.nn.Linear(3, 2)
    resumed = StepSchedule(area, "record.pt", other, resume=True)
    assert resumed.done == ["first"] and resumed.state == {"first": 0.5} and resumed.finished("first")
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    assert resumed.checkpoint("second") is None  # the step never saved one
    fresh = StepSchedule(area, "record.pt", torch.nn.Linear(3, 2), resume=False)
    assert fresh.done == [] and fresh.state == {} and fresh.checkpoint("first") is None
    with pytest.raises(ValueError, match="another model than this training's"):
        StepSchedule(area, "record.pt", torch.nn.Linear(4, 2), resume=True)


@pytest.mark.parametrize("stop, first_steps", [((2, 0), [1]), ((2, 6), [5])],
                         ids=["between-stages", "inside-a-stage"])
def test_two_stage_training_resumes_where_it_was_stopped(tmp_path, monkeypatch, stop, first_steps):
    """DeeBERT's two stages (final head with the backbone, then the internal exits) stopped
    and run again with the method's resume point: the finished stage is skipped, the stopped
    one goes on from its checkpoint, and the weights equal an uninterrupted run's."""
    spec = registry.get_method("early-exit")
    options = {**registry.parse_options(spec, []), "two_stage": True, "exit_pooling": "cls"}
    run = MethodTraining(monkeypatch, spec, options, lambda: tiny_classifier("bert", seed=4), ParityTask(64, seed=3))
    whole, whole_losses = run(tmp_path / "whole")
    area = tmp_path / "stopped"
    point = run.stopped(area, stop)
    seen = FirstSteps()
    run.callbacks[:] = [seen]
    model, losses = run(area, point)
    assert seen.first == first_steps
    assert set(losses) == set(whole_losses) == {"final", "internal"}
    want = whole.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
