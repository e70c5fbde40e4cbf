"""``eekernels train``: fine-tune an early-exit method on a labelled file
(:func:`eekernels.training.finetune.finetune`)."""

from __future__ import annotations

from typing import Optional

from .errors import guarded


def add_data_arguments(p) -> None:
    """The data options ``train`` and ``eval`` share."""
    p.add_argument("--text-columns", default=None,
                   help="one or two comma-separated text columns (default: detected, e.g. sentence, "
                        "sentence1,sentence2, question,sentence, premise,hypothesis, '#1 String,#2 String', text)")
    p.add_argument("--label-column", default=None, help="label column (default: label, Quality, gold_label or labels)")
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="local HF model directory: a *ForSequenceClassification or a base encoder (offline)")
    p.add_argument("--train", required=True, help="training file (.tsv, .csv, .jsonl)")
    p.add_argument("--dev", default=None, help="dev file: per-exit accuracy after training")
    p.add_argument("--out", required=True, help="directory to save the early-exit model to")
    p.add_argument("--method", default="early-exit",
                   help="the early-exit method: early-exit (DeeBERT / PABEE / Right-Tool heads, default), "
                        "past-future, consistentee, mpee, cascadebert, hashee; see --method-option")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. strategy=lstm (past-future), reward=vanilla "
                        "(consistentee), keep_ratio=0.5 (mpee), small_layers=2 (cascadebert); "
                        "`eekernels train --method NAME --method-option help=1` lists them")
    add_data_arguments(p)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of what the method adds or initialises afresh (exit heads, the final "
                        "head, policy nets, pooling modules); default: --lr. Fresh heads on a pretrained "
                        "backbone often need a larger one (e.g. 1e-3)")
    p.add_argument("--exit-layers", default=None, help="comma-separated 1-based layers with an exit (default: all)")
    p.add_argument("--loss-weighting", choices=("weighted", "sum"), default=None,
                   help="the method option loss_weighting: weighted (w_i = i / sum j, past-future; the default) "
                        "or sum (DeeBERT)")
    p.add_argument("--two-stage", action="store_true",
                   help="the method option two_stage: DeeBERT's backbone + final head first, then the internal "
                        "exits with the backbone frozen (each stage for --epochs / --max-steps)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument("--save-steps", type=int, default=500,
                   help="write a checkpoint every this many steps (beside --out, in .OUT.checkpoints/; removed "
                        "when training ends), for --resume")
    p.add_argument("--random-batches", action="store_true",
                   help="draw each batch uniformly at random (default: batches of similar lengths, which pad less)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same --out from its last checkpoint (same "
                        "options and seed: the model an uninterrupted run would end with)")


def parse_exit_layers(spec: Optional[str]):
    """``"2,4,6"`` -> [2, 4, 6]; None or "all" -> None."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--exit-layers must be comma-separated layer numbers like 2,4,6, got {spec!r}") from None
    if not layers:
        raise ValueError(f"--exit-layers is empty: {spec!r}")
    return layers


def _train(args) -> int:
    from ..methods.registry import get_method, parse_options
    from ..training.finetune import FinetuneConfig, finetune

    spec = get_method(args.method)
    if any(o.strip().startswith("help=") for o in args.method_option):
        print(f"options of --method {spec.name} ({spec.summary}):")
        for k, (d, h) in spec.options.items():
            print(f"  {k}={d!r}: {h}")
        for note in spec.notes:
            print(f"  note: {note}")
        return 0
    options = parse_options(spec, args.method_option)
    given = {k: options[k] for k in (o.split("=", 1)[0].strip() for o in args.method_option)}
    for flag, key, value in (("--two-stage", "two_stage", True if args.two_stage else None),
                             ("--loss-weighting", "loss_weighting", args.loss_weighting)):
        if value is None:
            continue
        if key not in spec.options:
            raise ValueError(f"{flag} is not an option of --method {spec.name} (its options: "
                             f"{', '.join(sorted(spec.options)) or 'none'})")
        given[key] = value
    cfg = FinetuneConfig(model=args.model, train=args.train, out=args.out, dev=args.dev, method=spec.name,
                         method_options=given, exit_layers=parse_exit_layers(args.exit_layers), lr=args.lr,
                         head_lr=args.head_lr, epochs=args.epochs, max_steps=args.max_steps,
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                         logging_steps=args.logging_steps, text_columns=args.text_columns,
                         label_column=args.label_column, cpu=args.cpu, save_steps=args.save_steps,
                         resume=args.resume, group_by_length=not args.random_batches)
    finetune(cfg)
    return 0


def run(args) -> int:
    return guarded("train", _train, args)
