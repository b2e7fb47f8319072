"""clipfast.integrations.sentence_transformers against the real
sentence-transformers classes of the same name.

fp64: the loss and every gradient (w.r.t. the embeddings, and w.r.t. a tiny
random-init model's parameters) equal sentence-transformers' to 1e-10
relative. fp32: clipfast's error against the fp64 truth is at most twice
sentence-transformers' own fp32 error plus a few ulps (tests/parity.py's
rule). Every direction / partition combination, cos_sim and dot_score, 0/1/2
hard-negative columns, the hardness modes, on every CPU-runnable backend.
The two-rank gather tests are in test_sentence_transformers_distributed.py.
"""

import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .st_harness import (assert_equal_fp64, features, max_abs, model_step,
                         save_tiny_bert, tiny_model)

pytest.importorskip("sentence_transformers")

from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from clipfast.integrations import sentence_transformers as cf  # noqa: E402

from ..parity import floor_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COMBOS = [
    (("query_to_doc",), "joint"),
    (("query_to_doc",), "per_direction"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (("query_to_doc", "query_to_query", "doc_to_query"), "joint"),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),
]
COMBO_IDS = ["+".join(d.replace("_to_", "2") for d in dirs) + "-" + pm for dirs, pm in COMBOS]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]
SIMILARITIES = {"cos_sim": util.cos_sim, "dot_score": util.dot_score}
SHAPES = [(5, 6), (7, 11), (13, 6)]
FP64_BACKENDS = ["reference", "chunked", "cpu"]
FP32_BACKENDS = ["reference", "chunked", "cpu", "triton", "hybrid", "cuda"]


@pytest.fixture(autouse=True)
def cuda_emulation(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")


def _kwargs(directions, partition, similarity, hardness):
    return dict(scale=20.0 if similarity == "cos_sim" else 1.5,
                similarity_fct=SIMILARITIES[similarity], directions=directions,
                partition_mode=partition, hardness_mode=hardness,
                hardness_strength=4.0 if hardness else 0.0)


def _embeddings(n, d, columns, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(n, d, generator=g, dtype=torch.float64)
    # Positives near their anchors, as trained embeddings are.
    docs = [anchors + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)]
    docs += [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(columns - 2)]
    return [t.to(dtype) for t in [anchors, *docs]]


def _loss_and_grads(loss, embeddings):
    leaves = [t.detach().clone().requires_grad_() for t in embeddings]
    value = loss.compute_loss_from_embeddings(leaves, None)
    return [value.detach()] + [g.detach() for g in torch.autograd.grad(value, leaves)]


def assert_fp32_parity(ours, theirs, truth):
    floor_rel = floor_for(torch.float32)
    floor = 1e-9 * max_abs(truth)  # for entries that are zero in exact arithmetic
    for i, (a, b, t) in enumerate(zip(ours, theirs, truth)):
        size = float(t.abs().max())
        err_ours = float((a.double() - t).abs().max())
        err_st = float((b.double() - t).abs().max())
        assert err_ours <= 2 * err_st + floor_rel * size + floor, (
            i, err_ours, err_st, size)


# --------------------------------------------------------------------------- #
# Embeddings: fp64 exactness, fp32 parity.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("similarity", sorted(SIMILARITIES))
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_fp64_matches_sentence_transformers(combo, similarity, backend):
    directions, partition = combo
    case = 0
    for columns in (2, 3, 4):
        for hardness in HARDNESS:
            n, d = SHAPES[case % len(SHAPES)]
            case += 1
            kwargs = _kwargs(directions, partition, similarity, hardness)
            emb = _embeddings(n, d, columns, torch.float64, seed=case + 10 * columns)
            theirs = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **kwargs), emb)
            ours = _loss_and_grads(cf.MultipleNegativesRankingLoss(None, backend=backend, **kwargs),
                                   emb)
            assert torch.isfinite(theirs[0])
            assert_equal_fp64(ours, theirs)


