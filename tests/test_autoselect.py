"""backend="auto": the choice table and the rule that reads it."""

import json

import pytest
import torch

import clipfast
import clipfast.model_table
from clipfast import autoselect
from clipfast.autoselect import choose, pick, show, table_from_results


def _point(device_type, device, dtype, n, d, **times):
    return {"device_type": device_type, "device": device, "dtype": dtype, "n": n, "d": d,
            "times_ms": times}


H100 = "NVIDIA H100 80GB HBM3"
POINTS = [
    _point("cuda", H100, "bf16", 4096, 512, triton=1.0, cuda=0.5, chunked=9.0),
    _point("cuda", H100, "bf16", 131072, 1024, triton=200.0, cuda=300.0, chunked=900.0),
    _point("cuda", H100, "fp32", 131072, 1024, triton=400.0, cuda=350.0),
    _point("cuda", "NVIDIA A100-SXM4-80GB", "bf16", 131072, 1024, triton=500.0, cuda=400.0),
    _point("cpu", "CPU (x86_64, 2 cores)", "fp32", 1024, 512, chunked=80.0, cpu=170.0),
]
ALL = ("triton", "cuda", "chunked", "cpu")


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """No test here reads the real per-user cache of python -m clipfast.check
    (tests/test_check.py tests it)."""
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path / "no-user-cache"))
    autoselect._choose_cached.cache_clear()
    yield
    autoselect._choose_cached.cache_clear()


@pytest.mark.parametrize("n,d,expected", [(4096, 512, "cuda"), (8192, 768, "cuda"),
                                          (65536, 1024, "triton"), (10**6, 1280, "triton")])
def test_pick_takes_the_fastest_at_the_nearest_shape(n, d, expected):
    assert pick(POINTS, "cuda", H100, "bf16", n, d, ALL) == expected


def test_pick_prefers_the_same_device_then_any_of_its_type():
    assert pick(POINTS, "cuda", "NVIDIA A100-SXM4-80GB", "bf16", 131072, 1024, ALL) == "cuda"
    # An unmeasured GPU takes the measurements of the others.
    assert pick(POINTS, "cuda", "NVIDIA L4", "bf16", 4096, 512, ALL) == "cuda"
    assert pick(POINTS, "cpu", "another CPU", "fp32", 2048, 512, ALL) == "chunked"


def test_pick_matches_dtype_and_pairs_the_half_types():
    assert pick(POINTS, "cuda", H100, "fp32", 131072, 1024, ALL) == "cuda"
    assert pick(POINTS, "cuda", H100, "fp16", 131072, 1024, ALL) == "triton"  # bf16 stands in


def test_pick_only_returns_usable_backends():
    assert pick(POINTS, "cuda", H100, "bf16", 4096, 512, ("triton", "chunked")) == "triton"
    assert pick(POINTS, "cuda", H100, "bf16", 4096, 512, ("chunked",)) == "chunked"
    assert pick(POINTS, "cuda", H100, "bf16", 4096, 512, ("cpu",)) is None
    assert pick([], "cuda", H100, "bf16", 4096, 512, ALL) is None
    assert pick(POINTS, "mps", "Apple", "fp32", 4096, 512, ALL) is None


def test_shipped_table_is_measured_and_cpu_picks_chunked():
    points = json.loads(autoselect.SHIPPED_TABLE.read_text())
    assert any(p["device_type"] == "cpu" for p in points)
    for p in points:
        assert set(p["times_ms"]) <= set(autoselect.CANDIDATES) and p["times_ms"]
    x = torch.randn(300, 64)
    assert choose(x, x) == "chunked"
    assert choose(x.double(), x.double()) == "chunked"


def test_override_table_takes_precedence(tmp_path, monkeypatch):
    table = tmp_path / "mine.json"
    x = torch.randn(300, 64)
    table.write_text(json.dumps([_point("cpu", "any", "fp32", 300, 64, chunked=5.0, cpu=1.0)]))
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(table))
    expected = "cpu" if clipfast.backends.cpu.available() else "chunked"
    assert choose(x, x) == expected
    inputs = clipfast._inputs.check_inputs(x, x, 1.0)
    assert clipfast.resolve_backend("auto", inputs) == expected
    # Half-precision CPU features cannot run on the C++ backend: chunked.
    assert choose(x.bfloat16(), x.bfloat16()) == "chunked"


def test_bad_override_table_is_a_value_error(tmp_path, monkeypatch):
    table = tmp_path / "bad.json"
    table.write_text(json.dumps({"not": "a list"}))
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(table))
    x = torch.randn(30, 8)
    with pytest.raises(ValueError, match="not a clipfast auto table"):
        choose(x, x)


