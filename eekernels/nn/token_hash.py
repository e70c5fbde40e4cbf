"""HashEE hash tables: a fixed exit layer for every token id (hashee.txt sections 3.3, A.3).

A :class:`TokenHashTable` maps each token id of a vocabulary to the 1-based layer after
which that token stops computing ("exits"): a token with exit layer ``l`` runs layers
1..l and keeps its layer-l state afterwards, still serving as key and value (A.4 eq. 5).

Kinds (hashee.txt section 3.3), all built by :func:`build_hash_table`:

- ``"random"`` (Rand-cons): each token type gets a random bucket, the same table in
  training and inference;
- ``"random_inconsistent"`` (Rand-incons, the ablation): a second, independently drawn
  table is used at inference (:attr:`TokenHashTable.inference_exit_layer`);
- ``"frequency"``: every non-special type of the vocabulary sorted by corpus frequency
  (most frequent first) and split into B buckets holding equal numbers of types (sizes
  differ by at most one): "the tokens are sorted by frequency and then divided equally
  into B buckets" (3.3); frequent tokens exit first;
- ``"mi"``: every non-special type sorted by the mutual information between "the type
  occurs in a text" and the text's label (higher MI first), split into B equal buckets;

Types the corpus never shows (a task's training set covers a fraction of the vocabulary,
yet test text brings others) have frequency 0 and MI 0, the lowest scores, so the sort
puts them last, in the rarest buckets, ordered among themselves by vocabulary id (a
WordPiece / BPE vocabulary lists whole, common pieces before rare ones, so the id is the
frequency order of the tokenizer's own corpus). The paper sorts "the tokens" without saying
which; sorting the whole vocabulary gives every id a defined layer, and an unseen token
exits no earlier than any token seen in training;
- ``"clustered"``: k-means (k = B) over the model's input (word) embeddings of the
  non-special types, clusters ordered by the mean norm of their members, small norm first.

Buckets map to layers as in A.3: bucket b of B exits at layer ``1 + floor(L * b / B)``
(L = 12, B = 3 -> layers 1, 5, 9). Special tokens ([CLS], [SEP], padding, ...) always get
the last layer L: [CLS] carries the prediction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import torch

__all__ = ["HASH_KINDS", "TokenHashTable", "bucket_to_layer", "build_hash_table", "count_token_types",
           "mutual_information", "kmeans"]

HASH_KINDS = ("random", "random_inconsistent", "frequency", "mi", "clustered")
_FORMAT = "eekernels-hashee-table/1"


def bucket_to_layer(num_layers: int, num_buckets: int) -> torch.Tensor:
    """int64 [B]: the 1-based exit layer of each bucket, ``1 + floor(L*b/B)`` (hashee.txt A.3)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 1 <= num_buckets <= num_layers:
        raise ValueError(f"num_buckets must be in [1, num_layers={num_layers}], got {num_buckets}")
    b = torch.arange(num_buckets, dtype=torch.int64)
    return 1 + (num_layers * b) // num_buckets


