"""Hugging Face integration: early-exit models made from BERT, RoBERTa and ALBERT."""

from .backbones import adapter_for
from .early_exit import EarlyExitModel, EarlyExitTrainOutput, convert

__all__ = ["EarlyExitModel", "EarlyExitTrainOutput", "adapter_for", "convert"]