@pytest.mark.parametrize("content,match", [
    ("[{", r"is not valid JSON \(.* at line 1, column"),
    (json.dumps([_point("cpu", "any", "fp32", 0, 64, chunked=1.0)]),
     r"entry 0 has n = 0; it must be a positive integer"),
    (json.dumps([_point("cpu", "any", "fp32", 8, 64, chunked=1.0), {"n": 3}]),
     r"entry 1 lacks device_type, device, dtype, d, times_ms"),
    (json.dumps([_point("cpu", "any", "fp32", 8, 64, chunked="fast")]),
     r"entry 0 has times_ms\['chunked'\] = 'fast'"),
    (json.dumps([dict(_point("cpu", "any", "fp32", 8, 64, chunked=1.0), d=2.5)]),
     r"entry 0 has d = 2.5"),
])
def test_malformed_override_tables_name_the_variable_the_file_and_the_entry(
        tmp_path, monkeypatch, content, match):
    # Not "math domain error" or a bare JSONDecodeError: the variable, the
    # file and what is wrong where.
    table = tmp_path / "bad.json"
    table.write_text(content)
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(table))
    x = torch.randn(30, 8)
    with pytest.raises(ValueError, match=rf"^CLIPFAST_AUTO_TABLE={table}: {table}.*{match}"):
        choose(x, x)


def test_a_missing_override_table_names_the_variable(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.json"
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(missing))
    x = torch.randn(30, 8)
    with pytest.raises(ValueError, match=rf"^CLIPFAST_AUTO_TABLE={missing}: No such file"):
        choose(x, x)


def test_auto_runs_the_chosen_backend(tmp_path, monkeypatch):
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps([_point("cpu", "any", "fp32", 97, 33, chunked=5.0, cpu=1.0)]))
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(table))
    x, y = torch.randn(97, 33), torch.randn(97, 33)
    expected = clipfast.clip_loss(x, y, 10.0, backend=choose(x, y))
    torch.testing.assert_close(clipfast.clip_loss(x, y, 10.0), expected, rtol=0, atol=0)


