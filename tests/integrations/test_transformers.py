"""clipfast.integrations.transformers against transformers' own losses.

Tiny random-init CLIPModel / SiglipModel / Siglip2Model (configs only,
nothing downloaded). The truth is ``model(**batch, return_loss=True).loss``
and its gradient with respect to every parameter (``logit_scale`` and
SigLIP's ``logit_bias`` included):

* float64: ours equals it to 1e-10 relative, per parameter tensor, with an
  absolute floor of 1e-13 x the largest gradient entry of the model (some
  gradients are exactly zero in exact arithmetic, e.g. the attention
  ``k_proj.bias`` under the softmax's shift invariance, and are pure
  rounding noise in both);
* float32: against the float64 model with the same weights as ground truth,
  ``err_ours <= 2 * err_hf + floor`` per tensor, floor = one float32 epsilon
  x the largest fp64 gradient entry (the loss: x |loss|).
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import math
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


transformers = pytest.importorskip("transformers")

from clipfast.backends import chunked as chunked_backend  # noqa: E402
from clipfast.integrations import transformers as cft  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
VOCAB, SEQ = 40, 6
TEXT = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)
VISION = dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=24,
              num_hidden_layers=1, num_attention_heads=2)
SIGLIP2_PATCHES = 4
HAS_SIGLIP2 = getattr(transformers, "Siglip2Model", None) is not None
KINDS = ["clip", "siglip", pytest.param("siglip2", marks=pytest.mark.skipif(
    not HAS_SIGLIP2, reason="the installed transformers has no Siglip2Model"))]


@pytest.fixture(autouse=True)
def _cuda_emulation(monkeypatch):
    # backend="cuda" runs its kernels through the CPU emulation.
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


def make_model(kind: str, dtype=torch.float64, seed: int = 0):
    """A tiny random-init model with a scale (and bias) away from their
    initial values, so their gradients are exercised at a generic point."""
    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=TEXT, vision_config=VISION, projection_dim=12))
    elif kind == "siglip":
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config=TEXT, vision_config=VISION))
    else:
        model = transformers.Siglip2Model(transformers.Siglip2Config(
            text_config=TEXT, vision_config=dict(VISION, num_patches=SIGLIP2_PATCHES)))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
        if kind != "clip":
            model.logit_bias.fill_(-1.3)
    return model.to(dtype)


def make_batch(kind: str, n: int, dtype=torch.float64, seed: int = 1):
    """What the model's forward takes, with some padded texts (and, for
    Siglip2, images of two sizes, the smaller one padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    for i in range(0, n, 2):
        mask[i, SEQ - 2:] = 0
        ids[i, SEQ - 2:] = 1
    batch = dict(input_ids=ids, attention_mask=mask)
    if kind == "siglip2":
        batch["pixel_values"] = torch.randn(n, SIGLIP2_PATCHES, 3 * 16, generator=g).to(dtype)
        shapes = torch.tensor([[2, 2] if i % 2 == 0 else [1, 2] for i in range(n)])
        patches = torch.zeros(n, SIGLIP2_PATCHES, dtype=torch.long)
        for i in range(n):
            patches[i, :int(shapes[i].prod())] = 1
        batch.update(spatial_shapes=shapes, pixel_attention_mask=patches)
    else:
        batch["pixel_values"] = torch.randn(n, 3, 8, 8, generator=g).to(dtype)
    return batch


def loss_and_grads(model, fn):
    """(loss, [gradient of every parameter]) of ``fn()``; unused parameters get zeros."""
    params = list(model.parameters())
    loss = fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def hf(model, batch):
    return loss_and_grads(model, lambda: model(**batch, return_loss=True).loss)


@functools.lru_cache(maxsize=None)
def fp64_case(kind: str, n: int):
    """(fp64 model, fp64 batch, HF's fp64 loss and gradients), built once per worker."""
    model, batch = make_model(kind), make_batch(kind, n)
    return model, batch, hf(model, batch)


@functools.lru_cache(maxsize=None)
def fp32_case(kind: str, n: int):
    """(fp32 model, fp32 batch, HF's fp32 result, the fp64 truth of the same weights)."""
    model64, batch64, truth = fp64_case(kind, n)
    model = copy.deepcopy(model64).float()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch64.items()}
    return model, batch, hf(model, batch), truth


def assert_fp64_equal(got, want, names):
    (loss, grads), (loss_w, grads_w) = got, want
    assert abs(loss.item() - loss_w.item()) <= 1e-10 * abs(loss_w.item()) + 1e-14
    floor = 1e-13 * max(g.abs().max().item() for g in grads_w)
    for name, g, w in zip(names, grads, grads_w):
        err = (g - w).abs().max().item()
        assert err <= 1e-10 * w.abs().max().item() + floor, (name, err, w.abs().max().item())


