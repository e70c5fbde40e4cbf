"""One Hugging Face encoder layer split into the pieces token-level methods need.

Token-level early exit (HashEE, MPEE) does not run a layer as one call: queries, the
attention output and the FFN are computed for some tokens only, while keys and values
come from all tokens (HashEE, hashee.txt A.4 eq. 1-5), or the [CLS] row of the attention
probabilities is needed (MPEE's class attention, mpee.txt eq. 5). :class:`LayerParts`
exposes those pieces for one layer, reusing the HF modules and weights as they are::

    k, v = parts.keys_values(x_all)             # [B, nh, S, d] each, from every token
    q    = parts.queries(x_q)                   # [B, nh, M, d], any subset of tokens
    ctx  = parts.attention(q, k, v, key_valid)  # [B, M, H]
    out  = parts.output(ctx, x_q)               # attention projection + residual/LN + FFN (+LN)

With ``x_q = x_all`` this is exactly the HF layer (:meth:`LayerParts.forward`). Dropout
follows the modules' training flag as in HF, so the pieces also serve training.

Supported: BERT and RoBERTa (``BertLayer``/``RobertaLayer``), ALBERT (``AlbertLayer``,
whose weights are shared across depth) and BART-style encoder layers
(``BartEncoderLayer``: post-LayerNorm, ``q_proj``/``k_proj``/``v_proj``/``out_proj``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerParts", "layer_parts", "key_valid_mask"]


def key_valid_mask(key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bool [B, S] (True = a real token) -> the [B, 1, 1, S] mask SDPA broadcasts."""
    if key_valid is None:
        return None
    if key_valid.dtype != torch.bool or key_valid.dim() != 2:
        raise ValueError(f"key_valid must be a bool [B, S] tensor, got {key_valid.dtype} {tuple(key_valid.shape)}")
    return key_valid[:, None, None, :]


