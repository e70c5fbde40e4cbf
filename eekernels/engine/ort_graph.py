"""The whole early-exit forward as one ONNX Runtime graph: ``early_exit(engine="ort-graph")``.

The row engine with the ORT executor (:mod:`eekernels.engine.ort`) runs a session per layer
and decides in Python between them; at small batches the calls and the bookkeeping cost
what the skipped layers save. Here one graph holds it all, and one ``Run`` does a batch::

    h, mask, index, forced = embed(input_ids, token_types), mask, arange(B), forced
    for layer i = 1 .. L:
        h, logits = layer_i(h, mask)                   # the layer graph of the ORT executor,
                                                       # with exit i's head inside
        if i is an exit point:
            leave = score(logits) < threshold          # entropy (DeeBERT; max-prob: >=)
                    or forced <= i                     # (a benchmark's profile)
            emit index[leave], logits[leave], count    # the leavers' results, in exit order
            h, mask, index, forced = rows[~leave]      # Compress: later layers see the rest
    inputs_ok = ids, token types and mask hold values the model takes

The layers are the ORT executor's transformer-optimized layer graphs, copied in with their
names prefixed; the leavers' results come out concatenated in exit order and are put back
in batch order in numpy (each row's exit layer from the per-exit counts). A layer that no
row reaches runs on zero rows (INT8 layers, whose fused attention cannot, sit in an ``If`` on "a
row is left"). The input values are checked by the graph itself: Python reads one flag,
and names the bad value only when it is false.

Exit rules: entropy and max-prob on each exit's own head (models whose
``plain_exit_heads`` is True); fp32 on the CPU.
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .loop import EarlyExitOutput, check_values, cpu_values, value_limits
from .weight_watch import WeightWatch, parameter_slots

__all__ = ["EMPTY_UNSAFE_OPS", "GRAPH_CRITERIA", "OrtGraphEngine", "compose_early_exit_graph"]

#: the exit rules the composed graph decides with
GRAPH_CRITERIA = ("entropy", "max_prob")


def _mask_casts(graph) -> list:
    """The nodes of a layer graph that cast its ``mask`` input to int32 (the fused
    Attention's mask type)."""
    from onnx import TensorProto

    return [n for n in graph.node if n.op_type == "Cast" and list(n.input) == ["mask"]
            and any(a.name == "to" and a.i == TensorProto.INT32 for a in n.attribute)]


def _copy_layer(graph, prefix: str, inputs: Dict[str, str], nodes: list, initializers: list,
                mask_int32: Optional[str] = None) -> None:
    """Append ``graph``'s nodes and initializers with every name prefixed, its inputs renamed
    to ``inputs`` (graph input name -> tensor name in the composed graph). ``mask_int32``:
    the composed graph's int32 copy of the mask, which replaces the layer's own cast of it
    (one cast per forward rather than one per layer)."""
    import onnx

    casts = _mask_casts(graph) if mask_int32 is not None else []
    inputs = {**inputs, **{n.output[0]: mask_int32 for n in casts}}

    def rename(name: str) -> str:
        return name if name == "" else inputs.get(name, prefix + name)

    for t in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = prefix + t.name
        initializers.append(copy)
    for n in graph.node:
        if any(n is c for c in casts):
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = prefix + (n.name or n.op_type)
        del copy.input[:]
        copy.input.extend(rename(x) for x in n.input)
        del copy.output[:]
        copy.output.extend(rename(x) for x in n.output)
        nodes.append(copy)


_RESULTS = ("exit_index", "exit_logits", "exit_counts")


#: operators that fail on zero rows: ONNX Runtime's QAttention (the INT8 graphs' fused
#: attention) dies of SIGFPE on a batch of none (1.32; its quantizers and integer GEMMs take one)
EMPTY_UNSAFE_OPS = ("QAttention",)


def _inputs_ok_nodes(limits: Dict[str, int]) -> list:
    """Nodes computing ``inputs_ok`` from the graph inputs (see :func:`compose_early_exit_graph`)."""
    from onnx import TensorProto, helper

    nodes = []

    def node(op: str, inputs: Sequence[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def const(name: str, value: int) -> str:
        nodes.append(helper.make_node("Constant", [], [name], name=name,
                                      value=helper.make_tensor(name, TensorProto.INT64, [], [value])))
        return name

    def within(tensor: str, low: int, high: int) -> str:  # low <= every value < high
        lo = node("ReduceMin", [tensor], f"check/{tensor}_min", keepdims=0)
        hi = node("ReduceMax", [tensor], f"check/{tensor}_max", keepdims=0)
        return node("And", [node("GreaterOrEqual", [lo, const(f"check/{tensor}_low", low)], f"check/{tensor}_low_ok"),
                            node("Less", [hi, const(f"check/{tensor}_high", high)], f"check/{tensor}_high_ok")],
                    f"check/{tensor}_ok")

    oks = [within(name, 0, limit) for name, limit in sorted(limits.items())]
    oks.append(within("mask", 0, 2))
    row_has_token = node("ReduceMax", ["mask"], "check/row_max", axes=[1], keepdims=0)
    oks.append(node("GreaterOrEqual", [node("ReduceMin", [row_has_token], "check/rows_min", keepdims=0),
                                       const("check/one", 1)], "check/rows_ok"))
    ok = oks[0]
    for i, other in enumerate(oks[1:]):
        ok = node("And", [ok, other], f"check/all_{i}")
    nodes.append(helper.make_node("Identity", [ok], ["inputs_ok"], name="inputs_ok"))
    return nodes


def compose_early_exit_graph(embedding, layers: Sequence, exit_points: Sequence[int], criterion: str,
                             num_labels: int, limits: Optional[Dict[str, int]] = None, forced: bool = True):
    """One ``onnx.ModelProto`` of the early-exit forward (see the module docstring).

    Args:
        embedding: ModelProto ``(input_ids int64 [N, S], token_type_ids int64 [N, S]) -> hidden``.
        layers: ModelProto per layer, ``(hidden, mask int64 [N, S]) -> out`` and, at the exit
            points, ``logits`` [N, C] too.
        exit_points: the 1-based exit layers (the last is the last layer).
        criterion: "entropy" (leave when the entropy < threshold) or "max_prob" (>=).
        num_labels: C.
        limits: the exclusive upper bound of ``input_ids`` and of ``token_type_ids``
            (:func:`~eekernels.engine.loop.value_limits`; an input not named is not checked).
        forced: with the ``forced`` input (exit profiles); without it the rows leave by the
            criterion alone, three operators fewer per exit point (what serving calls run).

    Graph inputs: ``input_ids``, ``token_type_ids``, ``mask`` (int64 [N, S]), ``index``
    (int64 [N], each row's batch position), ``threshold`` (float []) and, where ``forced``,
    ``forced`` (int64 [N]): a row leaves at an exit point where the criterion says so or that is >= its
    ``forced`` (a threshold no score meets, -inf for entropy or +inf for max-prob, with
    ``forced`` leaves by the profile alone; ``forced`` beyond the last layer, by the
    criterion alone). Outputs, one row per input row in exit order: ``exit_index`` (its
    batch position) and ``exit_logits`` [N, C]; and ``exit_counts`` (int64 [E]): how many
    rows left at each exit point, in order. And ``inputs_ok`` (bool []): every token id and
    token type within ``limits`` and >= 0, the mask all 0 / 1 with a 1 in every row (the
    values :func:`~eekernels.engine.loop.check_values` checks, here a few operators instead
    of a few numpy passes per call).

    A layer that no row reaches runs on zero rows (fp32: every operator of the layer and
    head graphs takes them; tested), unless the layers hold an operator of
    :data:`EMPTY_UNSAFE_OPS` (INT8: its fused attention dies of a division by zero on a
    batch of none): then what follows each exit point runs inside an ``If`` on "some row is left",
    which costs about 0.1 ms per exit point.
    """
    from onnx import TensorProto, helper, numpy_helper

    if criterion not in GRAPH_CRITERIA:
        raise ValueError(f"early_exit(engine='ort-graph'): criterion must be one of {GRAPH_CRITERIA}, "
                         f"got {criterion!r}")
    last = len(layers)
    if list(exit_points)[-1] != last:
        raise ValueError(f"the last exit point must be the last layer {last}, got {list(exit_points)}")
    exits = set(exit_points)
    guard = any(n.op_type in EMPTY_UNSAFE_OPS for m in layers for n in m.graph.node)
    # the layers read their mask only to cast it to int32: cast it once, compress the int32 copy
    shared_cast = all(len(_mask_casts(m.graph)) == 1 and sum(x == "mask" for n in m.graph.node for x in n.input) == 1
                      for m in layers)
    types = {"exit_index": (TensorProto.INT64, ["rows"]), "exit_logits": (TensorProto.FLOAT, ["rows", num_labels]),
             "exit_counts": (TensorProto.INT64, ["exits"])}

    def outputs(names: Sequence[str]) -> list:
        return [helper.make_tensor_value_info(n, *types[r]) for n, r in zip(names, _RESULTS)]

    def layers_from(first: int, hidden: str, rows: Dict[str, str], nodes: list, initializers: list) -> List[str]:
        """Append layers ``first`` .. last to ``nodes``, their weights to ``initializers``
        (each ``If`` branch holds its own layers' weights: weights of the outer scope would
        be handed down through every nested ``If`` on every run); the names of their three
        results."""
        def node(op: str, inputs: Sequence[str], output: str, **attrs) -> str:
            nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
            return output

        def const(name: str, value) -> str:
            initializers.append(numpy_helper.from_array(np.asarray(value), name))
            return name

        emitted: List[List[str]] = [[], [], []]
        for i in range(first, last + 1):
            p = f"layer{i}/"
            _copy_layer(layers[i - 1].graph, p, {"hidden": hidden, "mask": rows["mask"]}, nodes, initializers,
                        rows["mask"] if shared_cast else None)
            hidden = p + "out"
            if i not in exits:
                continue
            logits = p + "logits"
            if i == last:
                leave_index, leave_logits = rows["index"], logits
            else:
                probs = node("Softmax", [logits], p + "probs", axis=1)
                if criterion == "entropy":  # deebert.txt: leave when the entropy < S, i.e. sum p log p > -S
                    plogp = node("Mul", [probs, node("LogSoftmax", [logits], p + "log_probs", axis=1)], p + "plogp")
                    axis = const(p + "classes_axis", np.array([1], np.int64))
                    score = node("ReduceSum", [plogp, axis], p + "neg_entropy", keepdims=0)
                    by_score = node("Greater", [score, "neg_threshold"], p + "by_score")
                else:  # opset < 18: ReduceMax's axes are an attribute
                    score = node("ReduceMax", [probs], p + "max_prob", axes=[1], keepdims=0)
                    by_score = node("GreaterOrEqual", [score, "threshold"], p + "by_score")
                leave = by_score
                if forced:
                    step = const(p + "step", np.array(i, np.int64))
                    leave = node("Or", [by_score, node("LessOrEqual", [rows["forced"], step], p + "by_force")],
                                 p + "leave")
                keep = node("Not", [leave], p + "keep")
                leave_index = node("Compress", [rows["index"], leave], p + "leave_index", axis=0)
                leave_logits = node("Compress", [logits, leave], p + "leave_logits", axis=0)
            for parts, name in zip(emitted, (leave_index, leave_logits, node("Shape", [leave_index], p + "leave_count"))):
                parts.append(name)
            if i == last:
                break
            hidden = node("Compress", [hidden, keep], p + "kept_hidden", axis=0)
            rows = {k: node("Compress", [v, keep], p + "kept_" + k, axis=0) for k, v in rows.items()}
            if not guard:
                continue
            # the rest runs only while some row is left
            any_left = node("Greater", [node("Size", [rows["index"]], p + "left"),
                                        const(p + "zero", np.array(0, np.int64))], p + "any_left")
            rest: List = []
            rest_weights: List = []
            rest_results = layers_from(i + 1, hidden, rows, rest, rest_weights)
            later = sum(e > i for e in exits)
            none = {"exit_index": ([0], []), "exit_logits": ([0, num_labels], []), "exit_counts": ([later], [0] * later)}
            empty = [helper.make_node("Constant", [], [p + "none_" + r], name=p + "none_" + r,
                                      value=helper.make_tensor(p + "none_" + r, types[r][0], *none[r]))
                     for r in _RESULTS]
            names = [p + "rest_" + r for r in _RESULTS]
            nodes.append(helper.make_node(
                "If", [any_left], names, name=p + "rest",
                then_branch=helper.make_graph(rest, p + "rest", [], outputs(rest_results), rest_weights),
                else_branch=helper.make_graph(empty, p + "none", [], outputs([n.output[0] for n in empty]))))
            for parts, name in zip(emitted, names):
                parts.append(name)
            break
        tag = f"from{first}/"  # (a new name even for one part: a branch may not return an outer value)
        return [node("Concat", parts, tag + r, axis=0) for parts, r in zip(emitted, _RESULTS)]

    nodes: List = []
    initializers: List = []
    if criterion == "entropy":
        nodes.append(helper.make_node("Neg", ["threshold"], ["neg_threshold"], name="neg_threshold"))
    mask = "mask"
    if shared_cast:
        mask = "mask_int32"
        nodes.append(helper.make_node("Cast", ["mask"], [mask], name=mask, to=TensorProto.INT32))
    _copy_layer(embedding.graph, "embed/", {"input_ids": "input_ids", "token_type_ids": "token_type_ids"},
                nodes, initializers)
    rows = {"mask": mask, "index": "index", **({"forced": "forced"} if forced else {})}
    results = layers_from(1, "embed/" + embedding.graph.output[0].name, rows, nodes, initializers)
    nodes += [helper.make_node("Identity", [r], [name], name=name) for r, name in zip(results, _RESULTS)]
    nodes += _inputs_ok_nodes(limits or {})
    graph = helper.make_graph(
        nodes, "eekernels_early_exit",
        inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["rows", "length"]),
                helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["rows", "length"]),
                helper.make_tensor_value_info("mask", TensorProto.INT64, ["rows", "length"]),
                helper.make_tensor_value_info("index", TensorProto.INT64, ["rows"]),
                helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []),
                *([helper.make_tensor_value_info("forced", TensorProto.INT64, ["rows"])] if forced else [])],
        outputs=outputs(_RESULTS) + [helper.make_tensor_value_info("inputs_ok", TensorProto.BOOL, [])],
        initializer=initializers)
    opsets = {(o.domain, o.version) for m in (embedding, *layers) for o in m.opset_import}
    versions: Dict[str, int] = {}
    for domain, version in opsets:
        versions[domain] = max(version, versions.get(domain, 0))
    if not 13 <= versions.get("", 0) < 18:  # ReduceSum's axes an input, ReduceMax's an attribute
        raise ValueError(f"the layer graphs' opset must be 13-17 (they are exported at 17), got {versions.get('')}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in versions.items()])
    model.ir_version = max(m.ir_version for m in (embedding, *layers))
    return model


def _int64(t: torch.Tensor) -> np.ndarray:
    """``t``'s values as a contiguous int64 numpy array (its own memory where it is one)."""
    return np.ascontiguousarray(cpu_values(t), dtype=np.int64)


class _EmbeddingGraph(nn.Module):
    """What the embedding graph computes: the adapter's ``embed`` of ids and token types."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        # registered, so that the weights embed reads become the graph's own (the exporter
        # keeps only those: ALBERT's embedding projection lives in its encoder)
        self.base = adapter.base

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(input_ids, token_type_ids)


class OrtGraphEngine:
    """``early_exit(engine="ort-graph")`` for one model and layer executor ("ort" or
    "ort-int8"): one session per exit rule (and another for calls with an exit profile, whose
    graph takes it), built on first use from the executor's layer
    graphs (each exit point's head inside) and the exported embedding, rebuilt when any
    weight of the model changes. Sessions run on torch's thread count at build time, their
    idle threads spinning as ONNX Runtime's do by default (:func:`~eekernels.engine.ort.make_session`):
    the whole forward is one run, and between runs no other work wants the cores. Stopping
    the spin when a run returns made INT8 graphs ~20% slower at B = 1 (their ``If`` branches
    wake the threads anew) and changed fp32 by under 1% (benchmarks/NOTES.md).

    The sessions run on their own copy of the weights: writing or replacing a weight
    rebuilds them (:class:`~eekernels.engine.weight_watch.WeightWatch`); moving or casting
    the model (``.to()``) after they are built does not reach them.

    Memory: it keeps the layer graphs and each rule's composed graph (for :meth:`graph` and
    rebuilding), so the weights are held about three times besides the sessions' own copy:
    ~70 MB for all-MiniLM-L6-v2."""

    def __init__(self, model, executor: str = "ort"):
        from .executor_registry import EXECUTORS

        if executor not in ("ort", "ort-int8"):
            raise ValueError(f"early_exit(engine='ort-graph') composes the layer graphs of executor 'ort' or "
                             f"'ort-int8', not {executor!r}")
        self.layers = EXECUTORS[executor](model.adapter)
        self.layers.attach_exit_heads(model)
        self._model = weakref.ref(model)
        self._sessions: Dict[Tuple[str, bool], object] = {}  # (criterion, forced) -> session
        self._weights = WeightWatch(parameter_slots(model))  # what the sessions were built from

    def graph(self, criterion: str, forced: bool = False):
        """The composed ``onnx.ModelProto`` for ``criterion`` (built with its session); ``forced``:
        the one that takes exit profiles."""
        return self._session(criterion, forced)[1]

    def _session(self, criterion: str, forced: bool):
        from .ort import export_in_eval, make_session

        if self._weights.changed():
            self._sessions.clear()
            self.layers._drop_stale()
        entry = self._sessions.get((criterion, forced))
        if entry is None:
            model = self._model()
            if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
                raise ValueError("early_exit(engine='ort-graph') runs float32 models on the CPU")
            embedding = _EmbeddingGraph(model.adapter)
            ids = torch.ones(2, 3, dtype=torch.long)
            rows_by_length = {0: "rows", 1: "length"}
            embed = export_in_eval(embedding, embedding.base, model.adapter.config, (ids, torch.zeros_like(ids)),
                                   ("input_ids", "token_type_ids"), ("hidden",),
                                   {"input_ids": rows_by_length, "token_type_ids": rows_by_length,
                                    "hidden": rows_by_length})
            layers = [self.layers.graph(step) for step in range(1, model.num_layers + 1)]
            proto = compose_early_exit_graph(embed, layers, model.exit_points, criterion, model.num_labels,
                                             value_limits(model), forced)
            session = make_session(proto, torch.get_num_threads(), spin=True)
            entry = self._sessions[(criterion, forced)] = (session, proto, {i.name for i in session.get_inputs()},
                                                 np.asarray(model.exit_points, np.int64))
        return entry

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 token_type_ids: Optional[torch.Tensor], criterion: str, threshold: float,
                 exit_profile: Optional[torch.Tensor] = None, with_metrics: bool = True, who: str = "early_exit"):
        """The :class:`~eekernels.engine.loop.EarlyExitOutput` of one batch; ``exit_profile``
        as for the row engine. The caller checks types and shapes
        (:func:`~eekernels.engine.loop.check_inputs` with ``values=False``); the values are
        checked here, by the graph (``inputs_ok``), and named by
        :func:`~eekernels.engine.loop.check_values` when they are wrong."""
        model = self._model()
        if input_ids.device.type != "cpu":
            raise ValueError("early_exit(engine='ort-graph') runs float32 models on the CPU")
        # a serving call runs the graph without the profile's operators
        session, _, inputs, exit_points = self._session(criterion, exit_profile is not None)
        b, s = input_ids.shape
        forced = None
        if exit_profile is not None:  # the profile alone decides: a threshold no score meets
            forced = _int64(torch.as_tensor(exit_profile))
            threshold = -math.inf if criterion == "entropy" else math.inf
        mask = np.ones((b, s), np.int64) if attention_mask is None else _int64(attention_mask)
        feeds = {  # numpy throughout: at B = 1 each torch op would cost a few percent of the call
            "input_ids": _int64(input_ids),
            "token_type_ids": np.zeros((b, s), np.int64) if token_type_ids is None else _int64(token_type_ids),
            "mask": mask,
            "index": np.arange(b, dtype=np.int64),
            "threshold": np.array(threshold, np.float32),
        }
        if forced is not None:
            feeds["forced"] = forced
        if attention_mask is not None and attention_mask.dtype.is_floating_point:  # 0.5 would read as 0
            check_values(model, input_ids, attention_mask, token_type_ids, who)
        try:
            index, logits, counts, inputs_ok = session.run(None, {k: v for k, v in feeds.items() if k in inputs})
        except Exception:  # e.g. a Gather past the vocabulary: say which input is wrong, if one is
            check_values(model, input_ids, attention_mask, token_type_ids, who)
            raise
        if not inputs_ok:
            check_values(model, input_ids, attention_mask, token_type_ids, who)
            raise ValueError(f"{who}: the inputs hold values the model cannot take")
        out_logits = np.empty_like(logits)
        out_layer = np.empty_like(index)
        out_logits[index] = logits
        out_layer[index] = np.repeat(exit_points, counts)
        pred = torch.from_numpy(out_logits.argmax(axis=1))
        out_logits, out_layer = torch.from_numpy(out_logits), torch.from_numpy(out_layer)
        if not with_metrics:
            return EarlyExitOutput(out_logits, out_layer, pred, math.nan, math.nan, -1, {})
        layer_sp, flops_sp = model.speedups(out_layer, torch.from_numpy(mask.sum(axis=1)), {})
        return EarlyExitOutput(out_logits, out_layer, pred, layer_sp, flops_sp, int(out_layer.sum()), {})
