"""The early-exit methods by name, for the CLI (``eekernels train/eval --method NAME``).

Each :class:`MethodSpec` says how to build the method's model from an HF classifier, how
to train it with HF ``Trainer`` (its own loop where the paper needs one), how to recognise
and load a saved model, and which exit rules its inference takes. Method options come
from the command line as ``--method-option key=value`` and are checked against the
method's list, so a typo is an error, not an ignored setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["METHODS", "MethodSpec", "get_method", "load_model", "parse_options", "method_of_directory"]


@dataclass
class MethodSpec:
    """One method as the CLI drives it.

    Attributes:
        name: the ``--method`` name.
        summary: one line for ``--help``.
        options: option name -> (default, help); ``--method-option`` may set only these.
        meta_file: the file ``save_pretrained`` writes that identifies the method's directory
            (ConsistentEE: its policy weights, beside the plain model's ``early_exit.json``).
        criteria: the exit rules ``eval --criterion`` may pick (first = default).
        exits_per_layer: True when the model has per-layer exits (the exit-logit tools work:
            per-exit dev accuracy, threshold calibration).
        build: ``(hf_model, num_labels, exit_layers, options, corpus) -> model``; ``corpus`` is
            the training data (:class:`eekernels.data.LabelledTexts`) and the tokenizer, for
            methods that build something from the corpus (HashEE's hash table).
        train: ``(model, training_args, dataset, collate, options) -> {stage: mean loss}``.
        load: ``(path) -> model``.
    """

    name: str
    summary: str
    options: Dict[str, Tuple[Any, str]]
    meta_file: str
    criteria: Tuple[str, ...]
    exits_per_layer: bool
    build: Callable
    train: Callable
    load: Callable
    notes: List[str] = field(default_factory=list)


def parse_options(spec: MethodSpec, items: Sequence[str]) -> Dict[str, Any]:
    """``["k=v", ...]`` -> the method's options (defaults filled in, values typed like the
    defaults: int, float, bool (true/false/1/0), tuple of ints ("4,7,10"), or str)."""
    out = {k: d for k, (d, _) in spec.options.items()}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--method-option must be key=value, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in spec.options:
            known = ", ".join(sorted(spec.options)) or "none"
            raise ValueError(f"method {spec.name!r} has no option {k!r} (its options: {known})")
        default = spec.options[k][0]
        try:
            if isinstance(default, bool):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                out[k] = v.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                out[k] = int(v)
            elif isinstance(default, float):
                out[k] = float(v)
            elif isinstance(default, tuple):
                out[k] = tuple(int(x) for x in v.split(",") if x.strip())
            else:
                out[k] = v
        except ValueError:
            raise ValueError(f"method option {k}={v!r}: expected a value like {default!r}") from None
    return out


def _plain_trainer(model, targs, dataset, collate, callbacks=None, trainer_cls=None, **kwargs):
    import transformers

    cls = trainer_cls or transformers.Trainer
    trainer = cls(model=model, args=targs, train_dataset=dataset, data_collator=collate,
                  callbacks=list(callbacks or []), **kwargs)
    result = trainer.train()
    return {"joint": float(result.training_loss)}


# ---------------------------------------------------------------------- early-exit (DeeBERT, PABEE, Right-Tool)
def _ee_build(hf, num_labels, exit_layers, options, corpus=None):
    from ..models import convert

    return convert(hf, exit_layers=exit_layers, loss_weighting=options["loss_weighting"])


def _ee_load(path):
    from ..models import EarlyExitModel

    return EarlyExitModel.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------- past-future
def _pf_build(hf, num_labels, exit_layers, options, corpus=None):
    from .past_future import convert

    return convert(hf, strategy=options["strategy"], exit_layers=exit_layers)


def _pf_train(model, targs, dataset, collate, options):
    callbacks = []
    if options["layer_freezing"]:
        from ..training.past_future import LayerFreezingCallback

        callbacks.append(LayerFreezingCallback(seed=targs.seed))
    return _plain_trainer(model, targs, dataset, collate, callbacks)


def _pf_load(path):
    from .past_future import PastFutureModel

    return PastFutureModel.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------- consistentee
def _cee_build(hf, num_labels, exit_layers, options, corpus=None):
    from .consistentee import ConsistentEEModel

    return ConsistentEEModel.from_hf(hf, exit_layers=exit_layers, reward=options["reward"], alpha=options["alpha"],
                                     num_samples=options["num_samples"], epsilon=options["epsilon"],
                                     policy_hidden=options["policy_hidden"])


def _cee_train(model, targs, dataset, collate, options):
    from ..training.consistentee import train_consistentee

    res = train_consistentee(model, dataset, targs, rounds=options["rounds"], data_collator=collate)
    model.set_phase("init")  # back to the all-exits forward that per-exit accuracy and calibration read
    losses = {}
    for ph in res.phases:
        vals = list(ph.losses) if not isinstance(ph.losses, (int, float)) else [ph.losses]
        if vals:
            losses[f"round{ph.round}-{ph.phase}"] = float(sum(vals) / len(vals))
    return losses


def _cee_load(path):
    from .consistentee import ConsistentEEModel

    return ConsistentEEModel.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------- mpee
def _mpee_build(hf, num_labels, exit_layers, options, corpus=None):
    from .mpee import convert_mpee

    return convert_mpee(hf, exit_layers=exit_layers, prune_layers=options["prune_layers"],
                        keep_ratio=options["keep_ratio"], beta=options["beta"], lam=options["lam"])


def _mpee_load(path):
    from .mpee import MPEEModel

    return MPEEModel.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------- cascadebert
def _cascade_build(hf, num_labels, exit_layers, options, corpus=None):
    from .cascadebert import CascadeModel

    small = options["small_layers"]
    if not small:
        raise ValueError("cascadebert needs small_layers, e.g. --method-option small_layers=2")
    return CascadeModel.from_first_layers(hf, list(small), dar_weight=options["dar_weight"],
                                          confidence_margin=options["confidence_margin"])


def _cascade_train(model, targs, dataset, collate, options):
    import copy

    from ..training.cascadebert import DARTrainer, kfold_difficulty_labels

    difficulty = None
    if options["difficulty_folds"] > 0:
        small = copy.deepcopy(model.members[0])
        labels = kfold_difficulty_labels(lambda seed: copy.deepcopy(small), dataset, k=options["difficulty_folds"],
                                         seeds=range(options["difficulty_seeds"]),
                                         training_args=dict(per_device_train_batch_size=targs.per_device_train_batch_size,
                                                            num_train_epochs=targs.num_train_epochs,
                                                            max_steps=targs.max_steps, learning_rate=targs.learning_rate,
                                                            use_cpu=targs.use_cpu),
                                         data_collator=collate)
        difficulty = labels.labels
    return _plain_trainer(model, targs, dataset, collate, trainer_cls=DARTrainer, difficulty=difficulty)


def _cascade_load(path):
    from .cascadebert import CascadeModel

    return CascadeModel.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------- hashee
def _hashee_build(hf, num_labels, exit_layers, options, corpus=None):
    from ..nn.token_hash import build_hash_table
    from .hashee import HashEEModel

    if exit_layers is not None:
        raise ValueError("hashee has no exit heads: --exit-layers does not apply (tokens exit by the hash table)")
    kind = options["hash"]
    data, tokenizer = corpus if corpus is not None else (None, None)
    needs_corpus = kind in ("frequency", "mi")
    if needs_corpus and data is None:
        raise ValueError(f"the {kind} hash is built from the training corpus, which was not given")
    table = build_hash_table(
        kind, hf.config.num_hidden_layers, options["buckets"] or None,
        texts=data.texts if needs_corpus else None, tokenizer=tokenizer,
        labels=data.labels if kind == "mi" else None,
        embeddings=hf.get_input_embeddings().weight.detach() if kind == "clustered" else None,
        vocab_size=max(hf.config.vocab_size, len(tokenizer) if tokenizer is not None else 0), seed=options["seed"])
    return HashEEModel(hf, table)


def _hashee_load(path):
    from .hashee import HashEEModel

    return HashEEModel.from_pretrained(path, local_files_only=True)


METHODS: Dict[str, MethodSpec] = {
    "early-exit": MethodSpec(
        "early-exit", "an exit head after every layer (DeeBERT entropy / Right-Tool max-prob / PABEE patience)",
        {"loss_weighting": ("weighted", "weighted (w_i = i / sum j) or sum (DeeBERT)")},
        "early_exit.json", ("entropy", "max_prob", "patience"), True, _ee_build,
        lambda m, t, d, c, o: _plain_trainer(m, t, d, c), _ee_load),
    "past-future": MethodSpec(
        "past-future", "Past-Future: pooled past states + imitated future states, merging gate (past-future.txt)",
        {"strategy": ("concat", "max | avg | attn | concat | lstm, or the baselines voting | ensemble"),
         "layer_freezing": (True, "freeze layer l with probability (L-l)/(L-1) each step (section 3.4)")},
        "past_future.json", ("entropy", "max_prob"), True, _pf_build, _pf_train, _pf_load),
    "consistentee": MethodSpec(
        "consistentee", "ConsistentEE: policy network per exit trained by policy gradient (consistentee.txt)",
        {"reward": ("hardness", "hardness (eq. 4, memorized layer) or vanilla (eq. 3)"),
         "alpha": (0.1, "weight of the layer-cost term of the reward"),
         "num_samples": (8, "K trajectories per sample (repeated sampling)"),
         "epsilon": (0.05, "epsilon-greedy exploration (eq. 5)"),
         "policy_hidden": (32, "hidden size of the policy MLP"),
         "rounds": (2, "iterative training rounds (memorized layers, policy step, classifier step)")},
        "policy_nets.safetensors", ("policy", "entropy", "max_prob", "patience"), True, _cee_build, _cee_train, _cee_load,
        notes=["criterion policy: exit when p(exit) > threshold; the paper's threshold is 0.5"]),
    "mpee": MethodSpec(
        "mpee", "MPEE: token pruning by class-attention memory + layer exits with classifier memory (mpee.txt)",
        {"prune_layers": ((4, 7, 10), "layers after which tokens are pruned (comma-separated)"),
         "keep_ratio": (0.7, "fraction of the non-[CLS] tokens kept at each pruning layer"),
         "beta": (0.5, "class-attention memory weight (eq. 6)"),
         "lam": (0.9, "classifier memory weight (eq. 10)")},
        "mpee.json", ("entropy", "max_prob", "patience"), True, _mpee_build,
        lambda m, t, d, c, o: _plain_trainer(m, t, d, c), _mpee_load),
    "cascadebert": MethodSpec(
        "cascadebert", "CascadeBERT: a cascade of complete models of growing depth (cascadebert.txt)",
        {"small_layers": ((), "depths of the smaller members, cut from the model's first layers, e.g. 2 or 2,6"),
         "dar_weight": (0.5, "lambda of the difficulty-aware margin loss (eq. 5-6)"),
         "confidence_margin": (0.5, "epsilon of the margin loss"),
         "difficulty_folds": (0, "K of the K-fold difficulty labels (0: train without DAR)"),
         "difficulty_seeds": (2, "seeds per fold for the difficulty labels")},
        "cascade.json", ("max_prob",), False, _cascade_build, _cascade_train, _cascade_load,
        notes=["criterion max_prob: a member emits a sample once its max probability > threshold"]),
    "hashee": MethodSpec(
        "hashee", "HashEE: each token exits at the layer its id hashes to; no sample exits early (hashee.txt)",
        {"hash": ("frequency", "random | random_inconsistent | frequency | mi | clustered"),
         "buckets": (0, "number of buckets B (0: one per layer)"),
         "seed": (0, "seed of the random hashes and of k-means")},
        "hashee.json", (), False, _hashee_build, lambda m, t, d, c, o: _plain_trainer(m, t, d, c), _hashee_load,
        notes=["no exit threshold: every sample runs every layer, its tokens stop at their hashed layers"]),
}


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``, or a ValueError listing the methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def method_of_directory(path: str) -> Optional[MethodSpec]:
    """The method whose ``save_pretrained`` wrote ``path`` (by its metadata file), or None.

    Methods built on the plain early-exit model also write ``early_exit.json``, so the
    more specific files are looked for first.
    """
    for spec in sorted(METHODS.values(), key=lambda s: s.name == "early-exit"):
        if os.path.isfile(os.path.join(path, spec.meta_file)):
            return spec
    return None


def load_model(path: str):
    """(model, spec) for a directory written by any method's ``save_pretrained``."""
    spec = method_of_directory(path)
    if spec is None:
        raise FileNotFoundError(f"{path} holds no early-exit model of any method ({', '.join(sorted(METHODS))})")
    return spec.load(path), spec
