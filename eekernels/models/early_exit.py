"""Early-exit models made from Hugging Face encoder classifiers.

:func:`convert` takes a ``BertForSequenceClassification``, ``RobertaForSequenceClassification``
or ``AlbertForSequenceClassification`` (or the base ``BertModel``/... with ``num_labels``)
and returns an :class:`EarlyExitModel`: the same HF modules and weights, with an exit head
after every layer (or a chosen subset). The last layer's head is the model's own pooler +
classifier, so with exits disabled the result is the HF model's.

- ``model(input_ids, attention_mask, labels=...)`` runs every layer and every exit head
  (differentiable; the training path for HF ``Trainer``) and returns the joint loss.
- ``model.early_exit(...)`` is batched early-exit inference: see
  :func:`eekernels.engine.early_exit_forward`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..nn.exit_head import ExitHead
from .backbones import HeadLinears, adapter_for

LOSS_WEIGHTINGS = ("weighted", "sum")
TRAINING_STAGES = ("joint", "final", "internal")
_META_FILE = "early_exit.json"
_HEADS_FILE = "exit_heads.safetensors"


@dataclass
class EarlyExitTrainOutput(ModelOutput):
    """Output of the full (training) forward; a ``ModelOutput``, so HF ``Trainer`` reads it.

    Attributes:
        loss: the joint loss (None without labels).
        logits: the last layer's logits [B, C].
        exit_logits: logits of every exit, [E, B, C] in the order of ``exit_layers``.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    exit_logits: Optional[torch.Tensor] = None


