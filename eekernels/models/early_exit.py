"""Per-layer exits on a Hugging Face encoder classifier (DeeBERT, Right-Tool, PABEE) and the
base of the methods that add to them (Past-Future, ConsistentEE, MPEE).

:func:`convert` takes a ``BertForSequenceClassification``, ``RobertaForSequenceClassification``
or ``AlbertForSequenceClassification`` (or the base ``BertModel``/... with ``num_labels``)
and returns an :class:`EarlyExitModel`: the same HF modules and weights, with an exit head
after every layer (or a chosen subset). The last layer's exit is the model's own head, so
with exits disabled the result is the HF model's.

- ``model(input_ids, attention_mask, labels=...)`` runs every layer and every exit head
  (differentiable; the training path for HF ``Trainer``) and returns the joint loss.
- ``model.early_exit(...)`` is batched early-exit inference (:mod:`eekernels.engine.loop`).
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import metrics
from ..engine.executor_registry import EXECUTORS
from ..engine.rules import ExitHeadRule, head_weights
from ..ops import exit_head_reference
from ..hf.adapters import HeadLinears, adapter_for
from ..nn.exit_head import POOLINGS, ExitHead, layer_summary
from .base import ENGINES, EarlyExitTrainOutput, SingleModelBase

__all__ = ["EarlyExitModel", "LOSS_WEIGHTINGS", "TRAINING_STAGES", "convert"]

LOSS_WEIGHTINGS = ("weighted", "sum")
TRAINING_STAGES = ("joint", "final", "internal")


class EarlyExitModel(SingleModelBase):
    """An HF encoder classifier with exit heads after chosen layers.

    Args:
        hf_model: a supported ``*ForSequenceClassification`` model (kept as ``self.hf``).
        exit_layers: 1-based layers with an exit (default: every layer); the last layer is
            always an exit and uses the model's own head.
        init: "copy" initialises internal heads from the final head, "random" afresh.
        loss_weighting: "weighted" (w_i = i / sum_j j, past-future.txt eq. 9-12) or "sum"
            (DeeBERT).
        exit_pooling: what the internal exits read of their layer: "cls" (the [CLS] state,
            as DeeBERT) or "mean" (the mean of the real tokens: for backbones trained with
            mean pooling, such as sentence-transformers). The last exit is always the HF
            model's own head, so with exits disabled the model is the HF model.
    """

    method = "early-exit"
    #: the rule reads each exit's own head alone (:class:`ExitHeadRule`), so a layer executor
    #: may compute the heads' logits inside the layers (False for rules that merge states
    #: or read the pooled state itself: Past-Future, ConsistentEE's policy)
    plain_exit_heads = True
    #: the whole-graph engine decides on each exit's own head (not Past-Future's merged states)
    engines = ENGINES

    def __init__(self, hf_model: nn.Module, exit_layers: Optional[Sequence[int]] = None,
                 init: str = "copy", loss_weighting: str = "weighted", exit_pooling: str = "cls"):
        super().__init__()
        adapter = adapter_for(hf_model)
        self._bind(hf_model, adapter)
        n = adapter.num_layers
        if exit_layers is not None and (isinstance(exit_layers, (str, torch.Tensor))
                                        or not isinstance(exit_layers, Sequence)
                                        or not all(isinstance(l, numbers.Integral) and not isinstance(l, bool)
                                                   for l in exit_layers)):
            raise TypeError(f"exit_layers must be a list of 1-based layer numbers (ints), got {exit_layers!r}")
        layers = sorted(set(int(l) for l in exit_layers)) if exit_layers is not None else list(range(1, n + 1))
        if not layers or layers[0] < 1 or layers[-1] > n:
            raise ValueError(f"exit_layers must be non-empty and within [1, {n}], got {exit_layers}")
        if layers[-1] != n:
            layers.append(n)
        if init not in ("copy", "random"):
            raise ValueError(f"init must be 'copy' or 'random', got {init!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if exit_pooling not in POOLINGS:
            raise ValueError(f"exit_pooling must be one of {POOLINGS}, got {exit_pooling!r}")
        self.exit_layers: List[int] = layers
        self.loss_weighting = loss_weighting
        self.exit_pooling = exit_pooling
        self.training_stage = "joint"
        cfg = hf_model.config
        final = adapter.final_head()
        dropout = getattr(cfg, "classifier_dropout", None)
        dropout = dropout if dropout is not None else getattr(cfg, "hidden_dropout_prob", 0.1)
        self.heads = nn.ModuleDict()
        for l in layers[:-1]:
            head = ExitHead(cfg.hidden_size, cfg.num_labels, dropout)
            if init == "copy":
                head.pooler.load_state_dict(final.pooler.state_dict())
                head.classifier.load_state_dict(final.classifier.state_dict())
            self.heads[str(l)] = head.to(device=final.classifier.weight.device, dtype=final.classifier.weight.dtype)
        # Start in the HF model's mode: an eval-mode model stays in eval mode (no dropout)
        # after early_exit(), which restores the mode it found.
        self.train(hf_model.training)

    # ------------------------------------------------------------------ structure
    @property
    def exit_points(self) -> List[int]:
        return self.exit_layers

    def head(self, layer: int) -> HeadLinears:
        """The pooler and classifier Linear modules of the exit after ``layer`` (1-based)."""
        if layer == self.num_layers:
            return self.adapter.final_head()
        h = self.heads[str(layer)]
        return HeadLinears(h.pooler, h.classifier, h.dropout)

    def summary(self, hidden: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """What an internal exit reads of a layer's states [N, S, H]: [N, H] (``exit_pooling``)."""
        return layer_summary(hidden, valid, self.exit_pooling)

    def exit_summary(self, layer: int, hidden: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """What the exit after ``layer`` reads of the states [N, S, H], as [N, H]
        (differentiable, the training path): the summary for an internal exit, [CLS] for the
        HF head at the last layer."""
        if layer == self.num_layers:
            return hidden[:, 0]
        return self.summary(hidden, valid)

    def exit_input(self, layer: int, hidden: torch.Tensor, valid: Optional[torch.Tensor]):
        """(input, pooling keywords) of :func:`eekernels.ops.exit_head` for the exit after
        ``layer``: for a mean-pooled internal exit the states themselves with
        ``pooling="mean"`` and their ``token_mask``, so that the op takes the mean (float32,
        fused with the head); else :meth:`exit_summary` (a [CLS] state)."""
        if layer != self.num_layers and self.exit_pooling == "mean":
            return hidden, {"pooling": "mean", "token_mask": valid}
        return self.exit_summary(layer, hidden, valid), {}

    def exit_logits(self, layer: int, hidden: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits float32 [N, C] of the exit after ``layer`` from the layer's states [N, S, H]
        at inference: what the fused exit head computes before its criterion (the op's
        reference on :meth:`exit_input`), so a layer executor can run it inside the layer's
        graph (:meth:`~eekernels.engine.executors.LayerExecutor.attach_exit_heads`)."""
        x, pooling = self.exit_input(layer, hidden, valid)
        return exit_head_reference(x, **head_weights(self.head(layer)), **pooling).logits

    def head_parameters(self) -> List[nn.Parameter]:
        """The parameters the method adds or initialises afresh (every exit head, the final
        head and the method's modules): what ``--head-lr`` trains."""
        final = self.adapter.final_head()
        return super().head_parameters() + [p for m in (final.pooler, final.classifier) for p in m.parameters()]

    def options(self) -> Dict[str, Any]:
        return {"exit_layers": self.exit_layers, "loss_weighting": self.loss_weighting,
                "exit_pooling": self.exit_pooling}

    @classmethod
    def from_hf_models(cls, hf_models, **options):
        return cls(hf_models[""], init="random", **options)

    # ------------------------------------------------------------------ inference seams
    def exit_rule(self, criterion, threshold, backend):
        return ExitHeadRule(self, criterion, threshold, backend)

    def layer_executor(self, name, engine):
        name = name or ("hf" if engine == "rows" else "parts")
        if name not in EXECUTORS:
            raise ValueError(f"early_exit: unknown executor {name!r}; choose one of {sorted(EXECUTORS)}")
        if engine != "rows" and name == "hf":
            raise ValueError(f"early_exit(engine={engine!r}) runs layers under torch.cond: use executor='parts'")
        executor = EXECUTORS[name](self.adapter)
        if self.plain_exit_heads:
            executor.attach_exit_heads(self)
        return executor

    def exit_extra_flops(self, layer: int) -> int:
        """FLOPs per sample an exit at ``layer`` costs beyond its pooler + classifier."""
        return 0

    def full_model_extra_flops(self) -> int:
        """FLOPs per sample the full-model baseline (:meth:`full_model`) runs beyond its
        layers and one head (0: it is the HF forward)."""
        return 0

    def speedups(self, exit_layer, seq_len, extras) -> Tuple[float, float]:
        hidden, inter, _ = self.adapter.shape()
        exit_layer, seq_len = _numpy(exit_layer), _numpy(seq_len)  # numpy: this runs on every call
        e = exit_layer.astype(np.float64)
        per_layer = metrics.encoder_layer_flops(seq_len, hidden, inter)
        head = metrics.exit_head_flops(hidden, self.num_labels)
        exits = np.asarray(self.exit_layers, dtype=np.float64)
        cost = np.asarray([head + self.exit_extra_flops(l) for l in self.exit_layers], dtype=np.float64)
        heads_run = (exits[None, :] <= e[:, None]) @ cost
        full = (self.num_layers * per_layer + head + self.full_model_extra_flops()).sum()
        return self.layer_speedup(exit_layer), float(full / (e * per_layer + heads_run).sum())

    # ------------------------------------------------------------------ training path
    def set_training_stage(self, stage: str) -> None:
        """Which parameters train and which exits enter the loss.

        "joint": everything, all exits (past-future.txt eq. 12 / DeeBERT sum).
        "final": DeeBERT stage 1, backbone + final head only, loss of the last exit.
        "internal": DeeBERT stage 2, backbone and final head frozen, internal exits only.
        """
        if stage not in TRAINING_STAGES:
            raise ValueError(f"stage must be one of {TRAINING_STAGES}, got {stage!r}")
        self.training_stage = stage
        hf_ids = {id(p) for p in self.hf.parameters()}
        for p in self.hf.parameters():
            p.requires_grad_(stage != "internal")
        for p in self.parameters():
            if id(p) not in hf_ids:
                p.requires_grad_(stage != "final")

    def _exit_loss_weights(self) -> torch.Tensor:
        layers = torch.tensor(self.exit_layers, dtype=torch.float32)
        if self.training_stage == "final":
            w = (layers == self.num_layers).float()
        elif self.training_stage == "internal":
            w = (layers != self.num_layers).float()
        else:
            w = torch.ones_like(layers)
        if self.loss_weighting == "weighted":
            w = w * layers  # w_i = i / sum_j j over the exits in the loss (past-future.txt eq. 9)
        return w / w.sum()

    def layer_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """Every layer's output [B, S, H] (a list, layer 1 first), differentiable."""
        ad = self.adapter
        hidden = ad.embed(input_ids, token_type_ids)
        mask = ad.attention_mask(attention_mask, hidden)
        states = []
        for i in range(self.num_layers):
            hidden = ad.layer(i)(hidden, mask)
            states.append(hidden)
        return states

    def final_logits(self, hidden, input_ids, attention_mask) -> torch.Tensor:
        """The HF model's own head on the last layer's states (with its dropout)."""
        return self.adapter.classify(hidden, input_ids, attention_mask)

    def exit_losses(self, exit_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Each exit's task loss [E]: cross-entropy (MSE when num_labels == 1)."""
        if self.num_labels == 1:
            return torch.stack([nn.functional.mse_loss(z.squeeze(-1).float(), labels.float()) for z in exit_logits])
        return torch.stack([nn.functional.cross_entropy(z.float(), labels.long()) for z in exit_logits])

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> EarlyExitTrainOutput:
        """Every layer, every exit head (differentiable) and, with ``labels``, the joint loss:
        each exit's task loss combined with the exit weights."""
        states = self.layer_states(input_ids, attention_mask, token_type_ids)
        valid = None if attention_mask is None else attention_mask.bool()
        exit_logits = []
        for layer in self.exit_layers:
            hidden = states[layer - 1]
            if layer == self.num_layers:
                exit_logits.append(self.final_logits(hidden, input_ids, attention_mask))
            else:
                exit_logits.append(self.heads[str(layer)](self.summary(hidden, valid)))
        loss = None
        if labels is not None:
            w = self._exit_loss_weights().to(exit_logits[0].device)
            loss = (w * self.exit_losses(exit_logits, labels)).sum()
        return EarlyExitTrainOutput(loss=loss, logits=exit_logits[-1], exit_logits=torch.stack(exit_logits))


def _as_classifier(model: nn.Module, num_labels: Optional[int]) -> nn.Module:
    """An HF sequence classifier from a classifier (checked) or a base encoder (a head added)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a Hugging Face model (an nn.Module; load a checkpoint with "
                        f"AutoModelForSequenceClassification.from_pretrained first), got {type(model).__name__}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"convert: num_labels must be an int >= 1, got {num_labels!r}")
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if hasattr(model, "embeddings") and hasattr(model, "encoder"):  # a base model
        from transformers import AutoModelForSequenceClassification

        if num_labels is None:
            raise ValueError("convert: a base model needs num_labels")
        cfg = model.config.__class__.from_dict(model.config.to_dict())
        cfg.num_labels = num_labels
        clf = AutoModelForSequenceClassification.from_config(cfg).to(device=model.device, dtype=model.dtype)
        base_attr = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "albert": "albert"}.get(mt)
        if base_attr is None:
            adapter_for(clf)  # raises the unsupported-model error
        missing, unexpected = getattr(clf, base_attr).load_state_dict(model.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"convert: base model weights do not fit {type(clf).__name__}: {unexpected[:5]}")
        return clf.eval()
    if num_labels is not None and num_labels != model.config.num_labels:
        raise ValueError(f"convert: model has num_labels={model.config.num_labels}, asked for {num_labels}")
    return model


def _numpy(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def convert(model: nn.Module, exit_layers: Optional[Sequence[int]] = None, num_labels: Optional[int] = None,
            init: str = "copy", loss_weighting: str = "weighted", *, cls=EarlyExitModel, **options) -> EarlyExitModel:
    """Make an :class:`EarlyExitModel` (or the per-layer method ``cls``) from an HF
    BERT/RoBERTa/ALBERT classifier or base model.

    A base model (``BertModel``, ``RobertaModel``, ``AlbertModel``) needs ``num_labels``; a
    sequence-classification head is created for it (its pooler reused where it has one) and
    trained later. The HF modules and weights are reused, not copied. ``options`` go to
    ``cls``.
    """
    hf = _as_classifier(model, num_labels)
    if cls is EarlyExitModel:
        options["loss_weighting"] = loss_weighting
    return cls(hf, exit_layers=exit_layers, init=init, **options)
