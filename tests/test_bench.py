import json

import pytest
import torch

from clipfast import bench


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

    def make_step(provider):
        step = real(provider)

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


def test_bench_rejects_unknown_provider(tmp_path):
    with pytest.raises(SystemExit, match="unknown provider"):
        bench.main(["--device", "cpu", "--providers", "magic", "--out", str(tmp_path)])


def test_peak_memory_sees_an_allocation():
    memory = bench.PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    peak = memory.peak()
    del block
    assert peak >= 60 << 20
