"""clipfast.integrations.open_clip against the real open_clip (3.x) classes.

* values and every gradient (features, logit_scale, logit_bias, the teacher's
  and the caption logits) of the patched ClipLoss / SigLipLoss /
  DistillClipLoss / CoCaLoss against open_clip's own: fp64 to 1e-10 relative
  on the fp64 backends, fp32 by tests/parity.py's rule (error against an fp64
  ground truth at most 2x open_clip's fp32 error plus a few ulps) on every
  backend that runs on the CPU (Triton's interpreter, the CUDA emulation);
* signatures, ``output_dict`` keys, ``get_logits`` / ``get_ground_truth``;
* patch / unpatch / patched: identity of every patched attribute, re-binding,
  restore on exceptions, threads, modules imported while patched;
* ``open_clip.create_loss(args)`` with open_clip_train's own argument parser;
* one step of ``open_clip_train.train.train_one_epoch`` on tiny random-init
  open_clip models, patched and not: the same losses, gradients and weights;
* the ``python -m clipfast.integrations.open_clip`` runner;
* ``import clipfast`` never imports open_clip.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import inspect
import json
import os
import pickle
import runpy
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ..parity import floor_for, make_features

REPO = Path(__file__).resolve().parents[2]


open_clip = pytest.importorskip("open_clip")

import open_clip.factory  # noqa: E402
import open_clip.loss  # noqa: E402
from open_clip import create_loss as create_loss_imported_early  # noqa: E402 - as open_clip_train.main

import clipfast  # noqa: E402
import clipfast.integrations.open_clip as oc_patch  # noqa: E402

NAMES = ("ClipLoss", "SigLipLoss", "DistillClipLoss", "CoCaLoss")
ORIGINAL = {name: getattr(open_clip.loss, name) for name in NAMES}
FP64_BACKENDS = [b for b in clipfast.BACKENDS
                 if b != "auto" and torch.float64 in clipfast.backends.get(b).dtypes]
CPU_BACKENDS = ["reference", "chunked", "triton", "hybrid", "cpu", "cuda"]


@pytest.fixture(autouse=True)
def _clean_patch_state(monkeypatch):
    # The "cuda" backend runs on the CPU through the emulated kernels.
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    assert not oc_patch.is_patched(), "a previous test left open_clip patched"
    yield
    was_patched = oc_patch.is_patched()
    oc_patch.unpatch()
    assert not was_patched, "the test left open_clip patched"


def test_originals_are_open_clips_own_classes():
    assert dict(oc_patch.ORIGINALS) == ORIGINAL
    for name, cls in ORIGINAL.items():
        assert cls.__module__ == "open_clip.loss" and cls.__name__ == name
        assert oc_patch.PATCHED[name] is getattr(oc_patch, name)


# ------------------------------ no import ---------------------------------- #


def test_importing_clipfast_never_imports_open_clip():
    code = (
        "import sys, clipfast, clipfast.integrations\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'open_clip_train'))\n"
        "assert 'clipfast.integrations' in sys.modules\n"
        "print(repr(loaded))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ----------------------------- signatures ---------------------------------- #


def _params(func):
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signatures_are_open_clips(name):
    # Names, kinds and defaults exactly: any call open_clip accepts means the
    # same here, and nothing else is accepted.
    assert _params(oc_patch.PATCHED[name]) == _params(ORIGINAL[name])


@pytest.mark.parametrize("name", NAMES)
def test_clipfast_modules_take_every_open_clip_argument(name):
    # clipfast.modules' own classes accept open_clip's arguments by name, and
    # construct with them (the patched classes only bind backend/memory_budget).
    theirs = inspect.signature(ORIGINAL[name]).parameters
    required = {p: 1.0 for p, v in theirs.items() if v.default is inspect.Parameter.empty}
    kwargs = dict(required, **{p: v.default for p, v in theirs.items() if p not in required})
    inspect.signature(getattr(clipfast, name)).bind(**kwargs)
    loss = getattr(clipfast, name)(**kwargs, backend="reference", memory_budget=None)
    original = ORIGINAL[name](**kwargs)
    for p in kwargs:
        if hasattr(original, p):  # open_clip keeps pad_id only in its CrossEntropyLoss
            assert getattr(loss, p) == getattr(original, p), p


@pytest.mark.parametrize("name", NAMES)
def test_methods_take_open_clips_arguments(name):
    for method in ("forward", "get_logits", "get_ground_truth", "dist_loss"):
        original = getattr(ORIGINAL[name], method, None)
        if original is None:
            continue
        theirs, ours = _params(original), _params(getattr(oc_patch.PATCHED[name], method))
        assert [p[:2] for p in ours[:len(theirs)]] == [p[:2] for p in theirs], method
        # A default open_clip has is kept; ours may add one (SigLipLoss's logit_bias).
        for (p, _, default), (_, _, our_default) in zip(theirs, ours):
            if default is not inspect.Parameter.empty:
                assert our_default == default, (method, p)


def test_the_classes_are_clipfast_modules_with_sensible_names():
    for name in NAMES:
        cls = oc_patch.PATCHED[name]
        assert issubclass(cls, getattr(clipfast, name))
        assert (cls.__name__, cls.__qualname__, cls.__module__) == (
            name, name, "clipfast.integrations.open_clip")
        assert cls.__doc__ and "Args:" in cls.__doc__


# ---------------------------- values and grads ----------------------------- #

# kind: (class name, constructor kwargs, with bias)
KINDS = {
    "clip": ("ClipLoss", {}, False),
    "clip_bias": ("ClipLoss", {}, True),
    "siglip": ("SigLipLoss", {}, True),
    "distill": ("DistillClipLoss", {}, False),
    "coca": ("CoCaLoss", {"caption_loss_weight": 2.0, "clip_loss_weight": 1.0}, False),
    "coca_pad": ("CoCaLoss", {"caption_loss_weight": 1.5, "clip_loss_weight": 0.5, "pad_id": 3},
                 False),
    "coca_no_clip": ("CoCaLoss", {"caption_loss_weight": 1.0, "clip_loss_weight": 0.0}, False),
}


def _inputs(kind, n, d, seed):
    """fp64 keyword arguments of the loss's forward, as an open_clip model
    returns them (normalised features, exponentiated scale)."""
    x, y = make_features(n, d, torch.float64, "cpu", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    siglip = kind == "siglip"
    out = {"image_features": F.normalize(x, dim=-1), "text_features": F.normalize(y, dim=-1),
           "logit_scale": torch.tensor(10.0 if siglip else 14.3, dtype=torch.float64)}
    if KINDS[kind][2]:
        out["logit_bias"] = torch.tensor(-4.0 if siglip else 0.7, dtype=torch.float64)
    if kind == "distill":
        tx, ty = make_features(n, d + 3, torch.float64, "cpu", seed + 2)
        out.update(dist_image_features=F.normalize(tx, dim=-1),
                   dist_text_features=F.normalize(ty, dim=-1),
                   dist_logit_scale=torch.tensor(20.0, dtype=torch.float64))
    if kind.startswith("coca"):
        tokens, vocab = 4, 9
        pad = KINDS[kind][1].get("pad_id", 0)
        labels = torch.randint(0, vocab, (n, tokens), generator=gen)
        labels[:, -1] = pad  # padded tails, as the tokenizer leaves them
        labels[0, :] = torch.arange(tokens) + 1
        out["logits"] = torch.randn(n, tokens, vocab, generator=gen, dtype=torch.float64)
        out["labels"] = labels
    return out


def _terms_and_grads(loss, inputs, dtype):
    """{key: (value, {input: grad})} of ``loss(**inputs, output_dict=True)``,
    the float inputs cast to ``dtype`` and each term differentiated alone."""
    leaves = {k: (v.detach().to(dtype).requires_grad_() if v.is_floating_point() else v)
              for k, v in inputs.items()}
    terms = loss(**leaves, output_dict=True)
    wrt = [k for k, v in leaves.items() if v.is_floating_point()]
    out = {}
    for key, term in terms.items():
        if term.requires_grad:
            grads = torch.autograd.grad(term, [leaves[k] for k in wrt], retain_graph=True,
                                        allow_unused=True)
            grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(wrt, grads)}
        else:
            grads = {k: torch.zeros_like(leaves[k]) for k in wrt}
        out[key] = (term.detach(), {k: g.detach() for k, g in grads.items()})
    return out


def _pairs(ours, theirs, same_dtype=True):
    assert list(ours) == list(theirs)  # open_clip's output_dict keys, in its order
    for key in theirs:
        value, grads = ours[key]
        t_value, t_grads = theirs[key]
        assert value.shape == t_value.shape, key
        assert value.dtype == t_value.dtype or not same_dtype, key
        yield f"{key}", value, t_value
        for name in t_grads:
            yield f"d {key} / d {name}", grads[name], t_grads[name]


def _make(kind, patched_backend=None):
    name, kwargs, _ = KINDS[kind]
    if patched_backend is None:
        return ORIGINAL[name](**kwargs)
    with oc_patch.patched(backend=patched_backend):
        loss = getattr(open_clip.loss, name)(**kwargs)  # through the patched name
    assert type(loss) is oc_patch.PATCHED[name] and loss.backend == patched_backend
    return loss


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("n,d", [(5, 6), (13, 11)])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_fp64_matches_open_clip(backend, kind, n, d):
    inputs = _inputs(kind, n, d, seed=n * 31 + d)
    ours = _terms_and_grads(_make(kind, backend), inputs, torch.float64)
    theirs = _terms_and_grads(_make(kind), inputs, torch.float64)
    for what, a, b in _pairs(ours, theirs):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max() + 1e-14, (what, _rel_err(a, b))


@pytest.mark.parametrize("n,d", [(7, 11), (13, 6)])
@pytest.mark.parametrize("kind", ["clip", "clip_bias", "siglip", "distill", "coca_pad"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_is_as_accurate_as_open_clip(backend, kind, n, d):
    inputs = _inputs(kind, n, d, seed=n * 17 + d)
    truth = _terms_and_grads(_make(kind), inputs, torch.float64)
    theirs = _terms_and_grads(_make(kind), inputs, torch.float32)
    ours = _terms_and_grads(_make(kind, backend), inputs, torch.float32)
    list(_pairs(ours, theirs))  # the same keys, shapes and dtypes as open_clip's in fp32
    for (what, a, t), (_, b, _) in zip(_pairs(ours, truth, False), _pairs(theirs, truth, False)):
        err_ours = (a.double() - t).abs().max().item()
        err_theirs = (b.double() - t).abs().max().item()
        allowed = 2 * err_theirs + _floor32(what, t, inputs)
        assert err_ours <= allowed, (what, err_ours, err_theirs, allowed)


SCALARS = ("logit_scale", "logit_bias", "dist_logit_scale")


def _floor32(what, truth, inputs):
    """tests/parity.py's floor (``assert_within_rule``): a few fp32 ulps of the
    quantity's natural size. Losses and the scale / bias gradients are sums of
    O(1) terms (size >= 1; the loss and the scale gradient also move by an ulp
    of the largest logit); a feature gradient's size is at least scale / N per
    unit-norm row; the caption logits' gradient is its own size."""
    t = truth.abs().max().item()
    scales = [inputs[k].item() for k in ("logit_scale", "dist_logit_scale") if k in inputs]
    bias = abs(inputs["logit_bias"].item()) if "logit_bias" in inputs else 0.0
    eps = torch.finfo(torch.float32).eps
    wrt = what.split(" / d ")[1] if " / d " in what else None
    if wrt is None or wrt in SCALARS:
        floor = floor_for(torch.float32) * max(t, 1.0)
        if wrt in (None, "logit_scale", "dist_logit_scale"):
            floor += eps * (max(scales) + bias)
        return floor
    if wrt == "logits":
        return floor_for(torch.float32) * t
    n = inputs["image_features"].shape[0]
    return floor_for(torch.float32) * max(t, max(scales) / n)


