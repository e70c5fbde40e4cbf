"""Layer-by-layer access to Hugging Face encoder classifiers: the one place that knows HF internals.

An adapter exposes what early exit needs from a ``*ForSequenceClassification`` model,
reusing the HF modules and weights as they are:

- :meth:`~EncoderAdapter.embed` (embeddings, and ALBERT's embedding->hidden projection),
- :meth:`~EncoderAdapter.attention_mask` (the mask HF's own forward builds for its
  attention backend),
- :meth:`~EncoderAdapter.layer_module` / :meth:`~EncoderAdapter.layer` (the module that
  runs layer i; ALBERT shares one layer's weights across depth, so several indices map to
  the same module),
- :meth:`~EncoderAdapter.final_head` (the model's own pooler dense + classifier, as two
  ``nn.Linear``) and :meth:`~EncoderAdapter.classify` (the model's head on its final
  states, as its own forward computes it).

BERT, RoBERTa (and XLM-R) and ALBERT classifiers have per-layer exits; the BART encoder
(:class:`BartEncoderAdapter`) serves token-level exit only (its head is the whole decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

__all__ = ["ADAPTERS", "AlbertAdapter", "BartEncoderAdapter", "BertAdapter", "EncoderAdapter", "HeadLinears",
           "RobertaAdapter", "adapter_for"]


@dataclass
class HeadLinears:
    """An exit head as the exit_head op sees it: pooler dense (then tanh) and classifier,
    and the dropout training applies to the pooled state."""

    pooler: Optional[nn.Linear]
    classifier: nn.Linear
    dropout: Optional[nn.Module] = None


class EncoderAdapter:
    """Base class; subclasses bind one HF architecture."""

    model_types: tuple = ()
    #: whether the model's head is a pooler + classifier on [CLS] (per-layer exits can copy it)
    has_cls_head: bool = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- what subclasses provide
    @property
    def base(self) -> nn.Module:
        raise NotImplementedError

    def layer_module(self, i: int) -> nn.Module:
        """The HF module of layer i (0-based); BERT-style encoders keep them in ``encoder.layer``."""
        return self.base.encoder.layer[i]

    def final_head(self) -> HeadLinears:
        raise NotImplementedError

    def classify(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's own head on its final states [B, S, H] (with its dropout), as its forward."""
        head = self.final_head()
        return head.classifier(self.model.dropout(torch.tanh(head.pooler(hidden[:, 0]))))

    # -- shared
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def shape(self) -> Tuple[int, int, int]:
        """(hidden size, FFN size, attention heads) of a layer, for FLOPs counts."""
        c = self.config
        return c.hidden_size, c.intermediate_size, c.num_attention_heads

    def layer(self, i: int) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """Layer i (0-based) as ``f(hidden, hf_mask)``."""
        mod = self.layer_module(i)
        return lambda h, m: mod(h, m)

    def embed(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def attention_mask(self, attention_mask: Optional[torch.Tensor], hidden: torch.Tensor):
        """HF's own bidirectional mask for its attention implementation (may be None)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def max_positions(self) -> Optional[int]:
        """The longest input the position embeddings take (None: no limit known)."""
        return getattr(self.config, "max_position_embeddings", None)


class BertAdapter(EncoderAdapter):
    model_types = ("bert",)

    @property
    def base(self):
        return self.model.bert

    def final_head(self):
        if self.base.pooler is None:
            raise ValueError("this BERT model has no pooler; the early-exit heads need one")
        return HeadLinears(self.base.pooler.dense, self.model.classifier, self.model.dropout)


class RobertaAdapter(EncoderAdapter):
    model_types = ("roberta", "xlm-roberta")

    @property
    def base(self):
        return self.model.roberta

    def final_head(self):
        head = self.model.classifier
        return HeadLinears(head.dense, head.out_proj, head.dropout)

    def classify(self, hidden, input_ids, attention_mask):
        return self.model.classifier(hidden)  # dropout, dense, tanh, dropout, out_proj on [CLS]


class AlbertAdapter(EncoderAdapter):
    model_types = ("albert",)

    @property
    def base(self):
        return self.model.albert

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        e = self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        return self.base.encoder.embedding_hidden_mapping_in(e)

    def _group(self, i: int) -> int:
        cfg = self.config
        return int(i / (cfg.num_hidden_layers / cfg.num_hidden_groups))  # as AlbertTransformer.forward

    def layer_module(self, i):
        return self.base.encoder.albert_layer_groups[self._group(i)]

    def inner_layer(self, i: int) -> nn.Module:
        """The single ``AlbertLayer`` of layer i's group (what :mod:`~eekernels.hf.layer_parts` splits)."""
        layers = self.layer_module(i).albert_layers
        if len(layers) != 1:
            raise ValueError(f"ALBERT with inner_group_num={len(layers)} is not supported here (1 is)")
        return layers[0]

    def final_head(self):
        if self.base.pooler is None:
            raise ValueError("this ALBERT model has no pooler; the early-exit heads need one")
        return HeadLinears(self.base.pooler, self.model.classifier, self.model.dropout)


class BartEncoderAdapter(EncoderAdapter):
    """The encoder of a ``BartForSequenceClassification`` (token-level exit in the encoder;
    the decoder and the classification head run in full on its output, as HF does)."""

    model_types = ("bart",)
    has_cls_head = False

    @property
    def base(self):
        return self.model.model

    @property
    def encoder(self) -> nn.Module:
        return self.model.model.encoder

    @property
    def num_layers(self) -> int:
        return self.config.encoder_layers

    def shape(self):
        c = self.config
        return c.d_model, c.encoder_ffn_dim, c.encoder_attention_heads

    def layer_module(self, i):
        return self.encoder.layers[i]

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        enc = self.encoder
        x = enc.embed_tokens(input_ids)  # scaled word embeddings
        x = x + enc.embed_positions(input_ids).to(x.device)
        x = enc.layernorm_embedding(x)
        return nn.functional.dropout(x, p=enc.dropout, training=enc.training)

    def attention_mask(self, attention_mask, hidden):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def final_head(self):
        raise ValueError("BART's head is its decoder: it has no [CLS] head for per-layer exits")

    def classify(self, hidden, input_ids, attention_mask):
        from transformers.modeling_outputs import BaseModelOutput

        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          encoder_outputs=BaseModelOutput(last_hidden_state=hidden)).logits


