"""ConsistentEE (consistentee.txt) on tiny BERT configs: rewards, memorized layer, policy
gradient, Trainer phases, the iterative loop, batched inference and persistence."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import eekernels  # noqa: E402
from eekernels import metrics  # noqa: E402
from eekernels.methods import consistentee as cee  # noqa: E402
from eekernels.methods.consistentee import ConsistentEEModel  # noqa: E402
from eekernels.models import EarlyExitModel, convert  # noqa: E402
from eekernels.nn import PolicyNet  # noqa: E402
from eekernels.ops import exit_head, exit_head_reference  # noqa: E402
from eekernels.training import consistentee as ct  # noqa: E402

from ..helpers import kernel_backends, rel_err, threshold_between  # noqa: E402
from ..tiny import ParityTask  # noqa: E402
from ..trainer_stops import FirstSteps, StopAtStep  # noqa: E402

N_LAYERS = 3


def tiny_bert(seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                  intermediate_size=48, vocab_size=100, max_position_embeddings=32,
                                  num_labels=num_labels, initializer_range=0.3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def trainer_args(tmp_path, steps: int, lr: float = 3e-3, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=steps, learning_rate=lr,
        logging_steps=5, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **{"save_strategy": "no", **kw})


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def ragged_batch(b: int, s: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, s), generator=g)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, lengths


def policy_backends():
    """The reference plus the kernel backends here whose exit_head takes the policy network.

    The kernels gain criterion "policy" one by one (branch policyhead); a backend whose
    kernel does not take the policy arguments yet is left out rather than failing here."""
    names = ["torch"]
    x, w, b = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3)
    pol = dict(policy_weight=torch.randn(5, 4), policy_bias=torch.randn(5), policy_out_weight=torch.randn(5),
               policy_out_bias=torch.randn(1))
    for name in kernel_backends("cpu"):
        try:
            exit_head(x, w, b, criterion="policy", backend=name, **pol)
        except TypeError as e:
            if "policy" not in str(e):
                raise
            continue
        names.append(name)
    return names


def spread_policies(model: ConsistentEEModel, seed: int = 0):
    """Random policy weights (zero biases) so that pi(Exit) varies from row to row."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pn in model.policies.values():
            pn.fc1.weight.copy_(torch.randn(pn.fc1.weight.shape, generator=g) * 0.5)
            pn.fc2.weight.copy_(torch.randn(pn.fc2.weight.shape, generator=g) * 0.5)
            pn.fc1.bias.zero_()
            pn.fc2.bias.zero_()


def median_policy_score(model: ConsistentEEModel, ids, mask=None) -> float:
    """A threshold near the median of pi(Exit) over the internal exits (it sends about half
    the rows on at each), strictly between two distinct policy scores so that no row's own
    score sits on it."""
    with torch.no_grad():
        states = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        scores = [model.policy(l)(torch.tanh(model.head(l).pooler(states[l][:, 0])))
                  for l in model.exit_layers[:-1]]
    return threshold_between(torch.cat(scores))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def init_trained(tmp_path_factory):
    """A model after step 1 (weighted CE), shared read-only: tests deep-copy it."""
    model = ConsistentEEModel.from_hf(tiny_bert(seed=5), init="random", reward="vanilla")
    model.set_phase("init")
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path_factory.mktemp("init"), 100),
                                   train_dataset=ParityTask(512, seed=1))
    trainer.train()
    return model, logged_losses(trainer)


# --------------------------------------------------------------------------- pure pieces


def test_rewards_hand_computed():
    ce = torch.tensor([0.5, 1.2, 0.3])
    t = torch.tensor([2, 4, 1])
    # eq. 3: -CE - alpha * t
    r = ct.exit_reward(ce, t, num_layers=4, alpha=0.1)
    assert torch.allclose(r, torch.tensor([-0.7, -1.6, -0.4]))
    # eq. 4: -CE - alpha * (1 - M/L) * t; M=1: 0.1*0.75*2 = 0.15; M=4 (hard): no layer cost; M=2: 0.05
    r = ct.exit_reward(ce, t, num_layers=4, alpha=0.1, memorized_layer=torch.tensor([1, 4, 2]))
    assert torch.allclose(r, torch.tensor([-0.65, -1.2, -0.35]))
    # alpha = 0: pure accuracy reward
    assert torch.allclose(ct.exit_reward(ce, t, 4, 0.0), -ce)
    with pytest.raises(ValueError, match="alpha"):
        ct.exit_reward(ce, t, 4, -0.1)
    with pytest.raises(ValueError, match="memorized"):
        ct.exit_reward(ce, t, 4, 0.1, memorized_layer=torch.tensor([0, 1, 5]))


