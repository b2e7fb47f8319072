"""Check clipfast on this machine: ``python -m clipfast.check [--quick] [--json] [--out DIR]``.

The first thing to run on a new machine. In order, it

1. prints the environment: Python, torch and triton versions, the GPU (or
   "no GPU") and its compute capability, the TF32 settings, whether the
   compiled extensions (clipfast._cpu, clipfast._cuda) import, and how the
   Triton kernels run here;
2. runs every backend that can run here on small odd shapes, in float32,
   float16 and bfloat16, for the CLIP and the SigLIP loss, and compares the
   loss and every gradient with a float64 reference by the accuracy rule of
   the test suite: the error is at most twice the error of the plain PyTorch
   loss computed in the same dtype, plus a floor of a few ulps of the dtype.
   One line each: PASS, FAIL, or SKIP with the reason the backend cannot run
   that combination here;
3. times forward+backward (the median of a few runs after warm-up) and
   measures peak memory at a couple of larger shapes, for every native
   backend next to plain eager PyTorch, torch.compile of it and the
   four-GEMM bound (four N x d x N products), prints the table, and writes
   the measured points to the per-user cache that ``backend="auto"`` reads
   before the shipped table (``clipfast.autoselect.cache_path()``).

The exit status is 1 when any line FAILs (a result outside the rule, or a
backend raising an error), 0 otherwise, 2 for bad arguments.

Without CUDA the Triton kernels (the triton and hybrid backends) run only
through Triton's interpreter, which must be switched on before triton is
imported. Importing clipfast imports triton (through torch.library), so when
``TRITON_INTERPRET`` is unset and there is no GPU, ``python -m clipfast.check``
restarts itself once with ``TRITON_INTERPRET=1`` and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Only the standard library at module level, and arguments parsed before
# anything else runs: ``--help`` and argument errors cost no more than
# importing the clipfast package (which imports torch and triton).

PROG = "python -m clipfast.check"
LOSSES = ("clip", "siglip")
ACCURACY_SHAPES = ((37, 19), (130, 64))
ACCURACY_DTYPES = ("fp32", "fp16", "bf16")
# (loss): (logit scale, logit bias) of the accuracy cases; both normalise.
LOSS_SETTINGS = {"clip": (14.3, None), "siglip": (10.0, -10.0)}
# Timing shapes (N, d) and dtype, by device type and mode.
TIMING = {
    ("cuda", False): (((32768, 1024), (65536, 1024)), "bf16"),
    ("cuda", True): (((4096, 512), (16384, 1024)), "bf16"),
    ("cpu", False): (((2048, 256), (4096, 512)), "fp32"),
    ("cpu", True): (((512, 64), (1024, 64)), "fp32"),
}
# (warm-up runs, timed runs, seconds after which a provider stops repeating).
REPEATS = {
    ("cuda", False): (2, 10, 20.0),
    ("cuda", True): (2, 5, 10.0),
    ("cpu", False): (1, 5, 20.0),
    ("cpu", True): (1, 3, 3.0),
}
BASELINES = ("eager", "compile", "gemm4_bound")
BASELINE_TITLES = {"eager": "eager PyTorch", "compile": "torch.compile",
                   "gemm4_bound": "4-GEMM bound"}
# The accuracy rule's floor, in ulps of the dtype (as tests/parity.py's).
FLOOR_ULPS = {"fp32": 8, "fp16": 2, "bf16": 2, "fp64": 64}
# Set in the environment of the restarted process (see _arrange_interpreter).
_RESTART_MARK = "_CLIPFAST_CHECK_SET_TRITON_INTERPRET"
_GRAD_NAMES = ("grad_image", "grad_text", "grad_scale", "grad_bias")


# ---------------------------------- arguments ------------------------------- #


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small timing shapes, fewer runs, and no torch.compile on the CPU "
                             "(about a minute on a 2-core CPU); the accuracy checks are the same")
    parser.add_argument("--json", action="store_true",
                        help="print JSON lines (one object per line, a 'kind' field each) instead "
                             "of text; progress still goes to stderr")
    parser.add_argument("--out", metavar="DIR",
                        help="also write the report there: check.txt, check.jsonl and the "
                             "measured table auto_table.json")
    parser.add_argument("--backends", metavar="LIST",
                        help="comma list of the backends to check (default: every registered one)")
    parser.add_argument("--skip-timing", action="store_true",
                        help="only the environment and the accuracy checks")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not write the measured table to the per-user cache")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backends is not None:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        from .backends import REGISTRY

        unknown = [b for b in args.backends if b not in REGISTRY]
        if unknown or not args.backends:
            parser.error(f"argument --backends: unknown backend {unknown[0]!r}; choose from "
                         f"{', '.join(REGISTRY)}" if unknown else "argument --backends: empty list")
    if args.out is not None:
        from ._cli import unwritable_folder

        problem = unwritable_folder(args.out)
        if problem:
            parser.error(f"argument --out: {problem}")
    return args


# ---------------------------------- reporting ------------------------------- #


class Report:
    """Records (dicts with a ``kind``) and their text lines: printed as one
    or the other, and both kept for ``--out``."""

    def __init__(self, as_json: bool, stream=None):
        self.as_json = as_json
        self.stream = sys.stdout if stream is None else stream
        self.records: List[dict] = []
        self.lines: List[str] = []
        self.bar = None  # a tqdm bar on a terminal: lines go through its write()

    def emit(self, record: Optional[dict], text: Optional[str] = None) -> None:
        if record is not None:
            self.records.append(record)
        if text is not None:
            self.lines.append(text)
        out = json.dumps(record) if self.as_json else text
        if out is None or (self.as_json and record is None):
            return
        if self.bar is not None and hasattr(self.bar, "write"):
            type(self.bar).write(out, file=self.stream)
        else:
            print(out, file=self.stream, flush=True)

    def text(self, text: str) -> None:
        self.emit(None, text)

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r.get("status") == status)


@contextlib.contextmanager
def _progress(report: Report, total: int, desc: str, unit: str):
    from ._cli import progress

    with progress(total, desc, unit) as bar:
        report.bar = bar
        try:
            yield bar
        finally:
            report.bar = None


# --------------------------------- environment ------------------------------ #


def _arrange_interpreter(restart: bool) -> str:
    """Switch Triton's interpreter on where there is no GPU (restarting the
    process once if triton is already imported and ``restart`` allows it);
    returns the sentence the report prints about it."""
    import torch

    set_by_us = os.environ.pop(_RESTART_MARK, None) is not None
    value = os.environ.get("TRITON_INTERPRET")
    on = value not in (None, "", "0")
    if torch.cuda.is_available():
        if on:
            return (f"TRITON_INTERPRET={value} from the environment: the Triton kernels run "
                    "through the interpreter, even on the GPU")
        return "the Triton kernels run on the GPU"
    if set_by_us:
        return ("TRITON_INTERPRET=1 set by clipfast.check (no CUDA GPU; the check restarted "
                "itself with it): the triton and hybrid kernels run through Triton's "
                "interpreter on the CPU, checked for results, not timed")
    if value is not None:
        if on:
            return (f"TRITON_INTERPRET={value} from the environment: the triton and hybrid "
                    "kernels run through Triton's interpreter on the CPU, checked for "
                    "results, not timed")
        return (f"TRITON_INTERPRET={value} from the environment: without a GPU the triton "
                "and hybrid backends are skipped")
    if "triton.language" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return ("TRITON_INTERPRET=1 set by clipfast.check (no CUDA GPU): the triton and hybrid "
                "kernels run through Triton's interpreter on the CPU, checked for results, "
                "not timed")
    if restart:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ[_RESTART_MARK] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        argv = list(getattr(sys, "orig_argv", [])[1:]) or ["-m", "clipfast.check", *sys.argv[1:]]
        os.execv(sys.executable, [sys.executable, *argv])
    return ("TRITON_INTERPRET is unset and triton was imported before this check could set it "
            "(set TRITON_INTERPRET=1 before importing clipfast, or run python -m "
            "clipfast.check): without a GPU the triton and hybrid backends are skipped")


def _import_status(module: str) -> str:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as err:
        return f"not importable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return "imports"


def environment(interpreter: str) -> dict:
    import torch

    from . import __version__
    from .autoselect import cache_path
    from .devices import device_name

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "clipfast": __version__,
        "torch": torch.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as err:
        env["triton"] = f"not installed ({err})"
    env["cpu"] = device_name(torch.device("cpu"))
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(index)
        env["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(index)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory
                                      / 2**30, 1)
    else:
        env["gpu"] = "no GPU"
        env["compute_capability"] = None
    with warnings.catch_warnings():
        # Newer torch deprecates the flag in favour of fp32_precision.
        warnings.simplefilter("ignore")
        env["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["extension_cpu"] = _import_status("clipfast._cpu")
    env["extension_cuda"] = _import_status("clipfast._cuda")
    env["triton_kernels"] = interpreter
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    env["CLIPFAST_AUTO_TABLE"] = os.environ.get("CLIPFAST_AUTO_TABLE")
    try:
        env["cache"] = str(cache_path())
    except RuntimeError as err:  # no home folder
        env["cache"] = f"unavailable ({err})"
    return env


def _environment_lines(env: dict) -> List[str]:
    gpu = env["gpu"] if env["compute_capability"] is None else (
        f"{env['gpu']} (compute capability {env['compute_capability']}, "
        f"{env['gpu_memory_gib']} GiB, CUDA {env['cuda']})")
    rows = [
        ("python", f"{env['python']} ({env['platform']})"),
        ("clipfast", env["clipfast"]),
        ("torch", env["torch"]),
        ("triton", env["triton"]),
        ("cpu", env["cpu"]),
        ("gpu", gpu),
        ("tf32", f"torch.backends.cuda.matmul.allow_tf32={env['cuda_matmul_allow_tf32']}, "
                 f"torch.get_float32_matmul_precision()={env['float32_matmul_precision']!r}"),
        ("clipfast._cpu", env["extension_cpu"]),
        ("clipfast._cuda", env["extension_cuda"]),
        ("triton kernels", env["triton_kernels"]),
        ("auto's cache", env["cache"] + (
            f" (CLIPFAST_AUTO_TABLE={env['CLIPFAST_AUTO_TABLE']} takes precedence)"
            if env["CLIPFAST_AUTO_TABLE"] else "")),
    ]
    lines = ["== environment"] + [f"{key:<15} {value}" for key, value in rows]
    return lines


# ------------------------------- accuracy rule ------------------------------ #


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp64": torch.float64}[name]


def rule_check(got: dict, truth: dict, same: dict, x, y, *, scale: float, bias: Optional[float],
               normalize: bool, dtype: str) -> Tuple[List[str], float, str]:
    """The accuracy rule on every quantity of ``truth`` (loss, grad_*).

    ``got``: the backend's results, ``truth``: the fp64 reference on the same
    rounded inputs, ``same``: the plain reference in the backend's dtype;
    ``x``, ``y``: the features (their norms size the gradients' floor).
    Returns (the violations, as sentences; the largest fraction of its
    allowance an error used; that quantity's name).
    """
    import torch

    problems: List[str] = []
    worst, worst_key = 0.0, ""
    eps = torch.finfo(_dtype(dtype)).eps
    floor_rel = FLOOR_ULPS[dtype] * eps
    n = x.shape[0]
    if set(got) != set(truth):
        return [f"returned {sorted(got)}, expected {sorted(truth)}"], math.inf, "results"
    for key, t in truth.items():
        t = t.double()
        value = got[key].double()
        if not torch.isfinite(value).all():
            problems.append(f"{key} is not finite")
            worst, worst_key = math.inf, key
            continue
        err = (value - t).abs().max().item()
        ref_err = (same[key].double() - t).abs().max().item()
        if not math.isfinite(ref_err):
            problems.append(f"{key}: the plain reference in {dtype} is not finite here, so the "
                            "rule cannot bound the error")
            worst, worst_key = math.inf, key
            continue
        if key in ("loss", "grad_scale", "grad_bias"):
            magnitude = max(t.abs().max().item(), 1.0)
        else:
            feats = x if key == "grad_image" else y
            inv = (1 / feats.double().norm(dim=1).clamp_min(1e-12).min().item()
                   if normalize else 1.0)
            magnitude = max(t.abs().max().item(), scale / n * max(inv, 1.0))
        floor = floor_rel * magnitude
        if key in ("loss", "grad_scale"):
            floor += eps * (scale + abs(bias or 0.0))
        allowed = 2 * ref_err + floor
        used = err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf)
        if used > worst or not worst_key:
            worst, worst_key = used, key
        if err > allowed:
            problems.append(f"{key} error {err:.3e} > allowed {allowed:.3e} (2 x the {dtype} "
                            f"reference's {ref_err:.3e} + floor {floor:.3e})")
    return problems, worst, worst_key


def _features(n: int, d: int, device, seed: int = 0):
    """fp32 (x, y) with matching rows correlated (cosine about 0.3), so that
    the CLIP loss is O(1), as in training: a wrong result cannot hide in a
    loss of nearly zero."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed * 1000003 + n * 1009 + d)
    x = torch.randn(n, d, generator=gen)
    y = x + 3.0 * torch.randn(n, d, generator=gen)
    return x.to(device), y.to(device)


def _loss_fn(loss: str, backend: str) -> Callable:
    from .api import clip_loss, siglip_loss

    if loss == "clip":
        return lambda x, y, s, b: clip_loss(x, y, s, logit_bias=b, normalize=True,
                                            backend=backend)
    return lambda x, y, s, b: siglip_loss(x, y, s, b, normalize=True, backend=backend)


def loss_and_grads(fn: Callable, x, y, s, b) -> dict:
    """{"loss", "grad_image", "grad_text", "grad_scale"[, "grad_bias"]} of
    ``fn(x, y, s, b)``; a gradient of the wrong dtype or shape raises."""
    import torch

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, y, s, b)]
    loss = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    out = {"loss": loss.detach()}
    for name, t, g in zip([n for n, t in zip(_GRAD_NAMES, leaves) if t is not None], wrt, grads):
        if g.dtype != t.dtype or g.shape != t.shape:
            raise TypeError(f"{name} is {g.dtype} {tuple(g.shape)} for an input "
                            f"{t.dtype} {tuple(t.shape)}")
        out[name] = g
    return out



