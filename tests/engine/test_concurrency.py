"""One model shared by 4 threads: every ``early_exit`` call gives what the same call gives
alone (serving frameworks call one model from several request threads).

For each engine variant and method, a few dozen random batches (random B, S, padding and a
threshold between two of the model's own scores) run once serially on one model and once
from 4 threads at a time on a twin built the same way, so the threads also race to create
the model's lazily built state (executors, rules)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("hypothesis")

from .test_properties import build, rule_for  # noqa: E402
from ..tiny import tiny_classifier  # noqa: E402

THREADS = 4
#: (method, engine, executor, calls); the fixed engine traces torch.cond per call on the CPU (slow)
VARIANTS = [("early-exit", "rows", "hf", 48), ("early-exit", "fixed", "parts", 12), ("past-future", "rows", None, 48),
            ("mpee", "rows", None, 48), ("cascade", "rows", None, 48), ("hashee", "rows", "pack", 48)]


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One torch thread per call, as a server with a thread per request runs (and 4 threads
    x the default intra-op pool would oversubscribe a small CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_calls(model, n: int, seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n):
        b, s = rng.randint(1, 6), rng.randint(2, 16)
        ids = torch.randint(5, 120, (b, s), generator=g)
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        mask = (torch.arange(s)[None] < lengths[:, None]).long()
        calls.append((ids * mask + (1 - mask), mask, rule_for(model, ids, mask, rng.uniform(0.1, 0.9))))
    return calls


@pytest.mark.parametrize("kind,engine,executor,n", VARIANTS, ids=["-".join(map(str, v[:3])) for v in VARIANTS])
def test_four_threads_give_the_serial_results(kind, engine, executor, n):
    serial_model = build(kind, tiny_classifier("bert"))
    shared = build(kind, tiny_classifier("bert"))  # the same weights, nothing cached yet
    kw = {"engine": engine, **({"executor": executor} if executor else {})}
    calls = random_calls(serial_model, n, seed=7)
    serial = [serial_model.early_exit(ids, mask, **rule, **kw) for ids, mask, rule in calls]
    assert len({tuple(o.exit_layer.tolist()) for o in serial}) > 1  # calls differ: a mix-up shows

    start = threading.Barrier(THREADS)

    def worker(t):
        start.wait()
        return [(i, shared.early_exit(ids, mask, **rule, **kw))
                for i, (ids, mask, rule) in enumerate(calls) if i % THREADS == t]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for chunk in pool.map(worker, range(THREADS)) for r in chunk]
    assert sorted(i for i, _ in results) == list(range(n))
    for i, out in results:
        ref = serial[i]
        assert torch.equal(out.exit_layer, ref.exit_layer), f"call {i}"
        assert torch.equal(out.pred, ref.pred), f"call {i}"
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6, msg=f"call {i}")
        assert out.layers_run == ref.layers_run and out.flops_speedup == pytest.approx(ref.flops_speedup)


def test_threads_leave_a_training_model_in_training_mode():
    """``early_exit`` switches a training-mode model to eval for the call; with 4 threads no
    call may run in training mode (dropout) because another one switched it back."""
    hf = tiny_classifier("bert")
    hf.config.hidden_dropout_prob = 0.0
    model = build("early-exit", hf)
    calls = random_calls(model, 16, seed=3)
    serial = [model.early_exit(ids, mask, **rule) for ids, mask, rule in calls]
    for m in model.modules():  # dropout that would change the results if a call ran in training mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()

    def worker(t):
        return [(i, model.early_exit(ids, mask, **rule)) for i, (ids, mask, rule) in enumerate(calls)
                if i % THREADS == t]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for chunk in pool.map(worker, range(THREADS)) for r in chunk]
    assert model.training
    for i, out in results:
        torch.testing.assert_close(out.logits, serial[i].logits, rtol=1e-5, atol=1e-6, msg=f"call {i}")