def test_memorized_layer_hand_made_history():
    # predictions of exits at layers 1..4 (rows) for 5 samples (columns)
    pred = torch.tensor([[1, 0, 1, 1, 0],
                         [1, 1, 0, 0, 1],
                         [1, 1, 1, 0, 1],
                         [1, 1, 1, 0, 0]])
    labels = torch.tensor([1, 1, 1, 1, 0])
    # sample 0 right everywhere -> 1; sample 1 right from 2 -> 2; sample 2 forgets at 2, right from 3 -> 3;
    # sample 3 wrong at the last exit -> L; sample 4 right at 1 and 4 only -> 4
    assert metrics.memorized_layer(pred, labels, [1, 2, 3, 4], 4).tolist() == [1, 2, 3, 4, 4]
    # exits at a subset of layers: M is an exit layer
    # layers 2 and 4 only: sample 2 is wrong at 2, right at 4 -> 4; sample 3 is wrong at 4 -> 4
    assert metrics.memorized_layer(pred[[1, 3]], labels, [2, 4], 4).tolist() == [2, 2, 4, 4, 4]
    with pytest.raises(ValueError, match="end at num_layers"):
        metrics.memorized_layer(pred, labels, [1, 2, 3, 5], 4)
    with pytest.raises(ValueError, match=r"\[E, B\]"):
        metrics.memorized_layer(pred[:2], labels, [1, 2, 3, 4], 4)


def test_trajectories_actions_and_log_prob():
    # K=2 trajectories, S=2 internal exits, B=3 samples
    actions = torch.tensor([[[True, False, False], [False, True, False]],
                            [[False, False, False], [True, True, False]]])
    idx = ct.first_exit(actions)
    assert idx.tolist() == [[0, 1, 2], [1, 1, 2]]  # 2 = the last layer (forced exit)
    z = torch.tensor([[0.3, -1.0, 2.0], [0.5, 0.1, -0.4]], requires_grad=True)
    lp = ct.trajectory_log_prob(z, actions, idx)
    ls = torch.nn.functional.logsigmoid
    expect = torch.stack([
        torch.stack([ls(z[0, 0]), ls(-z[0, 1]) + ls(z[1, 1]), ls(-z[0, 2]) + ls(-z[1, 2])]),
        torch.stack([ls(-z[0, 0]) + ls(z[1, 0]), ls(-z[0, 1]) + ls(z[1, 1]), ls(-z[0, 2]) + ls(-z[1, 2])]),
    ])
    assert torch.allclose(lp, expect)
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.3]])
    a = ct.sample_exit_actions(p, 4000, epsilon=0.0, generator=g)
    assert a.shape == (4000, 1, 3)
    assert not a[..., 0].any() and a[..., 1].all()
    assert abs(a[..., 2].float().mean().item() - 0.3) < 0.05
    a = ct.sample_exit_actions(p, 4000, epsilon=0.5, generator=g)  # half the actions are coin flips
    assert abs(a[..., 0].float().mean().item() - 0.25) < 0.05
    assert abs(a[..., 1].float().mean().item() - 0.75) < 0.05
    with pytest.raises(ValueError, match="epsilon"):
        ct.sample_exit_actions(p, 2, epsilon=1.5)