def test_coca_without_clip_weight_returns_open_clips_zero():
    inputs = _inputs("coca_no_clip", 5, 6, seed=3)
    ours = _make("coca_no_clip", "reference")(**inputs, output_dict=True)
    theirs = _make("coca_no_clip")(**inputs, output_dict=True)
    assert ours["contrastive_loss"].dtype == theirs["contrastive_loss"].dtype
    assert ours["contrastive_loss"].item() == theirs["contrastive_loss"].item() == 0


@pytest.mark.parametrize("kind", ["clip", "siglip", "distill", "coca"])
def test_tuple_outputs_match_output_dict(kind):
    inputs = _inputs(kind, 5, 6, seed=4)
    loss = _make(kind, "reference")
    plain, as_dict = loss(**inputs), loss(**inputs, output_dict=True)
    theirs = _make(kind)(**inputs)
    plain_list = list(plain) if isinstance(plain, tuple) else [plain]
    assert isinstance(plain, tuple) == isinstance(theirs, tuple)
    assert [v.item() for v in plain_list] == [v.item() for v in as_dict.values()]


@pytest.mark.parametrize("bias", [None, 0.25])
def test_get_logits_and_get_ground_truth_match_open_clip(bias):
    inputs = _inputs("clip", 7, 6, seed=5)
    x, y, s = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    with oc_patch.patched(backend="reference"):
        ours = open_clip.loss.ClipLoss(cache_labels=True)
        sig = open_clip.loss.SigLipLoss()
    theirs = ORIGINAL["ClipLoss"](cache_labels=True)
    for a, t in zip(ours.get_logits(x, y, s, b), theirs.get_logits(x, y, s, b)):
        torch.testing.assert_close(a, t, rtol=1e-12, atol=0)
    assert torch.equal(ours.get_ground_truth("cpu", 7), theirs.get_ground_truth("cpu", 7))
    assert ours.prev_num_logits == theirs.prev_num_logits == 7
    s_theirs = ORIGINAL["SigLipLoss"]()
    torch.testing.assert_close(sig.get_logits(x, y, s, b), s_theirs.get_logits(x, y, s, b),
                               rtol=1e-12, atol=0)
    for negative_only in (False, True):
        assert torch.equal(sig.get_ground_truth("cpu", torch.float64, 7, negative_only),
                           s_theirs.get_ground_truth("cpu", torch.float64, 7, negative_only))
    distill = ORIGINAL["DistillClipLoss"]()
    with oc_patch.patched():
        ours_distill = open_clip.loss.DistillClipLoss()
    logits = ours.get_logits(x, y, s)[0]
    torch.testing.assert_close(ours_distill.dist_loss(logits.T, logits),
                               distill.dist_loss(logits.T, logits), rtol=1e-12, atol=0)


