"""Global Past-Future early exit (past-future.txt section 3) on tiny BERT-style models (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.calibration import calibrate  # noqa: E402
from eekernels.methods.past_future import METHODS, STRATEGIES, PastFutureModel, PastFutureRule, convert  # noqa: E402
from eekernels.methods.registry import get_method, parse_options  # noqa: E402
from eekernels.nn.imitation import ImitationLearners, MergingGate, cosine_imitation_loss  # noqa: E402
from eekernels.nn.past_pooling import build_pooling  # noqa: E402
from eekernels.ops import compact_rows  # noqa: E402
from eekernels.training.past_future import LayerFreezingCallback, freeze_probabilities  # noqa: E402

from ..helpers import kernel_backends, rel_err, threshold_between  # noqa: E402
from ..tiny import N_LAYERS, ragged_batch, tiny_classifier  # noqa: E402
from ..tiny import ParityTask  # noqa: E402

H = 32


def perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter off its (often structured) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def pf_model(strategy: str, seed: int = 3, arch: str = "bert", **kw) -> PastFutureModel:
    model = convert(tiny_classifier(arch, seed=seed), strategy=strategy, **kw)
    for m in model.method_modules():
        perturbed(m, seed=seed, scale=0.1)
    return model.eval()


# --------------------------------------------------------------------------- G (eq. 1, 6)


def direct_pool(strategy: str, pool, states: torch.Tensor) -> torch.Tensor:
    """The strategies as section 3.1 words them, written out independently."""
    if strategy == "max":
        return states.max(dim=1).values
    if strategy == "avg":
        return states.sum(dim=1) / states.shape[1]
    if strategy == "attn":
        q = states[:, -1] @ pool.query.weight.T + pool.query.bias
        w = torch.softmax((states * q[:, None]).sum(-1) / math.sqrt(H), dim=1)
        return (w[:, :, None] * states).sum(1)
    if strategy == "concat":
        lin = pool.linears[str(states.shape[1])]
        return torch.cat(list(states.unbind(1)), dim=1) @ lin.weight.T + lin.bias
    cell = torch.nn.LSTMCell(H, H)
    cell.load_state_dict({"weight_ih": pool.lstm.weight_ih_l0, "weight_hh": pool.lstm.weight_hh_l0,
                          "bias_ih": pool.lstm.bias_ih_l0, "bias_hh": pool.lstm.bias_hh_l0})
    h = c = torch.zeros(states.shape[0], H)
    for k in range(states.shape[1]):
        h, c = cell(states[:, k], (h, c))
    return h


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pooling_incremental_equals_full(strategy):
    torch.manual_seed(0)
    n_rows, k_max = 6, 5
    pool = perturbed(build_pooling(strategy, H, k_max), seed=1, scale=0.2).eval()
    states = torch.randn(n_rows, k_max, H)
    rows = torch.arange(n_rows)
    with torch.no_grad():
        prefixes = pool.forward_prefixes(states)
        assert torch.allclose(pool.prefixes(states, [2, 5]), prefixes[:, [1, 4]], atol=1e-6)
        state = pool.init_state(n_rows, states.device, states.dtype)
        for k in range(1, k_max + 1):
            full = pool(states[rows, :k])
            assert torch.allclose(full, direct_pool(strategy, pool, states[rows, :k]), atol=1e-5), k
            assert torch.allclose(prefixes[rows, k - 1], full, atol=1e-5), k
            state = pool.update(state, states[rows, k - 1], k)
            assert torch.allclose(pool.read(state, k), full, atol=1e-5), k
            if k == 2:  # rows leave: the state is compacted with them, as the engine does
                keep = torch.tensor([True, False, True, True, False, True])
                packed = compact_rows(keep, [rows] + list(state.values()), backend="torch")
                rows = packed.tensors[0]
                state = dict(zip(state, packed.tensors[1:]))
    assert rows.tolist() == [0, 2, 3, 5]


def test_pooling_bad_inputs():
    with pytest.raises(ValueError, match="unknown pooling strategy"):
        build_pooling("median", H, 3)
    concat = build_pooling("concat", H, 4, counts=[1, 3])
    with pytest.raises(ValueError, match="no linear map for K=2"):
        concat(torch.randn(2, 2, H))
    with pytest.raises(ValueError, match="prefix lengths must be within"):
        concat.prefixes(torch.randn(2, 3, H), [1, 4])
    with pytest.raises(ValueError, match=r"\[N, K, 32\]"):
        build_pooling("max", H, 3)(torch.randn(2, 3, 16))
    avg = build_pooling("avg", H, 3)
    with pytest.raises(ValueError, match="max_states"):
        avg.update(avg.init_state(2, "cpu", torch.float32), torch.randn(2, H), 4)
    # an untrained concat map is the mean of its states
    s = torch.randn(3, 4, H)
    assert torch.allclose(build_pooling("concat", H, 4)(s), s.mean(1), atol=1e-6)


def test_concat_pools_only_the_prefixes_its_exits_use():
    """One linear map per prefix length an exit reads; the prefixes of the others are never asked for."""
    torch.manual_seed(0)
    concat = perturbed(build_pooling("concat", H, 4, counts=[1, 3, 4]))
    states = torch.randn(5, 4, H)
    got = concat.prefixes(states, [1, 3, 4])
    for a, k in enumerate([1, 3, 4]):
        assert torch.allclose(got[:, a], direct_pool("concat", concat, states[:, :k]), atol=1e-5), k
    assert sorted(concat.linears) == ["1", "3", "4"]


# --------------------------------------------------------------------------- eq. 2-8


def test_imitation_future_is_one_learner_per_layer():
    torch.manual_seed(0)
    n = 5
    learners = perturbed(ImitationLearners(H, n))
    s = torch.randn(7, H)
    for i in range(1, n):
        fut = learners.future(s, i)
        assert fut.shape == (7, n - i, H)
        for j in range(i + 1, n + 1):  # eq. 2: s^i_j = W_j s_i + b_j
            expect = s @ learners.weight[j - 2].T + learners.bias[j - 2]
            assert torch.allclose(fut[:, j - i - 1], expect, atol=1e-5), (i, j)
    states = torch.randn(7, 3, H)
    all_ = learners.all_future(states)
    assert torch.allclose(all_[:, 1, 2:], learners.future(states[:, 1], 3), atol=1e-5)
    with pytest.raises(ValueError, match="no future"):
        learners.future(s, n)


def test_cosine_loss_matches_eq_3_to_5():
    torch.manual_seed(0)
    b, n = 4, 5
    states = torch.randn(b, n, H)
    learners = perturbed(ImitationLearners(H, n))
    for sources in ([1, 2, 3, 4], [2, 4]):
        approx = learners.all_future(states[:, [i - 1 for i in sources]])
        got = cosine_imitation_loss(states, approx, sources)
        per_i = []
        for a, i in enumerate(sources):
            terms = []
            for j in range(i + 1, n + 1):
                s_hat, s_j = approx[:, a, j - 2], states[:, j - 1]
                l = 1 - (s_hat * s_j).sum(-1) / (s_hat.norm(dim=-1) * s_j.norm(dim=-1))  # eq. 3
                terms.append(l)
            per_i.append(torch.stack(terms).sum(0) / (n - i))  # eq. 4
        expect = (torch.stack(per_i).sum(0) / len(sources)).mean()  # eq. 5, then the batch mean
        assert torch.allclose(got, expect, atol=1e-6), sources
    # the teacher s_j gets no gradient; the learners and the source state do
    states.requires_grad_(True)
    approx = learners.all_future(states[:, [0]])
    cosine_imitation_loss(states, approx, [1]).backward()
    assert states.grad[:, 1:].abs().sum() == 0 and states.grad[:, 0].abs().sum() > 0
    assert learners.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="source layers"):
        cosine_imitation_loss(states, approx, [n])


def test_gate_and_merge_eq_7_8():
    torch.manual_seed(0)
    gate = perturbed(MergingGate(H))
    s_p, s_f = torch.randn(6, H), torch.randn(6, H)
    alpha = 1 / (1 + torch.exp(-(s_p @ gate.ffn.weight[0] + gate.ffn.bias[0])))  # eq. 7
    assert torch.allclose(gate.alpha(s_p)[:, 0], alpha, atol=1e-6)
    assert torch.allclose(gate(s_p, s_f), alpha[:, None] * s_p + (1 - alpha[:, None]) * s_f, atol=1e-6)  # eq. 8
    assert not torch.allclose(alpha, alpha[0].expand_as(alpha))  # per-sample gate
    with pytest.raises(ValueError, match="same shape"):
        gate(s_p, s_f[:, :5])


def test_joint_loss_is_weighted_ce_plus_cos():
    model = pf_model("concat").train()  # tiny configs have dropout 0: deterministic
    ids, mask, _ = ragged_batch(6, 9)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(ids, mask, labels=labels)
    w = torch.tensor([1.0, 2, 3, 4]) / 10  # eq. 9
    ce = torch.stack([torch.nn.functional.cross_entropy(z, labels) for z in out.exit_logits])
    assert torch.allclose(out.ce_loss, (w * ce).sum(), atol=1e-6)  # eq. 12
    assert out.cos_loss is not None and float(out.cos_loss.detach()) > 0
    assert torch.allclose(out.loss, out.ce_loss + out.cos_loss)  # eq. 13
    out.loss.backward()
    for m in model.method_modules():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), type(m).__name__


# --------------------------------------------------------------------------- inference


def entropy(z: torch.Tensor) -> torch.Tensor:
    p = z.float().softmax(-1)
    return -torch.special.xlogy(p, p).sum(-1)


def decision_scores(model, ids, mask):
    """The entropy each internal exit decides on, for every row: ``exit_logits`` are the
    logits each exit's decision thresholds (the merged head's, the mean probabilities' for
    ensemble, the layer's own head's for voting)."""
    with torch.no_grad():
        return entropy(model(ids, mask).exit_logits[:-1])


def spread_threshold(model, ids, mask, backend):
    """An entropy threshold at which exits spread over the most distinct layers, each candidate
    strictly between two distinct decision scores (never on a row's own score)."""
    scores = decision_scores(model, ids, mask)
    best, best_n = None, 0
    for q in (0.2, 0.35, 0.5, 0.65, 0.8):
        t = threshold_between(scores, quantile=q)
        n = len(set(model.early_exit(ids, mask, threshold=t, backend=backend).exit_layer.tolist()))
        if n > best_n:
            best, best_n = t, n
    return best


@pytest.mark.parametrize("strategy", METHODS)
def test_batched_equals_alone(strategy):
    """Batching, padding and compaction of the rule's state never change a sample's result."""
    model = pf_model(strategy)
    ids, mask, lengths = ragged_batch(11, 13, seed=4)
    backend = kernel_backends("cpu")[0] if kernel_backends("cpu") else "torch"
    thr = spread_threshold(model, ids, mask, backend)
    out = model.early_exit(ids, mask, threshold=thr, backend=backend)
    assert len(set(out.exit_layer.tolist())) > 1, "threshold should spread exits over layers"
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = model.early_exit(ids[i:i + 1, :n], None, threshold=thr, backend=backend)
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"sample {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), f"sample {i}"


@pytest.mark.parametrize("last_exit", ["past", "hf"])
@pytest.mark.parametrize("strategy", METHODS)
def test_engine_equals_full_forward_at_every_exit(strategy, last_exit):
    """The incremental rule at exit layer k predicts what the training forward predicts at exit k."""
    model = pf_model(strategy, seed=5, last_exit=last_exit)
    ids, mask, _ = ragged_batch(7, 10, seed=2)
    with torch.no_grad():
        full = model.exit_predictions(model(ids, mask).exit_logits)
    for k in range(1, N_LAYERS + 1):
        out = model.early_exit(ids, mask, exit_profile=torch.full((7,), k), backend="torch")
        assert (out.exit_layer == k).all()
        assert torch.allclose(out.logits, full[k - 1], atol=1e-5), k


def test_voting_decides_on_each_exits_own_head():
    """Voting's exit_logits are each exit's own head (what its decision thresholds); its
    prediction is the majority of the exits' labels so far, the last exit voting too."""
    model = pf_model("voting")
    ids, mask, _ = ragged_batch(9, 10, seed=3)
    with torch.no_grad():
        z = model(ids, mask).exit_logits
        hidden = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        own = [model.heads[str(l)](hidden[l][:, 0]) for l in model.exit_layers[:-1]]
        own.append(model.hf(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(z, torch.stack(own), atol=1e-5)
    votes = torch.zeros(9, 3)
    for k, logits in enumerate(own, start=1):
        votes[torch.arange(9), logits.argmax(-1)] += 1
        assert torch.equal(model.exit_predictions(z)[k - 1], votes / k), k


@pytest.mark.parametrize("strategy", ["attn", "concat"])
def test_exit_layers_subset_pools_every_layer(strategy):
    model = pf_model(strategy, exit_layers=[2])
    assert model.exit_layers == [2, N_LAYERS]
    ids, mask, _ = ragged_batch(5, 8)
    with torch.no_grad():
        full = model(ids, mask).exit_logits
    for k, layer in ((1, 2), (3, N_LAYERS)):
        out = model.early_exit(ids, mask, exit_profile=torch.full((5,), k))
        assert (out.exit_layer == layer).all() and torch.allclose(out.logits, full[-1 if k == 3 else 0], atol=1e-5)
    # the past at layer 2 holds s_1 and s_2: attention over one state would give s_2 alone
    with torch.no_grad():
        states = torch.stack([h[:, 0] for h in model.layer_states(ids, mask)], dim=1)
    assert not torch.allclose(model.past_pool(states[:, :2]), states[:, 1], atol=1e-3)


def test_concat_with_an_exit_subset_trains():
    """concat builds one map per prefix length its exits read ([1, 3] and the last exit's n)."""
    model = pf_model("concat", exit_layers=[1, 3]).train()
    assert sorted(model.past_pool.linears) == ["1", "3", str(N_LAYERS)]
    assert sorted(model.future_pool.linears) == [str(N_LAYERS - 3), str(N_LAYERS - 1)]
    ids, mask, _ = ragged_batch(6, 9)
    out = model(ids, mask, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.exit_logits.shape == (3, 6, 3)
    out.loss.backward()
    assert all(p.grad is not None for m in model.method_modules() for p in m.parameters())
    model.eval()
    with torch.no_grad():
        full = model(ids, mask).exit_logits
    for k, layer in ((1, 1), (2, 3), (4, N_LAYERS)):
        got = model.early_exit(ids, mask, exit_profile=torch.full((6,), k))
        assert (got.exit_layer == layer).all() and torch.allclose(got.logits, full[model.exit_layers.index(layer)],
                                                                 atol=1e-5)


def hf_head(model, z):
    """The HF model's own pooler + classifier (BERT) on z, written out."""
    return torch.tanh(z @ model.hf.bert.pooler.dense.weight.T + model.hf.bert.pooler.dense.bias) \
        @ model.hf.classifier.weight.T + model.hf.classifier.bias


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_last_exit_pools_every_layer_by_default(strategy):
    """eq. 1 and 10-12 at i = n: the last exit's HF head classifies z_n = G(s_1..s_n) (no future
    to merge), not the last [CLS] state alone."""
    model = pf_model(strategy)
    assert model.last_exit == "past"
    ids, mask, _ = ragged_batch(6, 9, seed=5)
    with torch.no_grad():
        states = torch.stack([h[:, 0] for h in model.layer_states(ids, mask)], dim=1)
        expect = hf_head(model, direct_pool(strategy, model.past_pool, states) if strategy != "concat"
                         else torch.cat(list(states.unbind(1)), 1) @ model.past_pool.linears[str(N_LAYERS)].weight.T
                         + model.past_pool.linears[str(N_LAYERS)].bias)
        assert torch.allclose(model(ids, mask).exit_logits[-1], expect, atol=1e-5)
        hf = model.hf(input_ids=ids, attention_mask=mask).logits
    assert rel_err(expect, hf) > 1e-3  # the pooled past really differs from the last [CLS] state


def test_baselines_last_exit_combines_every_exit():
    ids, mask, _ = ragged_batch(6, 9, seed=5)
    model = pf_model("ensemble")
    with torch.no_grad():
        z = model(ids, mask)
        hidden = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        own = [model.heads[str(l)](hidden[l][:, 0]) for l in model.exit_layers[:-1]]
        own.append(model.hf(input_ids=ids, attention_mask=mask).logits)
    mean_p = torch.stack(own).softmax(-1).mean(0)
    assert torch.allclose(z.exit_logits[-1], mean_p.log(), atol=1e-5) and torch.allclose(z.logits, mean_p.log(), atol=1e-5)
    hf_only = pf_model("ensemble", last_exit="hf")
    with torch.no_grad():
        assert torch.allclose(hf_only(ids, mask).exit_logits[-1], own[-1], atol=1e-5)


@pytest.mark.parametrize("strategy,arch", [(s, "bert") for s in METHODS] + [("concat", "roberta"), ("lstm", "albert")])
def test_exits_disabled_give_the_full_model(strategy, arch):
    """Exits disabled (entropy threshold 0) give the model's full-model baseline
    (``full_model()``): the HF forward with last_exit='hf'; with the paper's last exit
    ('past') this model's own full forward, which pools every layer."""
    ids, mask, _ = ragged_batch(9, 12)
    for last_exit in ("hf", "past"):
        hf = tiny_classifier(arch, seed=1)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
        model = convert(hf, strategy=strategy, last_exit=last_exit)
        for m in model.method_modules():
            perturbed(m)
        with torch.no_grad():
            full = model.full_model()(input_ids=ids, attention_mask=mask).logits
            forward = model(ids, mask).logits
        if last_exit == "hf":
            assert model.full_model() is model.hf and rel_err(full, ref) <= 1e-5
        else:
            assert rel_err(full, ref) > 1e-3
        assert rel_err(forward, full) <= 1e-5
        out = model.early_exit(ids, mask, criterion="entropy", threshold=0.0)
        assert (out.exit_layer == N_LAYERS).all()
        assert rel_err(out.logits, full) <= 1e-5, last_exit
        assert torch.equal(out.pred, full.argmax(1))
        assert out.layer_speedup == 1.0
        if model.is_baseline and last_exit == "past":  # the full model runs every exit's head too
            assert out.flops_speedup == pytest.approx(1.0)
        else:  # every exit ran, none fired
            assert out.flops_speedup < 1.0


def test_full_model_flops_count_the_last_exits_pooling():
    model = pf_model("concat")
    h, n = H, N_LAYERS
    assert model.full_model_extra_flops() == 2 * n * h * h  # the concat map over all n states
    assert pf_model("concat", last_exit="hf").full_model_extra_flops() == 0
    el, seq = torch.full((3,), n), torch.full((3,), 8)
    _, sp = model.speedups(el, seq, {})
    _, sp_hf = pf_model("concat", last_exit="hf").speedups(el, seq, {})
    assert sp < 1.0 and sp > sp_hf  # the full model runs the pooling too, the internal exits' extras stay


def test_save_and_load_roundtrip(tmp_path):
    for strategy, last_exit in (("lstm", "past"), ("voting", "past"), ("concat", "hf")):
        model = pf_model(strategy, exit_layers=[1, 3], last_exit=last_exit)
        perturbed(model.heads, seed=7, scale=0.1)
        path = str(tmp_path / strategy)
        model.save_pretrained(path)
        back = PastFutureModel.from_pretrained(path)
        assert back.strategy == strategy and back.exit_layers == [1, 3, N_LAYERS] and back.last_exit == last_exit
        ids, mask, _ = ragged_batch(6, 9)
        a = model.early_exit(ids, mask, threshold=0.9)
        b = back.early_exit(ids, mask, threshold=0.9)
        assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.logits, b.logits)
        for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k


def test_bad_arguments():
    hf = tiny_classifier("bert")
    with pytest.raises(ValueError, match="unknown strategy"):
        convert(hf, strategy="median")
    with pytest.raises(ValueError, match="last_exit"):
        convert(hf, strategy="max", last_exit="own")
    with pytest.raises(ValueError, match="at least one exit before the last"):
        convert(hf, strategy="max", exit_layers=[N_LAYERS])
    model = convert(hf, strategy="max")
    with pytest.raises(ValueError, match="criterion"):
        model.early_exit(torch.ones(1, 4, dtype=torch.long), criterion="patience", threshold=2)
    with pytest.raises(ValueError, match="threshold"):
        PastFutureRule(model, threshold=float("nan"))
    with pytest.raises(ValueError, match="criterion"):
        model.simulate_exits(torch.randn(N_LAYERS, 2, 3), "patience", 2)
    reg = tiny_classifier("bert")
    reg.config.num_labels = 1
    reg.classifier = torch.nn.Linear(H, 1)
    with pytest.raises(ValueError, match="num_labels >= 2"):
        convert(reg, strategy="avg")


def test_head_parameters_hold_every_module_past_future_adds():
    """--head-lr trains what the method adds: the exit heads, the final head, pooling, imitation, gate."""
    model = pf_model("concat")
    head = {id(p) for p in model.head_parameters()}
    for m in model.method_modules() + [model.heads]:
        assert all(id(p) in head for p in m.parameters()), type(m).__name__
    assert not any(id(p) in head for p in model.hf.bert.encoder.parameters())


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
@pytest.mark.parametrize("strategy", METHODS)
def test_simulate_exits_replays_the_engine(strategy, criterion):
    """Calibration's replay of the rule on the forward's exit_logits gives the engine's exit
    layers and predictions, for every strategy (voting and ensemble included)."""
    model = pf_model(strategy, seed=7)
    ids, mask, _ = ragged_batch(24, 10, seed=8)
    with torch.no_grad():
        z = model(ids, mask).exit_logits
    p = z[:-1].float().softmax(-1)
    scores = entropy(z[:-1]) if criterion == "entropy" else p.amax(-1)
    spread = 0
    for q in (0.25, 0.5, 0.75):
        t = threshold_between(scores, quantile=q)
        layer, logits = model.simulate_exits(z, criterion, t)
        out = model.early_exit(ids, mask, criterion=criterion, threshold=t, backend="torch")
        assert torch.equal(out.exit_layer, layer), (q, out.exit_layer.tolist(), layer.tolist())
        assert torch.allclose(out.logits, logits, atol=1e-5), q
        spread = max(spread, len(set(layer.tolist())))
    assert spread > 1


@pytest.mark.parametrize("strategy", METHODS)
def test_calibrated_threshold_gives_the_engine_its_exits_and_accuracy(strategy):
    """A threshold calibrate() picks (a midpoint between two scores) gives the engine exactly
    the exits and accuracy calibration measured, and the full-model accuracy is the full model's."""
    model = pf_model(strategy, seed=7)
    ids, mask, _ = ragged_batch(40, 10, seed=9)
    with torch.no_grad():  # labels the full model gets right: early exits then cost accuracy
        labels = model.full_model()(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    cal = calibrate(model, ids, labels, mask, target_speedup=1.4, batch_size=16, progress=False)
    assert 0.0 < cal.threshold < math.inf
    with torch.no_grad():
        layer, logits = model.simulate_exits(model(ids, mask).exit_logits, "entropy", cal.threshold)
    out = model.early_exit(ids, mask, threshold=cal.threshold)
    assert torch.equal(out.exit_layer, layer)
    assert len(set(layer.tolist())) > 1
    assert model.layer_speedup(out.exit_layer) == pytest.approx(cal.layer_speedup) and cal.layer_speedup >= 1.4
    assert float((out.pred == labels).float().mean()) == pytest.approx(cal.accuracy)
    assert cal.full_accuracy == 1.0


# --------------------------------------------------------------------------- training


def trainer_for(model, tmp_path, steps, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=steps, learning_rate=3e-3,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=ParityTask(320, seed=1),
                                callbacks=list(callbacks))


def two_class(strategy: str, seed: int = 5) -> PastFutureModel:
    hf = tiny_classifier("bert", seed=seed)
    hf.config.num_labels = 2
    hf.classifier = torch.nn.Linear(H, 2)
    return convert(hf, strategy=strategy, init="random")


def parity_dev(n: int = 200):
    dev = ParityTask(n, seed=2)
    return dev.ids, torch.ones_like(dev.ids), dev.labels


@pytest.mark.parametrize("strategy", ["concat", "lstm", "ensemble"])
def test_trainer_loss_decreases(strategy, tmp_path):
    model = two_class(strategy)
    trainer = trainer_for(model, tmp_path, steps=30)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses
    ids, mask, labels = parity_dev()
    model.eval()
    with torch.no_grad():
        full = model.full_model()(input_ids=ids, attention_mask=mask).logits
    assert float((full.argmax(-1) == labels).float().mean()) > 0.8  # chance is 0.5


def test_trained_model_exits_spread_at_a_calibrated_threshold(tmp_path):
    """Past-Future (concat, the paper's choice) learns the task, and at a threshold calibrated on
    dev for a 1.5x layer speed-up its exits spread over layers with accuracy well above chance;
    the engine then gives exactly the calibrated exits and accuracy."""
    model = two_class("concat")
    trainer_for(model, tmp_path, steps=30).train()
    model.eval()
    ids, mask, labels = parity_dev()
    cal = calibrate(model, ids, labels, mask, target_speedup=1.5, progress=False)
    assert cal.full_accuracy > 0.8 and cal.layer_speedup >= 1.5
    out = model.early_exit(ids, mask, threshold=cal.threshold)
    hist = torch.bincount(out.exit_layer, minlength=N_LAYERS + 1)[1:]
    assert int((hist > 0).sum()) >= 2, hist.tolist()
    assert float((out.pred == labels).float().mean()) == pytest.approx(cal.accuracy)
    assert cal.accuracy > 0.75, cal.accuracy


def test_freeze_probabilities_fall_from_one_over_the_lowest_L_layers():
    """section 3.4 / 4.1: only the lowest L (<= 3 in the paper) layers are frozen, layer 1 with
    p = 1, falling linearly: p_l = (L + 1 - l) / L, 0 above L."""
    f64 = dict(dtype=torch.float64)
    assert torch.allclose(freeze_probabilities(12, 3), torch.tensor([1.0, 2 / 3, 1 / 3] + [0.0] * 9, **f64))
    assert torch.equal(freeze_probabilities(4, 1), torch.tensor([1.0, 0, 0, 0], **f64))
    assert torch.equal(freeze_probabilities(4, 2), torch.tensor([1.0, 0.5, 0, 0], **f64))
    assert torch.equal(freeze_probabilities(4, 0), torch.zeros(4, **f64))
    cb = LayerFreezingCallback(3, seed=3)
    draws = torch.stack([cb.draw(5) for _ in range(4000)]).double().mean(0)
    assert torch.allclose(draws, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0, 0.0], **f64), atol=0.03), draws
    for bad in ((0, 0), (4, 5), (4, -1), (4, True)):
        with pytest.raises(ValueError):
            freeze_probabilities(*bad)
    with pytest.raises(ValueError, match="freeze_layers"):
        LayerFreezingCallback(-1)


def test_registry_trains_without_freezing_by_default():
    """The authors fine-tune with no frozen layers unless L is set (their default 0, grid {0,1,2,3})."""
    spec = get_method("past-future")
    options = parse_options(spec, [])
    assert options["freeze_layers"] == 0 and options["last_exit"] == "past"
    assert parse_options(spec, ["freeze_layers=2"])["freeze_layers"] == 2
    assert "layer_freezing" not in spec.options


class _StepWatcher(transformers.TrainerCallback):
    """Snapshots the encoder layers after the freezing draw and checks them after the step."""

    def __init__(self, freezer, model):
        self.freezer, self.model, self.seen = freezer, model, []

    def _snap(self):
        return [[p.detach().clone() for p in l.parameters()] for l in self.model.hf.bert.encoder.layer]

    def on_step_begin(self, args, state, control, **kw):
        self.before = self._snap()

    def on_step_end(self, args, state, control, **kw):
        frozen = self.freezer.frozen.tolist()
        for layer, (old, new) in enumerate(zip(self.before, self._snap())):
            changed = any(not torch.equal(a, b) for a, b in zip(old, new))
            assert changed != frozen[layer], f"layer {layer + 1}: frozen={frozen[layer]} changed={changed}"
        self.seen.append(frozen)


def test_frozen_layers_get_no_update(tmp_path):
    model = two_class("avg")
    freezer = LayerFreezingCallback(2, seed=1)
    watcher = _StepWatcher(freezer, model)
    trainer = trainer_for(model, tmp_path, steps=6, callbacks=[freezer, watcher])
    first_layer = [p.detach().clone() for p in model.hf.bert.encoder.layer[0].parameters()]
    trainer.train()
    assert len(watcher.seen) == 6
    assert all(f[0] and not any(f[2:]) for f in watcher.seen)  # L = 2: p = 1, 1/2, then 0
    assert len({tuple(f) for f in watcher.seen}) > 1  # layer 2 is drawn
    assert all(torch.equal(a, b) for a, b in zip(first_layer, model.hf.bert.encoder.layer[0].parameters()))
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    with pytest.raises(ValueError, match="ALBERT"):
        LayerFreezingCallback(1, model=convert(tiny_classifier("albert"), strategy="max")).on_step_begin(None, None,
                                                                                                         None)
