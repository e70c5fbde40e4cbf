"""Evaluate batched early exit on a labelled file: the library behind ``eekernels eval``.

::

    from eekernels.evaluation import evaluate
    report = evaluate("out/", "dev.tsv", target_speedup=2.0)
    report["accuracy"], report["layer_speedup"], report["wallclock_speedup"]

It runs ``model.early_exit`` over the file in batches (dynamic padding) and reports
accuracy (early exit and full model), the exit histogram, the layer speed-up
(past-future.txt eq. 15 over the whole set), the FLOPs speed-up and the wall clock of early
exit against the full HF forward on the same batches. Any method's saved directory works:
its own exit rule is the default. With ``predictions=PATH`` it also writes one line per
input row (index, prediction, label name, exit layer, score), for any file, labelled or
not (an unlabelled file needs a threshold calibrated elsewhere; its report has no accuracy).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

from .metrics import binary_f1

__all__ = ["binary_f1", "evaluate", "exit_scores", "plot_histogram", "threshold_notes", "write_predictions"]


def threshold_notes(hist: Dict[int, int], exit_points: List[int], criterion: str) -> List[str]:
    """Hints when a threshold never or always fires."""
    total = sum(hist.values())
    if len(exit_points) < 2 or total == 0:
        return []
    more = {"entropy": "raise the threshold", "max_prob": "lower the threshold", "patience": "lower the patience",
            "policy": "lower the threshold"}
    fewer = {"entropy": "lower the threshold", "max_prob": "raise the threshold", "patience": "raise the patience",
             "policy": "raise the threshold"}
    last = exit_points[-1]
    if hist[last] == total:
        return [f"the threshold never fires: all {total} samples ran every layer and exited at the last layer {last} "
                f"(no speed-up); {more[criterion]} for earlier exits"]
    if hist[exit_points[0]] == total:
        return [f"the threshold always fires: all {total} samples exited at the first exit (layer {exit_points[0]}); "
                f"{fewer[criterion]} for more accuracy"]
    return []


def plot_histogram(path: str, hist: Dict[int, int], n: int, title: str) -> None:
    """A PNG bar chart of an exit histogram (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    layers = sorted(hist)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), 3.2))
    ax.bar(layers, [hist[l] for l in layers], color="tab:blue")
    ax.set_xticks(list(range(1, n + 1)))
    ax.set_xlabel("exit layer")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def exit_scores(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Each row's score as the predictions file reports it, from its logits at its exit:
    the entropy (nats) for "entropy", else the max probability."""
    p = logits.float().softmax(-1)
    if criterion == "entropy":
        return -torch.special.xlogy(p, p).sum(-1)
    return p.max(-1).values


def write_predictions(path: str, pred: torch.Tensor, exit_layer: torch.Tensor, score: torch.Tensor,
                      names: Optional[List[str]]) -> None:
    """One TSV line per input row (index, prediction, label, exit_layer, score), written
    atomically (a crash leaves no half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("index\tprediction\tlabel\texit_layer\tscore\n")
        for i, (p, e, s) in enumerate(zip(pred.tolist(), exit_layer.tolist(), score.tolist())):
            label = names[p] if names and 0 <= p < len(names) else str(p)
            f.write(f"{i}\t{p}\t{label}\t{e}\t{s:.6g}\n")
    os.replace(tmp, path)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model_dir: str, data: str, *, criterion: Optional[str] = None, threshold: Optional[float] = None,
             target_speedup: Optional[float] = None, batch_size: int = 32, max_length: int = 128,
             text_columns: Optional[str] = None, label_column: Optional[str] = None, backend: Optional[str] = None,
             cpu: bool = False, progress: bool = True, predictions: Optional[str] = None,
             executor: Optional[str] = None, engine: str = "rows", log: Callable[[str], None] = print) -> dict:
    """Evaluate a saved model on a labelled file (see the module docstring); returns the report.

    Exactly one of ``threshold`` and ``target_speedup`` (calibrated on this data, in-sample)
    for methods with an exit rule; neither for methods without one (HashEE). Bad input
    raises ValueError/FileNotFoundError naming the file, option or value. ``executor`` is
    what runs the layers of early exit (``early_exit(executor=...)``: "hf", "ort",
    "ort-int8", ...; default the method's own), ``engine`` how it runs (``early_exit(engine=...)``).
    """
    from tqdm import tqdm

    from . import backends
    from .calibration import calibrate
    from .data import batches, check_labels, encode_quietly, load_tokenizer, max_length_for, read_examples
    from .methods.registry import load_model
    from .models.base import CONFIG_FILE
    from .training.finetune import LABEL_NAMES_FILE, check_model_dir

    from .ops._checks import real_number

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"--batch-size must be an int > 0, got {batch_size!r}")
    threshold, target_speedup = (None if v is None else real_number("evaluate", name, v) for name, v in
                                 (("threshold", threshold), ("target_speedup", target_speedup)))
    if threshold is not None and not (threshold >= 0):  # NaN too
        raise ValueError(f"--threshold must be a number >= 0 (inf allowed), got {threshold}")
    check_model_dir(model_dir)
    if not os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
        raise ValueError(f"{model_dir} was not saved by `eekernels train` (no early-exit model of any method in it); "
                         f"train it first: eekernels train --model {model_dir} --train FILE --out DIR")
    model, spec = load_model(model_dir)
    model.eval()
    names = None
    names_file = os.path.join(model_dir, LABEL_NAMES_FILE)
    if os.path.isfile(names_file):
        with open(names_file) as f:
            names = [str(x) for x in json.load(f)]
    rules = model.criteria
    if rules:
        criterion = rules[0] if criterion is None else criterion
        if criterion not in rules:
            raise ValueError(f"--criterion {criterion}: a {spec.name} model takes {', '.join(rules)}")
        if criterion == "patience" and threshold is not None and math.isfinite(threshold) \
                and threshold != int(threshold):
            raise ValueError(f"--threshold for patience is a whole number of layers, got {threshold}")
        if criterion == "policy" and threshold is not None and threshold > 1:
            raise ValueError(f"--threshold for policy is a probability in [0, 1], got {threshold}")
        if threshold is None and target_speedup is None:
            raise ValueError("give --threshold or --target-speedup")
        if threshold is not None and target_speedup is not None:
            raise ValueError("give --threshold or --target-speedup, not both")
        model.check_rule(criterion, threshold)  # the method's own range (e.g. a cascade's tau in [0, 1])
    else:
        if threshold is not None or target_speedup is not None or criterion not in (None, "none"):
            raise ValueError(f"a {spec.name} model has no exit threshold: drop --criterion / --threshold / "
                             f"--target-speedup")
        criterion, threshold = "none", float("nan")
    points = model.exit_points
    examples = read_examples(data, text_columns, label_column, label_names=names,
                             require_labels=predictions is None)
    labelled = examples.labels is not None
    if not labelled and target_speedup is not None:
        raise ValueError(f"{data} has no labels: --target-speedup calibrates on labels; give a --threshold "
                         f"calibrated on a labelled dev set")
    n, c = model.num_layers, model.num_labels
    if labelled:
        check_labels(examples.labels, c, data, names)
    tokenizer = load_tokenizer(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    model.to(device)
    max_length = max_length_for(model.config, max_length, log)
    enc = encode_quietly(tokenizer, examples, max_length, "data", log)
    labels = enc.get("labels")
    log(f"data: {len(examples)} examples from {data}, text {list(examples.text_columns)}, "
        f"label {examples.label_column or '(none)'!r}; model: {spec.name}, {n} layers, exits after {points}, "
        f"{c} classes; device {device}")

    calibration = None
    if target_speedup is not None:
        tt = enc.get("token_type_ids")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            cal = calibrate(model, enc["input_ids"].to(device), labels, enc["attention_mask"].to(device),
                            None if tt is None else tt.to(device), criterion=criterion,
                            target_speedup=target_speedup, batch_size=batch_size, progress=progress)
        for w in caught:
            if issubclass(w.category, RuntimeWarning):
                log(f"note: {w.message}")
        threshold = cal.threshold
        calibration = {"target_speedup": target_speedup, "threshold": cal.threshold,
                       "layer_speedup": cal.layer_speedup, "accuracy": cal.accuracy, "in_sample": True}
        log(f"calibrated on this data (in-sample): {criterion} threshold {threshold:.6g} for layer "
            f"speed-up >= {target_speedup}")

    batch_list = batches(enc, batch_size, device)
    full_model = model.full_model()
    rule = {} if not rules else {"criterion": criterion, "threshold": threshold}

    def full(b):
        return full_model(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2]).logits

    def early(b):
        return model.early_exit(b[0], b[1], b[2], backend=backend, executor=executor, engine=engine, **rule)

    try:
        with torch.no_grad():
            full(batch_list[0])  # warm-up, not timed
            early(batch_list[0])
            _sync(device)
            full_preds, preds, exit_layer, flops, scores = [], [], [], [], []
            seconds = {"full": 0.0, "early": 0.0}

            def timed(path, b):
                t0 = time.perf_counter()
                result = full(b) if path == "full" else early(b)
                _sync(device)
                seconds[path] += time.perf_counter() - t0
                return result

            # The two paths alternate batch by batch (and which goes first), so that machine
            # noise, or a pause of the whole process, lands on both rather than on one.
            for i, b in enumerate(tqdm(batch_list, desc="full model and early exit", disable=not progress)):
                order = ("full", "early") if i % 2 == 0 else ("early", "full")
                results = {path: timed(path, b) for path in order}
                full_preds.append(results["full"].argmax(-1).cpu())
                out = results["early"]
                preds.append(out.pred.cpu())
                exit_layer.append(out.exit_layer.cpu())
                scores.append(exit_scores(out.logits.cpu(), criterion))
                flops.append((float(b[1].sum()), out.flops_speedup))
            t_full, t_early = seconds["full"], seconds["early"]
    except backends.BackendUnavailableError as e:
        raise ValueError(f"--backend {backend}: {e}") from None
    except ImportError as e:  # an executor's optional engine (ONNX Runtime) is not installed
        raise ValueError(f"--executor {executor}: {e}") from None
    full_pred, pred, el = torch.cat(full_preds), torch.cat(preds), torch.cat(exit_layer)
    if predictions:
        write_predictions(predictions, pred, el, torch.cat(scores), names or examples.label_names)
        log(f"wrote {predictions}")

    acc = float((pred == labels).float().mean()) if labelled else None
    full_acc = float((full_pred == labels).float().mean()) if labelled else None
    hist = {l: int((el == l).sum()) for l in points}
    layer_speedup = model.layer_speedup(el)
    # Each batch's FLOPs speed-up is the method's own count (token pruning, extra heads and
    # cascade members included); batches combine by their share of the tokens.
    tokens = sum(t for t, _ in flops)
    flops_speedup = tokens / sum(t / sp for t, sp in flops)
    wall = t_full / t_early if t_early > 0 else float("nan")
    return {
        "model": model_dir, "data": data, "num_examples": len(examples),
        "label_names": names or examples.label_names, "text_columns": list(examples.text_columns),
        "label_column": examples.label_column, "criterion": criterion, "threshold": threshold,
        "calibration": calibration, "accuracy": acc, "full_accuracy": full_acc,
        "f1": binary_f1(pred, labels) if labelled and c == 2 else None,
        "full_f1": binary_f1(full_pred, labels) if labelled and c == 2 else None,
        "agreement_with_full": float((pred == full_pred).float().mean()), "method": spec.name, "num_layers": n,
        "exit_layers": points, "exit_histogram": {str(l): v for l, v in hist.items()},
        "mean_exit_layer": float(el.double().mean()), "layer_speedup": layer_speedup, "flops_speedup": flops_speedup,
        "time_early_exit_s": t_early, "time_full_s": t_full, "wallclock_speedup": wall, "batch_size": batch_size,
        "num_batches": len(batch_list), "max_length": max_length, "num_truncated": enc.num_truncated,
        "device": str(device), "backend": backend, "executor": executor, "engine": engine, "predictions": predictions,
        "notes": [] if not rules else threshold_notes(hist, points, criterion),
    }