# ------------------------- patch / unpatch / patched ------------------------ #


def _holders(objects):
    """{(module name, attribute): object} for every open_clip / open_clip_train
    module attribute that is one of ``objects``."""
    found = {}
    for mod_name, module in list(sys.modules.items()):
        if module is None or mod_name.split(".")[0] not in ("open_clip", "open_clip_train"):
            continue
        for attr, value in list(vars(module).items()):
            if any(value is o for o in objects):
                found[(mod_name, attr)] = value
    return found


def test_patch_swaps_every_holder_and_unpatch_restores_each_original():
    before = _holders(ORIGINAL.values())
    # The places the brief names, at least.
    for place in [("open_clip.loss", n) for n in NAMES] + [("open_clip.factory", n) for n in NAMES] + [
            ("open_clip", "ClipLoss"), ("open_clip", "DistillClipLoss"), ("open_clip", "CoCaLoss")]:
        assert place in before, place
    create_loss = open_clip.factory.create_loss
    oc_patch.patch()
    try:
        assert oc_patch.is_patched()
        for (mod_name, attr), original in before.items():
            now = getattr(sys.modules[mod_name], attr)
            assert now is oc_patch.PATCHED[original.__name__], (mod_name, attr)
        assert _holders(ORIGINAL.values()) == {}
        assert open_clip.create_loss is create_loss is open_clip.factory.create_loss  # untouched
        loss = open_clip.ClipLoss()
        assert isinstance(loss, clipfast.ClipLoss) and isinstance(loss, open_clip.loss.ClipLoss)
        assert "backend='auto'" in repr(loss)
    finally:
        oc_patch.unpatch()
    assert not oc_patch.is_patched()
    after = _holders(ORIGINAL.values())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert _holders(oc_patch.PATCHED.values()) == {}
    oc_patch.unpatch()  # a second unpatch is a no-op
    assert _holders(ORIGINAL.values()).keys() == before.keys()


