"""The early-exit methods by name: the one table the CLI, the training library and the
recipes read (``eekernels train --method NAME``), so none of them branches on a method.

Each :class:`MethodSpec` says how to build the method's model from an HF classifier, how
to train it with HF ``Trainer`` (its own schedule where the paper needs one) and which
options it takes. Options come from the command line as ``--method-option key=value`` and
are checked against the method's list, so a typo is an error, not an ignored setting.
Saved models name their method in ``eekernels.json``; :func:`load_model` reads it back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["METHODS", "MethodSpec", "get_method", "load_model", "parse_options"]


@dataclass
class MethodSpec:
    """One method as the CLI and the training library drive it.

    Attributes:
        name: the ``--method`` name (the model class's ``method``).
        summary: one line for ``--help``.
        model_class: "module:Class" of the method's :class:`~eekernels.models.base.EarlyExitBase`.
        options: option name -> (default, help); ``--method-option`` may set only these.
        build: ``(hf_model, exit_layers, options, corpus) -> model``; ``corpus`` is the
            training data (:class:`eekernels.data.LabelledTexts`) and the tokenizer, for
            methods that build something from the corpus (HashEE's hash table).
        train: ``(model, training_args, dataset, collate, options, make_optimizer) ->
            {stage: mean loss}``; ``make_optimizer(model)`` gives the optimizer with the
            learning rates of the backbone and of the method's new parameters.
        notes: lines for ``--method-option help=1``.
        resume_blocker: ``options -> None`` where ``train`` can continue an interrupted run
            (``eekernels train --resume``), else why it cannot.
        resume_point: ``staging area -> path or None``: what an interrupted ``train`` left to
            continue from. None (the default): ``train`` is one HF ``Trainer`` run, continued
            from its last complete checkpoint (``targs.resume_from_checkpoint``); a method
            that trains in several runs keeps its own record and reads it here.
    """

    name: str
    summary: str
    model_class: str
    options: Dict[str, Tuple[Any, str]]
    build: Callable
    train: Callable
    notes: List[str] = field(default_factory=list)
    resume_blocker: Callable[[Dict[str, Any]], Optional[str]] = lambda options: None
    resume_point: Optional[Callable[[str], Optional[str]]] = None

    @property
    def model_cls(self):
        """The model class (imported on first use)."""
        mod, attr = self.model_class.split(":")
        return getattr(importlib.import_module(mod), attr)


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


def _trainer(model, targs, dataset, collate, make_optimizer, callbacks=None, trainer_cls=None, log_history=None,
             **kwargs):
    """One HF ``Trainer`` run (continued from ``targs.resume_from_checkpoint`` when set);
    returns its mean training loss (and extends ``log_history``, when given, with the run's
    logs)."""
    import transformers

    cls = trainer_cls or transformers.Trainer
    trainer = cls(model=model, args=targs, train_dataset=dataset, data_collator=collate,
                  callbacks=list(callbacks or []), optimizers=(make_optimizer(model), None), **kwargs)
    loss = float(trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint).training_loss)
    if log_history is not None:
        log_history.extend(trainer.state.log_history)
    return loss


# ---------------------------------------------------------------------- early-exit (DeeBERT, PABEE, Right-Tool)
def _ee_build(hf, exit_layers, options, corpus=None):
    from ..models import convert

    return convert(hf, exit_layers=exit_layers, loss_weighting=options["loss_weighting"],
                   exit_pooling=options["exit_pooling"])


def _ee_train(model, targs, dataset, collate, options, make_optimizer):
    """Joint training (one Trainer run), or DeeBERT's two stages (backbone + final head,
    then the internal exits with the backbone frozen, started from the trained final head):
    two steps of a :class:`~eekernels.training.schedule.StepSchedule`, resumed when
    ``targs.resume_from_checkpoint`` is set."""
    import torch

    from ..training.schedule import StepSchedule

    if not options["two_stage"]:
        model.set_training_stage("joint")
        return {"joint": _trainer(model, targs, dataset, collate, make_optimizer)}
    schedule = StepSchedule(targs.output_dir, TWO_STAGE_PROGRESS_FILE, model, targs.resume_from_checkpoint is not None)
    for stage in ("final", "internal"):
        if schedule.finished(stage):
            continue
        if stage == "internal":
            final = model.head(model.num_layers)
            with torch.no_grad():
                for h in model.heads.values():
                    h.pooler.load_state_dict(final.pooler.state_dict())
                    h.classifier.load_state_dict(final.classifier.state_dict())
        model.set_training_stage(stage)
        schedule.state[stage] = _trainer(model, schedule.step_args(targs, stage), dataset, collate, make_optimizer)
        schedule.finish(stage)
    model.set_training_stage("joint")
    return dict(schedule.state)


#: DeeBERT two-stage training's schedule record in the staging area
TWO_STAGE_PROGRESS_FILE = "two-stage-progress.pt"


def _ee_resume_point(area):
    from ..training.checkpoints import last_checkpoint_in
    from ..training.schedule import schedule_resume_point

    # a two-stage run's record or its first stage's checkpoint, else a joint run's checkpoint
    return schedule_resume_point(area, TWO_STAGE_PROGRESS_FILE) or last_checkpoint_in(area)


def _plain_train(model, targs, dataset, collate, options, make_optimizer):
    return {"joint": _trainer(model, targs, dataset, collate, make_optimizer)}


# ---------------------------------------------------------------------- past-future
def _pf_build(hf, exit_layers, options, corpus=None):
    from .past_future import convert

    return convert(hf, strategy=options["strategy"], exit_layers=exit_layers, exit_pooling=options["exit_pooling"],
                   last_exit=options["last_exit"])


def _pf_train(model, targs, dataset, collate, options, make_optimizer):
    """Joint training (eq. 13); with ``freeze_layers`` L > 0 the lowest L layers are frozen
    at random each step (section 3.4), checked against the model before training starts."""
    callbacks = []
    if options["freeze_layers"]:
        from ..training.past_future import LayerFreezingCallback, encoder_layers, freeze_probabilities

        freeze_probabilities(model.num_layers, options["freeze_layers"])
        encoder_layers(model)
        callbacks.append(LayerFreezingCallback(options["freeze_layers"], seed=targs.seed))
    return {"joint": _trainer(model, targs, dataset, collate, make_optimizer, callbacks)}


# ---------------------------------------------------------------------- consistentee
def _cee_build(hf, exit_layers, options, corpus=None):
    from .consistentee import ConsistentEEModel

    return ConsistentEEModel.from_hf(hf, exit_layers=exit_layers, reward=options["reward"], alpha=options["alpha"],
                                     num_samples=options["num_samples"], epsilon=options["epsilon"],
                                     policy_hidden=options["policy_hidden"], exit_pooling=options["exit_pooling"])


def _cee_train(model, targs, dataset, collate, options, make_optimizer):
    from ..training.consistentee import train_consistentee

    if options["round_epochs"] < 0:
        raise ValueError(f"consistentee: round_epochs must be >= 0 (0: --epochs), got {options['round_epochs']}")
    res = train_consistentee(model, dataset, targs, max_rounds=options["max_rounds"], tolerance=options["tolerance"],
                             round_epochs=options["round_epochs"] or None, data_collator=collate,
                             make_optimizer=make_optimizer,
                             resume=targs.resume_from_checkpoint is not None)
    model.set_phase("init")  # back to the all-exits forward that per-exit accuracy and calibration read
    losses = {}
    for ph in res.phases:
        if ph.losses:
            losses[f"round{ph.round}-{ph.phase}"] = float(sum(ph.losses) / len(ph.losses))
    for r, change in enumerate(res.changes, start=2):
        losses[f"round{r}-exit-change"] = change  # the stopping rule's measure
    return losses


def _cee_resume_point(area):
    from ..training.consistentee import resume_point

    return resume_point(area)


# ---------------------------------------------------------------------- mpee
def _mpee_build(hf, exit_layers, options, corpus=None):
    from .mpee import convert_mpee

    return convert_mpee(hf, exit_layers=exit_layers, prune_layers=options["prune_layers"],
                        keep_ratio=options["keep_ratio"], beta=options["beta"], lam=options["lam"],
                        exit_pooling=options["exit_pooling"])


# ---------------------------------------------------------------------- cascadebert
def _cascade_build(hf, exit_layers, options, corpus=None):
    from .cascadebert import CascadeModel

    if exit_layers is not None:
        raise ValueError("cascadebert has no per-layer exits: --exit-layers does not apply (use small_layers)")
    small = options["small_layers"]
    if not small:
        raise ValueError("cascadebert needs small_layers, e.g. --method-option small_layers=2")
    return CascadeModel.from_first_layers(hf, list(small), dar_weight=options["dar_weight"],
                                          confidence_margin=options["confidence_margin"],
                                          kd_alpha=options["kd_alpha"], kd_temperature=options["kd_temperature"])


def _cascade_train(model, targs, dataset, collate, options, make_optimizer):
    """Each member on its own (cascadebert.txt 4.2): the complete model first, then the
    smaller ones, largest first, each distilled from the complete model (5.4) and the
    smallest regularized by DAR (3.2) with K-fold difficulty labels from fresh copies of
    itself (K = ``difficulty_folds`` folds x ``difficulty_seeds`` seeds).

    Each member is a step of a :class:`~eekernels.training.schedule.StepSchedule` in the
    staging area (resumed when ``targs.resume_from_checkpoint`` is set), and the fold runs
    keep their predictions in ``difficulty_cache`` (default: the staging area's
    ``difficulty``), so an interrupted training loses at most the run it was in."""
    import copy
    import os

    from ..training.cascadebert import DARTrainer, kfold_difficulty_labels
    from ..training.sampling import is_length_grouped, sampling_args
    from ..training.schedule import StepSchedule
    from .cascadebert import CascadeModel

    folds, seeds = options["difficulty_folds"], options["difficulty_seeds"]
    if folds < 0 or (folds > 0 and seeds < 1):
        raise ValueError(f"cascadebert: difficulty_folds must be >= 0 and difficulty_seeds >= 1, got "
                         f"{folds} and {seeds}")
    if options["difficulty_steps"] < 0:
        raise ValueError(f"cascadebert: difficulty_steps must be >= 0, got {options['difficulty_steps']}")
    # the fold models start from the smallest member as built, before any training
    fresh_small = copy.deepcopy(model.members[0]) if folds > 0 else None
    schedule = StepSchedule(targs.output_dir, CASCADE_PROGRESS_FILE, model, targs.resume_from_checkpoint is not None)
    losses = schedule.state
    last = len(model.members) - 1

    def member_step(j, **kwargs):
        name = f"member{j}"
        if schedule.finished(name):
            return
        model.set_training_member(j)
        history: list = []
        losses[name] = _trainer(model, schedule.step_args(targs, name), dataset, collate, make_optimizer,
                                log_history=history, **kwargs)
        dar = [h["dar_loss"] for h in history if "dar_loss" in h]
        if dar:
            losses[f"{name}-dar"] = sum(dar) / len(dar)
        schedule.finish(name)

    try:
        member_step(last)
        difficulty = None
        if folds > 0 and not schedule.finished("member0"):
            steps = options["difficulty_steps"] or targs.max_steps
            difficulty = kfold_difficulty_labels(
                lambda seed: copy.deepcopy(fresh_small), dataset, k=folds, seeds=range(seeds),
                training_args=dict(per_device_train_batch_size=targs.per_device_train_batch_size,
                                   num_train_epochs=targs.num_train_epochs, max_steps=steps,
                                   learning_rate=targs.learning_rate, use_cpu=targs.use_cpu,
                                   remove_unused_columns=False, **sampling_args(is_length_grouped(targs))),
                data_collator=collate, make_optimizer=lambda m: make_optimizer(CascadeModel([m])),
                cache_dir=options["difficulty_cache"] or os.path.join(targs.output_dir, "difficulty")).labels
            losses["difficult_fraction"] = float(difficulty.float().mean())
        for j in reversed(range(last)):
            member_step(j, trainer_cls=DARTrainer, difficulty=difficulty if j == 0 else None)
    finally:
        model.set_training_member(None)
    return dict(losses)


#: CascadeBERT's schedule record in the staging area (:class:`~eekernels.training.schedule.StepSchedule`)
CASCADE_PROGRESS_FILE = "cascadebert-progress.pt"


def _cascade_resume_point(area):
    from ..training.schedule import schedule_resume_point

    return schedule_resume_point(area, CASCADE_PROGRESS_FILE)


# ---------------------------------------------------------------------- hashee
def _hashee_build(hf, exit_layers, options, corpus=None):
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


#: the option of every method with per-layer exit heads: what the heads read of their layer
EXIT_POOLING = ("auto", "cls | mean | auto: the backbone's own (mean for sentence-transformers checkpoints, "
                        "else cls)")

METHODS: Dict[str, MethodSpec] = {
    "early-exit": MethodSpec(
        "early-exit", "an exit head after every layer (DeeBERT entropy / Right-Tool max-prob / PABEE patience)",
        "eekernels.models.early_exit:EarlyExitModel",
        {"loss_weighting": ("weighted", "weighted (w_i = i / sum j) or sum (DeeBERT)"),
         "exit_pooling": EXIT_POOLING,
         "two_stage": (False, "DeeBERT: backbone + final head first, then the internal exits, backbone frozen")},
        _ee_build, _ee_train, resume_point=_ee_resume_point),
    "past-future": MethodSpec(
        "past-future", "Past-Future: pooled past states + imitated future states, merging gate (past-future.txt)",
        "eekernels.methods.past_future:PastFutureModel",
        {"strategy": ("concat", "max | avg | attn | concat | lstm, or the baselines voting | ensemble"),
         "exit_pooling": EXIT_POOLING,
         "last_exit": ("past", "past: the last exit classifies G(s_1..s_n) (the paper; the full model is then "
                               "this model's own forward) | hf: the HF head alone (the full model is the HF model)"),
         "freeze_layers": (0, "L: each step freeze layer l <= L with probability (L+1-l)/L (section 3.4; the paper "
                              "tunes L in 0,1,2,3; 0 = off, as the authors' default)")},
        _pf_build, _pf_train,
        resume_blocker=lambda o: "freeze_layers draws are not checkpointed" if o["freeze_layers"] else None),
    "consistentee": MethodSpec(
        "consistentee", "ConsistentEE: policy network per exit trained by policy gradient (consistentee.txt)",
        "eekernels.methods.consistentee:ConsistentEEModel",
        {"reward": ("hardness", "hardness (eq. 4, memorized layer) or vanilla (eq. 3)"),
         "exit_pooling": EXIT_POOLING,
         "alpha": (0.1, "weight of the layer-cost term of the reward"),
         "num_samples": (8, "K trajectories per sample (repeated sampling)"),
         "epsilon": (0.05, "epsilon-greedy exploration (eq. 5)"),
         "policy_hidden": (32, "hidden size of the policy MLP"),
         "max_rounds": (5, "most iterative training rounds (memorized layers, policy step, classifier step)"),
         "round_epochs": (0.0, "epochs of each round's policy and classifier step (0: --epochs, as the "
                               "initialisation)"),
         "tolerance": (0.02, "stop once the policy's exit distribution on the training rows moves less than this "
                             "(total variation) between rounds")},
        _cee_build, _cee_train,
        resume_point=_cee_resume_point,
        notes=["criterion policy: exit when p(exit) > threshold; the paper's threshold is 0.5",
               "training: weighted-CE init, then rounds until the policy settles (tolerance) or max_rounds; "
               "each step runs --epochs / --max-steps; --head-lr trains the exit heads and policy nets"]),
    "mpee": MethodSpec(
        "mpee", "MPEE: token pruning by class-attention memory + layer exits with classifier memory (mpee.txt)",
        "eekernels.methods.mpee:MPEEModel",
        {"prune_layers": ((4, 7, 10), "layers after which tokens are pruned (comma-separated)"),
         "exit_pooling": EXIT_POOLING,
         "keep_ratio": (0.7, "fraction of the non-[CLS] tokens kept at each pruning layer"),
         "beta": (0.5, "class-attention memory weight (eq. 6)"),
         "lam": (0.9, "classifier memory weight (eq. 10)")},
        _mpee_build, _plain_train),
    "cascadebert": MethodSpec(
        "cascadebert", "CascadeBERT: a cascade of complete models of growing depth (cascadebert.txt)",
        "eekernels.methods.cascadebert:CascadeModel",
        {"small_layers": ((), "depths of the smaller members, cut from the model's first layers, e.g. 2 or 2,6"),
         "dar_weight": (0.5, "lambda of the difficulty-aware margin loss (eq. 5-6)"),
         "confidence_margin": (0.5, "epsilon of the margin loss"),
         "kd_alpha": (0.5, "weight of the KD loss of the smaller members (section 5.4, vanilla KD; 0: off)"),
         "kd_temperature": (2.0, "KD temperature T"),
         "difficulty_folds": (8, "K of the K-fold difficulty labels for DAR (the paper: 8; 0: train without DAR)"),
         "difficulty_seeds": (5, "seeds per fold for the difficulty labels (the paper: 5)"),
         "difficulty_steps": (0, "training steps of each fold model (0: as many as the members' own training)"),
         "difficulty_cache": ("", "directory where each fold run keeps its predictions as it ends; a rerun with the "
                                  "same data and settings reuses them (empty: the training's staging area, "
                                  "until the training ends)")},
        _cascade_build, _cascade_train,
        resume_point=_cascade_resume_point,
        notes=["criterion max_prob: a member emits a sample once its max probability > threshold",
               "training: the complete model, then each smaller member distilled from it (KD) with DAR",
               "cost of DAR: difficulty_folds x difficulty_seeds trainings of the smallest member on (K-1)/K of "
               "the data (defaults 8 x 5 = 40: for a 2-layer member of a 6-layer model about 12x the complete "
               "model's own training); lower it with difficulty_seeds=1, difficulty_folds=2..4 or "
               "difficulty_steps=N, or turn DAR off with difficulty_folds=0"]),
    "hashee": MethodSpec(
        "hashee", "HashEE: each token exits at the layer its id hashes to; no sample exits early (hashee.txt)",
        "eekernels.methods.hashee:HashEEModel",
        {"hash": ("frequency", "random | random_inconsistent | frequency | mi | clustered"),
         "buckets": (0, "number of buckets B (0: one per layer)"),
         "seed": (0, "seed of the random hashes and of k-means")},
        _hashee_build, _plain_train,
        notes=["no exit threshold: every sample runs every layer, its tokens stop at their hashed layers"]),
}


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``, or a ValueError listing the methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def load_model(path: str, **hf_kwargs):
    """(model, spec) for a directory written by any method's ``save_pretrained``."""
    from ..models.base import read_config

    spec = get_method(read_config(path)["method"])
    return spec.model_cls.from_pretrained(path, **hf_kwargs), spec
