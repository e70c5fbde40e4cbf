"""``eekernels eval``: batched early exit of a trained model on a labelled file
(:func:`eekernels.evaluation.evaluate`), printed, and as JSON (``--report``) and PNG (``--plot``)."""

from __future__ import annotations

import json
import os

from ..models.base import ENGINES
from .errors import guarded
from .train import add_data_arguments

CRITERIA = ("entropy", "max_prob", "patience", "policy")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a directory written by `eekernels train`")
    p.add_argument("--data", required=True, help="file to evaluate (.tsv, .csv, .jsonl); labelled, or any file with "
                                                 "--predictions")
    add_data_arguments(p)
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="entropy (exit when < threshold), max_prob (exit when >= threshold), "
                        "patience (exit after threshold unchanged predictions), policy (ConsistentEE: exit "
                        "when p(exit) > threshold); default: the method's own (entropy; consistentee: policy; "
                        "cascadebert: max_prob)")
    g = p.add_mutually_exclusive_group()  # one of them is required, except for hashee (no threshold)
    g.add_argument("--threshold", type=float, default=None, help="the exit threshold (patience: an integer)")
    g.add_argument("--target-speedup", type=float, default=None,
                   help="calibrate the threshold on this data for this layer speed-up, then report")
    p.add_argument("--backend", default=None, help="ops backend: torch, cpu, triton, cuda (default: automatic)")
    p.add_argument("--executor", default=None,
                   help="what runs the layers of early exit: hf (the HF modules), ort / ort-int8 (ONNX Runtime, "
                        "fp32 / dynamic INT8, CPU; pip install eekernels[ort]); default: the method's own")
    p.add_argument("--engine", default="rows", choices=ENGINES,
                   help="how early exit runs: rows (default: the survivors compacted after each exit), fixed, "
                        "graphed (CUDA graphs), ort-graph (the whole forward as one ONNX Runtime graph on the CPU: "
                        "entropy and max_prob; --executor ort or ort-int8 gives its layers)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG exit histogram here")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="write one TSV line per input row here (index, prediction, label, exit layer, score: the "
                        "entropy for --criterion entropy, else the max probability); the data may be unlabelled, "
                        "then give a --threshold calibrated elsewhere")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def print_report(r: dict) -> None:
    """The report as the command prints it."""
    hist = {int(k): v for k, v in r["exit_histogram"].items()}
    total = sum(hist.values())
    print(f"criterion {r['criterion']}, threshold {r['threshold']:.6g}, {r['num_batches']} batches of "
          f"<= {r['batch_size']}")
    if r["accuracy"] is not None:
        print(f"accuracy (early exit): {r['accuracy']:.4f}" + (f"   F1 {r['f1']:.4f}" if r["f1"] is not None else ""))
        print(f"accuracy (full model): {r['full_accuracy']:.4f}" +
              (f"   F1 {r['full_f1']:.4f}" if r["full_f1"] is not None else ""))
    print(f"early exit agrees with the full model on {r['agreement_with_full']:.2%} of the rows")
    print("exit histogram:")
    top = max(hist.values()) or 1
    for l in r["exit_layers"]:
        print(f"  layer {l:2d}: {hist[l]:7d} {hist[l] / total:7.2%} {'#' * round(40 * hist[l] / top)}")
    print(f"mean exit layer: {r['mean_exit_layer']:.3f} of {r['num_layers']}")
    print(f"layer speed-up: {r['layer_speedup']:.3f}x   FLOPs speed-up: {r['flops_speedup']:.3f}x")
    print(f"wall clock: early exit {r['time_early_exit_s']:.3f} s, full HF forward {r['time_full_s']:.3f} s on the "
          f"same batches -> {r['wallclock_speedup']:.2f}x")
    for note in r["notes"]:
        print(f"note: {note}")


def _eval(args) -> int:
    from ..evaluation import evaluate, plot_histogram

    r = evaluate(args.model, args.data, criterion=args.criterion, threshold=args.threshold,
                 target_speedup=args.target_speedup, batch_size=args.batch_size, max_length=args.max_length,
                 text_columns=args.text_columns, label_column=args.label_column, backend=args.backend,
                 cpu=args.cpu, progress=not args.no_progress, predictions=args.predictions,
                 executor=args.executor, engine=args.engine)
    print_report(r)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(r, f, indent=1)
        print(f"wrote {args.report}")
    if args.plot:
        plot_histogram(args.plot, {int(k): v for k, v in r["exit_histogram"].items()}, r["exit_layers"][-1],
                       f"{os.path.basename(args.data)}: {r['criterion']} {r['threshold']:.4g}"
                       + (f", acc {r['accuracy']:.3f}" if r["accuracy"] is not None else "")
                       + f", layer speed-up {r['layer_speedup']:.2f}x")
        print(f"wrote {args.plot}")
    return 0


def run(args) -> int:
    return guarded("eval", _eval, args)
