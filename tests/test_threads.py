"""Losses computed from several Python threads at once.

Training loops call the loss from data-parallel threads, evaluation workers or
a background checkpoint; each call must give exactly what it gives alone. The
Triton interpreter patches process-wide state while it runs a kernel, and the
CUDA emulation keeps ``__shared__`` arrays in static storage: both used to
mix up concurrent calls (a crash, wrong numbers).
"""

import threading

import pytest
import torch

from clipfast import clip_loss
from clipfast.backends import cpu as cpu_backend, cuda as cuda_backend

from .parity import make_features

THREADS = 2


def _backend_params():
    out = [pytest.param("chunked", torch.float32, {}, id="chunked"),
           pytest.param("triton", torch.float32, dict(allow_tf32=False), id="triton"),
           pytest.param("hybrid", torch.bfloat16, {}, id="hybrid")]
    out.append(pytest.param(
        "cpu", torch.float32, {}, id="cpu",
        marks=pytest.mark.skipif(not cpu_backend.available(), reason="clipfast._cpu is not built")))
    # fp32 only: the emulated kernels' shared memory is the same for every
    # dtype, and each emulated call takes seconds.
    out.append(pytest.param(
        "cuda", torch.float32, {}, id="cuda-emulated",
        marks=pytest.mark.skipif(not cuda_backend.emulation_available(),
                                 reason="clipfast._cuda_emulated is not built")))
    return out


def _loss_and_grads(backend, dtype, seed, kwargs, together=None):
    # Different sizes and data per thread: a kernel reading another call's
    # shared memory or statistics cannot come out right by accident. Over 128
    # rows: several blocks per emulated grid.
    n, d = 129 + 11 * seed, 9 + 4 * seed
    x, y = make_features(n, d, dtype, "cpu", seed=seed)
    x.requires_grad_()
    y.requires_grad_()
    s = torch.tensor(20.0 + seed, requires_grad=True)
    if together is not None:
        together.wait()  # both forwards at once
    loss = clip_loss(x, y, s, backend=backend, **kwargs)
    if together is not None:
        together.wait()  # both backwards at once
    loss.backward()
    return [loss.detach(), x.grad, y.grad, s.grad]


@pytest.mark.parametrize("backend,dtype,kwargs", _backend_params())
def test_concurrent_calls_match_single_threaded(backend, dtype, kwargs, monkeypatch):
    if backend == "cuda":
        monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    alone = [_loss_and_grads(backend, dtype, seed, kwargs) for seed in range(THREADS)]

    together = threading.Barrier(THREADS, timeout=300)
    results, errors = [None] * THREADS, []

    def work(seed):
        try:
            results[seed] = _loss_and_grads(backend, dtype, seed, kwargs, together)
        except BaseException as exc:  # reported below, with its thread
            together.abort()
            errors.append((seed, exc))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed in range(THREADS):
        for name, got, want in zip(("loss", "grad_x", "grad_y", "grad_scale"),
                                   results[seed], alone[seed]):
            assert torch.equal(got, want), (
                f"{backend} thread {seed} {name}: max difference "
                f"{(got.double() - want.double()).abs().max().item():.3e}")
