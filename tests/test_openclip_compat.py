"""clipfast's ClipLoss / DistillClipLoss / CoCaLoss against open_clip's formulas.

The open_clip losses are re-stated below in plain PyTorch (the open_clip
package is not a test dependency): single-process ``get_logits``, the
symmetric cross-entropy, ``dist_loss`` and the CoCa caption term.
"""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import clipfast
from clipfast import ClipLoss, CoCaLoss, DistillClipLoss
from clipfast import modules as modules_mod
from clipfast.modules import chunked_distill_term

# --------------------- open_clip's formulas, written out ------------------- #


def oc_get_logits(image, text, scale, bias=None):
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    if bias is not None:
        logits_per_image = logits_per_image + bias
        logits_per_text = logits_per_text + bias
    return logits_per_image, logits_per_text


def oc_clip_loss(image, text, scale, bias=None):
    per_image, per_text = oc_get_logits(image, text, scale, bias)
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def oc_dist_loss(teacher_logits, student_logits):
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


def oc_distill(image, text, scale, t_image, t_text, t_scale):
    per_image, per_text = oc_get_logits(image, text, scale)
    t_per_image, t_per_text = oc_get_logits(t_image, t_text, t_scale)
    labels = torch.arange(image.shape[0])
    contrastive = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    distill = (oc_dist_loss(t_per_image, per_image) + oc_dist_loss(t_per_text, per_text)) / 2
    return contrastive, distill


def oc_coca(image, text, logits, labels, scale, caption_weight, clip_weight, pad_id):
    clip = clip_weight * oc_clip_loss(image, text, scale)
    caption = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=pad_id) * caption_weight
    return clip, caption


# ---------------------------------- helpers -------------------------------- #