def test_table_from_results_and_show(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [{"meta": {"device": H100}}]
    for provider, t in [("reference", 3.0), ("triton", 2.0), ("cuda", 1.5), ("gemm4_bound", 1.0)]:
        rows.append({"provider": provider, "n": 4096, "d": 512, "dtype": "bf16", "device": "cuda",
                     "status": "ok", "time_ms": t, "peak_extra_bytes": 10})
    rows.append({"provider": "chunked", "n": 4096, "d": 512, "dtype": "bf16", "device": "cuda",
                 "status": "oom", "time_ms": None, "peak_extra_bytes": None})
    results.write_text("\n".join(json.dumps(r) for r in rows))
    points = table_from_results([results])
    assert points == [{"device_type": "cuda", "device": H100, "dtype": "bf16", "n": 4096, "d": 512,
                       "times_ms": {"triton": 2.0, "cuda": 1.5},
                       "peak_extra_bytes": {"triton": 10, "cuda": 10}}]
    assert "| cuda |" in show(points).splitlines()[2]
    out = tmp_path / "table.json"
    autoselect.main([str(results), "--out", str(out)])
    assert json.loads(out.read_text()) == points
    # --merge keeps the points the new results do not measure again.
    other = _point("cpu", "c", "fp32", 8, 8, chunked=1.0)
    out.write_text(json.dumps(points + [other]))
    autoselect.main([str(results), "--out", str(out), "--merge"])
    assert json.loads(out.read_text()) == [other] + points


def test_choice_is_logged_once_per_process_per_distinct_choice(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(autoselect, "_LOGGED", set())
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps([_point("cpu", "any", "fp32", 64, 16, chunked=1.0, cpu=5.0)]))
    monkeypatch.setenv("CLIPFAST_AUTO_TABLE", str(table))
    x = torch.randn(64, 16)
    with caplog.at_level("INFO", logger="clipfast"):
        for _ in range(3):
            clipfast.clip_loss(x, x, 10.0)
        clipfast.clip_loss(x[:50], x[:50], 10.0)  # another shape, same choice: silent
    records = [r for r in caplog.records if r.name == "clipfast"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert records[0].levelname == "INFO"
    assert "'chunked'" in message and "N=64, d=16" in message and "chunked 1.0 ms" in message
    assert str(table) in message
    # A different choice in the same process is logged, once, too.
    monkeypatch.setattr(autoselect, "explain", lambda *args: autoselect.Choice("cpu", "a test"))
    caplog.clear()
    with caplog.at_level("INFO", logger="clipfast"):
        assert choose(x, x) == "cpu" and choose(x, x) == "cpu"
    assert [r.getMessage() for r in caplog.records if r.name == "clipfast"] == [
        "backend='auto' chose 'cpu' for fp32 features on cpu (N=64, d=16): a test"]


def test_explain_gives_the_choice_and_its_reason_without_tensors(monkeypatch):
    monkeypatch.setattr(autoselect, "_tables", lambda override: ([], []))
    autoselect._choose_cached.cache_clear()
    try:
        choice = autoselect.explain("cpu", (torch.float32,), 1 << 20, 4096)
        assert choice.backend == "chunked"
        assert "static rule" in choice.reason
    finally:
        autoselect._choose_cached.cache_clear()


def test_cli_help_names_the_module(capsys):
    with pytest.raises(SystemExit) as exit_info:
        autoselect.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m clipfast.autoselect")


def test_table_from_results_skips_a_truncated_line(tmp_path):
    results = tmp_path / "results.jsonl"
    row = {"provider": "chunked", "n": 8, "d": 4, "dtype": "fp32", "device": "cpu",
           "status": "ok", "time_ms": 1.0, "peak_extra_bytes": 1}
    results.write_text(json.dumps({"meta": {"device": "c"}}) + "\n" + json.dumps(row) + "\n"
                       + json.dumps(row)[:20])
    assert [p["times_ms"] for p in table_from_results([results])] == [{"chunked": 1.0}]


def test_candidates_come_from_the_registry():
    assert set(autoselect.CANDIDATES) == set(clipfast.backends.REGISTRY) - {"reference"}
    assert "hybrid" in autoselect.CANDIDATES


GPU = torch.device("cuda", 0)
BF16 = (torch.bfloat16, torch.bfloat16)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device without a GPU: a name, native backends, no measurements."""
    monkeypatch.setattr(autoselect, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(autoselect, "usable_backends",
                        lambda device, dtypes: ["chunked", "triton", "hybrid", "cuda"])
    monkeypatch.setattr(autoselect, "_tables", lambda override: ([], []))
    calls = []

    def install(model):
        def model_ms(backend, n, d, dtype, loss="clip", memory_budget=None):
            calls.append((backend, n, d, dtype, loss, memory_budget))
            return model(backend)
        monkeypatch.setattr(clipfast.model_table, "model_ms", model_ms, raising=False)
        return calls

    return install


def test_cuda_without_measurements_takes_the_fastest_modelled_backend(fake_gpu):
    calls = fake_gpu({"triton": 20.0, "hybrid": 12.5, "cuda": 30.0}.get)
    choice = autoselect._choose_cached(GPU, BF16, 65536, 1024, None, None)
    assert choice.backend == "hybrid"
    assert "static H100 model" in choice.reason and "hybrid 12.5 ms" in choice.reason
    assert ("hybrid", 65536, 1024, "bf16", "clip", None) in calls
    assert {c[0] for c in calls} == {"chunked", "triton", "hybrid", "cuda"}


def test_a_measured_table_beats_the_model(fake_gpu, monkeypatch):
    fake_gpu(lambda backend: 1.0 if backend == "hybrid" else 50.0)
    measured = [_point("cuda", H100, "bf16", 65536, 1024, triton=10.0, hybrid=20.0)]
    monkeypatch.setattr(autoselect, "_tables", lambda override: ([], measured))
    choice = autoselect._choose_cached(GPU, BF16, 65536, 1024, None, None)
    assert choice.backend == "triton" and "the shipped table" in choice.reason


@pytest.mark.parametrize("model", [lambda backend: None, "raises"])
def test_without_a_model_answer_cuda_keeps_the_static_rule(fake_gpu, monkeypatch, model):
    if model == "raises":
        def boom(backend):
            raise RuntimeError("no SASS for this backend")
        fake_gpu(boom)
    else:
        fake_gpu(model)
    choice = autoselect._choose_cached(GPU, BF16, 65536, 1024, None, None)
    assert choice.backend == "triton" and "static rule" in choice.reason


def test_cpu_never_consults_the_model(monkeypatch):
    def model_ms(*args, **kwargs):
        raise AssertionError("the model is for CUDA only")
    monkeypatch.setattr(clipfast.model_table, "model_ms", model_ms, raising=False)
    monkeypatch.setattr(autoselect, "_tables", lambda override: ([], []))
    choice = autoselect.explain("cpu", (torch.float32,), 4096, 512)
    assert choice.backend == "chunked" and "static rule" in choice.reason
