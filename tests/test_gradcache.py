import pytest
import torch

from clipfast import ClipLoss, digits
from clipfast.gradcache import cached_contrastive_backward
from clipfast.models import CaptionTokenizer, build_clip


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer.train(digits.caption_corpus())


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _batch(tokenizer, n=23):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 8, 8, generator=g)
    tokens = tokenizer(digits.captions(torch.randint(10, (n,), generator=g), digits.TRAIN_TEMPLATES, g))
    return images, tokens


@pytest.mark.parametrize("image_encoder", ["vit", "resnet"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_encoders_give_the_unchunked_gradients(tokenizer, image_encoder, chunk):
    torch.manual_seed(0)
    model = build_clip(image_encoder, tokenizer, embed_dim=16, width=32)
    images, tokens = _batch(tokenizer)
    loss_fn = ClipLoss(backend="chunked")

    want_loss = loss_fn(**model(images, tokens))
    want_loss.backward()
    want = _grads(model)
    model.zero_grad()

    got_loss = cached_contrastive_backward(model.encode_image, model.encode_text, images, tokens,
                                           loss_fn, model.logit_scale.exp(), chunk)
    got = _grads(model)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(got) == set(want) and "logit_scale" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_masks_replay_in_the_second_pass(tokenizer):
    # With dropout the chunked step cannot equal the unchunked one (the masks
    # are drawn per chunk), but the pass that backpropagates must reproduce
    # exactly the features the loss saw.
    torch.manual_seed(0)
    model = build_clip("vit", tokenizer, embed_dim=16, width=32, dropout=0.3)
    model.train()
    images, tokens = _batch(tokenizer)
    seen = []

    def encode_image(chunk):
        out = model.encode_image(chunk)
        seen.append(out.detach().clone())
        return out

    cached_contrastive_backward(encode_image, model.encode_text, images, tokens, ClipLoss(),
                                model.logit_scale.exp(), 8)
    first, second = seen[:3], seen[3:]
    assert len(second) == 3
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Different chunks really drew different masks: dropout was active.
    assert not torch.equal(model.encode_image(images[:8]), model.encode_image(images[:8]))


def test_gradcache_validates_arguments(tokenizer):
    model = build_clip("resnet", tokenizer, embed_dim=8, width=16)
    images, tokens = torch.rand(4, 1, 8, 8), tokenizer(["a sketch of a one."] * 3)
    with pytest.raises(ValueError, match="rows"):
        cached_contrastive_backward(model.encode_image, model.encode_text, images, tokens,
                                    ClipLoss(), model.logit_scale.exp(), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        cached_contrastive_backward(model.encode_image, model.encode_text, images, images,
                                    ClipLoss(), model.logit_scale.exp(), 0)
