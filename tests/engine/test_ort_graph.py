"""``early_exit(engine="ort-graph")``: the whole early-exit forward as one ONNX Runtime graph
(:mod:`eekernels.engine.ort_graph`) decides as the row engine does, on every architecture,
pooling and rule it takes, with forced profiles, zero rows left, no padding, length groups
and changed weights; and refuses what it cannot run, naming the problem."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("transformers")

from eekernels.models import convert  # noqa: E402

from ..tiny import ARCHS, N_LAYERS, mid_threshold, ragged_batch, tiny_classifier  # noqa: E402


def _same(out, ref):
    assert torch.equal(out.exit_layer, ref.exit_layer), (out.exit_layer, ref.exit_layer)
    assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.pred, ref.pred)
    assert out.layer_speedup == pytest.approx(ref.layer_speedup)
    assert out.flops_speedup == pytest.approx(ref.flops_speedup)
    assert out.layers_run == ref.layers_run


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
def test_the_graph_decides_as_the_row_engine(arch, pooling, criterion):
    model = convert(tiny_classifier(arch), exit_pooling=pooling).eval()
    ids, mask, _ = ragged_batch(8, 12, seed=5)
    thr = mid_threshold(model, ids, mask, criterion)
    ref = model.early_exit(ids, mask, criterion=criterion, threshold=thr, executor="hf")
    out = model.early_exit(ids, mask, criterion=criterion, threshold=thr, engine="ort-graph")
    assert len(set(ref.exit_layer.tolist())) > 1, "the threshold should spread the exits"
    _same(out, ref)
    # every row leaves at the first exit point: the later layers run on zero rows
    everyone = float("inf") if criterion == "entropy" else 0.0
    gone = model.early_exit(ids, mask, criterion=criterion, threshold=everyone, engine="ort-graph")
    assert (gone.exit_layer == 1).all()
    _same(gone, model.early_exit(ids, mask, criterion=criterion, threshold=everyone, executor="hf"))
    assert not any(n.op_type == "If" for n in model._ort_graph("ort").graph(criterion).graph.node)
    # left padding: the layer graphs keep the raw [N, S] mask
    left = model.early_exit(ids.flip(1), mask.flip(1), criterion=criterion, threshold=thr, engine="ort-graph")
    _same(left, model.early_exit(ids.flip(1), mask.flip(1), criterion=criterion, threshold=thr, executor="hf"))


def test_exit_points_forced_profiles_and_zero_rows_left():
    """Exits after some layers only; a benchmark's forced profile; every row gone after the
    first exit point (the later layers run on zero rows); one row without padding."""
    model = convert(tiny_classifier("bert"), exit_layers=[2, 3]).eval()
    ids, mask, _ = ragged_batch(6, 10, seed=7)
    profile = torch.tensor([1, 2, 3, 4, 4, 2])
    ref = model.early_exit(ids, mask, threshold=0.0, exit_profile=profile, executor="hf")
    out = model.early_exit(ids, mask, threshold=0.0, exit_profile=profile, engine="ort-graph")
    assert out.exit_layer.tolist() == [2, 2, 3, 4, 4, 2]
    _same(out, ref)
    gone = model.early_exit(ids, mask, threshold=float("inf"), engine="ort-graph")
    assert (gone.exit_layer == 2).all()
    _same(gone, model.early_exit(ids, mask, threshold=float("inf"), executor="hf"))
    one = model.early_exit(ids[:1], None, threshold=0.0, engine="ort-graph")
    assert int(one.exit_layer) == N_LAYERS
    _same(one, model.early_exit(ids[:1], None, threshold=0.0, executor="hf"))
    # calls without a profile run a graph without its operators: three fewer per internal exit point
    engine = model._ort_graph("ort")
    serving, profiled = engine.graph("entropy"), engine.graph("entropy", forced=True)
    assert [i.name for i in profiled.graph.input if i.name == "forced"] == ["forced"]
    assert not any(i.name == "forced" for i in serving.graph.input)
    assert len(profiled.graph.node) - len(serving.graph.node) == 3 * (len(model.exit_points) - 1)
    # and the same profile through a graph whose weights changed since: both rebuilt
    with torch.no_grad():
        model.head(2).classifier.bias.add_(0.25)
    _same(model.early_exit(ids, mask, threshold=0.0, exit_profile=profile, engine="ort-graph"),
          model.early_exit(ids, mask, threshold=0.0, exit_profile=profile, executor="hf"))


def test_length_groups_and_changed_weights():
    model = convert(tiny_classifier("roberta"), exit_pooling="mean").eval()
    ids, mask, _ = ragged_batch(10, 14, seed=9)
    thr = mid_threshold(model, ids, mask, "entropy")
    plain = model.early_exit(ids, mask, threshold=thr, engine="ort-graph")
    grouped = model.early_exit(ids, mask, threshold=thr, engine="ort-graph", group_by_length=True)
    _same(grouped, plain)
    head = model.head(1).classifier.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.mul_(-4.0)  # a training step in place: the graph is rebuilt
        out = model.early_exit(ids, mask, threshold=thr, engine="ort-graph")
        _same(out, model.early_exit(ids, mask, threshold=thr, executor="hf"))
        assert not torch.equal(out.logits, plain.logits)
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_int8_layers_compose():
    """``executor="ort-int8"`` composes the quantized layer graphs: it agrees with the row
    engine on the same quantized graphs."""
    model = convert(tiny_classifier("bert")).eval()
    ids, mask, _ = ragged_batch(6, 9, seed=2)
    out = model.early_exit(ids, mask, threshold=0.0, engine="ort-graph", executor="ort-int8")
    ops = {n.op_type for n in model._ort_graph("ort-int8").graph("entropy").graph.node}
    assert "QAttention" in ops, ops
    rows = model.early_exit(ids, mask, threshold=0.0, executor="ort-int8")
    assert (out.exit_layer == N_LAYERS).all()
    assert torch.allclose(out.logits, rows.logits, rtol=1e-4, atol=1e-5)
    # every row leaves at layer 1: ORT's QAttention divides by zero on zero rows, so the
    # layers after an exit point must not run once no row is left
    gone = model.early_exit(ids, mask, threshold=float("inf"), engine="ort-graph", executor="ort-int8")
    assert (gone.exit_layer == 1).all()
    assert sum(n.op_type == "If" for n in model._ort_graph("ort-int8").graph("entropy").graph.node) == 1


def test_consistentee_classic_rules_run_in_the_graph():
    from eekernels.methods.consistentee import ConsistentEEModel

    model = convert(tiny_classifier("bert"), cls=ConsistentEEModel).eval()
    ids, mask, _ = ragged_batch(6, 9, seed=4)
    thr = mid_threshold(model, ids, mask, "entropy")
    _same(model.early_exit(ids, mask, criterion="entropy", threshold=thr, engine="ort-graph"),
          model.early_exit(ids, mask, criterion="entropy", threshold=thr, executor="hf"))
    with pytest.raises(ValueError, match="engine='ort-graph'.*criterion"):
        model.early_exit(ids, mask, criterion="policy", engine="ort-graph")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_graph_checks_the_input_values(arch):
    """The graph checks the values (early_exit leaves them to it) and check_values names the
    problem: the same messages as the other engines, for every kind of bad value, and a
    good batch with a bool or float mask still runs."""
    model = convert(tiny_classifier(arch), exit_pooling="cls").eval()
    ids, mask, _ = ragged_batch(4, 9, seed=3)
    vocab = model.hf.config.vocab_size
    types_limit = model.hf.config.type_vocab_size
    bad_ids_high, bad_ids_low, bad_mask, empty_row = ids.clone(), ids.clone(), mask.clone(), mask.clone()
    bad_ids_high[1, 2] = vocab
    bad_ids_low[2, 1] = -1  # ONNX Gather would wrap a negative index silently
    bad_mask[0, 1] = 2
    empty_row[3] = 0
    cases = [(dict(input_ids=bad_ids_high), "input_ids must lie in"),
             (dict(input_ids=bad_ids_low), "input_ids must lie in"),
             (dict(token_type_ids=torch.full_like(ids, types_limit)), "token_type_ids must lie in"),
             (dict(attention_mask=bad_mask), "only 0 \\(padding\\) and 1"),
             (dict(attention_mask=empty_row), "row 3 has no token"),
             (dict(attention_mask=mask.float() * 0.5 + (mask == 1).float() * 0.5 - 0.25 * (mask == 0).float()),
              "only 0 \\(padding\\) and 1")]
    for engine in ("ort-graph", "rows"):
        for change, message in cases:
            batch = {"input_ids": ids, "attention_mask": mask, **change}
            with pytest.raises(ValueError, match=message):
                model.early_exit(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                 engine=engine, threshold=0.3)
    ref = model.early_exit(ids, mask, threshold=0.3, executor="hf")
    for good in (mask.bool(), mask.float()):
        _same(model.early_exit(ids, good, threshold=0.3, engine="ort-graph"), ref)


def test_what_the_graph_cannot_run_is_refused():
    from eekernels.methods.past_future import convert as convert_past_future

    model = convert(tiny_classifier("bert")).eval()
    ids, mask, _ = ragged_batch(2, 5)
    with pytest.raises(ValueError, match="engine='ort-graph'.*criterion"):
        model.early_exit(ids, mask, criterion="patience", threshold=2, engine="ort-graph")
    with pytest.raises(ValueError, match="'ort' or 'ort-int8'"):
        model.early_exit(ids, mask, engine="ort-graph", executor="hf")
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        convert(tiny_classifier("bert")).double().eval().early_exit(ids, mask, engine="ort-graph")
    with pytest.raises(ValueError, match="runs the engines"):
        convert_past_future(tiny_classifier("bert")).eval().early_exit(ids, mask, engine="ort-graph")
    with pytest.raises(ValueError, match="input_ids"):
        model.early_exit(ids[0], mask, engine="ort-graph")
    with pytest.raises(ValueError, match="runs on cpu, but input_ids is on meta"):
        model.early_exit(ids.to("meta"), mask.to("meta"), engine="ort-graph")
    with pytest.raises(ValueError, match="float32 models on the CPU"):  # a model elsewhere: no graph of it
        convert(tiny_classifier("bert")).to("meta").eval().early_exit(ids, mask, engine="ort-graph")


@pytest.mark.parametrize("engine,grouped", [("rows", False), ("rows", True), ("fixed", False),
                                            ("ort-graph", False), ("ort-graph", True)])
def test_metrics_off_skips_only_the_speedups(engine, grouped):
    """``metrics=False``: the same exits and logits, the speed-ups NaN and ``layers_run`` -1."""
    model = convert(tiny_classifier("bert")).eval()
    ids, mask, _ = ragged_batch(7, 11, seed=6)
    thr = mid_threshold(model, ids, mask, "entropy")
    kw = dict(threshold=thr, engine=engine, group_by_length=grouped)
    on, off = model.early_exit(ids, mask, **kw), model.early_exit(ids, mask, metrics=False, **kw)
    assert torch.equal(on.exit_layer, off.exit_layer) and torch.equal(on.logits, off.logits)
    assert on.layer_speedup > 1 and on.layers_run > 0
    assert off.layer_speedup != off.layer_speedup and off.flops_speedup != off.flops_speedup  # NaN
    assert off.layers_run == -1
    with pytest.raises(TypeError, match="metrics must be a bool"):
        model.early_exit(ids, mask, metrics="no", engine=engine)
