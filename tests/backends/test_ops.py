"""The fused backends as trainers call them (clipfast/_ops.py): under autocast,
with double backward, through torch.compile(fullgraph=True), on fake/meta
tensors, and checked by torch.library.opcheck."""

import pytest
import torch

import clipfast
from clipfast import clip_loss
from clipfast.backends import cpu as cpu_backend, cuda as cuda_backend
from clipfast.backends import get
from clipfast.backends.reference import reference_clip_loss

from ..parity import assert_parity, make_features, requires_cuda

FUSED = ["chunked", "triton", "hybrid", "cpu", "cuda"]


def _usable(backend: str) -> bool:
    if backend == "cpu":
        return cpu_backend.available()
    if backend == "cuda":
        return cuda_backend.emulation_available() or torch.cuda.is_available()
    return True


@pytest.fixture(autouse=True)
def cuda_emulation(monkeypatch):
    # backend="cuda" on CPU tensors runs its kernels through the emulation.
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


def _require(backend):
    if not _usable(backend):
        pytest.fail(f"backend {backend!r} is not built in this environment")


# --------------------------------------------------------------------------- #
# Autocast: forward and backward in one precision; accuracy at least PyTorch's
# own under the same autocast.
# --------------------------------------------------------------------------- #

# (backend, feature dtype, autocast dtype). The cpu backend takes fp32 (and
# fp64) only; Triton's interpreter has no correct bf16 dot, so triton runs
# fp16 autocast here (bf16 is refused under the interpreter).
AUTOCAST_CASES = [
    ("reference", torch.float32, torch.bfloat16),
    ("chunked", torch.float32, torch.bfloat16),
    ("chunked", torch.bfloat16, torch.bfloat16),
    ("chunked", torch.float32, torch.float16),
    ("cpu", torch.float32, torch.bfloat16),
    ("triton", torch.float32, torch.float16),
    ("triton", torch.float16, torch.float16),
    # hybrid's epilogues have no tl.dot: bf16 runs under the interpreter too.
    ("hybrid", torch.float32, torch.bfloat16),
    ("hybrid", torch.bfloat16, torch.bfloat16),
    ("hybrid", torch.float16, torch.float16),
    ("cuda", torch.float32, torch.bfloat16),
    ("cuda", torch.bfloat16, torch.bfloat16),
    ("auto", torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("backend,dtype,autocast", AUTOCAST_CASES)
@pytest.mark.parametrize("n,d,scale", [(33, 40, 100.0), (97, 16, 14.3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_autocast_parity(backend, dtype, autocast, n, d, scale, normalize):
    if backend != "auto":
        _require(backend)
    assert_parity(backend, n, d, x_dtype=dtype, scale=scale, normalize=normalize,
                  autocast=autocast, bias=-2.0 if normalize else None)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "hybrid", "cuda", "chunked", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(1025, 128), (123, 97)])
def test_autocast_parity_gpu(backend, dtype, autocast, n, d):
    assert_parity(backend, n, d, x_dtype=dtype, scale=100.0, normalize=True, device="cuda",
                  autocast=autocast)


@pytest.mark.parametrize("backend", ["chunked", "cpu", "cuda"])
def test_autocast_does_not_change_a_fused_backend(backend):
    # The kernels compute in the features' dtypes whatever the region: a loss
    # under autocast equals the one outside it, gradients included.
    _require(backend)
    x, y = make_features(24, 20, torch.float32, "cpu", seed=3)
    results = []
    for enabled in (False, True):
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = clip_loss(xl, yl, 50.0, backend=backend)
        loss.backward()
        results.append((loss.detach(), xl.grad, yl.grad))
    for plain, autocast in zip(*results):
        torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# Double backward: supported on every backend (through the reference formula).
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("normalize,with_bias", [(True, True), (False, False)])
def test_gradgradcheck_fp64(backend, normalize, with_bias):
    _require(backend)
    torch.manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.1, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True) if with_bias else None

    def fn(x, y, s, b):
        return clip_loss(x, y, s, logit_bias=b, normalize=normalize, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, y, s, b))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_gradient_penalty_matches_reference(backend):
    # A gradient penalty (create_graph=True) on fp32 features: the penalty's
    # gradients against the fp64 reference's, within the fp32 rule.
    _require(backend)
    x0, y0 = make_features(19, 12, torch.float32, "cpu", seed=8)

    def penalty_grads(x0, y0, backend):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        s = torch.tensor(20.0, dtype=x0.dtype, requires_grad=True)
        # allow_tf32=False: the fp32 rule (cuda would otherwise run TF32).
        loss = clip_loss(x, y, s, backend=backend, allow_tf32=False)
        gx, gy = torch.autograd.grad(loss, (x, y), create_graph=True)
        total = loss + 10.0 * (gx.square().sum() + gy.square().sum())
        return (total.detach(),) + torch.autograd.grad(total, (x, y, s))

    got = penalty_grads(x0, y0, backend)
    truth = penalty_grads(x0.double(), y0.double(), "reference")
    same = penalty_grads(x0, y0, "reference")
    for g, t, r in zip(got, truth, same):
        err = (g.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        floor = 8 * torch.finfo(torch.float32).eps * max(t.abs().max().item(), 1.0)
        assert err <= 2 * ref_err + floor, (backend, err, ref_err, floor)


def test_double_backward_without_graph_request_uses_the_kernels(monkeypatch):
    # Only create_graph=True takes the reference route: a plain backward must
    # never build the N x N logits.
    calls = []
    import clipfast.backends.reference as reference

    original = reference.reference_clip_loss
    monkeypatch.setattr(reference, "reference_clip_loss",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    x, y = make_features(9, 5, torch.float32, "cpu", seed=1)
    x.requires_grad_()
    clip_loss(x, y, 10.0, backend="chunked").backward()
    assert calls == []
    loss = clip_loss(x, y, 10.0, backend="chunked")
    torch.autograd.grad(loss, x, create_graph=True)
    assert calls == [1]


# --------------------------------------------------------------------------- #
# torch.library operators: opcheck, fake tensors, torch.compile(fullgraph).
# --------------------------------------------------------------------------- #


def _op_args(backend, n=11, d=6, dtype=torch.float32, bias=True, requires_grad=True,
             memory_budget=0.0):
    x, y = make_features(n, d, dtype, "cpu", seed=2)
    s = torch.tensor(7.5)
    b = torch.tensor(0.25) if bias else None
    if requires_grad:
        x.requires_grad_()
        y.requires_grad_()
        s.requires_grad_()
    block = {"chunked": 16, "triton": 16, "hybrid": 4}.get(backend, 0)
    return (x, y, s, b, True, True, block, memory_budget)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("memory_budget", [0.0, 11 * 4 * 8, float("inf")])
def test_opcheck(backend, bias, memory_budget):
    _require(backend)
    if memory_budget and not get(backend).keeps_logits:
        pytest.skip(f"{backend} ignores memory_budget (its operators keep no logits)")
    op = get(backend).clip_op()
    args = _op_args(backend, bias=bias, memory_budget=memory_budget)
    # test_aot_dispatch_dynamic compares the compiled op with eager: the kernels
    # are deterministic, so bitwise equality is expected and checked.
    torch.library.opcheck(op.forward_op, args)
    x, y, s, b = args[:4]
    loss, stats, kept = op.forward_op(*args)
    if memory_budget:
        assert kept.shape[0] > 0 and kept.shape[1] == y.shape[0]
    grad = torch.tensor(1.0)
    torch.library.opcheck(
        op.backward_op, (grad, x.detach(), y.detach(), s.detach(), b, stats, kept, True, True,
                         args[6], memory_budget, True, False, True, False))


@pytest.mark.parametrize("backend", ["chunked", "triton", "hybrid", "cpu", "cuda", "auto"])
def test_meta_tensors(backend):
    # Shape propagation (meta tensors, as FSDP's deferred init and
    # torch.export use) needs no host read of the scale.
    x = torch.empty(10, 8, device="meta", requires_grad=True)
    y = torch.empty(10, 8, device="meta", requires_grad=True)
    s = torch.empty((), device="meta", requires_grad=True)
    loss = clip_loss(x, y, s, backend=backend)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    gx, gs = torch.autograd.grad(loss, (x, s))
    assert gx.shape == (10, 8) and gx.device.type == "meta" and gs.shape == ()


@pytest.mark.parametrize("backend", ["chunked", "triton", "hybrid", "cpu", "cuda", "auto"])
def test_fake_tensor_mode(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _require(backend) if backend != "auto" else None
    with FakeTensorMode():
        x = torch.empty(12, 8, dtype=torch.float16 if backend != "cpu" else torch.float32)
        y = torch.empty(12, 8, dtype=x.dtype)
        s = torch.empty(())
        loss = clip_loss(x, y, s, backend=backend, logit_bias=torch.empty(()))
    assert loss.shape == () and loss.dtype == torch.float32


def _compiled_step(backend, normalize, bias):
    def step(x, y, s, b):
        return clip_loss(x, y, s, logit_bias=b, normalize=normalize, backend=backend)

    return step


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "hybrid", "cpu", "cuda",
                                     "auto"])
@pytest.mark.parametrize("normalize,bias", [(True, True), (False, False)])
def test_compile_fullgraph_matches_eager(backend, normalize, bias):
    # aot_eager: Dynamo and AOTAutograd as inductor sees them (fullgraph
    # tracing, fake tensors, the compiled backward) without inductor's C++
    # build of every graph; test_compile_inductor_training_step covers that.
    if backend != "auto":
        _require(backend)
    torch._dynamo.reset()
    step = _compiled_step(backend, normalize, bias)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        x, y = make_features(21, 10, torch.float32, "cpu", seed=4)
        x.requires_grad_()
        y.requires_grad_()
        s = torch.tensor(12.0, requires_grad=True)
        b = torch.tensor(-1.5, requires_grad=True) if bias else None
        loss = fn(x, y, s, b)
        loss.backward()
        results.append([loss.detach(), x.grad, y.grad, s.grad] + ([b.grad] if bias else []))
    for eager, compiled_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager, rtol=1e-6, atol=1e-7)


def test_compile_inductor_training_step():
    # A dual encoder's step, compiled whole with inductor: projections, the
    # fused loss (an opaque operator in the graph), the backward.
    torch._dynamo.reset()
    torch.manual_seed(0)
    image_proj = torch.nn.Linear(12, 8)
    text_proj = torch.nn.Linear(10, 8)
    params = list(image_proj.parameters()) + list(text_proj.parameters())
    images, texts = torch.randn(17, 12), torch.randn(17, 10)
    log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def step(images, texts):
        return clip_loss(image_proj(images), text_proj(texts), log_scale.exp(), normalize=True,
                         backend="chunked")

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        for p in params + [log_scale]:
            p.grad = None
        loss = fn(images, texts)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in params + [log_scale]])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compiled_invalid_scale_gives_nan_not_an_exception():
    # Inside a compiled graph the scale is not read on the host (no sync per
    # step): an invalid one turns the loss and every gradient NaN instead of
    # raising. Eager mode raises.
    torch._dynamo.reset()
    x, y = make_features(8, 4, torch.float32, "cpu", seed=0)
    x.requires_grad_()
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(x, y, torch.tensor(-1.0), backend="chunked")
    compiled = torch.compile(lambda x, y, s: clip_loss(x, y, s, backend="chunked"),
                             fullgraph=True, backend="aot_eager")
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        x.grad = None
        loss = compiled(x, y, torch.tensor(bad))
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(x.grad).all(), bad
    loss = compiled(x, y, torch.tensor(3.0))
    assert torch.isfinite(loss)


def test_reference_is_not_an_operator():
    # The reference stays plain PyTorch (open_clip's own arithmetic, autocast
    # included), so it is the one backend whose result does move with autocast.
    x, y = make_features(16, 32, torch.float32, "cpu", seed=6, correlated=False)
    plain = reference_clip_loss(x, y, torch.tensor(10.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = clip_loss(x, y, 10.0, backend="reference")
    assert plain != autocast and abs(plain - autocast) < 0.05 * plain
    assert "reference" in clipfast.BACKENDS
