"""Shared parity check: a backend against an fp64 ground truth.

The rule: a backend's error against the fp64 reference is at most twice the
error of the plain-PyTorch reference computed in the same dtype, plus a small
floor (a few ulps of the dtype, relative to the quantity's magnitude).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import pytest
import torch

import clipfast

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")

_FLOOR_ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2, torch.float64: 64}


def floor_for(dtype: torch.dtype) -> float:
    return _FLOOR_ULPS[dtype] * torch.finfo(dtype).eps


def make_features(n, d, dtype, device, seed, correlated=True):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    noise = torch.randn(n, d, generator=gen)
    # Matching pairs share most of their direction, as trained CLIP features do.
    y = x + 0.7 * noise if correlated else noise
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def assert_gpu_memory_is_linear(backend: str, limit: float, n: int = 131072, d: int = 1024):
    """Peak extra CUDA memory of one bf16 forward+backward (the gradients
    included) at most ``limit`` x the two gradients' bytes. N = 131072 is where
    the plain loss no longer fits in 80 GB."""
    x, y = make_features(n, d, torch.bfloat16, "cuda", seed=1)
    x.requires_grad_()
    y.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = clipfast.clip_loss(x, y, 100.0, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = 2 * n * d * 2
    assert torch.isfinite(loss)
    assert extra <= limit * grad_bytes, (
        f"{backend}: peak extra {extra / 2**30:.2f} GiB vs grads {grad_bytes / 2**30:.2f} GiB")


def unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``t`` whose data starts one element past its storage's
    start, i.e. off a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view.requires_grad_()


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _autocast(dtype: Optional[torch.dtype], device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _loss_and_grads(x, y, scale, bias, normalize, needs, backend, autocast=None, **kwargs):
    leaves = []
    for t, need in zip((x, y, scale, bias), needs):
        if t is None:
            leaves.append(None)
            continue
        t = t.detach().clone().requires_grad_(need)
        leaves.append(t)
    x_, y_, s_, b_ = leaves
    # As trainers do: the loss inside the autocast region, backward outside it.
    with _autocast(autocast, x.device):
        loss = clipfast.clip_loss(x_, y_, s_, logit_bias=b_, normalize=normalize, backend=backend,
                                  **kwargs)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wrt) if wrt else ()
    out = {"loss": loss.detach()}
    names = ("grad_image", "grad_text", "grad_scale", "grad_bias")
    it = iter(grads)
    for name, t in zip(names, leaves):
        if t is not None and t.requires_grad:
            out[name] = next(it)
    for t, g, name in zip(leaves, [out.get(n) for n in names], names):
        if g is not None:
            assert g.dtype == t.dtype, f"{name} dtype {g.dtype} != input dtype {t.dtype}"
            assert g.shape == t.shape, f"{name} shape {tuple(g.shape)} != {tuple(t.shape)}"
    return out


def assert_parity(
    backend: str,
    n: int,
    d: int,
    *,
    x_dtype=torch.float32,
    y_dtype: Optional[torch.dtype] = None,
    scale: float = 14.3,
    bias: Optional[float] = None,
    normalize: bool = True,
    needs=(True, True, True, True),
    device="cpu",
    seed=0,
    ref_tf32: bool = False,
    ref_dtype: Optional[torch.dtype] = None,
    correlated: bool = True,
    autocast: Optional[torch.dtype] = None,
    **kwargs,
):
    """``autocast``: the backend and the same-dtype reference both run inside
    ``torch.autocast(dtype=autocast)`` (the fp64 truth outside it)."""
    y_dtype = y_dtype or x_dtype
    x32, y32 = make_features(n, d, torch.float32, device, seed, correlated=correlated)
    x = x32.to(x_dtype)
    y = y32.to(y_dtype)
    param_dtype = torch.float32
    s = torch.tensor(scale, dtype=param_dtype, device=device)
    b = None if bias is None else torch.tensor(bias, dtype=param_dtype, device=device)

    got = _loss_and_grads(x, y, s, b, normalize, needs, backend, autocast=autocast, **kwargs)
    # Past N = 8192 the fp64 N x N reference would need tens of GB; the chunked
    # backend (gradchecked against it in fp64) gives the same truth in O(N).
    truth = _loss_and_grads(
        x.double(), y.double(), s.double(), None if b is None else b.double(),
        normalize, needs, "reference" if n <= 8192 else "chunked")
    # ref_dtype: the PyTorch reference in another dtype stands in for "the
    # same dtype" (float16 for TF32 on the CPU, where torch has no TF32: the
    # same 10-bit mantissa in every product, fp32 accumulation).
    x_ref, y_ref = (x, y) if ref_dtype is None else (x.to(ref_dtype), y.to(ref_dtype))
    with tf32_matmul(ref_tf32) if device != "cpu" else contextlib.nullcontext():
        same = _loss_and_grads(x_ref, y_ref, s, b, normalize, needs, "reference",
                               autocast=autocast)

    assert_within_rule(got, truth, same, x, y, scale=scale, bias=bias, normalize=normalize,
                       dtypes=(x_dtype, y_dtype), ref_dtype=ref_dtype,
                       context=(f"{backend}", f"N={n}, d={d}, {x_dtype}/{y_dtype}, scale={scale}, "
                                f"bias={bias}, normalize={normalize}, autocast={autocast}"))
    return got, truth


def assert_within_rule(got, truth, same, x, y, *, scale, bias, normalize, dtypes,
                       ref_dtype=None, finite_reference=False, context=("", "")):
    """The accuracy rule on every entry of ``truth`` (loss, grad_*): the
    error of ``got`` against the fp64 ``truth`` is at most twice the error of
    ``same`` (the plain reference in the same dtype) plus a floor of a few
    ulps of the coarsest dtype involved.

    ``x``, ``y``: the features (their norms size the gradients' floor);
    ``dtypes``: (image, text) dtypes of the backend's inputs; ``ref_dtype``:
    the dtype ``same`` ran in when it stands in for "the same dtype";
    ``finite_reference``: a non-finite ``same`` fails (it would excuse any
    error); ``context``: (who, what) for the failure message.
    """
    who, what = context
    n = x.shape[0]
    assert set(got) == set(truth), f"gradients returned for {sorted(got)}, expected {sorted(truth)}"
    assert torch.isfinite(got["loss"]), f"non-finite loss {got['loss']}"
    for key in truth:
        t = truth[key].double()
        if finite_reference:
            assert torch.isfinite(same[key]).all(), f"the same-dtype reference's {key} is not finite"
        err = (got[key].double() - t).abs().max().item()
        ref_err = (same[key].double() - t).abs().max().item()
        if key in ("loss", "grad_scale", "grad_bias"):
            # Scalars whose terms are O(1): measure the floor against 1.
            magnitude = max(t.abs().max().item(), 1.0)
        else:
            # The gradient's natural size is s / N per unit-norm row, scaled by
            # 1/|x| through the normalisation; the truth itself can be ~0
            # (d = 1 with normalize: the sphere has no tangent directions).
            feats = x if key == "grad_image" else y
            inv = 1 / feats.double().norm(dim=1).clamp_min(1e-12).min().item() if normalize else 1.0
            magnitude = max(t.abs().max().item(), scale / n * max(inv, 1.0))
        # The floor follows the coarsest dtype that touched this quantity.
        used = {"grad_image": [dtypes[0]], "grad_text": [dtypes[1]]}.get(key, list(dtypes))
        used += [] if ref_dtype is None else [ref_dtype]
        floor = max(floor_for(dt) for dt in used) * magnitude
        if key in ("loss", "grad_scale"):
            # Both move by ~|L| * (relative logit error): one ulp of the largest
            # logit is a floor no rounding order can beat. (It matters where the
            # reference is exact by accident, e.g. d = 1 where cosines are +-1.)
            floor += max(torch.finfo(dt).eps for dt in used) * (scale + abs(bias or 0.0))
        allowed = 2 * ref_err + floor
        assert err <= allowed, (
            f"{who} {key}: error {err:.3e} vs fp64 exceeds 2 x reference error "
            f"{ref_err:.3e} + floor {floor:.3e} ({what})")


def reference_row_cross_entropy(queries, keys, scale, bias, normalize, label_offset):
    """mean_i CE(s Q^_i K^^T + b, i + label_offset), plain PyTorch."""
    import torch.nn.functional as F

    if normalize:
        queries, keys = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    logits = scale * queries @ keys.t()
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    return F.cross_entropy(logits, labels)


def assert_row_ce_parity(function, m, k, d, label_offset, *, dtype=torch.float32, device="cpu",
                         normalize=True, bias=0.5, extra_args=()):
    """A row cross-entropy Function against the plain reference, by the same rule."""
    gen = torch.Generator().manual_seed(m * 1000 + k)
    q = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
    keys = torch.randn(k, d, generator=gen).to(device=device, dtype=dtype)
    keys[label_offset:label_offset + m] += 1.5 * q.to(keys.dtype)  # the labels stand out
    s = torch.tensor(30.0, device=device)
    b = torch.tensor(bias, device=device)

    def run(fn, cast):
        leaves = [t.detach().clone().to(cast(t.dtype)).requires_grad_() for t in (q, keys, s, b)]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    got = run(lambda q_, k_, s_, b_: function.apply(q_, k_, s_, b_, normalize, label_offset,
                                                    *extra_args), lambda dt: dt)
    truth = run(lambda q_, k_, s_, b_: reference_row_cross_entropy(q_, k_, s_, b_, normalize,
                                                                    label_offset), lambda dt: torch.float64)
    same = run(lambda q_, k_, s_, b_: reference_row_cross_entropy(q_, k_, s_, b_, normalize,
                                                                   label_offset), lambda dt: dt)
    for name, g, t, r in zip(["loss", "grad_queries", "grad_keys", "grad_scale", "grad_bias"],
                             got, truth, same):
        err = (g.double() - t.double()).abs().max().item()
        ref_err = (r.double() - t.double()).abs().max().item()
        magnitude = max(t.abs().max().item(), 1.0 if name in ("loss", "grad_scale", "grad_bias")
                        else 30.0 / m)
        floor = floor_for(dtype) * magnitude
        if name in ("loss", "grad_scale"):
            floor += torch.finfo(dtype).eps * (30.0 + abs(bias))
        assert err <= 2 * ref_err + floor, (
            f"{name}: error {err:.3e} > 2 x {ref_err:.3e} + {floor:.3e} (M={m}, K={k}, d={d}, "
            f"offset={label_offset})")
