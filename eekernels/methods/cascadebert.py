"""CascadeBERT: a cascade of complete models of growing depth (cascadebert.txt).

A :class:`CascadeModel` holds n complete HF sequence classifiers M_1..M_n sorted by depth
L_1 < ... < L_n (e.g. a 2-layer and a 12-layer BERT). Inference follows Algorithm 1: run
M_1; an instance whose confidence c(x) = max_y Pr(y|x) (eq. 4) exceeds the threshold tau
is emitted; the others go on to M_2, and so on; M_n emits whatever reaches it.

Unlike the public code (which runs every model on every input and routes afterwards, so
it saves nothing), :meth:`CascadeModel.early_exit` really skips the work: each member runs
on the rows still active only; its own head (pooler + classifier) and the exit decision go
through the fused :func:`eekernels.ops.exit_head` op (criterion "max_prob"); the emitted
rows are written to their batch positions with :func:`eekernels.ops.scatter_exits`; the
rest (input ids, masks, batch positions) are compacted with
:func:`eekernels.ops.compact_rows` before the next member runs.

Speed-up (section 4.1): every layer run in every model tried counts. A sample that leaves
the 2-layer model counts 2 layers; one that also runs the 12-layer model counts 2 + 12, so
``exit_layer`` in the output is *cumulative* and the layer speed-up is
``L_n * B / sum(exit_layer)``.

Training (section 3.2): :meth:`CascadeModel.forward` sums every member's cross-entropy and,
with difficulty labels, ``lambda`` times the difficulty-aware margin loss (DAR, eq. 5-6,
:func:`eekernels.training.cascadebert.dar_margin_loss`) on each member's confidences. The
difficulty labels come from :func:`eekernels.training.cascadebert.kfold_difficulty_labels`.

Section 5.4: without a separately pre-trained small model, :func:`truncate` builds one from
a checkpoint's first k layers, and :meth:`CascadeModel.from_first_layers` makes the cascade.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import metrics
from ..engine.batched import EarlyExitOutput
from ..models.backbones import adapter_for
from ..ops import compact_rows, exit_head, scatter_exits

__all__ = [
    "CascadeExitOutput",
    "CascadeModel",
    "CascadeTrainOutput",
    "calibrate_cascade",
    "cascade_exit_profile",
    "simulate_cascade",
    "truncate",
]

_META_FILE = "cascade.json"
_FORMAT = "eekernels-cascade/1"


# --------------------------------------------------------------------------- outputs


@dataclass
class CascadeTrainOutput(ModelOutput):
    """Output of :meth:`CascadeModel.forward`; a ``ModelOutput``, so HF ``Trainer`` reads it.

    Attributes:
        loss: sum of the members' task losses plus ``dar_weight`` times their DAR losses
            (None without labels).
        logits: the largest member's logits [B, C].
        member_logits: every member's logits [M, B, C], smallest first.
        dar_loss: the summed DAR loss (before the weight), or None without difficulty labels.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    member_logits: Optional[torch.Tensor] = None
    dar_loss: Optional[torch.Tensor] = None


@dataclass
class CascadeExitOutput(EarlyExitOutput):
    """:class:`~eekernels.engine.batched.EarlyExitOutput` of a cascade.

    ``exit_layer`` counts the layers run in every member tried (cumulative: 2 for the
    2-layer member, 2 + 12 for the 12-layer one after it); ``layer_speedup`` is
    cascadebert.txt section 4.1 and ``flops_speedup`` the largest member's FLOPs over the
    FLOPs executed (each member tried: its layers and its head).

    Extra attribute:
        exit_member: int64 [B], 0-based index of the member each sample was emitted by.
    """

    exit_member: Optional[torch.Tensor] = None


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


