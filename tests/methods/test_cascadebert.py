"""CascadeBERT (cascadebert.txt): batched cascade exiting, section 5.4 truncation, DAR,
K-fold difficulty labels, DIS / ECE, HF Trainer, on tiny BERT / RoBERTa / ALBERT models (CPU)."""

from __future__ import annotations

import itertools
import os
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels import metrics  # noqa: E402
from eekernels.calibration import calibrate, collect_exit_logits  # noqa: E402
from eekernels.methods.cascadebert import CascadeModel, simulate_cascade, truncate  # noqa: E402
from eekernels.training.cascadebert import (  # noqa: E402
    DifficultyDataset,
    dar_margin_loss,
    kfold_difficulty_labels,
)

from ..helpers import kernel_backends, rel_err, threshold_between  # noqa: E402
from ..tiny import ParityTask  # noqa: E402

VOCAB, N_LABELS = 100, 3


def tiny(arch: str, layers: int, seed: int = 0, num_labels: int = N_LABELS):
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                  vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels, initializer_range=0.3,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "bert":
        m = transformers.BertForSequenceClassification(transformers.BertConfig(**common))
    elif arch == "roberta":
        m = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**common, pad_token_id=1))
    else:
        cfg = transformers.AlbertConfig(**common, embedding_size=16, num_hidden_groups=1, inner_group_num=1)
        m = transformers.AlbertForSequenceClassification(cfg)
    return m.eval()


def ragged(b: int, s: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, s), generator=g)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return ids * mask + (1 - mask), mask, lengths  # pad id 1


def bert_cascade(seed: int = 0) -> CascadeModel:
    return CascadeModel([tiny("bert", 1, seed), tiny("bert", 2, seed + 1), tiny("bert", 4, seed + 2)])


def spread_threshold(cm: CascadeModel, ids, mask) -> float:
    """A tau halfway between two neighbouring confidences of the non-last members (never
    on a sample's confidence, so fp noise cannot flip a decision), near their median."""
    z = collect_exit_logits(cm, ids, mask, progress=False)
    return threshold_between(z[:-1].softmax(-1).max(-1).values)


def backends_under_test():
    kb = kernel_backends("cpu")
    return ["torch"] + kb[:1]


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("backend", backends_under_test())
def test_batched_equals_alone(backend):
    """Each sample alone (batch 1, no padding) leaves from the same member with the same logits."""
    cm = bert_cascade(seed=3)
    ids, mask, lengths = ragged(12, 13, seed=4)
    tau = spread_threshold(cm, ids, mask)
    rows_seen = []  # the rows each member's first layer really computes on
    hooks = [m.bert.encoder.layer[0].register_forward_hook(lambda mod, a, o, j=j: rows_seen.append((j, a[0].shape[0])))
             for j, m in enumerate(cm.members)]
    try:
        out = cm.early_exit(ids, mask, threshold=tau, backend=backend)
    finally:
        for h in hooks:
            h.remove()
    assert set(out.extras["exit_member"].tolist()) == {0, 1, 2}, "tau should spread samples over the three members"
    reached = [int((out.extras["exit_member"] >= j).sum()) for j in range(3)]
    assert rows_seen == [(0, 12), (1, reached[1]), (2, reached[2])]  # emitted rows were compacted away
    points = torch.tensor(cm.exit_points)
    assert torch.equal(out.exit_layer, points[out.extras["exit_member"]])
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = cm.early_exit(ids[i:i + 1, :n], threshold=tau, backend=backend)
        assert int(alone.extras["exit_member"]) == int(out.extras["exit_member"][i]), f"sample {i}"
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"sample {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), f"sample {i}"
        # and the logits are the emitting member's own HF forward
        own = cm.members[int(alone.extras["exit_member"])](input_ids=ids[i:i + 1, :n]).logits[0]
        assert torch.allclose(own, out.logits[i], rtol=1e-5, atol=1e-5), f"sample {i}"
    # Algorithm 1 replayed on the members' logits agrees
    el, _ = simulate_cascade(collect_exit_logits(cm, ids, mask, progress=False), cm.exit_points, tau)
    assert torch.equal(el, out.exit_layer)
    # section 4.1: every layer of every member tried counts
    assert out.layers_run == int(out.exit_layer.sum())
    assert out.layer_speedup == pytest.approx(4 * 12 / float(out.exit_layer.sum()))


