"""Layer-by-layer access to Hugging Face encoder classifiers (BERT, RoBERTa, ALBERT).

An adapter exposes what the early-exit engine needs from a ``*ForSequenceClassification``
model, reusing the HF modules and weights as they are:

- :meth:`embed` (embeddings, and ALBERT's embedding->hidden projection),
- :meth:`attention_mask` (the mask HF's own forward builds for its attention backend),
- :meth:`layer` (the module that runs layer i; ALBERT shares one layer's weights across
  depth, so several indices map to the same module),
- :meth:`final_head` (the model's own pooler dense + classifier, as two ``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class HeadLinears:
    """An exit head as the exit_head op sees it: pooler dense (then tanh) and classifier."""

    pooler: Optional[nn.Linear]
    classifier: nn.Linear


class EncoderAdapter:
    """Base class; subclasses bind one HF architecture."""

    model_types: tuple = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- what subclasses provide
    @property
    def base(self) -> nn.Module:
        raise NotImplementedError

    def layer(self, i: int) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """Layer i (0-based) as ``f(hidden, mask)``; BERT-style encoders keep them in ``encoder.layer``."""
        mod = self.base.encoder.layer[i]
        return lambda h, m: mod(h, m)

    def final_head(self) -> HeadLinears:
        raise NotImplementedError

    # -- shared
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def attention_mask(self, attention_mask: Optional[torch.Tensor], hidden: torch.Tensor):
        """HF's own bidirectional mask for its attention implementation (may be None)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)


class BertAdapter(EncoderAdapter):
    model_types = ("bert",)

    @property
    def base(self):
        return self.model.bert

    def final_head(self):
        if self.base.pooler is None:
            raise ValueError("this BERT model has no pooler; the early-exit heads need one")
        return HeadLinears(self.base.pooler.dense, self.model.classifier)


class RobertaAdapter(EncoderAdapter):
    model_types = ("roberta", "xlm-roberta")

    @property
    def base(self):
        return self.model.roberta

    def final_head(self):
        return HeadLinears(self.model.classifier.dense, self.model.classifier.out_proj)


class AlbertAdapter(EncoderAdapter):
    model_types = ("albert",)

    @property
    def base(self):
        return self.model.albert

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        e = self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        return self.base.encoder.embedding_hidden_mapping_in(e)

    def layer(self, i):
        cfg = self.config
        group = int(i / (cfg.num_hidden_layers / cfg.num_hidden_groups))  # as AlbertTransformer.forward
        mod = self.base.encoder.albert_layer_groups[group]
        return lambda h, m: mod(h, m)

    def final_head(self):
        if self.base.pooler is None:
            raise ValueError("this ALBERT model has no pooler; the early-exit heads need one")
        return HeadLinears(self.base.pooler, self.model.classifier)


ADAPTERS = (BertAdapter, RobertaAdapter, AlbertAdapter)


def adapter_for(model: nn.Module) -> EncoderAdapter:
    """The adapter for an HF ``*ForSequenceClassification`` model, or a clear error."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types:
            adapter = cls(model)
            try:
                adapter.base
                adapter.final_head()
            except AttributeError as e:
                raise ValueError(
                    f"eekernels.convert: {type(model).__name__} is not a {mt} sequence classifier ({e})"
                ) from None
            return adapter
    supported = sorted(t for c in ADAPTERS for t in c.model_types)
    raise ValueError(
        f"eekernels.convert: unsupported model {type(model).__name__} (model_type={mt!r}); "
        f"supported: {supported} (sequence classifiers or base models)"
    )
