"""Exit heads that read the mean of a layer's real tokens (exit_pooling="mean"), beside [CLS]."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from eekernels.hf.adapters import backbone_pooling  # noqa: E402
from eekernels.methods.consistentee import ConsistentEEModel  # noqa: E402
from eekernels.methods.mpee import convert_mpee  # noqa: E402
from eekernels.methods.past_future import convert as convert_pf  # noqa: E402
from eekernels.models import EarlyExitModel, convert  # noqa: E402
from eekernels.nn import layer_summary  # noqa: E402

from ..helpers import kernel_backends, rel_err  # noqa: E402
from ..tiny import N_LAYERS, ragged_batch, threshold_between, tiny_classifier  # noqa: E402


def test_layer_summary_is_the_masked_mean():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 5, generator=g)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6], dtype=torch.bool)
    got = layer_summary(h, valid, "mean")
    for i, n in enumerate((3, 6, 1)):
        assert torch.allclose(got[i], h[i, :n].mean(0), atol=1e-6)
    assert torch.equal(got[3], torch.zeros(5))  # no real token: zeros, not NaN
    assert torch.allclose(layer_summary(h, None, "mean"), h.mean(1), atol=1e-6)
    assert torch.equal(layer_summary(h, valid, "cls"), h[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        layer_summary(h, valid, "max")


def test_backbone_pooling_reads_the_sentence_transformers_config(tmp_path):
    assert backbone_pooling(str(tmp_path)) == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert backbone_pooling(str(tmp_path)) == "mean"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert backbone_pooling(str(tmp_path)) == "cls"


def mean_scores(model, ids, mask):
    with torch.no_grad():
        z = model(ids, mask).exit_logits[:-1].float()
    p = z.softmax(-1)
    return -(p * p.log()).sum(-1)


def make(kind):
    hf = tiny_classifier("bert", seed=3)
    if kind == "early-exit":
        return convert(hf, exit_pooling="mean")
    if kind == "past-future":
        return convert_pf(hf, strategy="avg", exit_pooling="mean")
    if kind == "mpee":
        return convert_mpee(hf, prune_layers=(2,), keep_ratio=0.6, exit_pooling="mean")
    return ConsistentEEModel.from_hf(hf, exit_pooling="mean")


@pytest.mark.parametrize("kind", ["early-exit", "past-future", "mpee", "consistentee"])
def test_mean_exits_batched_equal_alone_and_differ_from_cls(kind):
    """Padding never changes a row's mean, so batching never changes its exit."""
    model = make(kind).eval()
    ids, mask, lengths = ragged_batch(10, 12, seed=4)
    crit = {} if kind != "consistentee" else {"criterion": "entropy"}
    thr = threshold_between(mean_scores(model, ids, mask)[0])  # about half the rows leave at the first exit
    backend = kernel_backends("cpu")[0] if kernel_backends("cpu") else "torch"
    out = model.early_exit(ids, mask, threshold=thr, backend=backend, **crit)
    assert len(set(out.exit_layer.tolist())) > 1
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = model.early_exit(ids[i:i + 1, :n], None, threshold=thr, backend=backend, **crit)
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"sample {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), f"sample {i}"
    with torch.no_grad():  # the internal exits really read the mean, not [CLS]
        cls = model.heads["1"](model.layer_states(ids, mask)[0][:, 0])
        assert rel_err(model(ids, mask).exit_logits[0], cls) > 1e-3


def test_mean_pooling_exits_disabled_equal_hf_and_survive_save_load(tmp_path):
    hf = tiny_classifier("roberta", seed=5)
    ids, mask, _ = ragged_batch(6, 9, seed=6)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    model = convert(hf, exit_pooling="mean")
    out = model.early_exit(ids, mask, threshold=0.0)
    assert (out.exit_layer == N_LAYERS).all() and rel_err(out.logits, ref) <= 1e-5  # the last exit is HF's head
    model.save_pretrained(str(tmp_path))
    back = EarlyExitModel.from_pretrained(str(tmp_path))
    assert back.exit_pooling == "mean"
    a, b = model.early_exit(ids, mask, threshold=0.5), back.early_exit(ids, mask, threshold=0.5)
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.logits, b.logits)
    with pytest.raises(ValueError, match="exit_pooling"):
        convert(tiny_classifier("bert"), exit_pooling="max")


@pytest.mark.parametrize("kind", ["early-exit", "mpee", "consistentee"])
def test_mean_exits_pooled_in_the_op_decide_as_the_summary_path(kind, monkeypatch):
    """At inference a mean-pooled exit hands the layer's states to the exit_head op
    (pooling="mean", the rows' token mask); the path it replaces took layer_summary in torch
    and gave the op the [N, H] mean. Same exit layers, logits to float32 rounding (bit for
    bit on "torch", whose reference takes the same float32 mean); on every CPU backend."""
    model = make(kind).eval()
    ids, mask, _ = ragged_batch(10, 12, seed=4)
    crit = {} if kind != "consistentee" else {"criterion": "entropy"}
    thr = threshold_between(mean_scores(model, ids, mask)[0])
    for backend in ["torch"] + kernel_backends("cpu"):
        new = model.early_exit(ids, mask, threshold=thr, backend=backend, **crit)
        with monkeypatch.context() as m:
            m.setattr(type(model), "exit_input",
                      lambda self, layer, hidden, valid: (self.exit_summary(layer, hidden, valid), {}))
            old = model.early_exit(ids, mask, threshold=thr, backend=backend, **crit)
        assert torch.equal(new.exit_layer, old.exit_layer), backend
        if backend == "torch":
            assert torch.equal(new.logits, old.logits)
        assert torch.allclose(new.logits, old.logits, rtol=1e-5, atol=1e-6), backend
