"""Global Past-Future early exit (past-future.txt section 3).

At an exit after layer i (1-based, i < n) the model predicts from

    s_p = G_past(s_1..s_i)                       eq. 1  (s_k: the [CLS] state of layer k)
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
having its own ordinary head on its own [CLS] state.

**Classifier input.** The paper writes ``p_i = softmax(z_i)`` (eq. 10) without naming the
classifier. Its states s_i are the layers' own representations (the imitation learners'
targets are "the real state of that layer", eq. 2-3), so z_i lives in the space of the
[CLS] hidden states. We therefore feed z_i to the layer's full BERT-style head, pooler
(dense + tanh) then classifier, as BERT classifies its last [CLS] state: an exit whose
gate trusts the past (alpha -> 1) over one state is exactly a DeeBERT exit, internal heads
can start as copies of the model's own head (``init="copy"``), and the fused exit-head op
(pooler + classifier + softmax + entropy + exit) takes z_i as its input as it is.

**The last layer.** Layer n has no future; its exit is the HF model's own head on its own
last [CLS] state (as in :class:`~eekernels.models.EarlyExitModel`), for every strategy and
baseline. So with exits disabled (entropy threshold 0) the prediction is exactly the HF
model's forward, and a fine-tuned Past-Future model is still a plain HF classifier when
run in full.

Inference (:class:`PastFutureRule`, on the layer loop :mod:`eekernels.engine.loop`)
never redoes the past: the past pooling advances one layer at a time through its
incremental form (running max / sum, one LSTM step, or the stack of past [CLS] states for
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

from ..engine.rows import Rows
from ..engine.rules import ExitDecision, ExitRule
from ..models.base import EarlyExitTrainOutput
from ..models.early_exit import EarlyExitModel
from ..models.early_exit import convert as _convert_early_exit
from ..nn.imitation import ImitationLearners, MergingGate, cosine_imitation_loss
from ..nn.past_pooling import STRATEGIES, build_pooling
from ..ops import exit_head

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

@dataclass
class PastFutureOutput(EarlyExitTrainOutput):
    """:class:`~eekernels.models.base.EarlyExitTrainOutput` of the training forward.

    ``loss`` is ``L = L_ce + L_cos`` (eq. 13), for the baselines L_ce alone; ``exit_logits``
    [E, B, C] are at every exit what the exit rule predicts there (for voting: the vote
    shares; for ensemble: log of the mean probabilities).

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

    Modules besides ``hf`` and ``heads`` (PF strategies only): ``past_pool`` (G over the
    past, eq. 1), ``future_pool`` (G over the imitated future, eq. 6; its own weights),
    ``imitation`` (eq. 2) and ``gate`` (eq. 7-8).
    """

    method = "past-future"
    criteria = ("entropy", "max_prob")

    def __init__(self, hf_model: nn.Module, strategy: str = "concat", exit_layers: Optional[Sequence[int]] = None,
                 init: str = "copy", exit_pooling: str = "cls"):
        if strategy not in METHODS:
            raise ValueError(f"PastFutureModel: unknown strategy {strategy!r}; choose one of {METHODS}")
        super().__init__(hf_model, exit_layers=exit_layers, init=init, loss_weighting="weighted",
                         exit_pooling=exit_pooling)
        if self.num_labels < 2:
            raise ValueError(f"PastFutureModel: needs a classifier with num_labels >= 2 (entropy exit), got {self.num_labels}")
        n = self.num_layers
        internal = self.exit_layers[:-1]
        if not internal:
            raise ValueError(f"PastFutureModel: needs at least one exit before the last layer; exit_layers={self.exit_layers}")
        self.strategy = strategy
        if strategy in STRATEGIES:
            h = self.config.hidden_size
            ref = self.adapter.final_head().classifier.weight
            # G over s_1..s_i at the internal exits i (eq. 1) and over the n-i approximations (eq. 6)
            self.past_pool = build_pooling(strategy, h, max(internal), counts=internal)
            self.future_pool = build_pooling(strategy, h, n - min(internal), counts=[n - i for i in internal])
            self.imitation = ImitationLearners(h, n)
            self.gate = MergingGate(h)
            for m in (self.past_pool, self.future_pool, self.imitation, self.gate):
                m.to(device=ref.device, dtype=ref.dtype)

    def options(self):
        return {"strategy": self.strategy, "exit_layers": self.exit_layers, "exit_pooling": self.exit_pooling}

    def exit_rule(self, criterion, threshold, backend):
        return PastFutureRule(self, criterion=criterion, threshold=threshold, backend=backend)

    @property
    def is_baseline(self) -> bool:
        """True for the naive global strategies (voting, ensemble)."""
        return self.strategy in BASELINES

    def method_modules(self) -> List[nn.Module]:
        """The modules Past-Future adds to the exit heads (empty for the baselines)."""
        if self.is_baseline:
            return []
        return [self.past_pool, self.future_pool, self.imitation, self.gate]

    # ------------------------------------------------------------------ training path
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> PastFutureOutput:
        """Every layer and every exit (differentiable); with ``labels`` the loss of eq. 13."""
        if input_ids.dim() != 2:
            raise ValueError(f"PastFutureModel: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        layer_states = self.layer_states(input_ids, attention_mask, token_type_ids)
        valid = None if attention_mask is None else attention_mask.bool()
        states = torch.stack([self.summary(h, valid) for h in layer_states], dim=1)  # [B, n, H]: s_1..s_n
        final = self.final_logits(layer_states[-1], input_ids, attention_mask)
        internal = self.exit_layers[:-1]
        cos_loss = None
        if self.is_baseline:
            own = [self.heads[str(i)](states[:, i - 1]) for i in internal] + [final]
            loss_logits = own
            shown = self._combine_baseline(own)
        else:
            past = self.past_pool.forward_prefixes(states[:, :max(internal)])  # G(s_1:k) for every k
            approx = self.imitation.all_future(states[:, [i - 1 for i in internal]])  # [B, m, n-1, H]
            loss_logits = []
            for a, i in enumerate(internal):
                s_p = past[:, i - 1]
                s_f = self.future_pool(approx[:, a, i - 1:])  # s^i_{i+1..n} -> s_f, eq. 6
                z = self.gate(s_p, s_f)  # eq. 7-8
                loss_logits.append(self.heads[str(i)](z))
            loss_logits.append(final)
            shown = [z.float() for z in loss_logits]
            if labels is not None and self.training_stage != "final":
                cos_loss = cosine_imitation_loss(states, approx, internal)
        ce_loss = loss = None
        if labels is not None:
            w = self._exit_loss_weights().to(states.device)  # w_i = i / sum_j j, eq. 9
            ce = torch.stack([nn.functional.cross_entropy(z.float(), labels.long()) for z in loss_logits])  # eq. 10-11
            ce_loss = (w * ce).sum()  # eq. 12
            loss = ce_loss if cos_loss is None else ce_loss + cos_loss  # eq. 13
        return PastFutureOutput(loss=loss, logits=loss_logits[-1], exit_logits=torch.stack(shown),
                                ce_loss=ce_loss, cos_loss=cos_loss)

    def _combine_baseline(self, own: List[torch.Tensor]) -> List[torch.Tensor]:
        """What voting / ensemble predict at each exit from the exits' own logits so far
        (the last exit is the HF head alone)."""
        out, acc = [], None
        for k, z in enumerate(own[:-1], start=1):
            z = z.detach().float()
            if self.strategy == "ensemble":
                p = torch.softmax(z, dim=1)
                acc = p if acc is None else acc + p
                out.append(torch.log(acc / k))
            else:
                v = nn.functional.one_hot(z.argmax(dim=1), z.shape[1]).float()
                acc = v if acc is None else acc + v
                out.append(acc / k)
        out.append(own[-1].float())
        return out

    # ------------------------------------------------------------------ inference
    def exit_extra_flops(self, layer: int) -> int:
        """FLOPs per sample that an exit at ``layer`` costs beyond the pooler + classifier
        (2 per multiply-add; elementwise ops counted once): the past pooling step, the
        imitation matmul, the future pooling and the gate (PF); the combination (baselines)."""
        n, h, c = self.num_layers, self.config.hidden_size, self.num_labels
        if layer == n:
            return 0
        if self.is_baseline:
            return 4 * c
        f = n - layer

        def pool(k, incremental):
            st = self.strategy
            if st in ("max", "avg"):
                return h if incremental else k * h
            if st == "attn":
                return 2 * h * h + 4 * k * h
            if st == "concat":
                return 2 * k * h * h
            return 16 * h * h * (1 if incremental else k)  # lstm: input and recurrent gates

        return pool(layer, True) + 2 * f * h * h + pool(f, False) + 2 * h + 3 * h


class PastFutureRule(ExitRule):
    """The Past-Future exit decision for the batched engine.

    Per-row state (compacted by the engine with the rows): the past pooling's incremental
    state under ``past.*`` (running max / sum, LSTM (h, c), or the stack of past [CLS]
    states); for the baselines, the vote counts (voting) or the summed probabilities
    (ensemble), float32 [N, C].

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

    def _update_past(self, layer: int, rows: Rows) -> Dict[str, torch.Tensor]:
        pool = self.model.past_pool
        past = {k[len("past."):]: v for k, v in rows.state.items()}
        if layer <= pool.max_states:  # later layers feed no internal exit
            past = pool.update(past, self.model.summary(rows.hidden, rows.valid), layer)
        return past

    def observe(self, layer, rows):
        if self.model.is_baseline:
            return rows.state
        return {f"past.{k}": v for k, v in self._update_past(layer, rows).items()}

    def _head(self, x: torch.Tensor, layer: int, criterion: str, threshold: float):
        head = self.model.head(layer)
        return exit_head(x, head.classifier.weight, head.classifier.bias, pooler_weight=head.pooler.weight,
                         pooler_bias=head.pooler.bias, criterion=criterion, threshold=threshold, backend=self.backend)

    def decide(self, layer, rows):
        m = self.model
        if layer == m.num_layers:  # the HF model's own head on its last [CLS] state
            out = self._head(rows.hidden[:, 0], layer, self.criterion, self.threshold)
            return ExitDecision(out.logits, out.exit, {})
        s_i = m.summary(rows.hidden, rows.valid)
        if m.strategy == "voting":
            return self._decide_voting(layer, s_i, rows.state)
        if m.strategy == "ensemble":
            return self._decide_ensemble(layer, s_i, rows.state)
        past = self._update_past(layer, rows)
        s_p = m.past_pool.read(past, layer)  # eq. 1, incrementally
        approx = m.imitation.future(s_i, layer)  # eq. 2 for j = i+1..n: one matmul
        s_f = m.future_pool(approx)  # eq. 6
        z = m.gate(s_p, s_f)  # eq. 7-8
        out = self._head(z, layer, self.criterion, self.threshold)  # pooler + classifier + entropy + exit, fused
        return ExitDecision(out.logits, out.exit, {f"past.{k}": v for k, v in past.items()})

    def _decide_voting(self, layer, s_i, state):
        # The exit decision is the layer's own confidence (the vote shares of one exit would
        # have zero entropy); the prediction is the majority of the exits so far (ties: the
        # lowest class index).
        out = self._head(s_i, layer, self.criterion, self.threshold)
        valid = (out.pred >= 0).float()[:, None]
        votes = state["votes"].scatter_add(1, out.pred.clamp(min=0)[:, None], valid)
        return ExitDecision(votes / self._exit_index[layer], out.exit, {"votes": votes})

    def _decide_ensemble(self, layer, s_i, state):
        out = self._head(s_i, layer, "entropy", 0.0)  # logits only; the exit is on the mean
        prob_sum = state["prob_sum"] + torch.softmax(out.logits, dim=1)
        p = prob_sum / self._exit_index[layer]
        if self.criterion == "entropy":
            exit_ = -torch.special.xlogy(p, p).sum(dim=1) < self.threshold
        else:
            exit_ = p.amax(dim=1) >= self.threshold
        exit_ = exit_ & torch.isfinite(p).all(dim=1)
        return ExitDecision(torch.log(p), exit_, {"prob_sum": prob_sum})


def convert(model: nn.Module, strategy: str = "concat", exit_layers: Optional[Sequence[int]] = None,
            num_labels: Optional[int] = None, init: str = "copy", exit_pooling: str = "cls") -> PastFutureModel:
    """Make a :class:`PastFutureModel` from an HF BERT/RoBERTa/ALBERT classifier or base
    model (a base model needs ``num_labels``), reusing its modules and weights.

    ``strategy``: ``max | avg | attn | concat | lstm`` (Past-Future with that G) or the
    baselines ``voting | ensemble``.
    """
    if strategy not in METHODS:
        raise ValueError(f"convert: unknown strategy {strategy!r}; choose one of {METHODS}")
    return _convert_early_exit(model, exit_layers=exit_layers, num_labels=num_labels, init=init, cls=PastFutureModel,
                               strategy=strategy, exit_pooling=exit_pooling)