def _known_refusal(backend: str, dtype: str, device) -> Optional[str]:
    """Why a backend refuses a combination here on purpose (beyond what its
    ``problem()`` says before running)."""
    if backend == "triton" and dtype == "bf16" and device.type == "cpu":
        return ("Triton's interpreter computes bfloat16 dot products wrongly, so the triton "
                "backend refuses two bfloat16 operands on the CPU (it runs them on a GPU)")
    return None


def _skip_problem(backend_obj, loss: str, x, y, s, b) -> Optional[str]:
    from ._inputs import check_inputs
    from .backends import SIGLIP

    if loss == "siglip" and not backend_obj.has(SIGLIP):
        return f"backend={backend_obj.name!r} has no SigLIP loss"
    err = backend_obj.problem(check_inputs(x, y, s, b))
    return None if err is None else str(err)


def _accuracy_device(backend_obj, device):
    """Where a backend's cases run: ``device``, or the CPU for a backend that
    takes only CPU tensors on a GPU machine (the C++ CPU backend)."""
    import torch

    cpu = torch.device("cpu")
    if device.type == "cpu" or backend_obj.device_problem(device) is None:
        return device
    return cpu if backend_obj.device_problem(cpu) is None else device


def run_accuracy(report: Report, device, backends: Sequence[str]) -> None:
    import torch

    from .backends import REGISTRY

    cases = [(loss, n, d, dt) for loss in LOSSES for (n, d) in ACCURACY_SHAPES
             for dt in ACCURACY_DTYPES]
    where = {name: _accuracy_device(REGISTRY[name], device) for name in backends}
    report.text("")
    report.text(f"== accuracy: loss and every gradient against the float64 reference "
                f"({len(cases)} cases per backend)")
    report.text("rule: error <= 2 x the error of plain PyTorch in the same dtype + a floor of "
                "a few ulps; 'used' is the largest fraction of that allowance taken"
                + ("; fp32 on CUDA follows torch's TF32 setting (allow_tf32=None), as the "
                   "reference does" if device.type == "cuda" else ""))
    on_cpu = [name for name in backends if where[name] != device]
    if on_cpu:
        report.text(f"{', '.join(on_cpu)}: CPU tensors (it takes no {device.type} tensors)")
    skipped: Dict[Tuple[str, str, str], List[str]] = {}
    with _progress(report, len(cases) * len(backends), "accuracy", "case") as bar, \
            warnings.catch_warnings():
        # The interpreter's numpy arithmetic warns on -inf - -inf in masked lanes.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        for loss, n, d, dt in cases:
            dtype = _dtype(dt)
            scale, bias = LOSS_SETTINGS[loss]
            prepared: Dict[str, tuple] = {}
            for name in backends:
                dev = where[name]
                if str(dev) not in prepared:
                    # The inputs, the fp64 truth on them and the same-dtype reference.
                    x32, y32 = _features(n, d, dev)
                    x, y = x32.to(dtype), y32.to(dtype)
                    s = torch.tensor(scale, dtype=torch.float32, device=dev)
                    b = None if bias is None else torch.tensor(bias, dtype=torch.float32,
                                                               device=dev)
                    reference = _loss_fn(loss, "reference")
                    truth = loss_and_grads(reference, x.double(), y.double(), s.double(),
                                           None if b is None else b.double())
                    # torch's TF32 setting, as the backends (allow_tf32=None).
                    same = loss_and_grads(reference, x, y, s, b)
                    prepared[str(dev)] = (x, y, s, b, truth, same)
                x, y, s, b, truth, same = prepared[str(dev)]
                if bar is not None:
                    bar.set_postfix_str(f"{name} {loss} {n}x{d} {dt}")
                case = {"kind": "accuracy", "backend": name, "loss": loss, "n": n, "d": d,
                        "dtype": dt, "device": dev.type}
                reason = _skip_problem(REGISTRY[name], loss, x, y, s, b) or \
                    _known_refusal(name, dt, dev)
                if reason is not None:
                    report.emit(dict(case, status="SKIP", reason=reason), None)
                    skipped.setdefault((name, dt, reason), []).append(f"{loss} {n}x{d}")
                else:
                    _accuracy_case(report, case, loss, name, x, y, s, b, truth, same, scale,
                                   bias, dt)
                if bar is not None:
                    bar.update(1)
    for (name, dt, reason), cases_skipped in skipped.items():
        report.text(f"SKIP  {name:<9} {dt:<4} ({len(cases_skipped)} cases): {reason}")