def assert_fp32_rule(ours, theirs, truth, names):
    """err(ours) <= 2 err(transformers) + floor, both against the fp64 truth."""
    (loss_o, grads_o), (loss_h, grads_h), (loss_t, grads_t) = ours, theirs, truth
    err_o = abs(loss_o.double().item() - loss_t.item())
    err_h = abs(loss_h.double().item() - loss_t.item())
    assert err_o <= 2 * err_h + EPS32 * abs(loss_t.item()), ("loss", err_o, err_h)
    floor = EPS32 * max(g.abs().max().item() for g in grads_t)
    for name, o, h, t in zip(names, grads_o, grads_h, grads_t):
        err_o = (o.double() - t).abs().max().item()
        err_h = (h.double() - t).abs().max().item()
        assert err_o <= 2 * err_h + floor, (name, err_o, err_h, floor)


def names_of(model):
    return [name for name, _ in model.named_parameters()]


# ------------------------------ exactness ---------------------------------- #


@pytest.mark.parametrize("n", [5, 7])
@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_model_loss_fp64_matches_transformers(kind, backend, n):
    model, batch, want = fp64_case(kind, n)
    got = loss_and_grads(model, lambda: cft.model_loss(model, backend=backend, **batch))
    assert got[0].dtype == torch.float64 and got[0].shape == ()
    assert_fp64_equal(got, want, names_of(model))


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu", "triton", "hybrid", "cuda"])
@pytest.mark.parametrize("kind", KINDS)
def test_model_loss_fp32_rule(kind, backend):
    n = 7 if kind == "siglip" else 5
    model, batch, theirs, truth = fp32_case(kind, n)
    ours = loss_and_grads(model, lambda: cft.model_loss(model, backend=backend, **batch))
    assert ours[0].dtype == torch.float32
    assert_fp32_rule(ours, theirs, truth, names_of(model))


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_bfloat16(kind):
    """Under autocast the embeddings are bfloat16; the loss is float32 (as HF's
    under autocast) and as close to the float64 truth as HF's, up to one
    bfloat16 epsilon of the loss."""
    model, batch, _, (truth, _) = fp32_case(kind, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = model(**batch, return_loss=True).loss
        ours = cft.model_loss(model, backend="chunked", **batch)
    assert ours.dtype == torch.float32 and ours.requires_grad
    err_ours, err_hf = abs(ours.item() - truth.item()), abs(theirs.item() - truth.item())
    assert err_ours <= 2 * err_hf + torch.finfo(torch.bfloat16).eps * abs(truth.item())


def test_memory_budget_keeps_the_result():
    model, batch, want = fp64_case("clip", 7)
    got = loss_and_grads(model, lambda: cft.model_loss(
        model, backend="chunked", memory_budget=float("inf"), **batch))
    assert_fp64_equal(got, want, names_of(model))


# ----------------------------- no N x N ------------------------------------ #


class _Shapes(TorchDispatchMode):
    """The shape of every tensor any ATen op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _square(shapes, n):
    """The recorded shapes with two dimensions equal to n (an N x N block)."""
    return [s for s in shapes if list(s).count(n) >= 2]


# N = 29 is none of the model's sizes (vocab 40, hidden 16, MLP 24, sequence
# 6, patches 4-5, projection 12, patch vector 48), so a shape with two
# dimensions of 29 can only be an N x N block.
N_BIG = 29


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_n_by_n_tensor(kind, backend, monkeypatch):
    # Chunks of 3 rows: the chunked backend's default chunk would hold all 29.
    monkeypatch.setattr(chunked_backend, "DEFAULT_CHUNK_ELEMENTS", 3 * N_BIG)
    model, batch = make_model(kind, torch.float32), make_batch(kind, N_BIG, torch.float32)

    control = _Shapes()
    with control:
        model(**batch, return_loss=True).loss.backward()
    assert (N_BIG, N_BIG) in control.shapes  # the detector sees transformers' logits

    model.zero_grad()
    ours = _Shapes()
    with ours:
        cft.model_loss(model, backend=backend, **batch).backward()
    assert ours.shapes and not _square(ours.shapes, N_BIG)

    cft.patch(model, backend=backend)
    patched = _Shapes()
    with patched:
        out = model(**batch, return_loss=True)
        out.loss.backward()
    assert out.logits_per_image is None and out.logits_per_text is None
    assert not _square(patched.shapes, N_BIG)


# ------------------------------- patching ---------------------------------- #


@pytest.mark.parametrize("kind", KINDS)
def test_patch_output_and_unpatch(kind):
    model, batch, want = fp64_case(kind, 5)
    model = copy.deepcopy(model)
    original = model(**batch, return_loss=False)
    assert original.logits_per_image is not None
    output_class = type(original)

    assert cft.patch(model, backend="chunked") is model and cft.is_patched(model)
    out = model(**batch, return_loss=True)
    assert type(out) is output_class
    assert out.logits_per_image is None and out.logits_per_text is None
    assert_fp64_equal(loss_and_grads(model, lambda: model(**batch, return_loss=True).loss),
                      want, names_of(model))
    torch.testing.assert_close(out.image_embeds, original.image_embeds, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.text_embeds, original.text_embeds, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.vision_model_output.pooler_output,
                               original.vision_model_output.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(out.text_model_output.last_hidden_state,
                               original.text_model_output.last_hidden_state, rtol=0, atol=0)

    # Without return_loss the model's own forward runs: logits and all, no loss.
    plain = model(**batch)
    assert plain.loss is None
    torch.testing.assert_close(plain.logits_per_image, original.logits_per_image, rtol=0, atol=0)

    # The tuple form, and arguments given by position, as the original takes them.
    as_tuple = model(**batch, return_loss=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], want[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(as_tuple[1], original.text_embeds, rtol=1e-12, atol=1e-14)
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "pixel_values")}
    by_position = model(batch["input_ids"], batch["pixel_values"], **rest, return_loss=True)
    torch.testing.assert_close(by_position.loss, want[0], rtol=1e-10, atol=0)

    # The signature Trainer inspects is the original's.
    own = type(model).forward.__get__(model)
    assert inspect.signature(model.forward) == inspect.signature(own)

    assert cft.unpatch(model) is model and not cft.is_patched(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_clipfast_patch")
    assert model.forward.__func__ is type(model).forward
    again = model(**batch, return_loss=True)
    assert again.logits_per_image is not None
    torch.testing.assert_close(again.loss, want[0], rtol=0, atol=0)
    assert cft.unpatch(model) is model  # unpatching an unpatched model changes nothing


def test_patch_restores_an_instance_forward_and_repatches():
    model, batch, want = fp64_case("siglip", 5)
    model = copy.deepcopy(model)
    calls = []

    def wrapper(self, *args, **kwargs):  # what accelerate-style wrappers look like
        calls.append(1)
        return type(self).forward(self, *args, **kwargs)

    own = types.MethodType(wrapper, model)
    model.forward = own
    cft.patch(model, backend="reference")
    model(**batch)  # no loss asked for: the instance's previous forward runs
    assert calls == [1]
    cft.patch(model, backend="cpu")  # patching again reconfigures, does not stack
    assert model._clipfast_patch.backend == "cpu" and model._clipfast_patch.previous is own
    torch.testing.assert_close(model(**batch, return_loss=True).loss, want[0], rtol=1e-10, atol=0)
    cft.unpatch(model)
    assert model.__dict__["forward"] is own

    # A forward replaced after patching is not silently dropped.
    cft.patch(model)
    patched_forward = model.forward
    model.forward = types.MethodType(lambda self, *a, **k: patched_forward(*a, **k), model)
    with pytest.raises(RuntimeError, match="replaced after"):
        cft.unpatch(model)


def test_patched_context_manager():
    model = copy.deepcopy(fp64_case("clip", 5)[0])
    batch = fp64_case("clip", 5)[1]
    with cft.patched(model, backend="cpu") as same:
        assert same is model and cft.is_patched(model)
        assert model(**batch, return_loss=True).logits_per_text is None
    assert not cft.is_patched(model) and "forward" not in model.__dict__
    cft.patch(model, backend="chunked")
    with cft.patched(model, backend="cpu"):
        assert model._clipfast_patch.backend == "cpu"
    assert cft.is_patched(model) and model._clipfast_patch.backend == "chunked"


def test_deepcopy_of_a_patched_model():
    model, batch, want = fp64_case("clip", 7)
    model = copy.deepcopy(model)
    cft.patch(model, backend="chunked")
    clone = copy.deepcopy(model)
    assert cft.is_patched(clone) and clone.forward.model is clone
    assert clone._clipfast_patch is not model._clipfast_patch

    clone(**batch, return_loss=True).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())
    for name, p, w in zip(names_of(clone), clone.parameters(), want[1]):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-13, msg=name)

    cft.unpatch(clone)
    assert not cft.is_patched(clone) and cft.is_patched(model)
    assert model(**batch, return_loss=True).logits_per_image is None


def test_pickled_patched_model():
    model, batch, want = fp64_case("siglip", 5)
    model = cft.patch(copy.deepcopy(model), backend="cpu")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert cft.is_patched(loaded) and loaded._clipfast_patch.backend == "cpu"
    out = loaded(**batch, return_loss=True)
    assert out.logits_per_image is None
    torch.testing.assert_close(out.loss, want[0], rtol=1e-10, atol=0)
    cft.unpatch(loaded)
    assert "forward" not in loaded.__dict__


# ------------------------------- Trainer ----------------------------------- #


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _collate(rows):
    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    out["return_loss"] = True  # what CLIP-style Trainer collators pass
    return out


def _train(model, batch, tmp_path, tag):
    """Two SGD steps of transformers.Trainer on batches of 5: (training loss, final weights)."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / tag), max_steps=2, per_device_train_batch_size=5,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Pairs(batch),
                                   data_collator=_collate)
    result = trainer.train()
    return result.training_loss, {k: v.detach().clone() for k, v in model.named_parameters()}


