"""Shared SigLIP parity check: a backend's loss and gradients against
``reference_siglip_loss`` in fp64, by tests/parity.py's rule (error against
fp64 at most twice the error of the plain-PyTorch reference computed in the
same dtype, plus a small floor)."""

from __future__ import annotations

from typing import Optional

import torch

import clipfast
from clipfast.backends.reference import reference_siglip_loss

from .parity import assert_within_rule, make_features

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

    want_loss_dtype = torch.promote_types(torch.promote_types(x_dtype, y_dtype), torch.float32)
    assert got["loss"].dtype == want_loss_dtype, got["loss"].dtype
    assert_within_rule(got, truth, same, x, y, scale=scale, bias=bias, normalize=normalize,
                       dtypes=(x_dtype, y_dtype), ref_dtype=ref_dtype,
                       context=(backend, f"N={n}, d={d}, {x_dtype}/{y_dtype}, scale={scale}, "
                                         f"bias={bias}, normalize={normalize}, positives={positives}"))
    return got, truth