class CascadeModel(nn.Module):
    """A cascade of complete HF sequence classifiers of growing depth (cascadebert.txt 3.1).

    Args:
        members: the models M_1..M_n, smallest first: BERT / RoBERTa / ALBERT
            ``*ForSequenceClassification`` with strictly growing ``num_hidden_layers``, the
            same ``num_labels`` (>= 2: the confidence is a max class probability) and the
            same ``vocab_size`` (they read the same token ids: use one tokenizer).
        dar_weight: lambda, the weight of the DAR margin loss (the paper uses 0.5).
        confidence_margin: epsilon in eq. 5 (the paper grid-searches 0.1..0.7).

    The members stay ordinary HF models (``self.members[i]``), so each can be saved, loaded
    or evaluated on its own.
    """

    # The loss is a per-batch mean: HF Trainer must scale it for gradient accumulation
    # itself rather than pass num_items_in_batch (which forward would ignore).
    accepts_loss_kwargs = False

    def __init__(self, members: Sequence[nn.Module], dar_weight: float = 0.5, confidence_margin: float = 0.5):
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
        self.members = nn.ModuleList(members)
        self._adapters = adapters  # plain list (not modules), built and validated once
        self.dar_weight = float(dar_weight)
        self.confidence_margin = float(confidence_margin)

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
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                difficulty: Optional[torch.Tensor] = None, **unused) -> CascadeTrainOutput:
        """Every member on every input (differentiable): the training path for HF ``Trainer``.

        Args:
            input_ids, attention_mask, token_type_ids: as for an HF classifier.
            labels: int [B]; the loss is the sum of the members' cross-entropies.
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
        member_logits = []
        for member in self.members:
            kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            member_logits.append(member(input_ids=input_ids, attention_mask=attention_mask, **kw).logits)
        loss = dar = None
        if labels is not None:
            labels = labels.long()
            loss = sum(nn.functional.cross_entropy(z.float(), labels) for z in member_logits)
        if difficulty is not None:
            terms = []
            for j, z in enumerate(member_logits):
                if bool((difficulty[:, j] >= 0).any()):
                    conf = z.float().softmax(-1).max(-1).values  # c(x), eq. 4
                    terms.append(dar_margin_loss(conf, difficulty[:, j], self.confidence_margin))
            if terms:
                dar = sum(terms)
                if loss is not None:
                    loss = loss + self.dar_weight * dar
        return CascadeTrainOutput(loss=loss, logits=member_logits[-1], member_logits=torch.stack(member_logits),
                                  dar_loss=dar)

    # ------------------------------------------------------------------ inference
    def _member_forward(self, j: int, input_ids, attention_mask, token_type_ids):
        """Member j's final hidden states [N, S, H] on the given rows (no head)."""
        ad = self._adapters[j]
        hidden = ad.embed(input_ids, token_type_ids)
        mask = ad.attention_mask(attention_mask, hidden)
        for i in range(ad.num_layers):
            hidden = ad.layer(i)(hidden, mask)
        return hidden

    def early_exit(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   token_type_ids: Optional[torch.Tensor] = None, *, threshold: float,
                   backend: Optional[str] = None, exit_profile: Optional[torch.Tensor] = None) -> CascadeExitOutput:
        """Batched cascade exiting (Algorithm 1) that computes each member on the active rows only.

        Args:
            input_ids: int64 [B, S].
            attention_mask: [B, S] (1 = token, 0 = padding) or None.
            token_type_ids: [B, S] or None.
            threshold: tau in [0, 1]; a sample is emitted by a member when its max class
                probability is > tau (Algorithm 1). tau = 1 never fires (every sample goes
                to the largest member); tau = 0 emits everything from the smallest.
            backend: the ops' backend (default: automatic).
            exit_profile: for benchmarks, int [B] of cumulative layer budgets (the units of
                ``exit_layer``): row i is emitted by the first member whose cumulative depth
                (``self.exit_points``) is >= exit_profile[i]. Every member's head still runs
                on the rows that reach it; only its decision is replaced. To force member j
                pass ``exit_points[j]``.

        Returns:
            :class:`CascadeExitOutput` (an ``EarlyExitOutput``): logits, cumulative
            ``exit_layer``, pred, layer/FLOPs speed-ups, ``layers_run``, ``exit_member``.
        """
        tau = _check_threshold(threshold)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"early_exit: input_ids must be a [B, S] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        b, s = input_ids.shape
        if b == 0:
            raise ValueError("early_exit: empty batch")
        for j, member in enumerate(self.members):
            max_pos = getattr(member.config, "max_position_embeddings", None)
            if max_pos is not None and s > max_pos:
                raise ValueError(f"early_exit: sequence length {s} exceeds member {j}'s max_position_embeddings "
                                 f"{max_pos}; truncate the input")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"early_exit: {name} must be [{b}, {s}], got {tuple(t.shape)}")
        if exit_profile is not None and tuple(torch.as_tensor(exit_profile).shape) != (b,):
            raise ValueError(f"early_exit: exit_profile must be [{b}], got {tuple(torch.as_tensor(exit_profile).shape)}")
        thr_op = _strictly_above(tau)
        dev = input_ids.device
        points = self.exit_points
        n_members = len(self.members)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out_logits = torch.empty(b, self.num_labels, dtype=torch.float32, device=dev)
                out_layer = torch.zeros(b, dtype=torch.int64, device=dev)
                # the per-row inputs that follow the active rows from member to member
                rows = {"input_ids": input_ids, "batch_index": torch.arange(b, device=dev)}
                if attention_mask is not None:
                    rows["attention_mask"] = attention_mask
                if token_type_ids is not None:
                    rows["token_type_ids"] = token_type_ids
                if exit_profile is not None:
                    rows["forced"] = torch.as_tensor(exit_profile).to(device=dev, dtype=torch.int64)
                layers_run = 0
                for j in range(n_members):
                    n_active = rows["input_ids"].shape[0]
                    layers_run += n_active * self.member_layers[j]
                    hidden = self._member_forward(j, rows["input_ids"], rows.get("attention_mask"),
                                                  rows.get("token_type_ids"))
                    head = self._adapters[j].final_head()
                    # eq. 4 and Algorithm 1: c(x) = max_y Pr(y|x) from M_j's own head; exit if c(x) > tau
                    dec = exit_head(hidden[:, 0], head.classifier.weight, head.classifier.bias,
                                    pooler_weight=head.pooler.weight, pooler_bias=head.pooler.bias,
                                    criterion="max_prob", threshold=thr_op, backend=backend)
                    last = j == n_members - 1
                    if last:
                        emit = torch.ones_like(dec.exit)  # the largest member emits what reaches it
                    elif "forced" in rows:
                        emit = rows["forced"] <= points[j]
                    else:
                        emit = dec.exit
                    scatter_exits(out_logits, out_layer, rows["batch_index"], emit, dec.logits, points[j],
                                  backend=backend)
                    if last:
                        break
                    packed = compact_rows(~emit, list(rows.values()), backend=backend)
                    if packed.index.numel() == 0:
                        break
                    rows = dict(zip(rows, packed.tensors))
        finally:
            self.train(was_training)
        el = out_layer.cpu()
        member = torch.searchsorted(torch.tensor(points), el)  # exit points are strictly increasing
        seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
        shapes = [(a.num_layers, a.config.hidden_size, a.config.intermediate_size, self.num_labels)
                  for a in self._adapters]
        return CascadeExitOutput(
            logits=out_logits,
            exit_layer=out_layer,
            pred=out_logits.argmax(dim=1),
            layer_speedup=metrics.cascade_layer_speedup(el, self.num_layers),
            flops_speedup=metrics.cascade_flops_speedup(member, seq_len, shapes),
            layers_run=layers_run,
            exit_member=member.to(dev),
        )

    @torch.no_grad()
    def member_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      token_type_ids: Optional[torch.Tensor] = None, batch_size: int = 64,
                      progress: bool = False) -> torch.Tensor:
        """Every member's float32 logits [M, B, C] on a data set (eval mode, no exits): what
        calibration replays Algorithm 1 on."""
        from tqdm import tqdm

        was = self.training
        self.eval()
        chunks = []
        try:
            for st in tqdm(range(0, input_ids.shape[0], batch_size), desc="cascade forward", disable=not progress):
                sl = slice(st, st + batch_size)
                out = self(input_ids[sl], None if attention_mask is None else attention_mask[sl],
                           None if token_type_ids is None else token_type_ids[sl])
                chunks.append(out.member_logits.float().cpu())
        finally:
            self.train(was)
        return torch.cat(chunks, dim=1)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str) -> None:
        """One subfolder per member (``member_0`` smallest, HF format) plus ``cascade.json``."""
        os.makedirs(path, exist_ok=True)
        names = []
        for j, member in enumerate(self.members):
            name = f"member_{j}"
            member.save_pretrained(os.path.join(path, name))
            names.append(name)
        with open(os.path.join(path, _META_FILE), "w") as f:
            json.dump({"format": _FORMAT, "members": names, "member_layers": self.member_layers,
                       "dar_weight": self.dar_weight, "confidence_margin": self.confidence_margin}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, **hf_kwargs) -> "CascadeModel":
        """Load what :meth:`save_pretrained` wrote (local path; ``hf_kwargs`` go to every
        member's ``AutoModelForSequenceClassification.from_pretrained``)."""
        from transformers import AutoModelForSequenceClassification

        meta_path = os.path.join(path, _META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} holds no {_META_FILE}: not saved by CascadeModel.save_pretrained")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {_FORMAT!r}")
        members = [AutoModelForSequenceClassification.from_pretrained(os.path.join(path, name), **hf_kwargs)
                   for name in meta["members"]]
        model = cls(members, dar_weight=meta["dar_weight"], confidence_margin=meta["confidence_margin"])
        if model.member_layers != meta["member_layers"]:
            raise ValueError(f"{meta_path}: members have {model.member_layers} layers, json says {meta['member_layers']}")
        return model.eval()


