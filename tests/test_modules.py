import pytest
import torch
import torch.nn.functional as F

from clipfast import ClipLoss


def _open_clip_loss(image_features, text_features, logit_scale):
    """open_clip's ClipLoss for world_size=1, written out."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(image_features.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("backend", ["auto", "reference", "chunked", "triton", "hybrid"])
def test_module_matches_open_clip_on_normalised_features(backend):
    torch.manual_seed(0)
    # open_clip's model normalises its outputs; gradients are compared at the
    # encoder outputs upstream of that normalisation, where the extra in-op
    # normalisation (an idempotent projection) must change nothing.
    img_raw = torch.randn(33, 16, requires_grad=True)
    txt_raw = torch.randn(33, 16, requires_grad=True)
    img, txt = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
    logit_scale = torch.tensor(2.6592, requires_grad=True)  # log(1/0.07)

    loss = ClipLoss(backend=backend, normalize=True)(img, txt, logit_scale.exp())
    want = _open_clip_loss(F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1),
                           logit_scale.exp())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (img_raw, txt_raw, logit_scale))
    exp = torch.autograd.grad(want, (img_raw, txt_raw, logit_scale))
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_module_output_dict_and_model_out_kwargs():
    torch.manual_seed(1)
    model_out = {
        "image_features": F.normalize(torch.randn(8, 4), dim=-1),
        "text_features": F.normalize(torch.randn(8, 4), dim=-1),
        "logit_scale": torch.tensor(10.0),
    }
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True,
                       rank=0, world_size=1, use_horovod=False)
    out = loss_fn(**model_out, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], loss_fn(**model_out))


def test_module_distributed_needs_an_initialised_process_group():
    loss_fn = ClipLoss(rank=0, world_size=2, gather_with_grad=True)
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss_fn(x, x, 1.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(local_loss=False, gather_with_grad=False), "scaled by 1/world_size"),
    (dict(local_loss=True, gather_with_grad=False), "wrong gradients"),
])
def test_module_warns_about_inexact_modes(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        ClipLoss(rank=1, world_size=2, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(gather_with_grad=True), dict(ring=True), dict()])
def test_module_exact_or_single_process_modes_do_not_warn(kwargs, recwarn):
    ClipLoss(rank=0, world_size=2 if kwargs else 1, **kwargs)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=2, world_size=2), ValueError, "rank < world_size"),
    (dict(rank=0, world_size=2, ring=True, local_loss=True), ValueError, "ring=True"),
])
def test_module_bad_distributed_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClipLoss(**kwargs)


def test_module_repr_names_backend():
    assert "chunked" in repr(ClipLoss(backend="chunked"))


def test_module_default_is_open_clip_semantics_without_normalisation():
    torch.manual_seed(2)
    img, txt = 3 * torch.randn(8, 4), 3 * torch.randn(8, 4)
    loss_fn = ClipLoss()
    assert not loss_fn.normalize
    torch.testing.assert_close(loss_fn(img, txt, 100.0), _open_clip_loss(img, txt, 100.0),
                               rtol=1e-5, atol=1e-5)
