"""CascadeBERT training helpers: difficulty labels and the difficulty-aware regularization (DAR).

- :func:`kfold_difficulty_labels` (cascadebert.txt section 3.2): split the training set into
  K folds; for every seed and every fold i, train a fresh model (HF ``Trainer``) on the
  other K-1 folds and predict fold i. An instance is easy (d = 0) only if it is predicted
  correctly under every seed, else difficult (d = 1).
- :func:`dar_margin_loss`: the pairwise margin objective of eq. 5-6 on confidences.
- :class:`DifficultyDataset` / :class:`DARTrainer`: feed the labels to
  :meth:`eekernels.methods.cascadebert.CascadeModel.forward` (``difficulty=``) through HF
  ``Trainer``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .._atomic import write_json

__all__ = [
    "DARTrainer",
    "DifficultyDataset",
    "DifficultyLabels",
    "dar_margin_loss",
    "kfold_difficulty_labels",
]


# --------------------------------------------------------------------------- eq. 5-6


def dar_margin_loss(confidence: torch.Tensor, difficulty: torch.Tensor, margin: float,
                    reduction: str = "mean") -> torch.Tensor:
    """Difficulty-aware margin loss over the pairs of a batch (cascadebert.txt eq. 5-6).

    For a pair (x_i, x_j) with g(x_i, x_j) = 1 if d(x_i) > d(x_j), -1 if d(x_i) < d(x_j),
    0 if equal (eq. 6), the loss is ``max(0, g(x_i, x_j) * (c(x_i) - c(x_j)) + eps)``: it is
    zero once the difficult instance's confidence is at least ``eps`` *below* the easy
    one's. (Eq. 5 as printed carries a minus sign, ``-g * (c_i - c_j)``, which with eq. 6's g
    would push difficult instances *above* easy ones; we follow the text and the authors'
    code, "difficult instances ... lower than those of easy instances".)

    Pairs with g = 0 (same difficulty) give the constant eps and no gradient in eq. 5; they
    are left out. Each unordered (difficult, easy) pair counts once.

    Args:
        confidence: [N] c(x) (max class probability, eq. 4), differentiable.
        difficulty: [N] 1 difficult, 0 easy; entries < 0 are unlabelled and take no part.
        margin: eps >= 0.
        reduction: "mean" over the (difficult, easy) pairs, or "sum". With no such pair the
            loss is 0 (still connected to the graph).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"dar_margin_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not (float(margin) >= 0):
        raise ValueError(f"dar_margin_loss: margin must be >= 0, got {margin}")
    c = confidence.reshape(-1)
    d = torch.as_tensor(difficulty, device=c.device).reshape(-1)
    if c.shape != d.shape:
        raise ValueError(f"dar_margin_loss: confidence has {c.numel()} entries, difficulty {d.numel()}")
    if bool((d > 1).any()):
        raise ValueError("dar_margin_loss: difficulty must hold 0 (easy), 1 (difficult) or -1 (unlabelled)")
    hard = (d == 1).to(c.dtype)
    easy = (d == 0).to(c.dtype)
    # [N_i, N_j]: i difficult, j easy -> max(0, c_i - c_j + eps); masked by the pair weight
    pair = hard[:, None] * easy[None, :]
    terms = torch.relu(c[:, None] - c[None, :] + margin) * pair
    total = terms.sum()
    if reduction == "sum":
        return total
    return total / pair.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- feeding the labels


class DifficultyDataset(torch.utils.data.Dataset):
    """A dataset of HF-style dict rows with a ``difficulty`` entry added to each row.

    ``difficulty`` is [N] (the smallest member's labels) or [N, M] (one column per member);
    see :meth:`~eekernels.methods.cascadebert.CascadeModel.forward`.
    """

    def __init__(self, dataset, difficulty: torch.Tensor):
        difficulty = torch.as_tensor(difficulty).long()
        if difficulty.shape[0] != len(dataset):
            raise ValueError(f"DifficultyDataset: {difficulty.shape[0]} difficulty labels for {len(dataset)} rows")
        self.dataset, self.difficulty = dataset, difficulty

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        row = dict(self.dataset[i])
        row["difficulty"] = self.difficulty[i]
        return row


