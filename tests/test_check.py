"""python -m clipfast.check: the environment, the accuracy lines, the timing
table and the per-user cache that backend="auto" reads first."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clipfast
from clipfast import autoselect, check
from clipfast.backends import REGISTRY
from clipfast.devices import device_name

ROOT = Path(__file__).resolve().parents[1]
CPU_NAME = device_name(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test gets an empty per-user cache of its own (never the real one)."""
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPFAST_AUTO_TABLE", raising=False)
    autoselect._choose_cached.cache_clear()
    yield
    autoselect._choose_cached.cache_clear()


def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_help_is_parsed_before_anything_runs(capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--help"])
    assert exit_info.value.code == 0
    assert time.perf_counter() - start < 2.0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m clipfast.check")
    for option in ("--quick", "--json", "--out"):
        assert option in out


def test_help_from_the_command_line_is_quick():
    # Most of this is importing clipfast (torch, triton); nothing is checked.
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipfast.check", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m clipfast.check" in done.stdout
    assert time.perf_counter() - start < 60


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--backends", "nope"])
    assert exit_info.value.code == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_quick_json_run_passes_and_writes_the_cache(tmp_path):
    cache = tmp_path / "user-cache"
    out = tmp_path / "out"
    env = dict(os.environ, CLIPFAST_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("CLIPFAST_AUTO_TABLE", None)
    # Unset, so that without a GPU the check switches the interpreter on itself.
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "clipfast.check", "--quick", "--json",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    records = _records(done.stdout)  # every stdout line is one JSON object
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "env" and kinds[-1] == "summary"
    env_record = records[0]
    for key in ("python", "torch", "triton", "gpu", "compute_capability",
                "cuda_matmul_allow_tf32", "float32_matmul_precision", "extension_cpu",
                "extension_cuda"):
        assert key in env_record
    if not torch.cuda.is_available():
        assert env_record["gpu"] == "no GPU"
        assert "set by clipfast.check" in env_record["triton_kernels"]
    accuracy = [r for r in records if r["kind"] == "accuracy"]
    assert not [r for r in accuracy if r["status"] == "FAIL"]
    for backend in ("reference", "chunked", "hybrid"):
        passed = {(r["loss"], r["dtype"]) for r in accuracy
                  if r["backend"] == backend and r["status"] == "PASS"}
        assert passed == {(loss, dt) for loss in check.LOSSES for dt in check.ACCURACY_DTYPES}, \
            backend
    if not torch.cuda.is_available():
        refusals = [r for r in accuracy if r["backend"] == "triton" and r["dtype"] == "bf16"]
        assert refusals and all(r["status"] == "SKIP" and "interpreter" in r["reason"]
                                for r in refusals)
    # Each timed provider has a time or a stated reason.
    timing = [r for r in records if r["kind"] == "timing"]
    assert {"eager", "gemm4_bound", "chunked"} <= {r["provider"] for r in timing}
    for r in timing:
        assert (r["status"] == "skip" and r["reason"] or r["status"] == "ok" and r["time_ms"] > 0
                or r["status"] == "oom"), r
    assert records[-1]["failed"] == 0 and records[-1]["exit_status"] == 0
    # The cache: auto-table points of this device, read back by auto.
    points = autoselect._load(cache / "auto_table.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert points and all(p["device"] == device_name(device) for p in points)
    assert all(set(p["times_ms"]) <= set(autoselect.CANDIDATES) for p in points)
    assert json.loads((out / "auto_table.json").read_text()) == points
    assert (out / "check.txt").read_text().count("PASS") == sum(
        r["status"] == "PASS" for r in accuracy)
    assert _records((out / "check.jsonl").read_text()) == records
    auto = [r for r in records if r["kind"] == "auto"]
    assert auto and all("python -m clipfast.check" in r["reason"] for r in auto)


class _Broken(type(REGISTRY["chunked"])):
    """chunked with its CLIP loss 25% off and its SigLIP loss raising."""

    def clip_op(self):
        op = super().clip_op()
        return lambda *args: op(*args) * 1.25

    def siglip_ops(self):
        def broken(*args):
            raise RuntimeError("a broken kernel")
        return {True: broken, False: broken}


def test_a_fail_makes_the_exit_status_nonzero(monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "chunked", _Broken())
    status = check.main(["--quick", "--json", "--skip-timing", "--backends", "reference,chunked"])
    assert status == 1
    records = _records(capsys.readouterr().out)
    accuracy = [r for r in records if r["kind"] == "accuracy"]
    assert {r["status"] for r in accuracy if r["backend"] == "reference"} == {"PASS"}
    chunked = [r for r in accuracy if r["backend"] == "chunked"]
    assert chunked and {r["status"] for r in chunked} == {"FAIL"}
    assert any("a broken kernel" in p for r in chunked if r["loss"] == "siglip"
               for p in r["problems"])
    assert any("error" in p and "allowed" in p for r in chunked if r["loss"] == "clip"
               for p in r["problems"])
    assert records[-1]["exit_status"] == 1 and records[-1]["failed"] == len(chunked)


def test_text_report_has_one_line_per_case(capsys, tmp_path):
    status = check.main(["--skip-timing", "--backends", "reference,cpu", "--out",
                         str(tmp_path / "out")])
    assert status == 0
    out = capsys.readouterr().out
    assert out.startswith("== environment")
    assert "no GPU" in out or torch.cuda.is_available()
    assert out.count("PASS  reference") == len(check.LOSSES) * 2 * len(check.ACCURACY_DTYPES)
    if clipfast.backends.cpu.available() and not torch.cuda.is_available():
        assert out.count("PASS  cpu") == len(check.LOSSES) * 2  # fp32 only
        assert "SKIP  cpu       fp16 (4 cases): backend='cpu' supports float32" in out
    assert (tmp_path / "out" / "check.txt").read_text().startswith("== environment")
    assert not (tmp_path / "out" / "auto_table.json").exists()  # nothing timed


def test_rule_check_bounds_the_error_by_the_same_dtype_reference():
    x, y = check._features(40, 16, "cpu")
    s, b = torch.tensor(14.3), None
    fn = check._loss_fn("clip", "reference")
    truth = check.loss_and_grads(fn, x.double(), y.double(), s.double(), None)
    same = check.loss_and_grads(fn, x, y, s, b)
    kwargs = dict(scale=14.3, bias=None, normalize=True, dtype="fp32")
    problems, used, _ = check.rule_check(same, truth, same, x, y, **kwargs)
    assert not problems and used <= 0.5
    off = dict(same, grad_text=same["grad_text"] * 1.001)
    problems, used, key = check.rule_check(off, truth, same, x, y, **kwargs)
    assert key == "grad_text" and used > 1
    assert len(problems) == 1 and problems[0].startswith("grad_text error")
    nan = dict(same, loss=torch.tensor(float("nan")))
    assert check.rule_check(nan, truth, same, x, y, **kwargs)[0] == ["loss is not finite"]


def _point(device, n, d, **times):
    return {"device_type": "cpu", "device": device, "dtype": "fp32", "n": n, "d": d,
            "times_ms": times}


def test_write_cache_merges_by_point(tmp_path):
    first = check.write_cache([_point(CPU_NAME, 256, 64, chunked=2.0),
                               _point(CPU_NAME, 512, 64, chunked=3.0)])
    assert first == tmp_path / "cache" / "auto_table.json"
    check.write_cache([_point(CPU_NAME, 512, 64, chunked=1.0, cpu=4.0)])
    points = autoselect._load(first)
    assert [(p["n"], p["times_ms"]) for p in points] == [
        (256, {"chunked": 2.0}), (512, {"chunked": 1.0, "cpu": 4.0})]


def test_auto_prefers_the_cache_over_the_shipped_table(monkeypatch, tmp_path):
    x = torch.randn(300, 64)
    shipped = autoselect.explain("cpu", (torch.float32,), 300, 64)
    assert shipped.backend == "chunked" and "the shipped table" in shipped.reason
    # This process writes the cache: the next call reads it (no restart needed).
    path = check.write_cache([_point(CPU_NAME, 300, 64, chunked=5.0, cpu=1.0)])
    choice = autoselect.explain("cpu", (torch.float32,), 300, 64)
    assert "python -m clipfast.check" in choice.reason and str(path) in choice.reason
    expected = "cpu" if clipfast.backends.cpu.available() else "chunked"
    assert choice.backend == expected
    assert autoselect.choose(x, x) == expected
    # CLIPFAST_AUTO_TABLE, named by the user, still comes first.
    table = tmp_path / "mine.json"
    table.write_text(json.dumps([_point("any", 300, 64, chunked=1.0, cpu=5.0)]))
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(table))
    assert autoselect.choose(x, x) == "chunked"
    assert str(table) in autoselect.explain("cpu", (torch.float32,), 300, 64).reason


def test_auto_ignores_cached_points_of_other_machines_and_a_broken_cache(caplog):
    check.write_cache([_point("CPU (some other machine)", 300, 64, chunked=5.0, cpu=1.0)])
    assert "the shipped table" in autoselect.explain("cpu", (torch.float32,), 300, 64).reason
    path = autoselect.cache_path()
    path.write_text("{not json")
    with caplog.at_level("WARNING", logger="clipfast"):
        choice = autoselect.explain("cpu", (torch.float32,), 300, 64)
    assert choice.backend == "chunked" and "the shipped table" in choice.reason
    assert any("ignoring the measured table" in r.getMessage() for r in caplog.records)


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path / "a"))
    assert autoselect.cache_path() == tmp_path / "a" / "auto_table.json"
    monkeypatch.delenv("CLIPFAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autoselect.cache_path() == tmp_path / "xdg" / "clipfast" / "auto_table.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autoselect.cache_path() == tmp_path / "home" / ".cache" / "clipfast" / "auto_table.json"
