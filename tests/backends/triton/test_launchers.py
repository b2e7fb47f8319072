"""The launchers' tile choice for the compiled (GPU) path, without running a
kernel: rows Triton cannot load 16 bytes at a time get narrower tiles (the
128-row ones spill there: ``python -m clipfast.aot_check``), and the forward
and the backward of one call always agree on the tile grid."""

import pytest
import torch

pytest.importorskip("triton")

from clipfast.backends.triton import launchers  # noqa: E402


def _rows(n, d, dtype=torch.float16):
    return torch.zeros(n, d, dtype=dtype)


def test_aligned_rows():
    assert launchers._rows_are_aligned(_rows(64, 64), _rows(32, 128))


@pytest.mark.parametrize("case", ["d=100", "sliced columns", "odd row stride", "transposed"])
def test_unaligned_rows(case):
    wide = _rows(64, 129)
    x = {
        "d=100": _rows(64, 100),
        "sliced columns": wide[:, 1:],       # base pointer 2 bytes in, stride 129
        "odd row stride": wide[:, :64],      # aligned base, row stride 129
        "transposed": _rows(64, 64).t(),     # column stride 64
    }[case]
    assert not launchers._rows_are_aligned(_rows(64, 64), x)
    assert not launchers._rows_are_aligned(x, _rows(64, 64))


@pytest.fixture
def compiled_path(monkeypatch):
    # The GPU's configs, not the interpreter's small tiles: nothing launches.
    monkeypatch.setattr(launchers, "interpreter_active", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_unaligned_rows_get_narrow_tiles(compiled_path, dtype):
    aligned = _rows(256, 128, dtype)
    unaligned = _rows(256, 100, dtype)
    for config in (launchers._tile_config, launchers._forward_config):
        _, _, _, wide = launchers._kernel_choice(aligned, aligned, True, config)
        _, _, _, narrow = launchers._kernel_choice(unaligned, unaligned, True, config)
        assert wide["BLOCK_M"] == 128, wide
        assert narrow["BLOCK_M"] <= 64 and narrow["BLOCK_N"] <= 64, narrow
        # Only the tile sides change: the same K order, so the same rounding.
        assert {k: v for k, v in narrow.items() if k not in ("BLOCK_M", "BLOCK_N")} == \
            {k: v for k, v in wide.items() if k not in ("BLOCK_M", "BLOCK_N")}
    plan = launchers._panel_plan(unaligned, unaligned, True, True, None, launchers._tile_config)
    assert plan.mm_cfg["BLOCK_D"] <= 64, plan.mm_cfg


def test_forward_and_backward_share_the_tile_grid(compiled_path):
    # The backward recomputes the forward's logits bit for bit only on the
    # same tiles: both take the grid from _kernel_choice on the same tensors.
    for x in (_rows(256, 128), _rows(256, 100), _rows(256, 129)[:, 1:]):
        _, _, _, forward = launchers._kernel_choice(x, x, True, launchers._tile_config)
        plan = launchers._panel_plan(x, x, True, True, None, launchers._tile_config)
        assert plan.cfg == forward


@pytest.mark.parametrize("n", [128, 256, 384, 1000])
def test_panel_side_for_tiles_narrower_than_the_products(compiled_path, n):
    # Exact fp32 (64-wide tiles, 128-row products) at small N once divided by
    # zero choosing the panel side on a GPU (a candidate of 64 gave the
    # products "0 programs").
    x = _rows(n, 64, torch.float32)
    plan = launchers._panel_plan(x, x, True, False, None, launchers._tile_config)
    tile = max(plan.cfg["BLOCK_M"], plan.cfg["BLOCK_N"])
    assert plan.precision == "ieee" and tile == 64
    assert plan.side % tile == 0 and tile <= plan.side <= max(tile, -(-n // 2) + tile)
