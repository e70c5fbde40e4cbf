"""ConsistentEE (consistentee.txt): a policy network per internal exit decides Exit or
Continue; training is consistent with inference (only the exit layer's classifier is
asked to be right) and alternates policy and classifier steps.

- :class:`ConsistentEEModel`: an :class:`~eekernels.models.EarlyExitModel` with a
  :class:`~eekernels.nn.PolicyNet` at every internal exit (the last layer always exits).
  Its ``forward`` is the HF ``Trainer`` training path of the current phase
  (:meth:`ConsistentEEModel.set_phase`): ``"init"`` weighted CE (eq. 1), ``"policy"``
  REINFORCE on eq. 5 with the rewards of eq. 3/4, ``"classifier"`` eq. 6.
- :class:`ConsistentEERule`: the inference rule for the batched engine; one fused
  :func:`eekernels.ops.exit_head` call per exit layer computes the classifier logits and
  pi(Exit) together (``criterion="policy"``), and a row exits when pi(Exit) > threshold
  (0.5 in the paper).

The schedule that drives the phases is :func:`eekernels.training.consistentee.train_consistentee`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..engine.rules import ExitDecision, ExitHeadRule, ExitRule, head_exit
from ..models.base import EarlyExitTrainOutput
from ..models.early_exit import EarlyExitModel, convert
from ..nn.policy import PolicyNet
from ..training import consistentee as ctrain

__all__ = ["ConsistentEEModel", "ConsistentEEOutput", "ConsistentEERule", "PHASES"]

PHASES = ("init", "policy", "classifier")
CLASSIFIER_ACTIONS = ("sample", "greedy")


@dataclass
class ConsistentEEOutput(EarlyExitTrainOutput):
    """Output of :meth:`ConsistentEEModel.forward` in the "policy" and "classifier" phases.

    Attributes:
        loss: "policy": its value is the mean negative reward of the sampled trajectories
            (-J, eq. 5, which falls as the policy improves) and its gradient is the
            REINFORCE estimate (:func:`~eekernels.training.consistentee.reinforce_loss`);
            "classifier": the exit layer's cross-entropy (eq. 6), averaged over the batch.
        logits: [B, C], "classifier": each sample's logits at its sampled exit;
            "policy": the last layer's logits.
        exit_logits: [E, B, C], logits of every exit ("policy" only; None otherwise).
        exit_layer: the sampled exit layers, [K, B] ("policy") or [B] ("classifier").
        reward: [K, B] rewards of the sampled trajectories ("policy" only).
    """

    exit_layer: Optional[torch.Tensor] = None
    reward: Optional[torch.Tensor] = None


class ConsistentEEModel(EarlyExitModel):
    """An early-exit HF encoder classifier with a ConsistentEE policy net per internal exit.

    Args:
        hf_model, exit_layers, init: as for :class:`~eekernels.models.EarlyExitModel`
            (the "init" phase uses its weighted CE, past-future.txt eq. 9 = consistentee.txt eq. 1).
        policy_hidden: width P of each policy net's hidden layer (H -> P -> 1; default 32).
        reward: "hardness" (eq. 4, needs each sample's memorized layer) or "vanilla" (eq. 3).
        alpha: the accuracy/acceleration trade-off alpha of eq. 3-4 (per layer of depth).
        num_samples: K >= 2 trajectories sampled per sample in the policy phase; the
            per-sample mean reward is the baseline. The frozen backbone runs once per batch
            without dropout and the K trajectories are drawn on its states, which equals
            replicating the batch K times.
        epsilon: epsilon-greedy exploration rate of the policy phase: each action is a
            coin flip with probability epsilon, else drawn from pi; log-probabilities are
            taken under pi (the usual on-policy approximation).
        classifier_actions: how the frozen policy picks the exit in the classifier phase:
            "sample" (one trajectory drawn from pi, as eq. 6 reads) or "greedy" (pi > 0.5,
            the inference rule).
    """

    method = "consistentee"
    criteria = ("policy", "entropy", "max_prob", "patience")
    plain_exit_heads = False  # the policy nets read the pooled state, not the logits

    def __init__(self, hf_model: nn.Module, exit_layers: Optional[Sequence[int]] = None, init: str = "copy",
                 loss_weighting: str = "weighted", exit_pooling: str = "cls", *, policy_hidden: int = 32,
                 reward: str = "hardness",
                 alpha: float = 0.1, num_samples: int = 8, epsilon: float = 0.05,
                 classifier_actions: str = "sample"):
        super().__init__(hf_model, exit_layers=exit_layers, init=init, loss_weighting=loss_weighting,
                         exit_pooling=exit_pooling)
        if self.num_labels < 2:
            raise ValueError(f"ConsistentEE needs a classifier with num_labels >= 2 (its reward is a "
                             f"cross-entropy), got num_labels={self.num_labels}")
        if reward not in ctrain.REWARDS:
            raise ValueError(f"reward must be one of {ctrain.REWARDS}, got {reward!r}")
        if classifier_actions not in CLASSIFIER_ACTIONS:
            raise ValueError(f"classifier_actions must be one of {CLASSIFIER_ACTIONS}, got {classifier_actions!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (with one trajectory per sample the mean-reward "
                             f"baseline equals the reward and nothing is learned), got {num_samples}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.policy_hidden = int(policy_hidden)
        self.reward, self.alpha = reward, float(alpha)
        self.num_samples, self.epsilon = int(num_samples), float(epsilon)
        self.classifier_actions = classifier_actions
        ref = self.adapter.final_head().classifier.weight
        self.policies = nn.ModuleDict({
            str(l): PolicyNet(self.config.hidden_size, self.policy_hidden).to(device=ref.device, dtype=ref.dtype)
            for l in self.exit_layers[:-1]
        })
        self.phase = "init"
        self.set_phase("init")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, model: nn.Module, exit_layers: Optional[Sequence[int]] = None, num_labels: Optional[int] = None,
                init: str = "copy", **kwargs) -> "ConsistentEEModel":
        """Make a ConsistentEE model from an HF BERT/RoBERTa/ALBERT classifier or base model
        (as :func:`eekernels.models.convert`; ``kwargs`` go to the constructor)."""
        return cls.from_early_exit(convert(model, exit_layers=exit_layers, num_labels=num_labels, init=init), **kwargs)

    @classmethod
    def from_early_exit(cls, model: EarlyExitModel, **kwargs) -> "ConsistentEEModel":
        """Add fresh policy nets to an :class:`EarlyExitModel` (e.g. one already trained with
        weighted CE, so training can start at step 2). The HF model is shared; the heads
        are copied."""
        if not isinstance(model, EarlyExitModel):
            raise TypeError(f"from_early_exit: expected an EarlyExitModel, got {type(model).__name__}")
        kwargs.setdefault("loss_weighting", model.loss_weighting)
        kwargs.setdefault("exit_pooling", model.exit_pooling)
        out = cls(model.hf, exit_layers=model.exit_layers, init="random", **kwargs)
        out.heads.load_state_dict(model.heads.state_dict())
        return out.train(model.hf.training)  # keep the HF model's mode (eval stays eval)

    def options(self):
        return dict(super().options(), policy_hidden=self.policy_hidden, reward=self.reward, alpha=self.alpha,
                    num_samples=self.num_samples, epsilon=self.epsilon, classifier_actions=self.classifier_actions)

    def exit_rule(self, criterion, threshold, backend):
        if criterion != "policy":  # the classic rules on the same heads
            return ExitHeadRule(self, criterion, threshold, backend)
        return ConsistentEERule(self, threshold=threshold, backend=backend)

    def policy(self, layer: int) -> PolicyNet:
        """The policy net of the internal exit after ``layer`` (1-based)."""
        if str(layer) not in self.policies:
            raise KeyError(f"no policy net at layer {layer}; internal exits: {self.exit_layers[:-1]}")
        return self.policies[str(layer)]

    # ------------------------------------------------------------------ phases
    def set_phase(self, phase: str) -> None:
        """Select the training phase (consistentee.txt "Model Training and Inference"):

        - "init": backbone and all heads train on the weighted CE (eq. 1); policies frozen.
        - "policy": policies train on eq. 5; backbone and heads frozen (and run without
          dropout, as at inference).
        - "classifier": backbone and heads train on eq. 6; policies frozen.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase == "policy" and not len(self.policies):
            raise ValueError("the policy phase needs internal exits; this model exits only at the last layer")
        self.phase = phase
        self.set_training_stage("joint")
        for p in list(self.hf.parameters()) + list(self.heads.parameters()):
            p.requires_grad_(phase != "policy")
        for p in self.policies.parameters():
            p.requires_grad_(phase == "policy")

    # ------------------------------------------------------------------ training path
    def full_forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **unused):
        """Every layer and every exit (the weighted-CE path of :class:`EarlyExitModel`)."""
        return super().forward(input_ids, attention_mask, token_type_ids, labels=labels)

    def _pooled(self, layer: int, cls: torch.Tensor) -> torch.Tensor:
        """The classifier input of an exit, tanh(pooler(cls)): the policy's state s_t."""
        return torch.tanh(self.head(layer).pooler(cls))

    def _head_logits(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        head = self.head(layer)
        return head.classifier(head.dropout(pooled))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                memorized_layer: Optional[torch.Tensor] = None, **unused):
        """The training forward of the current phase (HF ``Trainer`` compatible).

        Args:
            input_ids, attention_mask, token_type_ids: [B, S] as for HF BERT.
            labels: int [B] class labels (no loss without them).
            memorized_layer: int [B], each sample's memorized layer (eq. 7); needed in the
                policy phase with the hardness reward (see
                :class:`~eekernels.training.consistentee.WithMemorizedLayer`).

        Returns:
            "init": :class:`~eekernels.models.EarlyExitTrainOutput`; otherwise
            :class:`ConsistentEEOutput`.
        """
        if self.phase == "init":
            return self.full_forward(input_ids, attention_mask, token_type_ids, labels)
        if self.phase == "policy":
            return self._policy_forward(input_ids, attention_mask, token_type_ids, labels, memorized_layer)
        return self._classifier_forward(input_ids, attention_mask, token_type_ids, labels)

    @contextlib.contextmanager
    def _frozen_eval(self):
        modes = [(m, m.training) for m in (self.hf, self.heads)]
        try:
            for m, _ in modes:
                m.eval()
            yield
        finally:
            for m, mode in modes:
                m.train(mode)

    def _policy_forward(self, input_ids, attention_mask, token_type_ids, labels, memorized_layer):
        ad = self.adapter
        internal = self.exit_layers[:-1]
        with torch.no_grad(), self._frozen_eval():
            hidden = ad.embed(input_ids, token_type_ids)
            mask = ad.attention_mask(attention_mask, hidden)
            valid = None if attention_mask is None else attention_mask.bool()
            pooled, exit_logits = [], []
            for i in range(self.num_layers):
                hidden = ad.layer(i)(hidden, mask)
                if i + 1 in self.exit_layers:
                    x = self._pooled(i + 1, self.exit_summary(i + 1, hidden, valid))
                    pooled.append(x)
                    exit_logits.append(self._head_logits(i + 1, x).float())
            stacked = torch.stack(exit_logits)
        if labels is None:
            return ConsistentEEOutput(logits=exit_logits[-1], exit_logits=stacked)
        if self.reward == "hardness" and memorized_layer is None:
            raise ValueError("ConsistentEE policy phase with reward='hardness' needs memorized_layer per sample "
                             "(eekernels.training.consistentee.compute_memorized_layers + WithMemorizedLayer), "
                             "or use reward='vanilla'")
        b = labels.shape[0]
        # pi(Exit | s_t) at every internal exit [S, B]; the only part with a gradient
        if internal:
            policy_logit = torch.stack([self.policies[str(l)].logit(x) for l, x in zip(internal, pooled)])
        else:
            policy_logit = stacked.new_zeros((0, b))
        with torch.no_grad():
            e, c = stacked.shape[0], stacked.shape[2]
            ce = nn.functional.cross_entropy(stacked.reshape(e * b, c), labels.long().repeat(e),
                                             reduction="none").view(e, b)
            # repeated sampling (K trajectories per sample) with epsilon-greedy exploration
            actions = ctrain.sample_exit_actions(torch.sigmoid(policy_logit), self.num_samples, self.epsilon)
            exit_index = ctrain.first_exit(actions)  # [K, B]; S = the last layer
            layers = torch.tensor(self.exit_layers, device=stacked.device)
            exit_layer = layers[exit_index]
            reward = ctrain.exit_reward(
                ce.gather(0, exit_index), exit_layer, self.num_layers, self.alpha,
                memorized_layer if self.reward == "hardness" else None)  # eq. 4 / eq. 3
        log_prob = ctrain.trajectory_log_prob(policy_logit, actions, exit_index)
        surrogate = ctrain.reinforce_loss(log_prob, reward)  # eq. 5 by REINFORCE, per-sample baseline
        # report -J (mean negative reward) while backpropagating the REINFORCE estimate
        loss = surrogate + (-reward.mean() - surrogate).detach()
        return ConsistentEEOutput(loss=loss, logits=exit_logits[-1], exit_logits=stacked,
                                  exit_layer=exit_layer, reward=reward)

    def _classifier_forward(self, input_ids, attention_mask, token_type_ids, labels):
        ad = self.adapter
        hidden = ad.embed(input_ids, token_type_ids)
        mask = ad.attention_mask(attention_mask, hidden)
        valid = None if attention_mask is None else attention_mask.bool()
        b = input_ids.shape[0]
        active = torch.ones(b, dtype=torch.bool, device=input_ids.device)
        out_logits = None
        exit_layer = torch.full((b,), self.num_layers, dtype=torch.int64, device=input_ids.device)
        for i in range(self.num_layers):
            hidden = ad.layer(i)(hidden, mask)
            layer = i + 1
            if layer not in self.exit_layers:
                continue
            x = self._pooled(layer, self.exit_summary(layer, hidden, valid))
            z = self._head_logits(layer, x).float()
            if layer == self.num_layers:
                leave = active
            else:
                with torch.no_grad():  # the frozen policy picks the exit
                    p = self.policies[str(layer)](x.detach())
                    if self.classifier_actions == "greedy":
                        act = p > 0.5
                    else:
                        act = ctrain.sample_exit_actions(p[None], 1)[0, 0]
                leave = active & act
            out_logits = z if out_logits is None else torch.where(leave[:, None], z, out_logits)
            exit_layer = torch.where(leave, torch.full_like(exit_layer, layer), exit_layer)
            active = active & ~leave
            if layer != self.num_layers and not bool(active.any()):
                break  # every sample has exited: the deeper layers would get no loss
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(out_logits, labels.long())  # eq. 6: only the exit layer
        return ConsistentEEOutput(loss=loss, logits=out_logits, exit_layer=exit_layer)