@pytest.mark.parametrize("backend", FP32_BACKENDS)
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_fp32_parity(combo, backend):
    directions, partition = combo
    interpreted = backend in ("triton", "hybrid")
    ran = 0
    for case, (similarity, columns, hardness) in enumerate(
            [("cos_sim", 2, None), ("dot_score", 3, None), ("cos_sim", 4, None),
             ("cos_sim", 3, "all_negatives"), ("dot_score", 4, "hard_negatives")]):
        n, d = (5, 6) if interpreted else SHAPES[case % len(SHAPES)]
        kwargs = _kwargs(directions, partition, similarity, hardness)
        emb = _embeddings(n, d, columns, torch.float64, seed=3 + case)
        truth = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **kwargs), emb)
        emb32 = [t.float() for t in emb]
        theirs = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **kwargs), emb32)
        ours_loss = cf.MultipleNegativesRankingLoss(None, backend=backend, **kwargs)
        ours = _loss_and_grads(ours_loss, emb32)
        assert all(t.dtype == torch.float32 for t in ours)
        assert_fp32_parity(ours, theirs, truth)
        ran += 1
    assert ran == 5


@pytest.mark.parametrize("combo,hardness", [
    (COMBOS[7], None), (COMBOS[4], "in_batch_negatives"), (COMBOS[0], "all_negatives"),
    (COMBOS[2], "hard_negatives"), (COMBOS[5], None)])
@pytest.mark.parametrize("chunk_elements,memory_budget", [(1, None), (40, None), (40, math.inf)])
def test_row_chunked_path_is_exact_in_any_chunking(combo, hardness, chunk_elements, memory_budget):
    """One row per chunk, a few rows, and no checkpointing (a budget that
    holds everything): the same loss and gradients as sentence-transformers."""
    directions, partition = combo
    kwargs = _kwargs(directions, partition, "cos_sim", hardness)
    emb = _embeddings(13, 6, 4, torch.float64, seed=7)
    theirs = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **kwargs), emb)
    leaves = [t.clone().requires_grad_() for t in emb]
    value = cf.multiple_negatives_ranking_loss(
        leaves, kwargs["scale"], similarity="cos_sim", directions=directions,
        partition_mode=partition, hardness_mode=hardness,
        hardness_strength=kwargs["hardness_strength"], chunk_elements=chunk_elements,
        memory_budget=memory_budget)
    ours = [value.detach()] + list(torch.autograd.grad(value, leaves))
    assert_equal_fp64(ours, theirs)


def test_half_precision_embeddings_give_a_float32_loss():
    emb = [t.to(torch.bfloat16) for t in _embeddings(7, 6, 3, torch.float64, seed=1)]
    truth = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None),
                            [t.double() for t in emb])
    for directions in (("query_to_doc",), ("query_to_doc", "query_to_query")):
        value = cf.MultipleNegativesRankingLoss(None, directions=directions).compute_loss_from_embeddings(
            emb, None)
        assert value.dtype == torch.float32
        if directions == ("query_to_doc",):
            assert abs(float(value) - float(truth[0])) <= 1e-2 * float(truth[0])


# --------------------------------------------------------------------------- #
# A tiny model: forward(sentence_features, labels) and parameter gradients.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert") / "bert"), dim=6, dropout=0.1)


@pytest.fixture(scope="module")
def model(model_path):
    m = tiny_model(model_path, torch.float64)
    m.train()
    return m


MODEL_CASES = [
    # (class, kwargs, columns)
    ("MultipleNegativesRankingLoss", {}, 2),
    ("MultipleNegativesRankingLoss", {}, 3),
    ("MultipleNegativesRankingLoss", dict(similarity_fct=util.dot_score, scale=1.0), 4),
    ("MultipleNegativesRankingLoss",
     dict(directions=("query_to_doc", "doc_to_query"), partition_mode="joint"), 3),
    ("MultipleNegativesRankingLoss",
     dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")), 3),
    ("MultipleNegativesRankingLoss",
     dict(hardness_mode="in_batch_negatives", hardness_strength=9.0), 3),
    ("MultipleNegativesSymmetricRankingLoss", {}, 2),
    ("MultipleNegativesSymmetricRankingLoss", dict(similarity_fct=util.dot_score), 3),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=3), 3),
    ("CachedMultipleNegativesRankingLoss",
     dict(mini_batch_size=2, directions=("query_to_doc", "doc_to_query"),
          partition_mode="per_direction", similarity_fct=util.dot_score, scale=1.0), 2),
    ("CachedMultipleNegativesRankingLoss",
     dict(mini_batch_size=4, directions=("query_to_doc", "query_to_query"),
          hardness_mode="all_negatives", hardness_strength=5.0), 4),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_num_tokens=20), 3),
]


