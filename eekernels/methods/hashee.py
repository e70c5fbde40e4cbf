"""HashEE: hash-based token-level early exit (hashee.txt sections 3, A.3, A.4).

Every token exits at a layer fixed in advance by a hash table over token ids
(:class:`~eekernels.nn.token_hash.TokenHashTable`); exited tokens keep their state and
still serve as keys and values (A.4 eq. 1-5). There are no internal classifiers and no
sample-level exit: every sample runs the whole depth, but fewer tokens compute per layer.

:class:`HashEEModel` wraps an HF sequence classifier:

- BERT, RoBERTa, ALBERT (``*ForSequenceClassification``): HashEE in the encoder, the
  model's own pooler/classifier on [CLS].
- BART (``BartForSequenceClassification``): HashEE in the *encoder* (the seq2seq setting
  of the paper, section 4 "HASHEE w/ BART"); the decoder and the classification head run
  in full on the encoder's output, exactly as HF does (:meth:`HashEEModel.forward` passes
  ``encoder_outputs`` to the HF model). The reported FLOPs speed-up is the encoder's.

``model(input_ids, attention_mask, labels=...)`` is the Trainer path (masked form: full
compute, exited tokens copied forward; differentiable). ``model.forward_packed(...)``
(alias ``early_exit``) is inference with token packing. The training table is used in
training mode, the inference table in eval mode and by ``forward_packed`` (they differ
for Rand-incons only). ``save_pretrained`` / ``from_pretrained`` keep the table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .. import metrics
from ..engine.tokens import LAYOUTS, active_token_counts, token_exit_masked, token_exit_packed
from ..models.layer_parts import layer_parts
from ..nn.token_hash import TokenHashTable

__all__ = ["HashEEModel", "HashEEOutput", "HashEEInferenceOutput", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "albert", "bart")
_META_FILE = "hashee.json"
_TABLE_FILE = "hashee_table.json"


@dataclass
class HashEEOutput(ModelOutput):
    """Output of the training/masked forward (a ``ModelOutput``: HF ``Trainer`` reads it).

    Attributes:
        loss: HF's loss for the task (None without labels).
        logits: [B, C].
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


@dataclass
class HashEEInferenceOutput:
    """Result of :meth:`HashEEModel.forward_packed`.

    Attributes:
        logits: float32 [B, C].
        pred: int64 [B], argmax of logits.
        flops_speedup: float64 [B], each sample's encoder FLOPs speed-up (hashee.txt Table 10).
        flops_speedup_total: the batch's total full FLOPs over executed FLOPs.
        active_tokens: int64 [B, L], tokens of each sample computing each layer.
        seq_len: int64 [B], real tokens per sample.
    """

    logits: torch.Tensor
    pred: torch.Tensor
    flops_speedup: torch.Tensor
    flops_speedup_total: float
    active_tokens: torch.Tensor
    seq_len: torch.Tensor


