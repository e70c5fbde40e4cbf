"""Drop-in modules built on the ops: exit heads and what they read of a layer, policy nets,
past-state pooling, imitation learners and gates, distillation teachers, token hash tables."""

from .distillation import AttentionTeacher, ensemble_distillation_loss, exit_ce_loss, mpee_loss
from .exit_head import POOLINGS, ExitHead, layer_summary
from .policy import PolicyNet

__all__ = ["AttentionTeacher", "ExitHead", "POOLINGS", "PolicyNet", "ensemble_distillation_loss", "exit_ce_loss",
           "layer_summary", "mpee_loss"]