def test_reinforce_sign_and_baseline():
    # one internal exit, one sample, K=2: trajectory 0 exits (reward -0.2), trajectory 1 continues (-1.0)
    z = torch.zeros(1, 1, requires_grad=True)
    actions = torch.tensor([[[True]], [[False]]])
    idx = ct.first_exit(actions)
    reward = torch.tensor([[-0.2], [-1.0]])
    loss = ct.reinforce_loss(ct.trajectory_log_prob(z, actions, idx), reward)
    loss.backward()
    # advantage +-0.4; d/dz of -(0.4*logsig(z) - 0.4*logsig(-z))/2 at z=0 = -(0.4*0.5 + 0.4*0.5)/2 = -0.2
    assert z.grad.item() == pytest.approx(-0.2)  # descending the loss raises pi(Exit)
    # the baseline: a constant added to every reward changes nothing
    z2 = torch.zeros(1, 1, requires_grad=True)
    ct.reinforce_loss(ct.trajectory_log_prob(z2, actions, idx), reward + 5.0).backward()
    assert z2.grad.item() == pytest.approx(-0.2)
    # equal rewards: zero advantage, no gradient
    z3 = torch.zeros(1, 1, requires_grad=True)
    l3 = ct.reinforce_loss(ct.trajectory_log_prob(z3, actions, idx), torch.tensor([[-0.5], [-0.5]]))
    l3.backward()
    assert l3.item() == 0.0 and z3.grad.item() == 0.0
    with pytest.raises(ValueError, match=r"\[K, B\]"):
        ct.reinforce_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def test_policy_net_is_what_the_fused_head_computes():
    model = ConsistentEEModel.from_hf(tiny_bert(), reward="vanilla")
    spread_policies(model)
    cls = torch.randn(7, 32)
    head, pn = model.head(1), model.policy(1)
    out = exit_head_reference(cls, head.classifier.weight, head.classifier.bias, pooler_weight=head.pooler.weight,
                              pooler_bias=head.pooler.bias, criterion="policy", threshold=0.5,
                              policy_weight=pn.fc1.weight, policy_bias=pn.fc1.bias,
                              policy_out_weight=pn.fc2.weight[0], policy_out_bias=pn.fc2.bias)
    p = pn(torch.tanh(head.pooler(cls)))
    assert torch.allclose(out.score, p, atol=1e-6)
    assert torch.equal(out.exit, p > 0.5)
    assert 0 < p.min() < 0.5 < p.max() < 1
    with pytest.raises(ValueError, match="states"):
        pn(torch.randn(3, 31))


def test_constructor_and_phase_errors():
    with pytest.raises(ValueError, match="num_labels"):
        ConsistentEEModel.from_hf(tiny_bert(num_labels=1))
    with pytest.raises(ValueError, match="reward"):
        ConsistentEEModel.from_hf(tiny_bert(), reward="fast")
    with pytest.raises(ValueError, match="num_samples"):
        ConsistentEEModel.from_hf(tiny_bert(), num_samples=1)
    with pytest.raises(ValueError, match="internal exits"):
        ConsistentEEModel.from_hf(tiny_bert(), exit_layers=[N_LAYERS]).set_phase("policy")
    model = ConsistentEEModel.from_hf(tiny_bert(), exit_layers=[2])
    assert list(model.policies) == ["2"] and model.exit_layers == [2, N_LAYERS]
    with pytest.raises(ValueError, match="phase"):
        model.set_phase("joint")
    model.set_phase("policy")
    assert not any(p.requires_grad for p in list(model.hf.parameters()) + list(model.heads.parameters()))
    assert all(p.requires_grad for p in model.policies.parameters())
    model.set_phase("classifier")
    assert all(p.requires_grad for p in list(model.hf.parameters()) + list(model.heads.parameters()))
    assert not any(p.requires_grad for p in model.policies.parameters())
    data = ParityTask(4, seed=0)
    with pytest.raises(ValueError, match="memorized_layer"):
        model.reward = "hardness"
        model.set_phase("policy")
        model(data.ids, labels=data.labels)
    with pytest.raises(ValueError, match="threshold"):
        model.early_exit(data.ids, threshold=1.5)


# --------------------------------------------------------------------------- Trainer phases


def test_init_phase_trainer_loss_decreases(init_trained):
    _, losses = init_trained
    assert len(losses) >= 4
    assert losses[-1] < 0.3 * losses[0], losses


