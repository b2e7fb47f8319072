import json

import pytest
import torch

from clipfast import autoselect, bench
from clipfast.devices import device_name


def test_bench_writes_jsonl_table_and_plot(tmp_path):
    points = bench.main([
        "--device", "cpu", "--providers", "reference,chunked,gemm4_bound", "--dims", "8",
        "--dtypes", "fp32", "--min-n", "4", "--max-n", "16", "--reps", "2", "--out", str(tmp_path)])
    assert len(points) == 3 * 3
    assert all(p.status == "ok" and p.time_ms > 0 for p in points)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert "device" in json.loads(lines[0])["meta"]
    assert {json.loads(line)["n"] for line in lines[1:]} == {4, 8, 16}
    table = (tmp_path / "results.md").read_text()
    assert "CPU" in table and "| fp32 | 8 | 16 |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bench_records_out_of_memory_and_skips_larger_n(tmp_path, monkeypatch):
    real = bench.make_step

    def make_step(provider, loss="clip"):
        step = real(provider, loss)

        def maybe_oom(x, y, s):
            if provider == "chunked" and x.shape[0] >= 8:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1 TiB")
            return step(x, y, s)

        return maybe_oom

    monkeypatch.setattr(bench, "make_step", make_step)
    points = bench.main([
        "--device", "cpu", "--providers", "chunked,reference", "--dims", "4", "--dtypes", "fp32",
        "--min-n", "4", "--max-n", "16", "--reps", "1", "--out", str(tmp_path)])
    status = {(p.provider, p.n): p.status for p in points}
    assert status[("chunked", 4)] == "ok"
    assert status[("chunked", 8)] == "oom" and status[("chunked", 16)] == "oom"
    assert status[("reference", 16)] == "ok"
    assert "OOM" in (tmp_path / "results.md").read_text()


TINY = ["--device", "cpu", "--dims", "4", "--dtypes", "fp32", "--min-n", "4", "--max-n", "16",
        "--reps", "1"]


@pytest.mark.parametrize("args,option,message", [
    (["--providers", "magic"], "--providers", "unknown provider 'magic'"),
    (["--providers", ","], "--providers", "empty list"),
    (["--min-n", "0"], "--min-n", "must be >= 1"),
    (["--min-n", "-5"], "--min-n", "must be >= 1"),
    (["--min-n", "64", "--max-n", "8"], "--max-n", "must be >= --min-n"),
    (["--reps", "0"], "--reps", "must be >= 1"),
    (["--dims", "0"], "--dims", "positive integers"),
    (["--dims", "8,x"], "--dims", "positive integers"),
    (["--dtypes", "fp64"], "--dtypes", "unknown dtype 'fp64'"),
    (["--max-seconds", "0"], "--max-seconds", "positive"),
    (["--device", "tpu"], "--device", "expected cpu, cuda"),
    (["--device", "cuda:99"], "--device", "cuda:99"),
])
def test_bad_arguments_are_argparse_errors_naming_the_argument(tmp_path, capsys, monkeypatch,
                                                               args, option, message):
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured despite a bad argument"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and message in err, err


def test_cuda_device_without_cuda_is_an_argument_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --device: 'cuda' requested but CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_is_an_argument_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--providers", "reference", "--out", str(tmp_path / "file" / "sub")])
    assert exit_info.value.code == 2
    assert "argument --out: cannot create the folder" in capsys.readouterr().err


