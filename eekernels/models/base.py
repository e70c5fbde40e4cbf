"""The early-exit model contract: what every method's model implements, written once.

A method's model is an ``nn.Module`` subclass of :class:`EarlyExitBase` that wraps one or
more Hugging Face classifiers (their modules and weights reused, not copied) and adds its
own modules. The contract:

- ``forward(input_ids, attention_mask, token_type_ids, labels=None, ...)`` is the
  training path (HF ``Trainer`` calls it): every exit's logits as ``exit_logits``
  [E, B, C] (one per exit point), and with labels the method's loss
  (:class:`EarlyExitTrainOutput`).
- ``early_exit(...)`` is batched inference through the one layer loop
  (:func:`eekernels.engine.loop.run_early_exit`); it returns
  :class:`~eekernels.engine.loop.EarlyExitOutput` for every method. A subclass provides
  the seams: :meth:`EarlyExitBase.exit_rule` and :meth:`EarlyExitBase.layer_executor`.
- ``save_pretrained(path)`` / ``from_pretrained(path)``: each HF model in its own format
  (:meth:`EarlyExitBase.hf_models`), ``eekernels.json`` naming the method and its
  options (:meth:`EarlyExitBase.options`), the method's own weights in
  ``eekernels.safetensors``.
- calibration replays a rule on ``exit_logits`` (:meth:`EarlyExitBase.simulate_exits`),
  and :meth:`EarlyExitBase.speedups` gives the layer and FLOPs speed-ups of exit layers.

The class attribute ``method`` is the method's registry name
(:mod:`eekernels.methods.registry`), ``criteria`` the exit rules ``early_exit`` takes
(first = default; empty: the method has no exit threshold).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..engine.executor_registry import EXECUTORS
from ..engine.executors import LayerExecutor
from ..engine.fixed import FixedCapacity
from ..engine.graphed import GraphCache
from ..engine.length_groups import run_length_grouped
from ..engine.loop import EarlyExitOutput, RowCompaction, check_inputs, run_early_exit
from .._atomic import recover, staged_dir, write_json
from ..engine.rules import ExitRule
from ..ops._checks import real_number

__all__ = ["CONFIG_FILE", "ENGINES", "EarlyExitBase", "EarlyExitTrainOutput", "SingleModelBase", "WEIGHTS_FILE",
           "read_config"]

CONFIG_FILE = "eekernels.json"
WEIGHTS_FILE = "eekernels.safetensors"
FORMAT = "eekernels/1"
#: the files an HF model directory holds its weights in (one of them)
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
#: ``early_exit(engine=...)``: row compaction, fixed capacity, fixed capacity as one CUDA graph
ENGINES = ("rows", "fixed", "graphed", "ort-graph")
#: where engine="ort-graph" runs (and so where its inputs must be), whatever device the model is on
_CPU = torch.device("cpu")


@dataclass
class EarlyExitTrainOutput(ModelOutput):
    """Output of the training forward of every method; a ``ModelOutput``, so HF ``Trainer`` reads it.

    Attributes:
        loss: the method's loss (None without labels).
        logits: the last exit's logits [B, C].
        exit_logits: [E, B, C], what the exit rule sees at every exit point, in order.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    exit_logits: Optional[torch.Tensor] = None


