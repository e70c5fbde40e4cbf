"""The early-exit model contract (:mod:`~eekernels.models.base`) and the per-layer exit model
made from BERT, RoBERTa and ALBERT classifiers (:mod:`~eekernels.models.early_exit`)."""

from .base import EarlyExitBase, EarlyExitTrainOutput, read_config
from .early_exit import EarlyExitModel, convert

__all__ = ["EarlyExitBase", "EarlyExitModel", "EarlyExitTrainOutput", "convert", "read_config"]
