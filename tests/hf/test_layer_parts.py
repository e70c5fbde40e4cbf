"""LayerParts (eekernels.hf.layer_parts) against the HF layers they split."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.hf.adapters import adapter_for  # noqa: E402
from eekernels.hf.layer_parts import layer_parts  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
             max_position_embeddings=64)


def _classifier(kind, attn="sdpa"):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(**SMALL, num_labels=3)
    elif kind == "roberta":
        cfg = transformers.RobertaConfig(**SMALL, num_labels=3, pad_token_id=1)
    else:
        cfg = transformers.AlbertConfig(**SMALL, embedding_size=24, num_hidden_groups=1, num_labels=3)
    cfg._attn_implementation = attn
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def _bart_encoder():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=97, d_model=48, encoder_layers=2, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=80,
                                  decoder_ffn_dim=80, max_position_embeddings=64)
    return transformers.BartModel(cfg).eval().encoder


def _inputs(b=3, s=11, h=48):
    torch.manual_seed(1)
    x = torch.randn(b, s, h)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, 7:] = False
    valid[2, 4:] = False
    return x, valid


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", ["bert", "roberta", "albert"])
def test_whole_layer_equals_hf_layer(kind):
    model = _classifier(kind)
    ad = adapter_for(model)
    x, valid = _inputs()
    mask = ad.attention_mask(valid.long(), x)
    for i in range(model.config.num_hidden_layers):
        with torch.no_grad():
            ref = ad.layer(i)(x, mask)
            got = layer_parts(model, i)(x, valid)
        # padded query rows differ in what HF computes for them: compare real tokens only
        assert _rel(got[valid], ref[valid]) <= 1e-5


def test_bart_encoder_layer_equals_hf_layer():
    enc = _bart_encoder()
    x, valid = _inputs()
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=enc.config, inputs_embeds=x, attention_mask=valid.long())
    for i, layer in enumerate(enc.layers):
        with torch.no_grad():
            ref = layer(x, mask)
            got = layer_parts(enc, i)(x, valid)
        assert _rel(got[valid], ref[valid]) <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_queries_on_a_token_subset_equal_the_full_layer_rows(kind):
    model = _classifier(kind)
    parts = layer_parts(model, 1)
    x, valid = _inputs()
    sel = torch.tensor([[0, 2, 5], [0, 1, 6], [0, 3, 3]])  # token positions per sample
    xq = torch.gather(x, 1, sel[..., None].expand(-1, -1, x.shape[-1]))
    with torch.no_grad():
        full = parts(x, valid)
        k, v = parts.keys_values(x)
        sub = parts.output(parts.attention(parts.queries(xq), k, v, valid), xq)
    ref = torch.gather(full, 1, sel[..., None].expand(-1, -1, x.shape[-1]))
    assert _rel(sub, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "roberta", "albert"])
def test_class_attention_is_the_head_mean_of_eager_cls_probabilities(kind):
    model = _classifier(kind, attn="eager")
    ad = adapter_for(model)
    x, valid = _inputs()
    mask = ad.attention_mask(valid.long(), x)
    parts = layer_parts(model, 0)
    with torch.no_grad():
        _, probs = parts.layer.attention(x, mask)
        k, _ = parts.keys_values(x)
        got = parts.class_attention(parts.queries(x[:, :1]), k, valid)
    ref = probs[:, :, 0].mean(dim=1)
    assert got.dtype == torch.float32 and got.shape == valid.shape
    assert torch.allclose(got, ref, atol=1e-6)
    assert (got[~valid] == 0).all()
    assert torch.allclose(got.sum(dim=1), torch.ones(3))


def test_unsupported_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported"):
        layer_parts(torch.nn.Linear(3, 3), 0)
    with pytest.raises(ValueError, match="key_valid"):
        parts = layer_parts(_classifier("bert"), 0)
        x, valid = _inputs()
        parts(x, valid.long())