@pytest.mark.parametrize("name,kwargs,columns", MODEL_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(MODEL_CASES)])
def test_model_gradients_match_sentence_transformers(model, name, kwargs, columns):
    """Same seed, dropout on: the same loss and parameter gradients (the
    cached classes replay each mini-batch's RNG state in both)."""
    feats = features(model, columns, 7, seed=columns)
    theirs = model_step(model, getattr(st_losses, name)(model, **kwargs), feats, seed=11)
    ours_loss = getattr(cf, name)(model, **kwargs)
    assert isinstance(ours_loss, getattr(st_losses, name))
    ours = model_step(model, ours_loss, feats, seed=11)
    assert any(float(g.abs().max()) > 0 for g in theirs[1])
    assert_equal_fp64([ours[0]] + ours[1], [theirs[0]] + theirs[1])


@pytest.mark.parametrize("kwargs", [{}, dict(directions=("query_to_doc", "doc_to_doc"))])
def test_cached_equals_plain_loss_without_dropout(model, kwargs):
    model.eval()
    try:
        feats = features(model, 3, 7, seed=4)
        plain = model_step(model, cf.MultipleNegativesRankingLoss(model, **kwargs), feats, seed=0)
        cached = model_step(model, cf.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=2, **kwargs), feats, seed=0)
        assert_equal_fp64([cached[0]] + cached[1], [plain[0]] + plain[1])
        with torch.no_grad():  # evaluation: the loss without the backward hook
            value = cf.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **kwargs)(
                [dict(f) for f in feats], None)
        assert abs(float(value) - float(plain[0])) <= 1e-12 * float(plain[0])
    finally:
        model.train()


def test_cached_delegates_hyperparameters(model):
    loss = cf.CachedMultipleNegativesRankingLoss(model, backend="chunked", scale=10.0)
    assert isinstance(loss.loss, cf.MultipleNegativesRankingLoss)
    assert loss.backend == "chunked" and loss.scale == 10.0
    loss.backend = "reference"
    loss.scale = 5.0
    assert loss.loss.backend == "reference" and loss.loss.scale == 5.0
    assert loss.get_config_dict()["backend"] == "reference"


# --------------------------------------------------------------------------- #
# Configuration, similarity functions, errors.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name,kwargs", [
    ("MultipleNegativesRankingLoss", {}),
    ("MultipleNegativesRankingLoss",
     dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"))),
    ("MultipleNegativesRankingLoss",
     dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
          similarity_fct=util.dot_score)),
    ("MultipleNegativesSymmetricRankingLoss", dict(scale=7.0)),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=5, hardness_mode="all_negatives",
                                                hardness_strength=2.0)),
])
def test_config_and_citation_are_sentence_transformers(model, name, kwargs):
    theirs = getattr(st_losses, name)(model, **kwargs)
    ours = getattr(cf, name)(model, backend="chunked", **kwargs)
    assert ours.get_config_dict() == {**theirs.get_config_dict(), "backend": "chunked"}
    assert ours.citation == theirs.citation
    assert ours.temperature == theirs.temperature
    assert getattr(cf, name)(model, **kwargs).get_config_dict()["backend"] == "auto"


@pytest.mark.parametrize("fct", [util.manhattan_sim, util.euclidean_sim, util.pairwise_cos_sim,
                                 lambda a, b: a @ b.T])
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss",
                                  "CachedMultipleNegativesRankingLoss",
                                  "MultipleNegativesSymmetricRankingLoss"])
def test_unsupported_similarity_is_a_clear_error(model, name, fct):
    with pytest.raises(ValueError, match="cos_sim.*dot_score"):
        getattr(cf, name)(model, similarity_fct=fct)


def test_model_similarity_methods_resolve(model):
    assert cf.similarity_kind(util.cos_sim) == "cos_sim"
    assert cf.similarity_kind(util.pytorch_cos_sim) == "cos_sim"
    assert cf.similarity_kind(util.dot_score) == "dot_score"
    old = model.similarity_fn_name
    try:
        model.similarity_fn_name = "dot"
        emb = _embeddings(5, 6, 3, torch.float64, seed=2)
        theirs = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(
            model, similarity_fct=model.similarity, scale=2.0), emb)
        ours = _loss_and_grads(cf.MultipleNegativesRankingLoss(
            model, similarity_fct=model.similarity, scale=2.0), emb)
        assert_equal_fp64(ours, theirs)
        model.similarity_fn_name = "manhattan"
        with pytest.raises(ValueError, match="cos_sim"):
            cf.MultipleNegativesRankingLoss(model, similarity_fct=model.similarity)
    finally:
        model.similarity_fn_name = old


