"""Plain-torch baselines for the token ops benchmarks: what a user would write with
gather / index_copy_ / scatter, without syncs where the op has none.

These are speed baselines, not specifications (``eekernels/ops/tokens.py`` holds the
reference); ``mpee_prune_torch`` follows the reference exactly for finite memory values.
"""

import torch

from eekernels.ops import mpee_kept_width


def pack_tokens_torch(hidden, active):
    """nonzero (one sync) + index_select of the active rows."""
    b, s, h = hidden.shape
    index = active.reshape(-1).nonzero().reshape(-1)
    return hidden.reshape(b * s, h).index_select(0, index), index


def pack_tokens_padded_torch(hidden, active):
    """Rank within each sample (cumsum), M read back (one sync), then one scatter."""
    b, s, h = hidden.shape
    lengths = active.sum(1)
    m = int(lengths.max())
    rank = active.long().cumsum(1) - 1
    dest = torch.where(active, rank, m)  # inactive tokens go to a dropped extra slot
    out = hidden.new_zeros(b, m + 1, h)
    out.scatter_(1, dest[:, :, None].expand(b, s, h), hidden)
    return out[:, :m], lengths


def scatter_tokens_torch(hidden, index, values):
    """index_copy_ of the packed rows (varlen index, no -1 entries)."""
    b, s, h = hidden.shape
    hidden.view(b * s, h).index_copy_(0, index, values)
    return hidden


def mpee_prune_torch(hidden, valid, memory, attention, keep_ratio):
    """Vectorised MPEE pruning (eq. 7-8) without host syncs: a stable sort for the ranks,
    a cumsum for the slots, scatters for the rows, a masked weighted sum for the fusion."""
    b, s, h = hidden.shape
    w = mpee_kept_width(s, keep_ratio)
    dev = hidden.device
    cand = valid.clone()
    cand[:, 0] = False
    n = cand.sum(1)
    m = torch.ceil(keep_ratio * n.double() - 1e-6).long()
    key = torch.where(cand, memory, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s, device=dev).expand(b, s).contiguous())
    kept = cand & (rank < m[:, None])
    fused = cand & ~kept
    dest = torch.where(kept, kept.long().cumsum(1), w)  # slot 1.. for kept, w = dropped
    dest[:, 0] = 0
    out_h = hidden.new_zeros(b, w + 1, h)
    out_h.scatter_(1, dest[:, :, None].expand(b, s, h), hidden)
    weights = torch.where(fused, attention, 0.0)
    fusion = torch.einsum("bs,bsh->bh", weights, hidden.float()).to(hidden.dtype)
    has = fused.any(1)
    fslot = (1 + m)[:, None, None].expand(b, 1, h)
    out_h.scatter_(1, fslot, torch.where(has[:, None], fusion, 0.0)[:, None, :].to(hidden.dtype))
    out_mem = torch.zeros(b, w + 1, device=dev).scatter_(1, dest, memory)
    out_mem.scatter_(1, 1 + m[:, None], torch.where(has, (memory * fused).sum(1), 0.0)[:, None])
    out_valid = torch.zeros(b, w + 1, dtype=torch.bool, device=dev).scatter_(1, dest, torch.ones_like(valid))
    out_valid.scatter_(1, 1 + m[:, None], has[:, None])
    pos = torch.arange(s, device=dev).expand(b, s)
    out_src = torch.full((b, w + 1), -1, dtype=torch.int64, device=dev).scatter_(1, dest, pos)
    out_src.scatter_(1, 1 + m[:, None], -1)
    return out_h[:, :w], out_valid[:, :w], out_mem[:, :w], out_src[:, :w]
