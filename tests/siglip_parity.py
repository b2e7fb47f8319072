"""Shared SigLIP parity check: a backend's loss and gradients against
``reference_siglip_loss`` in fp64, by tests/parity.py's rule (error against
fp64 at most twice the error of the plain-PyTorch reference computed in the
same dtype, plus a small floor)."""

from __future__ import annotations

from typing import Optional

import torch

import clipfast
from clipfast.backends.reference import reference_siglip_loss

from .parity import floor_for, make_features

NAMES = ("grad_image", "grad_text", "grad_scale", "grad_bias")


def loss_and_grads(fn, x, y, scale, bias, needs):
    """{loss, grad_*} of fn(x, y, scale, bias) for the leaves that need grad;
    checks that no input is modified in place and that every gradient has
    its input's dtype and shape."""
    before = [None if t is None else t.detach().clone() for t in (x, y, scale, bias)]
    leaves = [None if t is None else t.detach().clone().requires_grad_(need)
              for t, need in zip((x, y, scale, bias), needs)]
    loss = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wrt) if wrt else ())
    out = {"loss": loss.detach()}
    for name, t in zip(NAMES, leaves):
        if t is not None and t.requires_grad:
            g = out[name] = next(grads)
            assert g.dtype == t.dtype and g.shape == t.shape, (
                f"{name}: {g.dtype} {tuple(g.shape)} for an input {t.dtype} {tuple(t.shape)}")
    for name, t, old in zip(("image", "text", "scale", "bias"), leaves, before):
        if t is not None:
            torch.testing.assert_close(t.detach(), old, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name} features modified in place")
    return out


def scalars(scale, bias, device="cpu"):
    s = torch.tensor(scale, dtype=torch.float32, device=device)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float32, device=device)
    return s, b


def assert_siglip_parity(
    backend: str,
    n: int,
    d: int,
    *,
    x_dtype=torch.float32,
    y_dtype: Optional[torch.dtype] = None,
    scale: float = 10.0,
    bias: Optional[float] = -10.0,
    normalize: bool = True,
    positives: bool = True,
    needs=(True, True, True, True),
    device="cpu",
    seed=0,
    ref_dtype: Optional[torch.dtype] = None,
    correlated: bool = True,
    allow_tf32: bool = True,
):
    """``ref_dtype``: the plain reference in this dtype stands for "the same
    dtype" (float16 for TF32, as in tests/backends/test_cuda_emulated.py)."""
    y_dtype = y_dtype or x_dtype
    x32, y32 = make_features(n, d, torch.float32, device, seed, correlated=correlated)
    x, y = x32.to(x_dtype), y32.to(y_dtype)
    s, b = scalars(scale, bias, device)

    def fused(x_, y_, s_, b_):
        return clipfast.siglip_loss(x_, y_, s_, b_, normalize=normalize, backend=backend,
                                    allow_tf32=allow_tf32, positives=positives)

    def plain(x_, y_, s_, b_):
        return reference_siglip_loss(x_, y_, s_, b_, normalize, positives)

    got = loss_and_grads(fused, x, y, s, b, needs)
    truth = loss_and_grads(plain, x.double(), y.double(), s.double(),
                           None if b is None else b.double(), needs)
    x_ref, y_ref = (x, y) if ref_dtype is None else (x.to(ref_dtype), y.to(ref_dtype))
    same = loss_and_grads(plain, x_ref, y_ref, s, b, needs)

    assert set(got) == set(truth), f"gradients returned for {sorted(got)}, expected {sorted(truth)}"
    assert torch.isfinite(got["loss"]), f"non-finite loss {got['loss']}"
    want_loss_dtype = torch.promote_types(torch.promote_types(x_dtype, y_dtype), torch.float32)
    assert got["loss"].dtype == want_loss_dtype, got["loss"].dtype
    for key in truth:
        t = truth[key].double()
        err = (got[key].double() - t).abs().max().item()
        ref_err = (same[key].double() - t).abs().max().item()
        if key in ("loss", "grad_scale", "grad_bias"):
            magnitude = max(t.abs().max().item(), 1.0)
        else:
            feats = x if key == "grad_image" else y
            inv = 1 / feats.double().norm(dim=1).clamp_min(1e-12).min().item() if normalize else 1.0
            magnitude = max(t.abs().max().item(), scale / n * max(inv, 1.0))
        dtypes = {"grad_image": [x_dtype], "grad_text": [y_dtype]}.get(key, [x_dtype, y_dtype])
        dtypes += [] if ref_dtype is None else [ref_dtype]
        floor = max(floor_for(dt) for dt in dtypes) * magnitude
        if key in ("loss", "grad_scale"):
            # One ulp of the largest logit, as in tests/parity.py.
            floor += max(torch.finfo(dt).eps for dt in dtypes) * (scale + abs(bias or 0.0))
        allowed = 2 * ref_err + floor
        assert err <= allowed, (
            f"{backend} {key}: error {err:.3e} vs fp64 exceeds 2 x reference error "
            f"{ref_err:.3e} + floor {floor:.3e} (N={n}, d={d}, {x_dtype}/{y_dtype}, "
            f"scale={scale}, bias={bias}, normalize={normalize}, positives={positives})")
    return got, truth
