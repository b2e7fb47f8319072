import math

import pytest
import torch

from clipfast import ClipLoss, digits
from clipfast.models import (
    LOGIT_SCALE_INIT,
    CaptionTokenizer,
    TextTransformer,
    TinyResNet,
    TinyViT,
    build_clip,
)


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer.train(digits.caption_corpus())


@pytest.mark.parametrize("text", [
    "a photo of the digit seven.", "a sketch of a nine.", "Unseen words, punctuation & digits 123!",
    "  leading and trailing spaces  ", "ünïcödé ✓"])
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode_ids(text)) == text
    if len(tokenizer.encode_ids(text)) + 2 <= tokenizer.context_length:
        ids = tokenizer([text])[0].tolist()
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.decode(ids) == text


def test_tokenizer_learns_merges_and_pads(tokenizer):
    caption = "a drawing of the number eight."
    assert len(tokenizer.encode_ids(caption)) < len(caption.encode()) // 2  # BPE merged
    batch = tokenizer([caption, "a sketch of a one."])
    assert batch.shape == (2, tokenizer.context_length) and batch.dtype == torch.int64
    assert (batch[1] == tokenizer.pad_id).sum() > (batch[0] == tokenizer.pad_id).sum()


def test_tokenizer_rejects_overlong_text(tokenizer):
    with pytest.raises(ValueError, match="context_length"):
        tokenizer(["word " * 40])


@pytest.mark.parametrize("encoder,width", [(TinyViT(width=48), 48), (TinyResNet(widths=(16, 40)), 40)])
def test_image_encoder_shapes(encoder, width):
    out = encoder(torch.rand(5, 1, 8, 8))
    assert out.shape == (5, width) and torch.isfinite(out).all()


def test_text_encoder_reads_the_end_token(tokenizer):
    text = TextTransformer(tokenizer.vocab_size, tokenizer.context_length, tokenizer.pad_id,
                           tokenizer.eos_id, width=32)
    tokens = tokenizer(["a sketch of a one.", "the number four."])
    out = text(tokens)
    assert out.shape == (2, 32)
    # Causal attention: tokens after the end-of-text token cannot change it.
    longer = tokens.clone()
    longer[:, -1] = 5
    torch.testing.assert_close(text(longer), out)


@pytest.mark.parametrize("image_encoder", ["vit", "resnet"])
def test_clip_forward_and_logit_scale(tokenizer, image_encoder):
    model = build_clip(image_encoder, tokenizer, embed_dim=24, width=32)
    out = model(torch.rand(6, 1, 8, 8), tokenizer(["a sketch of a one."] * 6))
    assert out["image_features"].shape == (6, 24) and out["text_features"].shape == (6, 24)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(6))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    ClipLoss()(**out).backward()  # open_clip's calling convention
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_build_clip_rejects_unknown_encoder(tokenizer):
    with pytest.raises(ValueError, match="image_encoder"):
        build_clip("mlp", tokenizer)
