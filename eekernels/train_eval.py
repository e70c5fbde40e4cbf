"""The ``train`` and ``eval`` commands: fine-tune an early-exit classifier on a labelled file,
then measure batched early exit on another.

``eekernels train --model DIR --train FILE [--dev FILE] --out DIR``
    Loads a local HF encoder (a ``*ForSequenceClassification`` or a base ``BertModel``/...;
    offline), converts it with :func:`eekernels.models.convert`, trains every exit with HF
    ``Trainer`` (joint loss, or DeeBERT's two stages with ``--two-stage``), and saves the
    early-exit model, the tokenizer and ``label_names.json`` to ``--out``. With ``--dev`` it
    prints each exit's dev accuracy.

``eekernels eval --model DIR --data FILE (--threshold X | --target-speedup S)``
    Runs ``model.early_exit`` over the file in batches and reports accuracy (early exit and
    full model), the exit histogram, layer speed-up (past-future.txt eq. 15 over the whole
    set), FLOPs speed-up and the wall clock of early exit against the full HF forward on the
    same batches. ``--report`` writes JSON, ``--plot`` a PNG histogram.

Bad input (files, columns, labels, model directories) gives a one-line error and exit
status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import List, Optional

LABEL_NAMES_FILE = "label_names.json"
TRAIN_RESULTS_FILE = "train_results.json"
CRITERIA = ("entropy", "max_prob", "patience", "policy")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _err(cmd: str, msg: str) -> int:
    print(f"eekernels {cmd}: error: {msg}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- arguments
def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-columns", default=None,
                   help="one or two comma-separated text columns (default: detected, e.g. sentence, "
                        "sentence1,sentence2, question,sentence, premise,hypothesis, '#1 String,#2 String', text)")
    p.add_argument("--label-column", default=None, help="label column (default: label, Quality, gold_label or labels)")
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``eekernels train``."""
    p.add_argument("--model", required=True,
                   help="local HF model directory: a *ForSequenceClassification or a base encoder (offline)")
    p.add_argument("--train", required=True, help="training file (.tsv, .csv, .jsonl)")
    p.add_argument("--dev", default=None, help="dev file: per-exit accuracy after training")
    p.add_argument("--out", required=True, help="directory to save the early-exit model to")
    p.add_argument("--method", default="early-exit",
                   help="the early-exit method: early-exit (DeeBERT / PABEE / Right-Tool heads, default), "
                        "past-future, consistentee, mpee, cascadebert; see --method-option")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. strategy=lstm (past-future), reward=vanilla "
                        "(consistentee), keep_ratio=0.5 (mpee), small_layers=2 (cascadebert); "
                        "`eekernels train --method NAME --method-option help=1` lists them")
    _add_data_arguments(p)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the exit heads (pooler + classifier of every exit, the final one "
                        "included); default: --lr. Freshly initialised heads on a pretrained backbone often "
                        "need a larger one (e.g. 1e-3)")
    p.add_argument("--exit-layers", default=None, help="comma-separated 1-based layers with an exit (default: all)")
    p.add_argument("--loss-weighting", choices=("weighted", "sum"), default="weighted",
                   help="weighted: w_i = i / sum j (past-future); sum: DeeBERT")
    p.add_argument("--two-stage", action="store_true",
                   help="DeeBERT: train backbone + final head first, then the internal exits with the backbone frozen "
                        "(each stage for --epochs / --max-steps)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=50)
    return p


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``eekernels eval``."""
    p.add_argument("--model", required=True, help="a directory written by `eekernels train`")
    p.add_argument("--data", required=True, help="labelled file to evaluate (.tsv, .csv, .jsonl)")
    _add_data_arguments(p)
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
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG exit histogram here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------- shared helpers
def _device(args):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def _check_model_dir(path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"model directory {path} does not exist")
    if not os.path.isdir(path):
        raise CLIError(f"--model {path} is not a directory (give a local HF model directory; nothing is downloaded)")
    from .methods.registry import method_of_directory

    if not os.path.isfile(os.path.join(path, "config.json")) and method_of_directory(path) is None:
        raise CLIError(f"{path} holds no config.json: not a Hugging Face model directory")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, ...
        raise CLIError(f"could not load a tokenizer from {path} (it needs vocab.txt / tokenizer.json and "
                       f"tokenizer_config.json): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _max_length(config, requested: int) -> int:
    """``requested``, capped by what the model's position embeddings allow."""
    if requested < 2:
        raise CLIError(f"--max-length must be >= 2, got {requested}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is None:
        return requested
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        max_pos -= (getattr(config, "pad_token_id", 1) or 0) + 1  # positions start after the padding index
    if requested > max_pos:
        print(f"note: --max-length {requested} exceeds the model's {max_pos} positions; using {max_pos}")
        return max_pos
    return requested


def _encode(tokenizer, examples, max_length: int, what: str):
    from .data import encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = encode(tokenizer, examples, max_length=max_length)
    if enc.num_truncated:
        print(f"{what}: {enc.num_truncated} of {len(examples)} examples truncated to {max_length} tokens")
    return enc


def _check_labels(labels, num_labels: int, path: str, names: Optional[List[str]] = None) -> None:
    bad = sorted({int(x) for x in labels if not 0 <= int(x) < num_labels})
    if bad:
        known = f" ({', '.join(names)})" if names else ""
        raise CLIError(f"{path}: label(s) {bad[:10]} are outside the model's {num_labels} classes "
                       f"0..{num_labels - 1}{known}")


def _batches(enc, batch_size: int, device):
    """(input_ids, attention_mask, token_type_ids) per batch, on ``device``, each trimmed to
    its own longest row (padding to the set's longest would cost both runs equally)."""
    n = enc["input_ids"].shape[0]
    out = []
    for s in range(0, n, batch_size):
        mask = enc["attention_mask"][s:s + batch_size]
        width = max(int(mask.sum(dim=1).max()), 1)
        ids = enc["input_ids"][s:s + batch_size, :width].to(device)
        tt = enc.get("token_type_ids")
        tt = None if tt is None else tt[s:s + batch_size, :width].to(device)
        out.append((ids, mask[:, :width].to(device), tt))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _exit_points(model) -> List[int]:
    """The layers after which samples can leave: per-layer exits, or a cascade's cumulative depths."""
    points = getattr(model, "exit_layers", None)
    if points is None:
        points = getattr(model, "exit_points", None)
    return list(points if points is not None else [model.num_layers])  # HashEE: samples never exit early


def _full_model(model):
    """The HF model whose plain forward is the full-model baseline (a cascade's largest member)."""
    return model.hf if hasattr(model, "hf") else model.members[-1]


def _exit_accuracies(model, enc, batch_size: int, progress: bool):
    """Accuracy of every exit (list, in the order of :func:`_exit_points`)."""
    from .calibration import collect_exit_logits

    dev = next(model.parameters()).device
    tt = enc.get("token_type_ids")
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    tt = None if tt is None else tt.to(dev)
    if hasattr(model, "member_logits"):  # a cascade: each member's own logits [M, B, C]
        z = model.member_logits(ids, mask, tt, batch_size=batch_size, progress=progress).float().cpu()
    elif getattr(model, "exit_layers", None) is None:  # no internal exits (HashEE): the model's logits
        import torch

        model.eval()
        with torch.no_grad():
            z = torch.cat([model(ids[s:s + batch_size], mask[s:s + batch_size],
                                 None if tt is None else tt[s:s + batch_size]).logits.float().cpu()
                           for s in range(0, ids.shape[0], batch_size)])[None]
    else:
        z = collect_exit_logits(model, ids, mask, tt, batch_size=batch_size, progress=progress)
    return (z.argmax(-1) == enc["labels"][None]).float().mean(dim=1).tolist()


# ---------------------------------------------------------------------- train
class _EncodedDataset:
    def __init__(self, enc):
        self.enc = enc
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in enc]

    def __len__(self):
        return self.enc["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: self.enc[k][i] for k in self.keys}


def _collate(rows):
    """Stack, then cut the padding columns no row in the batch uses."""
    import torch

    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    width = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        if k in batch:
            batch[k] = batch[k][:, :width]
    return batch


def _parse_exit_layers(spec: Optional[str]):
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--exit-layers must be comma-separated layer numbers like 2,4,6, got {spec!r}") from None
    if not layers:
        raise CLIError(f"--exit-layers is empty: {spec!r}")
    return layers


def _load_for_training(args, label_names: List[str], corpus=None):
    """The early-exit model to train: from an eekernels directory (heads kept) or a plain HF one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .models import EarlyExitModel
    from .models.early_exit import _META_FILE

    num_labels = len(label_names)
    exit_layers = _parse_exit_layers(args.exit_layers)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    n = getattr(config, "num_hidden_layers", None)
    if exit_layers is not None and n is not None and not all(1 <= l <= n for l in exit_layers):
        raise CLIError(f"--exit-layers {args.exit_layers}: layers must be within 1..{n} (the model has {n} layers)")
    id2label = {i: name for i, name in enumerate(label_names)}
    label2id = {name: i for i, name in enumerate(label_names)}
    from .methods.registry import method_of_directory

    spec = args.method_spec
    saved = method_of_directory(args.model)
    if saved is not None and saved.name != spec.name:
        raise CLIError(f"{args.model} holds a {saved.name} model; train it with --method {saved.name} "
                       f"(or start from the base model)")
    if saved is not None and spec.name != "early-exit":
        model = spec.load(args.model)
        if model.num_labels != num_labels:
            raise CLIError(f"{args.model} has {model.num_labels} classes, the training data has {num_labels}")
        print(f"continuing training of the {spec.name} model in {args.model}")
        return model
    if os.path.isfile(os.path.join(args.model, _META_FILE)):
        model = EarlyExitModel.from_pretrained(args.model, local_files_only=True)
        if model.num_labels != num_labels:
            raise CLIError(f"{args.model} is an early-exit model with {model.num_labels} classes, the training data "
                           f"has {num_labels} ({', '.join(label_names)}); start from the base model instead")
        if exit_layers is not None and sorted(set(exit_layers) | {model.num_layers}) != model.exit_layers:
            raise CLIError(f"{args.model} already has exits after layers {model.exit_layers}; --exit-layers "
                           f"{args.exit_layers} differs (start from the base model to change them)")
        model.loss_weighting = args.loss_weighting
        model.config.id2label, model.config.label2id = id2label, label2id
        print(f"continuing training of the early-exit model in {args.model}")
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=num_labels, id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True, local_files_only=True)
    try:
        return spec.build(hf, num_labels, exit_layers, args.method_options, corpus)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _optimizer(model, args):
    """AdamW with two parameter groups: the exit heads at ``--head-lr``, the rest at ``--lr``
    (Trainer's defaults otherwise: weight decay 0, its linear schedule is built on top)."""
    import torch

    final = model.head(model.num_layers)
    head_ids = {id(p) for m in (model.heads, final.pooler, final.classifier) if m is not None for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": args.lr},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": args.head_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def _train(args) -> int:
    import torch
    import transformers

    from .data import read_examples

    _check_model_dir(args.model)
    from .methods.registry import get_method, parse_options

    try:
        spec = get_method(args.method)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if any(o.strip().startswith("help=") for o in args.method_option):
        print(f"options of --method {spec.name} ({spec.summary}):")
        for k, (d, h) in spec.options.items():
            print(f"  {k}={d!r}: {h}")
        return 0
    try:
        args.method_options = parse_options(spec, args.method_option)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if spec.name != "early-exit":
        if args.two_stage or args.head_lr is not None:
            raise CLIError(f"--two-stage and --head-lr are options of --method early-exit, not {spec.name}")
        if args.loss_weighting != "weighted":
            raise CLIError(f"--loss-weighting is an option of --method early-exit; {spec.name} has its own loss")
    else:
        args.method_options["loss_weighting"] = args.loss_weighting
    args.method_spec = spec
    if args.head_lr is None:
        args.head_lr = args.lr
    for name in ("epochs", "lr", "head_lr", "batch_size"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise CLIError(f"--max-steps must be > 0 (or -1: use --epochs), got {args.max_steps}")
    train = read_examples(args.train, args.text_columns, args.label_column)
    names = train.label_names
    if len(names) < 2:
        raise CLIError(f"{args.train}: only one label value ({names[0]!r}); classification needs at least 2 classes")
    dev = None
    if args.dev:
        dev = read_examples(args.dev, args.text_columns, args.label_column, label_names=names)
        _check_labels(dev.labels, len(names), args.dev, names)
    print(f"train: {len(train)} examples from {args.train}, text {list(train.text_columns)}, "
          f"label {train.label_column!r}: {len(names)} classes {names}")

    transformers.set_seed(args.seed)
    tokenizer = _load_tokenizer(args.model)
    model = _load_for_training(args, names, corpus=(train, tokenizer))
    max_length = _max_length(model.config, args.max_length)
    train_enc = _encode(tokenizer, train, max_length, "train")
    dev_enc = _encode(tokenizer, dev, max_length, "dev") if dev is not None else None
    spec = args.method_spec
    exit_points = _exit_points(model)
    print(f"model: {spec.name} on {type(_full_model(model)).__name__}, {model.num_layers} layers, exits after "
          f"{exit_points}" + (f", loss weighting {model.loss_weighting}" if spec.name == "early-exit" else "")
          + (f", options {args.method_options}" if spec.name != "early-exit" else ""))

    def training_args(out_dir):
        return transformers.TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            max_steps=args.max_steps, learning_rate=args.lr, seed=args.seed, use_cpu=args.cpu,
            logging_steps=max(1, args.logging_steps), save_strategy="no", report_to=[],
            remove_unused_columns=False, disable_tqdm=False,
        )

    losses = {}
    with tempfile.TemporaryDirectory(prefix="eekernels-train-") as tmp:
        if spec.name != "early-exit":
            losses = spec.train(model, training_args(tmp), _EncodedDataset(train_enc), _collate, args.method_options)
            print("training loss: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        stages = ["final", "internal"] if args.two_stage else ["joint"]
        for stage in stages if spec.name == "early-exit" else []:
            if stage == "internal":  # start the internal heads from the trained final head
                final = model.head(model.num_layers)
                with torch.no_grad():
                    for h in model.heads.values():
                        h.pooler.load_state_dict(final.pooler.state_dict())
                        h.classifier.load_state_dict(final.classifier.state_dict())
            model.set_training_stage(stage)
            trainer = transformers.Trainer(model=model, args=training_args(tmp),
                                           train_dataset=_EncodedDataset(train_enc),
                                           data_collator=_collate, optimizers=(_optimizer(model, args), None))
            if len(stages) > 1:
                print(f"stage {stage!r}: " + ("backbone + final head" if stage == "final"
                                              else "internal exits, backbone frozen"))
            result = trainer.train()
            losses[stage] = float(result.training_loss)
            print(f"stage {stage!r}: {result.global_step} steps, mean training loss {result.training_loss:.4f}")
        if spec.name == "early-exit":
            model.set_training_stage("joint")
    model.eval()

    dev_acc = None
    if dev_enc is not None:
        dev_acc = _exit_accuracies(model, dev_enc, args.batch_size, progress=False)
        print(f"dev accuracy per exit ({len(dev)} examples from {args.dev}):")
        for layer, acc in zip(exit_points, dev_acc):
            print(f"  exit after layer {layer:2d}: {acc:.4f}")

    model.cpu()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, LABEL_NAMES_FILE), "w") as f:
        json.dump(names, f, indent=1)
    summary = {
        "base_model": args.model, "train": args.train, "dev": args.dev, "num_train": len(train),
        "text_columns": list(train.text_columns), "label_column": train.label_column, "label_names": names,
        "method": spec.name, "method_options": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in args.method_options.items()},
        "exit_layers": exit_points, "two_stage": args.two_stage,
        "max_length": max_length, "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "head_lr": args.head_lr,
        "batch_size": args.batch_size, "seed": args.seed, "training_loss": losses,
        "num_truncated": train_enc.num_truncated,
        "dev_accuracy": None if dev_acc is None else {str(l): a for l, a in zip(exit_points, dev_acc)},
    }
    with open(os.path.join(args.out, TRAIN_RESULTS_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"saved the {spec.name} model, tokenizer and {LABEL_NAMES_FILE} to {args.out}")
    return 0


def run_train(args) -> int:
    """``eekernels train``; returns the exit status."""
    try:
        return _train(args)
    except (CLIError, ValueError) as e:
        return _err("train", str(e))
    except OSError as e:
        return _err("train", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------- eval
def _load_for_eval(path: str):
    from .methods.registry import load_model

    _check_model_dir(path)
    try:
        model, spec = load_model(path)
    except FileNotFoundError:
        raise CLIError(f"{path} was not saved by `eekernels train` (no early-exit model of any method in it); "
                       f"train it first: eekernels train --model {path} --train FILE --out DIR") from None
    names = None
    names_file = os.path.join(path, LABEL_NAMES_FILE)
    if os.path.isfile(names_file):
        with open(names_file) as f:
            names = [str(x) for x in json.load(f)]
    return model.eval(), names, spec


def _threshold_notes(hist, exit_layers, n, criterion) -> List[str]:
    total = sum(hist.values())
    if len(exit_layers) < 2 or total == 0:
        return []
    more = {"entropy": "raise the threshold", "max_prob": "lower the threshold", "patience": "lower the patience",
            "policy": "lower the threshold"}
    fewer = {"entropy": "lower the threshold", "max_prob": "raise the threshold", "patience": "raise the patience",
             "policy": "raise the threshold"}
    if hist[n] == total:
        return [f"the threshold never fires: all {total} samples ran every layer and exited at the last layer {n} "
                f"(no speed-up); {more[criterion]} for earlier exits"]
    if hist[exit_layers[0]] == total:
        return [f"the threshold always fires: all {total} samples exited at the first exit (layer {exit_layers[0]}); "
                f"{fewer[criterion]} for more accuracy"]
    return []


def _plot(path: str, hist, n: int, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None
    layers = sorted(hist)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), 3.2))
    ax.bar(layers, [hist[l] for l in layers], color="tab:blue")
    ax.set_xticks(list(range(1, n + 1)))
    ax.set_xlabel("exit layer")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _eval(args) -> int:
    import torch
    from tqdm import tqdm

    from . import metrics
    from .backends import BackendUnavailableError
    from .data import read_examples

    if args.batch_size <= 0:
        raise CLIError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.threshold is not None and not (args.threshold >= 0):  # NaN too
        raise CLIError(f"--threshold must be a number >= 0 (inf allowed), got {args.threshold}")
    if args.criterion == "patience" and args.threshold is not None and math.isfinite(args.threshold) \
            and args.threshold != int(args.threshold):
        raise CLIError(f"--threshold for patience is a whole number of layers, got {args.threshold}")
    model, names, spec = _load_for_eval(args.model)
    if args.criterion is None and spec.criteria:
        args.criterion = spec.criteria[0]
    if spec.criteria and args.criterion not in spec.criteria:
        raise CLIError(f"--criterion {args.criterion}: a {spec.name} model takes {', '.join(spec.criteria)}")
    if args.criterion in ("max_prob", "policy") and args.threshold is not None and args.threshold > 1:
        raise CLIError(f"--threshold for {args.criterion} is a probability in [0, 1], got {args.threshold}")
    cascade = spec.name == "cascadebert"
    no_threshold = not spec.criteria  # HashEE: tokens exit by the hash table, samples never do
    if no_threshold:
        if args.threshold is not None or args.target_speedup is not None:
            raise CLIError(f"a {spec.name} model has no exit threshold: drop --threshold / --target-speedup")
        args.criterion = "none"
        args.threshold = float("nan")
    elif args.threshold is None and args.target_speedup is None:
        raise CLIError("give --threshold or --target-speedup")
    exit_points = _exit_points(model)
    data = read_examples(args.data, args.text_columns, args.label_column, label_names=names)
    n, c = model.num_layers, model.num_labels
    _check_labels(data.labels, c, args.data, names)
    tokenizer = _load_tokenizer(args.model)
    device = _device(args)
    model.to(device)
    max_length = _max_length(model.config, args.max_length)
    enc = _encode(tokenizer, data, max_length, "data")
    labels = enc["labels"]
    progress = not args.no_progress
    print(f"data: {len(data)} examples from {args.data}, text {list(data.text_columns)}, "
          f"label {data.label_column!r}; model: {spec.name}, {n} layers, exits after {exit_points}, {c} classes; "
          f"device {device}")

    calibration = None
    threshold = args.threshold
    if args.target_speedup is not None:
        from .calibration import calibrate

        if cascade:
            from .methods.cascadebert import calibrate_cascade as calibrate
        elif args.criterion == "policy":
            raise CLIError("--target-speedup calibrates a confidence threshold; the policy rule's threshold is "
                           "the paper's 0.5 (give --threshold 0.5, or pick --criterion entropy/max_prob/patience)")
        tt = enc.get("token_type_ids")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            crit = {} if cascade else {"criterion": args.criterion}
            cal = calibrate(model, enc["input_ids"].to(device), labels, enc["attention_mask"].to(device),
                            None if tt is None else tt.to(device), **crit,
                            target_speedup=args.target_speedup, batch_size=args.batch_size, progress=progress)
        for w in caught:
            if issubclass(w.category, RuntimeWarning):
                print(f"note: {w.message}")
        threshold = cal.threshold
        calibration = {"target_speedup": args.target_speedup, "threshold": cal.threshold,
                       "layer_speedup": cal.layer_speedup, "accuracy": cal.accuracy, "in_sample": True}
        print(f"calibrated on this data (in-sample): {args.criterion} threshold {threshold:.6g} for layer "
              f"speed-up >= {args.target_speedup}")

    batches = _batches(enc, args.batch_size, device)

    full_model = _full_model(model)

    def full(b):
        return full_model(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2]).logits

    def early(b):
        if no_threshold:  # HashEE: token packing; every sample runs every layer
            out = model.forward_packed(b[0], b[1], b[2], backend=args.backend)
            return SimpleNamespace(pred=out.pred, flops_speedup=out.flops_speedup_total,
                                   exit_layer=torch.full_like(out.pred, n))
        crit = {} if cascade else {"criterion": args.criterion}
        return model.early_exit(b[0], b[1], b[2], threshold=threshold, backend=args.backend, **crit)

    try:
        with torch.no_grad():
            full(batches[0])  # warm-up, not timed
            early(batches[0])
            _sync(device)
            full_preds, t_full = [], 0.0
            for b in tqdm(batches, desc="full model", disable=not progress):
                t0 = time.perf_counter()
                z = full(b)
                _sync(device)
                t_full += time.perf_counter() - t0
                full_preds.append(z.argmax(-1).cpu())
            preds, exit_layer, t_early, flops = [], [], 0.0, []
            for b in tqdm(batches, desc="early exit", disable=not progress):
                t0 = time.perf_counter()
                out = early(b)
                _sync(device)
                t_early += time.perf_counter() - t0
                preds.append(out.pred.cpu())
                exit_layer.append(out.exit_layer.cpu())
                flops.append((float(b[1].sum()), out.flops_speedup))
    except BackendUnavailableError as e:
        raise CLIError(f"--backend {args.backend}: {e}") from None
    full_pred, pred, el = torch.cat(full_preds), torch.cat(preds), torch.cat(exit_layer)

    acc = float((pred == labels).float().mean())
    full_acc = float((full_pred == labels).float().mean())
    agreement = float((pred == full_pred).float().mean())
    hist = {l: int((el == l).sum()) for l in exit_points}
    layer_speedup = (metrics.cascade_layer_speedup if cascade else metrics.layer_speedup)(el, n)
    # Each batch's FLOPs speed-up is the method's own count (token pruning, extra heads and
    # cascade members included); batches combine by their share of the tokens.
    tokens = sum(t for t, _ in flops)
    flops_speedup = tokens / sum(t / sp for t, sp in flops)
    notes = [] if no_threshold else _threshold_notes(hist, exit_points, exit_points[-1], args.criterion)

    print(f"criterion {args.criterion}, threshold {threshold:.6g}, {len(batches)} batches of <= {args.batch_size}")
    print(f"accuracy (early exit): {acc:.4f}")
    print(f"accuracy (full model): {full_acc:.4f}   (early exit agrees with the full model on {agreement:.2%})")
    print("exit histogram:")
    width = 40
    top = max(hist.values()) or 1
    for l in exit_points:
        print(f"  layer {l:2d}: {hist[l]:7d} {hist[l] / len(el):7.2%} {'#' * round(width * hist[l] / top)}")
    print(f"mean exit layer: {float(el.double().mean()):.3f} of {n}")
    print(f"layer speed-up: {layer_speedup:.3f}x   FLOPs speed-up: {flops_speedup:.3f}x")
    wall = t_full / t_early if t_early > 0 else float("nan")
    print(f"wall clock: early exit {t_early:.3f} s, full HF forward {t_full:.3f} s on the same batches "
          f"-> {wall:.2f}x")
    for note in notes:
        print(f"note: {note}")

    report = {
        "model": args.model, "data": args.data, "num_examples": len(data), "label_names": names or data.label_names,
        "text_columns": list(data.text_columns), "label_column": data.label_column,
        "criterion": args.criterion, "threshold": threshold, "calibration": calibration,
        "accuracy": acc, "full_accuracy": full_acc, "agreement_with_full": agreement,
        "method": spec.name, "num_layers": n, "exit_layers": exit_points,
        "exit_histogram": {str(l): v for l, v in hist.items()},
        "mean_exit_layer": float(el.double().mean()),
        "layer_speedup": layer_speedup, "flops_speedup": flops_speedup,
        "time_early_exit_s": t_early, "time_full_s": t_full, "wallclock_speedup": wall,
        "batch_size": args.batch_size, "num_batches": len(batches), "max_length": max_length,
        "num_truncated": enc.num_truncated, "device": str(device), "backend": args.backend, "notes": notes,
    }
    if args.report:
        d = os.path.dirname(os.path.abspath(args.report))
        os.makedirs(d, exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.report}")
    if args.plot:
        _plot(args.plot, hist, exit_points[-1], f"{os.path.basename(args.data)}: {args.criterion} {threshold:.4g}, "
                                  f"acc {acc:.3f}, layer speed-up {layer_speedup:.2f}x")
        print(f"wrote {args.plot}")
    return 0


def run_eval(args) -> int:
    """``eekernels eval``; returns the exit status."""
    from .backends import BackendUnavailableError

    try:
        return _eval(args)
    except (CLIError, ValueError, BackendUnavailableError) as e:
        return _err("eval", str(e))
    except OSError as e:
        return _err("eval", f"{type(e).__name__}: {e}")
