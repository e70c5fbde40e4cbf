"""MPEE: multi-perspective early exit (mpee.txt, sections 3.1-3.2).

Two perspectives on one HF encoder classifier (BERT, RoBERTa, ALBERT):

- **token-wise** (eq. 5-8): after every layer up to the last pruning layer the class
  attention A_class (head mean of the [CLS] attention row) updates a memory
  ``A_m = (1-beta) A_m_prev + beta A_class`` (eq. 6; A_m starts at zero before layer 1);
  after each pruning layer (default 4, 7, 10, as the public MPEE code) the top
  ``ceil(keep_ratio * n)`` valid non-[CLS] tokens by memory stay (eq. 7, keep_ratio 0.7 =
  1 - R_ee) and the rest are fused into one token weighted by their raw class attention
  (eq. 8), with :func:`eekernels.ops.mpee_prune`. [CLS] always stays; padding is never
  kept nor fused.
- **layer-wise** (eq. 9-14): exit classifiers with tanh logits and no pooler (eq. 9:
  ``tanh(W h + b)`` on the layer's summary, :class:`MPEEExitHead`) and recycled
  classifier memory ``C_zm = (1-lam) C_zm_prev + lam C_z`` (eq. 10, lam 0.9; the first exit
  has no memory: C_zm = C_z; layers without an exit pass the memory on), trained with
  ``L = L_CE + L_KD`` (eq. 11-14) against an attention-combined teacher
  (:class:`eekernels.nn.distillation.AttentionTeacher`); inference exits on the entropy of
  softmax(C_zm) (``entropy < threshold``).

Exits sit after every layer by default (the paper puts a classifier "between every two
transformer layers", i.e. between each layer and the next); ``exit_layers`` chooses a
subset. By default the last exit is an eq. 9 classifier with memory like the others (the
paper's uniform classifiers, ``final_mpee_head=True``): the teacher (eq. 12) then combines
logits of one kind, all tanh-bounded, and the model run in full is this model's own
forward (:meth:`MPEEModel.full_model`). ``final_mpee_head=False`` keeps the HF model's own
pooler + classifier as the last exit (no tanh, no memory), so with pruning and exits
disabled the model's logits are the HF model's.

- ``model(input_ids, attention_mask, token_type_ids, labels)``: every layer with the
  pruning applied (differentiable reference path), every exit, and with labels the loss
  L_CE + L_KD (HF ``Trainer`` compatible). ``exit_logits`` are the C_zm the engine decides on.
- ``model.early_exit(...)``: batched inference, rows exiting at different layers while
  their tokens shrink (:func:`eekernels.engine.mpee.token_pruning_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .. import metrics
from ..engine.mpee import MPEEExecutor, TokenPruning, class_attention_memory
from ..engine.rules import ExitDecision, ExitRule, head_exit
from ..hf.adapters import HeadLinears
from ..hf.layer_parts import layer_parts
from ..models.base import EarlyExitTrainOutput
from ..models.early_exit import EarlyExitModel, convert
from ..nn.distillation import KD_DIRECTIONS, AttentionTeacher, mpee_loss
from ..ops import mpee_prune

__all__ = ["MPEEExitHead", "MPEEExitRule", "MPEEModel", "MPEETrainOutput", "convert_mpee"]


@dataclass
class MPEETrainOutput(EarlyExitTrainOutput):
    """:class:`~eekernels.models.early_exit.EarlyExitTrainOutput` plus the loss parts.

    Attributes:
        ce_loss, kd_loss: L_CE (eq. 11) and L_KD (eq. 13); ``loss`` = their sum (eq. 14)
            plus ``teacher_ce_loss``, the cross-entropy that trains the teacher's attention
            (see :mod:`eekernels.nn.distillation`).
        teacher_logits: [B, C] the attention-combined teacher t (eq. 12).
    """

    ce_loss: Optional[torch.Tensor] = None
    kd_loss: Optional[torch.Tensor] = None
    teacher_ce_loss: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None


class MPEEExitHead(nn.Module):
    """An MPEE exit classifier, mpee.txt eq. 9: ``C_z = tanh(W_z h + b_z)`` on the layer's
    summary (its [CLS] state or mean token), with no pooler; dropout on the input in training."""

    pooler = None

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.classifier = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.classifier(self.dropout(summary)))  # eq. 9


class MPEEExitRule(ExitRule):
    """MPEE's layer-wise exit through the fused exit head: tanh logits (eq. 9), classifier
    memory (eq. 10, per-row state ``memory`` the engine compacts) and the criterion
    (entropy by default, as the paper; max_prob and patience also work)."""

    def __init__(self, model: "MPEEModel", criterion: str = "entropy", threshold: float = 0.0,
                 backend: Optional[str] = None):
        self.model, self.criterion, self.threshold, self.backend = model, criterion, threshold, backend

    def decide(self, layer, rows):
        m = self.model
        state = rows.state
        mpee_head = m.is_mpee_exit(layer)
        memory = state.get("memory") if mpee_head else None
        out = head_exit(m, layer, rows, criterion=self.criterion, threshold=self.threshold, backend=self.backend,
                        tanh_logits=mpee_head, memory=memory, memory_lambda=m.lam if memory is not None else 1.0,
                        prev_pred=state.get("prev_pred"), counter=state.get("counter"))
        new_state = {"memory": out.logits}  # C_zm of this exit: the next exit's memory
        if self.criterion == "patience":
            new_state.update(prev_pred=out.pred, counter=out.counter)
        return ExitDecision(out.logits, out.exit, new_state)


class MPEEModel(EarlyExitModel):
    """An HF encoder classifier with MPEE's token-wise and layer-wise exits.

    Args:
        hf_model: a BERT/RoBERTa/ALBERT ``*ForSequenceClassification`` (kept as ``self.hf``,
            weights reused); ``num_labels`` >= 2 (MPEE is a classification method).
        exit_layers: 1-based layers with an exit (default every layer; the last is always one).
        prune_layers: layers after which tokens are pruned (default 4, 7, 10); each within
            [1, num_layers - 1].
        keep_ratio: fraction of valid non-[CLS] tokens kept at each pruning (1 - R_ee), (0, 1].
        beta: class-attention memory weight (eq. 6), default 0.5.
        lam: classifier-memory weight lambda (eq. 10), default 0.9.
        temperature: distillation temperature tau (eq. 13; not given in the paper), default 1.
        kd_direction: "student_teacher" (eq. 13 as printed) or "teacher_student".
        teacher_dim: hidden size of the teacher's attention (eq. 12), default max(16, 4C).
        final_mpee_head: the last exit is an eq. 9 classifier with memory like the others
            (default True); False: the HF head as it is (no tanh, no memory).
        init: "copy" (the exit classifiers start from the HF classifier's weights) or "random".
    """

    method = "mpee"
    engines = ("rows",)

    def __init__(self, hf_model: nn.Module, exit_layers: Optional[Sequence[int]] = None,
                 prune_layers: Sequence[int] = (4, 7, 10), keep_ratio: float = 0.7, beta: float = 0.5,
                 lam: float = 0.9, temperature: float = 1.0, kd_direction: str = "student_teacher",
                 teacher_dim: Optional[int] = None, final_mpee_head: bool = True, init: str = "copy",
                 exit_pooling: str = "cls"):
        super().__init__(hf_model, exit_layers=exit_layers, init=init, loss_weighting="sum", exit_pooling=exit_pooling)
        n, c = self.num_layers, self.num_labels
        if c < 2:
            raise ValueError(f"MPEE is a classification method (tanh logits, cross-entropy): num_labels must be >= 2, got {c}")
        prune = sorted(set(int(p) for p in prune_layers))
        if prune and (prune[0] < 1 or prune[-1] >= n):
            raise ValueError(f"prune_layers must be within [1, {n - 1}] for a {n}-layer model (tokens are pruned "
                             f"after these layers), got {tuple(prune_layers)}")
        self.pruning = TokenPruning(tuple(prune), keep_ratio, beta)
        if not (0.0 <= float(lam) <= 1.0):
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kd_direction not in KD_DIRECTIONS:
            raise ValueError(f"kd_direction must be one of {KD_DIRECTIONS}, got {kd_direction!r}")
        self.lam, self.temperature, self.kd_direction = float(lam), float(temperature), kd_direction
        self.final_mpee_head = bool(final_mpee_head)
        final = self.adapter.final_head()
        ref = final.classifier.weight
        dropout = getattr(self.config, "classifier_dropout", None)
        dropout = dropout if dropout is not None else getattr(self.config, "hidden_dropout_prob", 0.1)
        mpee_layers = [l for l in self.exit_layers if self.is_mpee_exit(l)]
        self.heads = nn.ModuleDict()  # eq. 9's classifiers replace the pooled exit heads
        for l in mpee_layers:
            head = MPEEExitHead(self.config.hidden_size, c, dropout)
            if init == "copy":
                head.classifier.load_state_dict(final.classifier.state_dict())
            self.heads[str(l)] = head.to(device=ref.device, dtype=ref.dtype)
        self.teacher = AttentionTeacher(c, teacher_dim).to(device=ref.device)
        self.teacher_dim = self.teacher.proj.out_features
        self.train(hf_model.training)  # the new modules follow the HF model's mode
        # plain list, not submodules: the pieces reuse the HF layers' modules and weights
        self._parts = [layer_parts(self.adapter, i) for i in range(n)]

    # ------------------------------------------------------------------ structure
    @property
    def prune_layers(self):
        return self.pruning.prune_layers

    @property
    def keep_ratio(self) -> float:
        return self.pruning.keep_ratio

    @property
    def beta(self) -> float:
        return self.pruning.beta

    def is_mpee_exit(self, layer: int) -> bool:
        """Whether the exit after ``layer`` uses tanh logits and classifier memory."""
        return layer != self.num_layers or self.final_mpee_head

    def head(self, layer: int) -> HeadLinears:
        """The exit after ``layer``: eq. 9's classifier (no pooler), or the HF head at the last
        layer with ``final_mpee_head=False``."""
        if not self.is_mpee_exit(layer):
            return self.adapter.final_head()
        h = self.heads[str(layer)]
        return HeadLinears(None, h.classifier, h.dropout)

    def exit_summary(self, layer: int, hidden: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.is_mpee_exit(layer):
            return hidden[:, 0]
        return self.summary(hidden, valid)

    def exit_input(self, layer: int, hidden: torch.Tensor, valid: Optional[torch.Tensor]):
        if self.is_mpee_exit(layer) and self.exit_pooling == "mean":
            return hidden, {"pooling": "mean", "token_mask": valid}  # the op takes the mean
        return self.exit_summary(layer, hidden, valid), {}

    def full_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the model predicts when no exit fires: the last exit's C_zm, float32 [B, C]."""
        if not self.final_mpee_head:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).logits.float()
        return self._run(input_ids, attention_mask, token_type_ids)[-1].float()

    def full_model(self) -> nn.Module:
        """The full-model baseline: this model's own full forward (its last exit reads the
        classifier memory), or the HF model with ``final_mpee_head=False``."""
        from .past_future import _FullForward

        return _FullForward(self) if self.final_mpee_head else self.hf

    def sequence_widths(self, seq_len: int):
        """Padded sequence width entering each layer for inputs of width ``seq_len``."""
        return self.pruning.widths(seq_len, self.num_layers)

    def options(self) -> dict:
        """The constructor options (what :meth:`save_pretrained` records)."""
        return dict(exit_layers=self.exit_layers, prune_layers=list(self.prune_layers), keep_ratio=self.keep_ratio,
                    beta=self.beta, lam=self.lam, temperature=self.temperature, kd_direction=self.kd_direction,
                    teacher_dim=self.teacher_dim, final_mpee_head=self.final_mpee_head, exit_pooling=self.exit_pooling)

    # ------------------------------------------------------------------ inference seams
    def exit_rule(self, criterion, threshold, backend):
        return MPEEExitRule(self, criterion, threshold, backend)

    def layer_executor(self, name, engine):
        if name not in (None, "mpee"):
            raise ValueError(f"early_exit: MPEE's token pruning runs on its own executor 'mpee', not {name!r}")
        return MPEEExecutor(self.adapter, self.pruning, self._parts)

    def speedups(self, exit_layer, seq_len, extras):
        """Layer speed-up, and FLOPs speed-up counting each sample's shrinking sequence
        (mpee.txt eq. 15), its exit heads, class attention and fusion."""
        n, c = self.num_layers, self.num_labels
        prune = set(self.pruning.active_layers(n))
        last_memory_layer = max(prune) if prune else 0
        tokens = metrics.mpee_token_counts(seq_len, n, prune, self.keep_ratio)
        hsz, inter, _ = self.adapter.shape()
        layer_ids = torch.arange(1, n + 1)
        # class attention (q_cls . k, 2*n*H) up to the last pruning layer, fusion (2*n*H) at pruning layers
        extra = 2.0 * tokens.double() * hsz * ((layer_ids <= last_memory_layer).double()
                                                + torch.tensor([float(l in prune) for l in layer_ids.tolist()]))
        # eq. 9's classifiers have no pooler; with final_mpee_head=False the full model's head
        # (HF's) has one, and the internal heads are counted alike (a slight overcount)
        flops = metrics.flops_speedup_tokens(exit_layer, tokens, seq_len, hsz, inter, c,
                                             sorted(set(self.exit_layers) | {n}), pooler=not self.final_mpee_head,
                                             extra_flops=extra)
        return self.layer_speedup(exit_layer), flops

    # ------------------------------------------------------------------ training path
    def _exit_logits(self, layer: int, hidden: torch.Tensor, valid: torch.Tensor, memory: Optional[torch.Tensor],
                     input_ids, attention_mask):
        """(C_zm, next memory) of the exit after ``layer`` (differentiable, float32)."""
        if not self.is_mpee_exit(layer):
            return self.final_logits(hidden, input_ids, attention_mask).float(), memory
        z = self.heads[str(layer)](self.summary(hidden, valid)).float()  # eq. 9
        zm = z if memory is None else (1.0 - self.lam) * memory + self.lam * z  # eq. 10
        return zm, zm

    def _run(self, input_ids, attention_mask, token_type_ids, trace: Optional[list] = None):
        """The layers with token pruning; returns each exit's C_zm (a list of [B, C])."""
        if input_ids.dim() != 2:
            raise ValueError(f"MPEEModel: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"MPEEModel: attention_mask must be [{b}, {s}], got {tuple(attention_mask.shape)}")
        n = self.num_layers
        prune = set(self.pruning.active_layers(n))
        last_memory_layer = max(prune) if prune else 0
        hidden = self.adapter.embed(input_ids, token_type_ids)
        key_valid = None if attention_mask is None else attention_mask.to(torch.bool)
        valid = key_valid if key_valid is not None else torch.ones(b, s, dtype=torch.bool, device=hidden.device)
        amem = cmem = a_cls = None
        exit_logits = []
        for i in range(n):
            layer, p = i + 1, self._parts[i]
            if layer <= last_memory_layer:
                k, v = p.keys_values(hidden)
                q = p.queries(hidden)
                ctx = p.attention(q, k, v, key_valid)
                a_cls = p.class_attention(q[:, :, :1], k, key_valid)  # eq. 5
                amem = class_attention_memory(amem, a_cls.detach(), self.beta)  # eq. 6 (selection only)
                hidden = p.output(ctx, hidden)
            else:
                hidden = p(hidden, key_valid)
            if layer in self.exit_layers:
                z, cmem = self._exit_logits(layer, hidden, valid, cmem, input_ids, attention_mask)
                exit_logits.append(z)
            record = None
            if trace is not None:
                record = dict(layer=layer, width=hidden.shape[1], hidden=hidden, valid=valid, class_attention=a_cls if
                              layer <= last_memory_layer else None, memory=amem, pruned=None)
                trace.append(record)
            if layer in prune:
                pr = mpee_prune(hidden, valid, amem, a_cls, self.keep_ratio)  # eq. 7-8
                hidden, valid, amem = pr.hidden, pr.valid, pr.memory
                key_valid = valid
                if record is not None:
                    record["pruned"] = pr
        return exit_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> MPEETrainOutput:
        """Every layer with token pruning applied, every exit (differentiable) and, with
        ``labels`` [B], the loss L_CE + L_KD (mpee.txt eq. 14) plus the teacher's own
        cross-entropy (:func:`eekernels.nn.distillation.mpee_loss`)."""
        exit_logits = self._run(input_ids, attention_mask, token_type_ids)
        stacked = torch.stack(exit_logits)
        loss = ce = kd = teacher = None
        if labels is not None:
            parts = mpee_loss(stacked, labels, self.teacher, self.temperature, self.kd_direction)
            loss, ce, kd, tce, teacher = parts.loss, parts.ce, parts.kd, parts.teacher_ce, parts.teacher
        else:
            tce = None
        return MPEETrainOutput(loss=loss, logits=exit_logits[-1], exit_logits=stacked, ce_loss=ce, kd_loss=kd,
                               teacher_ce_loss=tce, teacher_logits=teacher)

    def trace_tokens(self, input_ids, attention_mask=None, token_type_ids=None) -> list:
        """What the token-wise exit does, layer by layer, on the forward path (no grad).

        Returns one dict per layer: ``layer``; ``width`` (padded width of the layer's
        output, before pruning); ``hidden`` (that output); ``valid`` bool [B, width] (the slots that are real tokens); ``class_attention``
        float32 [B, width] (eq. 5; None after the last pruning layer); ``memory`` (A_m after
        eq. 6); ``pruned`` (the :class:`~eekernels.ops.PrunedTokens` after a pruning layer, else None).
        """
        trace: list = []
        with torch.no_grad():
            self._run(input_ids, attention_mask, token_type_ids, trace)
        return trace


def convert_mpee(model: nn.Module, num_labels: Optional[int] = None, **options) -> MPEEModel:
    """Make an :class:`MPEEModel` from an HF BERT/RoBERTa/ALBERT classifier or base model.

    A base model (``BertModel``, ...) needs ``num_labels`` (a classification head is created,
    as :func:`eekernels.models.convert` does). ``options`` are :class:`MPEEModel`'s
    (exit_layers, prune_layers, keep_ratio, beta, lam, temperature, kd_direction,
    teacher_dim, final_mpee_head, init). The HF modules and weights are reused, not copied.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if hasattr(model, "embeddings") and hasattr(model, "encoder") and n is not None:
        model = convert(model, exit_layers=[n], num_labels=num_labels).hf  # builds the classifier
    elif num_labels is not None and num_labels != getattr(model.config, "num_labels", num_labels):
        raise ValueError(f"convert_mpee: model has num_labels={model.config.num_labels}, asked for {num_labels}")
    return MPEEModel(model, **options)
