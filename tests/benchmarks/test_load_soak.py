"""benchmarks/load_soak.py in brief: RSS stays flat over repeated ``early_exit`` calls, and the
measurement sees a leak when there is one (so the bound can fail)."""

from __future__ import annotations

import mmap

import pytest
import torch

pytest.importorskip("transformers")

from load_soak import slope, soak, tiny_model  # noqa: E402

#: bytes per call: a leaked hidden-state tensor (B x S x H floats) is kilobytes
BOUND = 4096


def test_slope_is_the_least_squares_fit():
    assert slope([0, 1, 2, 3], [5, 7, 9, 11]) == pytest.approx(2.0)
    assert slope([0, 1, 2], [1, 0, 1]) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(before)


def test_rss_is_flat_over_repeated_calls(model):
    r = soak(model, calls=500, warmup=150, sample_every=10, cycle=50, progress=False)
    assert abs(r["slope_bytes_per_call"]) < BOUND, r["slope_bytes_per_call"]


class Leaky:
    """``model`` with 16 KiB of fresh resident memory kept alive by every ``early_exit`` call.

    The leak is a new anonymous mapping written through, not a tensor: a leaked tensor may be
    carved out of heap that earlier tests in the same process freed, so RSS would not move
    and the check would depend on what ran before it."""

    def __init__(self, model):
        self.model, self.config, self.kept = model, model.config, []

    def early_exit(self, *args, **kwargs):
        page = mmap.mmap(-1, 4 * BOUND)
        page.write(b"\x01" * (4 * BOUND))
        self.kept.append(page)
        return self.model.early_exit(*args, **kwargs)


def test_the_measurement_sees_a_leak(model):
    r = soak(Leaky(model), calls=500, warmup=150, sample_every=10, cycle=50, progress=False)
    assert r["slope_bytes_per_call"] > BOUND, r["slope_bytes_per_call"]
