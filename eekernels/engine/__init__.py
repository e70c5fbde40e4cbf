"""Batched early-exit inference (row compaction; later token packing and graphs)."""

from .batched import EarlyExitOutput, early_exit_forward

__all__ = ["EarlyExitOutput", "early_exit_forward"]