class HashEEModel(nn.Module):
    """An HF sequence classifier with HashEE token-level exit in its encoder.

    Args:
        hf_model: ``Bert/Roberta/XLMRoberta/Albert/BartForSequenceClassification`` (kept as ``self.hf``).
        table: the hash table, built for this model's depth and vocabulary.
    """

    def __init__(self, hf_model: nn.Module, table: TokenHashTable):
        super().__init__()
        cfg = getattr(hf_model, "config", None)
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"HashEEModel: unsupported model {type(hf_model).__name__} (model_type={mt!r}); "
                             f"supported: {SUPPORTED_MODEL_TYPES} sequence classifiers")
        base_attr = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "albert": "albert",
                     "bart": "model"}[mt]
        if not hasattr(hf_model, base_attr) or not type(hf_model).__name__.endswith("ForSequenceClassification"):
            raise ValueError(f"HashEEModel: {type(hf_model).__name__} is not a {mt} sequence classifier")
        if not isinstance(table, TokenHashTable):
            raise TypeError(f"HashEEModel: table must be a TokenHashTable, got {type(table).__name__}")
        self.hf = hf_model
        self.model_type = mt
        n = self.num_layers
        if table.num_layers != n:
            raise ValueError(f"HashEEModel: the table was built for {table.num_layers} layers, the model has {n}")
        if table.vocab_size < cfg.vocab_size:
            raise ValueError(f"HashEEModel: the table covers {table.vocab_size} token ids but the model's vocabulary "
                             f"has {cfg.vocab_size}; build it with vocab_size=model.config.vocab_size")
        self.table = table
        dev = next(hf_model.parameters()).device
        self.register_buffer("train_exit_layer", table.table(False).clone().to(dev), persistent=False)
        self.register_buffer("inference_exit_layer", table.table(True).clone().to(dev), persistent=False)
        # LayerParts reuse the HF modules (no parameters of their own): built once.
        owner = hf_model.model.encoder if mt == "bart" else hf_model
        self._parts = [layer_parts(owner, i) for i in range(n)]

    # ------------------------------------------------------------------ structure
    @property
    def config(self):
        return self.hf.config

    @property
    def num_layers(self) -> int:
        c = self.hf.config
        return c.encoder_layers if self.model_type == "bart" else c.num_hidden_layers

    @property
    def num_labels(self) -> int:
        return self.hf.config.num_labels

    def _shape(self):
        """(hidden, intermediate, heads) of an encoder layer, for the FLOPs count."""
        c = self.hf.config
        if self.model_type == "bart":
            return c.d_model, c.encoder_ffn_dim, c.encoder_attention_heads
        return c.hidden_size, c.intermediate_size, c.num_attention_heads

    def token_exit_layers(self, input_ids: torch.Tensor, inference: Optional[bool] = None) -> torch.Tensor:
        """int64 [B, S]: each token's 1-based exit layer from the hash table (training table in
        training mode, inference table in eval mode, unless ``inference`` says)."""
        inference = (not self.training) if inference is None else inference
        t = self.inference_exit_layer if inference else self.train_exit_layer
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= t.numel()):
            raise ValueError(f"HashEE: token ids must be in [0, {t.numel()})")
        return t.to(input_ids.device)[input_ids]

    # ------------------------------------------------------------------ pieces
    def _embed(self, input_ids, token_type_ids=None):
        if self.model_type == "bart":
            enc = self.hf.model.encoder
            x = enc.embed_tokens(input_ids)  # scaled word embeddings
            x = x + enc.embed_positions(input_ids).to(x.device)
            x = enc.layernorm_embedding(x)
            return nn.functional.dropout(x, p=enc.dropout, training=enc.training)
        base = getattr(self.hf, "roberta" if self.model_type == "xlm-roberta" else self.model_type)
        e = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.model_type == "albert":
            e = base.encoder.embedding_hidden_mapping_in(e)
        return e

    def _layer_fns(self, attention_mask, hidden):
        """The HF layer modules as f(h), with HF's own mask: the masked reference."""
        from transformers.masking_utils import create_bidirectional_mask

        if self.model_type == "bart":
            enc = self.hf.model.encoder
            mask = create_bidirectional_mask(config=enc.config, inputs_embeds=hidden, attention_mask=attention_mask)
            return [lambda h, mod=mod: mod(h, mask) for mod in enc.layers]
        from ..models.backbones import adapter_for

        ad = adapter_for(self.hf)
        mask = ad.attention_mask(attention_mask, hidden)
        return [lambda h, f=ad.layer(i): f(h, mask) for i in range(self.num_layers)]

    def _head(self, hidden, input_ids, attention_mask, labels):
        """(loss, logits) from the encoder's final states, as the HF model computes them."""
        if self.model_type == "bart":
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                          encoder_outputs=BaseModelOutput(last_hidden_state=hidden), labels=labels)
            return out.loss, out.logits
        m = self.hf
        if self.model_type == "bert":
            logits = m.classifier(m.dropout(m.bert.pooler(hidden)))
        elif self.model_type == "albert":
            logits = m.classifier(m.dropout(m.albert.pooler_activation(m.albert.pooler(hidden[:, 0]))))
        else:  # roberta: the head reads [CLS] itself
            logits = m.classifier(hidden)
        return (self._loss(logits, labels) if labels is not None else None), logits

    def _loss(self, logits, labels):
        """HF's sequence-classification loss (problem_type as HF infers it)."""
        cfg, n = self.hf.config, self.num_labels
        labels = labels.to(logits.device)
        if cfg.problem_type is None:
            if n == 1:
                cfg.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                cfg.problem_type = "single_label_classification"
            else:
                cfg.problem_type = "multi_label_classification"
        if cfg.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze() if n == 1 else logits, labels.squeeze() if n == 1 else labels)
        if cfg.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, n), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    # ------------------------------------------------------------------ training path
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> HashEEOutput:
        """Masked HashEE (full compute, exited tokens copied forward, eq. 5); differentiable.
        With ``labels``, HF's loss for the task. The Trainer path."""
        if input_ids.dim() != 2:
            raise ValueError(f"HashEE: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"HashEE: attention_mask must be {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        token_exit = self.token_exit_layers(input_ids)
        hidden = self._embed(input_ids, token_type_ids)
        hidden = token_exit_masked(self._layer_fns(attention_mask, hidden), hidden, token_exit)
        loss, logits = self._head(hidden, input_ids, attention_mask, labels)
        return HashEEOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ inference
    def forward_packed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       token_type_ids: Optional[torch.Tensor] = None, *, layout: str = "sorted",
                       backend: Optional[str] = None, with_flops: bool = True) -> HashEEInferenceOutput:
        """Inference with token packing (the inference table; no sample exits early).

        Args:
            input_ids: int64 [B, S]; attention_mask: [B, S] (1 = token) or None;
            token_type_ids: [B, S] or None.
            layout: "sorted" (tokens permuted once by exit layer; default) or "pack"
                (per-layer :func:`eekernels.ops.pack_tokens_padded` / ``scatter_tokens``).
            backend: backend of the token ops (layout "pack").
            with_flops: count the FLOPs speed-up (one more host sync; benchmarks time
                without it). Without it ``flops_speedup`` is empty and the total NaN.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"HashEE: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"HashEE: attention_mask must be [{b}, {s}], got {tuple(attention_mask.shape)}")
        if layout not in LAYOUTS:
            raise ValueError(f"HashEE: layout must be one of {LAYOUTS}, got {layout!r}")
        max_pos = getattr(self.hf.config, "max_position_embeddings", None)
        if max_pos is not None and s > max_pos:
            raise ValueError(f"HashEE: sequence length {s} exceeds max_position_embeddings {max_pos}")
        valid = None if attention_mask is None else attention_mask.bool()
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                token_exit = self.token_exit_layers(input_ids, inference=True)
                hidden = self._embed(input_ids, token_type_ids)
                hidden = token_exit_packed(self._parts, hidden, token_exit, valid, layout=layout, backend=backend)
                _, logits = self._head(hidden, input_ids, attention_mask, None)
        finally:
            self.train(was_training)
        logits = logits.float()
        if not with_flops:
            empty = torch.empty(0)
            return HashEEInferenceOutput(logits, logits.argmax(dim=-1), empty, float("nan"), empty, empty)
        counts = active_token_counts(token_exit, valid, self.num_layers).cpu()
        seq_len = valid.sum(dim=1).cpu() if valid is not None else torch.full((b,), s, dtype=torch.int64)
        hid, inter, heads = self._shape()
        return HashEEInferenceOutput(
            logits=logits, pred=logits.argmax(dim=-1),
            flops_speedup=metrics.token_exit_flops_speedup(counts, seq_len, hid, inter, heads),
            flops_speedup_total=metrics.token_exit_flops_speedup_total(counts, seq_len, hid, inter, heads),
            active_tokens=counts, seq_len=seq_len)

    early_exit = forward_packed

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str) -> None:
        """Save the HF model (its own format), the hash table and the settings."""
        os.makedirs(path, exist_ok=True)
        self.hf.save_pretrained(path)
        self.table.save(os.path.join(path, _TABLE_FILE))
        with open(os.path.join(path, _META_FILE), "w") as f:
            json.dump({"format": "eekernels-hashee/1", "model_type": self.model_type, "table": _TABLE_FILE}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, **hf_kwargs) -> "HashEEModel":
        """Load what :meth:`save_pretrained` wrote (local path; no download)."""
        from transformers import AutoModelForSequenceClassification

        meta_path = os.path.join(path, _META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} holds no {_META_FILE}: not saved by HashEEModel.save_pretrained")
        with open(meta_path) as f:
            meta = json.load(f)
        table = TokenHashTable.load(os.path.join(path, meta.get("table", _TABLE_FILE)))
        hf = AutoModelForSequenceClassification.from_pretrained(path, **hf_kwargs)
        return cls(hf, table)

