"""Bad input to the public API: every public function (``convert``, ``early_exit`` of every
method's model, ``calibrate``, the ops, and the recipes' library functions ``finetune`` and
``evaluate``) raises a ValueError/TypeError whose message names the argument and says what
was expected. Each case asserts the exception type and that the message names the argument.

A ``meta`` tensor stands in for "a tensor on another device" (no GPU needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import eekernels  # noqa: E402
from eekernels import ops  # noqa: E402
from eekernels.calibration import calibrate  # noqa: E402
from eekernels.evaluation import evaluate  # noqa: E402
from eekernels.methods.consistentee import ConsistentEEModel  # noqa: E402
from eekernels.methods.past_future import convert as pf_convert  # noqa: E402
from eekernels.training.finetune import FinetuneConfig, finetune  # noqa: E402

from .text_task import make_files  # noqa: E402
from .tiny import N_LABELS, ragged_batch, tiny_classifier  # noqa: E402

META = torch.device("meta")


@pytest.fixture(scope="module")
def model():
    return eekernels.convert(tiny_classifier("bert"))


@pytest.fixture(scope="module")
def batch():
    ids, mask, _ = ragged_batch(3, 8)
    return ids, mask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def trained(files):
    """A saved early-exit model (one training step) for ``evaluate``."""
    out = files["dir"] / "trained"
    finetune(FinetuneConfig(model=str(files["clf"]), train=str(files["train"]), out=str(out), max_steps=1,
                            batch_size=8, cpu=True), log=lambda s: None)
    return out


def expect(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), f"the message does not name {name!r}: {info.value}"
    return str(info.value)


# ---------------------------------------------------------------------- early_exit
def _ids(batch):
    return batch[0]


EARLY_EXIT = {
    # name: (exception, argument named, kwargs builder (ids, mask) -> (args, kwargs))
    "ids-list": (TypeError, "input_ids", lambda i, m: ((i.tolist(), m), {})),
    "ids-float": (TypeError, "input_ids", lambda i, m: ((i.float(), m), {})),
    "ids-bool": (TypeError, "input_ids", lambda i, m: ((i > 3, m), {})),
    "ids-1d": (ValueError, "input_ids", lambda i, m: ((i[0], None), {})),
    "ids-3d": (ValueError, "input_ids", lambda i, m: ((i[None], None), {})),
    "ids-empty-batch": (ValueError, "input_ids", lambda i, m: ((i[:0], m[:0]), {})),
    "ids-empty-sequence": (ValueError, "input_ids", lambda i, m: ((i[:, :0], m[:, :0]), {})),
    "ids-too-long": (ValueError, "input_ids", lambda i, m: ((i.repeat(1, 9), m.repeat(1, 9)), {})),
    "ids-out-of-vocab": (ValueError, "input_ids", lambda i, m: ((i + 1000, m), {})),
    "ids-negative": (ValueError, "input_ids", lambda i, m: ((i - 1000, m), {})),
    "ids-other-device": (ValueError, "input_ids", lambda i, m: ((i.to(META), None), {})),
    "mask-list": (TypeError, "attention_mask", lambda i, m: ((i, m.tolist()), {})),
    "mask-shape": (ValueError, "attention_mask", lambda i, m: ((i, m[:, :-1]), {})),
    "mask-rows": (ValueError, "attention_mask", lambda i, m: ((i, m[:-1]), {})),
    "mask-other-device": (ValueError, "attention_mask", lambda i, m: ((i, m.to(META)), {})),
    "mask-values": (ValueError, "attention_mask", lambda i, m: ((i, m * 2), {})),
    "mask-fractional": (ValueError, "attention_mask", lambda i, m: ((i, m * 0.5), {})),
    "mask-empty-row": (ValueError, "attention_mask", lambda i, m: ((i, torch.cat([m[:1] * 0, m[1:]])), {})),
    "mask-complex": (TypeError, "attention_mask", lambda i, m: ((i, m.to(torch.complex64)), {})),
    "types-float": (TypeError, "token_type_ids", lambda i, m: ((i, m, torch.zeros(i.shape)), {})),
    "types-shape": (ValueError, "token_type_ids", lambda i, m: ((i, m, torch.zeros(1, 2, dtype=torch.long)), {})),
    "types-out-of-range": (ValueError, "token_type_ids", lambda i, m: ((i, m, torch.full(i.shape, 7)), {})),
    "threshold-negative": (ValueError, "threshold", lambda i, m: ((i, m), {"threshold": -0.1})),
    "threshold-nan": (ValueError, "threshold", lambda i, m: ((i, m), {"threshold": math.nan})),
    "threshold-str": (TypeError, "threshold", lambda i, m: ((i, m), {"threshold": "0.3"})),
    "threshold-bool": (TypeError, "threshold", lambda i, m: ((i, m), {"threshold": True})),
    "threshold-tensor-vector": (TypeError, "threshold", lambda i, m: ((i, m), {"threshold": torch.ones(2)})),
    "criterion-unknown": (ValueError, "criterion", lambda i, m: ((i, m), {"criterion": "entropie"})),
    "criterion-policy": (ValueError, "criterion", lambda i, m: ((i, m), {"criterion": "policy"})),
    "engine-unknown": (ValueError, "engine", lambda i, m: ((i, m), {"engine": "fast"})),
    "executor-unknown": (ValueError, "executor", lambda i, m: ((i, m), {"executor": "nope"})),
    "backend-unknown": (ValueError, "backend", lambda i, m: ((i, m), {"backend": "tpu"})),
    "profile-shape": (ValueError, "exit_profile", lambda i, m: ((i, m), {"exit_profile": torch.ones(2, dtype=torch.long)})),
    "profile-float": (TypeError, "exit_profile", lambda i, m: ((i, m), {"exit_profile": torch.ones(3)})),
    "min-bucket-zero": (ValueError, "min_bucket", lambda i, m: ((i, m), {"engine": "fixed", "min_bucket": 0})),
    "min-bucket-float": (TypeError, "min_bucket", lambda i, m: ((i, m), {"engine": "fixed", "min_bucket": 1.5})),
}


@pytest.mark.parametrize("case", sorted(EARLY_EXIT))
def test_early_exit_rejects(model, batch, case):
    exc, name, build = EARLY_EXIT[case]
    args, kwargs = build(*batch)
    expect(exc, name, lambda: model.early_exit(*args, **kwargs))


def test_early_exit_accepts_numbers_and_masks_of_any_integer_or_bool_dtype(model, batch):
    """The checks are no stricter than the contract: the same call in the forms it allows."""
    ids, mask = batch
    ref = model.early_exit(ids, mask, threshold=0.4)
    for m in (mask.bool(), mask.int(), mask.float()):
        for t in (0.4, np.float64(0.4), torch.tensor(0.4, dtype=torch.float64)):
            out = model.early_exit(ids.int(), m, threshold=t)
            assert torch.equal(out.exit_layer, ref.exit_layer) and torch.equal(out.pred, ref.pred)


@pytest.mark.parametrize("method", ["past-future", "consistentee"])
def test_every_methods_early_exit_shares_the_checks(batch, method):
    """Every method's model runs the same input checks (models/base.py and the layer loop)."""
    hf = tiny_classifier("bert")
    m = pf_convert(hf) if method == "past-future" else ConsistentEEModel.from_hf(hf)
    ids, mask = batch
    expect(TypeError, "input_ids", lambda: m.early_exit(ids.float(), mask))
    expect(ValueError, "attention_mask", lambda: m.early_exit(ids, mask * 2))
    expect(ValueError, "threshold", lambda: m.early_exit(ids, mask, threshold=-1.0))
    if method == "consistentee":
        expect(ValueError, "threshold", lambda: m.early_exit(ids, mask, criterion="policy", threshold=1.5))


