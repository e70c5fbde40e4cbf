"""The engine's invariants as properties over random tiny models, batches and thresholds
(hypothesis), for every engine variant and executor:

- batched equals each row alone (exit layer exactly, logits to float tolerance);
- a permuted batch gives the permuted result;
- exits disabled give the full model's forward (the HF model's, for most methods).

Thresholds come from the model's own scores, between two distinct ones (never on a row's
own score). CI runs a bounded number of examples; ``EEKERNELS_FUZZ_EXAMPLES`` raises it
(``tests/fuzz_long.py`` is the long fuzz of the ops).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eekernels.methods.cascadebert import CascadeModel  # noqa: E402
from eekernels.methods.hashee import HashEEModel  # noqa: E402
from eekernels.methods.mpee import convert_mpee  # noqa: E402
from eekernels.methods.past_future import convert as convert_pf  # noqa: E402
from eekernels.models import convert  # noqa: E402
from eekernels.nn.token_hash import build_hash_table  # noqa: E402

from ..helpers import rel_err, threshold_between  # noqa: E402

EXAMPLES = int(os.environ.get("EEKERNELS_FUZZ_EXAMPLES", "6"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="EEKERNELS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))

#: (model kind, engine, executor) under test
VARIANTS = [("early-exit", "rows", "hf"), ("early-exit", "rows", "parts"), ("early-exit", "fixed", "parts"),
            ("early-exit-mean", "rows", "hf"), ("past-future", "rows", None), ("mpee", "rows", None),
            ("cascade", "rows", None), ("hashee", "rows", "sorted"), ("hashee", "rows", "pack")]
if importlib.util.find_spec("onnxruntime") is not None:
    # fp32 only: dynamic INT8 quantizes activations per tensor, so a row's result depends
    # on its batch-mates and neither property holds exactly (tests/engine/test_ort_executor.py)
    VARIANTS.append(("early-exit", "rows", "ort"))


@st.composite
def tiny_setup(draw):
    arch = draw(st.sampled_from(("bert", "roberta", "albert")))
    heads = draw(st.sampled_from((1, 2, 4)))
    hidden = heads * draw(st.integers(3, 8))
    layers = draw(st.integers(2, 4))
    labels = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    b, s = draw(st.integers(1, 6)), draw(st.integers(1, 10))
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                  vocab_size=60, max_position_embeddings=32, num_labels=labels, initializer_range=0.5,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    if arch == "bert":
        hf = transformers.BertForSequenceClassification(transformers.BertConfig(**common))
    elif arch == "roberta":
        hf = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**common, pad_token_id=1))
    else:
        hf = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
            **common, embedding_size=8, num_hidden_groups=1, inner_group_num=1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, s), generator=g)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = ids * mask + (1 - mask)
    quantile = draw(st.floats(0.05, 0.95))
    perm = torch.tensor(draw(st.permutations(range(b))))
    return hf.eval(), ids, mask, lengths, quantile, perm


def build(kind, hf):
    n = hf.config.num_hidden_layers
    if kind == "early-exit":
        return convert(hf)
    if kind == "early-exit-mean":
        return convert(hf, exit_pooling="mean")
    if kind == "past-future":
        return convert_pf(hf, strategy="max")
    if kind == "mpee":
        return convert_mpee(hf, prune_layers=(1,), keep_ratio=0.6)
    if kind == "cascade":
        return CascadeModel.from_first_layers(hf, [1])
    table = build_hash_table("random", n, vocab_size=hf.config.vocab_size, seed=3, progress=False)
    return HashEEModel(hf, table)


def rule_for(model, ids, mask, quantile):
    """A threshold between two of the model's own first-exit scores (None without a rule)."""
    if not model.criteria:
        return {}
    with torch.no_grad():
        z = model(ids, mask).exit_logits[0].float()
    score = z.softmax(-1).max(-1).values if model.criteria[0] == "max_prob" else None
    if score is None:
        p = z.softmax(-1)
        score = -(p * p.clamp_min(1e-30).log()).sum(-1)
    try:
        thr = threshold_between(score, quantile=quantile, min_gap=1e-3)
    except AssertionError:  # every row scores alike (e.g. B = 1): the rule never fires early
        thr = 0.0 if model.criteria[0] == "entropy" else 1.0
    return {"threshold": thr}


@pytest.mark.parametrize("kind,engine,executor", VARIANTS, ids=["-".join(map(str, v)) for v in VARIANTS])
@FUZZ
@given(setup=tiny_setup())
def test_batched_equals_alone_and_permutation(kind, engine, executor, setup):
    hf, ids, mask, lengths, quantile, perm = setup
    model = build(kind, hf).eval()
    kw = dict(engine=engine, executor=executor, backend="torch", **rule_for(model, ids, mask, quantile))
    out = model.early_exit(ids, mask, **kw)
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = model.early_exit(ids[i:i + 1, :n], None, **kw)
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"row {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-4, atol=1e-5), f"row {i}"
    shuffled = model.early_exit(ids[perm], mask[perm], **kw)
    assert torch.equal(shuffled.exit_layer, out.exit_layer[perm])
    assert torch.allclose(shuffled.logits, out.logits[perm], rtol=1e-4, atol=1e-5)


DISABLED = [v for v in VARIANTS if v[0] not in ("cascade", "hashee")]  # these change the computation itself


@pytest.mark.parametrize("kind,engine,executor", DISABLED, ids=["-".join(map(str, v)) for v in DISABLED])
@FUZZ
@given(setup=tiny_setup())
def test_exits_disabled_equal_the_full_model(kind, engine, executor, setup):
    """The full model is the HF forward, or the method's own (Past-Future's last exit pools
    every layer, MPEE's reads the classifier memory)."""
    hf, ids, mask, _, _, _ = setup
    model = build(kind, hf).eval()
    if kind == "mpee":
        model = convert_mpee(hf, prune_layers=(1,), keep_ratio=1.0)  # no token is pruned either
    with torch.no_grad():
        ref = model.full_model()(input_ids=ids, attention_mask=mask).logits
        if kind not in ("past-future", "mpee"):  # their last exits are their own, not the HF head
            assert rel_err(hf(input_ids=ids, attention_mask=mask).logits, ref) <= 1e-6
    out = model.early_exit(ids, mask, engine=engine, executor=executor, threshold=0.0)
    assert (out.exit_layer == model.num_layers).all()
    assert rel_err(out.logits, ref) <= 1e-4