def cascades():
    big_r = tiny("roberta", 4, seed=5)
    big_a = tiny("albert", 4, seed=6)
    return {
        "bert-1-2-4": bert_cascade(),
        "roberta-2-4(5.4)": CascadeModel.from_first_layers(big_r, [2]),
        "albert-1-3-4(5.4)": CascadeModel.from_first_layers(big_a, [3, 1]),
    }


@pytest.mark.parametrize("name", ["bert-1-2-4", "roberta-2-4(5.4)", "albert-1-3-4(5.4)"])
def test_exits_disabled_match_largest_hf(name):
    cm = cascades()[name]
    ids, mask, _ = ragged(9, 17)
    with torch.no_grad():
        ref = cm.members[-1](input_ids=ids, attention_mask=mask).logits
    total = sum(cm.member_layers)
    for backend in backends_under_test():
        out = cm.early_exit(ids, mask, threshold=1.0, backend=backend)  # max-prob never exceeds 1
        assert (out.extras["exit_member"] == len(cm.members) - 1).all()
        assert (out.exit_layer == total).all()
        assert rel_err(out.logits, ref) <= 1e-5, backend
        assert torch.equal(out.pred, ref.argmax(-1))
        assert out.layers_run == 9 * total
        assert out.layer_speedup == pytest.approx(cm.num_layers / total)  # < 1: an honest loss
        assert out.flops_speedup < 1.0


def test_tau_zero_emits_everything_from_the_smallest():
    cm = cascades()["roberta-2-4(5.4)"]
    ids, mask, _ = ragged(7, 11)
    out = cm.early_exit(ids, mask, threshold=0.0)
    with torch.no_grad():
        ref = cm.members[0](input_ids=ids, attention_mask=mask).logits
    assert (out.exit_layer == 2).all() and (out.extras["exit_member"] == 0).all()
    assert rel_err(out.logits, ref) <= 1e-5
    assert out.layer_speedup == pytest.approx(2.0) and out.layers_run == 7 * 2
    assert 1.0 < out.flops_speedup < 2.0  # the small member's head costs a little


def test_speedup_formulas_section_4_1():
    # "an instance first fed into a 2-layer model and then a 4-layer model ... 6 layers ... 2x" vs 12 layers
    assert metrics.cascade_layer_speedup(torch.tensor([6]), 12) == pytest.approx(2.0)
    assert metrics.cascade_layer_speedup(torch.tensor([2, 2, 14]), 12) == pytest.approx(36 / 18)
    # FLOPs: two members of the same width; sample 0 leaves member 0, sample 1 runs both
    h, i, c, s = 32, 48, 3, torch.tensor([5.0, 7.0])
    layer = metrics.encoder_layer_flops(s, h, i)
    head = metrics.exit_head_flops(h, c)
    full = (4 * layer + head).sum()
    run = (1 * layer[0] + head) + (1 * layer[1] + head) + (4 * layer[1] + head)
    got = metrics.cascade_flops_speedup(torch.tensor([0, 1]), s, [(1, h, i, c), (4, h, i, c)])
    assert got == pytest.approx(float(full / run))
    with pytest.raises(ValueError):
        metrics.cascade_flops_speedup(torch.tensor([2]), s[:1], [(1, h, i, c), (4, h, i, c)])