class EarlyExitModel(nn.Module):
    """An HF encoder classifier with exit heads after chosen layers.

    Args:
        hf_model: a supported ``*ForSequenceClassification`` model (kept as ``self.hf``).
        exit_layers: 1-based layers with an exit (default: every layer); the last layer is
            always an exit and uses the model's own head.
        init: "copy" initialises internal heads from the final head, "random" afresh.
        loss_weighting: "weighted" (w_i = i / sum_j j, past-future.txt eq. 9-12) or "sum"
            (DeeBERT).
    """

    def __init__(self, hf_model: nn.Module, exit_layers: Optional[Sequence[int]] = None,
                 init: str = "copy", loss_weighting: str = "weighted"):
        super().__init__()
        self.hf = hf_model
        adapter = adapter_for(hf_model)
        self._adapter = adapter  # plain attribute (not a module): built and validated once
        n = adapter.num_layers
        layers = sorted(set(exit_layers)) if exit_layers is not None else list(range(1, n + 1))
        if not layers or layers[0] < 1 or layers[-1] > n:
            raise ValueError(f"exit_layers must be non-empty and within [1, {n}], got {exit_layers}")
        if layers[-1] != n:
            layers.append(n)
        if init not in ("copy", "random"):
            raise ValueError(f"init must be 'copy' or 'random', got {init!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        self.exit_layers: List[int] = layers
        self.loss_weighting = loss_weighting
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
        self._final_dropout = nn.Dropout(dropout)
        # Start in the HF model's mode: an eval-mode model stays in eval mode (no dropout)
        # after early_exit(), which restores the mode it found.
        self.train(hf_model.training)

    # ------------------------------------------------------------------ structure
    @property
    def adapter(self):
        return self._adapter

    @property
    def config(self):
        return self.hf.config

    @property
    def num_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def num_labels(self) -> int:
        return self.hf.config.num_labels

    def head(self, layer: int) -> HeadLinears:
        """The pooler and classifier Linear modules of the exit after ``layer`` (1-based)."""
        if layer == self.num_layers:
            return self.adapter.final_head()
        h = self.heads[str(layer)]
        return HeadLinears(h.pooler, h.classifier)

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
        for p in self.hf.parameters():
            p.requires_grad_(stage != "internal")
        for p in self.heads.parameters():
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

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> EarlyExitTrainOutput:
        """Every layer, every exit head (differentiable) and, with ``labels``, the joint loss:
        cross-entropy per exit (MSE when num_labels == 1), combined with the exit weights."""
        ad = self.adapter
        hidden = ad.embed(input_ids, token_type_ids)
        mask = ad.attention_mask(attention_mask, hidden)
        exit_logits = []
        for i in range(self.num_layers):
            hidden = ad.layer(i)(hidden, mask)
            layer = i + 1
            if layer in self.exit_layers:
                cls = hidden[:, 0]
                if layer == self.num_layers:
                    f = ad.final_head()
                    z = f.classifier(self._final_dropout(torch.tanh(f.pooler(cls))))
                else:
                    z = self.heads[str(layer)](cls)
                exit_logits.append(z)
        stacked = torch.stack(exit_logits)
        loss = None
        if labels is not None:
            w = self._exit_loss_weights().to(stacked.device)
            per_exit = []
            for z in exit_logits:
                if self.num_labels == 1:
                    per_exit.append(nn.functional.mse_loss(z.squeeze(-1).float(), labels.float()))
                else:
                    per_exit.append(nn.functional.cross_entropy(z.float(), labels.long()))
            loss = (w * torch.stack(per_exit)).sum()
        return EarlyExitTrainOutput(loss=loss, logits=exit_logits[-1], exit_logits=stacked)

    # ------------------------------------------------------------------ inference
    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, *, criterion="entropy",
                   threshold=0.0, backend=None, exit_profile=None, engine: str = "rows"):
        """Batched early-exit inference.

        ``engine``: "rows" (default) compacts the active rows after each exit layer
        (:func:`eekernels.engine.early_exit_forward`; one host sync per exit layer); "fixed"
        keeps the batch at capacity and decides on the device
        (:func:`eekernels.engine.fixed_capacity_forward`; no sync, for small batches).
        """
        from ..engine.batched import early_exit_forward
        from ..engine.graphed import fixed_capacity_forward

        engines = {"rows": early_exit_forward, "fixed": fixed_capacity_forward}
        if engine not in engines:
            raise ValueError(f"early_exit: engine must be one of {sorted(engines)}, got {engine!r}")
        return engines[engine](self, input_ids, attention_mask, token_type_ids, criterion=criterion,
                               threshold=threshold, backend=backend, exit_profile=exit_profile)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str) -> None:
        """Save the HF model (its own format) plus the exit heads and settings."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.hf.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, os.path.join(path, _HEADS_FILE))
        with open(os.path.join(path, _META_FILE), "w") as f:
            json.dump({"exit_layers": self.exit_layers, "loss_weighting": self.loss_weighting,
                       "format": "eekernels-early-exit/1"}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, **hf_kwargs) -> "EarlyExitModel":
        """Load what :meth:`save_pretrained` wrote (local path; no download)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification

        meta_path = os.path.join(path, _META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} holds no {_META_FILE}: not saved by EarlyExitModel.save_pretrained")
        with open(meta_path) as f:
            meta = json.load(f)
        hf = AutoModelForSequenceClassification.from_pretrained(path, **hf_kwargs)
        model = cls(hf, exit_layers=meta["exit_layers"], init="random", loss_weighting=meta["loss_weighting"])
        state = load_file(os.path.join(path, _HEADS_FILE))
        model.heads.load_state_dict(state)
        return model.to(hf.device)


def convert(model: nn.Module, exit_layers: Optional[Sequence[int]] = None, num_labels: Optional[int] = None,
            init: str = "copy", loss_weighting: str = "weighted") -> EarlyExitModel:
    """Make an :class:`EarlyExitModel` from an HF BERT/RoBERTa/ALBERT classifier or base model.

    A base model (``BertModel``, ``RobertaModel``, ``AlbertModel``) needs ``num_labels``; a
    sequence-classification head is created for it (its pooler reused where it has one) and
    trained later. The HF modules and weights are reused, not copied.
    """
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
        model = clf.eval()
    elif num_labels is not None and num_labels != model.config.num_labels:
        raise ValueError(f"convert: model has num_labels={model.config.num_labels}, asked for {num_labels}")
    return EarlyExitModel(model, exit_layers=exit_layers, init=init, loss_weighting=loss_weighting)