def test_invalid_arguments(model):
    with pytest.raises(ValueError, match="backend"):
        cf.MultipleNegativesRankingLoss(model, backend="tpu")
    with pytest.raises(ValueError, match="memory_budget"):
        cf.CachedMultipleNegativesRankingLoss(model, memory_budget=-1)
    # sentence-transformers' own checks still apply.
    with pytest.raises(ValueError, match="per_direction"):
        cf.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"),
                                        partition_mode="per_direction")
    with pytest.raises(ValueError, match="at least 2"):
        cf.MultipleNegativesRankingLoss(model).compute_loss_from_embeddings(
            [torch.randn(3, 4)], None)


def test_importing_clipfast_never_imports_sentence_transformers():
    """``import clipfast`` and ``import clipfast.integrations`` (in a fresh
    interpreter) leave sentence-transformers unimported; only the submodule,
    which subclasses its classes, imports it."""
    code = ("import sys, clipfast, clipfast.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sentence_transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert cf.MultipleNegativesRankingLoss.__mro__[1].__module__.startswith("sentence_transformers.")


# --------------------------------------------------------------------------- #
# O(N) memory: no (N, N)-sized tensor.
# --------------------------------------------------------------------------- #


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = (0, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), tuple(t.shape), str(func))
        return out


@pytest.mark.parametrize("case", ["default_chunked_backend", "gte_row_chunked"])
def test_no_n_by_n_tensor(monkeypatch, case):
    """Forward and backward record every op's output: the largest is a chunk
    of rows, far from the N x N (let alone N x C) sentence-transformers builds."""
    if case == "default_chunked_backend":
        # The chunked backend's default 2^22-logit chunks: 512 rows of C = 2N.
        n, loss = 4096, cf.MultipleNegativesRankingLoss(None, backend="chunked")
    else:
        n = 1024
        monkeypatch.setattr(cf, "CHUNK_ELEMENTS", 1 << 17)  # 21 rows of C = 6N
        loss = cf.MultipleNegativesRankingLoss(
            None, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
            hardness_mode="all_negatives", hardness_strength=3.0)
    emb = [t.requires_grad_() for t in _embeddings(n, 8, 3, torch.float32, seed=0)]
    recorder = _ShapeRecorder()
    with recorder:
        value = loss.compute_loss_from_embeddings(emb, None)
        value.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in emb)
    numel, shape, op = recorder.largest
    assert numel <= n * n // 4, (numel, shape, op)
    assert numel >= 2 * n * 8  # the recorder saw the tensors (the stacked documents at least)


# --------------------------------------------------------------------------- #
# SentenceTransformerTrainer.
# --------------------------------------------------------------------------- #


def _train(model_path, tmp_path, loss_factory, steps=2, optim="sgd"):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from .st_harness import sentences

    model = tiny_model(model_path, torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    dataset = Dataset.from_dict({"anchor": sentences(12, 1), "positive": sentences(12, 2),
                                 "negative": sentences(12, 3)})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=steps,
        learning_rate=0.05, optim=optim, report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=1, seed=3, data_seed=3, disable_tqdm=True, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=loss_factory(model))
        result = trainer.train()
    moved = [p.detach() - s for p, s in zip(model.parameters(), start)]
    return result.training_loss, moved, model


@pytest.mark.parametrize("name,kwargs", [
    ("MultipleNegativesRankingLoss", {}),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=4)),
])
def test_trainer_steps_match_sentence_transformers(model_path, tmp_path, name, kwargs):
    """Two SGD steps of SentenceTransformerTrainer on an in-memory dataset
    (anchor, positive, negative): the same updates as with sentence-
    transformers' loss, and the model card names the loss."""
    ours_loss, ours_moved, ours_model = _train(
        model_path, tmp_path / "ours", lambda m: getattr(cf, name)(m, **kwargs))
    st_loss, st_moved, _ = _train(
        model_path, tmp_path / "st", lambda m: getattr(st_losses, name)(m, **kwargs))
    assert math.isfinite(ours_loss) and abs(ours_loss - st_loss) <= 1e-10 * st_loss
    assert max(float(m.abs().max()) for m in ours_moved) > 0
    assert_equal_fp64(ours_moved, st_moved)
    from sentence_transformers.base.model_card import generate_model_card

    text = generate_model_card(ours_model)
    assert name in text and '"backend": "auto"' in text
