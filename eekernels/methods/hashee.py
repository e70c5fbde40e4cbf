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
compute, exited tokens copied forward; differentiable). ``model.early_exit(...)`` is
inference with token packing on the layer loop (:class:`~eekernels.engine.tokens.TokenExitExecutor`;
``executor="sorted"`` or ``"pack"``): every sample leaves at the last layer, its
``flops_speedup`` counts the tokens that stopped early, ``extras["active_tokens"]``
[B, L] how many computed each layer and ``extras["flops_speedup_per_sample"]`` [B] each
sample's own FLOPs speed-up. The training table is used in training mode, the
inference table in eval mode and by ``early_exit`` (they differ for Rand-incons only).
``save_pretrained`` / ``from_pretrained`` keep the table (in the model's options).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import metrics
from ..engine.rules import LastLayerRule
from ..engine.tokens import LAYOUTS, TokenExitExecutor, token_exit_masked
from ..hf.adapters import adapter_for
from ..hf.layer_parts import layer_parts
from ..models.base import EarlyExitTrainOutput, SingleModelBase
from ..nn.token_hash import TokenHashTable

__all__ = ["HashEEModel", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "albert", "bart")


class HashEEModel(SingleModelBase):
    """An HF sequence classifier with HashEE token-level exit in its encoder.

    Args:
        hf_model: ``Bert/Roberta/XLMRoberta/Albert/BartForSequenceClassification`` (kept as ``self.hf``).
        table: the hash table (a :class:`~eekernels.nn.token_hash.TokenHashTable` or its
            ``to_dict()``), built for this model's depth and vocabulary.
    """

    method = "hashee"
    criteria = ()
    engines = ("rows",)

    def __init__(self, hf_model: nn.Module, table):
        super().__init__()
        mt = getattr(getattr(hf_model, "config", None), "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"HashEEModel: unsupported model {type(hf_model).__name__} (model_type={mt!r}); "
                             f"supported: {SUPPORTED_MODEL_TYPES} sequence classifiers")
        try:
            adapter = adapter_for(hf_model, per_layer_exits=False)
        except ValueError as e:
            raise ValueError(f"HashEEModel: {e}") from None
        if isinstance(table, dict):
            table = TokenHashTable.from_dict(table)
        if not isinstance(table, TokenHashTable):
            raise TypeError(f"HashEEModel: table must be a TokenHashTable, got {type(table).__name__}")
        self._bind(hf_model, adapter)
        n = adapter.num_layers
        if table.num_layers != n:
            raise ValueError(f"HashEEModel: the table was built for {table.num_layers} layers, the model has {n}")
        if table.vocab_size < hf_model.config.vocab_size:
            raise ValueError(f"HashEEModel: the table covers {table.vocab_size} token ids but the model's vocabulary "
                             f"has {hf_model.config.vocab_size}; build it with vocab_size=model.config.vocab_size")
        self.table = table
        dev = next(hf_model.parameters()).device
        self.register_buffer("train_exit_layer", table.table(False).clone().to(dev), persistent=False)
        self.register_buffer("inference_exit_layer", table.table(True).clone().to(dev), persistent=False)
        # LayerParts reuse the HF modules (no parameters of their own): built once.
        self._parts = [layer_parts(adapter, i) for i in range(n)]

    # ------------------------------------------------------------------ structure
    @property
    def model_type(self) -> str:
        return self.hf.config.model_type

    @property
    def exit_points(self):
        return [self.num_layers]  # no sample leaves early

    def options(self):
        return {"table": self.table.to_dict()}

    @classmethod
    def from_hf_models(cls, hf_models, **options):
        return cls(hf_models[""], **options)

    def token_exit_layers(self, input_ids: torch.Tensor, inference: Optional[bool] = None) -> torch.Tensor:
        """int64 [B, S]: each token's 1-based exit layer from the hash table (training table in
        training mode, inference table in eval mode, unless ``inference`` says)."""
        inference = (not self.training) if inference is None else inference
        t = self.inference_exit_layer if inference else self.train_exit_layer
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= t.numel()):
            raise ValueError(f"HashEE: token ids must be in [0, {t.numel()})")
        return t.to(input_ids.device)[input_ids]

    # ------------------------------------------------------------------ inference seams
    def exit_rule(self, criterion, threshold, backend):
        def classify(rows):
            return self.adapter.classify(rows.hidden, rows.tensors["input_ids"], rows.tensors.get("attention_mask"))
        return LastLayerRule(classify)

    def layer_executor(self, name, engine):
        """Token packing with the inference table: ``name`` "sorted" (default) or "pack" (the layout)."""
        layout = name or "sorted"
        if layout not in LAYOUTS:
            raise ValueError(f"early_exit: HashEE's executor is a token layout, one of {LAYOUTS}; got {name!r}")
        return TokenExitExecutor(self.adapter, lambda ids: self.token_exit_layers(ids, inference=True), layout,
                                 self._parts)

    def speedups(self, exit_layer, seq_len, extras):
        """Layer speed-up 1 (every sample runs every layer); the encoder's FLOPs speed-up of
        the tokens that stopped early (hashee.txt Table 10)."""
        hid, inter, heads = self.adapter.shape()
        counts = extras["active_tokens"]
        extras["flops_speedup_per_sample"] = metrics.token_exit_flops_speedup(counts, seq_len, hid, inter, heads)
        flops = metrics.token_exit_flops_speedup_total(counts, seq_len, hid, inter, heads)
        return self.layer_speedup(exit_layer), flops

    # ------------------------------------------------------------------ training path
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

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> EarlyExitTrainOutput:
        """Masked HashEE (full compute, exited tokens copied forward, eq. 5); differentiable.
        With ``labels``, HF's loss for the task. The Trainer path; ``exit_logits`` [1, B, C]."""
        if input_ids.dim() != 2:
            raise ValueError(f"HashEE: input_ids must be [B, S], got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"HashEE: attention_mask must be {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        token_exit = self.token_exit_layers(input_ids)
        ad = self.adapter
        hidden = ad.embed(input_ids, token_type_ids)
        mask = ad.attention_mask(attention_mask, hidden)
        layers = [lambda h, f=ad.layer(i): f(h, mask) for i in range(self.num_layers)]
        hidden = token_exit_masked(layers, hidden, token_exit)
        logits = ad.classify(hidden, input_ids, attention_mask)
        loss = self._loss(logits, labels) if labels is not None else None
        return EarlyExitTrainOutput(loss=loss, logits=logits, exit_logits=logits[None])