# --------------------------------------------------------------------------- benchmark profiles


def cascade_exit_profile(batch: int, exit_points: Sequence[int], fractions: Sequence[float]) -> torch.Tensor:
    """An ``exit_profile`` [B] for :meth:`CascadeModel.early_exit` (benchmarks).

    ``fractions[j]`` is the share of the batch emitted by member j (one entry per member but
    the last, which takes the rest; their sum must be <= 1). Row i takes the quantile
    (i + 0.5) / B, so every batch size gets the same distribution (as the single-model
    profiles of the e2e benchmark). Returns the cumulative layer budgets ``exit_points[j]``.
    """
    pts = list(exit_points)
    fr = [float(f) for f in fractions]
    if batch < 1:
        raise ValueError(f"cascade_exit_profile: batch must be >= 1, got {batch}")
    if len(fr) != len(pts) - 1 or any(not (0.0 <= f <= 1.0) for f in fr) or sum(fr) > 1.0 + 1e-12:
        raise ValueError(f"cascade_exit_profile: need {len(pts) - 1} fractions in [0, 1] summing to <= 1, got {fractions}")
    edges = torch.tensor(fr, dtype=torch.float64).cumsum(0)
    q = (torch.arange(batch, dtype=torch.float64) + 0.5) / batch
    member = torch.searchsorted(edges, q, right=True)  # rows with q < edges[0] -> member 0, ...
    return torch.tensor(pts, dtype=torch.long)[member]


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


