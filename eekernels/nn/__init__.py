"""Drop-in modules built on the ops (exit heads, and later poolers, gates, pruners)."""

from .exit_head import ExitHead

__all__ = ["ExitHead"]
