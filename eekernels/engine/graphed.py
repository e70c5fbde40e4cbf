"""The fixed-capacity early-exit forward captured as one CUDA graph per input shape.

``early_exit(..., engine="graphed")``: the first call for an input shape (and exit rule)
warms up and captures :func:`~eekernels.engine.loop.run_early_exit` with the
:class:`~eekernels.engine.fixed.FixedCapacity` placement (``torch.cond`` becomes
conditional IF nodes under capture, so a layer whose bucket is empty does not run);
later calls copy the inputs into the graph's static buffers and replay it: one launch for
the whole forward, no host sync. The outputs are the graph's static tensors, overwritten
by the next replay of the same graph (clone them to keep them). CUDA only.

Speed-ups need the exit layers on the host, so they are computed after the replay from
the graph's outputs (one device->host copy), outside the graph.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["GraphCache"]


class GraphCache:
    """Captured graphs of one model's fixed-capacity forward, one per (shapes, rule) key.

    Args:
        forward: ``forward(input_ids, attention_mask, exit_profile, with_metrics)``, the
            fixed-capacity early-exit forward to capture (no host sync when
            ``with_metrics`` is False).
    """

    def __init__(self):
        self.graphs: Dict[Tuple, tuple] = {}

    def _capture(self, forward: Callable, ids, mask, profile):
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            ControlFlowOpWarmupDispatchMode,
            CUDAGraphCaptureControlFlowOpDispatchMode,
        )

        static = [ids.clone(), None if mask is None else mask.clone(), None if profile is None else profile.clone()]

        def run():
            return forward(static[0], static[1], static[2], False)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ControlFlowOpWarmupDispatchMode():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), CUDAGraphCaptureControlFlowOpDispatchMode():
            out = run()
        return graph, static, out

    def __call__(self, key: tuple, forward: Callable, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 exit_profile: Optional[torch.Tensor], metrics: Optional[Callable] = None):
        """Replay (capturing first if needed) the graph for ``key`` on these inputs.
        ``metrics(out)`` fills in the speed-ups of the replayed output."""
        if input_ids.device.type != "cuda":
            raise ValueError("early_exit(engine='graphed') captures a CUDA graph: it needs CUDA tensors "
                             "(use engine='fixed' for the same device-side decisions without capture)")
        if exit_profile is not None:
            exit_profile = torch.as_tensor(exit_profile).to(device=input_ids.device, dtype=torch.int64)
        full_key = key + (tuple(input_ids.shape), input_ids.dtype, attention_mask is None, exit_profile is None)
        if full_key not in self.graphs:
            self.graphs[full_key] = self._capture(forward, input_ids, attention_mask, exit_profile)
        graph, static, out = self.graphs[full_key]
        for buf, src in zip(static, (input_ids, attention_mask, exit_profile)):
            if buf is not None:
                buf.copy_(src)
        graph.replay()
        return metrics(out) if metrics is not None else replace(out)
