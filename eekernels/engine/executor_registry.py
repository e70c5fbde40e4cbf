"""The layer executors ``early_exit(executor=NAME)`` selects by name.

Kept apart from :mod:`eekernels.engine.executors` (the interface and the torch executors) so
that executors built on it, such as :mod:`eekernels.engine.ort`, import the interface
without a circle."""

from __future__ import annotations

from typing import Dict

from .executors import HFExecutor, PartsExecutor
from .ort import OrtExecutor, OrtInt8Executor

__all__ = ["EXECUTORS", "register_executor"]

#: executor name -> class, for ``early_exit(executor=NAME)``
EXECUTORS: Dict[str, type] = {}


def register_executor(cls: type) -> type:
    """Make an executor class selectable by its ``name``."""
    EXECUTORS[cls.name] = cls
    return cls


for _cls in (HFExecutor, PartsExecutor, OrtExecutor, OrtInt8Executor):
    register_executor(_cls)