def test_policy_phase_trainer_learns_to_exit_early(init_trained, tmp_path):
    model = copy.deepcopy(init_trained[0])
    model.alpha, model.epsilon = 0.5, 0.05
    dev = ParityTask(128, seed=2)
    before = model.early_exit(dev.ids).exit_layer.float().mean()
    model.set_phase("policy")
    frozen = {k: v.clone() for k, v in model.heads.state_dict().items()}
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, 20, lr=5e-2),
                                   train_dataset=ParityTask(512, seed=1))
    trainer.train()
    losses = logged_losses(trainer)  # mean negative reward of the sampled trajectories
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.early_exit(dev.ids)
    assert after.exit_layer.float().mean() < before - 0.5  # layer 1 already classifies: exit there
    assert float((after.pred == dev.labels).float().mean()) > 0.85
    assert all(torch.equal(v, model.heads.state_dict()[k]) for k, v in frozen.items())  # classifiers frozen


def test_policy_phase_hardness_reward_with_memorized_layers(init_trained, tmp_path):
    model = copy.deepcopy(init_trained[0])
    model.reward, model.alpha = "hardness", 0.5
    train = ParityTask(256, seed=1)
    m = ct.compute_memorized_layers(model, train, batch_size=64, progress=False)
    assert m.shape == (256,) and m.min() >= 1 and m.max() <= N_LAYERS
    assert (m == 1).float().mean() > 0.5  # the task is easy: mostly memorized at layer 1
    model.set_phase("policy")
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, 20, lr=5e-2),
                                   train_dataset=ct.WithMemorizedLayer(train, m))
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    with pytest.raises(ValueError, match="memorized layers"):
        ct.WithMemorizedLayer(train, m[:10])


class RaggedParity(torch.utils.data.Dataset):
    """ParityTask rows cut to random lengths 4..16, as ``EncodedDataset`` gives them; ``lengths``
    only when ``known`` (so the inference passes may reorder the rows)."""

    def __init__(self, n: int, known: bool):
        base = ParityTask(n, seed=3, s=16)
        g = torch.Generator().manual_seed(4)
        self.rows = [{"input_ids": base.ids[i, :k], "attention_mask": torch.ones(k, dtype=torch.long),
                      "labels": base.labels[i]} for i, k in enumerate(torch.randint(4, 17, (n,), generator=g).tolist())]
        if known:
            self.lengths = [len(r["input_ids"]) for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_inference_passes_run_rows_shortest_first_and_answer_in_the_datasets_order(init_trained):
    from eekernels.data import collate_trimmed

    model = copy.deepcopy(init_trained[0])
    known, unknown = RaggedParity(200, known=True), RaggedParity(200, known=False)
    loader, order = ct._loader(known, 16, collate_trimmed)
    lengths = torch.as_tensor(known.lengths)
    assert torch.equal(lengths[order], lengths.sort(stable=True).values) and not torch.equal(order, torch.arange(200))
    slots = sum(b["input_ids"].numel() for b in loader)
    in_order = sum(b["input_ids"].numel() for b in ct._loader(unknown, 16, collate_trimmed)[0])
    assert slots < 1.1 * int(lengths.sum()) < in_order  # here: 1,968 and 3,120 slots for 1,880 tokens
    subset = torch.utils.data.Subset(known, [5, 1, 9])  # the probe of the exit distribution is one
    assert torch.equal(ct._loader(subset, 2, collate_trimmed)[1], torch.argsort(lengths[[5, 1, 9]], stable=True))
    one_by_one = ct.compute_memorized_layers(model, unknown, batch_size=1, data_collator=collate_trimmed,
                                             progress=False)
    sorted_pass = ct.compute_memorized_layers(model, known, batch_size=64, data_collator=collate_trimmed,
                                              progress=False)
    assert torch.equal(sorted_pass, one_by_one)
    assert len(set(one_by_one.tolist())) > 1  # the rows differ: the order is actually checked
    wrapped = ct.WithMemorizedLayer(known, sorted_pass)
    a = ct.evaluate_early_exit(model, wrapped, 64, collate_trimmed)
    b = ct.evaluate_early_exit(model, unknown, 1, collate_trimmed)
    assert a["exit_histogram"] == b["exit_histogram"] and a["accuracy"] == pytest.approx(b["accuracy"])


def test_classifier_phase_trainer_loss_decreases(tmp_path):
    model = ConsistentEEModel.from_hf(tiny_bert(seed=6), init="random")
    with torch.no_grad():  # a policy that exits about half the time at each internal exit
        for pn in model.policies.values():
            pn.fc2.weight.zero_()
            pn.fc2.bias.zero_()
    model.set_phase("classifier")
    policy_before = {k: v.clone() for k, v in model.policies.state_dict().items()}
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, 100),
                                   train_dataset=ParityTask(512, seed=1))
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(v, model.policies.state_dict()[k]) for k, v in policy_before.items())
    out = model(ParityTask(64, seed=3).ids)
    assert out.exit_layer.min() >= 1 and len(set(out.exit_layer.tolist())) > 1  # exits sampled over layers