def test_trainer_steps(tmp_path, monkeypatch):
    calls = []
    real = cft.clip_loss
    monkeypatch.setattr(cft, "clip_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = make_model("clip")
    batch = make_batch("clip", 10)
    loss_hf, weights_hf = _train(copy.deepcopy(base), batch, tmp_path, "hf64")
    assert not calls
    loss_ours, weights_ours = _train(cft.patch(copy.deepcopy(base), backend="cpu"), batch,
                                     tmp_path, "ours64")
    assert len(calls) == 2  # both steps' losses came from clipfast
    assert abs(loss_ours - loss_hf) <= 1e-10 * abs(loss_hf)
    moved = max((weights_hf[k] - base.state_dict()[k]).abs().max().item() for k in weights_hf)
    assert moved > 1e-3  # the steps did train
    for name, w in weights_hf.items():
        err = (weights_ours[name] - w).abs().max().item()
        assert err <= 1e-10 * w.abs().max().item() + 1e-13, name

    # float32, against the float64 run as the truth.
    batch32 = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    loss_hf32, _ = _train(copy.deepcopy(base).float(), batch32, tmp_path, "hf32")
    loss_ours32, _ = _train(cft.patch(copy.deepcopy(base).float(), backend="chunked"), batch32,
                            tmp_path, "ours32")
    err_ours, err_hf = abs(loss_ours32 - loss_hf), abs(loss_hf32 - loss_hf)
    assert err_ours <= 2 * err_hf + EPS32 * abs(loss_hf), (err_ours, err_hf)


# ------------------------------- errors ------------------------------------ #


def test_unsupported_models_are_a_type_error_naming_the_supported_classes():
    text_only = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    for bad in (torch.nn.Linear(2, 2), text_only):
        for call in (lambda m: cft.model_loss(m, input_ids=None), cft.patch):
            with pytest.raises(TypeError) as info:
                call(bad)
            message = str(info.value)
            assert all(name in message for name in ("CLIPModel", "SiglipModel", "Siglip2Model"))
            assert type(bad).__name__ in message
    assert cft.SUPPORTED_MODELS == ("CLIPModel", "SiglipModel", "Siglip2Model")


def test_subclasses_are_supported():
    class MyClip(transformers.CLIPModel):
        pass

    base, batch, want = fp64_case("clip", 5)
    model = MyClip(base.config).double()
    model.load_state_dict(base.state_dict())
    assert_fp64_equal(loss_and_grads(model, lambda: cft.model_loss(model, backend="cpu", **batch)),
                      want, names_of(model))


@pytest.mark.parametrize("kind", KINDS)
def test_missing_inputs_and_bad_options(kind):
    model, batch, want = fp64_case(kind, 5)
    needed = ["input_ids", "pixel_values"] + (["spatial_shapes"] if kind == "siglip2" else [])
    for name in needed:
        partial = {k: v for k, v in batch.items() if k != name}
        with pytest.raises(ValueError, match=repr(name)):
            cft.model_loss(model, **partial)
    with pytest.raises(ValueError, match="backend"):
        cft.model_loss(model, backend="nope", **batch)
    with pytest.raises(ValueError, match="backend"):
        cft.patch(copy.deepcopy(model), backend="nope")
    # A Trainer batch (return_loss=True, return_dict) is accepted as it is.
    loss = cft.model_loss(model, backend="cpu", return_loss=True, return_dict=False, **batch)
    torch.testing.assert_close(loss, want[0], rtol=1e-10, atol=0)
    # The embeddings are read from output objects whatever config.return_dict says.
    tuples = copy.deepcopy(model)
    tuples.config.return_dict = False
    torch.testing.assert_close(cft.model_loss(tuples, backend="cpu", **batch), want[0],
                               rtol=1e-10, atol=0)


# ------------------------------ imports ------------------------------------ #


def test_importing_clipfast_does_not_import_transformers():
    code = (
        "import sys\n"
        "import clipfast, clipfast.integrations\n"
        "assert 'transformers' not in sys.modules, 'clipfast imported transformers'\n"
        "sys.modules['torchvision'] = None\n"  # the module must import without it, too
        "import clipfast.integrations.transformers\n"
        "assert 'transformers' in sys.modules\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
