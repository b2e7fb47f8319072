"""Speed and memory benchmark: ``python -m clipfast.bench``.

For every provider, dtype and embedding dim, N doubles until the provider runs
out of memory (recorded, not fatal) or ``--max-n`` is reached. Each point is
the median wall time of forward+backward (features, scale) and the peak extra
memory above the inputs: CUDA allocator peak on GPUs, the process's peak RSS
(VmHWM, reset per point) on CPU. Results go to ``--out`` as JSON lines, a
markdown table headed with the device name, and a PNG plot.

One run never overwrites another: ``--out`` must be a new or empty folder,
unless ``--resume`` continues the sweep recorded there or ``--overwrite``
replaces it (its results are deleted first). Each run appends to
``results.jsonl`` (a ``meta`` line, then one line per point as it is
measured); ``results.md`` (one table per device and loss) and the plot
(``results.png``; ``results_siglip.png`` for ``--loss siglip``) are rebuilt,
whole, from every row that file holds, so a provider failing now never hides
points measured before (an error never replaces a measured point).
``--resume`` reuses the points recorded for this device (ok or out of memory;
errors are measured again) and measures only the rest. Ctrl-C keeps every
point measured so far (exit status 130; ``--resume`` continues).

A provider that cannot run on the device here (``triton`` or ``cuda`` on a
machine without CUDA, ``cpu`` without its compiled extension) is an argument
error, before anything is measured.

``--loss siglip`` measures SigLIP's sigmoid loss (open_clip's SigLipLoss,
with the learnable bias) instead of CLIP's; every provider below has it.

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
import contextlib
import gc
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# Only the standard library at module level: torch, clipfast's backends and
# matplotlib are imported where they are used, after the arguments are
# checked, so that --help and argument errors answer at once.
from ._cli import (atomic_output, atomic_write_text, cpu_model, fail as fail_line, occupied_folder,
                   progress, show_info_logs, temporary_files, unwritable_folder)

PROG = "python -m clipfast.bench"
PROVIDERS = ("reference", "compile", "chunked", "triton", "hybrid", "cuda", "cpu", "gemm4_bound")
# Providers that are clipfast backends (the others always run).
_BACKEND_PROVIDERS = ("chunked", "triton", "hybrid", "cuda", "cpu")
LOSSES = ("clip", "siglip")
# SigLIP's learnable bias at open_clip's initial value.
_SIGLIP_BIAS = -10.0
DTYPES = ("fp32", "bf16", "fp16")
JSONL_NAME = "results.jsonl"
TABLE_NAME = "results.md"
PLOT_NAMES = {"clip": "results.png", "siglip": "results_siglip.png"}
# Everything a run writes in --out (--overwrite removes these, nothing else).
OUTPUT_NAMES = (JSONL_NAME, TABLE_NAME, *PLOT_NAMES.values())
_DEVICE_RE = re.compile(r"auto|cpu(:0)?|cuda(:\d+)?")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _dtype_name(dtype) -> str:
    return {str(_torch_dtype(name)): name for name in DTYPES}[str(dtype)]


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
    loss: str = "clip"  # "clip" or "siglip"


# ------------------------------ device helpers ------------------------------ #


def _sync(device) -> None:
    import torch

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

    def __init__(self, device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        import torch

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
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = _read_status_kib("VmHWM") * 1024 - self.base
        _set_glibc_thresholds(32 << 20)
        return peak


def _is_oom(err: BaseException) -> bool:
    import torch

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


def _siglip(fn: Callable) -> Callable:
    """``fn(x, y, s, b)`` as a step of (x, y, s) with a learnable bias (its
    gradient is part of SigLIP's backward)."""
    def loss(x, y, s):
        import torch

        bias = torch.tensor(_SIGLIP_BIAS, device=x.device, requires_grad=True)
        return fn(x, y, s, bias)

    return loss


def make_step(provider: str, loss: str = "clip") -> Callable:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    if provider == "gemm4_bound":
        return _gemm4_step
    import torch

    from .api import clip_loss, siglip_loss
    from .backends.reference import reference_clip_loss, reference_siglip_loss

    if provider in ("reference", "compile"):
        plain = reference_clip_loss if loss == "clip" else reference_siglip_loss
        if provider == "compile":
            if loss not in _COMPILED:
                _COMPILED[loss] = torch.compile(plain, dynamic=True)
            plain = _COMPILED[loss]
        fn = plain if loss == "clip" else _siglip(plain)
        return _loss_step(lambda x, y, s: fn(x, y, s))
    if provider in ("chunked", "triton", "hybrid", "cuda", "cpu"):
        if loss == "clip":
            return _loss_step(lambda x, y, s: clip_loss(x, y, s, backend=provider))
        fused = _siglip(lambda x, y, s, b: siglip_loss(x, y, s, b, backend=provider))
        return _loss_step(fused)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _gemm4_step(x, y, scale):
    """Four N x d x N matmuls, computed in row chunks so N x N never exists.

    Chunks of 8192 rows keep every product large enough to run at the BLAS's
    full speed; the results are discarded.
    """
    import torch

    n = x.shape[0]
    rows = min(n, 8192)
    with torch.no_grad():
        for _ in range(4):
            for start in range(0, n, rows):
                torch.mm(x[start:start + rows], y.t())


def measure(provider: str, n: int, d: int, dtype, device, reps: int, max_seconds: float,
            loss: str = "clip") -> Point:
    """One point: ``dtype`` a torch dtype, ``device`` a torch device."""
    import torch

    name = _dtype_name(dtype)
    point = Point(provider, n, d, name, str(device), "ok", loss=loss)
    point.grad_bytes = 2 * n * d * torch.tensor([], dtype=dtype).element_size()
    step = make_step(provider, loss)
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


def _auto_choice(device: str, dtype: str, n: int, d: int) -> str:
    from .autoselect import explain

    try:
        return explain(device, (_torch_dtype(dtype),), n, d).backend
    except Exception as err:  # noqa: BLE001 - a broken override table must not lose the results
        return f"? ({type(err).__name__})"


def error_lines(points: List[Point]) -> List[str]:
    """One line per provider, dtype and d whose sweep ended in an error: the
    first failing N and the reason (a table cell only says ``error``)."""
    lines, seen = [], set()
    for p in sorted(points, key=lambda q: (q.provider, q.dtype, q.d, q.n)):
        key = (p.provider, p.dtype, p.d)
        if p.status.startswith("error") and key not in seen:
            seen.add(key)
            reason = p.status[len("error"):].lstrip(": ")
            lines.append(f"- `{p.provider}`, {p.dtype}, d = {p.d}, N = {p.n} (and larger N): {reason}")
    return lines


def markdown_table(points: List[Point], title: str) -> str:
    """The results as markdown; the last column is what ``backend="auto"``
    runs for that shape here, and the reasons for ``error`` cells follow."""
    providers = [p for p in PROVIDERS if any(q.provider == p for q in points)]
    keys = sorted({(q.dtype, q.d, q.n) for q in points})
    index = {(q.dtype, q.d, q.n, q.provider): q for q in points}
    lines = [
        f"### {title}",
        "",
        "Forward+backward, median time and peak extra memory above the inputs "
        "(the input gradients included; their size is the `grads` column). "
        "`auto picks`: the backend `backend=\"auto\"` runs for that shape on this machine.",
        "",
        "| dtype | d | N | grads | " + " | ".join(providers) + " | auto picks |",
        "|---|---|---|---|" + "---|" * len(providers) + "---|",
    ]
    for dtype, d, n in keys:
        first = next(q for q in points if (q.dtype, q.d, q.n) == (dtype, d, n))
        cells = [_fmt_point(index.get((dtype, d, n, p))) for p in providers]
        auto = _auto_choice(first.device, dtype, n, d)
        lines.append(f"| {dtype} | {d} | {n} | {first.grad_bytes / 2**30:.3f} GiB | "
                     + " | ".join(cells) + f" | {auto} |")
    errors = error_lines(points)
    if errors:
        lines += ["", "Errors:", ""] + errors
    return "\n".join(lines) + "\n"


def figure(points: List[Point], title: str):
    """Time and memory against N, one column of panels per (dtype, d), with
    one legend for the whole figure (every panel uses the same colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(q.dtype, q.d) for q in points})
    fig, axes = plt.subplots(2, len(combos), figsize=(4.5 * len(combos), 8), squeeze=False,
                             layout="constrained")
    colours = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}
    handles = {}
    for col, (dtype, d) in enumerate(combos):
        for provider in PROVIDERS:
            pts = sorted((q for q in points if q.provider == provider and q.dtype == dtype
                          and q.d == d and q.status == "ok"), key=lambda q: q.n)
            if not pts:
                continue
            ns = [q.n for q in pts]
            style = dict(marker="o", color=colours[provider], label=provider)
            (handles[provider],) = axes[0][col].plot(ns, [q.time_ms for q in pts], **style)
            # A log axis cannot show zero (tiny N on CPU measure no growth).
            mem = [(q.n, q.peak_extra_bytes / 2**30) for q in pts if (q.peak_extra_bytes or 0) > 0]
            if provider != "gemm4_bound" and mem:
                axes[1][col].plot(*zip(*mem), **style)
        for row, ylabel in enumerate(["time (ms)", "peak extra memory (GiB)"]):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch size)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{dtype}, d={d}")
    fig.suptitle(title.replace(" on ", "\n", 1), fontsize=10)
    ordered = [handles[p] for p in PROVIDERS if p in handles]
    if ordered:
        _fit_legend(fig, ordered)
    return fig


def _fit_legend(fig, handles):
    """One legend below the panels, in as many columns (at most four) as fit
    the figure's width: a legend wider than the figure is cut off at both
    edges of the saved image (a single panel column is 4.5 inches wide)."""
    labels = [h.get_label() for h in handles]
    for ncol in range(min(len(handles), 4), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=9)
        fig.canvas.draw()  # lays the figure out, so that the extent is the saved one
        box, page = legend.get_window_extent(), fig.bbox
        if ncol == 1 or (box.x0 >= page.x0 and box.x1 <= page.x1):
            return legend
        legend.remove()
    return None


def plot(points: List[Point], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(points, title)
    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --------------------------- recorded results ------------------------------ #


_POINT_FIELDS = {f.name for f in fields(Point)}
_MEASURED = ("ok", "oom")


@dataclass
class Recorded:
    """The points results.jsonl holds for one device and loss: the latest of
    each (provider, dtype, d, N), where a measured point (ok or out of memory)
    is never replaced by an error; ``meta`` is the latest meta line's."""
    device: str
    loss: str
    meta: dict
    points: Dict[tuple, Point] = field(default_factory=dict)


def recorded_points(jsonl: Path) -> Dict[Tuple[str, str], Recorded]:
    """Every point in results.jsonl, by (device name, loss), in the order the
    file first names them (lines from before the loss field are CLIP points;
    a killed run's partial line is skipped)."""
    groups: Dict[Tuple[str, str], Recorded] = {}
    if not Path(jsonl).exists():
        return groups
    meta: dict = {}
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the partial last line of a killed run
            if not isinstance(row, dict):
                continue
            if "meta" in row:
                meta = row["meta"] if isinstance(row["meta"], dict) else {}
                continue
            if not (_POINT_FIELDS - {"loss"} <= row.keys()) or meta.get("device") is None:
                continue
            point = Point(**{k: row[k] for k in _POINT_FIELDS if k in row})
            group = groups.setdefault((meta["device"], point.loss), Recorded(meta["device"], point.loss, meta))
            group.meta = meta
            key = (point.provider, point.dtype, point.d, point.n)
            before = group.points.get(key)
            if before is None or point.status in _MEASURED or before.status not in _MEASURED:
                group.points[key] = point
    return groups


def earlier_points(jsonl: Path, device_label: str) -> Dict[tuple, Point]:
    """Points results.jsonl holds for the device ``device_label`` (as a meta
    line names it), the latest of each (loss, provider, dtype, d, N), errors
    left out: what ``--resume`` need not measure again."""
    return {(loss, *key): point
            for (device, loss), group in recorded_points(jsonl).items() if device == device_label
            for key, point in group.points.items() if point.status in _MEASURED}


def _title(loss: str, device_label: str, torch_version) -> str:
    loss_name = {"clip": "CLIP", "siglip": "SigLIP"}.get(loss, loss)
    return f"clipfast {loss_name} benchmark on {device_label} (torch {torch_version})"


def write_reports(out: Path, device_label: str, loss: str) -> str:
    """Rebuild results.md (a table per device and loss) and this device's
    plot for ``loss`` from every point results.jsonl holds; returns this
    device's table for ``loss``."""
    groups = recorded_points(out / JSONL_NAME)
    current = groups.get((device_label, loss))
    order = ([current] if current else []) + [g for g in groups.values() if g is not current]
    tables = [markdown_table(list(g.points.values()), _title(g.loss, g.device, g.meta.get("torch")))
              for g in order]
    atomic_write_text(out / TABLE_NAME, "\n".join(tables))
    if current is None:
        return ""
    plot(list(current.points.values()), out / PLOT_NAMES[loss],
         _title(loss, device_label, current.meta.get("torch")))
    return tables[0]


# ---------------------------------- CLI ------------------------------------ #


_DEFAULTS = {
    "cuda": dict(providers="reference,compile,chunked,triton,hybrid,cuda,gemm4_bound",
                 dims="512,768,1024", dtypes="bf16,fp32", min_n=4096, max_n=1 << 20, reps=5),
    "cpu": dict(providers="reference,compile,chunked,cpu,gemm4_bound", dims="512", dtypes="fp32",
                min_n=256, max_n=8192, reps=3),
}


def _defaults(device_type: str) -> dict:
    return dict(_DEFAULTS[device_type])


def _comma_list(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _choices(text: str, allowed, what: str) -> List[str]:
    """A comma list of names from ``allowed``, each once, in the given order."""
    names = list(dict.fromkeys(_comma_list(text)))
    unknown = [v for v in names if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(allowed)}")
    if not names:
        raise ValueError("empty list")
    return names


def _providers(text: str) -> List[str]:
    return _choices(text, PROVIDERS, "provider")


def _dims(text: str) -> List[int]:
    try:
        dims = list(dict.fromkeys(int(v) for v in _comma_list(text)))
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise ValueError(f"expected a comma list of positive integers, got {text!r}")
    return dims


def _dtypes(text: str) -> List[str]:
    return _choices(text, DTYPES, "dtype")


_LISTS = {"providers": _providers, "dims": _dims, "dtypes": _dtypes}


def _check_device(text: str):
    """(torch device, None) or (None, why it cannot be benchmarked here)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        return None, f"expected cpu, cuda, cuda:N or auto, got {text!r}"
    if device.type not in ("cpu", "cuda"):
        return None, f"expected cpu, cuda, cuda:N or auto, got {text!r}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, (f"{text!r} requested but CUDA is not available here (torch "
                          f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return None, f"{text!r} requested but there are {torch.cuda.device_count()} CUDA devices"
    return device, None


def provider_problem(provider: str, device, dtype: str, loss: str = "clip") -> Optional[str]:
    """Why ``provider`` cannot run ``dtype`` features of ``loss`` on the torch
    device ``device`` here (None when it can): a backend's own reason."""
    if provider not in _BACKEND_PROVIDERS:
        return None  # plain PyTorch: runs wherever torch does
    import torch

    from ._inputs import check_inputs
    from .backends import SIGLIP, get

    backend = get(provider)
    if loss == "siglip" and not backend.has(SIGLIP):
        return f"backend={provider!r} has no SigLIP loss"
    x = torch.zeros(2, 4, device=device, dtype=_torch_dtype(dtype))
    err = backend.problem(check_inputs(x, x, torch.tensor(1.0, device=device)))
    return None if err is None else str(err)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu, gpu = _defaults("cpu"), _defaults("cuda")

    def both(key):
        return f"default {gpu[key]} on CUDA, {cpu[key]} on CPU"

    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: "
                        "cuda when available)")
    parser.add_argument("--loss", default="clip", choices=LOSSES,
                        help="the loss measured: clip (default) or siglip (open_clip's SigLipLoss, "
                             "learnable bias)")
    parser.add_argument("--providers", help=f"comma list from {','.join(PROVIDERS)} ({both('providers')}); "
                        "one that cannot run on the device here is an error")
    parser.add_argument("--dims", help=f"comma list of embedding dims ({both('dims')})")
    parser.add_argument("--dtypes", help=f"comma list from {','.join(DTYPES)} ({both('dtypes')})")
    parser.add_argument("--min-n", type=int, help=f"smallest N; N doubles up to --max-n ({both('min_n')})")
    parser.add_argument("--max-n", type=int, help=f"largest N ({both('max_n')})")
    parser.add_argument("--reps", type=int, help=f"timed repetitions per point, median reported, after "
                        f"one warm-up ({both('reps')})")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop repeating a point after this long (default 20)")
    parser.add_argument("--out", default="bench_results", help="output folder (default bench_results); "
                        "must be new or empty unless --resume or --overwrite is given")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep recorded in --out: results.jsonl is appended to, the "
                             "points it holds for this device (ok or OOM) are not measured again "
                             "(errors are), and the table and plot are rebuilt from all its rows")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the results in a non-empty --out (results.jsonl, results.md, "
                             "the plots) and start afresh")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments: anything that cannot run is an error
    (exit status 2) naming the argument, before anything is measured; what
    needs no torch is checked before torch is imported."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(option, message):
        parser.error(f"argument {option}: {message}")

    if not _DEVICE_RE.fullmatch(args.device):
        fail("--device", f"expected cpu, cuda, cuda:N or auto, got {args.device!r}")
    for key, parse in _LISTS.items():
        if getattr(args, key) is not None:
            try:
                setattr(args, key, parse(getattr(args, key)))
            except ValueError as err:
                fail(f"--{key}", str(err))
    for key in ("min_n", "reps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            fail(f"--{key.replace('_', '-')}", f"must be >= 1, got {getattr(args, key)}")
    if not (args.max_seconds > 0 and math.isfinite(args.max_seconds)):
        fail("--max-seconds", f"must be a positive number of seconds, got {args.max_seconds}")
    if args.resume and args.overwrite:
        fail("--overwrite", "cannot be combined with --resume (which keeps the recorded results)")
    problem = unwritable_folder(Path(args.out))
    if problem:
        fail("--out", problem)
    if not (args.resume or args.overwrite):
        problem = occupied_folder(Path(args.out), "give --resume to continue its sweep (its rows are "
                                                  "kept; only missing points are measured)")
        if problem:
            fail_line(PROG, f"argument --out: {problem}")

    import torch

    device, problem = _check_device("cuda" if args.device == "auto" and torch.cuda.is_available()
                                    else "cpu" if args.device == "auto" else args.device)
    if problem:
        fail("--device", problem)
    args.device = str(device)
    for key, value in _defaults(device.type).items():
        if getattr(args, key) is None:
            setattr(args, key, _LISTS[key](value) if key in _LISTS else value)
    if args.max_n < args.min_n:
        fail("--max-n", f"must be >= --min-n ({args.min_n}), got {args.max_n}")
    for provider in args.providers:
        for dtype in args.dtypes:
            problem = provider_problem(provider, device, dtype, args.loss)
            if problem:
                fail("--providers", f"{provider!r} cannot run {dtype} on {device} here: {problem}")
    return args


def _open_for_append(jsonl: Path):
    f = open(jsonl, "a+", encoding="utf-8")
    f.seek(0, os.SEEK_END)
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")  # a killed run's partial line stays on its own line
    return f


def _resume_command(argv: List[str]) -> str:
    """The command line that continues this run."""
    args = [a for a in argv if a != "--overwrite"]
    return " ".join([PROG, *map(shlex.quote, args)] + ([] if "--resume" in args else ["--resume"]))


def main(argv=None) -> List[Point]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from .devices import device_name

    show_info_logs()
    device = torch.device(args.device)
    ns = []
    n = args.min_n
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    out = Path(args.out)
    jsonl = out / JSONL_NAME
    if args.overwrite:
        for path in [out / name for name in OUTPUT_NAMES] + temporary_files(out, OUTPUT_NAMES):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    name = device_name(device)
    meta = dict(device=name, cpu=cpu_model(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                python=sys.version.split()[0], argv=argv)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass

    earlier = earlier_points(jsonl, name) if args.resume else {}
    jobs = [(dt, d, p) for dt in args.dtypes for d in args.dims for p in args.providers]
    points: List[Point] = []
    reused = written = 0
    try:
        with _open_for_append(jsonl) as f, \
                progress(len(jobs) * len(ns), "bench", "pt") as bar:
            f.write(json.dumps({"meta": meta}) + "\n")
            f.flush()
            for dtype_name, d, provider in jobs:
                dtype = _torch_dtype(dtype_name)
                dead = None  # once a provider fails at some N, larger N are skipped
                for n in ns:
                    bar.set_postfix_str(f"{provider} {dtype_name} d={d} N={n}")
                    key = (args.loss, provider, dtype_name, d, n)
                    point = earlier.get(key)
                    if point is not None:
                        reused += 1
                    elif dead is not None:
                        point = Point(provider, n, d, dtype_name, str(device), dead, loss=args.loss)
                        point.grad_bytes = 2 * n * d * torch.tensor([], dtype=dtype).element_size()
                    else:
                        point = measure(provider, n, d, dtype, device, args.reps, args.max_seconds,
                                        args.loss)
                    if point.status != "ok":
                        dead = point.status
                    if earlier.get(key) is not point:
                        # One write per line: a kill leaves at most a partial last line.
                        f.write(json.dumps(asdict(point)) + "\n")
                        f.flush()
                        written += 1
                    points.append(point)
                    bar.update(1)
        table = write_reports(out, name, args.loss)
    except KeyboardInterrupt:
        recorded = sum(len(g.points) for g in recorded_points(jsonl).values())
        print(f"\ninterrupted: the {written} points this run measured are kept in {jsonl} "
              f"({recorded} points recorded there in all); to measure the rest, run "
              f"{_resume_command(argv)}", file=sys.stderr)
        raise SystemExit(130) from None
    print(table)
    if reused:
        print(f"--resume: {reused} of {len(points)} points taken from {jsonl}")
    print(f"appended to {jsonl}; rebuilt {out / TABLE_NAME} and {out / PLOT_NAMES[args.loss]} "
          "from all its rows")
    return points


if __name__ == "__main__":
    main()
