"""Hugging Face integration: the only package that knows HF internals (adapters per
architecture, layers split into parts for token-level methods)."""

from .adapters import ADAPTERS, EncoderAdapter, HeadLinears, adapter_for
from .layer_parts import LayerParts, key_valid_mask, layer_parts

__all__ = ["ADAPTERS", "EncoderAdapter", "HeadLinears", "LayerParts", "adapter_for", "key_valid_mask", "layer_parts"]
