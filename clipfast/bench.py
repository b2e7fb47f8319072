"""Speed and memory benchmark: ``python -m clipfast.bench``.

For every provider, dtype and embedding dim, N doubles until the provider runs
out of memory (recorded, not fatal) or ``--max-n`` is reached. Each point is
the median wall time of forward+backward (features, scale) and the peak extra
memory above the inputs: CUDA allocator peak on GPUs, the process's peak RSS
(VmHWM, reset per point) on CPU. Results go to ``--out`` as JSON lines, a
markdown table headed with the device name, and a PNG plot.

Providers:
  reference    plain PyTorch (N x N logits), eager
  compile      the same function under torch.compile
  chunked      clipfast's PyTorch chunked backend
  triton       clipfast's fused Triton kernels (CUDA; or interpreter, slow)
  cuda         clipfast's CUDA C++ backend
  cpu          clipfast's C++ CPU backend (OpenMP)
  gemm4_bound  four N x d x N matmuls (cuBLAS / CPU BLAS): the work floor
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .api import clip_loss
from .reference import reference_clip_loss

PROVIDERS = ("reference", "compile", "chunked", "triton", "cuda", "cpu", "gemm4_bound")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Point:
    provider: str
    n: int
    d: int
    dtype: str
    device: str
    status: str  # "ok", "oom" or "error: ..."
    time_ms: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    grad_bytes: int = 0
    reps: int = 0
    times_ms: List[float] = field(default_factory=list)


# ------------------------------ device helpers ------------------------------ #


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _set_glibc_thresholds(mmap_threshold: int) -> None:
    """Set glibc's mmap and trim thresholds (fixed, no longer adaptive).

    With a low threshold every large block is its own mmap, returned to the OS
    when freed, so peak RSS reflects what a step needed and not the allocator's
    history; page faults make that slow, so timing runs use a high one.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, mmap_threshold)
        libc.mallopt(m_trim_threshold, mmap_threshold)
        libc.malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak bytes allocated above the level at ``start()``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _set_glibc_thresholds(1 << 16)
            # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _read_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = _read_status_kib("VmHWM") * 1024 - self.base
        _set_glibc_thresholds(32 << 20)
        return peak


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError)


# ------------------------------- providers --------------------------------- #


def _loss_step(fn: Callable) -> Callable:
    def step(x, y, scale):
        x.grad = y.grad = scale.grad = None
        fn(x, y, scale).backward()

    return step


_COMPILED: Dict[str, Callable] = {}


def make_step(provider: str) -> Callable:
    if provider == "reference":
        return _loss_step(lambda x, y, s: reference_clip_loss(x, y, s))
    if provider == "compile":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(reference_clip_loss, dynamic=True)
        compiled = _COMPILED["fn"]
        return _loss_step(lambda x, y, s: compiled(x, y, s))
    if provider in ("chunked", "triton", "cuda", "cpu"):
        return _loss_step(lambda x, y, s: clip_loss(x, y, s, backend=provider))
    if provider == "gemm4_bound":
        return _gemm4_step
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _gemm4_step(x, y, scale):
    """Four N x d x N matmuls, computed in row chunks so N x N never exists.

    Chunks of 8192 rows keep every product large enough to run at the BLAS's
    full speed; the results are discarded.
    """
    n = x.shape[0]
    rows = min(n, 8192)
    with torch.no_grad():
        for _ in range(4):
            for start in range(0, n, rows):
                torch.mm(x[start:start + rows], y.t())


def measure(provider: str, n: int, d: int, dtype: torch.dtype, device: torch.device,
            reps: int, max_seconds: float) -> Point:
    name = {v: k for k, v in _DTYPES.items()}[dtype]
    point = Point(provider, n, d, name, str(device), "ok")
    point.grad_bytes = 2 * n * d * torch.tensor([], dtype=dtype).element_size()
    step = make_step(provider)
    x = y = scale = None
    try:
        gen = torch.Generator(device="cpu").manual_seed(n + d)
        x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        y = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        scale = torch.tensor(math.log(1 / 0.07), device=device).exp().detach().requires_grad_()
        memory = PeakMemory(device)
        memory.start()
        start = time.perf_counter()
        step(x, y, scale)  # warm-up (and compilation)
        _sync(device)
        point.peak_extra_bytes = memory.peak()
        warm_seconds = time.perf_counter() - start
        times = []
        deadline = time.perf_counter() + max_seconds
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            step(x, y, scale)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > deadline and len(times) >= 1:
                break
        if not times:
            times = [warm_seconds * 1e3]
        point.times_ms = times
        point.reps = len(times)
        point.time_ms = statistics.median(times)
    except Exception as err:  # noqa: BLE001 - an OOM must not end the sweep
        point.status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {str(err)[:200]}"
    finally:
        del x, y, scale
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return point


# ------------------------------ reporting ---------------------------------- #


