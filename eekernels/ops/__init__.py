"""The ops: one module per op family, each with its plain-PyTorch reference (the spec),
argument validation and backend dispatch."""

from .exit_head import CRITERIA, ExitHeadOutput, exit_head, exit_head_reference

__all__ = ["CRITERIA", "ExitHeadOutput", "exit_head", "exit_head_reference"]
