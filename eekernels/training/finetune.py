"""Fine-tune one early-exit method on a labelled file: the library behind ``eekernels train``.

::

    from eekernels.training.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="path/to/hf", train="train.tsv", dev="dev.tsv",
                                     out="out/", method="past-future", max_steps=200))
    result.model, result.summary["dev_accuracy"]

The base model is a local HF directory (a ``*ForSequenceClassification`` or a base
encoder; nothing is downloaded) or a directory a previous run saved (training continues
with its heads). The method comes from :mod:`eekernels.methods.registry`; its options are
checked there. The output directory gets the model (``save_pretrained``), the tokenizer,
``label_names.json`` and ``train_results.json``.

Checkpoints: every ``save_steps`` steps HF ``Trainer`` writes a checkpoint (model,
optimizer, scheduler, RNG states, step) to the staging area beside the output,
``.OUT.checkpoints/`` (:func:`checkpoints_dir`); the last two complete ones are kept, so a
kill while one is written leaves the one before. ``resume=True`` continues from the last
complete checkpoint: with the same seed and data the result is the model an uninterrupted
run ends with. A successful run removes the staging area; a fresh run (no ``resume``)
starts it over.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .._atomic import staged_dir, write_json
from .checkpoints import checkpoints_dir, drop_torn_checkpoints, last_checkpoint

__all__ = ["FinetuneConfig", "FinetuneResult", "LABEL_NAMES_FILE", "TRAIN_RESULTS_FILE", "checkpoints_dir", "finetune",
           "last_checkpoint", "make_optimizer", "resume_point"]

LABEL_NAMES_FILE = "label_names.json"
TRAIN_RESULTS_FILE = "train_results.json"


@dataclass
class FinetuneConfig:
    """What to fine-tune, on what, and how.

    Attributes:
        model: local HF model directory (or one an earlier run saved).
        train: training file (.tsv, .csv, .jsonl); dev: optional dev file (per-exit accuracy).
        out: directory to save to.
        method: a name of :data:`eekernels.methods.registry.METHODS`; method_options: its
            options (``{"strategy": "lstm"}``; checked against the method's list).
        exit_layers: 1-based layers with an exit (None: every layer).
        lr: learning rate of the backbone; head_lr: of the parameters the method adds or
            initialises afresh (exit heads, policy nets, pooling modules; None: ``lr``).
        epochs, max_steps (-1: use epochs), batch_size, max_length, seed, logging_steps.
        text_columns, label_column: as :func:`eekernels.data.read_examples` takes them.
        cpu: train on the CPU even when CUDA is available.
        group_by_length: batches of similar lengths (HF's length-grouped sampler: random
            mega-batches of 50 batches, sorted by length inside), so that dynamic padding
            leaves little padding; False: uniformly random batches.
        save_steps: write a resumable checkpoint every this many optimizer steps.
        resume: continue from the last checkpoint of an interrupted run with the same ``out``
            (see the module docstring); a ValueError when there is none.
    """

    model: str
    train: str
    out: str
    dev: Optional[str] = None
    method: str = "early-exit"
    method_options: Dict[str, Any] = field(default_factory=dict)
    exit_layers: Optional[List[int]] = None
    lr: float = 2e-5
    head_lr: Optional[float] = None
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    max_length: int = 128
    seed: int = 42
    logging_steps: int = 50
    text_columns: Optional[str] = None
    label_column: Optional[str] = None
    cpu: bool = False
    save_steps: int = 500
    resume: bool = False
    group_by_length: bool = True


@dataclass
class FinetuneResult:
    """The trained model (on the CPU, eval mode) and the summary written to ``train_results.json``."""

    model: Any
    summary: Dict[str, Any]


def make_optimizer(model, lr: float, head_lr: float):
    """AdamW with two parameter groups: the method's new parameters
    (``model.head_parameters()``) at ``head_lr``, the rest at ``lr`` (weight decay 0; HF
    ``Trainer`` puts its linear schedule on top). Only parameters that require grad."""
    import torch

    head_ids = {id(p) for p in model.head_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": head_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def resume_point(spec, out: str) -> Optional[str]:
    """What a resumed training of method ``spec`` into ``out`` continues from (None: nothing
    to continue): the method's own ``resume_point`` of the staging area, else its last
    complete Trainer checkpoint."""
    if spec.resume_point is not None:
        return spec.resume_point(checkpoints_dir(out))
    return last_checkpoint(out)


def check_model_dir(path: str) -> None:
    """A ValueError unless ``path`` is a local model directory."""
    from .._atomic import recover
    from ..models.base import CONFIG_FILE

    recover(path)
    if not os.path.exists(path):
        raise ValueError(f"model directory {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"--model {path} is not a directory (give a local HF model directory; nothing is downloaded)")
    hf_config = os.path.join(path, "config.json")
    if not os.path.isfile(hf_config) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ValueError(f"{path} holds no config.json: not a Hugging Face model directory")
    for cfg in (hf_config, os.path.join(path, CONFIG_FILE)):
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg} is not valid JSON ({e}); the model directory is damaged: copy it again "
                                 f"or point --model at an intact one") from None


def _load_for_training(cfg: FinetuneConfig, spec, options, label_names: List[str], corpus, log):
    """The model to train: from an eekernels directory (its heads kept) or a plain HF one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..models.base import CONFIG_FILE, read_config

    num_labels = len(label_names)
    hf_config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    n = getattr(hf_config, "num_hidden_layers", None)
    if cfg.exit_layers is not None and n is not None and not all(1 <= l <= n for l in cfg.exit_layers):
        raise ValueError(f"--exit-layers {cfg.exit_layers}: layers must be within 1..{n} (the model has {n} layers)")
    if os.path.isfile(os.path.join(cfg.model, CONFIG_FILE)):
        saved = read_config(cfg.model)["method"]
        if saved != spec.name:
            raise ValueError(f"{cfg.model} holds a {saved} model; train it with --method {saved} "
                             f"(or start from the base model)")
        model = spec.model_cls.from_pretrained(cfg.model)
        if model.num_labels != num_labels:
            raise ValueError(f"{cfg.model} is a {saved} model with {model.num_labels} classes, the training data "
                             f"has {num_labels} ({', '.join(label_names)}); start from the base model instead")
        layers = getattr(model, "exit_layers", None)
        if cfg.exit_layers is not None and layers is not None and sorted(set(cfg.exit_layers) | {n}) != layers:
            raise ValueError(f"{cfg.model} already has exits after layers {layers}; --exit-layers "
                             f"{cfg.exit_layers} differs (start from the base model to change them)")
        if "loss_weighting" in options and hasattr(model, "loss_weighting"):
            model.loss_weighting = options["loss_weighting"]
        if options.get("exit_pooling") == "auto":  # the saved model's own, which it keeps
            options["exit_pooling"] = getattr(model, "exit_pooling", "auto")
        log(f"continuing training of the {spec.name} model in {cfg.model}")
        return model
    if options.get("exit_pooling") == "auto":
        from ..hf.adapters import backbone_pooling

        options["exit_pooling"] = backbone_pooling(cfg.model)
        log(f"exit heads read the layer's {'[CLS] state' if options['exit_pooling'] == 'cls' else 'mean token'} "
            f"(exit_pooling={options['exit_pooling']}, the backbone's own pooling)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForSequenceClassification.from_pretrained(
            cfg.model, num_labels=num_labels, id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True,
            local_files_only=True)
    return spec.build(hf, cfg.exit_layers, options, corpus)


def _check_types(cfg) -> None:
    """A TypeError naming the field of ``cfg`` whose value has the wrong type (the ranges are
    checked where they are used, with the command line's option names)."""
    from ..ops._checks import real_number

    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"finetune: cfg must be a FinetuneConfig, got {type(cfg).__name__}")
    for name in ("model", "train", "out", "dev", "text_columns", "label_column"):
        value = getattr(cfg, name)
        if not (isinstance(value, (str, os.PathLike)) or (value is None and name not in ("model", "train", "out"))):
            raise TypeError(f"finetune: {name} must be a path (str), got {type(value).__name__}")
    for name in ("lr", "epochs") + (("head_lr",) if cfg.head_lr is not None else ()):
        real_number("finetune", name, getattr(cfg, name))
    for name in ("cpu", "resume", "group_by_length"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"finetune: {name} must be True or False, got {getattr(cfg, name)!r}")
    for name in ("batch_size", "max_steps", "max_length", "seed", "logging_steps", "save_steps"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"finetune: {name} must be an int, got {value!r}")
    layers = cfg.exit_layers
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, (list, tuple))
                               or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers)):
        raise TypeError(f"finetune: exit_layers must be a list of 1-based layer numbers (ints), got {layers!r}")
    if not isinstance(cfg.method_options, dict):
        raise TypeError(f"finetune: method_options must be a dict, got {type(cfg.method_options).__name__}")


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune (see the module docstring); bad input raises ValueError/FileNotFoundError
    with a message that names the file, option or value."""
    import transformers

    from .sampling import sampling_args
    from ..data import EncodedDataset, check_labels, encode_quietly, load_tokenizer, max_length_for
    from ..data import read_examples
    from ..calibration import exit_accuracies
    from ..methods.registry import get_method, parse_options

    _check_types(cfg)
    check_model_dir(cfg.model)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a file; give a directory to save the model into")
    spec = get_method(cfg.method)
    options = parse_options(spec, [])
    unknown = sorted(set(cfg.method_options) - set(options))
    if unknown:
        raise ValueError(f"method {spec.name!r} has no option {unknown[0]!r} (its options: "
                         f"{', '.join(sorted(options)) or 'none'})")
    options.update(cfg.method_options)
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    for name, value in (("epochs", cfg.epochs), ("lr", cfg.lr), ("head-lr", head_lr), ("batch-size", cfg.batch_size)):
        if not value > 0:
            raise ValueError(f"--{name} must be > 0, got {value}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ValueError(f"--max-steps must be > 0 (or -1: use --epochs), got {cfg.max_steps}")
    if isinstance(cfg.save_steps, bool) or not isinstance(cfg.save_steps, int) or cfg.save_steps < 1:
        raise ValueError(f"--save-steps must be an integer >= 1, got {cfg.save_steps!r}")
    resume_from = None
    if cfg.resume:
        blocker = spec.resume_blocker(options)
        if blocker:
            raise ValueError(f"--resume: method {spec.name} cannot continue from a checkpoint ({blocker}); "
                             f"train again without --resume")
        drop_torn_checkpoints(checkpoints_dir(cfg.out))
        resume_from = resume_point(spec, cfg.out)
        if resume_from is None:
            raise ValueError(f"--resume: no checkpoint of an interrupted run for --out {cfg.out} (looked in "
                             f"{checkpoints_dir(cfg.out)}); train without --resume")
    else:
        shutil.rmtree(checkpoints_dir(cfg.out), ignore_errors=True)
    train = read_examples(cfg.train, cfg.text_columns, cfg.label_column)
    names = train.label_names
    if len(names) < 2:
        raise ValueError(f"{cfg.train}: only one label value ({names[0]!r}); classification needs at least 2 classes")
    dev = None
    if cfg.dev:
        dev = read_examples(cfg.dev, cfg.text_columns, cfg.label_column, label_names=names)
        check_labels(dev.labels, len(names), cfg.dev, names)
    log(f"train: {len(train)} examples from {cfg.train}, text {list(train.text_columns)}, "
        f"label {train.label_column!r}: {len(names)} classes {names}")

    transformers.set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = _load_for_training(cfg, spec, options, names, (train, tokenizer), log)
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    max_length = max_length_for(model.config, cfg.max_length, log)
    train_enc = encode_quietly(tokenizer, train, max_length, "train", log)
    dev_enc = encode_quietly(tokenizer, dev, max_length, "dev", log) if dev is not None else None
    log(f"model: {spec.name} on {model.config.model_type}, {model.num_layers} layers, exits after "
        f"{model.exit_points}, options {options}")

    t0 = time.time()
    if resume_from is not None:
        log(f"resuming from {resume_from}")
    targs = transformers.TrainingArguments(
        output_dir=checkpoints_dir(cfg.out), per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.lr, seed=cfg.seed, use_cpu=cfg.cpu,
        logging_steps=max(1, cfg.logging_steps), save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=2, resume_from_checkpoint=resume_from, report_to=[], remove_unused_columns=False,
        disable_tqdm=False, **sampling_args(cfg.group_by_length))
    train_set = EncodedDataset(train_enc)
    losses = spec.train(model, targs, train_set, train_set.collate, options,
                        lambda m: make_optimizer(m, cfg.lr, head_lr))
    log("training loss: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    train_seconds = time.time() - t0
    model.eval()

    dev_acc = None
    if dev_enc is not None:
        dev_acc = exit_accuracies(model, dev_enc, cfg.batch_size)
        log(f"dev accuracy per exit ({len(dev)} examples from {cfg.dev}):")
        for point, acc in zip(model.exit_points, dev_acc):
            log(f"  exit after layer {point:2d}: {acc:.4f}")

    model.cpu()
    summary = {
        "base_model": cfg.model, "train": cfg.train, "dev": cfg.dev, "num_train": len(train),
        "text_columns": list(train.text_columns), "label_column": train.label_column, "label_names": names,
        "method": spec.name, "method_options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "exit_layers": model.exit_points, "max_length": max_length, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "lr": cfg.lr, "head_lr": head_lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "group_by_length": cfg.group_by_length, "training_loss": losses,
        "train_seconds": train_seconds, "num_truncated": train_enc.num_truncated,
        "dev_accuracy": None if dev_acc is None else {str(l): a for l, a in zip(model.exit_points, dev_acc)},
    }
    # One step for the whole directory: a crash leaves the previous output or the new one.
    with staged_dir(cfg.out) as d:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        write_json(os.path.join(d, LABEL_NAMES_FILE), names)
        write_json(os.path.join(d, TRAIN_RESULTS_FILE), summary)
    shutil.rmtree(checkpoints_dir(cfg.out), ignore_errors=True)  # the run is done: nothing to resume
    log(f"saved the {spec.name} model, tokenizer and {LABEL_NAMES_FILE} to {cfg.out}")
    return FinetuneResult(model, summary)
