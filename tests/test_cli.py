"""The command-line tools' shared pieces: atomic files and log-friendly progress."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipfast import _cli


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk gone"):
        with _cli.atomic_output(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left
    _cli.atomic_write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_unwritable_folder_explains_why(tmp_path):
    assert _cli.unwritable_folder(tmp_path / "a" / "b") is None
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("")
    assert "cannot create the folder" in _cli.unwritable_folder(tmp_path / "file")


def test_progress_off_a_terminal_prints_periodic_whole_lines():
    log = io.StringIO()  # not a terminal
    with _cli.progress(1000, "train", "step", file=log, interval=3600) as bar:
        for _ in range(1000):
            bar.set_postfix_str("loss=1.000")
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # The first step and the end; nothing in between within the interval.
    assert len(lines) == 2, lines
    assert lines[0].startswith("train:   0%") and "1/1000" in lines[0] and "loss=1.000" in lines[0]
    assert lines[1].startswith("train: 100%") and "1000/1000" in lines[1]

    log = io.StringIO()
    with _cli.progress(3, "bench", "pt", file=log, interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert len(log.getvalue().splitlines()) == 3


def test_progress_can_be_switched_off():
    with _cli.progress(3, "x", "it", enabled=False) as bar:
        assert bar is None


# ------------------------- one-line errors, folders ------------------------ #


def test_fail_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli.fail("python -m clipfast.x", "argument --out: taken")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "python -m clipfast.x: error: argument --out: taken\n"


def test_occupied_folder_names_the_folder_its_files_and_both_flags(tmp_path):
    assert _cli.occupied_folder(tmp_path / "missing", "give --resume") is None
    assert _cli.occupied_folder(tmp_path, "give --resume") is None  # empty
    for name in "abcdef":
        (tmp_path / name).write_text("")
    message = _cli.occupied_folder(tmp_path, "give --resume X to continue it")
    assert message.startswith(f"the folder {str(tmp_path)!r} is not empty (a, b, c, d and 2 more)")
    assert "give --resume X to continue it, --overwrite to replace its results, or another --out" in message


def test_atomic_bytes_and_the_temporary_files_a_killed_run_leaves(tmp_path):
    _cli.atomic_write_bytes(tmp_path / "checkpoint.pt", b"\x00\x01")
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"\x00\x01"
    (tmp_path / ".checkpoint.pt.4242.tmp").write_bytes(b"half")
    (tmp_path / ".other.pt.4242.tmp").write_bytes(b"not ours")
    assert [p.name for p in _cli.temporary_files(tmp_path, ["checkpoint.pt"])] == [".checkpoint.pt.4242.tmp"]


def test_environment_names_the_machine_and_versions():
    import torch

    env = _cli.environment(("torch", "numpy"))
    assert env["cpu"] == _cli.cpu_model() and env["cpu"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["numpy"] and env["python"] and env["cores"] >= 1


# ----------------------- --help answers without torch ---------------------- #

REPO = Path(__file__).resolve().parent.parent
CLIS = ("bench", "train", "check", "perfmodel", "aot_check")
HEAVY = ("torch", "triton", "matplotlib", "numpy", "sklearn")
# Runs ``python -m clipfast.<cli> ARGS`` with the package's folder as its
# path but without executing clipfast/__init__.py (which imports torch): what
# the tool modules themselves import before answering. Prints, last, which
# heavy modules got imported and the exit status.
_PROBE = r"""
import json, os, runpy, sys, types
package = types.ModuleType("clipfast")
package.__path__ = [os.path.join(sys.argv[1], "clipfast")]
sys.modules["clipfast"] = package
module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
code = 0
try:
    runpy.run_module("clipfast." + module, run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
heavy = [m for m in %r if m in sys.modules]
print("\nPROBE " + json.dumps({"heavy": heavy, "code": code}), flush=True)
""" % (HEAVY,)


def _fastest(command, env=None, runs=3):
    """(the fastest wall time of ``runs`` runs, the last run): the minimum,
    because other jobs on a busy machine only ever add time."""
    best, run = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        best = min(best, time.perf_counter() - start)
    return best, run


def _probe(cli, *args):
    seconds, run = _fastest([sys.executable, "-c", _PROBE, str(REPO), cli, *args])
    report = json.loads(run.stdout.rsplit("PROBE ", 1)[1])
    return seconds, run, report


@pytest.mark.parametrize("cli", CLIS)
def test_help_imports_nothing_heavy_and_answers_in_under_2_s(cli):
    seconds, run, report = _probe(cli, "--help")
    assert report["code"] in (0, None) and f"clipfast.{cli}" in run.stdout, run.stdout + run.stderr
    assert report["heavy"] == [], f"--help imported {report['heavy']}"
    assert seconds < 2.0, seconds


@pytest.mark.parametrize("cli,args,message", [
    ("bench", ["--min-n", "0"], "argument --min-n: must be >= 1"),
    ("bench", ["--providers", "magic"], "argument --providers: unknown provider 'magic'"),
    ("bench", ["--device", "tpu"], "argument --device: expected cpu, cuda"),
    ("train", ["--epochs", "0"], "argument --epochs: must be a positive integer"),
    ("train", ["--backend", "magic"], "argument --backend: invalid choice: 'magic'"),
    ("train", ["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
    ("train", ["--out", "{used}"], "argument --out: the folder"),
    ("bench", ["--out", "{used}"], "argument --out: the folder"),
])
def test_bad_arguments_answer_before_torch_is_imported(tmp_path, cli, args, message):
    (tmp_path / "result.json").write_text("an earlier run's")
    args = [a.replace("{used}", str(tmp_path)) for a in args]
    seconds, run, report = _probe(cli, *args)
    assert report["code"] == 2 and message in run.stderr, run.stderr
    assert report["heavy"] == [], f"the error imported {report['heavy']}"
    assert seconds < 2.0, seconds


@pytest.mark.parametrize("cli", CLIS)
def test_python_m_help_does_not_import_torch(cli):
    # The real command line, package import included (clipfast/__init__.py
    # imports its exports lazily, PEP 562).
    seconds, run = _fastest([sys.executable, "-X", "importtime", "-m", f"clipfast.{cli}", "--help"])
    assert run.returncode == 0, run.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert seconds < 2.0, seconds


# ------------------------- the distributed example ------------------------- #

EXAMPLE = REPO / "examples" / "distributed_clip.py"


def test_the_distributed_example_outside_torchrun_says_how_to_launch_it():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(EXAMPLE), "--mode", "gather"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "RANK, WORLD_SIZE" in run.stderr and "not set" in run.stderr
    assert f"launch it as: torchrun --nproc_per_node=2 {EXAMPLE} --mode gather" in run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    # Said before torch is imported: at once.
    assert time.perf_counter() - start < 10


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_clip_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_distributed_example_on_cuda_without_cuda_or_nccl_says_so(monkeypatch, capsys):
    import torch
    import torch.distributed as dist

    example = _example_module()
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29999").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("initialised"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert example.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "argument --device: cuda requested but CUDA is not available here" in err
    assert "use --device cpu (gloo)" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert example.main(["--device", "cuda"]) == 2
    assert "cuda needs NCCL, which this torch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--local-batch", "0"])
    assert exit_info.value.code == 2 and "argument --local-batch: must be >= 1" in capsys.readouterr().err
