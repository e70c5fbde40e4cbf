"""ConsistentEE training (consistentee.txt, "Methodology"): rewards, the policy gradient,
memorized layers and the iterative Trainer-based schedule.

Notation (consistentee.txt): a trajectory tau visits the exit layers in order; at each
internal exit the policy takes a_t in {Exit, Continue}; the last layer always exits. With
T the layer where tau exits, L the depth and M the sample's memorized layer:

- vanilla reward (eq. 3):          R = -H(y, P_T(x)) - alpha * T
- hardness-guided reward (eq. 4):  R = -H(y, P_T(x)) - alpha * (1 - M / L) * T
  (Continue actions earn 0, so R(tau) is the reward at the exit step.)
- policy objective (eq. 5), maximised by REINFORCE over K sampled trajectories per sample:
  grad J = E[(R(tau) - b) * grad sum_t log pi(a_t | s_t)], with b the mean reward of the
  sample's K trajectories (the per-sample baseline) and epsilon-greedy exploration.
- task objective (eq. 6): cross-entropy of the exit layer's classifier only.
- memorized layer (eq. 7): :func:`eekernels.metrics.memorized_layer`.

The iterative schedule (consistentee.txt "Model Training and Inference") is
:func:`train_consistentee`: (1) weighted-CE initialisation, then rounds of (2) memorized
layers, (3) policy step with classifiers and backbone frozen, (4) classifier/backbone step
with the policy frozen. Every step is an HF ``Trainer`` run on the same model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import metrics

__all__ = [
    "ConsistentEETrainingResult",
    "PROGRESS_FILE",
    "PhaseRecord",
    "WithMemorizedLayer",
    "compute_memorized_layers",
    "evaluate_early_exit",
    "exit_reward",
    "first_exit",
    "reinforce_loss",
    "resume_point",
    "sample_exit_actions",
    "train_consistentee",
    "trajectory_log_prob",
]

REWARDS = ("hardness", "vanilla")


# --------------------------------------------------------------------------- rewards


def exit_reward(ce: torch.Tensor, exit_layer: torch.Tensor, num_layers: int, alpha: float,
                memorized_layer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reward of a trajectory that exits at ``exit_layer`` (1-based).

    ``-ce - alpha * t`` (consistentee.txt eq. 3) without ``memorized_layer``;
    ``-ce - alpha * (1 - M / L) * t`` (eq. 4) with it. Broadcasts over any shape.

    Args:
        ce: cross-entropy H(y, P_t(x)) of the exit layer's classifier.
        exit_layer: t, the layer of the exit.
        num_layers: L.
        alpha: the accuracy/acceleration trade-off (>= 0).
        memorized_layer: M in [1, L] per sample (eq. 7), or None for the vanilla reward.
    """
    if alpha < 0:
        raise ValueError(f"exit_reward: alpha must be >= 0, got {alpha}")
    t = exit_layer.to(torch.float32)
    coef = torch.full_like(t, float(alpha))
    if memorized_layer is not None:
        m = memorized_layer.to(device=t.device, dtype=torch.float32)
        if bool(((m < 1) | (m > num_layers)).any()):
            raise ValueError(f"exit_reward: memorized layers must be in [1, {num_layers}]")
        coef = coef * (1.0 - m / num_layers)  # eq. 4: easy samples (small M) pay more per layer
    return -ce.to(torch.float32) - coef * t


# --------------------------------------------------------------------------- trajectories