def _fmt_point(p: Optional[Point]) -> str:
    if p is None:
        return "-"
    if p.status == "oom":
        return "OOM"
    if p.status != "ok":
        return "error"
    mem = p.peak_extra_bytes / 2**30 if p.peak_extra_bytes is not None else float("nan")
    if p.provider == "gemm4_bound":
        return f"{p.time_ms:.2f} ms"
    return f"{p.time_ms:.2f} ms, {mem:.3f} GiB"


def markdown_table(points: List[Point], title: str) -> str:
    providers = [p for p in PROVIDERS if any(q.provider == p for q in points)]
    keys = sorted({(q.dtype, q.d, q.n) for q in points})
    index = {(q.dtype, q.d, q.n, q.provider): q for q in points}
    lines = [
        f"### {title}",
        "",
        "Forward+backward, median time and peak extra memory above the inputs "
        "(the input gradients included; their size is the `grads` column).",
        "",
        "| dtype | d | N | grads | " + " | ".join(providers) + " |",
        "|---|---|---|---|" + "---|" * len(providers),
    ]
    for dtype, d, n in keys:
        grad_bytes = next(q.grad_bytes for q in points if (q.dtype, q.d, q.n) == (dtype, d, n))
        cells = [_fmt_point(index.get((dtype, d, n, p))) for p in providers]
        lines.append(f"| {dtype} | {d} | {n} | {grad_bytes / 2**30:.3f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(points: List[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(q.dtype, q.d) for q in points})
    fig, axes = plt.subplots(2, len(combos), figsize=(4.5 * len(combos), 7.5), squeeze=False)
    for col, (dtype, d) in enumerate(combos):
        for provider in PROVIDERS:
            pts = sorted((q for q in points if q.provider == provider and q.dtype == dtype
                          and q.d == d and q.status == "ok"), key=lambda q: q.n)
            if not pts:
                continue
            ns = [q.n for q in pts]
            axes[0][col].plot(ns, [q.time_ms for q in pts], marker="o", label=provider)
            if provider != "gemm4_bound":
                axes[1][col].plot(ns, [q.peak_extra_bytes / 2**30 for q in pts], marker="o", label=provider)
        for row, ylabel in enumerate(["time (ms)", "peak extra memory (GiB)"]):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch size)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{dtype}, d={d}")
        axes[0][col].legend(fontsize=8)
    fig.suptitle(title.replace(" on ", "\n", 1), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------- CLI ------------------------------------ #


def _defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(providers="reference,compile,chunked,triton,cuda,gemm4_bound", dims="512,768,1024",
                    dtypes="bf16,fp32", min_n=4096, max_n=1 << 20, reps=5)
    return dict(providers="reference,compile,chunked,cpu,gemm4_bound", dims="512", dtypes="fp32",
                min_n=256, max_n=8192, reps=3)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clipfast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--providers", help=f"comma list from {','.join(PROVIDERS)}")
    parser.add_argument("--dims", help="comma list of embedding dims")
    parser.add_argument("--dtypes", help="comma list from fp32,bf16,fp16")
    parser.add_argument("--min-n", type=int, help="smallest N (doubles up to --max-n)")
    parser.add_argument("--max-n", type=int, help="largest N")
    parser.add_argument("--reps", type=int, help="timed repetitions per point (median reported)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop repeating a point after this long (default 20)")
    parser.add_argument("--out", default="bench_results", help="output folder (default bench_results)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = _defaults(torch.device(args.device))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> List[Point]:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device(args.device)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {PROVIDERS}")
    dims = [int(v) for v in args.dims.split(",")]
    dtypes = [_DTYPES[v.strip()] for v in args.dtypes.split(",")]
    ns = []
    n = args.min_n
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    meta = dict(device=name, torch=torch.__version__, python=sys.version.split()[0])
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass

    jobs = [(dt, d, p) for dt in dtypes for d in dims for p in providers]
    points: List[Point] = []
    jsonl = out / "results.jsonl"
    with open(jsonl, "w") as f, tqdm(total=len(jobs) * len(ns), desc="bench", unit="pt") as bar:
        f.write(json.dumps({"meta": meta}) + "\n")
        for dtype, d, provider in jobs:
            dead = None  # once a provider fails at some N, larger N are skipped
            for n in ns:
                bar.set_postfix_str(f"{provider} {str(dtype).replace('torch.', '')} d={d} N={n}")
                if dead is not None:
                    point = Point(provider, n, d, {v: k for k, v in _DTYPES.items()}[dtype],
                                  str(device), dead)
                    point.grad_bytes = 2 * n * d * torch.tensor([], dtype=dtype).element_size()
                else:
                    point = measure(provider, n, d, dtype, device, args.reps, args.max_seconds)
                    if point.status != "ok":
                        dead = point.status
                points.append(point)
                f.write(json.dumps(asdict(point)) + "\n")
                f.flush()
                bar.update(1)

    title = f"clipfast benchmark on {name} (torch {torch.__version__})"
    table = markdown_table(points, title)
    (out / "results.md").write_text(table)
    plot(points, out / "results.png", title)
    print(table)
    print(f"wrote {jsonl}, {out / 'results.md'} and {out / 'results.png'}")
    return points


if __name__ == "__main__":
    main()