def test_patch_twice_rebinds_and_unpatch_still_restores():
    oc_patch.patch(backend="reference", memory_budget=2 ** 20)
    first = open_clip.loss.SigLipLoss()
    oc_patch.patch(backend="chunked")
    second = open_clip.loss.SigLipLoss()
    coca = open_clip.loss.CoCaLoss(1.0, 1.0)
    assert (first.backend, first.memory_budget) == ("reference", 2 ** 20)
    assert (second.backend, second.memory_budget) == ("chunked", None)
    assert coca.backend == "chunked"
    oc_patch.unpatch()
    assert all(getattr(open_clip.loss, n) is ORIGINAL[n] for n in NAMES)
    assert all(getattr(open_clip.factory, n) is ORIGINAL[n] for n in NAMES)
    assert first.backend == "reference"  # built losses keep their backend
    never_patched = oc_patch.ClipLoss()  # the class alone: the default binding
    assert (never_patched.backend, never_patched.memory_budget) == ("auto", None)


def test_patched_restores_on_exceptions_and_nests():
    with pytest.raises(RuntimeError, match="boom"):
        with oc_patch.patched(backend="cpu"):
            assert open_clip.loss.ClipLoss().backend == "cpu"
            raise RuntimeError("boom")
    assert not oc_patch.is_patched() and open_clip.loss.ClipLoss is ORIGINAL["ClipLoss"]
    oc_patch.patch(backend="chunked", memory_budget=1e6)
    with oc_patch.patched(backend="reference"):
        assert open_clip.ClipLoss().backend == "reference"
        with oc_patch.patched(backend="cpu"):
            assert open_clip.factory.ClipLoss().backend == "cpu"
        assert open_clip.ClipLoss().backend == "reference"
    restored = open_clip.ClipLoss()
    assert (restored.backend, restored.memory_budget) == ("chunked", 1e6)
    oc_patch.unpatch()
    assert open_clip.ClipLoss is ORIGINAL["ClipLoss"]