def test_interrupted_rerun_keeps_earlier_results_and_resume_measures_the_rest(tmp_path, monkeypatch,
                                                                              capsys):
    jsonl = tmp_path / "results.jsonl"
    sizes = [*TINY, "--max-n", "16"]  # N = 4, 8, 16
    first = bench.main([*sizes, "--providers", "reference", "--out", str(tmp_path)])
    before = jsonl.read_text()
    assert len(before.splitlines()) == 1 + len(first) == 4
    capsys.readouterr()

    real, calls = bench.measure, []

    def interrupted(provider, n, *args):
        calls.append((provider, n))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(provider, n, *args)

    monkeypatch.setattr(bench, "measure", interrupted)
    argv = [*sizes, "--providers", "reference,chunked", "--resume", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    # One line, no traceback: what is kept, where, and the command that continues.
    assert "Traceback" not in err
    assert (f"interrupted: the 2 points this run measured are kept in {jsonl} (5 points recorded "
            f"there in all); to measure the rest, run python -m clipfast.bench") in err
    assert err.rstrip().endswith("--resume --out " + str(tmp_path))
    after = jsonl.read_text()
    assert after.startswith(before)  # nothing earlier lost
    assert len(after.splitlines()) == 4 + 1 + 2  # a meta line and the two finished points
    assert calls[:2] == [("chunked", 4), ("chunked", 8)]  # reference's points were reused
    # The old table stays whole: no chunked column yet.
    assert "| reference | auto picks |" in (tmp_path / "results.md").read_text()

    calls.clear()
    points = bench.main(argv)
    # Everything the two runs measured is reused; only chunked at N = 16 is left.
    assert calls == [("chunked", 16)]
    assert len(points) == 6 and all(p.status == "ok" for p in points)
    assert jsonl.read_text().startswith(after)
    table = (tmp_path / "results.md").read_text()
    assert "| reference | chunked |" in table and table.count("| fp32 | 4 |") == 3


def test_resume_reuses_an_oom_and_skips_larger_n(tmp_path, monkeypatch):
    jsonl = tmp_path / "results.jsonl"
    meta = {"meta": {"device": device_name(torch.device("cpu"))}}
    oom = dict(provider="chunked", n=8, d=4, dtype="fp32", device="cpu", status="oom",
               time_ms=None, peak_extra_bytes=None, grad_bytes=256, reps=0, times_ms=[])
    # The earlier run was killed in the middle of a line.
    jsonl.write_text(json.dumps(meta) + "\n" + json.dumps(oom) + "\n" + json.dumps(oom)[:30])
    calls = []
    monkeypatch.setattr(bench, "measure", lambda p, n, d, dt, dev, *a: calls.append(n) or bench.Point(
        p, n, d, "fp32", str(dev), "ok", time_ms=1.0, peak_extra_bytes=1, reps=1))
    points = bench.main([*TINY, "--providers", "chunked", "--resume", "--out", str(tmp_path)])
    assert calls == [4]
    assert [p.status for p in points] == ["ok", "oom", "oom"]
    lines = jsonl.read_text().splitlines()
    assert lines[2] == json.dumps(oom)[:30]  # the partial line stays on its own line
    assert [json.loads(line)["n"] for line in lines[4:]] == [4, 16]


def test_error_reasons_are_printed_under_the_table(tmp_path, monkeypatch, capsys):
    real = bench.make_step

    def make_step(provider, loss="clip"):
        if provider == "chunked":
            def broken(x, y, s):
                raise RuntimeError("kernel exploded at this shape")
            return broken
        return real(provider, loss)

    monkeypatch.setattr(bench, "make_step", make_step)
    bench.main([*TINY, "--providers", "reference,chunked", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    table, _, errors = captured.out.partition("Errors:")
    assert "| error |" in table
    assert "`chunked`, fp32, d = 4, N = 4 (and larger N): RuntimeError: kernel exploded at this shape" in errors
    assert "kernel exploded" in (tmp_path / "results.md").read_text()
    # Progress off a terminal: short whole lines, no carriage returns.
    assert "\r" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("bench:")]
    assert lines and lines[-1].startswith("bench: 100%") and "6/6" in lines[-1]
    assert max(len(line) for line in lines) < 200


def test_table_shows_what_auto_picks():
    point = bench.Point("chunked", 256, 512, "fp32", "cpu", "ok", time_ms=1.0, peak_extra_bytes=0)
    table = bench.markdown_table([point], "t")
    header, _, row = table.splitlines()[4:7]
    assert header.endswith("| auto picks |")
    expected = autoselect.explain("cpu", (torch.float32,), 256, 512).backend
    assert row.endswith(f"| {expected} |")


def test_plot_has_one_legend_for_every_panel():
    points = [bench.Point(p, n, d, "fp32", "cpu", "ok", time_ms=1.0 + n, peak_extra_bytes=n)
              for p in ("reference", "chunked", "gemm4_bound") for d in (4, 8) for n in (4, 8)]
    fig = bench.figure(points, "t")
    try:
        assert all(ax.get_legend() is None for ax in fig.axes)
        assert len(fig.legends) == 1
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["reference", "chunked", "gemm4_bound"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_siglip_loss_is_measured_and_labelled(tmp_path):
    points = bench.main([*TINY, "--loss", "siglip", "--providers", "reference,chunked",
                         "--out", str(tmp_path)])
    assert points and all(p.loss == "siglip" and p.status == "ok" for p in points)
    assert "SigLIP benchmark" in (tmp_path / "results.md").read_text()
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {row["loss"] for row in lines if "meta" not in row} == {"siglip"}
    # --resume keys on the loss: CLIP points are not taken for SigLIP ones.
    again = bench.main([*TINY, "--providers", "reference", "--resume", "--out", str(tmp_path)])
    assert again and all(p.loss == "clip" and p.status == "ok" for p in again)
    # Each loss keeps its table (rebuilt from the recorded rows) and its plot.
    table = (tmp_path / "results.md").read_text()
    assert table.index("CLIP benchmark") < table.index("SigLIP benchmark")
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "results_siglip.png").stat().st_size > 1000


def test_bad_loss_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--loss", "sigmoid"])
    assert exit_info.value.code == 2 and "--loss" in capsys.readouterr().err