def _recording_optimizer(seen, lr=1e-5, head_lr=5e-2):
    """finetune.make_optimizer (backbone lr, head lr for the new parameters), recording each
    optimizer's {param id: lr}."""
    from eekernels.training.finetune import make_optimizer

    def make(m):
        opt = make_optimizer(m, lr, head_lr)
        seen.append((m.phase, {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}))
        return opt
    return make


def test_iterative_loop_end_to_end(tmp_path):
    model = ConsistentEEModel.from_hf(tiny_bert(seed=5), init="random", reward="hardness", alpha=0.3)
    args = trainer_args(tmp_path, 10)
    seen = []
    res = ct.train_consistentee(model, ParityTask(256, seed=1), args, max_rounds=2, tolerance=0.0, init_steps=100,
                                policy_steps=10, classifier_steps=5, eval_dataset=ParityTask(64, seed=2),
                                make_optimizer=_recording_optimizer(seen, lr=3e-3), progress=True)
    assert [(r.round, r.phase) for r in res.phases] == [
        (0, "init"), (1, "policy"), (1, "classifier"), (2, "policy"), (2, "classifier")]
    assert [r.global_step for r in res.phases] == [100, 10, 5, 10, 5]
    assert all(r.losses and all(math.isfinite(x) for x in r.losses) for r in res.phases)
    assert res.memorized_layers.shape == (256,)
    assert res.rounds == 2 and len(res.changes) == 1 and not res.converged  # tolerance 0 never settles
    assert all(abs(sum(d) - 1.0) < 1e-9 for d in res.exit_distributions)
    # the policy step's optimizer holds the policy nets alone, at the head learning rate
    policy_ids = {id(p) for p in model.policies.parameters()}
    phases = [ph for ph, _ in seen]
    assert phases == ["init", "policy", "classifier", "policy", "classifier"]
    for ph, lrs in seen:
        if ph == "policy":
            assert set(lrs) == policy_ids and set(lrs.values()) == {5e-2}
    assert len(res.evals) == 2
    for ev in res.evals:
        assert ev["accuracy"] > 0.8 and sum(ev["exit_histogram"].values()) == 64
    # the cost term pays off: the task is learnable at layer 1 and alpha charges every layer,
    # so the learned policy (threshold 0.5) sends rows out early (observed: all at layer 1,
    # 3x) and accuracy holds
    last = res.evals[-1]
    assert last["layer_speedup"] > 1.5 and last["accuracy"] > 0.8, last
    # at a threshold between the layer-1 exit probabilities rows spread over the exits
    # and accuracy still holds
    dev = ParityTask(64, seed=2)
    model.eval()
    with torch.no_grad():
        cls1 = model.layer_states(dev.ids)[0][:, 0]
        p1 = torch.sigmoid(model.policy(1).logit(model._pooled(1, cls1))).reshape(-1)
    out = model.early_exit(dev.ids, threshold=threshold_between(p1))
    assert len(set(out.exit_layer.tolist())) >= 2, out.exit_layer.tolist()
    assert float((out.pred == dev.labels).float().mean()) > 0.8
    assert model.phase == "classifier"
    with pytest.raises(ValueError, match="max_rounds"):
        ct.train_consistentee(model, ParityTask(8, seed=1), args, max_rounds=0)
    with pytest.raises(ValueError, match="tolerance"):
        ct.train_consistentee(model, ParityTask(8, seed=1), args, tolerance=-1.0)


