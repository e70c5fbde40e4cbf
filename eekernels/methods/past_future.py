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

Inference (:class:`PastFutureRule`, run by :func:`eekernels.engine.early_exit_forward`)
never redoes the past: the past pooling advances one layer at a time through its
incremental form (running max / sum, one LSTM step, or the stack of past [CLS] states for
attn / concat), kept per active row in the rule's state, which the engine compacts with
the rows. The future of the remaining rows is one matmul against the stacked learner
weights, the merge is one lerp, and pooler + classifier + softmax + entropy + exit are one
call of the fused :func:`eekernels.ops.exit_head`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import metrics
from ..engine.batched import EarlyExitOutput, ExitDecision, ExitRule, early_exit_forward
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

_META_FILE = "past_future.json"
_WEIGHTS_FILE = "past_future.safetensors"
_FORMAT = "eekernels-past-future/1"


@dataclass
class PastFutureOutput(ModelOutput):
    """Output of the full (training) forward; a ``ModelOutput`` for HF ``Trainer``.

    Attributes:
        loss: ``L = L_ce + L_cos`` (eq. 13); for the baselines, L_ce alone (None without labels).
        logits: the last layer's logits [B, C] (the HF model's own head).
        exit_logits: [E, B, C], at every exit layer what the exit rule predicts there
            (for voting: the vote shares; for ensemble: log of the mean probabilities).
        ce_loss: L_ce, eq. 12.
        cos_loss: L_cos, eq. 5 (None for the baselines).
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    exit_logits: Optional[torch.Tensor] = None
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

    def __init__(self, hf_model: nn.Module, strategy: str = "concat", exit_layers: Optional[Sequence[int]] = None,
                 init: str = "copy"):
        if strategy not in METHODS:
            raise ValueError(f"PastFutureModel: unknown strategy {strategy!r}; choose one of {METHODS}")
        super().__init__(hf_model, exit_layers=exit_layers, init=init, loss_weighting="weighted")
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

    @property
    def is_baseline(self) -> bool:
        """True for the naive global strategies (voting, ensemble)."""
        return self.strategy in BASELINES

    def method_modules(self) -> List[nn.Module]:
        """The modules Past-Future adds to the exit heads (empty for the baselines)."""
        if self.is_baseline:
            return []
        return [self.past_pool, self.future_pool, self.imitation, self.gate]

    def set_training_stage(self, stage: str) -> None:
        """As :meth:`EarlyExitModel.set_training_stage`; the Past-Future modules train with the heads."""
        super().set_training_stage(stage)
        for m in self.method_modules():
            for p in m.parameters():
                p.requires_grad_(stage != "final")

    # ------------------------------------------------------------------ training path
    def _cls_states(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        ad = self.adapter
        hidden = ad.embed(input_ids, token_type_ids)
        mask = ad.attention_mask(attention_mask, hidden)
        states = []
        for i in range(self.num_layers):
            hidden = ad.layer(i)(hidden, mask)
            states.append(hidden[:, 0])
        return torch.stack(states, dim=1)  # [B, n, H]: s_1..s_n

    def _final_logits(self, s_n: torch.Tensor) -> torch.Tensor:
        f = self.adapter.final_head()
        return f.classifier(self._final_dropout(torch.tanh(f.pooler(s_n))))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> PastFutureOutput:
        """Every layer and every exit (differentiable); with ``labels`` the loss of eq. 13."""
        if input_ids.dim() != 2:
            raise ValueError(f"PastFutureModel: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        states = self._cls_states(input_ids, attention_mask, token_type_ids)
        n = self.num_layers
        internal = self.exit_layers[:-1]
        cos_loss = None
        if self.is_baseline:
            own = [self.heads[str(i)](states[:, i - 1]) for i in internal] + [self._final_logits(states[:, n - 1])]
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
            loss_logits.append(self._final_logits(states[:, n - 1]))
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
    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, *, criterion: str = "entropy",
                   threshold: float = 0.0, backend: Optional[str] = None,
                   exit_profile: Optional[torch.Tensor] = None) -> EarlyExitOutput:
        """Batched early-exit inference with :class:`PastFutureRule`.

        Args:
            criterion: "entropy" (the paper's, eq. 14: exit when the entropy of p_i is below
                ``threshold``) or "max_prob".
            threshold: the exit threshold (entropy 0: never exit before the last layer).
            backend: the ops' backend (default automatic).
            exit_profile: int [B] of 1-based layers for benchmarks, as in
                :func:`eekernels.engine.early_exit_forward`.

        Returns :class:`~eekernels.engine.batched.EarlyExitOutput`; its ``flops_speedup``
        counts the Past-Future extras (pooling, imitation, gate) at every exit run.
        """
        rule = PastFutureRule(self, criterion=criterion, threshold=threshold, backend=backend)
        out = early_exit_forward(self, input_ids, attention_mask, token_type_ids, backend=backend,
                                 exit_profile=exit_profile, rule=rule)
        b, s = input_ids.shape
        seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
        return dataclasses.replace(out, flops_speedup=self.flops_speedup(out.exit_layer.cpu(), seq_len))

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

    def flops_speedup(self, exit_layer: torch.Tensor, seq_len: torch.Tensor) -> float:
        """Full-model FLOPs over executed FLOPs, per sample, with the Past-Future exits'
        extra cost (:meth:`exit_extra_flops`) counted at every exit a sample ran."""
        cfg = self.config
        e = torch.as_tensor(exit_layer, dtype=torch.float64)
        per_layer = metrics.encoder_layer_flops(seq_len, cfg.hidden_size, cfg.intermediate_size)
        head = metrics.exit_head_flops(cfg.hidden_size, self.num_labels)
        exits = torch.tensor(self.exit_layers, dtype=torch.float64)
        cost = torch.tensor([head + self.exit_extra_flops(l) for l in self.exit_layers], dtype=torch.float64)
        heads_run = ((exits[None, :] <= e[:, None]).double() * cost[None, :]).sum(dim=1)
        full = (self.num_layers * per_layer + head).sum()
        return float(full / (e * per_layer + heads_run).sum())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str) -> None:
        """Save the HF model (its own format) plus the exit heads, Past-Future modules and settings."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.hf.save_pretrained(path)
        extra = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("hf.")}
        save_file(extra, os.path.join(path, _WEIGHTS_FILE))
        with open(os.path.join(path, _META_FILE), "w") as f:
            json.dump({"strategy": self.strategy, "exit_layers": self.exit_layers, "format": _FORMAT}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, **hf_kwargs) -> "PastFutureModel":
        """Load what :meth:`save_pretrained` wrote (local path; no download)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification

        meta_path = os.path.join(path, _META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} holds no {_META_FILE}: not saved by PastFutureModel.save_pretrained")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {_FORMAT!r}")
        hf = AutoModelForSequenceClassification.from_pretrained(path, **hf_kwargs)
        model = cls(hf, strategy=meta["strategy"], exit_layers=meta["exit_layers"], init="random")
        state = load_file(os.path.join(path, _WEIGHTS_FILE), device=str(hf.device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("hf.")]
        if missing or unexpected:
            raise ValueError(f"{path}: saved weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(hf.device)


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

    def _update_past(self, layer: int, hidden: torch.Tensor, state) -> Dict[str, torch.Tensor]:
        pool = self.model.past_pool
        past = {k[len("past."):]: v for k, v in state.items()}
        if layer <= pool.max_states:  # later layers feed no internal exit
            past = pool.update(past, hidden[:, 0], layer)
        return past

    def observe(self, layer, hidden, state):
        if self.model.is_baseline:
            return state
        return {f"past.{k}": v for k, v in self._update_past(layer, hidden, state).items()}

    def _head(self, x: torch.Tensor, layer: int, criterion: str, threshold: float):
        head = self.model.head(layer)
        return exit_head(x, head.classifier.weight, head.classifier.bias, pooler_weight=head.pooler.weight,
                         pooler_bias=head.pooler.bias, criterion=criterion, threshold=threshold, backend=self.backend)

    def decide(self, layer, hidden, state):
        m = self.model
        if layer == m.num_layers:  # the HF model's own head on its last [CLS] state
            out = self._head(hidden[:, 0], layer, self.criterion, self.threshold)
            return ExitDecision(out.logits, out.exit, {})
        if m.strategy == "voting":
            return self._decide_voting(layer, hidden, state)
        if m.strategy == "ensemble":
            return self._decide_ensemble(layer, hidden, state)
        past = self._update_past(layer, hidden, state)
        s_p = m.past_pool.read(past, layer)  # eq. 1, incrementally
        approx = m.imitation.future(hidden[:, 0], layer)  # eq. 2 for j = i+1..n: one matmul
        s_f = m.future_pool(approx)  # eq. 6
        z = m.gate(s_p, s_f)  # eq. 7-8
        out = self._head(z, layer, self.criterion, self.threshold)  # pooler + classifier + entropy + exit, fused
        return ExitDecision(out.logits, out.exit, {f"past.{k}": v for k, v in past.items()})

    def _decide_voting(self, layer, hidden, state):
        # The exit decision is the layer's own confidence (the vote shares of one exit would
        # have zero entropy); the prediction is the majority of the exits so far (ties: the
        # lowest class index).
        out = self._head(hidden[:, 0], layer, self.criterion, self.threshold)
        valid = (out.pred >= 0).float()[:, None]
        votes = state["votes"].scatter_add(1, out.pred.clamp(min=0)[:, None], valid)
        return ExitDecision(votes / self._exit_index[layer], out.exit, {"votes": votes})

    def _decide_ensemble(self, layer, hidden, state):
        out = self._head(hidden[:, 0], layer, "entropy", 0.0)  # logits only; the exit is on the mean
        prob_sum = state["prob_sum"] + torch.softmax(out.logits, dim=1)
        p = prob_sum / self._exit_index[layer]
        if self.criterion == "entropy":
            exit_ = -torch.special.xlogy(p, p).sum(dim=1) < self.threshold
        else:
            exit_ = p.amax(dim=1) >= self.threshold
        exit_ = exit_ & torch.isfinite(p).all(dim=1)
        return ExitDecision(torch.log(p), exit_, {"prob_sum": prob_sum})


def convert(model: nn.Module, strategy: str = "concat", exit_layers: Optional[Sequence[int]] = None,
            num_labels: Optional[int] = None, init: str = "copy") -> PastFutureModel:
    """Make a :class:`PastFutureModel` from an HF BERT/RoBERTa/ALBERT classifier or base
    model (a base model needs ``num_labels``), reusing its modules and weights.

    ``strategy``: ``max | avg | attn | concat | lstm`` (Past-Future with that G) or the
    baselines ``voting | ensemble``.
    """
    if strategy not in METHODS:
        raise ValueError(f"convert: unknown strategy {strategy!r}; choose one of {METHODS}")
    base = _convert_early_exit(model, exit_layers=exit_layers, num_labels=num_labels, init=init)
    return PastFutureModel(base.hf, strategy=strategy, exit_layers=exit_layers, init=init)