class ConsistentEERule(ExitRule):
    """ConsistentEE's exit rule on the layer loop (:mod:`eekernels.engine.loop`).

    At each internal exit one fused :func:`eekernels.ops.exit_head` call (``criterion="policy"``)
    gives the classifier logits and pi(Exit) from the same pooled state; the row exits
    when pi(Exit) > ``threshold``. The last layer's head runs alone (every row leaves there).
    """

    def __init__(self, model: ConsistentEEModel, threshold: float = 0.5, backend: Optional[str] = None):
        t = float(threshold)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"ConsistentEE: threshold is a probability in [0, 1], got {threshold}")
        self.model, self.threshold, self.backend = model, t, backend

    def decide(self, layer, rows):
        if layer == self.model.num_layers:  # logits only: the loop exits every row here
            out = head_exit(self.model, layer, rows, criterion="entropy", threshold=0.0, backend=self.backend)
        else:
            pn = self.model.policy(layer)
            out = head_exit(self.model, layer, rows, criterion="policy", threshold=self.threshold,
                            backend=self.backend, policy_weight=pn.fc1.weight, policy_bias=pn.fc1.bias,
                            policy_out_weight=pn.fc2.weight.view(-1), policy_out_bias=pn.fc2.bias)
        return ExitDecision(out.logits, out.exit, {})
