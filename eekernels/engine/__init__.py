"""Batched early-exit inference (row compaction; later token packing and graphs)."""

from .batched import EarlyExitOutput, ExitDecision, ExitHeadRule, ExitRule, early_exit_forward

__all__ = ["EarlyExitOutput", "ExitDecision", "ExitHeadRule", "ExitRule", "early_exit_forward"]
