"""Shared pieces of the sentence-transformers integration tests: an offline
tiny SentenceTransformer, the sentence batches, and the worker of the
two-rank gloo tests (imported by the spawned processes).

The worker follows tests/distributed_harness.py's safe teardown: exceptions
are caught and written to the rank's result file, the ranks meet at a
barrier, and only then is the process group destroyed.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=90)
WORDS = ("the a cat dog sat on mat ran fast slow big small red blue car house tree sun rain "
         "day night green old new").split()


def hide_broken_torchvision() -> None:
    """The conftest's torchvision shim (tests/torchvision_shim.py), for the
    spawned gloo workers, which do not run the conftest."""
    global _TORCHVISION_SCHEMAS
    from tests.torchvision_shim import make_torchvision_importable

    _TORCHVISION_SCHEMAS = make_torchvision_importable()


_TORCHVISION_SCHEMAS = None
# At import: a spawned worker imports the test module (and so this one)
# before it imports sentence_transformers.
hide_broken_torchvision()


def save_tiny_bert(path: str, dim: int = 6, dropout: float = 0.1, seed: int = 0) -> str:
    """A random-init one-layer BERT (hidden size ``dim``) and a word-level
    tokenizer built in memory, saved to ``path``: nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=32)
    config = BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=1,
                        num_attention_heads=1, intermediate_size=8, max_position_embeddings=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_model(path: str, dtype=torch.float64):
    """A SentenceTransformer (BERT + mean pooling) from ``save_tiny_bert``'s
    files, in ``dtype``, on the CPU."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(path)
    dim = transformer.get_embedding_dimension() if hasattr(
        transformer, "get_embedding_dimension") else transformer.auto_model.config.hidden_size
    model = SentenceTransformer(modules=[transformer, Pooling(dim, "mean")], device="cpu")
    return model.to(dtype)


def sentences(count: int, seed: int):
    """``count`` sentences of 2-8 random words."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(2, 9, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)))
    return out


def features(model, columns: int, n: int, seed: int):
    """Tokenized inputs of ``columns`` sentence columns of ``n`` rows."""
    return [model.preprocess(sentences(n, seed + 100 * c)) for c in range(columns)]


def max_abs(tensors):
    return max(float(t.abs().max()) for t in tensors)


def assert_equal_fp64(ours, theirs, rtol=1e-10):
    """Every tensor within rtol of sentence-transformers' (relative to its
    largest entry), with an absolute floor 1e-13 x the largest gradient, for
    gradients that are zero in exact arithmetic (a softmax's key bias)."""
    floor = 1e-13 * max_abs(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        err = float((a - b).abs().max()) if a.numel() else 0.0
        assert err <= rtol * float(b.abs().max()) + floor, (i, err, float(b.abs().max()))


def param_grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()]


def model_step(model, loss, feats, seed: int):
    """Loss and parameter gradients of one forward/backward (dropout seeded)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss([dict(f) for f in feats], None)
    value.backward()
    return value.detach(), param_grads(model)


# --------------------------------------------------------------------------- #
# Two-rank gloo worker.
# --------------------------------------------------------------------------- #

EMBEDDING_SCENARIOS = [
    # (name, directions, partition_mode, hardness_mode, columns, similarity, backend)
    ("default", ("query_to_doc",), "joint", None, 2, "cos_sim", "reference"),
    ("default_negs_chunked", ("query_to_doc",), "joint", None, 4, "cos_sim", "chunked"),
    ("default_negs_cpu", ("query_to_doc",), "joint", None, 3, "dot_score", "cpu"),
    ("symmetric", ("query_to_doc", "doc_to_query"), "per_direction", None, 3, "cos_sim",
     "reference"),
    ("symmetric_cpu", ("query_to_doc", "doc_to_query"), "per_direction", None, 2, "cos_sim", "cpu"),
    ("joint_pair", ("query_to_doc", "doc_to_query"), "joint", None, 3, "dot_score", "chunked"),
    ("gte", ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", None, 3,
     "cos_sim", "reference"),
    ("hardness_all", ("query_to_doc",), "joint", "all_negatives", 3, "cos_sim", "reference"),
    ("hardness_hard_per_direction", ("query_to_doc", "doc_to_query"), "per_direction",
     "hard_negatives", 4, "dot_score", "reference"),
]


def _embedding_case(rank, world_size, local_n, d, scenario):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as Theirs)

    from clipfast.integrations.sentence_transformers import MultipleNegativesRankingLoss as Ours

    name, directions, partition, hardness, columns, similarity, backend = scenario
    g = torch.Generator().manual_seed(len(name))
    full = [torch.randn(local_n * world_size, d, generator=g, dtype=torch.float64)
            for _ in range(columns)]
    rows = slice(rank * local_n, (rank + 1) * local_n)
    kwargs = dict(scale=20.0 if similarity == "cos_sim" else 2.0,
                  similarity_fct=getattr(util, similarity), gather_across_devices=True,
                  directions=directions, partition_mode=partition, hardness_mode=hardness,
                  hardness_strength=3.0 if hardness else 0.0)
    out = {}
    for label, loss in (("st", Theirs(None, **kwargs)), ("ours", Ours(None, backend=backend, **kwargs))):
        leaves = [t[rows].clone().requires_grad_() for t in full]
        value = loss.compute_loss_from_embeddings(leaves, None)
        grads = torch.autograd.grad(value, leaves)
        out[label] = [value.detach()] + [gr.detach() for gr in grads]
    return out


def _model_case(rank, model_path, local_n, cached: bool):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from clipfast.integrations import sentence_transformers as ours

    model = tiny_model(model_path)
    model.train()
    feats = features(model, 3, local_n, seed=10 + rank)
    out = {}
    for label, module in (("st", st_losses), ("ours", ours)):
        if cached:
            loss = module.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2,
                                                             gather_across_devices=True)
        else:
            loss = module.MultipleNegativesRankingLoss(
                model, gather_across_devices=True,
                directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
        value, grads = model_step(model, loss, feats, seed=5)
        out[label] = [value] + grads
    return out


def worker(rank: int, world_size: int, store_path: str, out_path: str, model_path: str,
           local_n: int, d: int):
    results, error = {}, None
    try:
        hide_broken_torchvision()
        import warnings

        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=TIMEOUT)
        for scenario in EMBEDDING_SCENARIOS:
            results[scenario[0]] = _embedding_case(rank, world_size, local_n, d, scenario)
        results["model_symmetric"] = _model_case(rank, model_path, local_n, cached=False)
        results["model_cached"] = _model_case(rank, model_path, local_n, cached=True)
    except BaseException:  # noqa: BLE001 - reported by the parent test
        error = traceback.format_exc()
    finally:
        torch.save({"results": results, "error": error}, out_path)
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
