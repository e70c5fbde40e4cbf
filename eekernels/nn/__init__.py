"""Drop-in modules built on the ops (exit heads, policy nets, and later poolers, gates, pruners)."""

from .distillation import AttentionTeacher, ensemble_distillation_loss, exit_ce_loss, mpee_loss
from .exit_head import ExitHead
from .policy import PolicyNet

__all__ = ["AttentionTeacher", "ExitHead", "PolicyNet", "ensemble_distillation_loss", "exit_ce_loss", "mpee_loss"]