def test_exit_profile_forces_members():
    cm = bert_cascade()
    assert cm.exit_points == [1, 3, 7]
    ids, mask, _ = ragged(6, 9)
    prof = torch.tensor([1, 2, 3, 4, 7, 1])
    out = cm.early_exit(ids, mask, threshold=0.0, exit_profile=prof)  # tau=0 would emit all at member 0
    assert out.exit_layer.tolist() == [1, 3, 3, 7, 7, 1]
    assert out.extras["exit_member"].tolist() == [0, 1, 1, 2, 2, 0]
    full = cm.early_exit(ids, mask, threshold=1.0)
    assert torch.allclose(out.logits[3], full.logits[3], atol=1e-6)
    with pytest.raises(ValueError, match="exit_profile"):
        cm.early_exit(ids, mask, threshold=0.5, exit_profile=prof[:3])


def test_calibration_meets_target_and_matches_engine():
    cm = bert_cascade(seed=9)
    ids, mask, _ = ragged(48, 10, seed=10)
    labels = torch.randint(0, N_LABELS, (48,), generator=torch.Generator().manual_seed(11))
    res = calibrate(cm, ids, labels, mask, target_speedup=2.0, progress=False)
    assert res.layer_speedup >= 2.0
    out = cm.early_exit(ids, mask, threshold=res.threshold)
    assert out.layer_speedup == pytest.approx(res.layer_speedup)
    assert float((out.pred == labels).float().mean()) == pytest.approx(res.accuracy)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(cm, ids, labels, mask, progress=False)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("arch", ["bert", "albert"])
