"""pytest-benchmark: the paths of benchmarks/cpu_e2e.py on a tiny random BERT, same inputs.

    python -m pytest benchmarks/test_bench_cpu_e2e.py --benchmark-columns=median,iqr --benchmark-group-by=group

A 6-layer H=64 BERT on one ragged batch of 8 (lengths 6..32), CPU float32: the full model
(HF eager, ONNX Runtime fp32 and dynamic INT8) against ``early_exit`` with each executor
(hf, ort, ort-int8) under the controlled 2x profile and with exits disabled. Paths that need
ONNX Runtime skip without it. Seconds per run, not a claim: benchmarks/cpu_e2e.py measures
the real backbone on real sentences with interleaved rounds.
"""

import pytest
import torch

from common import random_bert
from cpu_e2e import (CONTROLLED_2X, EXECUTORS, INT8, NEVER, NO_EXIT, RUNNERS, early_exit_path, executor_skip_reason,
                     exit_profiles, full_model_paths, rel_err)
from eekernels.models import convert

B, S, LAYERS = 8, 32, 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = convert(random_bert(num_layers=LAYERS, hidden=64, heads=4, intermediate=128, vocab_size=1000)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (B, S), generator=g)
    lengths = torch.linspace(6, S, B).long()
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    batch = (ids * mask, mask, None)
    with torch.no_grad():
        ref = model.hf(input_ids=batch[0], attention_mask=mask).logits
    return model, batch, ref


@pytest.mark.parametrize("path", ["hf-eager", "ort-fp32", "ort-int8"])
def test_full_model(benchmark, setup, path):
    model, batch, ref = setup
    paths, skipped = full_model_paths(model, torch.get_num_threads(), [path])
    if path in skipped:
        pytest.skip(skipped[path])
    fn = paths[path]
    with torch.no_grad():
        assert rel_err(fn(batch), ref) < (1e-4 if path != "ort-int8" else 0.2)  # INT8: close, not equal
        benchmark.group = f"cpu-e2e tiny B={B}"
        benchmark.extra_info.update(path=path, profile="full model")
        benchmark(fn, batch)


@pytest.mark.parametrize("profile", [CONTROLLED_2X[0], NO_EXIT], ids=["2x", "no-exit"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_early_exit(benchmark, setup, executor, profile):
    model, batch, ref = setup
    why = executor_skip_reason(model, executor, batch)
    if why:
        pytest.skip(why)
    layers = exit_profiles(B, B, LAYERS, [])[profile][0]
    path = early_exit_path(model, executor, None if profile == NO_EXIT else [layers])
    fn = lambda: path(0, batch)  # noqa: E731
    with torch.no_grad():
        engine, name = RUNNERS[executor]
        out = model.early_exit(*batch, exit_profile=None if profile == NO_EXIT else layers, engine=engine,
                               executor=name, **({"threshold": NEVER[model.criteria[0]]} if profile == NO_EXIT else {}))
        assert out.exit_layer.tolist() == layers.tolist()
        assert torch.equal(fn(), out.logits)
        if profile == NO_EXIT:
            assert rel_err(out.logits, ref) < (1e-4 if executor not in INT8 else 0.2)
        benchmark.group = f"cpu-e2e tiny B={B}"
        benchmark.extra_info.update(path=f"ee-{executor}", profile=profile)
        benchmark(fn)