def calibrate_cascade(model: CascadeModel, input_ids, labels, attention_mask=None, token_type_ids=None, *,
                      target_speedup: Optional[float] = None, max_accuracy_drop: Optional[float] = None,
                      batch_size: int = 64, candidates: int = 200, progress: bool = True):
    """Pick tau on a labelled dev set, like :func:`eekernels.calibration.calibrate` for one model.

    Exactly one of:
        target_speedup: the most accurate tau whose cascade layer speed-up (section 4.1) is >= this.
        max_accuracy_drop: the fastest tau whose accuracy is >= the largest member's - this.

    Returns an :class:`eekernels.calibration.CalibrationResult` (criterion "max_prob").
    """
    from ..calibration import CalibrationResult, choose_threshold, midpoint_thresholds

    if (target_speedup is None) == (max_accuracy_drop is None):
        raise ValueError("calibrate_cascade: give exactly one of target_speedup and max_accuracy_drop")
    best_possible = model.num_layers / model.member_layers[0]
    if target_speedup is not None and not (0 < target_speedup <= best_possible):
        raise ValueError(f"calibrate_cascade: target_speedup must be in (0, {best_possible:g}], got {target_speedup}")
    if max_accuracy_drop is not None and not (0.0 <= max_accuracy_drop <= 1.0):
        raise ValueError(f"calibrate_cascade: max_accuracy_drop must be in [0, 1], got {max_accuracy_drop}")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape[0] != input_ids.shape[0] or labels.shape[0] == 0:
        raise ValueError("calibrate_cascade: need one label per input row, and at least one row")
    z = model.member_logits(input_ids, attention_mask, token_type_ids, batch_size, progress)
    points, n = model.exit_points, model.num_layers
    full_acc = float((z[-1].argmax(-1) == labels).float().mean())
    conf_all = z.softmax(-1).max(-1).values  # [M, B] float32
    # thresholds between neighbouring distinct confidences, never on a sample's own (rule: c > tau)
    cands = sorted({0.0, 1.0} | set(midpoint_thresholds(conf_all[:-1], candidates)))
    table = []
    for t in cands:
        el, lg = simulate_cascade(z, points, t, conf_all)
        table.append((t, metrics.cascade_layer_speedup(el, n), float((lg.argmax(-1) == labels).float().mean())))
    best = choose_threshold(table, full_acc, target_speedup, max_accuracy_drop, "calibrate_cascade")
    return CalibrationResult("max_prob", best[0], best[1], best[2], full_acc, table)
