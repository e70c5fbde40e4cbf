"""Batched early-exit inference: the row-compacting engine (``batched``), the fixed-capacity
engine with device-side decisions (``graphed``), MPEE's token-pruning engine (``mpee``) and
HashEE's token-exit engine (``tokens``)."""

from .batched import EarlyExitOutput, ExitDecision, ExitHeadRule, ExitRule, early_exit_forward
from .graphed import fixed_capacity_forward, row_buckets
from .mpee import TokenExitOutput, TokenPruning, token_pruning_forward

__all__ = ["EarlyExitOutput", "ExitDecision", "ExitHeadRule", "ExitRule", "TokenExitOutput", "TokenPruning",
           "early_exit_forward", "fixed_capacity_forward", "row_buckets", "token_pruning_forward"]
