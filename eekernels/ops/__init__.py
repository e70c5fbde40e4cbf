"""The ops: one module per op family, each with its plain-PyTorch reference (the spec),
argument validation and backend dispatch."""

from .compaction import (
    CompactedRows,
    compact_rows,
    compact_rows_reference,
    scatter_exits,
    scatter_exits_reference,
)
from .exit_head import CRITERIA, ExitHeadOutput, exit_head, exit_head_reference
from .tokens import (
    PackedTokens,
    PaddedTokens,
    PrunedTokens,
    mpee_kept_width,
    mpee_prune,
    mpee_prune_differentiable,
    mpee_prune_reference,
    pack_tokens,
    pack_tokens_padded,
    pack_tokens_padded_reference,
    pack_tokens_reference,
    scatter_tokens,
    scatter_tokens_reference,
)

__all__ = [
    "CRITERIA",
    "CompactedRows",
    "ExitHeadOutput",
    "compact_rows",
    "compact_rows_reference",
    "exit_head",
    "exit_head_reference",
    "scatter_exits",
    "scatter_exits_reference",
    "PackedTokens",
    "PaddedTokens",
    "PrunedTokens",
    "mpee_kept_width",
    "mpee_prune",
    "mpee_prune_differentiable",
    "mpee_prune_reference",
    "pack_tokens",
    "pack_tokens_padded",
    "pack_tokens_padded_reference",
    "pack_tokens_reference",
    "scatter_tokens",
    "scatter_tokens_reference",
]
