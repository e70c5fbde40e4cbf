"""MPEE (eekernels.methods.mpee): token-wise + layer-wise exit on tiny BERT classifiers (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels import metrics  # noqa: E402
from eekernels.engine.mpee import TokenPruning  # noqa: E402
from eekernels.methods.mpee import MPEEModel, convert_mpee  # noqa: E402
from eekernels.nn.distillation import (  # noqa: E402
    AttentionTeacher,
    ensemble_distillation_loss,
    exit_ce_loss,
    mpee_loss,
)
from eekernels.ops import mpee_kept_width  # noqa: E402

from ..helpers import kernel_backends, rel_err, threshold_between  # noqa: E402
from ..tiny import ragged_batch, tiny_classifier  # noqa: E402

N_LAYERS, N_LABELS, VOCAB = 6, 3, 100
PRUNE = (2, 3, 5)


def tiny_bert(seed: int = 0, layers: int = N_LAYERS, labels: int = N_LABELS, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                                  num_labels=labels, initializer_range=0.3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = attn
    return transformers.BertForSequenceClassification(cfg).eval()


def batch(b=7, s=20, seed=1):
    return ragged_batch(b, s, seed=seed, vocab=VOCAB)


def cpu_backend():
    ks = kernel_backends("cpu")
    return ks[0] if ks else "torch"


# --------------------------------------------------------------------------- token-wise exit


def test_kept_widths_128_91_65_47():
    assert [mpee_kept_width(s, 0.7) for s in (128, 91, 65)] == [91, 65, 47]
    w = TokenPruning((4, 7, 10), 0.7, 0.5).widths(128, 12)
    assert w == [128] * 4 + [91] * 3 + [65] * 3 + [47] * 2
    m = convert_mpee(tiny_bert(), prune_layers=PRUNE)
    assert m.sequence_widths(20) == [20, 20, 16, 13, 13, 11]
    ids, mask, _ = batch(5, 20)
    out = m.early_exit(ids, mask, threshold=0.0)  # entropy < 0 never: every row runs every layer
    assert out.extras["widths"] == [20, 20, 16, 13, 13, 11]
    assert out.extras["tokens_run"] == 5 * sum(out.extras["widths"])


def test_class_attention_is_head_mean_of_hf_eager_cls_row():
    hf = tiny_bert(seed=2, attn="eager")
    m = convert_mpee(hf, prune_layers=(N_LAYERS - 1,))  # layers 1..L-1 see the unpruned sequence
    ids, mask, _ = batch(4, 15, seed=3)
    with torch.no_grad():
        probs = hf(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    trace = m.trace_tokens(ids, mask)
    for layer in range(1, N_LAYERS):
        ref = probs[layer - 1][:, :, 0].mean(dim=1)  # mean over heads of the [CLS] row
        got = trace[layer - 1]["class_attention"]
        assert got.dtype == torch.float32
        assert torch.allclose(got, ref, atol=1e-6), layer
        assert (got[mask == 0] == 0).all()
    assert trace[-1]["class_attention"] is None  # not needed after the last pruning layer


def test_memory_eq6_selection_eq7_and_padding_never_kept():
    beta, keep = 0.5, 0.7
    m = convert_mpee(tiny_bert(seed=4), prune_layers=PRUNE, keep_ratio=keep, beta=beta)
    ids, mask, lengths = batch(6, 18, seed=5)
    trace = m.trace_tokens(ids, mask)
    prev = None
    n_valid = lengths.clone()
    for rec in trace:
        layer = rec["layer"]
        if layer > max(PRUNE):
            break
        a, mem = rec["class_attention"], rec["memory"]
        expect = beta * a if prev is None else (1 - beta) * prev + beta * a  # eq. 6, A_m = 0 before layer 1
        assert torch.allclose(mem, expect, atol=1e-7), layer
        assert torch.equal(rec["valid"].sum(1), n_valid)
        prev = mem
        pr = rec["pruned"]
        if pr is None:
            continue
        assert pr.hidden.shape[1] == mpee_kept_width(rec["width"], keep)
        for r in range(ids.shape[0]):
            n = int(n_valid[r]) - 1  # valid non-[CLS] tokens
            kept_n = math.ceil(keep * n - 1e-6)
            src = pr.source[r]
            kept = src[1:1 + kept_n]
            assert int(src[0]) == 0 and bool(pr.valid[r, 0])  # [CLS] stays
            assert bool(rec["valid"][r, kept].all()), "padding kept"
            cand = rec["valid"][r].nonzero().flatten()
            cand = cand[cand > 0]
            fused = cand[~torch.isin(cand, kept)]
            assert len(fused) == n - kept_n
            if len(fused):  # eq. 7: every kept token's memory >= every fused one's
                assert mem[r, kept].min() >= mem[r, fused].max()
                assert bool(pr.valid[r, 1 + kept_n])
                assert torch.allclose(pr.memory[r, 1 + kept_n], mem[r, fused].sum())
                # eq. 8: the fusion token is the raw class-attention-weighted sum of the fused tokens
                fusion = (a[r, fused, None] * rec["hidden"][r, fused]).sum(0)
                assert torch.allclose(pr.hidden[r, 1 + kept_n], fusion, atol=1e-6)
            assert int(pr.valid[r].sum()) == 1 + kept_n + (1 if len(fused) else 0)
            assert torch.equal(pr.memory[r, 1:1 + kept_n], mem[r, kept])
        n_valid = pr.valid.sum(1)
        prev = pr.memory
    # the per-sample token counts the FLOPs metric uses are the valid slots the layers saw
    counts = metrics.mpee_token_counts(lengths, N_LAYERS, PRUNE, keep)
    assert torch.equal(counts[:, 0], lengths)
    assert torch.equal(counts[:, N_LAYERS - 1], trace[-1]["valid"].sum(1))


# --------------------------------------------------------------------------- layer-wise exit: teacher and loss


def test_teacher_and_loss_against_direct_formulas():
    torch.manual_seed(0)
    e, b, c, tau = 4, 3, 3, 2.0
    z = torch.randn(e, b, c)
    y = torch.tensor([0, 2, 1])
    teach = AttentionTeacher(c, attention_dim=5)
    W, bb, V = teach.proj.weight, teach.proj.bias, teach.context.weight[0]
    out = teach(z)
    for j in range(b):  # eq. 12, one sample at a time
        s = torch.stack([V @ torch.tanh(W @ z[l, j] + bb) for l in range(e)])
        eta = s.exp() / s.exp().sum()
        assert torch.allclose(out.weights[:, j], eta, atol=1e-6)
        assert torch.allclose(out.teacher[j], sum(eta[l] * z[l, j] for l in range(e)), atol=1e-6)
    t = out.teacher.detach()

    def kl(p, q):
        return float((p * (p / q).log()).sum())

    kd_st = kd_ts = ce = 0.0
    for l in range(e):
        for j in range(b):
            ps, pt = torch.softmax(z[l, j] / tau, 0), torch.softmax(t[j] / tau, 0)
            kd_st += tau ** 2 * kl(ps, pt) / b  # eq. 13 as printed
            kd_ts += tau ** 2 * kl(pt, ps) / b
            ce += -float(torch.log_softmax(z[l, j], 0)[y[j]]) / b  # eq. 11
    assert ensemble_distillation_loss(z, t, tau) == pytest.approx(kd_st, rel=1e-5)
    assert ensemble_distillation_loss(z, t, tau, "teacher_student") == pytest.approx(kd_ts, rel=1e-5)
    assert exit_ce_loss(z, y) == pytest.approx(ce, rel=1e-5)
    t_ce = float(torch.nn.functional.cross_entropy(t, y))
    zg = z.clone().requires_grad_(True)
    total = mpee_loss(zg, y, teach, tau)
    assert float(total.loss.detach()) == pytest.approx(ce + kd_st + t_ce, rel=1e-5)  # eq. 14 + the teacher's CE
    assert float(total.kd.detach()) == pytest.approx(kd_st, rel=1e-5) and float(total.teacher_ce.detach()) == pytest.approx(t_ce)
    # the teacher is a fixed target in L_KD and its CE trains the attention alone: the
    # students' gradient is that of L_CE + L_KD with t constant
    total.loss.backward()
    zr = z.clone().requires_grad_(True)
    (exit_ce_loss(zr, y) + ensemble_distillation_loss(zr, t, tau)).backward()
    assert torch.allclose(zg.grad, zr.grad, atol=1e-6)
    assert teach.proj.weight.grad is not None and teach.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="direction"):
        ensemble_distillation_loss(z, t, tau, "sideways")
    with pytest.raises(ValueError, match="temperature"):
        ensemble_distillation_loss(z, t, 0.0)


def test_exit_logits_tanh_and_classifier_memory_eq9_10():
    lam = 0.9
    m = convert_mpee(tiny_bert(seed=6), prune_layers=(), lam=lam, init="random")
    ids, mask, _ = batch(4, 12, seed=7)
    with torch.no_grad():
        zs = m(ids, mask).exit_logits
        hid = m.hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    prev = None
    for j, layer in enumerate(m.exit_layers[:-1]):
        h = m.heads[str(layer)]
        with torch.no_grad():
            cz = torch.tanh(h.classifier(hid[layer][:, 0]))  # eq. 9: no pooler
        expect = cz if prev is None else (1 - lam) * prev + lam * cz  # eq. 10
        assert torch.allclose(zs[j], expect, atol=1e-5), layer
        prev = expect
    assert zs.abs().max() <= 1.0  # every exit's logits are tanh-bounded, the last one's too (the default)
    assert all(h.pooler is None for h in m.heads.values()) and str(N_LAYERS) in m.heads


def test_the_last_exit_has_tanh_and_memory_and_is_the_full_model():
    lam = 0.6
    m = convert_mpee(tiny_bert(seed=16), prune_layers=(), lam=lam, init="random").eval()
    ids, mask, _ = batch(4, 12, seed=17)
    with torch.no_grad():
        zs = m(ids, mask).exit_logits
        hid = m.hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        cz = torch.tanh(m.heads[str(N_LAYERS)].classifier(hid[N_LAYERS][:, 0]))
        assert torch.allclose(zs[-1], (1 - lam) * zs[-2] + lam * cz, atol=1e-5)  # eq. 9-10 at the last exit
        full = m.full_model()(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(full, zs[-1], atol=1e-6)
    out = m.early_exit(ids, mask, threshold=0.0)
    assert (out.exit_layer == N_LAYERS).all() and rel_err(out.logits, full) <= 1e-5


# --------------------------------------------------------------------------- the model


def test_pruning_and_exits_disabled_equal_hf():
    hf = tiny_bert(seed=8)
    ids, mask, _ = batch(6, 17, seed=9)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ref_nomask = hf(input_ids=ids).logits
    for opts in (dict(prune_layers=()), dict(prune_layers=PRUNE, keep_ratio=1.0)):
        m = convert_mpee(hf, final_mpee_head=False, **opts)  # the HF head as the last exit
        for backend in ["torch", cpu_backend()]:
            out = m.early_exit(ids, mask, threshold=0.0, backend=backend)
            assert (out.exit_layer == N_LAYERS).all()
            assert rel_err(out.logits, ref) <= 1e-5, (opts, backend)
        with torch.no_grad():
            assert rel_err(m(ids, mask).logits, ref) <= 1e-5
            assert rel_err(m.early_exit(ids, None, threshold=0.0).logits, ref_nomask) <= 1e-5
        assert out.flops_speedup < 1.0  # heads (and keep_ratio 1.0's class attention) cost, nothing saved


def test_batched_equals_alone_with_pruning_and_exits():
    m = convert_mpee(tiny_bert(seed=10), prune_layers=PRUNE, init="random")
    ids, mask, lengths = batch(9, 20, seed=11)
    with torch.no_grad():
        z = m(ids, mask).exit_logits[:-1]
    p = z.softmax(-1)
    thr = threshold_between(-(p * p.log()).sum(-1))
    backend = cpu_backend()
    out = m.early_exit(ids, mask, threshold=thr, backend=backend)
    assert len(set(out.exit_layer.tolist())) > 1, "threshold should spread exits over layers"
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = m.early_exit(ids[i:i + 1, :n], None, threshold=thr, backend=backend)
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"sample {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), f"sample {i}"
    # the forward (training/calibration) path decides the same exits: replaying the entropy
    # rule on its C_zm gives the engine's exit layers
    from eekernels.calibration import simulate_exits

    with torch.no_grad():
        all_z = m(ids, mask).exit_logits
    layers, logits = simulate_exits(all_z, m.exit_layers, N_LAYERS, "entropy", thr)
    assert torch.equal(layers, out.exit_layer)
    assert torch.allclose(logits, out.logits, atol=1e-5)


def test_flops_speedup_counts_shrinking_sequence_and_exits():
    m = convert_mpee(tiny_bert(seed=12), prune_layers=PRUNE, exit_layers=[2, 4])
    ids, mask, lengths = batch(5, 20, seed=13)
    prof = torch.tensor([1, 3, 6, 6, 4])
    out = m.early_exit(ids, mask, exit_profile=prof)
    assert out.exit_layer.tolist() == [2, 4, 6, 6, 4]
    h, inter, c = 32, 48, N_LABELS

    def layer_flops(n):
        return 8 * n * h * h + 4 * n * h * inter + 4 * n * n * h

    full = run = 0.0
    head = 2 * h * c  # eq. 9: no pooler
    for r in range(5):
        n = int(lengths[r])
        full += N_LAYERS * layer_flops(n) + head
        e = int(out.exit_layer[r])
        for layer in range(1, e + 1):
            run += layer_flops(n) + 2 * n * h * (layer <= max(PRUNE)) + 2 * n * h * (layer in PRUNE)
            if layer in PRUNE:
                kept = math.ceil(0.7 * (n - 1) - 1e-6)
                n = 1 + kept + (1 if n - 1 - kept > 0 else 0)
        run += head * sum(1 for l in (2, 4, 6) if l <= e)
    assert out.flops_speedup == pytest.approx(full / run, rel=1e-9)
    assert out.flops_speedup > out.layer_speedup  # the token-wise exit saves on top of the exits
    with pytest.raises(ValueError, match="exit_profile"):
        m.early_exit(ids, mask, exit_profile=prof[:2])


def test_trainer_loss_decreases(tmp_path):
    from ..tiny import ParityTask

    hf = tiny_bert(seed=5, layers=4, labels=2)
    m = convert_mpee(hf, prune_layers=(1, 2), init="random")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=24, learning_rate=3e-3,
        logging_steps=6, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=m, args=args, train_dataset=ParityTask(256, seed=1))
    teacher_before = m.teacher.proj.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 4
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(teacher_before, m.teacher.proj.weight), "the teacher's attention did not train"


def test_save_load_roundtrip(tmp_path):
    m = convert_mpee(tiny_bert(seed=14), prune_layers=(1, 4), keep_ratio=0.6, beta=0.3, lam=0.8,
                     exit_layers=[1, 3, 5], temperature=2.0, final_mpee_head=True)
    with torch.no_grad():
        for p in list(m.heads.parameters()) + list(m.teacher.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(str(tmp_path))
    back = MPEEModel.from_pretrained(str(tmp_path))
    assert back.options() == m.options()
    ids, mask, _ = batch(5, 14, seed=15)
    labels = torch.tensor([0, 1, 2, 0, 1])
    a, b = m.early_exit(ids, mask, threshold=0.9), back.early_exit(ids, mask, threshold=0.9)
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.logits, b.logits)
    with torch.no_grad():
        assert torch.allclose(m(ids, mask, labels=labels).loss, back(ids, mask, labels=labels).loss)
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        MPEEModel.from_pretrained(str(tmp_path / "nowhere"))


def test_bad_options_and_inputs_clear_errors():
    hf = tiny_bert()
    with pytest.raises(ValueError, match="prune_layers"):
        convert_mpee(hf)  # the default 4, 7, 10 does not fit 6 layers
    with pytest.raises(ValueError, match="keep_ratio"):
        convert_mpee(hf, prune_layers=PRUNE, keep_ratio=0.0)
    with pytest.raises(ValueError, match="lam"):
        convert_mpee(hf, prune_layers=PRUNE, lam=1.5)
    with pytest.raises(ValueError, match="beta"):
        convert_mpee(hf, prune_layers=PRUNE, beta=-0.1)
    with pytest.raises(ValueError, match="num_labels"):
        convert_mpee(tiny_bert(labels=1), prune_layers=PRUNE)
    m = convert_mpee(hf, prune_layers=PRUNE)
    ids, mask, _ = batch(2, 8)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        m.early_exit(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, mask[:, :3])
    with pytest.raises(ValueError, match="threshold"):
        m.early_exit(ids, mask, threshold=-1.0)
    base = convert_mpee(hf.bert, num_labels=2, prune_layers=PRUNE)  # a base model gets a classifier
    assert base.early_exit(ids, mask).logits.shape == (2, 2)


@pytest.mark.parametrize("arch", ["roberta", "albert"])
def test_other_architectures_parity_and_pruning(arch):
    hf = tiny_classifier(arch, seed=17)  # 4 layers, hidden 32
    ids, mask, _ = ragged_batch(5, 15, seed=18)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    off = convert_mpee(hf, prune_layers=(1, 2), keep_ratio=1.0, final_mpee_head=False)
    assert rel_err(off.early_exit(ids, mask, threshold=0.0).logits, ref) <= 1e-5
    on = convert_mpee(hf, prune_layers=(1, 2), keep_ratio=0.5)
    out = on.early_exit(ids, mask, threshold=0.0)
    assert out.extras["widths"] == [15, 9, 6, 6] and out.flops_speedup > 1.0
    with torch.no_grad():
        assert torch.allclose(on(ids, mask).logits, out.logits, atol=1e-5)
