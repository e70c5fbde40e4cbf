"""State incorporation G (past-future.txt section 3.1, eq. 1 and eq. 6).

G maps a sequence of K states ``s_1..s_K`` (each [H], batched as ``[N, K, H]``) to one
state [H]. past-future.txt uses it twice: over the real [CLS] states of layers 1..i
(the global past state ``s_p = G(s_1:i)``, eq. 1) and over the imitated future states
(``s_f = G(s^_{i+1:n})``, eq. 6). The five strategies of the paper (Table 3):

============  ==================================================================
``max``       element-wise max over the K states
``avg``       element-wise mean over the K states
``attn``      softmax attention over the K states, query = the last state s_K
``concat``    concatenate the K states, one linear map [K*H] -> [H] per K
``lstm``      an LSTM over s_1..s_K, the hidden output of the last step
============  ==================================================================

Every strategy has two forms:

- the **full form** ``forward(states)`` on ``[N, K, H]`` (training, and the future
  state at inference, where all K approximations exist at once);
- the **incremental form** for inference over the past, one state per layer without
  recomputing the earlier ones: ``state = init_state(N, device, dtype)``, then for
  k = 1, 2, ...: ``state = update(state, s_k, k)`` and ``read(state, k) == forward(s_1:k)``.
  The state is a dict of tensors with N rows, so the early-exit engine can compact it
  with the rows that stay. max keeps a running max, avg a running sum, lstm the (h, c)
  of one LSTM step per layer; attn and concat cannot be summarised (the attention query
  and the linear map change with K), so they keep the stack of the states seen so far,
  preallocated as ``[N, max_states, H]``.

``forward_prefixes(states)`` gives ``G(s_1:k)`` for every k = 1..K at once ([N, K, H]),
cheaply where the strategy allows (cummax, cumsum, one LSTM pass); ``prefixes(states,
counts)`` gives it for the k in ``counts`` only (the training path: the exit layers), so
a concat pooling needs a linear map only for the prefix lengths its exits use.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch
from torch import nn

__all__ = [
    "STRATEGIES",
    "StatePooling",
    "MaxPooling",
    "AvgPooling",
    "AttnPooling",
    "ConcatPooling",
    "LSTMPooling",
    "build_pooling",
]

#: The strategies of past-future.txt section 3.1 (Table 3, "Our global strategies").
STRATEGIES = ("max", "avg", "attn", "concat", "lstm")

State = Dict[str, torch.Tensor]


class StatePooling(nn.Module):
    """Base class of the strategies G: see the module docstring for the contract.

    Args:
        hidden: state size H.
        max_states: the largest K the incremental form must hold (the stack size for
            attn/concat); the full form takes any K the strategy supports.
    """

    strategy: str = ""

    def __init__(self, hidden: int, max_states: int):
        super().__init__()
        if hidden < 1 or max_states < 1:
            raise ValueError(f"{type(self).__name__}: need hidden >= 1 and max_states >= 1, got {hidden}, {max_states}")
        self.hidden = hidden
        self.max_states = max_states

    # -- shared argument checks
    def _check_states(self, states: torch.Tensor) -> None:
        if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[2] != self.hidden:
            shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"{type(self).__name__}: states must be [N, K, {self.hidden}], got {shape}")
        if states.shape[1] < 1:
            raise ValueError(f"{type(self).__name__}: need at least one state (K >= 1), got K=0")

    def _check_step(self, s: torch.Tensor, k: int) -> None:
        if s.dim() != 2 or s.shape[1] != self.hidden:
            raise ValueError(f"{type(self).__name__}: a state must be [N, {self.hidden}], got {tuple(s.shape)}")
        if not 1 <= k <= self.max_states:
            raise ValueError(f"{type(self).__name__}: k is 1-based and at most max_states={self.max_states}, got {k}")

    # -- full form
    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """G(s_1..s_K): [N, K, H] -> [N, H]."""
        raise NotImplementedError

    def forward_prefixes(self, states: torch.Tensor) -> torch.Tensor:
        """G(s_1..s_k) for k = 1..K: [N, K, H] -> [N, K, H] (row k-1 is the k-prefix)."""
        self._check_states(states)
        return torch.stack([self(states[:, :k]) for k in range(1, states.shape[1] + 1)], dim=1)

    def prefixes(self, states: torch.Tensor, counts: Iterable[int]) -> torch.Tensor:
        """G(s_1..s_k) for each k in ``counts`` (1-based prefix lengths, each <= K), in that
        order: [N, K, H] -> [N, len(counts), H]."""
        self._check_states(states)
        ks = self._check_counts(counts, states.shape[1])
        return self.forward_prefixes(states[:, :max(ks)])[:, [k - 1 for k in ks]]

    def _check_counts(self, counts: Iterable[int], k_max: int):
        ks = [int(k) for k in counts]
        if not ks or min(ks) < 1 or max(ks) > k_max:
            raise ValueError(f"{type(self).__name__}: prefix lengths must be within [1, {k_max}], got {ks}")
        return ks

    # -- incremental form
    def init_state(self, batch_size: int, device, dtype) -> State:
        """The state before any layer: tensors with ``batch_size`` rows."""
        raise NotImplementedError

    def update(self, state: State, s: torch.Tensor, k: int) -> State:
        """Fold in ``s`` [N, H], the k-th state (1-based); returns the new state."""
        raise NotImplementedError

    def read(self, state: State, k: int) -> torch.Tensor:
        """G(s_1..s_k) [N, H] from the state after k updates."""
        raise NotImplementedError


class MaxPooling(StatePooling):
    """Element-wise max over the states; incremental: a running max."""

    strategy = "max"

    def forward(self, states):
        self._check_states(states)
        return states.amax(dim=1)

    def forward_prefixes(self, states):
        self._check_states(states)
        return states.cummax(dim=1).values

    def init_state(self, batch_size, device, dtype):
        return {"max": torch.full((batch_size, self.hidden), -math.inf, device=device, dtype=dtype)}

    def update(self, state, s, k):
        self._check_step(s, k)
        return {"max": torch.maximum(state["max"], s)}

    def read(self, state, k):
        return state["max"]


class AvgPooling(StatePooling):
    """Element-wise mean over the states; incremental: a running sum divided by k."""

    strategy = "avg"

    def forward(self, states):
        self._check_states(states)
        return states.mean(dim=1)

    def forward_prefixes(self, states):
        self._check_states(states)
        k = torch.arange(1, states.shape[1] + 1, device=states.device, dtype=states.dtype)
        return states.cumsum(dim=1) / k[None, :, None]

    def init_state(self, batch_size, device, dtype):
        return {"sum": torch.zeros(batch_size, self.hidden, device=device, dtype=dtype)}

    def update(self, state, s, k):
        self._check_step(s, k)
        return {"sum": state["sum"] + s}

    def read(self, state, k):
        return state["sum"] / k


class _StackPooling(StatePooling):
    """Strategies that need every state seen so far: the incremental state is the stack
    ``[N, max_states, H]``, filled one slot per update; ``read(k)`` is ``forward`` on
    its first k slots, which hold exactly s_1..s_k."""

    def init_state(self, batch_size, device, dtype):
        return {"stack": torch.zeros(batch_size, self.max_states, self.hidden, device=device, dtype=dtype)}

    def update(self, state, s, k):
        self._check_step(s, k)
        stack = state["stack"]
        stack[:, k - 1] = s  # in place: the engine hands over fresh (compacted) tensors
        return {"stack": stack}

    def read(self, state, k):
        return self(state["stack"][:, :k])

    def prefixes(self, states, counts):
        # G is computed afresh for each prefix: only the requested ones
        self._check_states(states)
        return torch.stack([self(states[:, :k]) for k in self._check_counts(counts, states.shape[1])], dim=1)


class AttnPooling(_StackPooling):
    """Attentive pooling: weights ``softmax_k(q . s_k / sqrt(H))`` with the query
    ``q = W_q s_K + b_q`` computed from the last state s_K (section 3.1), output
    ``sum_k weight_k s_k``."""

    strategy = "attn"

    def __init__(self, hidden: int, max_states: int):
        super().__init__(hidden, max_states)
        self.query = nn.Linear(hidden, hidden)

    def forward(self, states):
        self._check_states(states)
        q = self.query(states[:, -1])  # [N, H], the last state as the query
        scores = torch.einsum("nkh,nh->nk", states, q) / math.sqrt(self.hidden)
        w = torch.softmax(scores.float(), dim=1).to(states.dtype)
        return torch.einsum("nk,nkh->nh", w, states)


class ConcatPooling(_StackPooling):
    """Concatenation + linear: ``W_K [s_1; ...; s_K] + b_K``, one linear map per K.

    Args:
        hidden: H.
        max_states: largest K.
        counts: the K values that get a map (default 1..max_states); a model whose exits
            sit at a subset of layers needs only those, which saves parameters
            (K*H*H each).

    Each map starts as the mean of its K states (weight blocks I/K, bias 0), so an
    untrained concat pooling is avg pooling.
    """

    strategy = "concat"

    def __init__(self, hidden: int, max_states: int, counts: Optional[Iterable[int]] = None):
        super().__init__(hidden, max_states)
        counts = sorted(set(range(1, max_states + 1) if counts is None else counts))
        if not counts or counts[0] < 1 or counts[-1] > max_states:
            raise ValueError(f"ConcatPooling: counts must be within [1, {max_states}], got {counts}")
        self.counts = counts
        self.linears = nn.ModuleDict()
        for k in counts:
            lin = nn.Linear(k * hidden, hidden)
            with torch.no_grad():
                lin.weight.copy_(torch.eye(hidden).repeat(1, k) / k)
                lin.bias.zero_()
            self.linears[str(k)] = lin

    def forward(self, states):
        self._check_states(states)
        n, k, h = states.shape
        lin = self.linears[str(k)] if str(k) in self.linears else None
        if lin is None:
            raise ValueError(f"ConcatPooling: no linear map for K={k} states; this pooling has maps for K in {self.counts}")
        return lin(states.reshape(n, k * h))


class LSTMPooling(StatePooling):
    """An LSTM (hidden size H) over s_1..s_K; G is the hidden output of the last step.

    The full form runs ``nn.LSTM`` over the sequence; the incremental form does one LSTM
    cell step per layer with the same weights (gates i, f, g, o in PyTorch's order) and
    keeps (h, c) per row.
    """

    strategy = "lstm"

    def __init__(self, hidden: int, max_states: int):
        super().__init__(hidden, max_states)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)

    def forward(self, states):
        return self.forward_prefixes(states)[:, -1]

    def forward_prefixes(self, states):
        self._check_states(states)
        out, _ = self.lstm(states)  # [N, K, H]: the hidden output after each step
        return out

    def init_state(self, batch_size, device, dtype):
        z = torch.zeros(batch_size, self.hidden, device=device, dtype=dtype)
        return {"h": z, "c": z.clone()}

    def update(self, state, s, k):
        self._check_step(s, k)
        l = self.lstm
        gates = (nn.functional.linear(s, l.weight_ih_l0, l.bias_ih_l0)
                 + nn.functional.linear(state["h"], l.weight_hh_l0, l.bias_hh_l0))
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * state["c"] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return {"h": h, "c": c}

    def read(self, state, k):
        return state["h"]


_CLASSES = {c.strategy: c for c in (MaxPooling, AvgPooling, AttnPooling, ConcatPooling, LSTMPooling)}


def build_pooling(strategy: str, hidden: int, max_states: int, counts: Optional[Iterable[int]] = None) -> StatePooling:
    """The strategy G named ``strategy`` (one of :data:`STRATEGIES`).

    ``counts`` (concat only) restricts the numbers of states K that get a linear map.
    """
    if strategy not in _CLASSES:
        raise ValueError(f"unknown pooling strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "concat":
        return ConcatPooling(hidden, max_states, counts)
    return _CLASSES[strategy](hidden, max_states)