def _trainer_cls():
    from transformers import Trainer

    class DARTrainer(Trainer):
        """HF ``Trainer`` for a :class:`~eekernels.methods.cascadebert.CascadeModel` with DAR.

        ``difficulty`` (optional, [N] or [N, M], aligned with ``train_dataset``) is attached to
        the training rows (:class:`DifficultyDataset`), so the model's forward receives it and
        adds ``dar_weight`` * eq. 5-6. Training logs also report the mean DAR loss.
        """

        def __init__(self, *args, difficulty: Optional[torch.Tensor] = None, **kwargs):
            if difficulty is not None:
                ds = kwargs.get("train_dataset")
                if ds is None:
                    raise ValueError("DARTrainer: difficulty needs train_dataset (pass it by keyword)")
                kwargs["train_dataset"] = DifficultyDataset(ds, difficulty)
            super().__init__(*args, **kwargs)
            self._dar_sum, self._dar_n = 0.0, 0

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            dar = outputs.get("dar_loss") if isinstance(outputs, dict) else None
            if dar is not None and model.training:
                self._dar_sum += float(dar.detach())
                self._dar_n += 1
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: Dict[str, float], *args, **kwargs):
            if self._dar_n and "loss" in logs:
                logs["dar_loss"] = self._dar_sum / self._dar_n
                self._dar_sum, self._dar_n = 0.0, 0
            super().log(logs, *args, **kwargs)

    return DARTrainer


