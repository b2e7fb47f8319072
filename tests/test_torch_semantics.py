"""torch's own conventions, as trainers rely on them: TF32 follows torch's
setting, a configured loss is an ordinary module (deepcopy, pickle,
torch.save, state_dict), and the scalars come in every form trainers keep them."""

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import clipfast
from clipfast import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss, clip_loss, info_nce_loss, siglip_loss
from clipfast._inputs import resolve_tf32
from clipfast.backends import cuda as cuda_backend

from .parity import assert_parity

# ------------------------------------ TF32 --------------------------------- #


@pytest.fixture
def tf32_setting():
    """Restores torch's TF32 switch after a test that flips it."""
    old = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_tf32_follows_torch_by_default(tf32_setting):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert resolve_tf32(None) is False
    torch.set_float32_matmul_precision("high")
    try:
        assert resolve_tf32(None) is True
    finally:
        torch.set_float32_matmul_precision("highest")
    assert resolve_tf32(None) is False
    # An explicit argument overrides the setting either way.
    assert resolve_tf32(True) is True
    torch.backends.cuda.matmul.allow_tf32 = True
    assert resolve_tf32(False) is False


@pytest.mark.parametrize("bad", ["False", 1, 0.0])
def test_allow_tf32_must_be_a_bool_or_none(bad):
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="allow_tf32"):
        clip_loss(x, x, 2.0, allow_tf32=bad, backend="chunked")
    with pytest.raises(TypeError, match="allow_tf32"):
        ClipLoss(allow_tf32=bad)


emulated = pytest.mark.skipif(not cuda_backend.emulation_available(),
                              reason="clipfast._cuda_emulated is not built")


@emulated
def test_emulated_cuda_fp32_at_d_1024_is_plain_fp32_under_torchs_default(monkeypatch, tf32_setting):
    # torch's default (no TF32): fp32 products, judged against plain fp32
    # PyTorch by the 2x rule. With TF32 on by default (the old behaviour) the
    # gradients were ~1e-3 off where fp32 is ~1e-6.
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    torch.backends.cuda.matmul.allow_tf32 = False
    # Uncorrelated pairs at scale 30: every logit matters (TF32 fails this by 10x).
    assert_parity("cuda", 33, 1024, x_dtype=torch.float32, bias=-1.0, scale=30.0,
                  correlated=False)