class LayerParts:
    """Pieces of one encoder layer (see the module docstring); subclasses bind a layer type."""

    def __init__(self, layer: nn.Module, num_heads: int, hidden_size: int, scaling: float):
        self.layer = layer
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.head_dim = hidden_size // num_heads
        self.scaling = scaling

    # -- what subclasses provide: the projections and the attention-dropout module
    def _q(self, x):
        raise NotImplementedError

    def _k(self, x):
        raise NotImplementedError

    def _v(self, x):
        raise NotImplementedError

    def _attention_dropout_p(self) -> float:
        raise NotImplementedError

    def output(self, context: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        """Attention output projection, residual + LayerNorm, FFN (and its LayerNorm).

        Args:
            context: [B, M, H] attention context of the M query tokens.
            x_q: [B, M, H] the same tokens' layer inputs (the residual).
        """
        raise NotImplementedError

    # -- shared
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token: x [B, S, H] -> ([B, nh, S, d], [B, nh, S, d])."""
        return self._heads(self._k(x)), self._heads(self._v(x))

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Queries of some tokens: x [B, M, H] -> [B, nh, M, d] (unscaled; see :meth:`attention`)."""
        return self._heads(self._q(x))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T * scaling + mask) v, heads merged: [B, nh, M, d] -> [B, M, H].

        ``key_valid`` bool [B, S] masks padded keys (None: every key counts).
        """
        p = self._attention_dropout_p() if self.layer.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid_mask(key_valid), dropout_p=p,
                                             scale=self.scaling)
        b, _, m, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, m, self.hidden_size)

    def class_attention(self, q_cls: torch.Tensor, k: torch.Tensor,
                        key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MPEE's class attention (mpee.txt eq. 5): the [CLS] row of the attention
        probabilities, averaged over heads. q_cls [B, nh, 1, d] -> float32 [B, S];
        padded keys get 0. Dropout never applies (it is a score, not a layer output)."""
        # The product in the inputs' dtype (no float32 copy of all keys), the softmax in float32.
        scores = torch.matmul(q_cls, k.transpose(-1, -2)).float() * self.scaling  # [B, nh, 1, S]
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid_mask(key_valid), float("-inf"))
        return torch.softmax(scores, dim=-1).mean(dim=1)[:, 0]

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole layer on x [B, S, H] (every token a query): equals the HF layer."""
        k, v = self.keys_values(x)
        return self.output(self.attention(self.queries(x), k, v, key_valid), x)

    __call__ = forward


class BertLayerParts(LayerParts):
    """``BertLayer`` / ``RobertaLayer`` (post-LN; intermediate + output FFN)."""

    def __init__(self, layer: nn.Module):
        sa = layer.attention.self
        super().__init__(layer, sa.num_attention_heads, sa.all_head_size, sa.scaling)
        self._sa = sa

    def _q(self, x):
        return self._sa.query(x)

    def _k(self, x):
        return self._sa.key(x)

    def _v(self, x):
        return self._sa.value(x)

    def _attention_dropout_p(self):
        return self._sa.dropout.p

    def output(self, context, x_q):
        attn = self.layer.attention.output(context, x_q)  # dense, dropout, LayerNorm(+ residual)
        return self.layer.output(self.layer.intermediate(attn), attn)


class AlbertLayerParts(LayerParts):
    """``AlbertLayer`` (one module shared by several depths)."""

    def __init__(self, layer: nn.Module):
        at = layer.attention
        super().__init__(layer, at.num_attention_heads, at.all_head_size, at.scaling)
        self._at = at

    def _q(self, x):
        return self._at.query(x)

    def _k(self, x):
        return self._at.key(x)

    def _v(self, x):
        return self._at.value(x)

    def _attention_dropout_p(self):
        return self._at.attention_dropout.p

    def output(self, context, x_q):
        at, ly = self._at, self.layer
        attn = at.LayerNorm(x_q + at.output_dropout(at.dense(context)))
        return ly.full_layer_layer_norm(ly.ff_chunk(attn) + attn)


class BartEncoderLayerParts(LayerParts):
    """``BartEncoderLayer`` (post-LN; fc1/fc2 FFN)."""

    def __init__(self, layer: nn.Module):
        sa = layer.self_attn
        super().__init__(layer, sa.num_heads, sa.embed_dim, sa.scaling)
        self._sa = sa

    def _q(self, x):
        return self._sa.q_proj(x)

    def _k(self, x):
        return self._sa.k_proj(x)

    def _v(self, x):
        return self._sa.v_proj(x)

    def _attention_dropout_p(self):
        return self._sa.dropout

    def output(self, context, x_q):
        ly = self.layer
        h = F.dropout(self._sa.out_proj(context), p=ly.dropout, training=ly.training)
        h = ly.self_attn_layer_norm(x_q + h)
        f = F.dropout(ly.activation_fn(ly.fc1(h)), p=ly.activation_dropout, training=ly.training)
        f = F.dropout(ly.fc2(f), p=ly.dropout, training=ly.training)
        return ly.final_layer_norm(h + f)


_PARTS = {
    "BertLayer": BertLayerParts,
    "RobertaLayer": BertLayerParts,
    "XLMRobertaLayer": BertLayerParts,
    "AlbertLayer": AlbertLayerParts,
    "BartEncoderLayer": BartEncoderLayerParts,
}


def _encoder_layer_module(model, i: int) -> nn.Module:
    """Layer i (0-based) of an HF encoder classifier, an adapter, a BART-style encoder or a layer."""
    from .adapters import AlbertAdapter, EncoderAdapter, adapter_for

    if isinstance(model, nn.Module) and type(model).__name__ in _PARTS:
        return model
    if isinstance(model, nn.Module) and hasattr(model, "layers") and hasattr(model, "embed_tokens"):
        return model.layers[i]  # a BART-style encoder
    adapter = model if isinstance(model, EncoderAdapter) else adapter_for(model, per_layer_exits=False)
    if isinstance(adapter, AlbertAdapter):
        try:
            return adapter.inner_layer(i)
        except ValueError as e:
            raise ValueError(f"layer_parts: {e}") from None
    return adapter.layer_module(i)


def layer_parts(model, i: int) -> LayerParts:
    """The :class:`LayerParts` of layer ``i`` (0-based).

    Args:
        model: an HF BERT/RoBERTa/ALBERT sequence classifier, an
            :class:`~eekernels.hf.adapters.EncoderAdapter`, a BART-style encoder
            (a module with ``layers`` and ``embed_tokens``), or a layer module itself.
        i: 0-based layer index (ALBERT: the shared layer of that depth's group).
    """
    layer = _encoder_layer_module(model, i)
    cls = _PARTS.get(type(layer).__name__)
    if cls is None:
        raise ValueError(f"layer_parts: unsupported layer type {type(layer).__name__}; "
                         f"supported: {sorted(_PARTS)}")
    return cls(layer)