def test_iterative_loop_stops_once_the_policy_settles(tmp_path):
    """The stopping rule: rounds go on while the exit distribution moves by at least the
    tolerance, at most max_rounds; a tolerance above any possible change (1) stops after
    the second round, the first that can be compared."""
    model = ConsistentEEModel.from_hf(tiny_bert(seed=7), init="random", reward="vanilla", alpha=0.3)
    args = trainer_args(tmp_path, 3)
    res = ct.train_consistentee(model, ParityTask(64, seed=1), args, max_rounds=4, tolerance=1.01, progress=False)
    assert res.rounds == 2 and res.converged and res.changes[0] <= 1.0
    res = ct.train_consistentee(model, ParityTask(64, seed=1), args, max_rounds=3, tolerance=0.0, init=False,
                                progress=False)
    assert res.rounds == 3 and not res.converged and len(res.changes) == 2


def test_round_epochs_set_the_rounds_steps_and_not_the_initialisation(tmp_path):
    """round_epochs replaces the epochs of each round's policy and classifier step; the
    initialisation keeps the arguments' own. 64 rows at batch 32: 2 steps an epoch."""
    model = ConsistentEEModel.from_hf(tiny_bert(seed=7), init="random", reward="vanilla", alpha=0.3)
    args = trainer_args(tmp_path, -1, num_train_epochs=3)
    res = ct.train_consistentee(model, ParityTask(64, seed=1), args, max_rounds=2, tolerance=0.0, round_epochs=1.0,
                                progress=False)
    assert [(r.round, r.phase, r.global_step) for r in res.phases] == [
        (0, "init", 6), (1, "policy", 2), (1, "classifier", 2), (2, "policy", 2), (2, "classifier", 2)]
    with pytest.raises(ValueError, match="round_epochs"):
        ct.train_consistentee(model, ParityTask(8, seed=1), args, round_epochs=0.0)


@pytest.mark.parametrize("stop, first_steps", [((4, 0), [1, 1]), ((3, 6), [5, 1, 1])],
                         ids=["between-steps", "inside-a-step"])
def test_iterative_loop_resumes_where_it_was_stopped(tmp_path, stop, first_steps):
    """A schedule stopped part-way and run again with resume=True skips the finished steps,
    continues the interrupted one from its last checkpoint and ends with the uninterrupted
    run's weights and record."""
    def fresh():
        return ConsistentEEModel.from_hf(tiny_bert(seed=5), init="random", reward="hardness", alpha=0.3)

    def run(model, out, callbacks=(), resume=False):
        args = trainer_args(out, 10, save_strategy="steps", save_steps=4)
        return ct.train_consistentee(model, ParityTask(128, seed=1), args, max_rounds=2, tolerance=0.0,
                                     init_steps=12, policy_steps=10, classifier_steps=10, callbacks=callbacks,
                                     progress=False, resume=resume)

    whole = fresh()
    expected = run(whole, tmp_path / "whole")
    model, out = fresh(), tmp_path / "stopped"
    assert ct.resume_point(str(out)) is None
    with pytest.raises(KeyboardInterrupt):
        run(model, out, callbacks=[StopAtStep(*stop)])
    assert ct.resume_point(str(out)) is not None
    model = fresh()  # a new process: only what is on disk survives
    seen = FirstSteps()
    got = run(model, out, callbacks=[seen], resume=True)
    assert seen.first == first_steps  # the finished steps skipped, the stopped one from its checkpoint
    assert [(r.round, r.phase, r.global_step) for r in got.phases] == \
        [(r.round, r.phase, r.global_step) for r in expected.phases]
    assert got.exit_distributions == expected.exit_distributions and got.changes == expected.changes
    assert torch.equal(got.memorized_layers, expected.memorized_layers)
    want = whole.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    done = run(model, out, resume=True)  # everything finished: nothing runs again
    assert [(r.round, r.phase) for r in done.phases] == [(r.round, r.phase) for r in expected.phases]


# --------------------------------------------------------------------------- inference