# ---------------------------------------------------------------------- convert
CONVERT = {
    "model-str": (TypeError, "model", lambda: eekernels.convert("bert-base-uncased")),
    "model-linear": (ValueError, "Linear", lambda: eekernels.convert(torch.nn.Linear(2, 2))),
    "exit-layers-int": (TypeError, "exit_layers", lambda: eekernels.convert(tiny_classifier("bert"), exit_layers=2)),
    "exit-layers-float": (TypeError, "exit_layers",
                          lambda: eekernels.convert(tiny_classifier("bert"), exit_layers=[1.5, 3])),
    "exit-layers-range": (ValueError, "exit_layers", lambda: eekernels.convert(tiny_classifier("bert"), exit_layers=[0, 2])),
    "exit-layers-empty": (ValueError, "exit_layers", lambda: eekernels.convert(tiny_classifier("bert"), exit_layers=[])),
    "num-labels-mismatch": (ValueError, "num_labels",
                            lambda: eekernels.convert(tiny_classifier("bert"), num_labels=N_LABELS + 1)),
    "num-labels-base-missing": (ValueError, "num_labels", lambda: eekernels.convert(tiny_classifier("bert").bert)),
    "num-labels-base-zero": (ValueError, "num_labels",
                             lambda: eekernels.convert(tiny_classifier("bert").bert, num_labels=0)),
    "init": (ValueError, "init", lambda: eekernels.convert(tiny_classifier("bert"), init="zeros")),
    "loss-weighting": (ValueError, "loss_weighting",
                       lambda: eekernels.convert(tiny_classifier("bert"), loss_weighting="mean")),
    "exit-pooling": (ValueError, "exit_pooling", lambda: eekernels.convert(tiny_classifier("bert"), exit_pooling="max")),
}


