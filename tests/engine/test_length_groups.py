"""Length groups: the grouping is optimal and a grouped call equals the plain row engine."""

from __future__ import annotations

import itertools

import pytest
import torch

from eekernels.engine import length_groups as lg
from eekernels.models import convert

from ..helpers import rel_err
from ..tiny import ARCHS, mid_threshold, ragged_batch, tiny_classifier


def _cost(groups, lengths, overhead):
    return sum(overhead + len(g) * int(lengths[g].max()) for g in groups)


def _brute_force(lengths, overhead):
    """The least cost over every contiguous cut of the length-sorted rows."""
    s = sorted(lengths.tolist())
    b, best = len(s), float("inf")
    for k in range(b):
        for cuts in itertools.combinations(range(1, b), k):
            edges = (0, *cuts, b)
            best = min(best, sum(overhead + (j - i) * s[j - 1] for i, j in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_groups_partition_the_rows_at_the_least_cost(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 9, (1,), generator=g))
    lengths = torch.randint(0, 40, (b,), generator=g)
    overhead = float(torch.randint(0, 120, (1,), generator=g))
    groups = lg.length_groups(lengths, overhead)
    assert sorted(torch.cat(groups).tolist()) == list(range(b))
    for a, c in zip(groups, groups[1:]):  # shortest rows first, no overlap in length order
        assert int(lengths[a].max()) <= int(lengths[c].min())
    assert _cost(groups, lengths, overhead) == pytest.approx(_brute_force(lengths, overhead))


def test_group_edges():
    lengths = torch.tensor([5, 30, 6, 31, 7, 29])
    assert len(lg.length_groups(lengths, 10**9)) == 1  # a huge overhead keeps one call
    assert [sorted(x.tolist()) for x in lg.length_groups(lengths, 10)] == [[0, 2, 4], [1, 3, 5]]
    assert [x.tolist() for x in lg.length_groups(torch.tensor([4, 4, 4]), 0)] == [[0, 1, 2]]
    assert lg.length_groups(torch.tensor([], dtype=torch.long)) == []
    with pytest.raises(ValueError, match="overhead"):
        lg.length_groups(lengths, -1)
    with pytest.raises(ValueError, match="1-D"):
        lg.length_groups(lengths[None])


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return convert(tiny_classifier(request.param)).eval()


@pytest.mark.parametrize("executor", ["hf", "ort"])
def test_grouped_equals_the_row_engine(tiny, executor, monkeypatch):
    if executor == "ort":
        pytest.importorskip("onnxruntime")
    monkeypatch.setattr(lg, "DEFAULT_GROUP_OVERHEAD", 0)  # as many groups as lengths
    ids, mask, lengths = ragged_batch(11, 17, seed=3)
    threshold = mid_threshold(tiny, ids, mask, "entropy")
    plain = tiny.early_exit(ids, mask, threshold=threshold, executor=executor)
    grouped = tiny.early_exit(ids, mask, threshold=threshold, executor=executor, group_by_length=True)
    assert torch.equal(plain.exit_layer, grouped.exit_layer)
    assert len(set(plain.exit_layer.tolist())) > 1  # the threshold spreads the exits
    assert rel_err(grouped.logits, plain.logits) <= 1e-4
    assert torch.equal(grouped.pred, grouped.logits.argmax(dim=1))
    assert grouped.layer_speedup == pytest.approx(plain.layer_speedup)
    assert grouped.flops_speedup == pytest.approx(plain.flops_speedup)
    assert grouped.layers_run == plain.layers_run
    # a forced exit profile follows its rows into their groups; left padding works too
    profile = torch.arange(11) % tiny.num_layers + 1
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    forced = tiny.early_exit(left_ids, left_mask, exit_profile=profile, executor=executor, group_by_length=True)
    ref = tiny.early_exit(left_ids, left_mask, exit_profile=profile, executor=executor)
    assert torch.equal(forced.exit_layer, ref.exit_layer)
    assert rel_err(forced.logits, ref.logits) <= 1e-4


def test_grouping_is_checked(tiny):
    ids, mask, _ = ragged_batch(3, 5)
    with pytest.raises(TypeError, match="group_by_length"):
        tiny.early_exit(ids, mask, group_by_length=1)
    with pytest.raises(ValueError, match="group_by_length"):
        tiny.early_exit(ids, mask, engine="fixed", group_by_length=True)
    with pytest.raises(ValueError, match="attention_mask"):
        tiny.early_exit(ids, mask[:2], group_by_length=True)
    # no padding: one call, the plain result
    out = tiny.early_exit(ids, None, threshold=0.0, group_by_length=True)
    assert torch.equal(out.exit_layer, torch.full((3,), tiny.num_layers))
