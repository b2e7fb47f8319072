"""An open_clip-style training step with clipfast's ClipLoss swapped in: a
small dual encoder whose forward returns open_clip's output dict, the loss
called as ``loss_fn(**model_out, output_dict=True)`` inside an autocast
region, backward outside it, an AdamW step. Parameter gradients must match
the plain-PyTorch loss under the same autocast within the accuracy rule
(error against an fp64 run at most 2x the plain loss's, plus a floor)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipfast
from clipfast.backends import cpu as cpu_backend, cuda as cuda_backend


class DualEncoder(nn.Module):
    """open_clip's CLIP in miniature: two towers, normalised features, a
    learnable log-temperature, ``forward`` returning the output dict."""

    def __init__(self, image_dim=20, vocab=50, width=16, embed=12, fp32_features=False):
        super().__init__()
        # On CUDA, autocast runs F.normalize's norm in fp32 and the features
        # come out fp32; on the CPU they stay bf16. fp32_features gives the
        # CUDA situation on the CPU.
        self.fp32_features = fp32_features
        self.visual = nn.Sequential(nn.Linear(image_dim, width), nn.GELU(), nn.Linear(width, embed))
        self.token_embedding = nn.Embedding(vocab, width)
        self.text_projection = nn.Linear(width, embed)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1/0.07)

    def forward(self, images, tokens):
        image_features = self.visual(images)
        text_features = self.text_projection(self.token_embedding(tokens).mean(1))
        if self.fp32_features:
            wide = torch.promote_types(image_features.dtype, torch.float32)
            image_features, text_features = image_features.to(wide), text_features.to(wide)
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        return {"image_features": image_features, "text_features": text_features,
                "logit_scale": self.logit_scale.exp()}


def plain_clip_loss(image_features, text_features, logit_scale, output_dict=False):
    """open_clip's ClipLoss arithmetic, single process, restated in plain PyTorch."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(image_features.shape[0])
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return {"contrastive_loss": loss} if output_dict else loss


def _step(model, loss_fn, batch, autocast, dtype=torch.float32):
    model = copy.deepcopy(model).to(dtype)
    images, tokens = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        model_out = model(images.to(dtype), tokens)
        losses = loss_fn(**model_out, output_dict=True)
        total = sum(losses.values())
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return total.detach(), grads


def _batch(n=48, image_dim=20, vocab=50, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, image_dim, generator=g), torch.randint(0, vocab, (n, length), generator=g)


# Triton's interpreter has no correct bf16 dot: fp16 autocast for it. The cpu
# backend takes fp32/fp64 features only: no autocast (see the test below).
CASES = [("reference", torch.bfloat16), ("chunked", torch.bfloat16), ("auto", torch.bfloat16),
         ("cuda", torch.bfloat16), ("triton", torch.float16), ("chunked", torch.float16),
         ("cpu", None), ("chunked", None), ("triton", None), ("hybrid", torch.bfloat16),
         ("hybrid", None)]


@pytest.mark.parametrize("backend,autocast", CASES)
@pytest.mark.parametrize("fp32_features", [False, True])
def test_open_clip_step_matches_plain_loss(backend, autocast, fp32_features, monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    if backend == "cpu" and not cpu_backend.available():
        pytest.fail("the cpu backend is not built")
    if backend == "cuda" and not cuda_backend.emulation_available():
        pytest.fail("the CUDA emulation is not built")
    torch.manual_seed(0)
    model = DualEncoder(fp32_features=fp32_features)
    batch = _batch()
    # allow_tf32=False: the fp32 rule (the cuda backend would otherwise run
    # TF32 on fp32 features).
    loss_fn = clipfast.ClipLoss(backend=backend, allow_tf32=False)
    got_loss, got = _step(model, loss_fn, batch, autocast)
    same_loss, same = _step(model, plain_clip_loss, batch, autocast)
    truth_loss, truth = _step(model, plain_clip_loss, batch, None, torch.float64)
    assert torch.isfinite(got_loss)
    eps = torch.finfo(autocast or torch.float32).eps
    loss_err = abs(got_loss.double() - truth_loss).item()
    assert loss_err <= 2 * abs(same_loss.double() - truth_loss).item() + 4 * eps, loss_err
    for name, t in truth.items():
        err = (got[name].double() - t).abs().max().item()
        same_err = (same[name].double() - t).abs().max().item()
        floor = 4 * eps * max(t.abs().max().item(), 1e-3)
        assert err <= 2 * same_err + floor, (
            f"{backend} {name}: error {err:.3e} vs plain loss's {same_err:.3e} (+ floor {floor:.1e})")


def test_cpu_backend_under_autocast_says_what_to_use():
    # bf16 features from an autocast model are not the cpu backend's dtypes:
    # a clear TypeError pointing to chunked, not a silent upcast or garbage.
    model = DualEncoder()
    images, tokens = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, tokens)
        with pytest.raises(TypeError, match="chunked"):
            clipfast.ClipLoss(backend="cpu")(**out)