ADAPTERS = (BertAdapter, RobertaAdapter, AlbertAdapter, BartEncoderAdapter)


def backbone_pooling(path: str) -> str:
    """How the checkpoint in ``path`` summarises a sentence: "mean" when it is a
    sentence-transformers model trained with mean pooling (its ``1_Pooling/config.json``
    says ``pooling_mode_mean_tokens``), else "cls" (BERT-style classifiers)."""
    import json
    import os

    cfg = os.path.join(path, "1_Pooling", "config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            return "mean" if json.load(f).get("pooling_mode_mean_tokens") else "cls"
    except (OSError, ValueError):
        return "cls"


def adapter_for(model: nn.Module, per_layer_exits: bool = True) -> EncoderAdapter:
    """The adapter for an HF ``*ForSequenceClassification`` model, or a clear ValueError.

    ``per_layer_exits`` (default) admits only models whose head is a pooler + classifier on
    [CLS] (BERT, RoBERTa, ALBERT); without it the BART encoder is admitted too.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types and (cls.has_cls_head or not per_layer_exits):
            adapter = cls(model)
            if not type(model).__name__.endswith("ForSequenceClassification"):
                raise ValueError(f"eekernels: {type(model).__name__} is not a {mt} sequence classifier")
            try:
                adapter.base
                if cls.has_cls_head:
                    adapter.final_head()
            except AttributeError as e:
                raise ValueError(f"eekernels: {type(model).__name__} is not a {mt} sequence classifier ({e})") from None
            return adapter
    supported = sorted(t for c in ADAPTERS for t in c.model_types if c.has_cls_head or not per_layer_exits)
    raise ValueError(
        f"eekernels: unsupported model {type(model).__name__} (model_type={mt!r}); "
        f"supported: {supported} (sequence classifiers or base models)"
    )
