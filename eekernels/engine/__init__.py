"""Batched early-exit inference (row compaction; later token packing and graphs)."""

from .batched import EarlyExitOutput, ExitDecision, ExitHeadRule, ExitRule, early_exit_forward
from .mpee import TokenExitOutput, TokenPruning, token_pruning_forward

__all__ = ["EarlyExitOutput", "ExitDecision", "ExitHeadRule", "ExitRule", "TokenExitOutput", "TokenPruning",
           "early_exit_forward", "token_pruning_forward"]
