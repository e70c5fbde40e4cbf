"""Tiny models and batches the tests share: random-init HF classifiers with a few layers,
ragged batches, a learnable toy task, and a threshold between observed scores."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.models import EarlyExitModel  # noqa: E402

from .helpers import threshold_between  # noqa: E402

ARCHS = ("bert", "roberta", "albert")
N_LAYERS, N_LABELS = 4, 3


def tiny_classifier(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=48,
                  vocab_size=120, max_position_embeddings=64, num_labels=N_LABELS, initializer_range=0.3,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "bert":
        cfg = transformers.BertConfig(**common)
        m = transformers.BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(**common, pad_token_id=1)
        m = transformers.RobertaForSequenceClassification(cfg)
    else:
        cfg = transformers.AlbertConfig(**common, embedding_size=16, num_hidden_groups=1, inner_group_num=1)
        m = transformers.AlbertForSequenceClassification(cfg)
    return m.eval()


def ragged_batch(b: int, s: int, seed: int = 1, vocab: int = 120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    ids = ids * mask + 1 * (1 - mask)  # pad id 1 (RoBERTa's; harmless for the others)
    return ids, mask, lengths


def mid_threshold(model: EarlyExitModel, ids, mask, criterion: str) -> float:
    """A threshold inside the internal exits' score range, so exits spread over layers, and
    strictly between two distinct scores (never on a sample's own score)."""
    with torch.no_grad():
        z = model(ids, mask).exit_logits[:-1].float()
    p = z.softmax(-1)
    if criterion == "entropy":
        score = -(p * p.log()).sum(-1)
    else:
        score = p.max(-1).values
    return threshold_between(score)



class ParityTask(torch.utils.data.Dataset):
    """Label = whether token 7 occurs among the first three tokens after [CLS] (learnable by layer 1)."""

    def __init__(self, n: int, seed: int, s: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, 100, (n, s), generator=g)
        self.ids[:, 0] = 2
        flip = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(1, 4, (n,), generator=g)
        self.ids[flip, pos[flip]] = 7
        self.labels = flip.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}