def sample_exit_actions(exit_prob: torch.Tensor, num_samples: int, epsilon: float = 0.0,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample Exit (True) / Continue (False) at every internal exit for K trajectories.

    Each action is drawn from pi(Exit | s_t) = ``exit_prob``; with probability ``epsilon``
    it is replaced by a uniformly random action (epsilon-greedy exploration, eq. 5).

    Args:
        exit_prob: [S, B], pi(Exit) at the S internal exits of B samples.
        num_samples: K, trajectories per sample (repeated sampling).
        epsilon: exploration rate in [0, 1].

    Returns:
        bool [K, S, B].
    """
    if exit_prob.dim() != 2:
        raise ValueError(f"sample_exit_actions: exit_prob must be [S, B], got {tuple(exit_prob.shape)}")
    if num_samples < 1:
        raise ValueError(f"sample_exit_actions: num_samples must be >= 1, got {num_samples}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"sample_exit_actions: epsilon must be in [0, 1], got {epsilon}")
    shape = (num_samples,) + tuple(exit_prob.shape)

    def u():
        return torch.rand(shape, generator=generator, device=exit_prob.device)

    on_policy = u() < exit_prob.detach().float()[None]
    if epsilon == 0.0:
        return on_policy
    explore = u() < epsilon
    return torch.where(explore, u() < 0.5, on_policy)


def first_exit(actions: torch.Tensor) -> torch.Tensor:
    """Index of the exit where each trajectory stops: the first internal exit whose action
    is Exit, or S (the last layer, which always exits) when there is none.

    Args:
        actions: bool [..., S, B].

    Returns:
        int64 [..., B] in [0, S].
    """
    s = actions.shape[-2]
    steps = torch.arange(s, device=actions.device).view(*([1] * (actions.dim() - 2)), s, 1)
    idx = torch.where(actions, steps, torch.full_like(steps, s))
    if s == 0:
        return torch.zeros(actions.shape[:-2] + actions.shape[-1:], dtype=torch.int64, device=actions.device)
    return idx.min(dim=-2).values


def trajectory_log_prob(policy_logit: torch.Tensor, actions: torch.Tensor, exit_index: torch.Tensor) -> torch.Tensor:
    """sum_t log pi(a_t | s_t) over the steps a trajectory takes (eq. 5's product, in logs):
    the Continue actions before its exit and the Exit action itself; actions after the
    exit were never taken and the last layer's forced exit has no policy.

    Args:
        policy_logit: [S, B], the policy's pre-sigmoid exit logit (differentiable).
        actions: bool [K, S, B].
        exit_index: int64 [K, B] from :func:`first_exit`.

    Returns:
        float32 [K, B].
    """
    z = policy_logit.float()[None]
    logp = torch.where(actions, torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z))
    steps = torch.arange(actions.shape[-2], device=actions.device).view(1, -1, 1)
    taken = steps <= exit_index[:, None, :]
    return (logp * taken).sum(dim=1)


def reinforce_loss(log_prob: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate for eq. 5 with the per-sample mean reward as baseline.

    ``-mean((R - b) * log pi(tau))`` with ``b`` the mean of each sample's K rewards;
    minimising it follows the policy gradient of J(theta). With K = 1 the baseline equals
    the reward and the loss is zero: use K > 1.

    Args:
        log_prob: [K, B], differentiable log-probability of each trajectory.
        reward: [K, B], its reward (no gradient is taken through it).
    """
    if log_prob.shape != reward.shape or log_prob.dim() != 2:
        raise ValueError(f"reinforce_loss: log_prob and reward must both be [K, B], got "
                         f"{tuple(log_prob.shape)} and {tuple(reward.shape)}")
    r = reward.detach().float()
    advantage = r - r.mean(dim=0, keepdim=True)
    return -(advantage * log_prob).mean()


# --------------------------------------------------------------------------- memorized layers


class WithMemorizedLayer(torch.utils.data.Dataset):
    """A dataset whose items (dicts) gain ``"memorized_layer"``, for the hardness reward."""

    def __init__(self, dataset, memorized_layer: torch.Tensor):
        if len(dataset) != len(memorized_layer):
            raise ValueError(f"WithMemorizedLayer: {len(dataset)} samples but {len(memorized_layer)} memorized layers")
        self.dataset = dataset
        self.memorized_layer = torch.as_tensor(memorized_layer, dtype=torch.int64).cpu()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item["memorized_layer"] = self.memorized_layer[i]
        return item


def _row_lengths(dataset) -> Optional[List[int]]:
    """Each row's token count where ``dataset`` knows it (an ``EncodedDataset``'s ``lengths``,
    through ``Subset`` and :class:`WithMemorizedLayer`); None otherwise."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _row_lengths(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, WithMemorizedLayer):
        return _row_lengths(dataset.dataset)
    lengths = getattr(dataset, "lengths", None)
    return None if lengths is None else list(lengths)


def _loader(dataset, batch_size: int, data_collator):
    """(batches of ``dataset`` for inference, the row order they come in). Rows of known length
    come shortest first, so each batch, padded to its longest row, holds little padding (on
    SST-2's training phrases, batches in file order are about 3x their real tokens)."""
    if data_collator is None:
        from transformers import default_data_collator as data_collator
    lengths = _row_lengths(dataset)
    order = (torch.arange(len(dataset)) if lengths is None
             else torch.argsort(torch.as_tensor(lengths), stable=True))
    rows = dataset if lengths is None else torch.utils.data.Subset(dataset, order.tolist())
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=data_collator), order


def _model_inputs(batch: Dict[str, Any], device) -> Dict[str, Any]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if batch.get(k) is not None}


def compute_memorized_layers(model, dataset, batch_size: int = 64, data_collator=None,
                             progress: bool = True) -> torch.Tensor:
    """Memorized layer (consistentee.txt eq. 7) of every sample of ``dataset``, in order.

    Runs the model's full forward (all exits, eval mode, no grad) and applies
    :func:`eekernels.metrics.memorized_layer`. Items must be dicts with ``input_ids`` and
    ``labels`` (``data_collator`` batches them; default ``transformers.default_data_collator``).
    Rows of known length (an ``EncodedDataset``) run shortest first, to pad little.

    Returns:
        int64 [len(dataset)] on the CPU, in the dataset's order.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    loader, order = _loader(dataset, batch_size, data_collator)
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="memorized layers", disable=not progress):
                if "labels" not in batch:
                    raise ValueError("compute_memorized_layers: the dataset's items need 'labels'")
                z = model.full_forward(**_model_inputs(batch, device)).exit_logits
                out.append(metrics.memorized_layer(z.argmax(-1), batch["labels"].to(device),
                                                   model.exit_layers, model.num_layers).cpu())
    finally:
        model.train(was_training)
    memorized = torch.zeros(len(order), dtype=torch.int64)
    if out:
        memorized[order] = torch.cat(out)
    return memorized


def evaluate_early_exit(model, dataset, batch_size: int = 64, data_collator=None, threshold: float = 0.5,
                        backend: Optional[str] = None, progress: bool = False) -> Dict[str, Any]:
    """Batched early-exit inference over ``dataset``: accuracy, layer speed-up and the
    exit-layer histogram (``{layer: count}``)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    preds, labels, layers = [], [], []
    for batch in tqdm(_loader(dataset, batch_size, data_collator)[0], desc="early-exit eval", disable=not progress):
        inp = _model_inputs(batch, device)
        res = model.early_exit(inp["input_ids"], inp.get("attention_mask"), inp.get("token_type_ids"),
                               threshold=threshold, backend=backend)
        preds.append(res.pred.cpu())
        layers.append(res.exit_layer.cpu())
        if "labels" in batch:
            labels.append(batch["labels"].cpu())
    pred, layer = torch.cat(preds), torch.cat(layers)
    hist = {int(l): int((layer == l).sum()) for l in model.exit_layers}
    result = {"layer_speedup": metrics.layer_speedup(layer, model.num_layers), "exit_histogram": hist,
              "mean_exit_layer": float(layer.double().mean())}
    if labels:
        result["accuracy"] = float((pred == torch.cat(labels)).double().mean())
    return result


# --------------------------------------------------------------------------- iterative loop


@dataclass
class PhaseRecord:
    """One Trainer run of the schedule: round (0 = initialisation), phase and its logged losses."""

    round: int
    phase: str
    losses: List[float]
    train_loss: Optional[float]
    global_step: int


@dataclass
class ConsistentEETrainingResult:
    """What :func:`train_consistentee` did.

    Attributes:
        phases: every Trainer run in order.
        memorized_layers: the last memorized layers computed ([len(train_dataset)]).
        evals: per round (after its classifier step), :func:`evaluate_early_exit` on the
            eval dataset (empty without one).
        exit_distributions: per round, the share of the probe rows (the training set's
            first ``probe_size``) leaving at each exit under the policy at threshold 0.5.
        changes: per round from the second, the total-variation distance between its exit
            distribution and the previous round's (what the stopping rule reads).
        converged: whether training stopped because the distribution settled (False when
            it ran into ``max_rounds``).
    """

    phases: List[PhaseRecord] = field(default_factory=list)
    memorized_layers: Optional[torch.Tensor] = None
    evals: List[Dict[str, Any]] = field(default_factory=list)
    exit_distributions: List[List[float]] = field(default_factory=list)
    changes: List[float] = field(default_factory=list)
    converged: bool = False

    @property
    def rounds(self) -> int:
        """Rounds run (memorized layers, policy step, classifier step)."""
        return len(self.exit_distributions)


#: the schedule's record in ``args.output_dir`` (:class:`~eekernels.training.schedule.StepSchedule`)
PROGRESS_FILE = "consistentee-progress.pt"


def _step_name(rnd: int, phase: str) -> str:
    return f"round{rnd}-{phase}"


def resume_point(output_dir: str) -> Optional[str]:
    """What an interrupted :func:`train_consistentee` into ``output_dir`` left to go on from:
    its progress record, else a complete Trainer checkpoint of its first step (None: nothing)."""
    from .schedule import schedule_resume_point

    return schedule_resume_point(output_dir, PROGRESS_FILE)


def _result_from(state: Dict[str, Any]) -> "ConsistentEETrainingResult":
    """The result a schedule's record holds (an empty one for a fresh run)."""
    if not state:
        return ConsistentEETrainingResult()
    fields = dict(state)
    fields["phases"] = [PhaseRecord(**ph) for ph in fields["phases"]]
    return ConsistentEETrainingResult(**fields)


def _run_phase(model, phase, rnd, args, overrides, train_dataset, data_collator, callbacks, make_optimizer,
               schedule):
    from transformers import Trainer

    name = _step_name(rnd, phase)
    model.set_phase(phase)
    sub = schedule.step_args(args, name, **{k: v for k, v in overrides.items() if v is not None})
    # The policy phase freezes all but the policy nets, so make_optimizer's head group holds
    # them alone (at the head learning rate); an explicit policy learning rate takes over.
    own_lr = phase == "policy" and overrides.get("learning_rate") is not None
    optimizer = make_optimizer(model) if make_optimizer is not None and not own_lr else None
    trainer = Trainer(model=model, args=sub, train_dataset=train_dataset, data_collator=data_collator,
                      callbacks=list(callbacks or []), optimizers=(optimizer, None))
    out = trainer.train(resume_from_checkpoint=sub.resume_from_checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return PhaseRecord(rnd, phase, losses, getattr(out, "training_loss", None), trainer.state.global_step)


def _exit_distribution(model, dataset, batch_size, data_collator) -> List[float]:
    """Share of ``dataset``'s rows leaving at each exit under the policy (threshold 0.5)."""
    hist = evaluate_early_exit(model, dataset, batch_size, data_collator, threshold=0.5)["exit_histogram"]
    total = max(sum(hist.values()), 1)
    return [hist[l] / total for l in model.exit_layers]


def train_consistentee(model, train_dataset, args, *, max_rounds: int = 5, tolerance: float = 0.02,
                       init: bool = True, init_steps: Optional[int] = None, policy_steps: Optional[int] = None,
                       classifier_steps: Optional[int] = None, policy_learning_rate: Optional[float] = None,
                       round_epochs: Optional[float] = None,
                       data_collator=None, eval_dataset=None, memorized_batch_size: int = 64,
                       probe_size: int = 512, callbacks: Optional[Sequence] = None, make_optimizer=None,
                       progress: bool = True, resume: bool = False) -> ConsistentEETrainingResult:
    """ConsistentEE's iterative training (consistentee.txt "Model Training and Inference").

    1. Initialisation: weighted CE over all exits (eq. 1), phase ``"init"`` (skip with
       ``init=False`` when the model's heads are already trained).
    2. Memorized layers of the training set (eq. 7), with the current classifiers; only
       needed by the hardness-guided reward (``model.reward == "hardness"``).
    3. Policy step: eq. 5 by REINFORCE, classifiers and backbone frozen (phase ``"policy"``).
    4. Classifier step: eq. 6, policy frozen (phase ``"classifier"``).
    5. Steps 2-4 "until the convergence is reached" (step 5). The paper gives no test;
       here a round ends by measuring the exit distribution of the policy (threshold 0.5)
       on the first ``probe_size`` training rows, and training stops once it moves by less
       than ``tolerance`` (total-variation distance) from the previous round's, or after
       ``max_rounds`` rounds. At least two rounds run (a change needs two).

    Each step is one HF ``Trainer`` run with ``args`` (a ``TrainingArguments``), its
    ``output_dir`` suffixed ``round{r}-{phase}``; ``*_steps`` override ``max_steps`` for that
    step, and ``round_epochs`` the epochs of each round's policy and classifier step (the
    initialisation keeps ``args.num_train_epochs``). Progress: a bar over the rounds, the
    Trainer's own bars (``args.disable_tqdm``) and one for the memorized layers.
    ``data_collator`` batches the dataset's dict items (default
    ``transformers.default_data_collator``). ``make_optimizer(model)``, when given,
    builds every step's optimizer over the parameters that step trains (e.g. a larger
    learning rate for the fresh exit heads and policy nets: in the policy step the policy
    nets are the only trainable parameters); ``policy_learning_rate`` instead gives the
    policy step the trainer's own optimizer at that rate. Without either, every step
    trains at ``args.learning_rate``.

    Resuming (:class:`~eekernels.training.schedule.StepSchedule`): after each step the
    model, the result so far and the finished steps are written to
    ``args.output_dir``/``PROGRESS_FILE``. With ``resume=True`` a run loads that record (when
    there is one), skips the finished steps and continues the interrupted one from its last
    complete Trainer checkpoint; a run resumed between steps ends with the weights an
    uninterrupted run would have. Without ``resume`` the record is ignored and overwritten.

    Returns:
        :class:`ConsistentEETrainingResult`; the model is trained in place and left in
        phase ``"classifier"``.
    """
    from tqdm.auto import tqdm

    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"train_consistentee: max_rounds must be an int >= 1, got {max_rounds!r}")
    if round_epochs is not None and not round_epochs > 0:
        raise ValueError(f"train_consistentee: round_epochs must be > 0, got {round_epochs}")
    if not tolerance >= 0:
        raise ValueError(f"train_consistentee: tolerance must be >= 0, got {tolerance}")
    if probe_size < 1:
        raise ValueError(f"train_consistentee: probe_size must be >= 1, got {probe_size}")
    if not hasattr(model, "set_phase"):
        raise TypeError("train_consistentee: model must be a ConsistentEEModel (eekernels.methods.consistentee)")
    from .schedule import StepSchedule

    schedule = StepSchedule(args.output_dir, PROGRESS_FILE, model, resume)
    result = _result_from(schedule.state)
    probe = torch.utils.data.Subset(train_dataset, range(min(probe_size, len(train_dataset))))

    def step(rnd, phase, overrides, data):
        if schedule.finished(_step_name(rnd, phase)):
            return False
        result.phases.append(_run_phase(model, phase, rnd, args, overrides, data, data_collator, callbacks,
                                        make_optimizer, schedule))
        return True

    def finish(rnd, phase):
        schedule.state = dataclasses.asdict(result)
        schedule.finish(_step_name(rnd, phase))

    if init and step(0, "init", {"max_steps": init_steps}, train_dataset):
        finish(0, "init")
    bar = tqdm(range(1, max_rounds + 1), desc="ConsistentEE rounds", disable=not progress)
    for rnd in bar:
        if result.converged:
            break
        if schedule.finished(_step_name(rnd, "classifier")):
            continue
        if model.reward == "hardness" and (not schedule.finished(_step_name(rnd, "policy"))
                                           or result.memorized_layers is None):
            bar.set_postfix_str(f"round {rnd}: memorized layers")
            result.memorized_layers = compute_memorized_layers(
                model, train_dataset, memorized_batch_size, data_collator, progress=progress)
        data = train_dataset
        if result.memorized_layers is not None:
            data = WithMemorizedLayer(train_dataset, result.memorized_layers)
        if step(rnd, "policy", {"max_steps": policy_steps, "learning_rate": policy_learning_rate,
                                "num_train_epochs": round_epochs}, data):
            finish(rnd, "policy")
        step(rnd, "classifier", {"max_steps": classifier_steps, "num_train_epochs": round_epochs}, data)
        if eval_dataset is not None:
            result.evals.append(evaluate_early_exit(model, eval_dataset, memorized_batch_size, data_collator))
        dist = _exit_distribution(model, probe, memorized_batch_size, data_collator)
        result.exit_distributions.append(dist)
        if rnd > 1:
            prev = result.exit_distributions[-2]
            change = 0.5 * sum(abs(a - b) for a, b in zip(dist, prev))
            result.changes.append(change)
            bar.set_postfix_str(f"round {rnd}: exit distribution moved {change:.3f}")
            result.converged = change < tolerance
        finish(rnd, "classifier")
    bar.close()
    return result