@pytest.mark.parametrize("case", sorted(CONVERT))
def test_convert_rejects(case):
    exc, name, fn = CONVERT[case]
    expect(exc, name, fn)


# ---------------------------------------------------------------------- calibrate
def _cal(model, ids, mask, **kw):
    args = dict(labels=torch.zeros(ids.shape[0], dtype=torch.long), attention_mask=mask, target_speedup=1.5,
                progress=False)
    args.update(kw)
    return calibrate(model, ids, **args)


CALIBRATE = {
    "model": (TypeError, "model", lambda m, i, k: _cal(tiny_classifier("bert"), i, k)),
    "ids-float": (TypeError, "input_ids", lambda m, i, k: _cal(m, i.float(), k)),
    "ids-1d": (ValueError, "input_ids", lambda m, i, k: _cal(m, i[0], None)),
    "mask-shape": (ValueError, "attention_mask", lambda m, i, k: _cal(m, i, k[:, :-1])),
    "mask-values": (ValueError, "attention_mask", lambda m, i, k: _cal(m, i, k * 3)),
    "labels-length": (ValueError, "labels", lambda m, i, k: _cal(m, i, k, labels=torch.zeros(2, dtype=torch.long))),
    "labels-range": (ValueError, "labels", lambda m, i, k: _cal(m, i, k, labels=torch.full((3,), N_LABELS))),
    "labels-float": (TypeError, "labels", lambda m, i, k: _cal(m, i, k, labels=torch.full((3,), 0.5))),
    "labels-2d": (ValueError, "labels", lambda m, i, k: _cal(m, i, k, labels=torch.zeros(3, 1, dtype=torch.long))),
    "both-targets": (ValueError, "target_speedup", lambda m, i, k: _cal(m, i, k, max_accuracy_drop=0.1)),
    "speedup-zero": (ValueError, "target_speedup", lambda m, i, k: _cal(m, i, k, target_speedup=0.0)),
    "speedup-str": (TypeError, "target_speedup", lambda m, i, k: _cal(m, i, k, target_speedup="2")),
    "drop-nan": (ValueError, "max_accuracy_drop",
                 lambda m, i, k: _cal(m, i, k, target_speedup=None, max_accuracy_drop=math.nan)),
    "criterion": (ValueError, "criterion", lambda m, i, k: _cal(m, i, k, criterion="policy")),
    "batch-size": (ValueError, "batch_size", lambda m, i, k: _cal(m, i, k, batch_size=0)),
    "candidates": (ValueError, "candidates", lambda m, i, k: _cal(m, i, k, candidates=0)),
    "positive-label": (ValueError, "positive_label", lambda m, i, k: _cal(m, i, k, positive_label=N_LABELS)),
    "positive-label-bool": (ValueError, "positive_label", lambda m, i, k: _cal(m, i, k, positive_label=True)),
}


@pytest.mark.parametrize("case", sorted(CALIBRATE))
def test_calibrate_rejects(model, batch, case):
    exc, name, fn = CALIBRATE[case]
    expect(exc, name, lambda: fn(model, *batch))


