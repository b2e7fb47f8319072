"""The static performance model (python -m clipfast.perfmodel): its SASS
reading on a hand-written listing, and the whole model on a small shape."""

import os
import re
import subprocess
import sys
from pathlib import Path

from clipfast import perfmodel

REPO = Path(__file__).resolve().parent.parent

# A tile loop (.L_x_1 .. BRA .L_x_1) around a matmul loop (.L_x_2), with an
# edge-tile region (@P1 BRA .L_x_3) of 70 instructions that interior tiles skip.
_EDGE = "\n".join(f"        /*{0x500 + 16 * i:04x}*/                   FSEL R{i}, R{i}, -INF, P2 ;"
                  for i in range(70))
SASS = f"""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IMAD R2, R3, R4, RZ ;
.L_x_2:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0050*/              @!P0 BRA `(.L_x_2) ;
        /*0060*/                   FMUL R7, R24, R8 ;
        /*0070*/                   MUFU.EX2 R9, R7 ;
        /*0080*/               @P1 BRA `(.L_x_3) ;
{_EDGE}
.L_x_3:
        /*0a00*/                   FADD R10, R9, R10 ;
        /*0a10*/               @P3 BRA `(.L_x_1) ;
        /*0a20*/                   EXIT ;
"""


def test_sass_profile_separates_main_loop_epilogue_and_edge_path():
    prof = perfmodel.profile_sass(SASS)
    assert prof.has_tile_loop
    assert prof.loop_instrs == 4 and prof.loop_mma == 2
    # IMAD, FMUL, MUFU, the guarded BRA, FADD and the loop's BRA.
    assert prof.epilogue_instrs == 6
    assert prof.epilogue_mufu == 1
    assert prof.rare_instrs == 70


def test_model_runs_and_never_beats_the_gemm_rate():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "clipfast.perfmodel", "--shapes", "8192x256", "--breakdown", ""],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith("| bf16 | 8192 | 256 |")]
    assert len(row) == 1, proc.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    forward, backward, total = (float(c) for c in cells[3:6])
    bound = float(re.match(r"[\d.]+", cells[6]).group())
    assert forward > 0 and backward > 0 and abs(forward + backward - total) < 0.11
    # Four GEMM-equivalents at cuBLAS's rate is a floor no tile schedule beats.
    assert total >= bound


def test_siglip_model_runs_and_never_beats_the_gemm_rate():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "clipfast.perfmodel", "--loss", "siglip", "--shapes", "8192x256",
         "--breakdown", "8192x256"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SigLIP loss" in proc.stdout and "not a measurement" in proc.stdout
    row = [line for line in proc.stdout.splitlines() if line.startswith("| bf16 | 8192 | 256 |")]
    assert len(row) == 1, proc.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    forward, backward, total = (float(c) for c in cells[3:6])
    bound = float(re.match(r"[\d.]+", cells[6]).group())
    assert forward > 0 and backward > 0 and total >= bound
    # The breakdown names the SigLIP kernels, each modelled as a tile kernel.
    for kernel in ("_siglip_forward_kernel", "_siglip_grad_kernel", "_panel_grads_kernel"):
        assert re.search(rf"\| {kernel} \|.*\| \d+x\d+x\d+ \|", proc.stdout), kernel


def test_siglip_model_is_triton_only():
    proc = subprocess.run([sys.executable, "-m", "clipfast.perfmodel", "--loss", "siglip",
                           "--backend", "cuda"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--loss siglip" in proc.stderr


def test_bad_shapes_are_refused():
    proc = subprocess.run([sys.executable, "-m", "clipfast.perfmodel", "--shapes", "0x512"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--shapes" in proc.stderr
