"""Training batches: rows cut to their own lengths, padded back per batch, and length-grouped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.data import Encoded, EncodedDataset, collate_trimmed  # noqa: E402
from eekernels.training.sampling import is_length_grouped, sampling_args  # noqa: E402

from ..tiny import tiny_classifier  # noqa: E402

PAD = 7


def ragged_encoded(n: int, width: int, seed: int = 0) -> Encoded:
    """``n`` rows right-padded to ``width`` with id ``PAD``; lengths 2..width, row 0 the longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    enc = Encoded()
    enc["input_ids"] = torch.where(mask.bool(), torch.randint(10, 90, (n, width), generator=g), PAD)
    enc["attention_mask"] = mask
    enc["token_type_ids"] = torch.randint(0, 2, (n, width), generator=g) * mask
    enc["labels"] = torch.randint(0, 2, (n,), generator=g)
    enc.pad_token_id = PAD
    return enc


def test_rows_come_cut_and_a_batch_is_the_encoded_rows_at_their_longest():
    enc = ragged_encoded(40, 23)
    ds = EncodedDataset(enc)
    assert [len(ds[i]["input_ids"]) for i in range(len(ds))] == enc["attention_mask"].sum(1).tolist()
    for idx in ([0, 5, 9], [3], list(range(1, 40, 3)), [12, 4]):
        batch = ds.collate([ds[i] for i in idx])
        width = int(enc["attention_mask"][idx].sum(1).max())
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(batch[k], enc[k][idx, :width]), k
        assert torch.equal(batch["labels"], enc["labels"][idx])
    # rows padded alike (not cut) give the same batch
    padded = [{k: v[i] for k, v in enc.items()} for i in (3, 8)]
    assert all(torch.equal(a, b) for a, b in zip(collate_trimmed(padded, PAD).values(),
                                                  ds.collate([ds[3], ds[8]]).values()))


def padded_slots(loader) -> tuple:
    """(padded token slots, rows in the order seen) over one pass of ``loader``."""
    slots, seen = 0, []
    for batch in loader:
        slots += batch["input_ids"].numel()
        seen.extend(batch["labels"].tolist())
    return slots, seen


@pytest.mark.parametrize("grouped", [True, False], ids=["length-grouped", "random"])
def test_length_grouped_batches_pad_little_and_keep_every_row(tmp_path, grouped):
    enc = ragged_encoded(1600, 60, seed=3)
    enc["labels"] = torch.arange(1600)  # each row's label is its index, to see which rows came
    ds = EncodedDataset(enc)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, report_to=[],
                                          use_cpu=True, remove_unused_columns=False, seed=0, **sampling_args(grouped))
    assert is_length_grouped(args) == grouped
    trainer = transformers.Trainer(model=tiny_classifier("bert", seed=0), args=args, train_dataset=ds,
                                   data_collator=ds.collate)
    slots, seen = padded_slots(trainer.get_train_dataloader())
    assert sorted(seen) == list(range(1600))
    ratio = slots / int(enc["attention_mask"].sum())
    # uniform lengths 2..60 in random batches of 16 pad to ~1.7x; grouped ~1.0x
    assert (ratio < 1.2) if grouped else (ratio > 1.4), ratio
