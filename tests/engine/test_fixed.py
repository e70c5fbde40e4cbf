"""The fixed-capacity engine (device-side decisions, row buckets under torch.cond) against
the row-compacting engine and the HF model, on tiny configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.engine import FixedCapacity, PartsExecutor, row_buckets, run_early_exit  # noqa: E402
from eekernels.models import convert  # noqa: E402

from ..tiny import N_LAYERS, mid_threshold, ragged_batch, tiny_classifier  # noqa: E402


def test_row_buckets():
    assert row_buckets(8) == [8, 4, 2, 1]
    assert row_buckets(5) == [5, 3, 2, 1]
    assert row_buckets(32, min_bucket=8) == [32, 16, 8]
    assert row_buckets(1) == [1]
    with pytest.raises(ValueError, match=">= 1"):
        row_buckets(0)


@pytest.mark.parametrize("arch,criterion", [("bert", "entropy"), ("roberta", "patience"), ("albert", "max_prob")])
def test_fixed_capacity_equals_the_row_engine(arch, criterion):
    ee = convert(tiny_classifier(arch))
    ids, mask, _ = ragged_batch(7, 13, seed=3)
    thr = 1.0 if criterion == "patience" else mid_threshold(ee, ids, mask, criterion)
    ref = ee.early_exit(ids, mask, criterion=criterion, threshold=thr, backend="torch")
    got = ee.early_exit(ids, mask, criterion=criterion, threshold=thr, backend="torch", engine="fixed")
    assert len(set(ref.exit_layer.tolist())) > 1  # the rows really leave at different layers
    assert torch.equal(got.exit_layer, ref.exit_layer)
    assert torch.allclose(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert got.layer_speedup == pytest.approx(ref.layer_speedup)


def test_fixed_capacity_exit_profile_and_min_bucket():
    ee = convert(tiny_classifier("bert"))
    ids, mask, _ = ragged_batch(6, 11, seed=4)
    prof = torch.tensor([1, 4, 2, 2, 3, 1])
    ref = ee.early_exit(ids, mask, exit_profile=prof, backend="cpu")
    got = ee.early_exit(ids, mask, exit_profile=prof, backend="cpu", engine="fixed", min_bucket=2)
    assert torch.equal(got.exit_layer, prof) and torch.equal(ref.exit_layer, prof)
    assert torch.allclose(got.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_fixed_capacity_skips_layers_once_every_row_left():
    ee = convert(tiny_classifier("bert"))
    ids, mask, _ = ragged_batch(4, 9, seed=5)
    calls = []
    hook = ee.hf.bert.encoder.layer[2].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        out = ee.early_exit(ids, mask, exit_profile=torch.tensor([1, 1, 2, 2]), backend="torch", engine="fixed")
    finally:
        hook.remove()
    assert out.exit_layer.tolist() == [1, 1, 2, 2] and calls == []  # layer 3 never ran


def test_fixed_capacity_exits_disabled_match_hf():
    hf = tiny_classifier("bert")
    ids, mask, _ = ragged_batch(5, 10, seed=6)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    ee = convert(hf)
    out = run_early_exit(ee, ids, mask, rule=ee.exit_rule("entropy", 0.0, None), executor=PartsExecutor(ee.adapter),
                         placement=FixedCapacity(), with_metrics=False)  # no host sync: capturable
    assert (out.exit_layer == N_LAYERS).all() and out.layers_run == -1
    assert torch.allclose(out.logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_graphed_engine_replays_one_cuda_graph():
    """engine="graphed": the whole fixed-capacity forward as one CUDA graph (torch.cond ->
    conditional IF nodes), captured once per shape and replayed on new inputs."""
    ee = convert(tiny_classifier("bert")).cuda()
    ids, mask, _ = ragged_batch(8, 16, seed=7)
    ids, mask = ids.cuda(), mask.cuda()
    thr = mid_threshold(ee, ids, mask, "entropy")
    for shift in (0, 3):  # the second call replays the graph captured by the first
        x = (ids + shift) % 100 + 5
        ref = ee.early_exit(x, mask, threshold=thr)
        out = ee.early_exit(x, mask, threshold=thr, engine="graphed")
        assert torch.equal(out.exit_layer, ref.exit_layer)
        assert torch.allclose(out.logits, ref.logits, rtol=1e-3, atol=1e-3)
        assert out.layer_speedup == pytest.approx(ref.layer_speedup)
    assert len(ee._graphs.graphs) == 1


def test_graphed_engine_needs_cuda():
    ee = convert(tiny_classifier("bert"))
    ids, mask, _ = ragged_batch(2, 6, seed=9)
    with pytest.raises(ValueError, match="CUDA"):
        ee.early_exit(ids, mask, engine="graphed")


def test_early_exit_engine_option():
    ee = convert(tiny_classifier("bert"))
    ids, mask, _ = ragged_batch(3, 8, seed=8)
    a = ee.early_exit(ids, mask, threshold=0.5, engine="rows")
    b = ee.early_exit(ids, mask, threshold=0.5, engine="fixed")
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.logits, b.logits, atol=1e-5)
    with pytest.raises(ValueError, match="engine must be one of"):
        ee.early_exit(ids, mask, engine="graph")


def test_fixed_capacity_serves_models_of_different_widths_in_one_process():
    """torch.cond's branches recompile for a model of another width (regression: the
    dynamic-shape recompile of nested conds failed for the second model)."""
    ids, mask, _ = ragged_batch(3, 7, seed=10)
    for hidden, heads in ((8, 2), (12, 2), (8, 1)):
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                      intermediate_size=2 * hidden, vocab_size=120, max_position_embeddings=32,
                                      num_labels=2)
        ee = convert(transformers.BertForSequenceClassification(cfg).eval())
        ref = ee.early_exit(ids, mask, threshold=0.5, backend="torch")
        got = ee.early_exit(ids, mask, threshold=0.5, backend="torch", engine="fixed")
        assert torch.equal(got.exit_layer, ref.exit_layer) and torch.allclose(got.logits, ref.logits, atol=1e-5)
