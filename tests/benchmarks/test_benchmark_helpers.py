"""The benchmark scripts' helpers (exit profiles, token-level rows) on tiny models, CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from eekernels.methods.cascadebert import CascadeModel  # noqa: E402
from eekernels.methods.mpee import convert_mpee  # noqa: E402

from ..tiny import tiny_classifier  # noqa: E402


def test_histogram_exit_layers_follows_the_measured_distribution():
    from exit_profiles import histogram_exit_layers

    # 6-layer model: half exit at layer 2, a quarter at 3, a quarter at 6; benchmark has 12 layers.
    layers = histogram_exit_layers(8, 12, {2: 4, 3: 2, 6: 2}, 6)
    assert layers.tolist() == [4, 4, 4, 4, 6, 6, 12, 12]
    assert histogram_exit_layers(1, 12, {2: 4, 3: 2, 6: 2}, 6).tolist() == [4]  # quantile 0.5: the first half
    with pytest.raises(ValueError, match="empty"):
        histogram_exit_layers(4, 12, {}, 6)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        histogram_exit_layers(4, 12, {7: 1}, 6)


def test_cascade_exit_profile_forces_members():
    from exit_profiles import cascade_exit_profile

    points = [1, 3, 7]
    # half the rows from member 0, a quarter from member 1, the rest from 2
    assert cascade_exit_profile(8, points, [0.5, 0.25]).tolist() == [1, 1, 1, 1, 3, 3, 7, 7]
    assert cascade_exit_profile(1, points, [0.6, 0.0]).tolist() == [1]
    with pytest.raises(ValueError, match="fractions"):
        cascade_exit_profile(4, points, [0.7, 0.5])
    cm = CascadeModel.from_first_layers(tiny_classifier("bert"), [2])
    ids = torch.randint(5, 100, (4, 7))
    prof = cascade_exit_profile(4, cm.exit_points, [0.5])
    out = cm.early_exit(ids, threshold=0.0, exit_profile=prof)
    assert out.extras["exit_member"].tolist() == [0, 0, 1, 1]


def test_mpee_rows_run_on_cpu():
    from token_methods import mpee_rows

    hf = tiny_classifier("bert", seed=16)
    m = convert_mpee(hf, prune_layers=(1, 2))
    rows = mpee_rows(batch_sizes=(3,), seq_lens=(16,), fracs=(0.0, 0.3), device="cpu", repeats=1, warmup=0,
                     compile_baseline=False, model=m)
    assert len(rows) == 2
    for r in rows:
        assert r["method"] == "mpee" and r["batch"] == 3 and r["seq_len"] == 16
        assert r["widths"] == m.sequence_widths(16)[:len(r["widths"])]
        assert r["flops_speedup"] > 1.0 and r["t_mpee_ms"] > 0
        assert r["efficiency"] == pytest.approx(r["realized_vs_best"] / r["flops_speedup"])
    assert rows[1]["ideal_layer_speedup"] > rows[0]["ideal_layer_speedup"] == 1.0


def test_hashee_rows_run_tiny():
    from token_methods import hashee_e2e_rows, token_layer_rows, zipf_token_ids

    ids = zipf_token_ids(4, 16, 200, seed=3)
    assert ids.shape == (4, 16) and (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()
    rows = hashee_e2e_rows(batch_sizes=(2,), seq_lens=(16,), device="cpu", num_layers=3, hidden=32, heads=4,
                           intermediate=64, vocab_size=200, repeats=1, compile_baseline=False, corpus_texts=20,
                           progress=False)
    assert [r["layout"] for r in rows] == ["sorted", "pack"]
    r = rows[0]
    assert r["flops_speedup"] > 1.0 and r["active_frac"][0] == 1.0
    assert r["efficiency"] == pytest.approx(r["realized_vs_best"] / r["flops_speedup"])
    lrows = token_layer_rows(active_fracs=(0.5,), batch=2, seq_len=8, device="cpu", hidden=32, heads=4,
                             intermediate=64, repeats=1)
    assert [r["variant"] for r in lrows] == ["full", "plain_torch", "pack", "sorted"]
    assert lrows[0]["ideal"] > 1.0
