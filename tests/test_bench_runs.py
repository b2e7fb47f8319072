"""python -m clipfast.bench: one run never overwrites another, the table and
plot are rebuilt from every recorded row, a provider that cannot run here is
refused up front, and the plot's legend fits in the figure."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipfast import bench
from clipfast.devices import device_name

REPO = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--dims", "4", "--dtypes", "fp32", "--min-n", "4", "--max-n", "8",
        "--reps", "1"]


def _no_measuring(monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured despite the refusal"))


def test_a_second_run_into_a_used_folder_is_refused(tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    (tmp_path / "results.md").write_text("the first run's table")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--providers", "reference", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # One line naming the folder and both ways on.
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"argument --out: the folder {str(tmp_path)!r} is not empty (results.md)" in err
    assert "--resume" in err and "--overwrite" in err
    assert (tmp_path / "results.md").read_text() == "the first run's table"
    # And the two cannot be combined.
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--resume", "--overwrite", "--out", str(tmp_path)])
    assert "argument --overwrite: cannot be combined with --resume" in capsys.readouterr().err


def test_overwrite_starts_afresh_and_leaves_other_files(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"meta": {"device": "another machine"}}) + "\n")
    (tmp_path / "notes.txt").write_text("mine")
    points = bench.main([*TINY, "--providers", "reference", "--overwrite", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert "another machine" not in json.dumps(rows)
    assert len(rows) == 1 + len(points) == 3
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_failed_provider_never_erases_measured_points(tmp_path, monkeypatch):
    # The case: a second run whose only provider failed turned
    # results.md into a one-cell error table.
    bench.main([*TINY, "--providers", "reference,chunked", "--out", str(tmp_path)])
    real, plotted = bench.plot, []

    def broken(provider, loss="clip"):
        def step(x, y, s):
            raise RuntimeError("the kernel fell over")
        return step

    def recording_plot(points, path, title):
        plotted.extend((p.provider, p.n, p.status) for p in points)
        real(points, path, title)

    monkeypatch.setattr(bench, "make_step", broken)
    monkeypatch.setattr(bench, "plot", recording_plot)
    points = bench.main([*TINY, "--providers", "gemm4_bound", "--resume", "--out", str(tmp_path)])
    assert [p.status for p in points] == ["error: RuntimeError: the kernel fell over"] * 2
    table = (tmp_path / "results.md").read_text()
    assert "| reference | chunked | gemm4_bound | auto picks |" in table
    rows = [line for line in table.splitlines() if line.startswith("| fp32 | 4 |")]
    assert len(rows) == 2 and all(row.count(" ms, ") == 2 and "| error |" in row for row in rows), rows
    assert "the kernel fell over" in table
    assert {("reference", 4, "ok"), ("chunked", 8, "ok")} <= set(plotted)


def test_an_error_never_replaces_a_measured_point(tmp_path):
    meta = {"meta": {"device": "CPU (test)", "torch": "x"}}
    point = dict(provider="chunked", n=4, d=4, dtype="fp32", device="cpu", status="ok", time_ms=1.5,
                 peak_extra_bytes=0, grad_bytes=128, reps=1, times_ms=[1.5], loss="clip")
    error = dict(point, status="error: RuntimeError: flaky", time_ms=None, times_ms=[])
    bigger = dict(error, n=8)
    later_ok = dict(point, n=8, time_ms=2.5)
    lines = [meta, point, meta, error, bigger, meta, later_ok]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recorded = bench.recorded_points(tmp_path / "results.jsonl")[("CPU (test)", "clip")].points
    assert recorded[("chunked", "fp32", 4, 4)].time_ms == 1.5  # the error came later: ignored
    assert recorded[("chunked", "fp32", 4, 8)].time_ms == 2.5  # a measurement replaces an error
    table = bench.write_reports(tmp_path, "CPU (test)", "clip")
    assert "1.50 ms" in table and "2.50 ms" in table and "error" not in table


def test_a_provider_that_cannot_run_here_is_an_argument_error(tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    monkeypatch.delenv("CLIPFAST_CUDA_EMULATION", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--providers", "reference,cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --providers: 'cuda' cannot run fp32 on cpu here: backend='cuda' needs CUDA" in err
    assert not (tmp_path / "results.jsonl").exists()


def test_triton_on_a_cpu_machine_is_refused_with_the_reason(tmp_path):
    # A real command line without the test suite's TRITON_INTERPRET=1: the
    # Triton kernels cannot run on the CPU then (exit 0 with a table of
    # errors before).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "clipfast.bench", *TINY, "--providers", "triton",
                          "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert "argument --providers: 'triton' cannot run fp32 on cpu here" in run.stderr
    assert "needs CUDA tensors" in run.stderr and "TRITON_INTERPRET=1" in run.stderr
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize("dims", [(512,), (256, 512, 1024)], ids=["one-panel-column", "three"])
def test_the_legend_lies_within_the_saved_figure(dims):
    # Every provider at once: with one (dtype, d) the figure is 4.5 inches
    # wide and a four-column legend used to stick out at both sides.
    import matplotlib.pyplot as plt

    points = [bench.Point(p, n, d, "fp32", "cpu", "ok", time_ms=1.0 + n, peak_extra_bytes=n)
              for p in bench.PROVIDERS for d in dims for n in (4, 8)]
    fig = bench.figure(points, "clipfast CLIP benchmark on CPU (x86_64, 2 cores) (torch 2.13.0+cpu)")
    try:
        fig.savefig(io.BytesIO(), dpi=110, format="png")
        fig.canvas.draw()
        (legend,) = fig.legends
        box, page = legend.get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1, (box, page)
        assert page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
        assert len(legend.get_texts()) == len(bench.PROVIDERS)
        # Nor does it cover the panels' axis labels: it lies below them.
        lowest = min(ax.get_tightbbox().y0 for ax in fig.axes)
        assert box.y1 <= lowest + 1, (box, lowest)
    finally:
        plt.close(fig)


def test_results_record_the_machine(tmp_path):
    bench.main([*TINY, "--providers", "reference", "--max-n", "4", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["device"] == device_name(torch.device("cpu"))
    assert meta["torch"] == torch.__version__ and meta["cpu"] and meta["torch_threads"] >= 1
    assert meta["argv"][-2:] == ["--out", str(tmp_path)]