@emulated
def test_emulated_cuda_fp32_takes_tf32_when_torch_allows_it(monkeypatch, tf32_setting):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 300, generator=g)
    y = torch.randn(9, 300, generator=g)

    def loss(**kwargs):
        return clip_loss(x, y, 3.0, backend="cuda", **kwargs)

    torch.backends.cuda.matmul.allow_tf32 = False
    ieee = loss()
    assert torch.equal(ieee, loss(allow_tf32=False))
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = loss()
    assert torch.equal(tf32, loss(allow_tf32=True))
    assert not torch.equal(tf32, ieee)  # the setting really reaches the kernels
    # A module built before the switch follows it at call time.
    module = ClipLoss(backend="cuda", normalize=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.equal(module(x, y, 3.0), ieee)


# ------------------------------ scalars ------------------------------------ #

SCALE_FORMS = {
    "python float": lambda v: v,
    "numpy.float32": lambda v: np.float32(v),
    "numpy.float64": lambda v: np.float64(v),
    "numpy 0-dim array": lambda v: np.array(v),
    "0-dim tensor": lambda v: torch.tensor(v, dtype=torch.float64),
    "[1] tensor": lambda v: torch.tensor([v], dtype=torch.float64),
    "[1, 1] tensor": lambda v: torch.tensor([[v]], dtype=torch.float64),
}


def _features(n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x + torch.randn(n, d, generator=g, dtype=torch.float64)


LOSSES = {
    "clip_loss": lambda x, y, s, b: clip_loss(x, y, s, logit_bias=b, backend="chunked"),
    "siglip_loss": lambda x, y, s, b: siglip_loss(x, y, s, b, backend="chunked"),
    "info_nce_loss": lambda x, y, s, b: info_nce_loss(x, y, s, logit_bias=b, backend="chunked"),
    "ClipLoss": lambda x, y, s, b: ClipLoss(backend="chunked")(x, y, s, b),
    "SigLipLoss": lambda x, y, s, b: SigLipLoss(backend="chunked")(x, y, s, b),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("form", sorted(SCALE_FORMS))
def test_every_scalar_form_gives_the_same_loss(loss, form):
    x, y = _features()
    want = LOSSES[loss](x, y, 3.5, -0.25)
    got = LOSSES[loss](x, y, SCALE_FORMS[form](3.5), SCALE_FORMS[form](-0.25))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_scalar_tensors_get_their_gradient_in_their_own_shape(loss, shape):
    x, y = _features()
    grads = []
    for sh in ((), shape):
        s = torch.full(sh, 3.5, dtype=torch.float64, requires_grad=True)
        b = torch.full(sh, -0.25, dtype=torch.float64, requires_grad=True)
        LOSSES[loss](x, y, s, b).backward()
        assert s.grad.shape == sh and b.grad.shape == sh
        grads.append((s.grad.reshape(()), b.grad.reshape(())))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("bad,err,match", [
    (torch.ones(2), ValueError, r"logit_scale must be a scalar.*shape \(2,\)"),
    (torch.ones(1, 2), ValueError, r"logit_scale must be a scalar.*shape \(1, 2\)"),
    ("2.0", TypeError, "logit_scale must be a number or a one-element tensor, got str"),
    (np.ones(2), TypeError, "logit_scale must be a number or a one-element tensor, got ndarray"),
    (True, TypeError, "logit_scale must be a number"),
])
def test_bad_scalars_name_the_argument(bad, err, match):
    x, y = _features()
    with pytest.raises(err, match=match):
        clip_loss(x, y, bad, backend="chunked")


# ------------------------- losses are ordinary modules ---------------------- #

MODULES = {
    "ClipLoss": lambda: ClipLoss(backend="chunked", normalize=True, memory_budget=1e6),
    "SigLipLoss": lambda: SigLipLoss(backend="chunked", normalize=True),
    "DistillClipLoss": lambda: DistillClipLoss(backend="chunked"),
    "CoCaLoss": lambda: CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0,
                                 backend="chunked"),
}


def _torch_save_load(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save_load,
}


def _call(name, module):
    x, y = _features()
    scale = torch.tensor(4.0, dtype=torch.float64)
    if name == "DistillClipLoss":
        return module(x, y, scale, y.flip(1), x.flip(1), scale / 2)
    if name == "CoCaLoss":
        logits = torch.randn(7, 3, 11, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64)
        labels = torch.arange(21).reshape(7, 3) % 11
        return module(x, y, logits, labels, scale)
    if name == "SigLipLoss":
        return module(x, y, scale, torch.tensor(-1.0, dtype=torch.float64))
    return module(x, y, scale)


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_configured_loss_copies_pickles_and_saves(name, how):
    module = MODULES[name]()
    twin = COPIES[how](module)
    assert type(twin) is type(module) and twin is not module
    assert repr(twin) == repr(module)
    assert vars(twin).keys() == vars(module).keys()
    want, got = _call(name, module), _call(name, twin)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # state_dict round-trips (the losses hold no tensors of their own).
    state = module.state_dict()
    assert twin.load_state_dict(state, strict=True) is not None
    assert twin.state_dict().keys() == state.keys()


def test_a_loss_with_a_process_group_copies_shares_it_and_pickles_without_it(tmp_path):
    # In a process of its own: a real (1-rank gloo) group, then a sub-group.
    script = textwrap.dedent(f"""
        import copy, pickle
        import torch, torch.distributed as dist
        from clipfast import ClipLoss, SigLipLoss
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        group = dist.new_group([0])
        for cls in (ClipLoss, SigLipLoss):
            loss = cls(backend="chunked", group=group)
            assert copy.deepcopy(loss).group is group
            twin = pickle.loads(pickle.dumps(loss))
            # The group's ranks are the world's: the world group stands in.
            assert twin._process_group() is None, twin.group
        # A group whose ranks are not the world's cannot be re-resolved.
        twin.group.ranks = [0, 1]
        try:
            twin._process_group()
            raise SystemExit("no error")
        except RuntimeError as err:
            assert "unpickled without its process group ([0, 1])" in str(err), err
            assert "Set loss.group" in str(err), err
        dist.destroy_process_group()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_public_modules_are_the_same_after_reimport():
    # Pickled losses name their classes by module path: it must stay importable.
    for cls in (ClipLoss, SigLipLoss, DistillClipLoss, CoCaLoss):
        assert getattr(clipfast, cls.__name__) is cls


# ------------------------- what normalize=True does ------------------------ #


def test_normalize_true_keeps_parameter_gradients_of_normalised_features_but_not_leaf_ones():
    # As README states: behind the model's own F.normalize, every parameter
    # gradient is the same; on unit-norm leaves the radial part is dropped.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(7, 6, generator=g, dtype=torch.float64)
    text = torch.nn.functional.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    grads = []
    for normalize in (False, True):
        image = torch.nn.functional.normalize(inputs @ w, dim=1)
        loss = clip_loss(image, text, 5.0, normalize=normalize, backend="chunked")
        grads.append(torch.autograd.grad(loss, w)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)

    leaf = torch.nn.functional.normalize(inputs @ w.detach(), dim=1).requires_grad_()
    raw, projected = (torch.autograd.grad(clip_loss(leaf, text, 5.0, normalize=n,
                                                    backend="chunked"), leaf)[0]
                      for n in (False, True))
    radial = (raw * leaf).sum(dim=1, keepdim=True) * leaf
    torch.testing.assert_close(projected, raw - radial, rtol=1e-12, atol=1e-14)
    assert radial.abs().max() > 1e-3  # the two really differ