@pytest.mark.parametrize("backend,memory_budget,error,match", [
    ("gpu", None, ValueError, "backend"),
    (3, None, TypeError, "backend"),
    ("cpu", -1, ValueError, "memory_budget"),
    ("cpu", "1GB", TypeError, "memory_budget"),
])
def test_bad_options_are_refused_and_change_nothing(backend, memory_budget, error, match):
    with pytest.raises(error, match=match):
        oc_patch.patch(backend=backend, memory_budget=memory_budget)
    with pytest.raises(error, match=match):
        with oc_patch.patched(backend=backend, memory_budget=memory_budget):
            pass  # pragma: no cover - never entered
    assert not oc_patch.is_patched() and open_clip.loss.ClipLoss is ORIGINAL["ClipLoss"]
    oc_patch.patch(backend="reference")
    with pytest.raises(error, match=match):
        oc_patch.patch(backend=backend, memory_budget=memory_budget)
    assert open_clip.loss.ClipLoss().backend == "reference"  # the binding before the error
    oc_patch.unpatch()


def test_modules_imported_before_and_while_patched(monkeypatch):
    early = types.ModuleType("open_clip_train._clipfast_probe_early")
    early.MyLoss = ORIGINAL["ClipLoss"]  # `from open_clip import ClipLoss as MyLoss`
    monkeypatch.setitem(sys.modules, early.__name__, early)
    unrelated = types.ModuleType("_clipfast_probe_user_module")
    unrelated.ClipLoss = ORIGINAL["ClipLoss"]
    monkeypatch.setitem(sys.modules, unrelated.__name__, unrelated)
    with oc_patch.patched(backend="reference"):
        assert early.MyLoss is oc_patch.ClipLoss
        late = types.ModuleType("open_clip._clipfast_probe_late")
        late.SigLipLoss = open_clip.loss.SigLipLoss  # imported while patched: ours
        monkeypatch.setitem(sys.modules, late.__name__, late)
    assert early.MyLoss is ORIGINAL["ClipLoss"]
    assert late.SigLipLoss is ORIGINAL["SigLipLoss"]
    assert unrelated.ClipLoss is ORIGINAL["ClipLoss"]  # only open_clip's own modules are touched