def __getattr__(name):
    # transformers' Trainer is imported only when the class is asked for.
    if name == "DARTrainer":
        cls = _trainer_cls()
        globals()["DARTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- K-fold labelling


@dataclass
class DifficultyLabels:
    """Result of :func:`kfold_difficulty_labels` for N training instances.

    Attributes:
        labels: int64 [N], 0 easy (correct under every seed), 1 difficult.
        correct: bool [S, N], whether the seed-s model that did not train on instance n
            predicted it correctly.
        folds: int64 [N], the fold (0..K-1) of each instance.
        seeds: the seeds, in the order of ``correct``'s rows.
    """

    labels: torch.Tensor
    correct: torch.Tensor
    folds: torch.Tensor
    seeds: tuple


def _row_labels(dataset) -> torch.Tensor:
    out = []
    for i in range(len(dataset)):
        row = dataset[i]
        if "labels" not in row:
            raise ValueError("kfold_difficulty_labels: dataset rows must be dicts with a 'labels' entry")
        out.append(int(torch.as_tensor(row["labels"])))
    return torch.tensor(out, dtype=torch.long)


def _run_fingerprint(targets: torch.Tensor, folds: torch.Tensor, k: int, split_seed: int, args: dict) -> str:
    """What a cached fold run's result depends on besides the model: the instances' labels,
    the split and the training arguments."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(targets.to(torch.int64).numpy().tobytes())
    h.update(folds.numpy().tobytes())
    h.update(json.dumps({"k": k, "split_seed": split_seed, "args": args}, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def _cached_run(path: Optional[str], fingerprint: str, held: list) -> Optional[torch.Tensor]:
    """The cached correctness of one fold run (bool [len(held)]), or None when there is no
    entry for these instances, split and arguments."""
    import json

    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if entry.get("fingerprint") != fingerprint or entry.get("held") != held or len(entry.get("correct", ())) != len(held):
        return None
    return torch.tensor(entry["correct"], dtype=torch.bool)


def kfold_difficulty_labels(make_model: Callable[[int], nn.Module], dataset, *, k: int = 8,
                            seeds: Sequence[int] = (0, 1, 2, 3, 4), training_args: Optional[dict] = None,
                            split_seed: int = 0, output_dir: Optional[str] = None, trainer_cls=None,
                            data_collator=None, make_optimizer: Optional[Callable[[nn.Module], object]] = None,
                            progress: bool = True, cache_dir: Optional[str] = None) -> DifficultyLabels:
    """Difficulty labels by leave-one-fold-out training (cascadebert.txt section 3.2).

    The dataset is split once (``split_seed``) into ``k`` folds D_1..D_k of near-equal size.
    For every seed s and fold i a fresh model ``make_model(s)`` is trained with HF
    ``Trainer`` on the union of the other folds and predicts D_i; an instance is easy
    (d = 0) only if it is predicted correctly under every seed, difficult (d = 1) otherwise.
    For a cascade, label with the member the regularization is for (the paper: the 2-layer
    model), e.g. ``make_model = lambda s: fresh copy of the small member``.

    Args:
        make_model: seed -> a new, untrained-on-this-data HF sequence classifier (or any
            ``Trainer``-compatible module returning ``logits``). Called k * len(seeds) times,
            after ``transformers.set_seed(seed)``.
        dataset: a map-style dataset of dict rows (``input_ids``, ``attention_mask``, ...,
            ``labels``: class ids).
        k: number of folds (>= 2; the paper uses 8).
        seeds: training seeds (the paper uses 5); at least one.
        training_args: keyword arguments for ``transformers.TrainingArguments`` (the seed,
            the output dir and, unless given, ``save_strategy="no"``, ``report_to=[]`` and
            ``disable_tqdm=True`` are set here).
        split_seed: seed of the fold split.
        output_dir: where the fold runs write (default: a temporary directory).
        trainer_cls: the ``Trainer`` class (default ``transformers.Trainer``).
        data_collator: passed to the trainer (default: HF's).
        make_optimizer: model -> its optimizer (e.g. a larger learning rate for the new
            classifier); default: the trainer's own (AdamW at ``learning_rate``).
        progress: a tqdm bar over the k * len(seeds) runs.
        cache_dir: keep each run's predictions there, written atomically as the run ends
            (``seed<s>-fold<i>.json``); a later call with the same instances' labels, fold
            split, k and training arguments reuses them, so an interrupted labelling goes
            on at the first run it had not finished. The caller keeps ``make_model`` the
            same; entries that do not match are trained again and overwritten.
    """
    from tqdm import tqdm
    from transformers import Trainer, TrainingArguments, set_seed

    n = len(dataset)
    seeds = tuple(int(s) for s in seeds)
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"kfold_difficulty_labels: k must be an int >= 2, got {k!r}")
    if n < k:
        raise ValueError(f"kfold_difficulty_labels: {n} instances cannot make {k} folds")
    if not seeds:
        raise ValueError("kfold_difficulty_labels: give at least one seed")
    trainer_cls = trainer_cls or Trainer
    targets = _row_labels(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    folds = torch.empty(n, dtype=torch.long)
    folds[perm] = torch.arange(n) % k
    correct = torch.zeros(len(seeds), n, dtype=torch.bool)
    seen = torch.zeros(len(seeds), n, dtype=torch.bool)
    base_args = dict(training_args or {})
    for key in ("output_dir", "seed"):
        if key in base_args:
            raise ValueError(f"kfold_difficulty_labels: training_args must not set {key!r}; it is set per run")
    base_args.setdefault("save_strategy", "no")
    base_args.setdefault("report_to", [])
    base_args.setdefault("disable_tqdm", True)
    fingerprint = _run_fingerprint(targets, folds, k, split_seed, base_args)
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="eekernels-kfold-")
        output_dir = tmp.name
    try:
        bar = tqdm(total=len(seeds) * k, desc="difficulty labels (seed x fold)", disable=not progress)
        for si, seed in enumerate(seeds):
            for fold in range(k):
                held = (folds == fold).nonzero().reshape(-1).tolist()
                kept = (folds != fold).nonzero().reshape(-1).tolist()
                entry = None if cache_dir is None else os.path.join(cache_dir, f"seed{seed}-fold{fold}.json")
                cached = _cached_run(entry, fingerprint, held)
                if cached is not None:
                    correct[si, held] = cached
                    seen[si, held] = True
                    bar.update(1)
                    continue
                set_seed(seed)  # the fresh model's initialisation follows the seed too
                model = make_model(seed)
                args = TrainingArguments(output_dir=os.path.join(output_dir, f"seed{seed}-fold{fold}"), seed=seed,
                                         **base_args)
                optimizer = make_optimizer(model) if make_optimizer is not None else None
                trainer = trainer_cls(model=model, args=args, train_dataset=torch.utils.data.Subset(dataset, kept),
                                      data_collator=data_collator, optimizers=(optimizer, None))
                trainer.train()
                pred = trainer.predict(torch.utils.data.Subset(dataset, held)).predictions
                if isinstance(pred, (tuple, list)):
                    pred = pred[0]
                pred = torch.as_tensor(pred)
                if pred.dim() != 2 or pred.shape[0] != len(held):
                    raise ValueError(f"kfold_difficulty_labels: the model's logits on fold {fold} have shape "
                                     f"{tuple(pred.shape)}, expected [{len(held)}, C]")
                idx = torch.tensor(held, dtype=torch.long)
                correct[si, idx] = pred.argmax(-1) == targets[idx]
                seen[si, idx] = True
                if entry is not None:
                    write_json(entry, {"fingerprint": fingerprint, "held": held,
                                       "correct": correct[si, idx].tolist()})
                del trainer, model
                bar.update(1)
        bar.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    assert bool(seen.all()), "every instance is predicted once per seed"
    labels = (~correct.all(dim=0)).long()  # easy only if correct under all seeds
    return DifficultyLabels(labels=labels, correct=correct, folds=folds, seeds=seeds)
