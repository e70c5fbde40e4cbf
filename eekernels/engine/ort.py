"""ONNX Runtime layer executors: each encoder layer as its own transformer-optimized ONNX graph.

``early_exit(executor="ort")`` runs every encoder layer in an ONNX Runtime session (fp32);
``executor="ort-int8"`` runs the same graphs with their weights dynamically quantized to
INT8. The embedding stays in torch (the adapter's ``embed``), and the exit heads,
compaction and bookkeeping stay eekernels ops: only the layers change engine.

How a layer becomes a session (once per distinct layer module, cached in the executor, which
the model caches; ALBERT's shared layer is one session):

1. the layer and HF's own bidirectional mask (built inside the graph from an int64 [N, S]
   mask, with HF's eager attention) are exported with the TorchScript exporter, dynamic in
   rows and length. HF's eager mask is what ONNX Runtime's BERT attention fusion
   recognises; a mask given as an additive float input is not fused, because the fusion
   takes the attention's scaling ``Mul`` for the mask's;
2. ``onnxruntime.transformers.optimizer`` fuses it (Attention, SkipLayerNormalization,
   BiasGelu / FastGelu), keeping the raw [N, S] mask so any padding side is right;
3. for INT8, ``onnxruntime.quantization.quantize_dynamic`` quantizes the optimized graph.

Tensors go in and out through an IOBinding on the torch tensors' memory (no copies).

The pieces the full-model baseline (``benchmarks/ort_full.py``) shares live here too:
:func:`export_graph`, :func:`optimize_graph`, :func:`quantize_graph`, :func:`make_session`,
:func:`run_bound`.

ONNX Runtime is optional (``pip install eekernels[ort]``): this module imports it only
when a session is built, so importing eekernels never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import tempfile
import warnings
import weakref
from collections import Counter
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from ..hf.adapters import EncoderAdapter
from .executors import LayerExecutor
from .rows import Rows
from .weight_watch import WeightWatch, parameter_slots

__all__ = ["FUSED_OPS", "OrtExecutor", "OrtInt8Executor", "eager_attention", "export_graph", "export_in_eval",
           "fused_op_counts", "make_session", "optimize_graph", "quantize_graph", "require_onnxruntime", "run_bound"]

#: the fused operators the transformer optimizer puts in a BERT-style layer
FUSED_OPS = ("Attention", "QAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "EmbedLayerNormalization")
_OPSET = 17


def require_onnxruntime():
    """The ``onnxruntime`` module (with ``onnx``), or an ImportError saying how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX Runtime executors need the package {e.name or 'onnxruntime'!r}, which is not "
                          f"installed: pip install eekernels[ort]  (onnxruntime and onnx)") from None
    return onnxruntime


@contextlib.contextmanager
def eager_attention(config) -> Iterator[None]:
    """HF's eager attention (and its mask) for the duration: the graph the fusion recognises."""
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's, the optimizer's and the quantizer's warnings and progress logs
    (the quantizer logs to the root logger)."""
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime", "onnx_model", "fusion_base", "shape_infer_helper",
                                              "onnxruntime.transformers", "onnx_model_bert", "fusion_utils")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_graph(module: nn.Module, args: Tuple[torch.Tensor, ...], input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: Dict[str, Dict[int, str]]):
    """``module(*args)`` as an ``onnx.ModelProto`` (TorchScript exporter, in memory, no file)."""
    require_onnxruntime()
    import onnx

    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, args, buf, dynamo=False, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, opset_version=_OPSET, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def export_in_eval(module: nn.Module, dropout_module: nn.Module, config, args: Tuple[torch.Tensor, ...],
                   input_names: Sequence[str], output_names: Sequence[str], dynamic_axes: Dict[str, Dict[int, str]]):
    """:func:`export_graph` of ``module`` with ``dropout_module`` (what holds its dropout) in
    eval mode and HF's eager attention (what the fusion recognises), both restored after."""
    was_training = dropout_module.training
    dropout_module.eval()
    try:
        with eager_attention(config):
            return export_graph(module, args, input_names, output_names, dynamic_axes)
    finally:
        dropout_module.train(was_training)