def test_patching_from_many_threads_leaves_a_consistent_state():
    errors = []
    barrier = threading.Barrier(6)

    def worker(i):
        try:
            barrier.wait()
            for step in range(30):
                if (i + step) % 3 == 0:
                    oc_patch.unpatch()
                else:
                    oc_patch.patch(backend=("reference", "chunked", "cpu")[i % 3])
                loss = open_clip.factory.create_loss(_args("ViT-tiny"))
                assert isinstance(loss, (ORIGINAL["ClipLoss"], oc_patch.ClipLoss))
                if isinstance(loss, oc_patch.ClipLoss):
                    assert loss.backend in ("auto", "reference", "chunked", "cpu")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = [getattr(m, n) for m in (open_clip.loss, open_clip.factory) for n in NAMES]
    if oc_patch.is_patched():
        assert all(c is oc_patch.PATCHED[n] for c, n in zip(state, NAMES * 2))
    else:
        assert all(c is ORIGINAL[n] for c, n in zip(state, NAMES * 2))
    oc_patch.unpatch()
    assert _holders(oc_patch.PATCHED.values()) == {}


def test_losses_pickle_and_deepcopy():
    inputs = _inputs("distill", 5, 6, seed=9)
    with oc_patch.patched(backend="chunked", memory_budget=4096):
        loss = open_clip.loss.DistillClipLoss(cache_labels=True)
    for clone in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert type(clone) is oc_patch.DistillClipLoss
        assert (clone.backend, clone.memory_budget, clone.cache_labels) == ("chunked", 4096, True)
        assert [v.item() for v in clone(**inputs)] == [v.item() for v in loss(**inputs)]


# ------------------------------ create_loss -------------------------------- #


def _args(model, *extra, distill=False, rank=0, world_size=1):
    """The Namespace open_clip_train.main hands create_loss: parse_args plus
    what main and init_distributed_device set."""
    from open_clip_train.params import parse_args

    args = parse_args(["--model", model, *extra])
    args.distill = distill
    args.rank, args.world_size, args.local_rank = rank, world_size, rank
    args.device = "cpu"
    args.wandb = False
    return args


CREATE_LOSS_CASES = {
    "ClipLoss": (("ViT-tiny",), {}),
    "ClipLoss-local": (("ViT-tiny", "--local-loss", "--gather-with-grad"), {"rank": 1, "world_size": 2}),
    "SigLipLoss": (("ViT-tiny", "--siglip", "--loss-dist-impl", "gather"), {"rank": 1, "world_size": 3}),
    "DistillClipLoss": (("ViT-tiny",), {"distill": True}),
    "CoCaLoss": (("coca_ViT-tiny", "--coca-caption-loss-weight", "1.5",
                  "--coca-contrastive-loss-weight", "0.5"), {}),
}


