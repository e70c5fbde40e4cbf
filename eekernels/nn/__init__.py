"""Drop-in modules built on the ops (exit heads, and later poolers, gates, pruners)."""

from .distillation import AttentionTeacher, ensemble_distillation_loss, exit_ce_loss, mpee_loss
from .exit_head import ExitHead

__all__ = ["AttentionTeacher", "ExitHead", "ensemble_distillation_loss", "exit_ce_loss", "mpee_loss"]
