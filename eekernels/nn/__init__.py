"""Drop-in modules built on the ops (exit heads, policy nets, and later poolers, gates, pruners)."""

from .exit_head import ExitHead
from .policy import PolicyNet

__all__ = ["ExitHead", "PolicyNet"]