@pytest.mark.parametrize("case", list(CREATE_LOSS_CASES))
def test_create_loss_builds_clipfasts_loss_with_open_clips_settings(case):
    argv, kw = CREATE_LOSS_CASES[case]
    args = _args(*argv, **kw)
    name = case.split("-")[0]
    original = open_clip.create_loss(args)
    assert type(original) is ORIGINAL[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clipfast's note on gather modes' gradients
        with oc_patch.patched(backend="chunked", memory_budget=1e5):
            ours = open_clip.create_loss(args)
            early = create_loss_imported_early(args)  # open_clip_train.main's binding
    for loss in (ours, early):
        assert type(loss) is oc_patch.PATCHED[name]
        assert (loss.backend, loss.memory_budget) == ("chunked", 1e5)
        for attr, value in vars(original).items():
            if attr.startswith("_") or attr == "training":
                continue
            if isinstance(value, torch.nn.Module):  # CoCa's caption CrossEntropyLoss
                assert type(getattr(loss, attr)) is type(value)
                assert getattr(loss, attr).ignore_index == value.ignore_index
            else:
                assert getattr(loss, attr) == value, attr
        assert dict(loss.named_children()).keys() == dict(original.named_children()).keys()


# --------------------------- open_clip_train step --------------------------- #

TINY = {"embed_dim": 8,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8,
                       "head_width": 8},
        "text_cfg": {"context_length": 6, "vocab_size": 40, "width": 16, "heads": 2, "layers": 1}}
TINY_MODELS = {
    "clipfast-tiny-clip": TINY,
    "clipfast-tiny-siglip": dict(TINY, init_logit_bias=-5.0),
    "coca-clipfast-tiny": dict(
        TINY, embed_dim=16, custom_text=True,
        vision_cfg=dict(TINY["vision_cfg"], attentional_pool=True, attn_pooler_heads=2,
                        attn_pooler_queries=4, output_tokens=True),
        text_cfg=dict(TINY["text_cfg"], embed_cls=True, output_tokens=True),
        multimodal_cfg={"context_length": 6, "vocab_size": 40, "width": 16, "heads": 2,
                        "layers": 1}),
}


