"""WeightWatch notices each way a weight changes (written in place, replaced in its module)
and nothing else; each change is reported once."""

import torch
from torch import nn

from eekernels.engine.weight_watch import WeightWatch, parameter_slots


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))


def test_unchanged_weights_are_not_reported():
    model = _model()
    watch = WeightWatch(parameter_slots(model))
    model(torch.randn(5, 4)).sum().backward()  # a forward and backward write no weight
    assert not watch.changed()
    assert not watch.changed()


def test_in_place_write_is_reported_once():
    model = _model()
    watch = WeightWatch(parameter_slots(model))
    with torch.no_grad():
        model[2].weight.mul_(2.0)
    assert watch.changed()
    assert not watch.changed()


def test_optimizer_step_and_load_state_dict_are_reported():
    model = _model()
    watch = WeightWatch(parameter_slots(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert watch.changed()
    model.load_state_dict(_model().state_dict())
    assert watch.changed()


def test_replaced_parameter_is_reported_even_at_the_same_version():
    model = _model()
    watch = WeightWatch(parameter_slots(model))
    old = model[0].bias
    new = nn.Parameter(old.detach().clone())
    with torch.no_grad():
        while new._version < old._version:  # the same version: only the slot's tensor differs
            new.add_(0.0)
    assert new._version == old._version
    model[0].bias = new
    assert watch.changed()
    assert not watch.changed()


def test_parameter_set_to_none_is_reported():
    model = _model()
    watch = WeightWatch(parameter_slots(model))
    model[0].bias = None
    assert watch.changed()
    assert not watch.changed()


def test_slots_cover_every_parameter():
    model = _model()
    slots = parameter_slots(model)
    held = [m._parameters[n] for m, n in slots]
    assert {id(p) for p in held if p is not None} == {id(p) for p in model.parameters()}
    assert held.count(None) == 1  # the second layer's absent bias is a slot too