@dataclass
class TokenHashTable:
    """Exit layer per token id, saved and loaded with the model.

    Attributes:
        exit_layer: int64 [V], 1-based exit layer of each token id (training table).
        num_layers: L, the encoder depth the table was built for.
        num_buckets: B.
        kind: one of :data:`HASH_KINDS`.
        special_ids: ids forced to the last layer.
        inference_exit_layer: int64 [V] used at inference when it differs from the training
            table (Rand-incons only; None otherwise).
        meta: free-form build information (seed, corpus size, ...), saved with the table.
    """

    exit_layer: torch.Tensor
    num_layers: int
    num_buckets: int
    kind: str
    special_ids: List[int] = field(default_factory=list)
    inference_exit_layer: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in HASH_KINDS:
            raise ValueError(f"unknown hash kind {self.kind!r}; choose from {HASH_KINDS}")
        for name in ("exit_layer", "inference_exit_layer"):
            t = getattr(self, name)
            if t is None:
                continue
            t = torch.as_tensor(t, dtype=torch.int64).cpu()
            if t.dim() != 1 or t.numel() == 0:
                raise ValueError(f"TokenHashTable.{name} must be a non-empty 1-D table [vocab], got {tuple(t.shape)}")
            if int(t.min()) < 1 or int(t.max()) > self.num_layers:
                raise ValueError(f"TokenHashTable.{name} holds layers outside [1, {self.num_layers}]")
            setattr(self, name, t)
        if self.inference_exit_layer is not None and self.inference_exit_layer.shape != self.exit_layer.shape:
            raise ValueError("TokenHashTable: inference_exit_layer must have the training table's size")
        self.special_ids = sorted(int(i) for i in self.special_ids)

    @property
    def vocab_size(self) -> int:
        return self.exit_layer.numel()

    def table(self, inference: bool = False) -> torch.Tensor:
        """The table used in training (``inference=False``) or at inference."""
        if inference and self.inference_exit_layer is not None:
            return self.inference_exit_layer
        return self.exit_layer

    def lookup(self, input_ids: torch.Tensor, inference: bool = False) -> torch.Tensor:
        """Exit layer (int64, same shape as ``input_ids``) of each token; ids out of the
        table's range are an error."""
        t = self.table(inference).to(input_ids.device)
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= t.numel()):
            raise ValueError(f"token ids must be in [0, {t.numel()}) for this hash table, got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        return t[input_ids]

    def histogram(self, inference: bool = False) -> dict:
        """{layer: number of token types exiting there}."""
        layers, counts = torch.unique(self.table(inference), return_counts=True)
        return {int(l): int(c) for l, c in zip(layers, counts)}

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "kind": self.kind, "num_layers": self.num_layers,
                "num_buckets": self.num_buckets, "special_ids": self.special_ids, "meta": self.meta,
                "exit_layer": self.exit_layer.tolist(),
                "inference_exit_layer": None if self.inference_exit_layer is None
                else self.inference_exit_layer.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenHashTable":
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a HashEE table (format {d.get('format')!r}, expected {_FORMAT!r})")
        inf = d.get("inference_exit_layer")
        return cls(exit_layer=torch.tensor(d["exit_layer"], dtype=torch.int64), num_layers=int(d["num_layers"]),
                   num_buckets=int(d["num_buckets"]), kind=d["kind"], special_ids=list(d["special_ids"]),
                   inference_exit_layer=None if inf is None else torch.tensor(inf, dtype=torch.int64),
                   meta=dict(d.get("meta", {})))

    def save(self, path: str) -> None:
        """Write the table as JSON (``path`` is a file)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str) -> "TokenHashTable":
        """Read a table written by :meth:`save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HashEE table at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ---------------------------------------------------------------------- corpus statistics


def _tokenize(texts: Sequence, tokenizer, batch_size: int = 1000, progress: bool = True) -> List[List[int]]:
    """Token ids of each text (or text pair) without special tokens, with a progress bar."""
    from tqdm import tqdm

    out: List[List[int]] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="tokenize corpus", disable=not progress,
                      unit="batch"):
        chunk = list(texts[start:start + batch_size])
        if chunk and isinstance(chunk[0], (tuple, list)):
            a, b = zip(*chunk)
            enc = tokenizer(list(a), list(b), add_special_tokens=False)
        else:
            enc = tokenizer(chunk, add_special_tokens=False)
        out.extend(enc["input_ids"])
    return out


def count_token_types(token_ids: Iterable[Sequence[int]], vocab_size: int, labels: Optional[Sequence[int]] = None,
                      num_labels: Optional[int] = None):
    """Corpus counts: (token frequency int64 [V], document frequency per label int64 [V, C] or None).

    ``token_ids``: one id sequence (list or 1-D tensor) per text; a 2-D tensor works too (rows).
    The per-label count is the number of texts of each label that contain the type (MI hash)."""
    freq = torch.zeros(vocab_size, dtype=torch.int64)
    per_label = None
    if labels is not None:
        per_label = torch.zeros(vocab_size, num_labels, dtype=torch.int64)
    for k, ids in enumerate(token_ids):
        t = ids.reshape(-1).long().cpu() if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.int64)
        if t.numel() == 0:
            continue
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise ValueError(f"text {k} holds token ids outside [0, {vocab_size})")
        freq += torch.bincount(t, minlength=vocab_size)
        if per_label is not None:
            per_label[torch.unique(t), int(labels[k])] += 1
    return freq, per_label


def mutual_information(doc_counts: torch.Tensor, label_counts: torch.Tensor) -> torch.Tensor:
    """MI (nats) between the binary event "type t occurs in a text" and the label, per type.

    Args:
        doc_counts: [V, C], texts of label c that contain type t.
        label_counts: [C], texts of label c.
    """
    n = label_counts.sum().double()
    if n <= 0:
        raise ValueError("mutual_information: empty labelled corpus")
    n11 = doc_counts.double()  # t present, label c
    n01 = label_counts.double()[None, :] - n11  # t absent, label c
    p_y = label_counts.double() / n  # [C]
    mi = torch.zeros(doc_counts.shape[0], dtype=torch.float64)
    for nxy in (n11, n01):
        p_xy = nxy / n
        p_x = p_xy.sum(dim=1, keepdim=True)
        ratio = p_xy / (p_x * p_y[None, :]).clamp_min(1e-300)
        mi += torch.where(p_xy > 0, p_xy * torch.log(ratio.clamp_min(1e-300)), torch.zeros_like(p_xy)).sum(dim=1)
    return mi.clamp_min(0.0)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the cluster id (int64 [N]) of each row."""
    from tqdm import tqdm

    x = x.detach().float().cpu()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= number of points ({n}), got k={k}")
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):  # k-means++: next center drawn with probability ~ squared distance
        d2 = torch.cdist(x, centers).pow(2).min(dim=1).values
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        centers = torch.cat([centers, x[torch.multinomial(probs, 1, generator=g)]])
    assign = torch.zeros(n, dtype=torch.int64)
    for it in tqdm(range(iters), desc="k-means", disable=not progress):
        new = torch.cdist(x, centers).argmin(dim=1)
        if it > 0 and torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = assign == c
            if members.any():
                centers[c] = x[members].mean(dim=0)
    return assign


def _equal_buckets(order: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of each element of ``order`` (ranked list of type ids): B equal-size buckets
    (sizes differ by at most one), the first-ranked types in bucket 0."""
    rank = torch.arange(order.numel(), dtype=torch.int64)
    return (rank * num_buckets) // max(order.numel(), 1)


# ---------------------------------------------------------------------- building


def _special_ids(tokenizer, extra: Optional[Iterable[int]]) -> List[int]:
    ids = set(int(i) for i in (extra or []))
    if tokenizer is not None:
        ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(tokenizer, name, None)
            if v is not None:
                ids.add(int(v))
    return sorted(ids)


def build_hash_table(kind: str, num_layers: int, num_buckets: Optional[int] = None, *,
                     texts: Optional[Sequence] = None, tokenizer=None,
                     token_ids: Optional[Sequence[Sequence[int]]] = None,
                     labels: Optional[Sequence[int]] = None, embeddings: Optional[torch.Tensor] = None,
                     vocab_size: Optional[int] = None, special_ids: Optional[Iterable[int]] = None,
                     seed: int = 0, progress: bool = True) -> TokenHashTable:
    """Build a HashEE table (hashee.txt section 3.3; bucket -> layer as in A.3).

    Args:
        kind: one of :data:`HASH_KINDS`.
        num_layers: L, the model's number of encoder layers.
        num_buckets: B (default L); bucket b exits at layer ``1 + floor(L*b/B)``.
        texts: the corpus, strings (or (a, b) pairs), tokenized with ``tokenizer`` without
            special tokens; or pass ``token_ids`` (lists of ids) directly. Needed by
            "frequency" and "mi".
        tokenizer: the model's tokenizer (also gives the special ids and the vocab size).
        labels: int label of each text ("mi").
        embeddings: [V, E] the model's input word embeddings ("clustered"), e.g.
            ``model.get_input_embeddings().weight``.
        vocab_size: table size (default: ``len(tokenizer)``, else the embeddings' rows).
            Use the model's ``config.vocab_size`` when it exceeds the tokenizer's.
        special_ids: extra ids forced to the last layer (added to the tokenizer's).
        seed: for the random kinds and k-means.
    """
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown hash kind {kind!r}; choose from {HASH_KINDS}")
    num_buckets = num_layers if num_buckets is None else int(num_buckets)
    layer_of_bucket = bucket_to_layer(num_layers, num_buckets)
    if vocab_size is None:
        if tokenizer is not None:
            vocab_size = len(tokenizer)
        elif embeddings is not None:
            vocab_size = embeddings.shape[0]
        else:
            raise ValueError("build_hash_table: give vocab_size, a tokenizer or the embeddings")
    specials = _special_ids(tokenizer, special_ids)
    if any(not 0 <= i < vocab_size for i in specials):
        raise ValueError(f"special ids {specials} fall outside the vocabulary [0, {vocab_size})")
    is_special = torch.zeros(vocab_size, dtype=torch.bool)
    is_special[specials] = True
    meta = {"seed": seed}

    def corpus_ids():
        if token_ids is not None:
            return token_ids
        if texts is None:
            raise ValueError(f"build_hash_table({kind!r}) needs a corpus: texts (with a tokenizer) or token_ids")
        if tokenizer is None:
            raise ValueError("build_hash_table: texts need the model's tokenizer")
        return _tokenize(texts, tokenizer, progress=progress)

    def random_table(s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(s)
        return layer_of_bucket[torch.randint(num_buckets, (vocab_size,), generator=g)]

    def ranked_to_table(score: torch.Tensor) -> torch.Tensor:
        # Every non-special type, highest score first (ties, e.g. the unseen types' 0, by
        # ascending id: a stable sort over ascending ids), fills B equal buckets.
        types = (~is_special).nonzero().reshape(-1)
        order = types[torch.sort(-score[types], stable=True).indices]
        t = torch.full((vocab_size,), num_layers, dtype=torch.int64)
        t[order] = layer_of_bucket[_equal_buckets(order, num_buckets)]
        return t

    inference = None
    if kind in ("random", "random_inconsistent"):
        table = random_table(seed)
        if kind == "random_inconsistent":
            inference = random_table(seed + 1_000_003)  # Rand-incons: a different table at inference
            inference[is_special] = num_layers
    elif kind == "frequency":
        ids = corpus_ids()
        freq, _ = count_token_types(ids, vocab_size)
        seen = ((freq > 0) & ~is_special).nonzero().reshape(-1)
        table = ranked_to_table(freq.double())  # most frequent first; unseen last, by id
        meta.update(corpus_tokens=int(freq.sum()), seen_types=int(seen.numel()))
    elif kind == "mi":
        if labels is None:
            raise ValueError("build_hash_table('mi') needs the corpus labels")
        ids = corpus_ids()
        if len(labels) != len(ids):
            raise ValueError(f"build_hash_table('mi'): {len(ids)} texts but {len(labels)} labels")
        lab = torch.as_tensor([int(y) for y in labels], dtype=torch.int64)
        if lab.numel() == 0 or int(lab.min()) < 0:
            raise ValueError("build_hash_table('mi'): labels must be non-negative class ids")
        num_labels = int(lab.max()) + 1
        freq, per_label = count_token_types(ids, vocab_size, lab.tolist(), num_labels)
        mi = mutual_information(per_label, torch.bincount(lab, minlength=num_labels))
        seen = ((freq > 0) & ~is_special).nonzero().reshape(-1)
        # higher MI exits first; unseen types (MI 0) after every seen one, by id
        table = ranked_to_table(torch.where(freq > 0, mi, torch.full_like(mi, -1.0)))
        meta.update(corpus_texts=len(ids), seen_types=int(seen.numel()))
    else:  # clustered
        if embeddings is None:
            raise ValueError("build_hash_table('clustered') needs the model's input embeddings [V, E]")
        emb = embeddings.detach().float().cpu()
        if emb.dim() != 2 or emb.shape[0] < vocab_size:
            raise ValueError(f"embeddings must be [V >= {vocab_size}, E], got {tuple(emb.shape)}")
        types = (~is_special).nonzero().reshape(-1)
        assign = kmeans(emb[types], num_buckets, seed=seed, progress=progress)
        norms = emb[types].norm(dim=1).double()
        mean_norm = torch.stack([norms[assign == c].mean() if (assign == c).any() else norms.new_tensor(math.inf)
                                 for c in range(num_buckets)])
        rank_of_cluster = torch.empty(num_buckets, dtype=torch.int64)
        rank_of_cluster[torch.argsort(mean_norm, stable=True)] = torch.arange(num_buckets)  # small norm first
        table = torch.full((vocab_size,), num_layers, dtype=torch.int64)
        table[types] = layer_of_bucket[rank_of_cluster[assign]]
        meta.update(cluster_mean_norms=[float(v) for v in mean_norm.sort().values])
    table[is_special] = num_layers  # [CLS], [SEP], padding, ...: never an early exit
    return TokenHashTable(exit_layer=table, num_layers=num_layers, num_buckets=num_buckets, kind=kind,
                          special_ids=specials, inference_exit_layer=inference, meta=meta)