# ---------------------------------------------------------------------- ops
H, C = 8, 3


def _head(**kw):
    args = dict(hidden=torch.randn(4, H), weight=torch.randn(C, H), bias=torch.randn(C))
    args.update(kw)
    return ops.exit_head(args.pop("hidden"), args.pop("weight"), args.pop("bias"), backend="torch", **args)


OPS = {
    "head-hidden-int": (TypeError, "hidden", lambda: _head(hidden=torch.ones(4, H, dtype=torch.long))),
    "head-hidden-3d": (ValueError, "hidden", lambda: _head(hidden=torch.randn(2, 4, H))),
    "head-weight-shape": (ValueError, "weight", lambda: _head(weight=torch.randn(C, H + 1))),
    "head-weight-device": (ValueError, "weight", lambda: _head(weight=torch.randn(C, H, device=META))),
    "head-bias-dtype": (TypeError, "bias", lambda: _head(bias=torch.randn(C, dtype=torch.float64))),
    "head-threshold-negative": (ValueError, "threshold", lambda: _head(threshold=-1.0)),
    "head-threshold-nan": (ValueError, "threshold", lambda: _head(threshold=math.nan)),
    "head-threshold-str": (TypeError, "threshold", lambda: _head(threshold="1")),
    "head-criterion": (ValueError, "criterion", lambda: _head(criterion="margin")),
    "head-counter-dtype": (TypeError, "counter", lambda: _head(criterion="patience", threshold=2.0,
                                                                prev_pred=torch.zeros(4, dtype=torch.long),
                                                                counter=torch.zeros(4))),
    "head-pooling-unknown": (ValueError, "pooling", lambda: _head(pooling="max")),
    "head-pooling-type": (TypeError, "pooling", lambda: _head(pooling=None)),
    "head-mean-hidden-2d": (ValueError, "hidden", lambda: _head(pooling="mean")),
    "head-mean-hidden-dtype": (TypeError, "hidden", lambda: _head(hidden=torch.ones(4, 5, H, dtype=torch.long),
                                                                  pooling="mean")),
    "head-mask-dtype": (TypeError, "token_mask", lambda: _head(hidden=torch.randn(4, 5, H), pooling="mean",
                                                               token_mask=torch.ones(4, 5, dtype=torch.long))),
    "head-mask-shape": (ValueError, "token_mask", lambda: _head(hidden=torch.randn(4, 5, H), pooling="mean",
                                                                token_mask=torch.ones(4, 4, dtype=torch.bool))),
    "head-mask-device": (ValueError, "token_mask", lambda: _head(hidden=torch.randn(4, 5, H), pooling="mean",
                                                                 token_mask=torch.ones(4, 5, dtype=torch.bool,
                                                                                       device=META))),
    "head-mask-without-mean": (ValueError, "token_mask", lambda: _head(token_mask=torch.ones(4, 5, dtype=torch.bool))),
    "compact-keep-dtype": (TypeError, "keep", lambda: ops.compact_rows(torch.ones(3), [torch.ones(3, 2)])),
    "compact-tensors-rows": (ValueError, "tensors[0]",
                             lambda: ops.compact_rows(torch.ones(3, dtype=torch.bool), [torch.ones(4, 2)])),
    "scatter-layer": (ValueError, "layer", lambda: ops.scatter_exits(
        torch.zeros(3, C), torch.zeros(3, dtype=torch.long), torch.arange(3), torch.ones(3, dtype=torch.bool),
        torch.zeros(3, C), 0, backend="torch")),
    "pack-active-dtype": (TypeError, "active", lambda: ops.pack_tokens(torch.randn(2, 5, H), torch.ones(2, 5),
                                                                       backend="torch")),
    "prune-keep-ratio": (ValueError, "keep_ratio", lambda: ops.mpee_prune(
        torch.randn(2, 5, H), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5), torch.rand(2, 5),
        keep_ratio=1.5, backend="torch")),
}


@pytest.mark.parametrize("case", sorted(OPS))
def test_ops_reject(case):
    exc, name, fn = OPS[case]
    expect(exc, name, fn)