def _accuracy_case(report, case, loss, name, x, y, s, b, truth, same, scale, bias, dt):
    label = f"{name:<9} {loss:<6} {case['n']:>3}x{case['d']:<3} {dt:<4}"
    start = time.perf_counter()
    try:
        got = loss_and_grads(_loss_fn(loss, name), x, y, s, b)
    except Exception as err:  # noqa: BLE001 - a crash is this case's FAIL, not the check's end
        text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        report.emit(dict(case, status="FAIL", problems=[text]), f"FAIL  {label} raised {text}")
        return
    seconds = time.perf_counter() - start
    problems, used, key = rule_check(got, truth, same, x, y, scale=scale, bias=bias,
                                     normalize=True, dtype=dt)
    record = dict(case, status="FAIL" if problems else "PASS",
                  used=round(used, 4) if math.isfinite(used) else None,  # strict JSON
                  worst=key, seconds=round(seconds, 3))
    if problems:
        record["problems"] = problems
        report.emit(record, f"FAIL  {label} " + "; ".join(problems))
    else:
        report.emit(record, f"PASS  {label} used {used:5.1%} ({key})")


# ----------------------------------- timing --------------------------------- #


def _gemm4(x, y, scale):
    """Four N x d x N products in the features' dtype, in row blocks (the N x N
    result never exists at once); nothing is kept."""
    import torch

    n = x.shape[0]
    rows = min(n, 8192)
    with torch.no_grad():
        for _ in range(4):
            for start in range(0, n, rows):
                torch.mm(x[start:start + rows], y.t())