@pytest.fixture(scope="module")
def tiny_model_names(tmp_path_factory):
    """Tiny architectures registered through open_clip's own config mechanism."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in TINY_MODELS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder))
    return list(TINY_MODELS)


class _Loader:
    def __init__(self, batches):
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(len(images) for images, _ in batches)

    def __iter__(self):
        return iter(self.batches)


class _Data:
    """What train_one_epoch reads of open_clip_train.data.DataInfo."""

    def __init__(self, batches):
        self.dataloader = _Loader(batches)

    def set_epoch(self, epoch):
        self.epoch = epoch


def _train_step(model, dist_model, args, batches):
    """open_clip_train.main's sequence around one epoch: create_loss, the
    optimizer and scheduler, train_one_epoch. Returns the loss module, its
    recorded outputs and the model after the step."""
    from open_clip_train.scheduler import const_lr
    from open_clip_train.train import train_one_epoch

    model = copy.deepcopy(model)
    loss = create_loss_imported_early(args)
    recorded = []
    loss.register_forward_hook(
        lambda module, inputs, output: recorded.append({k: v.detach() for k, v in output.items()}))
    # SGD: the update is linear in the gradient (Adam's first step is lr x its sign,
    # noise for the gradients that are ~0, such as attention key biases').
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    scheduler = const_lr(optimizer, 0.1, 0, 10)
    train_one_epoch(model, {"train": _Data(batches)}, loss, 0, optimizer, None, scheduler,
                    dist_model, args, tb_writer=None)
    return loss, recorded, model


TRAIN_CASES = [
    # (model, loss, backend, accum_freq, extra argv)
    ("clipfast-tiny-clip", "ClipLoss", "cpu", 1, ()),
    ("clipfast-tiny-clip", "ClipLoss", "chunked", 2, ()),
    ("clipfast-tiny-siglip", "SigLipLoss", "cpu", 1, ("--siglip",)),
    ("coca-clipfast-tiny", "CoCaLoss", "cpu", 1, ()),
    ("clipfast-tiny-clip", "DistillClipLoss", "reference", 1, ()),
]


@pytest.mark.parametrize("model_name,loss_name,backend,accum_freq,extra", TRAIN_CASES,
                         ids=[f"{c[1]}-{c[2]}-accum{c[3]}" for c in TRAIN_CASES])
def test_open_clip_train_step_is_unchanged_by_the_patch(tiny_model_names, model_name, loss_name,
                                                        backend, accum_freq, extra):
    n = 7
    distill = loss_name == "DistillClipLoss"
    args = _args(model_name, "--precision", "fp32", "--batch-size", str(n),
                 "--accum-freq", str(accum_freq), *extra, distill=distill)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    if hasattr(model, "text_decoder"):
        # open_clip 3.3's CoCa never initialises its text decoder's
        # text_projection (MultimodalTransformer.init_parameters is never called,
        # and fails when called): without pretrained weights it is torch.empty's
        # garbage, NaN logits at times. Initialise it as that method means to.
        projection = model.text_decoder.text_projection
        with torch.no_grad():
            projection.normal_(std=projection.shape[0] ** -0.5)
    model = model.double()
    dist_model = None
    if distill:
        torch.manual_seed(1)
        dist_model = open_clip.create_model(model_name, output_dict=True).double()
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(accum_freq):
        images = torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64)
        texts = torch.randint(1, 40, (n, 6), generator=gen)
        texts[:, -2:] = 0  # padded tails (CoCa's pad_id)
        batches.append((images, texts))

    theirs_loss, theirs, theirs_model = _train_step(model, dist_model, args, batches)
    with oc_patch.patched(backend=backend):
        ours_loss, ours, ours_model = _train_step(model, dist_model, args, batches)
    assert type(theirs_loss) is ORIGINAL[loss_name]
    assert type(ours_loss) is oc_patch.PATCHED[loss_name] and ours_loss.backend == backend

    assert len(ours) == len(theirs) == accum_freq
    for a, b in zip(ours, theirs):
        assert list(a) == list(b)
        for key in b:
            assert (a[key] - b[key]).abs().max() <= 1e-10 * b[key].abs().max() + 1e-14, key
    checked = 0
    for (name, p), (_, q) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert (p.grad - q.grad).abs().max() <= 1e-10 * q.grad.abs().max() + 1e-14, name
        assert (p - q).abs().max() <= 1e-10 * q.abs().max() + 1e-14, name
        checked += 1
    assert checked >= 10  # both towers and the scale(s) got gradients


# -------------------------------- the runner -------------------------------- #


def _fake_train_main(monkeypatch):
    """open_clip_train.main needs open_clip_torch's [training] extra (webdataset,
    braceexpand, ...): a stand-in records what its main sees."""
    seen = {}

    def main(argv):
        seen["argv"] = list(argv)
        seen["patched"] = oc_patch.is_patched()
        seen["loss"] = open_clip.create_loss(_args("ViT-tiny"))
        return "done"

    fake = types.ModuleType("open_clip_train.main")
    fake.main = main
    monkeypatch.setitem(sys.modules, "open_clip_train.main", fake)
    return seen


def test_main_runs_open_clip_train_patched(monkeypatch):
    seen = _fake_train_main(monkeypatch)
    argv = ["--train-data", "x.tar", "--clipfast-backend", "cpu", "--model", "ViT-B-32",
            "--clipfast-memory-budget", "1e9", "--batch-size", "4"]
    assert oc_patch.main(argv) == "done"
    assert seen["argv"] == ["--train-data", "x.tar", "--model", "ViT-B-32", "--batch-size", "4"]
    assert seen["patched"] and type(seen["loss"]) is oc_patch.ClipLoss
    assert (seen["loss"].backend, seen["loss"].memory_budget) == ("cpu", 1e9)
    assert not oc_patch.is_patched()  # undone after the run
    with pytest.raises(SystemExit):
        oc_patch.main(["--clipfast-backend", "gpu"])
    assert "argv" in seen and not oc_patch.is_patched()


def test_python_dash_m_uses_the_canonical_classes(monkeypatch):
    seen = _fake_train_main(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["clipfast.integrations.open_clip", "--model", "RN50"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        runpy.run_module("clipfast.integrations.open_clip", run_name="__main__")
    assert seen["argv"] == ["--model", "RN50"]
    assert type(seen["loss"]) is oc_patch.ClipLoss and seen["loss"].backend == "auto"
    assert not oc_patch.is_patched()
