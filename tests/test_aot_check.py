"""The ahead-of-time compile check (python -m clipfast.aot_check) fails on
broken kernels. CI runs the check itself on the real kernels through
scripts/aot_check.sh (scripts/test.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipfast import aot_check

REPO = Path(__file__).resolve().parent.parent


def _run_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "clipfast.aot_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_broken_kernels_fail_the_check(target):
    proc = _run_check("--targets", target, "--extra", "tests/aot/broken_kernels.py", "--only-extra")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    by_kernel = {line.split()[2]: line for line in fails}
    assert "Inconsistent return types" in by_kernel["_early_return_kernel"], out
    assert "spills" in by_kernel["_spilling_kernel"], out
    if target == "sm_90":  # sm_80's mma.sync path keeps fewer stages in shared memory
        assert "shared memory" in by_kernel["_shared_overflow_kernel"], out
    else:
        assert "_shared_overflow_kernel" in by_kernel, out
    assert "FP contraction on" in by_kernel["_forward_tiles_kernel"], out
    # Its first binary (K == 1) is clean; the second, same config, spills.
    assert "spills" in by_kernel["_spills_unless_one_kernel"], out
    assert "5 kernel configurations, 5 with problems" in out


def test_siglip_kernels_compile_without_spills(tmp_path):
    # clipfast.aot_check counts only the CLIP tile kernels as main-loop
    # kernels; as --extra scenarios the SigLIP ones are held to the same rule
    # (no spill, shared memory within the limit). bf16, with and without
    # normalisation: the configurations nearest the register limit.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CLIPFAST_AOT_SIGLIP_DTYPES"] = "bf16"
    out_json = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "-m", "clipfast.aot_check", "--targets", "sm_80,sm_90",
                           "--extra", "tests/aot/siglip_scenarios.py", "--only-extra",
                           "--json", str(out_json)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    import json

    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    tiles = [r for r in rows if r["kernel"] in ("_siglip_forward_kernel", "_siglip_grad_kernel")]
    assert {(r["kernel"], r["target"]) for r in tiles} == {
        (k, t) for k in ("_siglip_forward_kernel", "_siglip_grad_kernel") for t in ("sm_80", "sm_90")}
    for r in tiles:
        assert r["spill_bytes"] == 0 and not r["problems"], r
        # Forward and backward logits round alike only without contraction.
        assert "enable_fp_fusion=False" in r["config"], r


def test_interpreter_is_refused():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "clipfast.aot_check", "--no-cuda"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    128 bytes stack frame, 96 bytes spill stores, 64 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 35840 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5cleanPf' for 'sm_90'
ptxas info    : Function properties for _Z5cleanPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, 384 bytes cmem[0]
"""


def test_ptxas_report_is_read():
    assert aot_check._parse_ptxas(PTXAS_LOG) == [
        ("_Z6kernelPf", 255, 160, 35840), ("_Z5cleanPf", 30, 0, 0)]


def test_hybrid_kernels_are_in_the_gate(tmp_path):
    # The gate's own scenario list holds the hybrid panel loops, small and at
    # the production shapes, and holds their epilogues to "no spill".
    from clipfast.backends.hybrid import aot as hybrid_aot

    labels = [s.label for s in aot_check.gate_scenarios()]
    assert any(label.startswith("hybrid clip bf16 normalize") for label in labels)
    assert "hybrid clip bf16 N=131072 d=1024 all panels kept" in labels
    assert "hybrid siglip fp32 N=32768 d=512" in labels
    assert aot_check.NO_SPILL_KERNELS == set(hybrid_aot.EPILOGUE_KERNELS)
    # Compiled through the panel loops (bf16: CLIP, SigLIP, the rows-only
    # loss, kept panels) for both targets; every epilogue in the table, clean.
    out_json = tmp_path / "rows.jsonl"
    proc = _run_check("--targets", "sm_80,sm_90", "--scenarios",
                      r"^hybrid (clip|siglip|rows) bf16 (normalize=True|N=384|rectangular)",
                      "--json", str(out_json))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    import json

    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert {(r["kernel"], r["target"]) for r in rows if r["kernel"] in aot_check.NO_SPILL_KERNELS} \
        == {(k, t) for k in hybrid_aot.EPILOGUE_KERNELS for t in ("sm_80", "sm_90")}
    for r in rows:
        assert r["spill_bytes"] == 0 and not r["problems"], r
    configs = {r["config"] for r in rows if r["kernel"] == "_grad_panel_kernel"}
    for flag in ("IN_PLACE=True", "IN_PLACE=False", "LOSS=0", "LOSS=1",
                 "HAS_COL=False,HAS_DIAG=True,HAS_ROW=True"):  # the last: the rows-only loss
        assert any(flag in c for c in configs), (flag, configs)
