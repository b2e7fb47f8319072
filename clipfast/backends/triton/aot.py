"""Ahead-of-time compilation of the Triton kernels for GPUs this process lacks.

Triton's interpreter runs the kernels' arithmetic but never compiles them, so
it cannot see errors that only the compiler raises (a bf16 backward that
passed every interpreter test once failed to compile for sm_90 at all), nor
registers, spills or shared memory. Here the kernels are compiled for a real
target (``GPUTarget("cuda", 90, 32)``) through the launchers' own argument
binding: a stand-in Triton driver reports the target GPU, and every kernel
launch the launchers make becomes a compile-only ``warmup``. So every
constexpr/config combination a launcher can choose for some input is the one
compiled here, with the grid it would launch.

Inputs are meta tensors (no memory, 16-byte aligned as far as Triton's
specialisation can tell) or, for the unaligned variants, small CPU tensors.
No GPU, CUDA driver or ``TRITON_INTERPRET`` is involved; Triton's wheel ships
ptxas, cuobjdump and nvdisasm.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import triton
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .._ops import KernelOptions
from . import backward_kernels, clip_loss, forward_kernels, launchers, siglip, tile_math

# The GPUs the checks compile for: compute capability and SM count (grids are
# sized per SM). sm_80 stands for the A100, sm_90 for the H100 SXM.
TARGETS: Dict[str, Tuple[int, int]] = {"sm_80": (80, 108), "sm_90": (90, 132)}
# Per-block shared memory limits (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Launch:
    """One kernel launch a launcher made, compiled instead of run."""

    kernel: str
    config: Dict[str, object]          # constexpr arguments and compile options
    grid: Tuple[int, ...]
    scalars: Dict[str, int] = field(default_factory=dict)  # integer arguments by name
    dtypes: Dict[str, str] = field(default_factory=dict)   # tensor arguments' dtypes by name
    compiled: Optional[object] = None  # triton CompiledKernel
    error: Optional[str] = None

    @property
    def programs(self) -> int:
        total = 1
        for g in self.grid:
            total *= int(g)
        return total

    def config_key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))


@dataclass
class Scenario:
    label: str
    run: Callable[[], None]
    launches: List[Launch] = field(default_factory=list)


class _TargetDriver:
    """The part of a Triton driver that compilation asks for, reporting ``target``."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("ahead-of-time compilation has no device")

    def get_benchmarker(self):
        raise RuntimeError("ahead-of-time compilation has no device to benchmark")


def _jit_functions() -> List[JITFunction]:
    # By identity: the kernel modules import tile_math's helpers. The hybrid
    # backend's epilogues compile through the same launches (its panel loops):
    # their per-device caches must be cleared between targets too, or a second
    # target would get the first one's binaries.
    from ..hybrid import epilogue_kernels

    found = {id(v): v for module in (tile_math, forward_kernels, backward_kernels,
                                     epilogue_kernels)
             for v in vars(module).values() if isinstance(v, JITFunction)}
    return list(found.values())


def _error_summary(exc: BaseException) -> str:
    """The innermost cause's message and where the outermost one points."""
    causes = [exc]
    while causes[-1].__cause__ is not None and len(causes) < 8:
        causes.append(causes[-1].__cause__)
    inner = causes[-1]
    # Triton's CompilationError carries (source, node, message) as args.
    message = inner.args[-1] if getattr(inner, "args", None) else inner
    where = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(inner).__name__}: {message}" + (f" ({where})" if where else "")