def optimize_graph(model, config, raw_mask: bool = True):
    """The transformer optimizer's fused graph of ``model`` (an ``onnx.ModelProto`` of a BERT-style
    encoder with ``config``'s heads and width).

    ``raw_mask`` keeps the attention mask as the [N, S] 0/1 tensor (right for any padding);
    False lets the optimizer reduce it to per-row lengths (ONNX Runtime's BERT default,
    right only for right padding).
    """
    require_onnxruntime()
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(raw_mask)
    with _quiet():
        opt = optimize_model(model, model_type="bert", num_heads=config.num_attention_heads,
                             hidden_size=config.hidden_size, optimization_options=options)
    return opt.model


def quantize_graph(model):
    """``model`` with its weights dynamically quantized to INT8 (``quantize_dynamic``; a
    temporary directory, since the quantizer writes files)."""
    require_onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="eekernels-ort-") as d, _quiet():
        src, dst = os.path.join(d, "model.onnx"), os.path.join(d, "model.int8.onnx")
        onnx.save_model(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops defeat inference
        return onnx.load_model(dst)


def fused_op_counts(model) -> Dict[str, int]:
    """How many of each fused operator (:data:`FUSED_OPS`) ``model`` holds."""
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def make_session(model, threads: Optional[int] = None, spin: bool = False, spin_between_runs: bool = True):
    """A CPU ``InferenceSession`` of ``model`` with ``threads`` intra-op threads (default
    ``torch.get_num_threads()``), sequential execution and every graph optimization.

    ``spin``: idle ONNX Runtime threads busy-wait for their next task (its default) rather
    than sleep. ``spin_between_runs`` False stops that spinning as soon as a run returns
    (``session.force_spinning_stop``): the threads stay hot between the operators of one
    run and leave the cores free between runs, where torch runs the exit heads."""
    ort = require_onnxruntime()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin and not spin_between_runs:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


_NP_TYPES: Dict[torch.dtype, str] = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32"}


def run_bound(session, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None:
    """Run ``session`` on contiguous CPU tensors ``inputs`` (by graph input name), writing its
    ``outputs`` (by graph output name) into those preallocated tensors: both ends bound to
    the tensors' memory."""
    import numpy as np

    binding = session.io_binding()
    for name, t in inputs.items():
        binding.bind_input(name, "cpu", 0, np.dtype(_NP_TYPES[t.dtype]), tuple(t.shape), t.data_ptr())
    for name, t in outputs.items():
        binding.bind_output(name, "cpu", 0, np.dtype(_NP_TYPES[t.dtype]), tuple(t.shape), t.data_ptr())
    session.run_with_iobinding(binding)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op thread count at ``n`` for the block, restored after; yields the count
    it had before. The count is per OS thread (OpenMP's), so concurrent calls from several
    Python threads each hold and restore their own."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _LayerGraph(nn.Module):
    """What one layer's graph computes: HF's mask from an int64 [N, S] mask, then the layer;
    with ``exit_logits`` (a model's :meth:`~eekernels.models.EarlyExitModel.exit_logits` of
    this layer) also the exit head's logits [N, C] of the layer's output; ``head_modules``
    (the head's pooler and classifier) are registered so that the exporter takes their
    weights as the graph's own."""

    def __init__(self, adapter: EncoderAdapter, index: int, exit_logits=None, head_modules=()):
        super().__init__()
        self.adapter = adapter
        self.layer = adapter.layer_module(index)
        self.exit_logits = exit_logits
        self.head = nn.ModuleList(head_modules)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor):
        out = self.layer(hidden, self.adapter.attention_mask(mask, hidden))
        out = out[0] if isinstance(out, tuple) else out
        if self.exit_logits is None:
            return out
        return out, self.exit_logits(out, mask.bool())


class OrtExecutor(LayerExecutor):
    """Each encoder layer in its own ONNX Runtime session (fp32, transformer-optimized); see the
    module docstring. Sessions are built on first use with torch's thread count outside
    the call, and rebuilt when a layer's weights change (in place or replaced).

    Runs with ``engine="rows"`` (the fixed engines trace ``layer_fn`` under ``torch.cond``),
    on CPU float32 models.

    During a call torch runs on :attr:`torch_threads` intra-op threads (the embedding, exit
    heads and compaction: small ops) and the sessions on the count torch had outside the
    call. With both at 2 on 2 cores, torch's OpenMP workers spin after every exit head and
    take the cores ORT's layer threads wake on: at B = 8 that doubled the no-exit time
    against ORT's full model (benchmarks/NOTES.md, "ORT executor threads").

    A session's threads spin between the operators of a run and stop when it returns
    (:func:`make_session` with ``spin_between_runs=False``): six sessions whose idle threads
    all spun made a call 5x slower on 2 cores, and threads that sleep between operators
    made B = 1 and 8 3-8% slower ("Spinning only inside a run" in benchmarks/NOTES.md).

    Exit heads inside the layer graphs: given a model's heads (:meth:`attach_exit_heads`),
    the graph of each exit point's layer also computes that exit's logits (the head's
    pooling, pooler and classifier; :meth:`~eekernels.models.EarlyExitModel.exit_logits`)
    while the layer's output is still in cache, and hands them to the rule in
    ``rows.context["exit_logits"]``; the rule applies only its criterion. A separate head
    after a session met its weights and code cold (the six layers' weights overflow the
    last-level cache): that was the whole no-exit overhead at B = 8 ("Exit heads inside the
    layer graphs" in benchmarks/NOTES.md). A layer shared across depth (ALBERT) then has
    one session per exit point, since each carries its own head.
    """

    name = "ort"
    rows_only = True
    #: torch's intra-op threads inside a call (None: leave torch's count as it is)
    torch_threads: Optional[int] = 1
    #: whether the layer graphs are quantized to INT8
    int8 = False
    #: the sessions' threads busy-wait between operators (see :func:`make_session`) ...
    spin = True
    #: ... and go on spinning after a run returns
    spin_between_runs = False
    #: compute attached exit heads inside the layer graphs (False: the rule runs every head)
    heads_in_graph = True

    def __init__(self, adapter: EncoderAdapter):
        require_onnxruntime()
        super().__init__(adapter)
        # a session's key: (id of the layer module, the exit step whose head its graph carries or 0)
        self._sessions: Dict[tuple, object] = {}
        self._graphs: Dict[tuple, object] = {}  # key -> its optimized ModelProto
        self._watches: Dict[tuple, WeightWatch] = {}  # key -> the weights it was built from
        self._session_threads = torch.get_num_threads()  # torch's count outside the call: the sessions'
        self._head_model = None  # weak reference to the model whose heads the graphs carry

    def attach_exit_heads(self, model) -> None:
        """Carry ``model``'s exit heads inside the layer graphs of its exit points (see the
        class docstring; :attr:`heads_in_graph` False turns it off)."""
        self._head_model = weakref.ref(model)
        self._sessions.clear()
        self._graphs.clear()

    def _head_step(self, step: int):
        """The model whose head the graph of layer ``step`` carries, or None."""
        model = self._head_model() if self._head_model is not None and self.heads_in_graph else None
        return model if model is not None and step in model.exit_points else None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._session_threads = torch.get_num_threads()
        if self.torch_threads is None:
            yield
            return
        with torch_threads(self.torch_threads):
            yield

    def _check_model(self, hidden: torch.Tensor) -> None:
        if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
            raise ValueError(f"early_exit(executor={self.name!r}) runs float32 models on the CPU; this one computes "
                             f"{hidden.dtype} on {hidden.device} (use executor='hf' there)")

    def prepare(self, rows: Rows, attention_mask: Optional[torch.Tensor]) -> None:
        self._check_model(rows.hidden)
        self._drop_stale()
        valid = rows.valid
        n, s = rows.hidden.shape[:2]
        rows.tensors["mask"] = valid.long() if valid is not None else torch.ones(n, s, dtype=torch.long)

    def mask(self, rows: Rows) -> torch.Tensor:
        return rows.tensors["mask"]

    def _drop_stale(self) -> None:
        """Forget the graphs and sessions whose weights (the layer's, and the head's it
        carries) changed since they were built (a training step updates them in place,
        ``load_state_dict`` too): checked once per call."""
        for key, watch in self._watches.items():
            if watch.changed() and key in self._graphs:
                del self._graphs[key]
                self._sessions.pop(key, None)

    def _key(self, step: int) -> tuple:
        return id(self.adapter.layer_module(step - 1)), step if self._head_step(step) is not None else 0

    def graph(self, step: int):
        """The optimized (and for INT8 quantized) ``onnx.ModelProto`` of layer ``step``
        (1-based), built on first use (and after its weights changed: :meth:`_drop_stale`)."""
        key = self._key(step)
        proto = self._graphs.get(key)
        if proto is None:
            model = self._head_step(step)
            if model is None:
                graph = _LayerGraph(self.adapter, step - 1)
            else:
                head = model.head(step)
                graph = _LayerGraph(self.adapter, step - 1, functools.partial(model.exit_logits, step),
                                    [m for m in (head.pooler, head.classifier) if m is not None])
            self._watches[key] = WeightWatch(parameter_slots(graph))
            proto = self._graphs[key] = self._export(graph)
            self._sessions.pop(key, None)
        return proto

    def session(self, step: int):
        """The session of layer ``step``'s :meth:`graph` (1-based), built on first use."""
        key = self._key(step)
        session = self._sessions.get(key)
        if session is None:
            graph = self.graph(step)
            session = self._sessions[key] = make_session(graph, self._session_threads, self.spin,
                                                         self.spin_between_runs)
        return session

    def _export(self, graph: _LayerGraph):
        """``graph`` exported, fused by the transformer optimizer (and quantized for INT8)."""
        cfg = self.adapter.config
        hidden = torch.zeros(2, 3, cfg.hidden_size)
        mask = torch.ones(2, 3, dtype=torch.long)
        rows_by_length = {0: "rows", 1: "length"}
        outputs, axes = ("out",), {"hidden": rows_by_length, "mask": rows_by_length, "out": rows_by_length}
        if graph.exit_logits is not None:
            outputs, axes = outputs + ("logits",), {**axes, "logits": {0: "rows"}}
        # (the head's exit_logits has no dropout: only the layer switches to eval)
        proto = export_in_eval(graph, graph.layer, cfg, (hidden, mask), ("hidden", "mask"), outputs, axes)
        proto = optimize_graph(proto, cfg, raw_mask=True)
        return quantize_graph(proto) if self.int8 else proto

    def _run(self, step: int, hidden: torch.Tensor, mask: torch.Tensor):
        """(layer ``step``'s output, its exit logits or None) for ``hidden`` [N, S, H]."""
        session = self.session(step)
        hidden = hidden.contiguous()  # a trimmed batch is a strided view
        outputs = {"out": torch.empty_like(hidden)}
        model = self._head_step(step)
        if model is not None:
            outputs["logits"] = torch.empty(hidden.shape[0], model.num_labels)
        run_bound(session, {"hidden": hidden, "mask": mask.contiguous()}, outputs)
        return outputs["out"], outputs.get("logits")

    def layer_fn(self, step: int):
        return lambda hidden, mask: self._run(step, hidden, mask)[0]

    def layer(self, step: int, rows: Rows) -> None:
        rows.hidden, logits = self._run(step, rows.hidden, self.mask(rows))
        if logits is not None:
            rows.context["exit_logits"] = (step, logits)


class OrtInt8Executor(OrtExecutor):
    """:class:`OrtExecutor` with each layer graph's weights dynamically quantized to INT8
    (activations quantized per call): faster, and its logits differ from fp32 by the
    quantization error. The activations' scale is one per tensor, taken over the rows in the
    call, so a row's result depends a little on its batch-mates: batched equals alone only
    up to that error (fp32 ``"ort"`` matches to float tolerance)."""

    name = "ort-int8"
    int8 = True