# ---------------------------------------------------------------------- recipes: finetune, evaluate
def _ft(files, tmp_path, **kw):
    args = dict(model=str(files["clf"]), train=str(files["train"]), out=str(tmp_path / "out"), max_steps=1,
                batch_size=8, cpu=True)
    args.update(kw)
    return finetune(FinetuneConfig(**args), log=lambda s: None)


FINETUNE = {
    "model-missing": (ValueError, "model", dict(model="/nonexistent/model")),
    "train-missing": (ValueError, "/nonexistent/train.tsv", dict(train="/nonexistent/train.tsv")),
    "train-type": (TypeError, "train", dict(train=3)),
    "method": (ValueError, "method", dict(method="deebert2")),
    "method-option": (ValueError, "option", dict(method_options={"strategy": "lstm"})),
    "exit-layers-range": (ValueError, "--exit-layers", dict(exit_layers=[0, 9])),
    "exit-layers-type": (TypeError, "exit_layers", dict(exit_layers=2)),
    "lr-zero": (ValueError, "--lr", dict(lr=0.0)),
    "lr-str": (TypeError, "lr", dict(lr="1e-3")),
    "head-lr-negative": (ValueError, "--head-lr", dict(head_lr=-1.0)),
    "epochs-nan": (ValueError, "--epochs", dict(epochs=math.nan)),
    "batch-size-zero": (ValueError, "--batch-size", dict(batch_size=0)),
    "batch-size-float": (TypeError, "batch_size", dict(batch_size=2.5)),
    "head-lr-str": (TypeError, "head_lr", dict(head_lr="1e-3")),
    "max-steps": (ValueError, "--max-steps", dict(max_steps=-5)),
    "max-length": (ValueError, "--max-length", dict(max_length=0)),
    "save-steps": (ValueError, "--save-steps", dict(save_steps=0)),
    "logging-steps": (TypeError, "logging_steps", dict(logging_steps="10")),
    "seed": (TypeError, "seed", dict(seed=1.5)),
}


@pytest.mark.parametrize("case", sorted(FINETUNE))
def test_finetune_rejects(files, tmp_path, case):
    exc, name, kw = FINETUNE[case]
    expect(exc, name, lambda: _ft(files, tmp_path, **kw))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_finetune_rejects_a_config_of_another_type(files, tmp_path):
    expect(TypeError, "cfg", lambda: finetune(dict(model=str(files["clf"]))))


EVALUATE = {
    "model-dir": (ValueError, "/nonexistent", lambda t, f: evaluate("/nonexistent", str(f["dev"]), threshold=0.3)),
    "data": (ValueError, "/nonexistent.tsv", lambda t, f: evaluate(str(t), "/nonexistent.tsv", threshold=0.3)),
    "threshold-negative": (ValueError, "threshold", lambda t, f: evaluate(str(t), str(f["dev"]), threshold=-1.0)),
    "threshold-str": (TypeError, "threshold", lambda t, f: evaluate(str(t), str(f["dev"]), threshold="0.3")),
    "speedup-str": (TypeError, "target_speedup", lambda t, f: evaluate(str(t), str(f["dev"]), target_speedup="2")),
    "threshold-and-speedup": (ValueError, "--target-speedup",
                              lambda t, f: evaluate(str(t), str(f["dev"]), threshold=0.3, target_speedup=1.5)),
    "speedup-negative": (ValueError, "target_speedup",
                         lambda t, f: evaluate(str(t), str(f["dev"]), target_speedup=-1.0)),
    "criterion": (ValueError, "--criterion", lambda t, f: evaluate(str(t), str(f["dev"]), criterion="policy",
                                                                   threshold=0.3)),
    "batch-size": (ValueError, "--batch-size", lambda t, f: evaluate(str(t), str(f["dev"]), threshold=0.3,
                                                                     batch_size=0)),
    "max-length": (ValueError, "--max-length", lambda t, f: evaluate(str(t), str(f["dev"]), threshold=0.3,
                                                                     max_length=0)),
    "backend": (ValueError, "backend", lambda t, f: evaluate(str(t), str(f["dev"]), threshold=0.3,
                                                               backend="tpu", progress=False)),
}


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_evaluate_rejects(trained, files, case):
    exc, name, fn = EVALUATE[case]
    expect(exc, name, lambda: fn(trained, files))
