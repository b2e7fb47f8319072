"""clipfast.dispatch: named backends, auto, and the stand-ins for losses a
backend lacks (the rules the old per-loss if-chains encoded)."""

import pytest
import torch

import clipfast
from clipfast import autoselect, dispatch
from clipfast._inputs import check_inputs
from clipfast.backends import BLOCKS, REGISTRY, ROWS, SIGLIP, get
from clipfast.backends import cpu as cpu_backend
from clipfast.backends.triton import triton_available


def _inputs(dtype=torch.float32, n=6, d=4):
    x = torch.randn(n, d, dtype=dtype)
    return check_inputs(x, x.clone(), 10.0, None)


@pytest.fixture
def auto_picks(monkeypatch):
    """Make auto choose a given backend, as the table would on some machine."""
    def pick(name):
        monkeypatch.setattr(autoselect, "choose", lambda x, y: name)
    return pick


def test_named_backends_resolve_to_themselves():
    inputs = _inputs()
    for name in ("reference", "chunked"):
        assert dispatch.resolve_backend(name, inputs) == name
        assert dispatch.resolve(name, inputs) is REGISTRY[name]


def test_unknown_backend_is_a_value_error_listing_them():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', "
                                         r"'chunked', 'triton', 'hybrid', 'cpu', 'cuda'\), got 'fast'"):
        dispatch.resolve_backend("fast", _inputs())


def test_a_named_backend_without_the_row_loss_says_which_have_it(monkeypatch):
    # Every registered backend has the row loss now; one that lacked it would
    # be refused by name, with the list of those that have it.
    monkeypatch.setattr(type(get("cpu")), "losses", frozenset({SIGLIP}))
    if get("cpu").problem(_inputs()) is not None:
        pytest.skip("the C++ extension clipfast._cpu is not built here")
    with pytest.raises(ValueError, match=r"backend='cpu' has no one-direction / hard-negative "
                                         r"loss yet; the backends with it are reference, "
                                         r"chunked, triton, hybrid, cuda \(and 'auto'\)"):
        dispatch.resolve_backend("cpu", _inputs(), ROWS)


def test_every_backend_has_the_row_loss():
    assert all(backend.has(ROWS) for backend in REGISTRY.values()), \
        [name for name, backend in REGISTRY.items() if not backend.has(ROWS)]


def test_cuda_row_loss_runs_where_its_features_are(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    if get("cuda").problem(_inputs()) is not None:
        pytest.skip("the CUDA emulation clipfast._cuda_emulated is not built here")
    assert dispatch.resolve_backend("cuda", _inputs(), ROWS) == "cuda"


def test_cpu_has_the_row_loss():
    if not cpu_backend.available():
        pytest.skip("the C++ extension clipfast._cpu is not built here")
    assert dispatch.resolve_backend("cpu", _inputs(), ROWS) == "cpu"


def test_the_backends_own_problem_comes_before_the_missing_loss():
    # float16 on cpu: the dtype error, before any question of the loss.
    if not cpu_backend.available():
        pytest.skip("the C++ extension clipfast._cpu is not built here")
    with pytest.raises(TypeError, match=r"backend='cpu' supports float32 and float64 features, "
                                        r"got image_features torch.float16"):
        dispatch.resolve_backend("cpu", _inputs(torch.float16), ROWS)


@pytest.mark.parametrize("picked,dtype,loss,expected", [
    ("cpu", torch.float32, ROWS, "cpu"),
    ("cpu", torch.float32, SIGLIP, "cpu"),
    ("cpu", torch.float32, "clip", "cpu"),
    ("cuda", torch.float32, ROWS, "cuda"),  # its row loss runs on Triton's row kernels
    ("cuda", torch.float32, BLOCKS, "triton"),  # where Triton runs (here: the interpreter)
    ("cuda", torch.float64, BLOCKS, "chunked"),  # Triton has no float64
    ("chunked", torch.float32, ROWS, "chunked"),
])
def test_auto_takes_the_stand_in_for_a_missing_loss(auto_picks, picked, dtype, loss, expected):
    if expected == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    auto_picks(picked)
    assert dispatch.resolve_backend("auto", _inputs(dtype), loss) == expected


@pytest.mark.parametrize("named,expected", [
    ("chunked", "chunked"), ("reference", "chunked"), ("cpu", "chunked"),
    ("triton", "triton"), ("cuda", "triton"),
])
def test_block_primitives_for_the_distributed_modes(monkeypatch, named, expected):
    if "triton" in (named, expected) and not triton_available():
        pytest.skip("triton is not installed")
    if named == "cpu" and not cpu_backend.available():
        pytest.skip("the C++ extension clipfast._cpu is not built here")
    # cuda runs CPU tensors only through its emulation; the stand-in question
    # is the same there as on a GPU.
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    inputs = _inputs()
    if named == "cuda" and get("cuda").problem(inputs) is not None:
        pytest.skip("the CUDA emulation extension is not built here")
    blocks = dispatch.block_backend(named, inputs)
    assert blocks.name == expected and blocks.has(BLOCKS)


def test_block_sizes_go_to_the_backend_that_takes_them():
    assert get("chunked").block(4096, 512) == 4096
    assert get("triton").block(4096, 512) == 512
    assert get("cpu").block(4096, 512) == 0
    assert get("chunked").block(None, None) == 0
    with pytest.raises(ValueError, match="chunk_elements must be a positive int, got 0"):
        get("chunked").block(0, None)
    with pytest.raises(ValueError, match="panel_size must be a positive int, got True"):
        get("triton").block(None, True)


def test_auto_never_picks_the_reference_or_an_emulation(monkeypatch):
    monkeypatch.setenv("CLIPFAST_CUDA_EMULATION", "1")
    usable = autoselect.usable_backends(torch.device("cpu"), (torch.float32, torch.float32))
    assert "reference" not in usable and "cuda" not in usable and "triton" not in usable
    assert "chunked" in usable


def test_importing_clipfast_loads_no_kernels():
    """The registry declares backends without loading them: no Triton kernel
    module and no compiled extension. (triton itself may be imported by torch's
    custom-op machinery; that is torch's, not ours.)"""
    import subprocess
    import sys

    code = ("import sys, clipfast; clipfast.clip_loss; "
            "print(sorted(m for m in sys.modules if m in ('clipfast._cpu', 'clipfast._cuda', "
            "'clipfast._cuda_emulated') or m.startswith('clipfast.backends.triton.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['clipfast.backends.triton._runtime']"


def test_clip_loss_dispatches_through_the_registry(monkeypatch):
    """A backend's declared entry point is what clip_loss runs."""
    calls = []
    chunked = get("chunked")
    original = type(chunked).clip_op

    def spy(self):
        calls.append(self.name)
        return original(self)

    monkeypatch.setattr(type(chunked), "clip_op", spy)
    x = torch.randn(5, 3)
    clipfast.clip_loss(x, x, 2.0, backend="chunked")
    assert calls == ["chunked"]