def test_truncate_is_the_first_k_layers(arch):
    big = tiny(arch, 4, seed=12)
    small = truncate(big, 2)
    assert small.config.num_hidden_layers == 2 and big.config.num_hidden_layers == 4
    ids, mask, _ = ragged(5, 8)
    with torch.no_grad():
        hs = big(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        base = big.bert if arch == "bert" else big.albert
        expect = big.classifier(base.pooler_activation(base.pooler(hs[:, 0]))) if arch == "albert" \
            else big.classifier(base.pooler(hs))
        got = small(input_ids=ids, attention_mask=mask).logits
    assert rel_err(got, expect) <= 1e-5
    # a copy: training the small model leaves the big one alone
    with torch.no_grad():
        next(small.parameters()).add_(1.0)
    assert not torch.equal(next(small.parameters()), next(big.parameters()))
    with pytest.raises(ValueError, match="k must be"):
        truncate(big, 5)
    with pytest.raises(ValueError, match="k must be"):
        truncate(big, 0)


def test_bad_cascades_and_inputs_clear_errors():
    a, b = tiny("bert", 1), tiny("bert", 2)
    with pytest.raises(ValueError, match="empty"):
        CascadeModel([])
    with pytest.raises(ValueError, match="growing depth"):
        CascadeModel([b, a])
    with pytest.raises(ValueError, match="growing depth"):
        CascadeModel([a, tiny("bert", 1, seed=1)])
    with pytest.raises(ValueError, match="num_labels"):
        CascadeModel([a, tiny("bert", 2, num_labels=2)])
    other_vocab = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, vocab_size=50, num_labels=3))
    with pytest.raises(ValueError, match="vocab_size"):
        CascadeModel([a, other_vocab])
    gpt = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="member 1"):
        CascadeModel([a, gpt])
    with pytest.raises(ValueError, match="from_first_layers"):
        CascadeModel.from_first_layers(b, [2])
    cm = CascadeModel([a, b])
    ids, mask, _ = ragged(3, 6)
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            cm.early_exit(ids, mask, threshold=bad)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        cm.early_exit(ids[0], threshold=0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        cm.early_exit(ids, mask[:, :4], threshold=0.5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        cm.early_exit(torch.ones(1, 80, dtype=torch.long), threshold=0.5)
    with pytest.raises(ValueError, match="difficulty"):
        cm(ids, mask, labels=torch.zeros(3, dtype=torch.long), difficulty=torch.zeros(3, 5))


def test_save_and_load_roundtrip(tmp_path):
    cm = CascadeModel.from_first_layers(tiny("roberta", 3, seed=13), [1], dar_weight=0.3, confidence_margin=0.2)
    cm.save_pretrained(str(tmp_path))
    assert (tmp_path / "member_0").is_dir() and (tmp_path / "member_1").is_dir() and (tmp_path / "eekernels.json").is_file()
    back = CascadeModel.from_pretrained(str(tmp_path))
    assert back.member_layers == [1, 3] and back.dar_weight == 0.3 and back.confidence_margin == 0.2
    ids, mask, _ = ragged(6, 9)
    x = cm.early_exit(ids, mask, threshold=0.5)
    y = back.early_exit(ids, mask, threshold=0.5)
    assert torch.equal(x.exit_layer, y.exit_layer) and torch.allclose(x.logits, y.logits)
    with pytest.raises(FileNotFoundError):
        CascadeModel.from_pretrained(str(tmp_path / "member_0"))


# --------------------------------------------------------------------------- DAR (eq. 5-6)


def dar_direct(conf, diff, eps):
    """Eq. 5-6 pair by pair: g(i, j) = 1 if d_i > d_j, -1 if d_i < d_j, 0 otherwise, with the
    text's orientation (difficult below easy): loss = max(0, g * (c_i - c_j) + eps), mean
    over the ordered pairs with g != 0 (each unordered pair appears twice with one value)."""
    terms = []
    for i, j in itertools.permutations(range(len(conf)), 2):
        if diff[i] < 0 or diff[j] < 0:
            continue
        g = 1 if diff[i] > diff[j] else (-1 if diff[i] < diff[j] else 0)
        if g != 0:
            terms.append(max(0.0, g * (conf[i] - conf[j]) + eps))
    return sum(terms) / len(terms) if terms else 0.0


def test_dar_loss_matches_eq_5_6():
    # hand: hard {0.9, 0.4}, easy {0.8, 0.3}, eps 0.2 ->
    # (0.9,0.8): 0.3  (0.9,0.3): 0.8  (0.4,0.8): 0  (0.4,0.3): 0.3   -> mean 1.4 / 4 = 0.35
    c = torch.tensor([0.9, 0.8, 0.4, 0.3], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([1, 0, 1, 0])
    loss = dar_margin_loss(c, d, 0.2)
    assert float(loss.detach()) == pytest.approx(0.35)
    assert float(dar_margin_loss(c.detach(), d, 0.2, reduction="sum")) == pytest.approx(1.4)
    loss.backward()
    # difficult confidences pushed down (positive gradient), easy ones up
    assert c.grad[0] > 0 and c.grad[2] > 0 and c.grad[1] < 0 and c.grad[3] < 0
    g = torch.Generator().manual_seed(14)
    for _ in range(5):
        conf = torch.rand(9, generator=g, dtype=torch.float64)
        diff = torch.randint(-1, 2, (9,), generator=g)
        eps = float(torch.rand(1, generator=g))
        assert float(dar_margin_loss(conf, diff, eps)) == pytest.approx(dar_direct(conf.tolist(), diff.tolist(), eps))
    # no (difficult, easy) pair: zero
    assert float(dar_margin_loss(torch.rand(4), torch.tensor([1, 1, -1, 1]), 0.5)) == 0.0
    with pytest.raises(ValueError):
        dar_margin_loss(torch.rand(3), torch.tensor([0, 2, 1]), 0.1)


@torch.no_grad()
def test_forward_loss_is_ce_plus_lambda_dar():
    cm = CascadeModel([tiny("bert", 1, seed=15), tiny("roberta", 2, seed=16)], dar_weight=0.7, confidence_margin=0.3,
                      kd_alpha=0.0)
    ids, mask, _ = ragged(8, 7)
    labels = torch.randint(0, N_LABELS, (8,), generator=torch.Generator().manual_seed(17))
    diff = torch.tensor([0, 1, 1, 0, -1, 0, 1, 0])
    out = cm(ids, mask, labels=labels, difficulty=diff)
    z = [m(input_ids=ids, attention_mask=mask).logits for m in cm.members]
    ce = sum(torch.nn.functional.cross_entropy(x, labels) for x in z)
    conf0 = z[0].softmax(-1).max(-1).values
    expect = ce + 0.7 * dar_direct(conf0.tolist(), diff.tolist(), 0.3)  # [B]: the smallest member only
    assert float(out.loss) == pytest.approx(float(expect), rel=1e-5)
    assert torch.allclose(out.logits, z[-1]) and out.exit_logits.shape == (2, 8, N_LABELS)
    # [B, M]: one column per member
    both = torch.stack([diff, 1 - diff.clamp_min(0)], dim=1)
    out2 = cm(ids, mask, labels=labels, difficulty=both)
    conf1 = z[1].softmax(-1).max(-1).values
    expect2 = ce + 0.7 * (dar_direct(conf0.tolist(), both[:, 0].tolist(), 0.3)
                          + dar_direct(conf1.tolist(), both[:, 1].tolist(), 0.3))
    assert float(out2.loss) == pytest.approx(float(expect2), rel=1e-5)
    assert cm(ids, mask, labels=labels).dar_loss is None


@torch.no_grad()
def test_member_training_distils_the_small_member_from_the_complete_model():
    """One member at a time (set_training_member): the small member's loss is
    (1 - a) CE + a T^2 KL(p_teacher^T || p_student^T) with the complete model as a fixed
    teacher (section 5.4, vanilla KD), plus lambda DAR; only its parameters train."""
    cm = CascadeModel([tiny("bert", 1, seed=31), tiny("bert", 2, seed=32)], dar_weight=0.7, confidence_margin=0.3,
                      kd_alpha=0.25, kd_temperature=3.0).train()  # tiny models have no dropout
    ids, mask, _ = ragged(8, 7, seed=33)
    labels = torch.randint(0, N_LABELS, (8,), generator=torch.Generator().manual_seed(34))
    diff = torch.tensor([0, 1, 1, 0, -1, 0, 1, 0])
    z_small = cm.members[0](input_ids=ids, attention_mask=mask).logits
    z_big = cm.members[1](input_ids=ids, attention_mask=mask).logits
    t = 3.0
    kl = (z_big / t).softmax(-1) * ((z_big / t).log_softmax(-1) - (z_small / t).log_softmax(-1))
    kd = t * t * kl.sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(z_small, labels)
    dar = dar_direct(z_small.softmax(-1).max(-1).values.tolist(), diff.tolist(), 0.3)
    cm.set_training_member(0)
    out = cm(ids, mask, labels=labels, difficulty=diff)
    assert float(out.loss) == pytest.approx(float(0.75 * ce + 0.25 * kd + 0.7 * dar), rel=1e-5)
    assert out.exit_logits.shape == (1, 8, N_LABELS) and torch.allclose(out.logits, z_small)
    assert all(p.requires_grad for p in cm.members[0].parameters())
    assert not any(p.requires_grad for p in cm.members[1].parameters())
    assert cm.training and cm.members[1].training  # the teacher ran in eval mode and was put back
    cm.set_training_member(1)  # the complete model: its own cross-entropy, no KD, no DAR column
    out = cm(ids, mask, labels=labels, difficulty=diff)
    assert float(out.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(z_big, labels)), rel=1e-5)
    cm.set_training_member(None)
    assert all(p.requires_grad for p in cm.parameters())
    heads = {id(p) for p in cm.head_parameters()}
    for m in cm.members:  # --head-lr reaches every member's pooler and classifier, nothing else
        assert {id(p) for p in m.classifier.parameters()} <= heads
        assert not {id(p) for p in m.bert.embeddings.parameters()} & heads
    with pytest.raises(ValueError, match="member must be"):
        cm.set_training_member(2)
    with pytest.raises(ValueError, match="kd_alpha"):
        CascadeModel([tiny("bert", 1)], kd_alpha=1.5)


# --------------------------------------------------------------------------- DIS and ECE


def test_dis_hand_examples():
    # easy {0.9, 0.7}, difficult {0.8, 0.6}: one inversion (0.8 difficult above 0.7 easy) of 4 pairs
    assert metrics.difficulty_inversion_score(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 0, 1])) == 0.75
    assert metrics.difficulty_inversion_score(torch.tensor([0.9, 0.2, 0.8]), torch.tensor([0, 1, 0])) == 1.0
    assert metrics.difficulty_inversion_score(torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0, 1, 0])) == 0.0
    # a tie counts half an inversion: easy {0.5}, difficult {0.5, 0.3} -> 1 - (0.5 + 0) / 2
    assert metrics.difficulty_inversion_score(torch.tensor([0.5, 0.5, 0.3]), torch.tensor([0, 1, 1])) == 0.75
    assert math.isnan(metrics.difficulty_inversion_score(torch.tensor([0.5, 0.6]), torch.tensor([0, 0])))
    # eq. 2-3 by brute force over the confidence-sorted instances (distinct confidences)
    g = torch.Generator().manual_seed(18)
    c = torch.randperm(30, generator=g).double() / 30
    d = torch.randint(0, 2, (30,), generator=g)
    order = c.argsort()
    ds = d[order]
    di_sum = sum(1 for i in range(30) for j in range(i) if ds[i] > ds[j])  # more confident one is difficult
    k = int((d == 0).sum()) * int((d == 1).sum())
    assert metrics.difficulty_inversion_score(c, d) == pytest.approx(1 - di_sum / k)
    # from logits: d = wrong prediction
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.2, 0.0]])
    assert metrics.dis_from_logits(z, torch.tensor([0, 1, 1])) == 1.0  # the wrong one is the least confident
    with pytest.raises(ValueError):
        metrics.difficulty_inversion_score(torch.tensor([0.5, 0.6]), torch.tensor([0, 2]))