def _features(n, d, seed, spread=2.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x + spread * 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _leaves(*tensors, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _loss_and_grads(fn, tensors, dtype=None):
    leaves = _leaves(*tensors, dtype=dtype)
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


EPS32 = torch.finfo(torch.float32).eps


def assert_rule(names, got, truth, same, n, scale, max_logit):
    """Error against fp64 <= 2 x PyTorch's own fp32 error + a few-ulp floor."""
    for name, g, t, r in zip(names, got, truth, same):
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype}, PyTorch gives {r.dtype}"
        t = t.double()
        err = (g.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        scalar = t.numel() == 1
        magnitude = max(t.abs().max().item(), 1.0 if scalar else scale / n)
        floor = 8 * EPS32 * magnitude
        if scalar:
            # One ulp of the largest logit: no summation order beats it.
            floor += EPS32 * max_logit
        else:
            # The same ulp of the largest logit moves every softmax weight by
            # that much relative, so the gradients by as much of their size:
            # on unnormalised 11 x 5 features (logits up to ~60) which of two
            # fp32 roundings of the logits lands nearer is luck, and the ratio
            # of the two errors spread over 0.2-4x across seeds and CPUs.
            floor += EPS32 * max_logit * magnitude
        assert err <= 2 * ref_err + floor, (
            f"{name}: error {err:.3e} > 2 x PyTorch's {ref_err:.3e} + floor {floor:.3e}")


FP64_TOL = dict(rtol=1e-9, atol=1e-12)
BIASES = [None, -2.0]


# ------------------------------ ClipLoss ----------------------------------- #


def test_default_is_open_clips_loss_on_unnormalised_features():
    # The case: open_clip's loss on raw features is large (logits in
    # the hundreds); a normalising default gave a few units instead.
    x, y = _features(16, 8, seed=0, spread=3.0, dtype=torch.float32)
    s = torch.tensor(100.0)
    want = oc_clip_loss(x, y, s)
    assert want.item() > 100
    loss_fn = ClipLoss()
    assert loss_fn.normalize is False
    torch.testing.assert_close(loss_fn(x, y, s), want, rtol=1e-5, atol=1e-5)
    assert ClipLoss(normalize=True)(x, y, s).item() < 10


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bias", BIASES)
def test_clip_loss_matches_open_clip_fp64(backend, normalize, bias):
    x, y = _features(13, 6, seed=1)
    s = torch.tensor(14.3, dtype=torch.float64)
    tensors = [x, y, s] + ([torch.tensor(bias, dtype=torch.float64)] if bias is not None else [])
    loss_fn = ClipLoss(backend=backend, normalize=normalize)

    def ours(x_, y_, s_, *b):
        return loss_fn(x_, y_, s_, *b)

    def theirs(x_, y_, s_, *b):
        # normalize=True replaces the model's own F.normalize: compare at the
        # raw features, upstream of it, so the gradients include its backward.
        if normalize:
            x_, y_ = F.normalize(x_, dim=-1), F.normalize(y_, dim=-1)
        return oc_clip_loss(x_, y_, s_, *b)

    for g, w in zip(_loss_and_grads(ours, tensors), _loss_and_grads(theirs, tensors)):
        torch.testing.assert_close(g, w, **FP64_TOL)


def _cpu_backend_params():
    from clipfast.backends.cpu import available

    return [pytest.param("cpu", marks=pytest.mark.skipif(not available(), reason="no _cpu extension"))]


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto", "triton", "hybrid"]
                         + _cpu_backend_params())
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bias", BIASES)
def test_clip_loss_matches_open_clip_fp32(backend, normalize, bias):
    n, scale = 11, 10.0
    x, y = _features(n, 5, seed=2)
    s = torch.tensor(scale, dtype=torch.float64)
    tensors = [x, y, s] + ([torch.tensor(bias, dtype=torch.float64)] if bias is not None else [])
    kwargs = dict(allow_tf32=False) if backend in ("triton", "hybrid") else {}
    loss_fn = ClipLoss(backend=backend, normalize=normalize, **kwargs)

    def theirs(x_, y_, s_, *b):
        if normalize:
            x_, y_ = F.normalize(x_, dim=-1), F.normalize(y_, dim=-1)
        return oc_clip_loss(x_, y_, s_, *b)

    got = _loss_and_grads(loss_fn, tensors, torch.float32)
    truth = _loss_and_grads(theirs, tensors)
    same = _loss_and_grads(theirs, tensors, torch.float32)
    unit = (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) if normalize else (x, y)
    max_logit = scale * (unit[0] @ unit[1].T).abs().max().item() + abs(bias or 0.0)
    assert_rule(["loss", "grad_image", "grad_text", "grad_scale", "grad_bias"][:len(got)],
                got, truth, same, n, scale, max_logit)


def test_allow_tf32_and_backend_reach_clip_loss(monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return torch.zeros(())

    monkeypatch.setattr(modules_mod, "clip_loss_from_inputs", spy)
    x = torch.randn(3, 2)
    ClipLoss(backend="chunked", allow_tf32=False, normalize=True)(x, x, 1.0)
    assert seen["allow_tf32"] is False and seen["backend"] == "chunked" and seen["normalize"] is True
    ClipLoss()(x, x, 1.0)
    # None: torch's TF32 setting, read at each call.
    assert seen["allow_tf32"] is None and seen["backend"] == "auto" and seen["normalize"] is False


def test_extra_repr_shows_the_options():
    text = repr(ClipLoss(backend="chunked", normalize=True, allow_tf32=False))
    for part in ("backend='chunked'", "normalize=True", "allow_tf32=False"):
        assert part in text


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool"),
    (dict(allow_tf32=1), TypeError, "allow_tf32 must be True, False or None"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClipLoss(**kwargs)


def test_get_ground_truth_and_label_cache():
    loss_fn = ClipLoss()
    a = loss_fn.get_ground_truth("cpu", 5)
    assert torch.equal(a, torch.arange(5)) and a.dtype == torch.long
    assert loss_fn.labels == {} and loss_fn.prev_num_logits == 0
    assert loss_fn.get_ground_truth(torch.device("cpu"), 5) is not a  # nothing cached

    cached = ClipLoss(cache_labels=True)
    a = cached.get_ground_truth(torch.device("cpu"), 5)
    assert cached.prev_num_logits == 5 and cached.labels[torch.device("cpu")] is a
    assert cached.get_ground_truth(torch.device("cpu"), 5) is a
    b = cached.get_ground_truth(torch.device("cpu"), 7)
    assert torch.equal(b, torch.arange(7)) and cached.prev_num_logits == 7
    assert cached.labels[torch.device("cpu")] is b


@pytest.mark.parametrize("local_loss,offset", [(True, 2 * 4), (False, 0)])
def test_get_ground_truth_offsets_local_loss_labels_by_rank(local_loss, offset):
    loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=2, world_size=3,
                       cache_labels=True)
    assert torch.equal(loss_fn.get_ground_truth("cpu", 4), torch.arange(4) + offset)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bias", BIASES)
def test_get_logits_as_open_clip(normalize, bias):
    x, y = _features(9, 4, seed=3)
    s = torch.tensor(7.0, dtype=torch.float64)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    loss_fn = ClipLoss(normalize=normalize, backend="reference")
    got = loss_fn.get_logits(x, y, s, b)
    unit = (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) if normalize else (x, y)
    want = oc_get_logits(*unit, s, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The pieces open_clip's subclasses build their losses from give forward's loss.
    labels = loss_fn.get_ground_truth(x.device, got[0].shape[0])
    from_pieces = (F.cross_entropy(got[0], labels) + F.cross_entropy(got[1], labels)) / 2
    torch.testing.assert_close(from_pieces, loss_fn(x, y, s, b), **FP64_TOL)


def test_get_logits_validates_its_inputs():
    with pytest.raises(ValueError, match="batch size mismatch"):
        ClipLoss().get_logits(torch.randn(3, 2), torch.randn(4, 2), 1.0)


# --------------------------- DistillClipLoss ------------------------------- #


def _distill_problem(n=13, d=6, d_teacher=5, seed=4, dtype=torch.float64):
    x, y = _features(n, d, seed=seed, dtype=dtype)
    tx, ty = _features(n, d_teacher, seed=seed + 1, dtype=dtype)
    return x, y, torch.tensor(10.0, dtype=dtype), tx, ty, torch.tensor(20.0, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_distill_matches_open_clip_fp64(backend, normalize, teacher_grad):
    x, y, s, tx, ty, ts = _distill_problem()
    loss_fn = DistillClipLoss(backend=backend, normalize=normalize, distill_chunk_rows=4)

    def unit(a):
        return F.normalize(a, dim=-1) if normalize else a

    def run(fn):
        student = _leaves(x, y, s)
        teacher = _leaves(tx, ty, ts) if teacher_grad else [tx, ty, ts]
        contrastive, distill = fn(*student, *teacher)
        wrt = student + (teacher if teacher_grad else [])
        # Separate gradients of each term, so that one cannot hide the other.
        grads_c = torch.autograd.grad(contrastive, student, retain_graph=True)
        grads_d = torch.autograd.grad(distill, wrt)
        return [contrastive.detach(), distill.detach(), *grads_c, *grads_d]

    got = run(loss_fn)
    want = run(lambda x_, y_, s_, tx_, ty_, ts_: oc_distill(unit(x_), unit(y_), s_, unit(tx_),
                                                            unit(ty_), ts_))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP64_TOL)


@pytest.mark.parametrize("backend", ["chunked", "triton", "hybrid"])
@pytest.mark.parametrize("normalize", [False, True])
def test_distill_matches_open_clip_fp32(backend, normalize):
    n = 11
    x, y, s, tx, ty, ts = _distill_problem(n=n, d=5, d_teacher=7, seed=5)
    kwargs = dict(allow_tf32=False) if backend in ("triton", "hybrid") else {}
    loss_fn = DistillClipLoss(backend=backend, normalize=normalize, distill_chunk_rows=3, **kwargs)

    def unit(a):
        return F.normalize(a, dim=-1) if normalize else a

    def theirs(x_, y_, s_, tx_, ty_, ts_):
        return oc_distill(unit(x_), unit(y_), s_, unit(tx_), unit(ty_), ts_)

    def run(fn, dtype):
        leaves = _leaves(x, y, s, tx, ty, ts, dtype=dtype)
        contrastive, distill = fn(*leaves)
        grads_c = torch.autograd.grad(contrastive, leaves[:3], retain_graph=True)
        grads_d = torch.autograd.grad(distill, leaves)
        return [contrastive.detach(), distill.detach(), *grads_c, *grads_d]

    got, truth, same = run(loss_fn, torch.float32), run(theirs, None), run(theirs, torch.float32)
    max_logit = max(sc.item() * (unit(a) @ unit(b).T).abs().max().item()
                    for a, b, sc in ((x, y, s), (tx, ty, ts)))
    names = ["contrastive", "distill", "c_grad_image", "c_grad_text", "c_grad_scale",
             "d_grad_image", "d_grad_text", "d_grad_scale", "d_grad_t_image", "d_grad_t_text",
             "d_grad_t_scale"]
    assert_rule(names, got, truth, same, n, 20.0, max_logit)


def test_distill_output_dict_teacher_without_grad_and_no_in_place_changes():
    x, y, s, tx, ty, ts = _distill_problem(dtype=torch.float32)
    xs, ys, ss = _leaves(x, y, s)
    before = [t.detach().clone() for t in (xs, ys, ss, tx, ty, ts)]
    out = DistillClipLoss(backend="chunked", distill_chunk_rows=5)(
        xs, ys, ss, tx, ty, ts, output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}
    (out["contrastive_loss"] + out["distill_loss"]).backward()
    assert all(t.grad is not None for t in (xs, ys, ss))
    assert all(t.grad is None and not t.requires_grad for t in (tx, ty, ts))
    for t, b in zip((xs, ys, ss, tx, ty, ts), before):
        assert torch.equal(t.detach(), b)
    as_tuple = DistillClipLoss(backend="chunked")(xs, ys, ss, tx, ty, ts)
    torch.testing.assert_close(as_tuple[1], out["distill_loss"])


def test_distill_half_precision_returns_fp32_within_the_rule():
    x, y, s, tx, ty, ts = _distill_problem(n=12, d=8, d_teacher=8, seed=6)
    truth = oc_dist_loss(ts * tx @ ty.T, s * x @ y.T)
    for dtype in (torch.bfloat16, torch.float16):
        hx, hy, htx, hty = (t.to(dtype) for t in (x, y, tx, ty))
        hs, hts = s.float(), ts.float()
        got = chunked_distill_term(hx, hy, hs, htx, hty, hts, chunk_rows=5)
        assert got.dtype == torch.float32
        same = oc_dist_loss(hts * htx @ hty.T, hs * hx @ hy.T)
        err, ref_err = (got.double() - truth).abs().item(), (same.double() - truth).abs().item()
        assert err <= 2 * ref_err + 2 * torch.finfo(dtype).eps * max(truth.abs().item(), 1.0), (
            dtype, err, ref_err)


def test_distill_term_gradcheck_and_double_backward():
    # Checkpointed chunks keep the graph differentiable twice (gradient
    # penalties), for student and teacher alike.
    x, y, s, tx, ty, ts = _distill_problem(n=3, d=2, d_teacher=3, seed=10)
    leaves = _leaves(x, y, s, tx, ty, ts)

    def fn(*args):
        return chunked_distill_term(*args, chunk_rows=2)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


def test_distill_term_under_autocast_within_the_rule():
    # open_clip computes its loss inside torch.autocast: bf16 products, fp32
    # softmaxes. The chunked term, recomputed in a backward that runs outside
    # autocast, must be as accurate as open_clip's formula there.
    x, y, s, tx, ty, ts = _distill_problem(n=12, d=8, d_teacher=6, seed=11)

    def autocast_run(fn):
        leaves = _leaves(x, y, s, tx, ty, ts, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    def theirs(x_, y_, s_, tx_, ty_, ts_):
        return oc_dist_loss(ts_ * tx_ @ ty_.T, s_ * x_ @ y_.T)

    got = autocast_run(lambda *a: chunked_distill_term(*a, chunk_rows=5))
    same = autocast_run(theirs)
    truth = _loss_and_grads(theirs, [x, y, s, tx, ty, ts])
    eps = torch.finfo(torch.bfloat16).eps
    for name, g, t, r in zip(["loss", "x", "y", "s", "tx", "ty", "ts"], got, truth, same):
        assert g.dtype == torch.float32, name
        err, ref_err = (g.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        floor = 2 * eps * max(t.abs().max().item(), 1.0 if t.numel() == 1 else 20.0 / 12)
        assert err <= 2 * ref_err + floor, f"{name}: {err:.3e} > 2 x {ref_err:.3e} + {floor:.3e}"


def test_distill_propagates_nan():
    x, y, s, tx, ty, ts = _distill_problem(dtype=torch.float32)
    x = x.clone()
    x[3, 1] = float("nan")
    _, distill = DistillClipLoss(backend="chunked", distill_chunk_rows=4)(x, y, s, tx, ty, ts)
    assert torch.isnan(distill)


class _LargestOutput(TorchDispatchMode):
    """Largest tensor any ATen op produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _distill_memory(chunk_rows, n=96, d=4):
    """(largest op output in elements, bytes autograd saves beyond the inputs)."""
    x, y, s, tx, ty, ts = _distill_problem(n=n, d=d, d_teacher=d, seed=7, dtype=torch.float32)
    leaves = _leaves(x, y, s, tx, ty, ts)  # the teacher requires grad too: the harder case
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    saved = {}

    def pack(t):
        # Saved views of the inputs cost nothing; count each new storage once.
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    loss_fn = DistillClipLoss(distill_chunk_rows=chunk_rows)
    with _LargestOutput() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn._distill(leaves[:3], leaves[3:])
        loss.backward()
    assert all(t.grad is not None for t in leaves)
    return mode.largest, sum(saved.values())


def test_distill_memory_is_chunk_by_n():
    n, chunk = 96, 8
    largest, saved_bytes = _distill_memory(chunk, n)
    # No op makes more than one chunk of logits, forward or backward (the
    # recomputation included), and between them autograd keeps less than one
    # chunk of fp32 logits beyond the inputs.
    assert largest <= chunk * n, largest
    assert saved_bytes < chunk * n * 4, saved_bytes
    # The measurement sees N x N when the chunk is the whole batch.
    assert _distill_memory(n, n)[0] >= n * n


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(distill_chunk_rows=0), ValueError, "distill_chunk_rows"),
    (dict(distill_chunk_rows=2.5), ValueError, "distill_chunk_rows"),
    (dict(ring=True, world_size=2, gather_with_grad=True), ValueError, "ring=True"),
])
def test_distill_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DistillClipLoss(**kwargs)


@pytest.mark.parametrize("which,value,exc,match", [
    (3, torch.randn(13), ValueError, "dist_image_features must be 2-D"),
    (4, torch.randn(12, 5), ValueError, "dist_text_features"),
    (5, -1.0, ValueError, "dist_logit_scale"),
    (3, torch.randn(12, 5), ValueError, "dist_image_features has shape"),
    (4, torch.randn(13, 5).long(), TypeError, "dist_text_features"),
])
def test_distill_bad_teacher_inputs_name_the_argument(which, value, exc, match):
    args = list(_distill_problem(dtype=torch.float32))
    args[which] = value
    if which == 3 and value.dim() == 2:
        args[4] = torch.randn(12, 5)
    with pytest.raises(exc, match=match):
        DistillClipLoss()(*args)


# ------------------------------- CoCaLoss ---------------------------------- #


def _coca_problem(seed=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x, y = _features(6, 4, seed=seed, dtype=dtype)
    logits = torch.randn(6, 5, 11, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 11, (6, 5), generator=gen)
    labels[:, -2:] = 0  # padding, ignored with pad_id=0
    labels[0, 0] = 0
    return x, y, logits, labels, torch.tensor(10.0, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("pad_id", [0, 3])
def test_coca_matches_open_clip(backend, pad_id):
    x, y, logits, labels, s = _coca_problem()
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5, pad_id=pad_id, backend=backend)
    assert loss_fn.caption_loss.ignore_index == pad_id

    def run(fn):
        leaves = _leaves(x, y, logits, s)
        clip, caption = fn(leaves[0], leaves[1], leaves[2], labels, leaves[3])
        grads_clip = torch.autograd.grad(clip, [leaves[0], leaves[1], leaves[3]], retain_graph=True)
        grads_caption = torch.autograd.grad(caption, leaves[2])
        return [clip.detach(), caption.detach(), *grads_clip, *grads_caption]

    got = run(loss_fn)
    want = run(lambda x_, y_, lg, lb, s_: oc_coca(x_, y_, lg, lb, s_, 2.0, 0.5, pad_id))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP64_TOL)
    out = loss_fn(x, y, logits, labels, s, output_dict=True)
    assert set(out) == {"contrastive_loss", "caption_loss"}
    torch.testing.assert_close(out["caption_loss"], want[1], **FP64_TOL)


def test_coca_without_clip_weight_returns_a_zero_contrastive_loss(monkeypatch):
    x, y, logits, labels, s = _coca_problem(dtype=torch.float32)

    def fail(*args, **kwargs):
        raise AssertionError("the contrastive loss must not be computed with clip_loss_weight=0")

    monkeypatch.setattr(modules_mod, "clip_loss_from_inputs", fail)
    clip, caption = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)(x, y, logits, labels, s)
    assert clip.item() == 0 and clip.device == logits.device
    torch.testing.assert_close(caption, F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0))


@pytest.mark.parametrize("logits,labels,match", [
    (torch.randn(6, 11), torch.zeros(6, 5, dtype=torch.long), "logits must be"),
    (torch.randn(6, 5, 11), torch.zeros(6, 4, dtype=torch.long), "labels must be"),
    (torch.randn(6, 5, 11), torch.zeros(6, 5), "labels must be"),
])
def test_coca_bad_inputs_name_the_argument(logits, labels, match):
    x, y, _, _, s = _coca_problem(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        CoCaLoss(1.0, 1.0)(x, y, logits, labels, s)


def test_coca_repr_and_exports():
    text = repr(CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, backend="chunked"))
    assert "caption_loss_weight=2.0" in text and "backend='chunked'" in text
    assert clipfast.CoCaLoss is CoCaLoss and clipfast.DistillClipLoss is DistillClipLoss


# ------------------------ across ranks (2 gloo ranks) ---------------------- #

WORLD, LOCAL_N = 2, 4
DIST_MODES = {
    "gather": dict(gather_with_grad=True),
    "local": dict(gather_with_grad=True, local_loss=True),
    "ring": dict(ring=True),
}


def _global_problem():
    return _distill_problem(n=WORLD * LOCAL_N, d=3, d_teacher=5, seed=9)


def _rank_worker(rank, store, out_dir):
    results, error = {}, None
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
        x, y, s, tx, ty, ts = _global_problem()
        rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        for name, kwargs in DIST_MODES.items():
            loss_fn = ClipLoss(rank=rank, world_size=WORLD, normalize=True, backend="chunked",
                               **kwargs)
            results[f"{name}/logits"] = [t.detach() for t in loss_fn.get_logits(x[rows], y[rows], s)]
            if name == "ring":
                continue
            distill_fn = DistillClipLoss(rank=rank, world_size=WORLD, backend="chunked",
                                         distill_chunk_rows=3, **kwargs)
            leaves = _leaves(x[rows], y[rows], s)
            contrastive, distill = distill_fn(*leaves, tx[rows], ty[rows], ts)
            grads = list(torch.autograd.grad(distill, leaves))
            dist.all_reduce(grads[2])  # logit_scale is replicated: DDP's mean
            grads[2] /= WORLD
            mean = distill.detach().clone()
            dist.all_reduce(mean)
            results[f"{name}/distill"] = [distill.detach(), mean / WORLD, *grads]
    except BaseException:  # noqa: BLE001 - reported by the parent test
        import traceback

        error = traceback.format_exc()
    finally:
        torch.save({"results": results, "error": error}, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _run_ranks(out_dir):
    mp.start_processes(_rank_worker, args=(os.path.join(out_dir, "store"), out_dir),
                       nprocs=WORLD, start_method="spawn")
    reports = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
               for r in range(WORLD)]
    errors = [f"rank {r}:\n{rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
    assert not errors, "\n".join(errors)
    return [rep["results"] for rep in reports]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_get_logits_and_distill_across_ranks(tmp_path):
    results = _run_ranks(str(tmp_path))
    x, y, s, tx, ty, ts = _global_problem()
    unit_x, unit_y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    per_image, per_text = oc_get_logits(unit_x, unit_y, s)
    leaves = _leaves(x, y, s)
    _, distill = oc_distill(*leaves, tx, ty, ts)
    want_grads = torch.autograd.grad(distill, leaves)
    for rank, got in enumerate(results):
        rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        for name in ("gather", "ring"):
            torch.testing.assert_close(got[f"{name}/logits"][0], per_image, **FP64_TOL)
            torch.testing.assert_close(got[f"{name}/logits"][1], per_text, **FP64_TOL)
        torch.testing.assert_close(got["local/logits"][0], per_image[rows], **FP64_TOL)
        torch.testing.assert_close(got["local/logits"][1], per_text[rows], **FP64_TOL)
        for name in ("gather", "local"):
            loss, mean, gx, gy, gs = got[f"{name}/distill"]
            torch.testing.assert_close(loss if name == "gather" else mean, distill.detach(),
                                       **FP64_TOL)
            # gather_with_grad: each rank holds world_size x its share (DDP's mean).
            torch.testing.assert_close(gx / WORLD, want_grads[0][rows], **FP64_TOL)
            torch.testing.assert_close(gy / WORLD, want_grads[1][rows], **FP64_TOL)
            torch.testing.assert_close(gs, want_grads[2], **FP64_TOL)
