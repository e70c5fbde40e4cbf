"""Global Past-Future early exit (past-future.txt section 3).

At an exit after layer i (1-based, i < n) the model predicts from

    s_p = G_past(s_1..s_i)                       eq. 1  (s_k: what an exit reads of layer k)
    s^i_j = Learner_j(s_i),  j = i+1..n          eq. 2  (imitated future states)
    s_f = G_future(s^i_{i+1..n})                 eq. 6
    alpha = sigmoid(FFN(s_p))                    eq. 7
    z_i = alpha s_p + (1 - alpha) s_f            eq. 8
    p_i = softmax(classifier_i(tanh(pooler_i(z_i))))   eq. 10 (see below for the pooler)

trained with ``L = L_ce + L_cos`` (eq. 13): layer-weighted cross-entropy, ``w_i = i /
sum_j j`` (eq. 9-12), plus the cosine imitation loss (eq. 3-5). G is one of the five
strategies of :mod:`eekernels.nn.past_pooling` (max, avg, attn, concat, lstm). The naive
global baselines of Table 3 are here too: ``voting`` (majority of the exits' predicted
labels so far) and ``ensemble`` (mean of the exits' probabilities so far), each exit
having its own ordinary head on its own state.

**Classifier input.** The paper writes ``p_i = softmax(z_i)`` (eq. 10) without naming the
classifier. Its states s_i are the layers' own representations (the imitation learners'
targets are "the real state of that layer", eq. 2-3), so z_i lives in the space of the
[CLS] hidden states. We therefore feed z_i to the layer's full BERT-style head, pooler
(dense + tanh) then classifier, as BERT classifies its last [CLS] state: an exit whose
gate trusts the past (alpha -> 1) over one state is exactly a DeeBERT exit, internal heads
can start as copies of the model's own head (``init="copy"``), and the fused exit-head op
(pooler + classifier + softmax + entropy + exit) takes z_i as its input as it is.

**The last layer** (``last_exit``). Eq. 12 sums the loss over every layer i = 1..n, eq. 5
lets the forward pass "exit" at any i up to n, and the states incorporated at layer i are
"all the past states s_1:i" (eq. 1): the paper's last exit is z_n = G_past(s_1..s_n).
Layer n has no future (eq. 6 is empty), so the gate of eq. 7-8 has nothing to weigh the
past against and z_n = s_p; the authors' code (lancopku/Early-Exit) likewise predicts at
the last layer from every layer's state. That is the default, ``last_exit="past"``, and
for the baselines it means the vote / mean over every exit including the last (the HF
head's). The head of that exit is the HF model's own pooler + classifier, applied to z_n.
Then the model run in full is *not* the HF classifier any more: :meth:`PastFutureModel.full_model`
is this model's own full forward (every layer, G over all n states, the head), and that is
what evaluation's full-model baseline runs and what exits disabled (entropy threshold 0)
reproduce. ``last_exit="hf"`` keeps the HF model's own head on its own last [CLS] state,
for every strategy and baseline: then exits disabled give exactly the HF forward and a
fine-tuned model is still a plain HF classifier when run in full.

**What ``exit_logits`` hold.** At each exit, the logits whose confidence the exit decision
thresholds: the merged head's (Past-Future), the log of the mean probabilities (ensemble),
and for voting the exit's own head (the vote shares of one exit are one-hot, so the
decision is the layer's own confidence). :meth:`PastFutureModel.exit_predictions` turns
them into what the rule predicts there (for voting, the vote shares), and
:meth:`PastFutureModel.simulate_exits` replays the engine's rule on them, so a calibrated
threshold gives the engine exactly the calibrated exits.

Inference (:class:`PastFutureRule`, on the layer loop :mod:`eekernels.engine.loop`)
never redoes the past: the past pooling advances one layer at a time through its
incremental form (running max / sum, one LSTM step, or the stack of past states for
attn / concat), kept per active row in the rule's state, which the engine compacts with
the rows. The future of the remaining rows is one matmul against the stacked learner
weights, the merge is one lerp, and pooler + classifier + softmax + entropy + exit are one
call of the fused :func:`eekernels.ops.exit_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import metrics
from ..engine.rows import Rows
from ..engine.rules import ExitDecision, ExitRule
from ..models.base import EarlyExitTrainOutput
from ..models.early_exit import EarlyExitModel
from ..models.early_exit import convert as _convert_early_exit
from ..nn.imitation import ImitationLearners, MergingGate, cosine_imitation_loss
from ..nn.past_pooling import STRATEGIES, build_pooling
from ..ops import exit_head, exit_head_reference

__all__ = [
    "BASELINES",
    "METHODS",
    "STRATEGIES",
    "PastFutureModel",
    "PastFutureOutput",
    "PastFutureRule",
    "convert",
]

#: The naive global strategies of Table 3 (no imitation, no gate).
BASELINES = ("voting", "ensemble")
#: Every ``strategy`` a :class:`PastFutureModel` takes.
METHODS = STRATEGIES + BASELINES
CRITERIA = ("entropy", "max_prob")
#: ``last_exit``: "past" (the paper: the last exit pools s_1..s_n) or "hf" (the HF head alone)
LAST_EXITS = ("past", "hf")


def _on_logits(z: torch.Tensor, criterion: str = "entropy", threshold: float = 0.0):
    """The exit-head op's reference on logits themselves (identity classifier): the same
    prediction (ties to the lowest class, -1 for non-finite rows) and decision the engine's
    fused op makes on them."""
    c = z.shape[-1]
    eye = torch.eye(c, dtype=torch.float32, device=z.device)
    return exit_head_reference(z.float(), eye, torch.zeros(c, dtype=torch.float32, device=z.device),
                               criterion=criterion, threshold=threshold)


def _add_vote(votes: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """One vote per row for class ``pred`` (rows with pred -1, non-finite logits, abstain)."""
    return votes.scatter_add(1, pred.clamp(min=0)[:, None], (pred >= 0).to(votes.dtype)[:, None])


@dataclass
class PastFutureOutput(EarlyExitTrainOutput):
    """:class:`~eekernels.models.base.EarlyExitTrainOutput` of the training forward.

    ``loss`` is ``L = L_ce + L_cos`` (eq. 13), for the baselines L_ce alone;
    ``exit_logits`` [E, B, C] are at every exit the logits its exit decision thresholds
    (the merged head's; for ensemble the log of the mean probabilities; for voting the
    exit's own head, see :meth:`PastFutureModel.exit_predictions`); ``logits`` [B, C] is
    what the model predicts in full (the last exit's prediction).

    Attributes:
        ce_loss: L_ce, eq. 12.
        cos_loss: L_cos, eq. 5 (None for the baselines).
    """

    ce_loss: Optional[torch.Tensor] = None
    cos_loss: Optional[torch.Tensor] = None


class PastFutureModel(EarlyExitModel):
    """An HF encoder classifier with Global Past-Future exits (see the module docstring).

    Args:
        hf_model: a supported ``*ForSequenceClassification`` model with num_labels >= 2
            (its modules and weights are reused).
        strategy: G, one of ``max | avg | attn | concat | lstm``, or a baseline
            ``voting | ensemble``.
        exit_layers: 1-based exit layers (default every layer); the last layer is always
            an exit, with the HF model's own head. Past states are pooled over every
            layer, exit or not.
        init: internal exit heads copied from the model's head ("copy") or fresh ("random").
        exit_pooling: what an exit reads of a layer, s_k: its [CLS] state ("cls") or the
            mean of its real tokens ("mean").
        last_exit: "past" (default, the paper): the last exit's HF head classifies
            z_n = G_past(s_1..s_n) (baselines: the vote / mean over every exit), and the
            model run in full is :meth:`full_model`, not the HF forward; "hf": the HF
            head on its own last [CLS] state, so the model in full is the HF classifier.

    Modules besides ``hf`` and ``heads`` (PF strategies only): ``past_pool`` (G over the
    past, eq. 1), ``future_pool`` (G over the imitated future, eq. 6; its own weights),
    ``imitation`` (eq. 2) and ``gate`` (eq. 7-8).
    """

    method = "past-future"
    criteria = ("entropy", "max_prob")
    plain_exit_heads = False  # the rule merges the past states before its heads
    engines = ("rows", "fixed", "graphed")  # not "ort-graph", which reads each exit's own head

    def __init__(self, hf_model: nn.Module, strategy: str = "concat", exit_layers: Optional[Sequence[int]] = None,
                 init: str = "copy", exit_pooling: str = "cls", last_exit: str = "past"):
        if strategy not in METHODS:
            raise ValueError(f"PastFutureModel: unknown strategy {strategy!r}; choose one of {METHODS}")
        if last_exit not in LAST_EXITS:
            raise ValueError(f"PastFutureModel: last_exit must be one of {LAST_EXITS}, got {last_exit!r}")
        super().__init__(hf_model, exit_layers=exit_layers, init=init, loss_weighting="weighted",
                         exit_pooling=exit_pooling)
        if self.num_labels < 2:
            raise ValueError(f"PastFutureModel: needs a classifier with num_labels >= 2 (entropy exit), got {self.num_labels}")
        n = self.num_layers
        internal = self.exit_layers[:-1]
        if not internal:
            raise ValueError(f"PastFutureModel: needs at least one exit before the last layer; exit_layers={self.exit_layers}")
        self.strategy = strategy
        self.last_exit = last_exit
        if strategy in STRATEGIES:
            h = self.config.hidden_size
            ref = self.adapter.final_head().classifier.weight
            past = self.past_exits
            # G over s_1..s_i at the exits i that read the past (eq. 1) and over the n-i approximations (eq. 6)
            self.past_pool = build_pooling(strategy, h, max(past), counts=past)
            self.future_pool = build_pooling(strategy, h, n - min(internal), counts=[n - i for i in internal])
            self.imitation = ImitationLearners(h, n)
            self.gate = MergingGate(h)
            for m in (self.past_pool, self.future_pool, self.imitation, self.gate):
                m.to(device=ref.device, dtype=ref.dtype)

    def options(self):
        return {"strategy": self.strategy, "exit_layers": self.exit_layers, "exit_pooling": self.exit_pooling,
                "last_exit": self.last_exit}

    def exit_rule(self, criterion, threshold, backend):
        return PastFutureRule(self, criterion=criterion, threshold=threshold, backend=backend)

    @property
    def is_baseline(self) -> bool:
        """True for the naive global strategies (voting, ensemble)."""
        return self.strategy in BASELINES

    @property
    def past_exits(self) -> List[int]:
        """The exit layers i whose prediction pools the past s_1..s_i: every internal exit,
        and the last with ``last_exit="past"``."""
        return list(self.exit_layers) if self.last_exit == "past" else self.exit_layers[:-1]

    def method_modules(self) -> List[nn.Module]:
        """The modules Past-Future adds to the exit heads (empty for the baselines)."""
        if self.is_baseline:
            return []
        return [self.past_pool, self.future_pool, self.imitation, self.gate]

    # ------------------------------------------------------------------ training path
    def _states(self, input_ids, attention_mask, token_type_ids):
        """(every layer's output, s_1..s_n [B, n, H]) for the inputs, differentiable."""
        layer_states = self.layer_states(input_ids, attention_mask, token_type_ids)
        valid = None if attention_mask is None else attention_mask.bool()
        return layer_states, torch.stack([self.summary(h, valid) for h in layer_states], dim=1)

    def _last_head(self, z: torch.Tensor) -> torch.Tensor:
        """The HF model's own head (pooler + tanh, its dropout, classifier) on the merged last
        state z_n = G_past(s_1..s_n) (eq. 10 at i = n)."""
        head = self.adapter.final_head()
        x = torch.tanh(head.pooler(z))
        return head.classifier(head.dropout(x) if head.dropout is not None else x)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> PastFutureOutput:
        """Every layer and every exit (differentiable); with ``labels`` the loss of eq. 13."""
        if input_ids.dim() != 2:
            raise ValueError(f"PastFutureModel: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        layer_states, states = self._states(input_ids, attention_mask, token_type_ids)  # states: s_1..s_n
        final = self.final_logits(layer_states[-1], input_ids, attention_mask)  # the HF head on its last [CLS]
        internal = self.exit_layers[:-1]
        cos_loss = None
        if self.is_baseline:
            loss_logits = [self.heads[str(i)](states[:, i - 1]) for i in internal] + [final]
            exit_logits = self._baseline_exit_logits(loss_logits)
        else:
            past = self.past_pool.prefixes(states, self.past_exits)  # G(s_1:i) at each exit that reads it, eq. 1
            approx = self.imitation.all_future(states[:, [i - 1 for i in internal]])  # [B, m, n-1, H]
            loss_logits = []
            for a, i in enumerate(internal):
                s_f = self.future_pool(approx[:, a, i - 1:])  # s^i_{i+1..n} -> s_f, eq. 6
                loss_logits.append(self.heads[str(i)](self.gate(past[:, a], s_f)))  # eq. 7-8, 10
            # layer n has no future: z_n = s_p (eq. 8 with nothing to merge)
            loss_logits.append(self._last_head(past[:, -1]) if self.last_exit == "past" else final)
            exit_logits = [z.float() for z in loss_logits]
            if labels is not None and self.training_stage != "final":
                cos_loss = cosine_imitation_loss(states, approx, internal)
        ce_loss = loss = None
        if labels is not None:
            w = self._exit_loss_weights().to(states.device)  # w_i = i / sum_j j, eq. 9
            ce = torch.stack([nn.functional.cross_entropy(z.float(), labels.long()) for z in loss_logits])  # eq. 10-11
            ce_loss = (w * ce).sum()  # eq. 12
            loss = ce_loss if cos_loss is None else ce_loss + cos_loss  # eq. 13
        exit_logits = torch.stack(exit_logits)
        return PastFutureOutput(loss=loss, logits=self.exit_predictions(exit_logits)[-1], exit_logits=exit_logits,
                                ce_loss=ce_loss, cos_loss=cos_loss)

    def _baseline_exit_logits(self, own: List[torch.Tensor]) -> List[torch.Tensor]:
        """The logits each baseline exit thresholds, from the exits' own logits: voting, the
        exit's own (one exit's vote shares are one-hot, so the decision is the layer's own
        confidence); ensemble, the log of the mean probabilities of the exits so far. The
        last exit combines every exit with ``last_exit="past"`` and is the HF head alone with "hf"."""
        own = [z.float() for z in own]
        if self.strategy == "voting":
            return own
        out, acc = [], None
        mean_last = self.last_exit == "past"
        for k, z in enumerate(own if mean_last else own[:-1], start=1):
            p = torch.softmax(z.detach(), dim=1)
            acc = p if acc is None else acc + p
            out.append(torch.log(acc / k))
        return out if mean_last else out + [own[-1]]

    def exit_predictions(self, exit_logits: torch.Tensor) -> torch.Tensor:
        """What the rule predicts at each exit, from the forward's ``exit_logits`` [E, B, C]:
        for voting the vote shares of the exits so far (each votes for its own head's
        argmax; a tie goes to the lowest class; with ``last_exit="hf"`` the last exit is the
        HF head alone), for every other strategy the logits themselves."""
        if self.strategy != "voting":
            return exit_logits
        e = exit_logits.shape[0]
        voted = e if self.last_exit == "past" else e - 1
        votes = torch.zeros(exit_logits.shape[1:], dtype=torch.float32, device=exit_logits.device)
        out = []
        for k in range(voted):
            votes = _add_vote(votes, _on_logits(exit_logits[k]).pred)
            out.append(votes / (k + 1))
        out.extend(z.float() for z in exit_logits[voted:])
        return torch.stack(out)

    # ------------------------------------------------------------------ full model and calibration
    def full_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the model predicts when no exit fires (exits disabled), computing only what
        its last exit needs: float32 [B, C]."""
        if self.last_exit == "hf":
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits.float()
        if self.is_baseline:  # the vote / mean over every exit's head
            return self(input_ids, attention_mask, token_type_ids).logits
        _, states = self._states(input_ids, attention_mask, token_type_ids)
        return self._last_head(self.past_pool(states)).float()  # G(s_1..s_n), eq. 1 at i = n

    def full_model(self) -> nn.Module:
        """The full-model baseline: with ``last_exit="hf"`` the HF model; with "past" this
        model's own full forward (:meth:`full_logits` behind an HF-style ``forward``), since
        its last exit reads every layer and so differs from the HF head."""
        return self.hf if self.last_exit == "hf" else _FullForward(self)

    def simulate_exits(self, exit_logits, criterion, threshold):
        """The engine's rule (:class:`PastFutureRule`) replayed on the forward's ``exit_logits``
        [E, B, C]: a row leaves at the first internal exit whose ``exit_logits`` pass the
        threshold (entropy below it, or max-prob at least it; the logits the rule decides on
        for every strategy, voting's own heads included) and predicts
        :meth:`exit_predictions` there; the other rows leave at the last exit."""
        if criterion not in CRITERIA:
            raise ValueError(f"PastFutureModel.simulate_exits: criterion must be one of {CRITERIA}, got {criterion!r}")
        layer, _ = super().simulate_exits(exit_logits, criterion, threshold)
        shown = self.exit_predictions(exit_logits)
        k = torch.searchsorted(torch.tensor(self.exit_layers, device=layer.device), layer)
        return layer, shown[k, torch.arange(layer.shape[0], device=layer.device)]

    # ------------------------------------------------------------------ inference
    def _pool_flops(self, k: int, incremental: bool) -> int:
        """FLOPs per sample of G over k states: one step of the incremental form then its
        read, or the full form."""
        h, st = self.config.hidden_size, self.strategy
        if st in ("max", "avg"):
            return h if incremental else k * h
        if st == "attn":
            return 2 * h * h + 4 * k * h
        if st == "concat":
            return 2 * k * h * h
        return 16 * h * h * (1 if incremental else k)  # lstm: input and recurrent gates

    def exit_extra_flops(self, layer: int) -> int:
        """FLOPs per sample that an exit at ``layer`` costs beyond the pooler + classifier
        (2 per multiply-add; elementwise ops counted once): the past pooling step, the
        imitation matmul, the future pooling and the gate (PF); the combination (baselines).
        The last exit: the past pooling step alone (or the combination) with
        ``last_exit="past"``, nothing with "hf"."""
        n, h, c = self.num_layers, self.config.hidden_size, self.num_labels
        if layer == n and self.last_exit == "hf":
            return 0
        if self.is_baseline:
            return 4 * c
        if layer == n:
            return self._pool_flops(n, True)
        f = n - layer
        return self._pool_flops(layer, True) + 2 * f * h * h + self._pool_flops(f, False) + 2 * h + 3 * h

    def full_model_extra_flops(self) -> int:
        """FLOPs per sample :meth:`full_model` runs beyond the layers and one head: with
        ``last_exit="past"`` G over all n states (PF) or every internal head and the
        combinations (baselines)."""
        if self.last_exit == "hf":
            return 0
        if not self.is_baseline:
            return self._pool_flops(self.num_layers, False)
        head = metrics.exit_head_flops(self.config.hidden_size, self.num_labels)
        return sum(head + self.exit_extra_flops(l) for l in self.exit_layers[:-1]) + self.exit_extra_flops(self.num_layers)


class _FullForward(nn.Module):
    """A :class:`PastFutureModel` run in full behind an HF-style forward:
    ``forward(input_ids, attention_mask, token_type_ids).logits`` is
    :meth:`PastFutureModel.full_logits` (what evaluation times and scores as the full model)."""

    def __init__(self, model: PastFutureModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **unused):
        return SequenceClassifierOutput(logits=self.model.full_logits(input_ids, attention_mask, token_type_ids))


class PastFutureRule(ExitRule):
    """The Past-Future exit decision for the batched engine.

    Per-row state (compacted by the engine with the rows): the past pooling's incremental
    state under ``past.*`` (running max / sum, LSTM (h, c), or the stack of past states);
    for the baselines, the vote counts (voting) or the summed probabilities (ensemble),
    float32 [N, C].

    Args:
        model: a :class:`PastFutureModel`.
        criterion: "entropy" (exit when the entropy of p_i < threshold) or "max_prob".
        threshold: the exit threshold.
        backend: the ops' backend.
    """

    def __init__(self, model: PastFutureModel, criterion: str = "entropy", threshold: float = 0.0,
                 backend: Optional[str] = None):
        if not isinstance(model, PastFutureModel):
            raise TypeError(f"PastFutureRule needs a PastFutureModel, got {type(model).__name__}")
        if criterion not in CRITERIA:
            raise ValueError(f"PastFutureRule: criterion must be one of {CRITERIA}, got {criterion!r}")
        thr = float(threshold)
        if not thr >= 0.0:
            raise ValueError(f"PastFutureRule: threshold must be a number >= 0, got {threshold}")
        self.model, self.criterion, self.threshold, self.backend = model, criterion, thr, backend
        self._exit_index = {l: k for k, l in enumerate(model.exit_layers, start=1)}

    def initial_state(self, batch_size, device):
        m = self.model
        if m.is_baseline:
            key = "votes" if m.strategy == "voting" else "prob_sum"
            return {key: torch.zeros(batch_size, m.num_labels, dtype=torch.float32, device=device)}
        dtype = m.gate.ffn.weight.dtype
        return {f"past.{k}": v for k, v in m.past_pool.init_state(batch_size, device, dtype).items()}

    def _update_past(self, layer: int, rows: Rows, s: torch.Tensor) -> Dict[str, torch.Tensor]:
        pool = self.model.past_pool
        past = {k[len("past."):]: v for k, v in rows.state.items()}
        if layer <= pool.max_states:  # later layers feed no exit's past
            past = pool.update(past, s, layer)
        return past

    def observe(self, layer, rows):
        if self.model.is_baseline:
            return rows.state
        s = self.model.summary(rows.hidden, rows.valid)
        return {f"past.{k}": v for k, v in self._update_past(layer, rows, s).items()}

    def _head(self, x: torch.Tensor, layer: int, criterion: str, threshold: float):
        head = self.model.head(layer)
        return exit_head(x, head.classifier.weight, head.classifier.bias, pooler_weight=head.pooler.weight,
                         pooler_bias=head.pooler.bias, criterion=criterion, threshold=threshold, backend=self.backend)

    def decide(self, layer, rows):
        m = self.model
        last = layer == m.num_layers
        if last and m.last_exit == "hf":  # the HF model's own head on its last [CLS] state
            out = self._head(rows.hidden[:, 0], layer, self.criterion, self.threshold)
            return ExitDecision(out.logits, out.exit, {})
        if m.is_baseline:  # each exit's own head; at the last layer the HF head on its [CLS]
            x = rows.hidden[:, 0] if last else m.summary(rows.hidden, rows.valid)
            if m.strategy == "voting":
                return self._decide_voting(layer, x, rows.state)
            return self._decide_ensemble(layer, x, rows.state)
        s_i = m.summary(rows.hidden, rows.valid)
        past = self._update_past(layer, rows, s_i)
        z = m.past_pool.read(past, layer)  # s_p, eq. 1, incrementally
        if not last:  # layer n has no future: z_n = s_p
            approx = m.imitation.future(s_i, layer)  # eq. 2 for j = i+1..n: one matmul
            z = m.gate(z, m.future_pool(approx))  # eq. 6-8
        out = self._head(z, layer, self.criterion, self.threshold)  # pooler + classifier + entropy + exit, fused
        return ExitDecision(out.logits, out.exit, {f"past.{k}": v for k, v in past.items()})

    def _decide_voting(self, layer, x, state):
        # The exit decision is the layer's own confidence (the vote shares of one exit would
        # have zero entropy); the prediction is the majority of the exits so far (ties: the
        # lowest class index). PastFutureModel.exit_predictions is the same on the forward's logits.
        out = self._head(x, layer, self.criterion, self.threshold)
        votes = _add_vote(state["votes"], out.pred)
        return ExitDecision(votes / self._exit_index[layer], out.exit, {"votes": votes})

    def _decide_ensemble(self, layer, x, state):
        out = self._head(x, layer, "entropy", 0.0)  # logits only; the exit is on the mean
        prob_sum = state["prob_sum"] + torch.softmax(out.logits, dim=1)
        p = prob_sum / self._exit_index[layer]
        if self.criterion == "entropy":
            exit_ = -torch.special.xlogy(p, p).sum(dim=1) < self.threshold
        else:
            exit_ = p.amax(dim=1) >= self.threshold
        exit_ = exit_ & torch.isfinite(p).all(dim=1)
        return ExitDecision(torch.log(p), exit_, {"prob_sum": prob_sum})


def convert(model: nn.Module, strategy: str = "concat", exit_layers: Optional[Sequence[int]] = None,
            num_labels: Optional[int] = None, init: str = "copy", exit_pooling: str = "cls",
            last_exit: str = "past") -> PastFutureModel:
    """Make a :class:`PastFutureModel` from an HF BERT/RoBERTa/ALBERT classifier or base
    model (a base model needs ``num_labels``), reusing its modules and weights.

    ``strategy``: ``max | avg | attn | concat | lstm`` (Past-Future with that G) or the
    baselines ``voting | ensemble``; ``last_exit``: see :class:`PastFutureModel`.
    """
    if strategy not in METHODS:
        raise ValueError(f"convert: unknown strategy {strategy!r}; choose one of {METHODS}")
    return _convert_early_exit(model, exit_layers=exit_layers, num_labels=num_labels, init=init, cls=PastFutureModel,
                               strategy=strategy, exit_pooling=exit_pooling, last_exit=last_exit)