def read_config(path: str) -> dict:
    """The ``eekernels.json`` of a saved model directory, or a clear error."""
    recover(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not saved by an eekernels model's save_pretrained")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the saved model is damaged") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("method"), str):
        raise ValueError(f"{cfg_path}: not an eekernels model config (expected format {FORMAT!r} and a method name)")
    return cfg


class EarlyExitBase(nn.Module):
    """Base class of every method's model (see the module docstring)."""

    method: ClassVar[str] = ""
    criteria: ClassVar[Tuple[str, ...]] = ("entropy", "max_prob", "patience")
    engines: ClassVar[Tuple[str, ...]] = ("rows", "fixed", "graphed")
    #: the default threshold of each criterion when ``early_exit`` is given none
    default_thresholds: ClassVar[Dict[str, float]] = {"policy": 0.5}

    def __init__(self):
        super().__init__()
        self._executors: Dict[str, LayerExecutor] = {}
        self._graphs = GraphCache()

    # ------------------------------------------------------------------ structure (subclasses)
    @property
    def exit_points(self) -> List[int]:
        """The 1-based steps after which rows can leave, ascending; the last one ends the loop."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Depth of the full model: the reference of the speed-ups."""
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        raise NotImplementedError

    def hf_models(self) -> Dict[str, nn.Module]:
        """The HF models this one wraps, by the subfolder they are saved in ("" = the directory)."""
        raise NotImplementedError

    def full_model(self) -> nn.Module:
        """The module whose plain forward (HF-style, ``.logits``) is the full-model baseline:
        the HF model (a cascade's largest member), or the method's own full forward where
        its last exit is not the HF head (Past-Future)."""
        return list(self.hf_models().values())[-1]

    def head_parameters(self) -> List[nn.Parameter]:
        """The parameters the method adds to the HF models (what a separate head learning
        rate trains)."""
        hf_ids = {id(p) for m in self.hf_models().values() for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in hf_ids]

    def options(self) -> Dict[str, Any]:
        """JSON-able constructor options: ``from_hf_models(hf_models, **options)`` rebuilds the model."""
        return {}

    @classmethod
    def from_hf_models(cls, hf_models: Dict[str, nn.Module], **options) -> "EarlyExitBase":
        """A model of this method around ``hf_models`` (as :meth:`hf_models` names them), with
        fresh method weights (``from_pretrained`` loads them afterwards)."""
        raise NotImplementedError

    def max_positions(self) -> Optional[int]:
        """The longest input the model takes (None: no limit known)."""
        return None

    # ------------------------------------------------------------------ inference seams (subclasses)
    def exit_rule(self, criterion: str, threshold: float, backend: Optional[str]) -> ExitRule:
        """The :class:`~eekernels.engine.rules.ExitRule` of ``criterion`` at ``threshold``."""
        raise NotImplementedError

    def layer_executor(self, name: Optional[str], engine: str) -> LayerExecutor:
        """The executor that runs the layers (``name`` from ``early_exit(executor=...)``, None:
        the engine's default)."""
        raise NotImplementedError

    def speedups(self, exit_layer: torch.Tensor, seq_len: torch.Tensor, extras: Dict[str, Any]) -> Tuple[float, float]:
        """(layer speed-up, FLOPs speed-up) of host int64 ``exit_layer`` [B] for inputs of
        ``seq_len`` [B] real tokens; ``extras`` as the executor reported them."""
        raise NotImplementedError

    def simulate_exits(self, exit_logits: torch.Tensor, criterion: str, threshold: float):
        """The rule replayed on ``exit_logits`` [E, B, C] of the training forward:
        (exit_layer [B], logits [B, C]); what calibration searches thresholds with."""
        from ..calibration import simulate_exits

        return simulate_exits(exit_logits, self.exit_points, self.exit_points[-1], criterion, threshold)

    def exit_predictions(self, exit_logits: torch.Tensor) -> torch.Tensor:
        """What the rule predicts at every exit point from ``exit_logits`` [E, B, C] of the
        training forward: those logits themselves, unless the rule combines exits (Past-Future
        voting: the vote shares)."""
        return exit_logits

    def threshold_bounds(self, criterion: str) -> Tuple[float, float]:
        """The thresholds of ``criterion`` that exit every row and none (calibration's ends)."""
        return 0.0, math.inf

    def layer_speedup(self, exit_layer: torch.Tensor) -> float:
        """The layer speed-up of exit layers alone (past-future.txt eq. 15)."""
        from .. import metrics

        return metrics.layer_speedup(exit_layer, self.num_layers)

    # ------------------------------------------------------------------ inference (written once)
    def check_rule(self, criterion: Optional[str], threshold: Optional[float]) -> Tuple[str, float]:
        """The criterion (default: the method's first) and threshold, or a ValueError naming them."""
        if not self.criteria:
            if criterion not in (None, "none") or (threshold is not None and not math.isnan(float(threshold))):
                raise ValueError(f"early_exit: a {self.method} model has no exit rule or threshold "
                                 f"(every sample runs every layer); drop criterion/threshold")
            return "none", math.nan
        criterion = self.criteria[0] if criterion is None else criterion
        if criterion not in self.criteria:
            raise ValueError(f"early_exit: criterion {criterion!r} is not one of this {self.method} model's "
                             f"{', '.join(self.criteria)}")
        if threshold is None:
            threshold = self.default_thresholds.get(criterion, 0.0)
        threshold = real_number("early_exit", "threshold", threshold)
        if math.isnan(threshold) or threshold < 0:
            raise ValueError(f"early_exit: threshold must be a number >= 0 (inf allowed), got {threshold}")
        if criterion == "policy" and threshold > 1:
            raise ValueError(f"early_exit: the policy threshold is a probability in [0, 1], got {threshold}")
        return criterion, threshold

    def _ort_graph(self, executor: str):
        """The model's :class:`~eekernels.engine.ort_graph.OrtGraphEngine` on ``executor``'s
        layer graphs (cached like the executors)."""
        from ..engine.ort_graph import OrtGraphEngine

        key = f"ort-graph:{executor}"
        graph = self._executors.get(key)
        if graph is None:
            graph = self._executors[key] = OrtGraphEngine(self, executor)
        return graph

    def _executor(self, name: Optional[str], engine: str) -> LayerExecutor:
        key = f"{engine}:{name}"
        ex = self._executors.get(key)
        if ex is None:
            if engine != "rows" and getattr(EXECUTORS.get(name), "rows_only", False):
                raise ValueError(f"early_exit: executor {name!r} runs with engine='rows' only (engine={engine!r} "
                                 f"traces its layers under torch.cond; use executor='parts' there)")
            ex = self._executors[key] = self.layer_executor(name, engine)
        return ex

    def early_exit(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   token_type_ids: Optional[torch.Tensor] = None, *, criterion: Optional[str] = None,
                   threshold: Optional[float] = None, backend: Optional[str] = None,
                   exit_profile: Optional[torch.Tensor] = None, engine: str = "rows",
                   executor: Optional[str] = None, min_bucket: int = 1,
                   group_by_length: bool = False, metrics: bool = True) -> EarlyExitOutput:
        """Batched early-exit inference: each layer runs on the rows still active only.

        Args:
            input_ids: int [B, S]; attention_mask: [B, S] (1 = token, 0 = padding) or None;
            token_type_ids: [B, S] or None.
            criterion: one of the model's ``criteria`` (default: its first): "entropy"
                (exit when < threshold), "max_prob" (>=), "patience" (counter >= threshold),
                "policy" (ConsistentEE: p(exit) > threshold).
            threshold: the exit threshold (default 0, or 0.5 for "policy"), >= 0.
            backend: the ops' backend ("torch", "cpu", "triton", "cuda"; default automatic).
            exit_profile: benchmarks only: int [B] of 1-based layers; row i leaves at the first
                exit point >= exit_profile[i] (the rule still runs; its decision is replaced).
            engine: "rows" (default: survivors are compacted after each exit, one host sync
                per exit point), "fixed" (the batch keeps its capacity and decides on the
                device: no sync, for small batches), "graphed" (the fixed forward captured
                as one CUDA graph per input shape; CUDA only) or "ort-graph" (the whole
                forward, exits and compaction included, as one ONNX Runtime graph on the CPU:
                entropy and max-prob on each exit's own head; ``executor`` "ort" (default) or
                "ort-int8" gives its layers; :mod:`eekernels.engine.ort_graph`).
            executor: what runs the layers: "hf" (the HF modules; default for "rows"),
                "parts" (the same weights as split plain-torch layers; default for "fixed" and
                "graphed"), "ort" / "ort-int8" (each layer an ONNX Runtime session, fp32 or
                dynamic INT8; engine="rows" only; needs ``pip install eekernels[ort]``), or
                another registered executor.
            min_bucket: the smallest row bucket of the fixed engines.
            group_by_length: engine="rows" or "ort-graph": sort the rows by length and run them as a few
                groups of similar length, each trimmed to its longest row, where the padding
                saved pays for the extra calls (:mod:`eekernels.engine.length_groups`); the
                outputs stay in the batch's order. Not for models that report per-call token
                counts (MPEE, HashEE, cascades).
            metrics: False skips the speed-up bookkeeping (``layer_speedup`` and
                ``flops_speedup`` are NaN, ``layers_run`` is -1): a serving call needs only the
                logits and exit layers, and at B = 1 the bookkeeping costs a few percent of
                the call.
        """
        if engine not in ENGINES:
            raise ValueError(f"early_exit: engine must be one of {ENGINES}, got {engine!r}")
        if isinstance(min_bucket, bool) or not isinstance(min_bucket, int):
            raise TypeError(f"early_exit: min_bucket must be an int >= 1, got {type(min_bucket).__name__}")
        if engine not in self.engines:
            raise ValueError(f"early_exit: a {self.method} model runs the engines {', '.join(self.engines)}, "
                             f"not {engine!r}")
        for name, flag in (("group_by_length", group_by_length), ("metrics", metrics)):
            if not isinstance(flag, bool):
                raise TypeError(f"early_exit: {name} must be a bool, got {type(flag).__name__}")
        if group_by_length and engine not in ("rows", "ort-graph"):
            raise ValueError(f"early_exit: group_by_length=True runs with engine='rows' or 'ort-graph', not {engine!r}")
        criterion, threshold = self.check_rule(criterion, threshold)
        if engine == "ort-graph":
            graph = self._ort_graph(executor or "ort")

            def whole(ids, mask, types, profile, with_metrics=True):
                return graph(ids, mask, types, criterion, threshold, profile, with_metrics)

            # the graph checks the values itself, except where length groups read the mask first
            check_inputs(self, input_ids, attention_mask, token_type_ids, exit_profile, values=group_by_length,
                         device=_CPU)
            if group_by_length:
                return run_length_grouped(whole, self, input_ids, attention_mask, token_type_ids, exit_profile,
                                          with_metrics=metrics)
            return whole(input_ids, attention_mask, token_type_ids, exit_profile, metrics)
        rule = self.exit_rule(criterion, threshold, backend)
        ex = self._executor(executor, engine)
        if engine == "rows":
            def rows(ids, mask, types, profile, with_metrics=True):
                return run_early_exit(self, ids, mask, types, rule=rule, executor=ex, placement=RowCompaction(),
                                      exit_profile=profile, backend=backend, with_metrics=with_metrics)

            if group_by_length:
                check_inputs(self, input_ids, attention_mask, token_type_ids, exit_profile)
                return run_length_grouped(rows, self, input_ids, attention_mask, token_type_ids, exit_profile,
                                          with_metrics=metrics)
            return rows(input_ids, attention_mask, token_type_ids, exit_profile, metrics)

        def forward(ids, mask, profile, with_metrics):
            return run_early_exit(self, ids, mask, token_type_ids, rule=rule, executor=ex,
                                  placement=FixedCapacity(min_bucket), exit_profile=profile, backend=backend,
                                  with_metrics=with_metrics)

        if engine == "fixed":
            return forward(input_ids, attention_mask, exit_profile, metrics)
        if token_type_ids is not None:
            raise ValueError("early_exit(engine='graphed'): token_type_ids are not captured; pass None")

        def with_metrics(out):
            el = out.exit_layer.cpu()
            b, s = input_ids.shape
            seq_len = attention_mask.sum(dim=1).cpu() if attention_mask is not None else torch.full((b,), s)
            layer_sp, flops_sp = self.speedups(el, seq_len, out.extras)
            return EarlyExitOutput(out.logits, out.exit_layer, out.pred, layer_sp, flops_sp, int(el.sum()),
                                   dict(out.extras))

        key = (criterion, threshold, backend, executor, min_bucket)
        return self._graphs(key, forward, input_ids, attention_mask, exit_profile, with_metrics if metrics else None)

    # ------------------------------------------------------------------ persistence (written once)
    def _method_state(self) -> Dict[str, torch.Tensor]:
        """The state of the method's own modules: everything but the HF models' weights."""
        hf_ids = {id(m) for m in self.hf_models().values()}
        prefixes = tuple(name + "." for name, m in self.named_modules() if id(m) in hf_ids and name)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes)}

    def save_pretrained(self, path: str) -> None:
        """Save the HF models (their own format), ``eekernels.json`` (method, options) and the
        method's weights (``eekernels.safetensors``) as the directory ``path``.

        Atomic: the files are written beside ``path`` and take its place in one step, so a
        crash leaves the previous directory or the new one (a previous directory's other
        files do not survive: ``path`` becomes exactly the saved model)."""
        from safetensors.torch import save_file

        with staged_dir(path) as d:
            for sub, hf in self.hf_models().items():
                hf.save_pretrained(os.path.join(d, sub) if sub else d)
            save_file({k: v.detach().contiguous().cpu() for k, v in self._method_state().items()},
                      os.path.join(d, WEIGHTS_FILE))
            write_json(os.path.join(d, CONFIG_FILE), {"format": FORMAT, "method": self.method,
                                                      "options": self.options(), "hf_models": sorted(self.hf_models())})

    @classmethod
    def from_pretrained(cls, path: str, **hf_kwargs) -> "EarlyExitBase":
        """Load what :meth:`save_pretrained` wrote (a local directory; nothing is downloaded).

        Called on a method's class, the directory must hold that method; to load any
        method's directory use :func:`eekernels.load`.
        """
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification

        config = read_config(path)
        if cls.method and config["method"] != cls.method:
            raise ValueError(f"{path} holds a {config['method']!r} model, not {cls.method!r}; "
                             f"load it with eekernels.load({path!r})")
        hf_kwargs.setdefault("local_files_only", True)
        for sub in config.get("hf_models", [""]):
            d = os.path.join(path, sub) if sub else path
            if not any(os.path.isfile(os.path.join(d, f)) for f in HF_WEIGHT_FILES):
                raise FileNotFoundError(f"{d} holds no model weights ({' or '.join(HF_WEIGHT_FILES)}): the saved "
                                        f"model is incomplete; copy it again or retrain it")
        hf_models = {sub: AutoModelForSequenceClassification.from_pretrained(os.path.join(path, sub) if sub else path,
                                                                             **hf_kwargs)
                     for sub in config.get("hf_models", [""])}
        model = cls.from_hf_models(hf_models, **config.get("options", {}))
        weights = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{path} holds no {WEIGHTS_FILE}: the method's weights are missing")
        state = load_file(weights)
        expected = model._method_state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights}: the saved weights do not fit a {config['method']} model with these options "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        model.load_state_dict(state, strict=False)
        device = next(iter(hf_models.values())).device
        return model.to(device).eval()


class SingleModelBase(EarlyExitBase):
    """An :class:`EarlyExitBase` around one HF classifier (``self.hf``) and its adapter."""

    def _bind(self, hf_model: nn.Module, adapter) -> None:
        self.hf = hf_model
        self._adapter = adapter  # plain attribute (not a module): built and validated once

    @property
    def adapter(self):
        return self._adapter

    @property
    def config(self):
        return self.hf.config

    @property
    def num_layers(self) -> int:
        return self._adapter.num_layers

    @property
    def num_labels(self) -> int:
        return self.hf.config.num_labels

    def max_positions(self):
        return self._adapter.max_positions()

    def hf_models(self) -> Dict[str, nn.Module]:
        return {"": self.hf}