_COMPILED: Dict[str, Callable] = {}


def _step(provider: str) -> Callable:
    """One forward+backward of ``provider`` on (x, y, scale) leaves."""
    import torch

    from .api import clip_loss
    from .backends.reference import reference_clip_loss

    if provider == "gemm4_bound":
        return _gemm4
    if provider == "eager":
        fn = reference_clip_loss
    elif provider == "compile":
        if "clip" not in _COMPILED:
            _COMPILED["clip"] = torch.compile(reference_clip_loss, dynamic=True)
        fn = _COMPILED["clip"]
    else:
        def fn(x, y, s):
            return clip_loss(x, y, s, backend=provider)

    def step(x, y, s):
        x.grad = y.grad = s.grad = None
        fn(x, y, s).backward()

    return step


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def memory_measured(device) -> bool:
    """Whether peak memory is measured on ``device``: always on CUDA (the
    allocator's peak), on the CPU where Linux lets the process reset its peak
    resident size (/proc/self/clear_refs, which clipfast.bench uses too)."""
    if device.type == "cuda":
        return True
    return (os.path.exists("/proc/self/status") and os.path.exists("/proc/self/clear_refs")
            and os.access("/proc/self/clear_refs", os.W_OK))


def measure(provider: str, n: int, d: int, dtype, device, warmup: int, reps: int,
            max_seconds: float) -> dict:
    """{"status": "ok" | "oom" | "error: ...", "time_ms", "times_ms",
    "peak_extra_bytes"}: the median of up to ``reps`` timed runs after
    ``warmup`` runs (at least one); the peak is the last warm-up's, above the
    inputs."""
    import gc

    import torch

    from .bench import PeakMemory

    result: dict = {"status": "ok", "time_ms": None, "times_ms": [], "peak_extra_bytes": None}
    x = y = s = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        gen = torch.Generator(device="cpu").manual_seed(n + d)
        x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        y = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        s = torch.tensor(math.log(1 / 0.07), device=device).exp().detach().requires_grad_()
        step = _step(provider)
        for _ in range(max(1, warmup) - 1):
            step(x, y, s)
        sync()
        memory = PeakMemory(device) if memory_measured(device) else None
        if memory is not None:
            memory.start()
        try:
            step(x, y, s)  # the last warm-up run: its peak is the point's
            sync()
        finally:
            # Also after an error: on the CPU this restores the allocator's
            # thresholds that start() lowered.
            peak = None if memory is None else int(memory.peak())
        result["peak_extra_bytes"] = peak
        deadline = time.perf_counter() + max_seconds
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            step(x, y, s)
            sync()
            result["times_ms"].append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > deadline:
                break
        result["time_ms"] = statistics.median(result["times_ms"])
    except Exception as err:  # noqa: BLE001 - an OOM or a failing provider is reported
        result["status"] = "oom" if _is_oom(err) else (
            f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
    finally:
        del x, y, s
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt_bytes(value: Optional[int]) -> str:
    if value is None:
        return "mem n/a"
    if abs(value) >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    return f"{value / 2**20:.1f} MiB"


def _cell(result: Optional[dict], provider: str) -> str:
    if result is None:
        return "-"
    if result["status"] == "skip":
        return "skipped"
    if result["status"] == "oom":
        return "OOM"
    if result["status"] != "ok":
        return "error"
    if provider == "gemm4_bound":
        return f"{result['time_ms']:.2f} ms"
    return f"{result['time_ms']:.2f} ms, {_fmt_bytes(result['peak_extra_bytes'])}"


def run_timing(report: Report, device, backends: Sequence[str], quick: bool) -> List[dict]:
    """Times every native backend of ``backends`` and the baselines; prints
    the table; returns the measured points in the auto table's format."""
    import torch

    from ._inputs import check_inputs
    from .autoselect import CANDIDATES
    from .backends import REGISTRY
    from .devices import device_name

    shapes, dt = TIMING[(device.type, quick)]
    warmup, reps, max_seconds = REPEATS[(device.type, quick)]
    dtype = _dtype(dt)
    native = [b for b in backends if REGISTRY[b].native(device, (dtype, dtype))]
    not_native = [b for b in backends if b not in native and b != "reference"]
    providers = native + list(BASELINES)
    skips: Dict[str, str] = {}
    if device.type == "cpu" and quick:
        skips["compile"] = ("torch.compile of the plain loss takes about a minute to compile on "
                            "a CPU; run without --quick to include it")
    else:
        try:
            import torch._dynamo  # noqa: F401
        except Exception as err:  # noqa: BLE001
            skips["compile"] = f"torch.compile is unavailable here ({type(err).__name__}: {err})"
    if device.type == "cuda":
        memory_note = ("peak CUDA memory allocated above the inputs "
                       "(torch.cuda.max_memory_allocated)")
    elif memory_measured(device):
        memory_note = ("peak resident memory of the process above the inputs (Linux VmHWM, "
                       "reset before each point; includes the allocator's slack)")
    else:
        memory_note = "memory not measured (this system cannot reset a process's peak RSS)"
    report.text("")
    report.text(f"== speed: CLIP forward+backward, {dt}, median of up to {reps} runs after "
                f"{warmup} warm-up, with {memory_note}; the gradients are included")
    probe = torch.zeros(2, 2, dtype=dtype, device=device)
    for name in not_native:
        problem = REGISTRY[name].problem(check_inputs(probe, probe, 1.0))
        reason = (f"not native here: {problem}" if problem is not None else
                  "it runs here only through Triton's interpreter or an emulation, which says "
                  "nothing of its speed (auto never picks it here)")
        report.emit({"kind": "timing", "provider": name, "status": "skip", "reason": reason,
                     "device": device.type, "dtype": dt}, f"skip  {name}: {reason}")
    for name, reason in skips.items():
        report.emit({"kind": "timing", "provider": name, "status": "skip", "reason": reason,
                     "device": device.type, "dtype": dt},
                    f"skip  {BASELINE_TITLES[name]}: {reason}")
    results: Dict[Tuple[int, int, str], dict] = {}
    jobs = [(n, d, p) for (n, d) in shapes for p in providers if p not in skips]
    with _progress(report, len(jobs), "speed", "pt") as bar:
        for n, d, provider in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{provider} {n}x{d}")
            result = measure(provider, n, d, dtype, device, 2 if provider == "compile" else warmup,
                             reps, max_seconds)
            results[(n, d, provider)] = result
            record = {"kind": "timing", "provider": provider, "n": n, "d": d, "dtype": dt,
                      "device": device.type, **result}
            record["time_ms"] = None if result["time_ms"] is None else round(result["time_ms"], 4)
            record["times_ms"] = [round(t, 4) for t in result["times_ms"]]
            failed = provider in native and result["status"].startswith("error")
            if failed:
                record["status"] = "FAIL"
                record["reason"] = result["status"]
                report.emit(record, f"FAIL  {provider} {n}x{d} {dt} while timed: "
                                    f"{result['status']}")
            elif result["status"].startswith("error"):
                # A baseline that cannot run here (torch.compile without a
                # compiler, say) is no failure of clipfast's.
                record["status"] = "skip"
                record["reason"] = result["status"]
                report.emit(record, f"skip  {BASELINE_TITLES.get(provider, provider)} "
                                    f"{n}x{d}: {result['status']}")
            else:
                report.emit(record, None)
            if bar is not None:
                bar.update(1)
    titles = [BASELINE_TITLES.get(p, p) for p in providers]
    header = "| N x d | " + " | ".join(titles) + " |"
    report.text(header)
    report.text("|---|" + "---|" * len(providers))
    points = []
    name = device_name(device)
    for n, d in shapes:
        cells = [_cell(results.get((n, d, p), {"status": "skip"}), p) for p in providers]
        report.text(f"| {n}x{d} | " + " | ".join(cells) + " |")
        measured = {p: results[(n, d, p)] for p in native if p in CANDIDATES
                    and results[(n, d, p)]["status"] == "ok"}
        if measured:
            points.append({
                "device_type": device.type, "device": name, "dtype": dt, "n": n, "d": d,
                "times_ms": {p: round(r["time_ms"], 3) for p, r in measured.items()},
                "peak_extra_bytes": {p: r["peak_extra_bytes"] for p, r in measured.items()},
            })
    return points


def write_cache(points: List[dict]):
    """Merge ``points`` into the per-user cache (a point measured again
    replaces the old one); returns its path."""
    from ._cli import atomic_write_text
    from .autoselect import _key, _load, cache_path

    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        try:
            kept = _load(path)
        except (OSError, ValueError):
            kept = []  # an unreadable cache is replaced whole
    fresh = {_key(p) for p in points}
    merged = sorted([p for p in kept if _key(p) not in fresh] + points, key=_key)
    atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
    return path


# ------------------------------------ main ---------------------------------- #


def main(argv=None, *, restart: bool = False) -> int:
    """Runs the check; returns the exit status (1 on any FAIL).
    ``restart``: allow re-executing the process with TRITON_INTERPRET=1
    (only ``python -m clipfast.check`` does)."""
    args = parse_args(argv)
    interpreter = _arrange_interpreter(restart)
    import torch

    from .backends import REGISTRY

    report = Report(args.json)
    started = time.perf_counter()
    env = environment(interpreter)
    report.emit(dict({"kind": "env"}, **env), "\n".join(_environment_lines(env)))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    backends = args.backends or list(REGISTRY)
    run_accuracy(report, device, backends)
    points: List[dict] = []
    cache = None
    if not args.skip_timing:
        points = run_timing(report, device, backends, args.quick)
        if points and not args.no_cache:
            try:
                cache = write_cache(points)
            except (OSError, RuntimeError) as err:  # RuntimeError: no home folder
                report.emit({"kind": "cache", "status": "error", "reason": str(err)},
                            f"could not write the measured table to the cache: {err}")
        if cache is not None:
            report.emit({"kind": "cache", "status": "written", "path": str(cache),
                         "points": len(points)},
                        f"wrote {len(points)} measured points to {cache} (backend='auto' reads "
                        "them first on this device)")
        _report_auto(report, device, points)
    failed, passed, skipped = report.count("FAIL"), report.count("PASS"), report.count("SKIP")
    status = 1 if failed else 0
    summary = {"kind": "summary", "passed": passed, "failed": failed, "skipped": skipped,
               "seconds": round(time.perf_counter() - started, 1), "exit_status": status}
    report.text("")
    report.emit(summary, f"== {passed} passed, {failed} failed, {skipped} skipped in "
                         f"{summary['seconds']:.0f} s" + ("" if failed else ": all good"))
    if args.out:
        _write_out(args.out, report, points)
    return status


def _report_auto(report: Report, device, points: List[dict]) -> None:
    from .autoselect import explain

    for p in points:
        try:
            choice = explain(device, (_dtype(p["dtype"]),), p["n"], p["d"])
        except Exception as err:  # noqa: BLE001 - a bad override table is the user's to fix
            report.emit({"kind": "auto", "n": p["n"], "d": p["d"], "dtype": p["dtype"],
                         "error": str(err)}, f"auto at {p['n']}x{p['d']}: {err}")
            continue
        report.emit({"kind": "auto", "n": p["n"], "d": p["d"], "dtype": p["dtype"],
                     "backend": choice.backend, "reason": choice.reason},
                    f"auto at {p['n']}x{p['d']} {p['dtype']}: {choice.backend} ({choice.reason})")


def _write_out(folder: str, report: Report, points: List[dict]) -> None:
    from pathlib import Path

    from ._cli import atomic_write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "check.txt", "\n".join(report.lines) + "\n")
    atomic_write_text(out / "check.jsonl", "".join(json.dumps(r) + "\n" for r in report.records))
    if points:
        atomic_write_text(out / "auto_table.json", json.dumps(points, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(restart=True))
