"""CascadeBERT: a cascade of complete models of growing depth (cascadebert.txt).

A :class:`CascadeModel` holds n complete HF sequence classifiers M_1..M_n sorted by depth
L_1 < ... < L_n (e.g. a 2-layer and a 12-layer BERT). Inference follows Algorithm 1: run
M_1; an instance whose confidence c(x) = max_y Pr(y|x) (eq. 4) exceeds the threshold tau
is emitted; the others go on to M_2, and so on; M_n emits whatever reaches it.

Unlike the public code (which runs every model on every input and routes afterwards, so
it saves nothing), :meth:`CascadeModel.early_exit` really skips the work: the layer loop
runs the members in sequence on the rows still active only
(:class:`~eekernels.engine.cascade.CascadeExecutor`); each member's own head (pooler +
classifier) and the exit decision go through the fused :func:`eekernels.ops.exit_head`
op (criterion "max_prob", :class:`CascadeRule`); the emitted rows are written to their
batch positions and the rest (input ids, masks, batch positions) compacted before the
next member runs.

Speed-up (section 4.1): every layer run in every model tried counts. A sample that leaves
the 2-layer model counts 2 layers; one that also runs the 12-layer model counts 2 + 12, so
``exit_layer`` in the output is *cumulative* and the layer speed-up is
``L_n * B / sum(exit_layer)``.

Training: each member is fine-tuned on its own (section 4.2 trains the complete models of
the suite separately), the largest first, then each smaller one with vanilla knowledge
distillation from it (section 5.4, for small members cut from a checkpoint rather than
pre-trained) and, with difficulty labels, ``lambda`` times the difficulty-aware margin loss
(DAR, section 3.2, eq. 5-6, :func:`eekernels.training.cascadebert.dar_margin_loss`) on its
confidences (:meth:`CascadeModel.set_training_member`, :meth:`CascadeModel.forward`). The
difficulty labels come from :func:`eekernels.training.cascadebert.kfold_difficulty_labels`
(K = 8 folds, 5 seeds in the paper); :mod:`eekernels.methods.registry` runs the schedule.

Section 5.4: without a separately pre-trained small model, :func:`truncate` builds one from
a checkpoint's first k layers, and :meth:`CascadeModel.from_first_layers` makes the cascade.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import metrics
from ..engine.cascade import CascadeExecutor
from ..engine.rules import ExitDecision, ExitRule
from ..hf.adapters import adapter_for
from ..models.base import EarlyExitBase, EarlyExitTrainOutput
from ..ops import exit_head

__all__ = [
    "CascadeModel",
    "CascadeRule",
    "CascadeTrainOutput",
    "simulate_cascade",
    "truncate",
]


# --------------------------------------------------------------------------- outputs


@dataclass
class CascadeTrainOutput(EarlyExitTrainOutput):
    """:class:`~eekernels.models.base.EarlyExitTrainOutput` of a cascade: ``exit_logits``
    [M, B, C] are every member's logits, smallest first; ``loss`` the sum of the members'
    task losses plus ``dar_weight`` times their DAR losses.

    Attributes:
        dar_loss: the summed DAR loss (before the weight), or None without difficulty labels.
    """

    dar_loss: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------- section 5.4


def truncate(model: nn.Module, k: int) -> nn.Module:
    """A new HF sequence classifier made of ``model``'s first ``k`` layers (cascadebert.txt 5.4).

    Embeddings, layers 1..k, pooler and classifier are copied (the result shares no
    parameters with ``model``); its config says ``num_hidden_layers = k``. Its output is
    what ``model``'s head gives on its k-th layer's hidden states, a starting point to
    fine-tune (the paper fine-tunes it, optionally with distillation from the big model).

    Supported: BERT, RoBERTa and ALBERT classifiers (ALBERT with ``num_hidden_groups == 1``,
    where every layer shares one set of weights).
    """
    adapter = adapter_for(model)  # validates the architecture
    n = adapter.num_layers
    if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k <= n):
        raise ValueError(f"truncate: k must be an int in [1, {n}], got {k!r}")
    cfg = copy.deepcopy(model.config)
    if cfg.model_type == "albert" and getattr(cfg, "num_hidden_groups", 1) != 1:
        raise ValueError("truncate: ALBERT with num_hidden_groups > 1 maps layers to groups by depth; "
                         "only num_hidden_groups == 1 can be truncated")
    cfg.num_hidden_layers = k
    small = type(model)(cfg)
    src = model.state_dict()
    dst = small.state_dict()
    missing = [name for name in dst if name not in src or src[name].shape != dst[name].shape]
    if missing:
        raise ValueError(f"truncate: {type(model).__name__} weights do not fit a {k}-layer copy: {missing[:5]}")
    small.load_state_dict({name: src[name] for name in dst}, strict=True)
    return small.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype).train(model.training)


# --------------------------------------------------------------------------- the model


def _check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"CascadeModel: threshold must be a number in [0, 1], got {threshold!r}") from None
    if math.isnan(t) or not (0.0 <= t <= 1.0):
        raise ValueError(f"CascadeModel: threshold tau must be in [0, 1] (max-prob confidence), got {threshold}")
    return t


def _strictly_above(tau: float) -> float:
    """The float32 threshold ``t`` with ``score >= t`` <=> ``score > tau`` for float32 scores.

    Algorithm 1 emits when c(x) > tau; the exit_head op's max_prob rule is ``score >=
    threshold`` (compared in float32), so we pass the next float32 above tau. tau = 1 then
    never fires (no probability exceeds 1).
    """
    t = torch.tensor(tau, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=torch.float32)))


class CascadeModel(EarlyExitBase):
    """A cascade of complete HF sequence classifiers of growing depth (cascadebert.txt 3.1).

    Args:
        members: the models M_1..M_n, smallest first: BERT / RoBERTa / ALBERT
            ``*ForSequenceClassification`` with strictly growing ``num_hidden_layers``, the
            same ``num_labels`` (>= 2: the confidence is a max class probability) and the
            same ``vocab_size`` (they read the same token ids: use one tokenizer).
        dar_weight: lambda, the weight of the DAR margin loss (the paper uses 0.5).
        confidence_margin: epsilon in eq. 5 (the paper grid-searches 0.1..0.7).
        kd_alpha, kd_temperature: vanilla KD of the smaller members from the largest
            (section 5.4: "a fine-tuned RoBERTa-2L with the vanilla KD (Hinton et al., 2015)"):
            loss ``(1 - alpha) CE + alpha T^2 KL(p_teacher^T || p_student^T)``. The paper
            gives neither value; 0.5 and 2.0 are the common vanilla-KD settings (0 turns KD off).

    The members stay ordinary HF models (``self.members[i]``), so each can be saved, loaded
    or evaluated on its own.

    ``early_exit(..., threshold=tau)``: a sample is emitted by a member when its max class
    probability is > tau (Algorithm 1); tau in [0, 1], 1 never fires (every sample goes to
    the largest member), 0 emits everything from the smallest. ``exit_layer`` is
    cumulative (2 for the 2-layer member, 2 + 12 for the 12-layer one after it);
    ``extras["exit_member"]`` (int64 [B]) names the member each sample was emitted by; a
    benchmark's ``exit_profile`` is in the units of ``exit_layer`` (pass ``exit_points[j]``
    to force member j).
    """

    method = "cascadebert"
    criteria = ("max_prob",)
    engines = ("rows",)
    default_thresholds = {"max_prob": 1.0}

    # The loss is a per-batch mean: HF Trainer must scale it for gradient accumulation
    # itself rather than pass num_items_in_batch (which forward would ignore).
    accepts_loss_kwargs = False

    def __init__(self, members: Sequence[nn.Module], dar_weight: float = 0.5, confidence_margin: float = 0.5,
                 kd_alpha: float = 0.5, kd_temperature: float = 2.0):
        super().__init__()
        if isinstance(members, nn.Module) or members is None:
            raise TypeError("CascadeModel: members must be a list of HF sequence classifiers")
        members = list(members)
        if not members:
            raise ValueError("CascadeModel: the cascade is empty; give at least one model")
        adapters = []
        for i, m in enumerate(members):
            try:
                adapters.append(adapter_for(m))
            except ValueError as e:
                raise ValueError(f"CascadeModel: member {i}: {e}") from None
        depths = [a.num_layers for a in adapters]
        if any(b <= a for a, b in zip(depths, depths[1:])):
            raise ValueError(f"CascadeModel: members must be sorted by strictly growing depth, got layers {depths}")
        labels = [m.config.num_labels for m in members]
        if len(set(labels)) != 1:
            raise ValueError(f"CascadeModel: members disagree on num_labels: {labels}")
        if labels[0] < 2:
            raise ValueError("CascadeModel: needs num_labels >= 2 (the exit confidence is a max class probability)")
        vocabs = [m.config.vocab_size for m in members]
        if len(set(vocabs)) != 1:
            raise ValueError(f"CascadeModel: members disagree on vocab_size {vocabs}; they must share one tokenizer")
        if not (float(dar_weight) >= 0):
            raise ValueError(f"CascadeModel: dar_weight must be >= 0, got {dar_weight}")
        if not (float(confidence_margin) >= 0):
            raise ValueError(f"CascadeModel: confidence_margin must be >= 0, got {confidence_margin}")
        if not 0.0 <= float(kd_alpha) <= 1.0:
            raise ValueError(f"CascadeModel: kd_alpha must be in [0, 1], got {kd_alpha}")
        if not float(kd_temperature) > 0:
            raise ValueError(f"CascadeModel: kd_temperature must be > 0, got {kd_temperature}")
        self.members = nn.ModuleList(members)
        self._adapters = adapters  # plain list (not modules), built and validated once
        self.dar_weight = float(dar_weight)
        self.confidence_margin = float(confidence_margin)
        self.kd_alpha, self.kd_temperature = float(kd_alpha), float(kd_temperature)
        self.training_member: Optional[int] = None

    # ------------------------------------------------------------------ structure
    @classmethod
    def from_first_layers(cls, model: nn.Module, layers: Sequence[int], **kwargs) -> "CascadeModel":
        """The cascade ``[truncate(model, k) for k in layers] + [model]`` (cascadebert.txt 5.4),
        for when no separately pre-trained small model exists. ``layers`` must be below the
        model's depth; ``model`` itself (not a copy) is the largest member."""
        n = adapter_for(model).num_layers
        ks = list(layers)
        if not ks or any(not isinstance(k, int) or not (1 <= k < n) for k in ks):
            raise ValueError(f"from_first_layers: layers must be a non-empty list of ints in [1, {n - 1}], got {layers}")
        return cls([truncate(model, k) for k in sorted(set(ks))] + [model], **kwargs)

    @property
    def config(self):
        """The largest member's config (HF ``Trainer`` reads a model's config)."""
        return self.members[-1].config

    def hf_models(self) -> Dict[str, nn.Module]:
        return {f"member_{j}": m for j, m in enumerate(self.members)}

    def options(self):
        return {"dar_weight": self.dar_weight, "confidence_margin": self.confidence_margin,
                "kd_alpha": self.kd_alpha, "kd_temperature": self.kd_temperature}

    @classmethod
    def from_hf_models(cls, hf_models, **options):
        members = [hf_models[k] for k in sorted(hf_models, key=lambda k: int(k.rsplit("_", 1)[1]))]
        return cls(members, **options)

    def max_positions(self):
        limits = [a.max_positions() for a in self._adapters if a.max_positions() is not None]
        return min(limits) if limits else None

    def check_rule(self, criterion, threshold):
        if threshold is not None:
            threshold = _check_threshold(threshold)  # tau in [0, 1]
        return super().check_rule(criterion, threshold)

    def threshold_bounds(self, criterion):
        return 0.0, 1.0

    # ------------------------------------------------------------------ inference seams
    def exit_rule(self, criterion, threshold, backend):
        return CascadeRule(self, threshold, backend)

    def layer_executor(self, name, engine):
        if name not in (None, "hf", "cascade"):
            raise ValueError(f"early_exit: a cascade runs its members' HF layers, not executor {name!r}")
        return CascadeExecutor(self._adapters)

    def speedups(self, exit_layer, seq_len, extras):
        """cascadebert.txt section 4.1 (every member tried counts) and the FLOPs of every
        member tried; adds ``exit_member`` to the extras."""
        member = torch.searchsorted(torch.tensor(self.exit_points), exit_layer)  # exit points strictly increase
        extras["exit_member"] = member
        shapes = [(a.num_layers, a.config.hidden_size, a.config.intermediate_size, self.num_labels)
                  for a in self._adapters]
        return self.layer_speedup(exit_layer), metrics.cascade_flops_speedup(member, seq_len, shapes)

    def layer_speedup(self, exit_layer):
        return metrics.cascade_layer_speedup(exit_layer, self.num_layers)

    def simulate_exits(self, exit_logits, criterion, threshold):
        return simulate_cascade(exit_logits, self.exit_points, threshold)

    @property
    def num_labels(self) -> int:
        return self.members[-1].config.num_labels

    @property
    def member_layers(self) -> List[int]:
        """Depth of each member, smallest first."""
        return [a.num_layers for a in self._adapters]

    @property
    def num_layers(self) -> int:
        """Depth of the largest (full) model: the reference of the speed-up."""
        return self.member_layers[-1]

    @property
    def exit_points(self) -> List[int]:
        """Cumulative layers run when a sample leaves each member (e.g. [2, 14] for 2 + 12)."""
        out, total = [], 0
        for n in self.member_layers:
            total += n
            out.append(total)
        return out

    # ------------------------------------------------------------------ training path
    def set_training_member(self, member: Optional[int]) -> None:
        """Which member the training path trains: ``None`` all of them jointly (the sum of
        their losses), or the index ``j`` of one member, trained on its own (its parameters
        alone require grad). The paper fine-tunes each complete model of the cascade
        separately (cascadebert.txt 4.2); :func:`eekernels.methods.registry` trains the
        largest member first, then each smaller one distilled from it (5.4)."""
        m = len(self.members)
        if member is not None and (not isinstance(member, int) or isinstance(member, bool) or not 0 <= member < m):
            raise ValueError(f"set_training_member: member must be None or an int in [0, {m - 1}], got {member!r}")
        self.training_member = member
        for j, mod in enumerate(self.members):
            for p in mod.parameters():
                p.requires_grad_(member is None or j == member)

    def head_parameters(self) -> List[nn.Parameter]:
        """Every member's pooler and classifier (new or re-initialised for the task): what
        ``--head-lr`` trains."""
        return [p for a in self._adapters for lin in (a.final_head().pooler, a.final_head().classifier)
                for p in lin.parameters()]

    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        """The largest member's logits as a fixed KD target: no grad, no dropout."""
        teacher = self.members[-1]
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                return teacher(**inputs).logits.float()
        finally:
            teacher.train(was)

    def _member_loss(self, j: int, z: torch.Tensor, labels: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Member j's task loss: cross-entropy, and for a smaller member with ``kd_alpha`` > 0
        vanilla KD from the largest member (cascadebert.txt 5.4, Hinton et al. 2015):
        ``(1 - alpha) CE + alpha T^2 KL(softmax(t / T) || softmax(z / T))``."""
        from ..nn.distillation import ensemble_distillation_loss

        ce = nn.functional.cross_entropy(z.float(), labels)
        if j == len(self.members) - 1 or self.kd_alpha == 0.0:
            return ce
        kd = ensemble_distillation_loss(z[None], self._teacher_logits(inputs), self.kd_temperature,
                                        "teacher_student")
        return (1.0 - self.kd_alpha) * ce + self.kd_alpha * kd

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                difficulty: Optional[torch.Tensor] = None, **unused) -> CascadeTrainOutput:
        """The members on the input (differentiable): the training path for HF ``Trainer``.

        With :meth:`set_training_member` ``None`` (the default) every member runs and the
        loss sums their task losses; with member ``j`` only member ``j`` runs (and the
        largest one, without grad, as its KD teacher) and the loss is its own; then
        ``exit_logits`` is [1, B, C] and ``logits`` member j's.

        Args:
            input_ids, attention_mask, token_type_ids: as for an HF classifier.
            labels: int [B]; each member's task loss is its cross-entropy, for the smaller
                members blended with KD from the largest (``kd_alpha``, ``kd_temperature``).
            difficulty: optional difficulty labels d(x) (1 difficult, 0 easy, -1 unknown).
                Shape [B]: the smallest member's labels (the paper's setting: difficulty is
                evaluated with the 2-layer model and regularizes it); [B, M]: one column per
                member. Adds ``dar_weight`` * the DAR margin loss (eq. 5-6) of each labelled
                member's max-prob confidences.
        """
        from ..training.cascadebert import dar_margin_loss

        m = len(self.members)
        if difficulty is not None:
            difficulty = torch.as_tensor(difficulty, device=input_ids.device)
            if difficulty.dim() == 1:
                if difficulty.shape[0] != input_ids.shape[0]:
                    raise ValueError(f"CascadeModel: difficulty has {difficulty.shape[0]} rows, input {input_ids.shape[0]}")
                pad = torch.full((difficulty.shape[0], m - 1), -1, dtype=difficulty.dtype, device=difficulty.device)
                difficulty = torch.cat([difficulty[:, None], pad], dim=1)
            if tuple(difficulty.shape) != (input_ids.shape[0], m):
                raise ValueError(f"CascadeModel: difficulty must be [B] or [B, {m}], got {tuple(difficulty.shape)}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        run = range(m) if self.training_member is None else [self.training_member]
        member_logits = {j: self.members[j](**inputs).logits for j in run}
        loss = dar = None
        if labels is not None:
            labels = labels.long()
            loss = sum(self._member_loss(j, z, labels, inputs) for j, z in member_logits.items())
        if difficulty is not None:
            terms = []
            for j, z in member_logits.items():
                if bool((difficulty[:, j] >= 0).any()):
                    conf = z.float().softmax(-1).max(-1).values  # c(x), eq. 4
                    terms.append(dar_margin_loss(conf, difficulty[:, j], self.confidence_margin))
            if terms:
                dar = sum(terms)
                if loss is not None:
                    loss = loss + self.dar_weight * dar  # lambda (section 3.2)
        stacked = torch.stack(list(member_logits.values()))
        return CascadeTrainOutput(loss=loss, logits=stacked[-1], exit_logits=stacked, dar_loss=dar)


class CascadeRule(ExitRule):
    """Algorithm 1's decision at the end of each member: emit when the member's own
    confidence c(x) = max_y Pr(y|x) (eq. 4) is > tau; the largest member emits every row."""

    def __init__(self, model: CascadeModel, tau: float, backend: Optional[str] = None):
        self.model, self.backend = model, backend
        self.threshold = _strictly_above(tau)  # the op's max_prob rule is >=: the next float32 above tau

    def decide(self, step, rows):
        j = self.model.exit_points.index(step)
        head = self.model._adapters[j].final_head()
        out = exit_head(rows.hidden[:, 0], head.classifier.weight, head.classifier.bias,
                        pooler_weight=head.pooler.weight, pooler_bias=head.pooler.bias,
                        criterion="max_prob", threshold=self.threshold, backend=self.backend)
        return ExitDecision(out.logits, out.exit, {})


# --------------------------------------------------------------------------- calibration


def simulate_cascade(member_logits: torch.Tensor, exit_points: Sequence[int], threshold: float,
                     confidence: Optional[torch.Tensor] = None):
    """Algorithm 1 replayed on precomputed logits [M, B, C]: (cumulative exit_layer [B], logits [B, C]).

    Uses the same rule as :meth:`CascadeModel.early_exit` (max-prob > tau, compared in
    float32). ``confidence`` [M, B] (float32 max probabilities) may be passed to skip the softmax.
    """
    thr = _strictly_above(_check_threshold(threshold))
    m, b, _ = member_logits.shape
    if confidence is None:
        confidence = member_logits.float().softmax(-1).max(-1).values
    emit = confidence[:-1] >= thr  # [M-1, B]
    # the first member that emits, else the last one
    first = torch.where(emit.any(0), emit.float().argmax(0), torch.full((b,), m - 1)) if m > 1 \
        else torch.zeros(b, dtype=torch.long)
    out_layer = torch.tensor(list(exit_points), dtype=torch.long)[first]
    out_logits = member_logits[first, torch.arange(b)]
    return out_layer, out_logits