def test_batched_equals_alone():
    model = ConsistentEEModel.from_hf(tiny_bert(seed=3))
    spread_policies(model, seed=1)
    ids, mask, lengths = ragged_batch(12, 11, seed=4)
    thr = median_policy_score(model, ids, mask)
    backends = policy_backends()
    if "cpu" in kernel_backends("cpu"):
        assert "cpu" in backends  # the C++ kernel has the policy criterion: it must run here
    for backend in backends:
        out = model.early_exit(ids, mask, threshold=thr, backend=backend)
        assert len(set(out.exit_layer.tolist())) > 1, "policies should spread exits over layers"
        for i in range(ids.shape[0]):
            n = int(lengths[i])
            alone = model.early_exit(ids[i:i + 1, :n], None, threshold=thr, backend=backend)
            assert int(alone.exit_layer) == int(out.exit_layer[i]), (backend, i)
            assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-5, atol=1e-5), (backend, i)


def test_exits_disabled_match_hf():
    hf = tiny_bert(seed=4)
    ids, mask, _ = ragged_batch(9, 13, seed=2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    model = ConsistentEEModel.from_hf(hf)
    with torch.no_grad():  # pi(Exit) rounds to exactly 1.0 in float32: still not > 1.0
        for pn in model.policies.values():
            pn.fc2.bias.fill_(40.0)
    for backend in policy_backends():
        assert (model.early_exit(ids, mask, backend=backend).exit_layer == 1).all()
        out = model.early_exit(ids, mask, threshold=1.0, backend=backend)
        assert (out.exit_layer == N_LAYERS).all()
        assert rel_err(out.logits, ref) <= 1e-5, backend
        assert torch.equal(out.pred, ref.argmax(-1))


def test_one_fused_exit_head_call_per_exit_layer(monkeypatch):
    model = ConsistentEEModel.from_hf(tiny_bert(seed=2))
    from eekernels.engine import rules

    calls = []
    real = rules.exit_head

    def counting(*a, **kw):
        calls.append(kw["criterion"])
        return real(*a, **kw)

    monkeypatch.setattr(rules, "exit_head", counting)
    policy_calls = []
    for pn in model.policies.values():
        pn.register_forward_hook(lambda *a: policy_calls.append(1))
    ids, mask, _ = ragged_batch(5, 9)
    model.early_exit(ids, mask, threshold=1.0)
    assert calls == ["policy"] * (N_LAYERS - 1) + ["entropy"]  # the last layer's head alone
    assert not policy_calls  # no separate policy pass


def test_exit_profile_and_classic_criteria():
    model = ConsistentEEModel.from_hf(tiny_bert(seed=2))
    ids, mask, _ = ragged_batch(4, 9)
    out = model.early_exit(ids, mask, exit_profile=torch.tensor([1, 2, 3, 3]), threshold=1.0)
    assert out.exit_layer.tolist() == [1, 2, 3, 3]
    out = model.early_exit(ids, mask, criterion="max_prob", threshold=0.0)
    assert (out.exit_layer == 1).all()


def test_save_load_roundtrip(tmp_path):
    model = ConsistentEEModel.from_hf(tiny_bert(seed=7), exit_layers=[1, 2], reward="vanilla", alpha=0.25,
                                      num_samples=4)
    spread_policies(model, seed=3)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path))
    back = ConsistentEEModel.from_pretrained(str(tmp_path))
    assert (back.reward, back.alpha, back.num_samples, back.exit_layers) == ("vanilla", 0.25, 4, [1, 2, N_LAYERS])
    ids, mask, _ = ragged_batch(6, 9)
    a, b = model.early_exit(ids, mask), back.early_exit(ids, mask)
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.logits, b.logits)
    for k, v in model.policies.state_dict().items():
        assert torch.equal(v, back.policies.state_dict()[k])
    assert isinstance(eekernels.load(str(tmp_path)), ConsistentEEModel)  # the saved method is recognised
    with pytest.raises(ValueError, match="holds a 'consistentee' model"):
        EarlyExitModel.from_pretrained(str(tmp_path))
    convert(tiny_bert()).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="holds a 'early-exit' model, not 'consistentee'"):
        ConsistentEEModel.from_pretrained(str(tmp_path / "plain"))