def test_ece_hand_examples():
    # bins of width 0.1: {0.95, 0.95} acc 1/2 -> |1 - 1.9| = 0.9; {0.55} correct -> 0.45; {0.0} wrong -> 0
    conf = torch.tensor([0.95, 0.95, 0.55, 0.0], dtype=torch.float64)
    assert metrics.expected_calibration_error(conf, torch.tensor([1, 0, 1, 0])) == pytest.approx(1.35 / 4)
    # perfectly calibrated bin: four at 0.75, three right
    assert metrics.expected_calibration_error(torch.full((4,), 0.75), torch.tensor([1, 1, 1, 0])) == pytest.approx(0.0)
    # a bin edge belongs to the lower bin: 0.1 and 0.05 share (0, 0.1]
    assert metrics.expected_calibration_error(torch.tensor([0.1, 0.05], dtype=torch.float64),
                                              torch.tensor([0, 1])) == pytest.approx(abs(1 - 0.15) / 2)
    assert metrics.expected_calibration_error(torch.tensor([0.1, 0.05], dtype=torch.float64), torch.tensor([0, 1]),
                                              n_bins=20) == pytest.approx((0.1 + 0.95) / 2)
    z = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    assert metrics.ece_from_logits(z, torch.tensor([0, 0])) == pytest.approx((0.2 + 0.7) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        metrics.expected_calibration_error(torch.tensor([1.2]), torch.tensor([1]))


# --------------------------------------------------------------------------- training


def _hard_rows(task: ParityTask) -> torch.Tensor:
    """A difficulty that depends on the input: positive rows whose marker sits at position 3."""
    return ((task.labels == 1) & (task.ids[:, 3] == 7) & (task.ids[:, 1] != 7) & (task.ids[:, 2] != 7)).long()


def _confidence_gap(dar_weight: float, tmp_path) -> tuple:
    """Train the small member alone (HF Trainer through DARTrainer); returns its training
    losses, dev accuracy and mean confidence of easy minus difficult dev rows."""
    from eekernels.training.cascadebert import DARTrainer

    cm = CascadeModel([tiny("bert", 1, seed=19, num_labels=2), tiny("roberta", 2, seed=20, num_labels=2)],
                      dar_weight=dar_weight, confidence_margin=0.2, kd_alpha=0.0)
    cm.set_training_member(0)
    train, dev = ParityTask(384, seed=1), ParityTask(256, seed=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=24, learning_rate=5e-3,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = DARTrainer(model=cm, args=args, train_dataset=train, difficulty=_hard_rows(train))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("dar_loss" in h for h in logs)
    cm.set_training_member(None)
    with torch.no_grad():
        z = cm.eval().members[0](input_ids=dev.ids).logits
    conf = z.softmax(-1).max(-1).values
    hard = _hard_rows(dev).bool()
    acc = float((z.argmax(-1) == dev.labels).float().mean())
    return [h["loss"] for h in logs], acc, float(conf[~hard].mean() - conf[hard].mean())


def test_dar_lowers_the_confidence_of_difficult_instances(tmp_path):
    """DAR (eq. 5-6) on difficulty labels that depend on the input: the member still learns
    the task, and on held-out rows its confidence on difficult instances falls below that
    on easy ones by clearly more than without DAR."""
    losses, acc, gap = _confidence_gap(0.5, tmp_path / "dar")  # lambda = 0.5 as the paper
    _, acc0, gap0 = _confidence_gap(0.0, tmp_path / "plain")
    # observed: accuracy 0.89 with DAR, 0.96 without; gap +0.05 with DAR, -0.16 without
    assert losses[-1] < 0.7 * losses[0], losses
    assert acc > 0.8 and acc0 > 0.8, (acc, acc0)
    assert gap > 0.0 and gap > gap0 + 0.1, (gap, gap0)
    # the dataset wrapper feeds 'difficulty' to forward
    train = ParityTask(8, seed=1)
    row = DifficultyDataset(train, _hard_rows(train))[3]
    assert int(row["difficulty"]) == int(_hard_rows(train)[3]) and "input_ids" in row


def test_kfold_difficulty_labels_leave_one_fold_out(tmp_path):
    data = ParityTask(24, seed=22)
    runs = []

    class Recording(transformers.Trainer):
        def train(self, *a, **kw):
            runs.append({"seed": self.args.seed, "train": set(self.train_dataset.indices)})
            return super().train(*a, **kw)

        def predict(self, test_dataset, *a, **kw):
            runs[-1]["held"] = set(test_dataset.indices)
            return super().predict(test_dataset, *a, **kw)

    made = []

    def make_model(seed):
        made.append(seed)
        return tiny("bert", 1, seed=seed, num_labels=2)

    res = kfold_difficulty_labels(make_model, data, k=3, seeds=(4, 5), trainer_cls=Recording, progress=False,
                                  output_dir=str(tmp_path),
                                  training_args=dict(max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
                                                     use_cpu=True))
    assert made == [4, 4, 4, 5, 5, 5] and [r["seed"] for r in runs] == made
    assert sorted(torch.bincount(res.folds).tolist()) == [8, 8, 8]
    for r in runs:  # each fold model never trained on the fold it labels, and trained on all the rest
        assert r["train"].isdisjoint(r["held"]) and len(r["train"] | r["held"]) == 24
        f = {int(res.folds[i]) for i in r["held"]}
        assert len(f) == 1 and r["held"] == set((res.folds == f.pop()).nonzero().reshape(-1).tolist())
    assert res.correct.shape == (2, 24) and res.seeds == (4, 5)
    assert torch.equal(res.labels, (~res.correct.all(0)).long())  # easy only if right under every seed
    assert set(res.labels.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="k must be"):
        kfold_difficulty_labels(make_model, data, k=1)
    with pytest.raises(ValueError, match="seed"):
        kfold_difficulty_labels(make_model, data, k=2, seeds=())


def test_kfold_difficulty_labels_resume_from_cache(tmp_path):
    """With ``cache_dir`` each fold run's result is kept as it ends: after a run that dies
    part-way, a second call trains only the runs not finished and returns what one
    uninterrupted call returns; changed training arguments train everything again."""
    data = ParityTask(24, seed=23)
    cache = str(tmp_path / "cache")
    args = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True)
    trained = []

    class Dies(RuntimeError):
        pass

    def make_model(seed, die_after=None):
        if die_after is not None and len(trained) == die_after:
            raise Dies("killed")
        trained.append(seed)
        return tiny("bert", 1, seed=seed, num_labels=2)

    def label(die_after=None, cache_dir=cache, **overrides):
        return kfold_difficulty_labels(lambda s: make_model(s, die_after), data, k=3, seeds=(0, 1), progress=False,
                                       output_dir=str(tmp_path / "runs"), training_args={**args, **overrides},
                                       cache_dir=cache_dir)

    with pytest.raises(Dies):
        label(die_after=4)  # 4 of the 6 runs finish
    assert len(trained) == 4 and len(os.listdir(cache)) == 4
    trained.clear()
    resumed = label()
    assert trained == [1, 1]  # seed 1's last two folds
    trained.clear()
    whole = label(cache_dir=None)
    assert len(trained) == 6
    assert torch.equal(resumed.correct, whole.correct) and torch.equal(resumed.labels, whole.labels)
    trained.clear()
    label(learning_rate=2e-3)  # other settings: nothing cached applies
    assert len(trained) == 6


# --------------------------------------------------------------------------- resuming the member schedule


@pytest.mark.parametrize("stop, first_steps", [((2, 0), [1]), ((1, 6), [5, 1])],
                         ids=["between-members", "inside-a-member"])
def test_member_schedule_resumes_where_it_was_stopped(tmp_path, monkeypatch, stop, first_steps):
    """The registry's CascadeBERT training (the complete model, the K-fold difficulty labels,
    the small member with KD and DAR) stopped part-way and run again with a resume point
    skips the finished members, reuses the fold runs, continues the interrupted member from
    its last checkpoint and ends with the uninterrupted run's weights."""
    from eekernels.methods import registry
    from eekernels.training.schedule import StepSchedule

    from ..trainer_stops import FirstSteps, MethodTraining

    spec = registry.get_method("cascadebert")
    options = {**registry.parse_options(spec, []), "small_layers": (1,), "difficulty_folds": 2,
               "difficulty_seeds": 1}
    run = MethodTraining(monkeypatch, spec, options, lambda: tiny("bert", 2, seed=7, num_labels=2),
                         ParityTask(64, seed=3))
    whole, whole_losses = run(tmp_path / "whole")
    area = tmp_path / "stopped"
    point = run.stopped(area, stop)
    folds = os.listdir(area / "difficulty") if (area / "difficulty").is_dir() else []
    assert len(folds) == (2 if stop[0] == 2 else 0)  # the labels come after the complete model
    seen = FirstSteps()
    run.callbacks[:] = [seen]
    model, losses = run(area, point)
    assert seen.first == first_steps  # finished members skipped, the stopped one from its checkpoint
    assert sorted(os.listdir(area / "difficulty")) == sorted(os.listdir(tmp_path / "whole" / "difficulty"))
    assert set(losses) == set(whole_losses) and losses["difficult_fraction"] == whole_losses["difficult_fraction"]
    want = whole.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    record = StepSchedule(str(area), registry.CASCADE_PROGRESS_FILE, model, resume=True)
    assert record.done == ["member1", "member0"]
    seen.first.clear()
    run(area, point)  # everything finished: no member trains again
    assert seen.first == []
