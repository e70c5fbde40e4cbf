"""Batched early-exit inference: the one layer loop (:mod:`~eekernels.engine.loop`) and what
plugs into it: executors (what runs a layer), exit rules (what decides), placements (what
leaving means: row compaction, fixed capacity), the CUDA-graph capture, and the
token-level executors of HashEE and MPEE."""

from .executor_registry import EXECUTORS, register_executor
from .executors import HFExecutor, LayerExecutor, PartsExecutor
from .fixed import FixedCapacity, row_buckets
from .loop import EarlyExitOutput, RowCompaction, run_early_exit
from .rows import Rows
from .rules import ExitDecision, ExitHeadRule, ExitRule

__all__ = ["EXECUTORS", "EarlyExitOutput", "ExitDecision", "ExitHeadRule", "ExitRule", "FixedCapacity", "HFExecutor",
           "LayerExecutor", "PartsExecutor", "RowCompaction", "Rows", "register_executor", "row_buckets",
           "run_early_exit"]