@contextlib.contextmanager
def compiling_for(arch: int, sm_count: int, sink: List[Launch]) -> Iterator[None]:
    """Within this block, kernel launches compile for ``arch`` and land in ``sink``."""
    from triton.backends.compiler import GPUTarget

    if launchers.interpreter_active():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    original_run = JITFunction.run
    jit_functions = _jit_functions()

    def compile_only(self, *args, grid, warmup, **kwargs):
        constexprs = {p.name for p in self.params if p.is_constexpr}
        config = {k: v for k, v in kwargs.items() if k in constexprs or k in
                  ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")}
        scalars = {p.name: a for p, a in zip(self.params, args)
                   if isinstance(a, int) and not isinstance(a, bool)}
        dtypes = {p.name: str(a.dtype).replace("torch.", "") for p, a in zip(self.params, args)
                  if isinstance(a, torch.Tensor)}
        launch = Launch(self.fn.__name__, config, tuple(int(g) for g in grid), scalars, dtypes)
        try:
            launch.compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # every failure lands in the table, not just the first
            launch.error = _error_summary(exc)
        sink.append(launch)
        return None

    # Restored by hand: resetting would create the default driver, which
    # fails on a machine without a GPU.
    previous_driver = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    # Binders and compiled kernels are cached per device index, and device 0
    # stands for every target here.
    for fn in jit_functions:
        fn.device_caches.clear()
    JITFunction.run = compile_only
    launchers._AOT_SM_COUNT = sm_count
    try:
        yield
    finally:
        launchers._AOT_SM_COUNT = None
        JITFunction.run = original_run
        driver.set_active(previous_driver)
        for fn in jit_functions:
            fn.device_caches.clear()


# --------------------------------------------------------------------------- #
# What the launchers can be asked to do
# --------------------------------------------------------------------------- #


def _features(n: int, d: int, dtype: torch.dtype, aligned: bool = True, requires_grad=True):
    if aligned:
        t = torch.empty(n, d, dtype=dtype, device="meta")
    else:
        # A row stride of d + 1 and a storage offset of one element: neither
        # the base pointer nor the strides are multiples of 16 bytes.
        t = torch.zeros(n * (d + 1) + 1, dtype=dtype)[1:].as_strided((n, d), (d + 1, 1))
    return t.requires_grad_(requires_grad)


def _scale(device="meta", requires_grad=True):
    return torch.empty((), dtype=torch.float32, device=device).requires_grad_(requires_grad)


def _clip_step(x, y, scale, bias, normalize, allow_tf32, panel=None):
    # The launchers themselves: the custom operator would send meta tensors to
    # its fake implementation, which launches nothing.
    options = KernelOptions(normalize, allow_tf32, panel or 0)
    loss, stats = clip_loss.triton_forward(x, y, scale, bias, options)
    clip_loss.triton_backward(torch.ones_like(loss), x, y, scale, bias, stats, options,
                              x.requires_grad, y.requires_grad, scale.requires_grad)


def _row_ce_step(q, k, scale, bias, normalize, offset, allow_tf32):
    loss = clip_loss.TritonRowCrossEntropyFunction.apply(q, k, scale, bias, normalize, offset,
                                                         allow_tf32, None)
    loss.backward()


def _ring_block_step(x, y, normalize, allow_tf32, diag_offset):
    """The ring's per-block work (distributed.TritonBlockOps): statistics with
    column partials, fp32 accumulators on both sides, then the finish."""
    ops = clip_loss.TritonBlockOps(x, y, normalize, 0, allow_tf32)
    s, b = ops.scalars(torch.ones((), device=x.device), None)
    inv_x, inv_y = ops.inverse_norms(x), ops.inverse_norms(y)
    rmax, rsum, cmax, csum, _ = ops.stats(x, inv_x, y, inv_y, s, b, diag_offset)
    x_acc = ops.new_accumulator(x.shape[0], x.shape[1], x.device)
    y_acc = ops.new_accumulator(y.shape[0], y.shape[1], y.device)
    ops.grads(x, inv_x, y, inv_y, s, b, (rmax, rsum), (cmax, csum), diag_offset, x_acc, y_acc)
    ops.finish(x_acc, x, inv_x, s, torch.ones(1, device=x.device))


def _siglip_step(x, y, scale, bias, normalize, allow_tf32, positives=True, panel=None):
    # The SigLIP launchers directly, as for the CLIP loss (meta tensors would
    # reach only the operator's fake implementation).
    options = KernelOptions(normalize, allow_tf32, panel or 0)
    loss, stats = siglip.triton_siglip_forward(x, y, scale, bias, options, positives)
    siglip.triton_siglip_backward(torch.ones_like(loss), x, y, scale, bias, stats, options,
                                  x.requires_grad, y.requires_grad, scale.requires_grad,
                                  bias is not None and bias.requires_grad, positives)


def _siglip_scenarios(n: int, d: int) -> List[Scenario]:
    out: List[Scenario] = []

    def add(label, *args, **kwargs):
        out.append(Scenario(label, lambda: _siglip_step(*args, **kwargs)))

    for name, dtype in _DTYPES.items():
        for tf32 in ([True, False] if dtype == torch.float32 else [True]):
            tag = name + ("" if dtype != torch.float32 else ("/tf32" if tf32 else "/ieee"))
            for normalize in (True, False):
                add(f"siglip {tag} normalize={normalize} bias", _features(n, d, dtype),
                    _features(n, d, dtype), _scale(), _scale(), normalize, tf32)
            add(f"siglip {tag} no bias, negatives only", _features(n, d, dtype),
                _features(n, d, dtype), _scale(), None, True, tf32, positives=False)
            add(f"siglip {tag} grad y only", _features(n, d, dtype, requires_grad=False),
                _features(n, d, dtype), _scale(requires_grad=False), _scale(requires_grad=False),
                True, tf32)
            add(f"siglip {tag} several panels", _features(n, d, dtype), _features(n, d, dtype),
                _scale(), _scale(), True, tf32, panel=128)
            add(f"siglip {tag} d={d - 3}", _features(n, d - 3, dtype), _features(n, d - 3, dtype),
                _scale(), _scale(), False, tf32)
    add("siglip bf16 unaligned", _features(n, d, torch.bfloat16, aligned=False),
        _features(n, d, torch.bfloat16, aligned=False), _scale("cpu"), _scale("cpu"), True, True)
    add("siglip mixed bf16+fp32", _features(n, d, torch.bfloat16), _features(n, d, torch.float32),
        _scale(), _scale(), True, True)
    return out


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def scenarios(n: int = 384, d: int = 160) -> List[Scenario]:
    """Every path the launchers take, on shapes that leave partial tiles in N
    and d (so both the masked edge and, where the launcher has one, the
    unmasked path are compiled)."""
    out: List[Scenario] = []

    def add(label, fn, *args):
        out.append(Scenario(label, lambda: fn(*args)))

    for name, dtype in _DTYPES.items():
        precisions = [True, False] if dtype == torch.float32 else [True]
        for tf32 in precisions:
            tag = name + ("" if dtype != torch.float32 else ("/tf32" if tf32 else "/ieee"))
            for normalize in (True, False):
                for with_bias in (False, True):
                    bias = _scale(requires_grad=True) if with_bias else None
                    add(f"clip {tag} normalize={normalize} bias={with_bias}", _clip_step,
                        _features(n, d, dtype), _features(n, d, dtype), _scale(), bias,
                        normalize, tf32)
            # One side requiring grad at a time (only X: no Y accumulator at all).
            add(f"clip {tag} grad x only", _clip_step, _features(n, d, dtype),
                _features(n, d, dtype, requires_grad=False), _scale(requires_grad=False),
                None, True, tf32)
            add(f"clip {tag} grad y only", _clip_step,
                _features(n, d, dtype, requires_grad=False), _features(n, d, dtype),
                _scale(requires_grad=False), None, True, tf32)
            add(f"clip {tag} several panels", _clip_step, _features(n, d, dtype),
                _features(n, d, dtype), _scale(), None, True, tf32, 128)
            add(f"clip {tag} unaligned", _clip_step,
                _features(n, d, dtype, aligned=False), _features(n, d, dtype, aligned=False),
                _scale("cpu"), None, True, tf32)
            # d not a multiple of 16: aligned storage, unvectorisable rows.
            add(f"clip {tag} d={d - 3}", _clip_step, _features(n, d - 3, dtype),
                _features(n, d - 3, dtype), _scale(), None, True, tf32)
            add(f"local_loss {tag} rectangular, label offset", _row_ce_step,
                _features(n, d, dtype), _features(3 * n, d, dtype), _scale(), None, True, n, tf32)
            add(f"ring block {tag} (no labels)", _ring_block_step,
                _features(n, d, dtype), _features(n, d, dtype), True, tf32, None)
            add(f"ring block {tag} (own block)", _ring_block_step,
                _features(n, d, dtype), _features(n, d, dtype), True, tf32, 0)
    for a, b in (("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "fp16")):
        add(f"clip mixed {a}+{b}", _clip_step, _features(n, d, _DTYPES[a]),
            _features(n, d, _DTYPES[b]), _scale(), None, True, True)
    return out + _siglip_scenarios(n, d)


# The shapes DESIGN.md's anchors were measured at (N, d). Triton specialises
# every integer argument on being 1 or a multiple of 16, and the launchers
# derive many (blocks per split, panel sides, tile counts) from N and d: the
# binaries real batches run are not those of the small shapes above (a
# 128 x 128 CLIP forward tile, tried, compiled clean at N = 384 and spilled
# 448 bytes at N = 65536).
PRODUCTION_SHAPES = ((32768, 512), (32768, 1024), (65536, 768), (65536, 1024), (131072, 1024))


def production_scenarios(shapes=PRODUCTION_SHAPES) -> List[Scenario]:
    """The training-step paths users run, at the anchor shapes: CLIP with
    normalisation in every dtype, SigLIP as open_clip calls it (features its
    model normalised, so normalize=False, and a learnt bias), and the ring's
    per-block work."""
    out: List[Scenario] = []

    def add(label, fn, *args, **kwargs):
        out.append(Scenario(label, lambda: fn(*args, **kwargs)))

    for n, d in shapes:
        for name, dtype in _DTYPES.items():
            tag = f"{name} N={n} d={d}"
            add(f"clip {tag}", _clip_step, _features(n, d, dtype), _features(n, d, dtype),
                _scale(), None, True, True)
            add(f"siglip {tag}", _siglip_step, _features(n, d, dtype), _features(n, d, dtype),
                _scale(), _scale(), False, True)
        add(f"ring block bf16 N={n} d={d}", _ring_block_step,
            _features(n // 8, d, torch.bfloat16), _features(n // 8, d, torch.bfloat16),
            True, True, 0)
    return out


def compile_scenarios(arch: int, sm_count: int,
                      chosen: Optional[List[Scenario]] = None) -> List[Scenario]:
    """Run each scenario's launcher calls with every launch compiled for ``arch``."""
    chosen = scenarios() if chosen is None else chosen
    for scenario in chosen:
        with compiling_for(arch, sm_count, scenario.launches):
            try:
                scenario.run()
            except Exception as exc:  # a launcher bug: report it as a failed launch
                scenario.launches.append(
                    Launch("<launcher>", {}, (), error=f"{type(exc).__name__}: {exc}"))
    return chosen


# --------------------------------------------------------------------------- #
# Reading the compiled code
# --------------------------------------------------------------------------- #


def _nvidia_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


@dataclass
class CompiledInfo:
    registers: int
    spill_bytes: int      # local memory per thread: Triton kernels only use it to spill
    shared_bytes: int     # Triton's dynamic shared memory plus any static
    mma: str              # wgmma / mma.sync / none (tensor-core instruction family)
    ptx: str
    cubin: bytes = field(default=b"", repr=False)
    _sass: Optional[str] = field(default=None, repr=False)

    @property
    def sass(self) -> str:
        """The SASS listing (nvdisasm), on first use: disassembling takes about
        half a second a kernel, and the AOT check reads only the resources."""
        if self._sass is None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "kernel.cubin")
                with open(path, "wb") as f:
                    f.write(self.cubin)
                self._sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", path],
                                            capture_output=True, text=True, check=True).stdout
        return self._sass


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def inspect(compiled) -> CompiledInfo:
    """Registers, spills, shared memory and MMA family of a compiled kernel
    (its SASS on demand: ``CompiledInfo.sass``)."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
    match = _RES_RE.search(usage)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{usage}")
    regs, stack, static_shared, local = (int(g) for g in match.groups())
    ptx = compiled.asm["ptx"]
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "none"
    return CompiledInfo(regs, max(stack, local), compiled.metadata.shared + static_shared, mma,
                        ptx, cubin)
