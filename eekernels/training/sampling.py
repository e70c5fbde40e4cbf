"""How the training batches are drawn: HF ``Trainer``'s sampler, chosen through ``TrainingArguments``.

Length-grouped batches (HF's ``LengthGroupedSampler``: random mega-batches of 50 batches,
sorted by length inside) leave little padding under dynamic padding. On the grid's training
sets a random batch of 32 is padded to 3.0x its real tokens on SST-2's 20,000-row subset,
1.5x on MRPC and 1.9x (batch 16) on RTE; grouped, 1.02-1.05x (``benchmarks/train_padding.py``).
"""

from typing import Any, Dict

__all__ = ["sampling_args", "is_length_grouped"]


def sampling_args(group_by_length: bool) -> Dict[str, Any]:
    """``TrainingArguments`` keywords choosing length-grouped or random batches, in the
    spelling of the installed ``transformers`` (``train_sampling_strategy`` in newer releases, ``group_by_length`` before)."""
    import dataclasses

    import transformers

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": bool(group_by_length)}


def is_length_grouped(targs) -> bool:
    """Whether ``targs`` (``TrainingArguments``) asks for length-grouped batches."""
    return getattr(targs, "train_sampling_strategy", None) == "group_by_length" or \
        bool(getattr(targs, "group_by_length", False))
