"""A static model of the Triton, CUDA and hybrid backends on an H100, from compiled code.

    python -m clipfast.perfmodel [--shapes 65536x1024,...] [--dtype bf16] [--breakdown NxD]
                                 [--backend triton|cuda|hybrid] [--loss clip|siglip]
                                 [--memory-budget BYTES|inf|none[,...]] [--overlap] [--json]

No GPU is needed and none is measured: the launchers run for the requested
shape with every launch compiled for sm_90 instead of run
(``clipfast/backends/triton/aot.py``), so the model sees the grids, panel counts and
configurations the library would use, and the SASS of every kernel. From the
SASS it counts, per tile, the main loop's instructions and the epilogue's
(instructions and MUFU exponentials outside the matmul loop), and from ptxas
the registers and shared memory that decide how many CTAs share an SM.

Each kernel's time is the slowest of its limits:

* tensor cores: the tile's FLOPs at the rate cuBLAS reaches on the same GPU
  (``GPU.gemm_rate``: the 4-GEMM anchor of DESIGN.md, 49.3 ms for
  N = 65536, d = 1024, i.e. 714 TFLOP/s bf16), a rate the Triton main loop is
  assumed to match when nothing else limits it;
* operand traffic from L2: every tile streams its (BM + BN) x K operands
  through L2 (``GPU.l2_bandwidth``, an assumption: no public number, about
  5.5 TB/s was measured on the 114-SM PCIe H100);
* instruction issue and the MUFU unit for the epilogue, serial with the main
  loop when one CTA fits on an SM, overlapped with the other CTA's main loop
  when two do;
* HBM for the bytes each kernel must move at least once;
* waves: programs are rounded up to whole rounds of SMs x CTAs per SM;
* the host: each launch and each PyTorch op costs CPU time
  (``GPU.host_launch_s``, ``GPU.host_op_s``); a phase whose host time exceeds
  its GPU time is host-bound.

The hybrid backend (``--backend hybrid``: cuBLAS panel products with fp32
results, Triton epilogues without tl.dot) is modelled from its own panel
loops, run on meta tensors (``clipfast/backends/hybrid/aot.py``): every GEMM
torch issues, every Triton launch (compiled for sm_90) and every PyTorch op
that moves data, in order. Its rates and assumptions:

* a GEMM of M x K by K x d: 2 M K d FLOPs at cuBLAS's rate, which the
  measured 4-GEMM anchor at the same shape implies (``GEMM4_MEASURED_MS``:
  8 N^2 d / anchor; 687 TFLOP/s at 32768 x 1024, 714 at 65536 x 1024, 640 at
  131072 x 1024) and elsewhere ``GPU.gemm_rate`` (714 TFLOP/s bf16/fp16, TF32
  at half); no GEMM faster than its minimum HBM bytes (both operands read,
  the fp32 output written, and read as well where it accumulates: dY);
* an epilogue kernel (``_softmax_stats_kernel``, ``_sigmoid_sum_kernel``,
  ``_merge_stats_kernel``, ``_grad_panel_kernel``): the slowest of its
  minimum HBM bytes (the fp32 panel read, W written, partial statistics) at
  ``GPU.hbm_bandwidth`` (90% of 3.35 TB/s), instruction issue (its sm_90
  main-loop SASS instructions per element x elements / (132 SMs x 3 warp
  instructions per clock x 1.755 GHz)) and MUFU (16 lanes per clock per SM);
  a grid of fewer programs than SMs gets that share of the SMs and of HBM;
* the row kernels (the normalisation backward, the inverse norms) and the
  PyTorch ops that move data (fp16 copies, scaling, zeroing): their bytes at
  HBM bandwidth;
* 4 us on the GPU per launch (GEMM, kernel or op); on the host 20 us a
  Triton launch and 6 us a PyTorch op, a pass taking the longer of its GPU
  and host times (the host runs ahead, asynchronously);
* no stream overlap: one stream, so a panel's epilogue waits for its GEMM
  and the next GEMM for the epilogue. ``--overlap`` models what a second
  stream (and a second scratch panel, which the library does not allocate
  today) would give: per pass the slowest of all GEMMs, all other work and
  all bytes at HBM, plus one panel's epilogues (the pipeline's fill);
* peak memory (``hybrid_peak_bytes``): the bytes one training step
  allocates beyond the features, the input gradients included, from the
  backend's own panel sizes (``panels.panel_rows``, ``panels.kept_rows``);
  the meta-path trace also follows every allocation (``traced_peak_bytes``).
  1 GB = 1e9 bytes.

``model_ms(backend, n, d, dtype, loss, memory_budget)`` gives these models'
totals to a backend chooser without compiling anything: it interpolates
``MODEL_TABLE``, computed by ``--write-table`` over ``TABLE_NS x TABLE_DS``.

Everything is a model: numbers printed here are never measurements.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import model_table
from .model_table import MODEL_TABLE, TABLE_DS, TABLE_NS, _variant_key, model_ms  # noqa: F401


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_hz: float
    gemm_rate: Dict[str, float]   # FLOP/s cuBLAS reaches, per dot dtype
    l2_bandwidth: float           # bytes/s into the SMs, all SMs together
    hbm_bandwidth: float          # bytes/s achievable
    issue_per_clk: float          # warp instructions per SM per clock, achieved
    mufu_per_clk: float           # exponentials (lanes) per SM per clock
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    launch_gpu_s: float = 4e-6    # a launch's fixed cost on the GPU
    host_launch_s: float = 20e-6  # Python + Triton launch path, per kernel
    host_op_s: float = 6e-6       # one eager PyTorch op (view, sum, zero_, ...)
    mma_sync_fraction: float = 0.65  # legacy mma.sync (HMMA) against wgmma's rate, sm_90


# H100 SXM 80GB. gemm_rate: DESIGN.md's cuBLAS anchor (bf16; TF32 at half).
# Clock: 1.755 GHz sustained. issue: 4 schedulers at 75% (dependent FP
# chains with two warps each). MUFU: 16 lanes/clk/SM. L2: assumed 10 TB/s.
# mma.sync: Hopper reaches its matrix peak only through wgmma; public
# mma.sync-based kernels (FlashAttention-2) reach roughly half to two thirds
# of what wgmma ones (FlashAttention-3) do on the same H100: assumed 0.65.
H100 = GPU(
    name="H100 SXM (model)",
    sms=132,
    clock_hz=1.755e9,
    gemm_rate={"bf16": 8 * 65536**2 * 1024 / 49.3e-3, "fp16": 8 * 65536**2 * 1024 / 49.3e-3,
               "fp32": 4 * 65536**2 * 1024 / 49.3e-3},
    l2_bandwidth=10e12,
    hbm_bandwidth=3.35e12 * 0.9,
    issue_per_clk=3.0,
    mufu_per_clk=16.0,
)

# 4-GEMM bound measured on an H100 (DESIGN.md), bf16, ms.
GEMM4_MEASURED_MS = {(32768, 512): 6.9, (32768, 1024): 12.8, (65536, 768): 42.0,
                     (65536, 1024): 49.3, (131072, 1024): 220.0}
TORCH_COMPILE_MEASURED_MS = {(32768, 512): 10.0, (32768, 1024): 14.4, (65536, 768): 50.9,
                             (65536, 1024): 56.5, (131072, 1024): 233.0}
# A published fused SigLIP kernel (its authors' H100 measurement, bf16,
# forward + backward): ms and peak GB.
SIGLIP_PUBLISHED = {(65536, 768): (48.8, 1.4)}

# --------------------------------------------------------------------------- #
# SASS
# --------------------------------------------------------------------------- #

_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")
_LABEL_RE = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_RE = re.compile(r"\bBRA(?:\.\w+)*\s+`?\(?(\.L_x_\d+)")
MMA_OPS = ("HGMMA", "HMMA")


@dataclass
class SassProfile:
    """Instruction counts of one kernel, per warp."""

    total: int
    loop_instrs: int            # one iteration of the matmul main loop, common path
    loop_mma: int               # MMA instructions in it
    epilogue_instrs: int        # per tile, outside the main loop, common path
    epilogue_mufu: int
    rare_instrs: int            # in large conditional regions (edge / label tiles)
    has_tile_loop: bool
    opcodes: Counter = field(default_factory=Counter)
    loop_mufu: int = 0          # MUFU instructions in one main-loop iteration, common path


def parse_sass(sass: str):
    """[(opcode, branch_label or None, guarded)], {label: index}."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL_RE.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR_RE.search(line)
        if m:
            b = _BRANCH_RE.search(line)
            instrs.append((m.group(3), b.group(1) if b else None, bool(m.group(2))))
    return instrs, labels


def profile_sass(sass: str, rare_region: int = 64) -> SassProfile:
    instrs, labels = parse_sass(sass)
    loops, forward = [], []
    for i, (op, target, guarded) in enumerate(instrs):
        if target is None or target not in labels:
            continue
        j = labels[target]
        if j <= i:
            loops.append((j, i))
        elif guarded:
            forward.append((i, j))

    def count(lo, hi, pred=lambda op: True):
        return sum(1 for op, _, _ in instrs[lo:hi + 1] if pred(op))

    def is_mma(op):
        return op in MMA_OPS

    def is_fma(op):
        return op == "FFMA"

    # Main loop: the innermost loop holding tensor-core MMAs, else the one
    # densest in FFMAs (the IEEE fp32 path).
    candidates = [lp for lp in loops if count(*lp, is_mma)] or \
        sorted(loops, key=lambda lp: -count(*lp, is_fma) / max(1, lp[1] - lp[0]))[:1]
    main = min(candidates, key=lambda lp: lp[1] - lp[0]) if candidates else None
    outer = None
    if main is not None:
        enclosing = [lp for lp in loops if lp[0] <= main[0] and lp[1] >= main[1] and lp != main]
        outer = min(enclosing, key=lambda lp: lp[1] - lp[0]) if enclosing else None
    lo, hi = outer if outer is not None else (0, len(instrs) - 1)
    # Every innermost matmul loop (a kernel with one per branch, like the
    # panel products' dX / dY halves, has several); a program runs one.
    main_loops = [lp for lp in candidates
                  if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in candidates)]
    in_main = set()
    for a, b in main_loops:
        in_main.update(range(a, b + 1))
    skipped = set()
    for start, stop in forward:
        if stop - start >= rare_region and (lo <= start and stop <= hi + 1 or main is not None
                                             and main[0] <= start and stop <= main[1] + 1):
            if not any(start <= a and b < stop for a, b in main_loops):
                skipped.update(range(start + 1, stop))
    main_common = 0 if main is None else sum(
        1 for k in range(main[0], main[1] + 1) if k not in skipped)
    body = [k for k in range(lo, hi + 1) if k not in in_main]
    common = [k for k in body if k not in skipped]
    share = max(1, len(main_loops)) if outer is None else 1
    return SassProfile(
        total=len(instrs),
        loop_instrs=main_common,
        loop_mma=count(*main, is_mma) if main else 0,
        epilogue_instrs=len(common) // share,
        epilogue_mufu=sum(1 for k in common if instrs[k][0] == "MUFU") // share,
        rare_instrs=len(skipped),
        has_tile_loop=outer is not None,
        opcodes=Counter(op for op, _, _ in instrs),
        loop_mufu=0 if main is None else sum(
            1 for k in range(main[0], main[1] + 1) if k not in skipped and instrs[k][0] == "MUFU"),
    )


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@dataclass
class KernelEstimate:
    phase: str
    kernel: str
    launches: int
    programs: int
    ctas_per_sm: int
    registers: int
    tile: str
    t_mma_us: float        # per tile, tensor cores alone
    t_l2_us: float         # per tile, operand traffic alone
    t_epi_us: float        # per tile, epilogue alone
    gpu_ms: float          # all launches
    hbm_ms: float
    note: str = ""


_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _ctas_per_sm(gpu: GPU, regs: int, warps: int, smem: int) -> int:
    regs_alloc = max(1, math.ceil(regs / 8) * 8) * 32 * warps
    by_regs = gpu.regs_per_sm // regs_alloc
    by_smem = gpu.smem_per_sm // max(1, smem + 1024)
    return max(1, min(by_regs, by_smem, 64 // warps))


def _dtype_name(value) -> str:
    text = str(value)
    for name in ("bf16", "fp16", "fp32"):
        if name in text:
            return name
    return "fp32"


def estimate_launch(gpu: GPU, launch, info, prof: SassProfile, n: int, d: int,
                    feat_bytes: int) -> Tuple[float, float, float, float, float, int, str]:
    """(time s, hbm s, t_mma, t_l2, t_epi) for one launch; tile description."""
    cfg = launch.config
    warps = int(cfg.get("num_warps", 4))
    ctas = _ctas_per_sm(gpu, info.registers, warps, info.shared_bytes)
    dot = _dtype_name(cfg.get("DOT_DTYPE", "fp32"))
    rate_per_sm = gpu.gemm_rate[dot] / gpu.sms
    if dot == "fp32" and cfg.get("INPUT_PRECISION") == "ieee":
        rate_per_sm = 2 * 128 * gpu.clock_hz * 0.8  # FFMA: 128 lanes/clk/SM
    name = launch.kernel
    programs = launch.programs
    if name == "_siglip_forward_kernel":
        # Persistent programs sweeping tiles in grouped order: the tiles in
        # flight at once span GROUP_M row blocks and programs / GROUP_M
        # column blocks, whose rows are what each such wave reads from HBM.
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        m, k = launch.scalars["M"], launch.scalars["K"]
        kdim = d
        tiles = math.ceil(m / bm) * math.ceil(k / bn)
        tiles_per_program = math.ceil(tiles / programs)
        group = int(cfg.get("GROUP_M", 8))
        wave_rows = group * bm + math.ceil(programs / group) * bn
        hbm = math.ceil(tiles / programs) * wave_rows * d * feat_bytes
        tile = f"{bm}x{bn}x{bk}"
        op_bytes = (bm + bn) * kdim * feat_bytes
    elif name in ("_forward_tiles_kernel", "_grad_logits_kernel", "_siglip_grad_kernel"):
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        kdim = d
        if name == "_forward_tiles_kernel":
            rows_split, cols_split = launch.grid[0], launch.grid[1]
            tiles_per_program = math.ceil(math.ceil(n / bm) / rows_split) * \
                math.ceil(math.ceil(n / bn) / cols_split)
            hbm = (cols_split + rows_split) * n * d * feat_bytes
        else:
            tiles_per_program = 1
            hbm = programs * bm * bn * 2 + (launch.grid[0] * bm + launch.grid[1] * bn) * d * feat_bytes
        tile = f"{bm}x{bn}x{bk}"
        op_bytes = (bm + bn) * kdim * feat_bytes
    elif name == "_panel_grads_kernel":
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["BLOCK_K"]
        # Rows of the panel on one side, columns on the other: K is the panel side.
        kdim = (launch.scalars["rows"] + launch.scalars["cols"]) // 2
        tiles_per_program = 1
        tile = f"{bm}x{bn}x{bk}"
        op_bytes = (bm * kdim * 2) + kdim * bn * feat_bytes
        side = kdim
        acc_bytes = 8 if not cfg.get("SPLIT_ACC_Y") else 7  # fp32 RMW / split
        hbm = 2 * side * side * 2 + 2 * side * d * (feat_bytes + acc_bytes)
    else:  # row-wise kernels: memory-bound
        rows = programs * int(cfg.get("BLOCK_R", 8))
        hbm = rows * d * (feat_bytes + 8)
        t = hbm / gpu.hbm_bandwidth + gpu.launch_gpu_s
        return t, hbm / gpu.hbm_bandwidth, 0.0, 0.0, 0.0, ctas, "rows"

    if arch_uses_mma_sync(prof):
        rate_per_sm *= gpu.mma_sync_fraction
    t_tile_sm, t_mma, t_l2, t_epi = tile_time(gpu, prof, warps, ctas, bm * bn, kdim, bk,
                                              op_bytes, rate_per_sm)
    t = launch_time(gpu, t_tile_sm, ctas, programs, tiles_per_program)
    t_hbm = hbm / gpu.hbm_bandwidth
    return max(t, t_hbm), t_hbm, t_mma, t_l2, t_epi, ctas, tile


def arch_uses_mma_sync(prof: SassProfile) -> bool:
    """Tensor cores through HMMA (mma.sync) rather than HGMMA (wgmma)."""
    return prof.opcodes.get("HMMA", 0) > 0 and prof.opcodes.get("HGMMA", 0) == 0


def tile_time(gpu: GPU, prof: SassProfile, warps: int, ctas: int, tile_elems: int, kdim: float,
              block_k: int, op_bytes: float, rate_per_sm: float):
    """(SM time per tile, t_mma, t_l2, t_epilogue) in seconds: the main loop
    is the slowest of tensor cores, L2 operand traffic and its instruction
    issue; the epilogue runs after it in the same CTA, hidden behind another
    CTA's main loop only when two or more fit on an SM."""
    clk = gpu.clock_hz
    t_mma = 2 * tile_elems * kdim / rate_per_sm
    t_l2 = op_bytes / (gpu.l2_bandwidth / gpu.sms)
    t_loop_issue = warps * prof.loop_instrs * math.ceil(kdim / block_k) / gpu.issue_per_clk / clk
    t_main = max(t_mma, t_l2, t_loop_issue)
    t_epi = max(warps * prof.epilogue_instrs / gpu.issue_per_clk,
                warps * prof.epilogue_mufu * 32 / gpu.mufu_per_clk) / clk
    t_sm = max(t_main, t_epi, (t_main + t_epi) / ctas) if ctas >= 2 else t_main + t_epi
    return t_sm, t_mma, t_l2, t_epi


def launch_time(gpu: GPU, t_tile_sm: float, ctas: int, programs: int,
                tiles_per_program: int = 1) -> float:
    """Whole rounds of SMs x CTAs; within a round each CTA gets 1/ctas of its SM."""
    rounds = math.ceil(programs / (gpu.sms * ctas))
    return (rounds * tiles_per_program * t_tile_sm * min(ctas, math.ceil(programs / gpu.sms))
            + gpu.launch_gpu_s)


# --------------------------------------------------------------------------- #
# Model of one loss call
# --------------------------------------------------------------------------- #


@dataclass
class Estimate:
    n: int
    d: int
    dtype: str
    kernels: List[KernelEstimate]
    phase_gpu_ms: Dict[str, float]
    phase_host_ms: Dict[str, float]
    phase_launches: Dict[str, int]
    phase_ops: Dict[str, int]

    @property
    def phase_ms(self) -> Dict[str, float]:
        return {p: max(self.phase_gpu_ms[p], self.phase_host_ms[p]) for p in self.phase_gpu_ms}

    @property
    def total_ms(self) -> float:
        return sum(self.phase_ms.values())


def _run_launchers(n: int, d: int, dtype, arch: int, sm_count: int, loss: str = "clip"):
    """Forward and backward through the launchers, compiled not run; returns
    the launches and PyTorch ops of each phase.

    CLIP: normalize=True, no bias. SigLIP as open_clip calls it: features
    its model normalised (normalize=False), a learnt bias, positives on the
    diagonal.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from .backends.triton import aot
    from .backends._ops import KernelOptions
    from .backends.triton import clip_loss as kernels
    from .backends.triton import siglip

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    x = torch.empty(n, d, dtype=dtype, device="meta", requires_grad=True)
    y = torch.empty(n, d, dtype=dtype, device="meta", requires_grad=True)
    scale = torch.empty((), device="meta", requires_grad=True)
    launches, ops = {}, {}
    for phase in ("forward", "backward"):
        launches[phase] = []
    if loss == "siglip":
        bias = torch.empty((), device="meta", requires_grad=True)
        options = KernelOptions(False, True, 0)

        def forward():
            return siglip.triton_siglip_forward(x, y, scale, bias, options)

        def backward(value, stats):
            siglip.triton_siglip_backward(torch.ones_like(value), x, y, scale, bias, stats, options,
                                          True, True, True, True)
    else:
        options = KernelOptions(True, True, 0)

        def forward():
            return kernels.triton_forward(x, y, scale, None, options)

        def backward(value, stats):
            kernels.triton_backward(torch.ones_like(value), x, y, scale, None, stats, options,
                                    True, True, True)
    # The launchers themselves, not the custom operator (whose meta-tensor
    # path is its fake implementation, which launches nothing).
    with aot.compiling_for(arch, sm_count, launches["forward"]):
        with CountOps() as fwd_ops:
            value, stats = forward()
    ops["forward"] = fwd_ops.count
    with aot.compiling_for(arch, sm_count, launches["backward"]):
        with CountOps() as bwd_ops:
            backward(value, stats)
    ops["backward"] = bwd_ops.count
    return launches, ops


def estimate(n: int, d: int, dtype: str = "bf16", gpu: GPU = H100, arch: int = 90,
             loss: str = "clip") -> Estimate:
    import torch

    from .backends.triton import aot

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    launches, ops = _run_launchers(n, d, torch_dtype, arch, gpu.sms, loss)
    infos: Dict[tuple, tuple] = {}
    kernels: List[KernelEstimate] = []
    phase_gpu, phase_host, phase_launches = {}, {}, {}
    for phase, phase_launch_list in launches.items():
        groups: Dict[tuple, list] = {}
        for launch in phase_launch_list:
            if launch.error:
                raise RuntimeError(f"{launch.kernel} does not compile: {launch.error}")
            groups.setdefault((launch.kernel, launch.config_key(), launch.grid), []).append(launch)
        total = 0.0
        for (name, key, grid), group in groups.items():
            launch = group[0]
            if (name, key) not in infos:
                info = aot.inspect(launch.compiled)
                infos[(name, key)] = (info, profile_sass(info.sass))
            info, prof = infos[(name, key)]
            t, t_hbm, t_mma, t_l2, t_epi, ctas, tile = estimate_launch(
                gpu, launch, info, prof, n, d, _DTYPE_BYTES[dtype])
            total += t * len(group)
            kernels.append(KernelEstimate(
                phase, name, len(group), launch.programs, ctas, info.registers, tile,
                t_mma * 1e6, t_l2 * 1e6, t_epi * 1e6, t * len(group) * 1e3, t_hbm * len(group) * 1e3,
                note=f"grid {grid}"))
        phase_gpu[phase] = total * 1e3
        phase_launches[phase] = len(phase_launch_list)
        phase_host[phase] = (len(phase_launch_list) * gpu.host_launch_s + ops[phase] * gpu.host_op_s) * 1e3
    return Estimate(n, d, dtype, kernels, phase_gpu, phase_host, phase_launches, ops)


# --------------------------------------------------------------------------- #
# The CUDA backend (csrc/cuda/tiles.cu), from nvcc's SASS
# --------------------------------------------------------------------------- #

_CUDA_TILE = 128          # 128 x 128 output tiles, 8 warps (tiles.cu)
_CUDA_STAGE_BYTES = 64    # bytes of K per row per pipeline stage


def cuda_kernels(arch: int = 90):
    """{kernel: (SassProfile, registers, shared bytes)} of csrc/cuda/tiles.cu
    compiled by nvcc for ``arch``."""
    import os
    import shutil
    import subprocess
    import tempfile

    from .backends.triton.aot import _nvidia_tool
    from .aot_check import REPO, _demangle, _parse_ptxas

    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("the CUDA model needs nvcc (CUDA_HOME or PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "tiles.cubin")
        proc = subprocess.run(
            [nvcc, "-cubin", "-std=c++17", "-O3", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
             f"-I{REPO / 'csrc'}", f"-I{REPO / 'csrc' / 'include'}", "-Xptxas", "-v",
             str(REPO / "csrc" / "cuda" / "tiles.cu"), "-o", cubin],
            capture_output=True, text=True, check=True)
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
    entries = _parse_ptxas(proc.stderr)
    pretty = _demangle([e[0] for e in entries])
    chunks = re.split(r"//-+ \.text\.(\S+) -+", sass)
    by_mangled = {chunks[i]: chunks[i + 1] for i in range(1, len(chunks) - 1, 2)}
    out = {}
    for mangled, regs, _spill, smem in entries:
        if mangled in by_mangled:
            out[pretty[mangled].replace("void ", "")] = (profile_sass(by_mangled[mangled]), regs, smem)
    return out


def estimate_cuda(n: int, d: int, dtype: str = "bf16", gpu: GPU = H100, arch: int = 90,
                  kernels=None) -> Estimate:
    """The CUDA backend's schedule (backends/cuda.py, tiles.cu) on the same
    per-tile model: forward super-tiles, then per p x p panel of G one
    recompute launch and one launch of both products, dX^ finished per row
    panel. Launches come from a C++ loop: host cost ``host_launch_s / 4``."""
    from .backends.cuda import panel_plan

    cpp_type = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}[dtype]
    kernels = cuda_kernels(arch) if kernels is None else kernels
    b = _DTYPE_BYTES[dtype]
    rate = gpu.gemm_rate[dtype] / gpu.sms
    t = _CUDA_TILE
    bk = _CUDA_STAGE_BYTES // b
    smem_dynamic = 67584  # tiles.cu kSmemBytes: three stages, reused for the output tile

    def kernel(prefix):
        for name, value in kernels.items():
            # The gradient panel is instantiated per loss: this is CLIP's.
            if (name.startswith(prefix) and f"<{cpp_type}, true" in name
                    and "SiglipPanel" not in name):
                return name, value
        raise KeyError(f"{prefix}<{cpp_type}, true...> not in the compiled kernels")

    estimates = []

    def timed(phase, prefix, programs, tiles_per_program, kdim, launches=1):
        name, (prof, regs, smem) = kernel(prefix)
        ctas = _ctas_per_sm(gpu, regs, 8, smem + smem_dynamic)
        kernel_rate = rate * (gpu.mma_sync_fraction if arch_uses_mma_sync(prof) else 1.0)
        t_sm, t_mma, t_l2, t_epi = tile_time(gpu, prof, 8, ctas, t * t, kdim, bk,
                                             2 * t * kdim * b, kernel_rate)
        total = launch_time(gpu, t_sm, ctas, programs, tiles_per_program) * launches
        estimates.append(KernelEstimate(phase, name, launches, programs, ctas, regs,
                                        f"{t}x{t}x{bk}", t_mma * 1e6, t_l2 * 1e6, t_epi * 1e6,
                                        total * 1e3, 0.0))
        return total

    blocks = math.ceil(n / t)
    splits = max(1, min(blocks, int((2 * gpu.sms) ** 0.5)))
    fwd = timed("forward", "forward_tiles_kernel", splits * splits, math.ceil(blocks / splits) ** 2, d)
    p, _ = panel_plan(n, d, b, gpu.sms)
    panels = math.ceil(n / p)
    full, last = p, n - (panels - 1) * p
    bwd = 0.0
    for rows, count in ((full, (panels - 1) ** 2), (last, 1), (None, 2 * (panels - 1))):
        if count == 0:
            continue
        r = math.ceil((rows or full) / t)
        c = math.ceil((rows or last) / t)
        bwd += timed("backward", "grad_panel_kernel", r * c, 1, d, count)
        bwd += timed("backward", "panel_products_kernel", (r + c) * math.ceil(d / t), 1,
                     ((rows or full) + (rows or last)) / 2, count)
    # dY^'s 20-bit accumulator read and written per row panel, the finish kernels.
    hbm = (panels * n * d * (b + 0.5) * 2 + 2 * n * d * (b + 8)) / gpu.hbm_bandwidth
    bwd += hbm
    launches = {"forward": 3, "backward": 2 * panels * panels + panels + 2}
    host = {phase: count * gpu.host_launch_s / 4 * 1e3 for phase, count in launches.items()}
    return Estimate(n, d, dtype, estimates, {"forward": fwd * 1e3, "backward": bwd * 1e3},
                    host, launches, {"forward": 0, "backward": 0})


# --------------------------------------------------------------------------- #
# The hybrid backend (backends/hybrid): library GEMMs + Triton epilogues
# --------------------------------------------------------------------------- #

# Kernels modelled from their SASS (instruction issue, MUFU) and their bytes;
# the row kernels (normalisation backward, inverse norms) by their bytes alone.
HYBRID_EPILOGUES = ("_softmax_stats_kernel", "_sigmoid_sum_kernel", "_merge_stats_kernel",
                    "_grad_panel_kernel")
_TORCH_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4,
                "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def hybrid_gemm_rate(n: int, d: int, dtype: str, gpu: GPU = H100) -> Tuple[float, str]:
    """(FLOP/s, where from) of cuBLAS on the panel products: the rate the
    measured four-GEMM anchor at this shape implies (bf16/fp16,
    GEMM4_MEASURED_MS), else ``gpu.gemm_rate`` (the 65536 x 1024 anchor; fp32:
    TF32 at half of it)."""
    if gpu.name == H100.name and dtype in ("bf16", "fp16") and (n, d) in GEMM4_MEASURED_MS:
        return 8 * n * n * d / (GEMM4_MEASURED_MS[(n, d)] * 1e-3), "anchor at this shape"
    return gpu.gemm_rate[dtype], "GPU.gemm_rate"


@dataclass
class HybridItem:
    """One kind of work of a pass (GEMMs of one shape, one kernel config, ...),
    all its launches together."""

    phase: str
    kind: str                # gemm / epilogue / rows / torch
    name: str
    detail: str
    count: int = 0
    compute_ms: float = 0.0  # tensor cores (GEMMs), issue or MUFU (epilogues)
    hbm_ms: float = 0.0      # its minimum bytes at HBM bandwidth
    gpu_ms: float = 0.0      # sum over launches of max(compute, HBM) + launch_gpu_s
    nbytes: float = 0.0
    registers: Optional[int] = None
    per_element: Optional[float] = None  # warp instructions per panel element
    limit: str = ""


@dataclass
class HybridEstimate:
    n: int
    d: int
    dtype: str
    loss: str
    memory_budget: Optional[float]
    panel_rows: int
    kept_rows: int
    items: List[HybridItem]
    phase_gpu_ms: Dict[str, float]
    phase_host_ms: Dict[str, float]
    phase_overlap_gpu_ms: Dict[str, float]
    phase_launches: Dict[str, int]
    phase_ops: Dict[str, int]
    gemm_rate: float
    rate_source: str
    products: int                 # N x d x N products run (4, 3 with every panel kept)
    peak_bytes: int               # analytic (hybrid_peak_bytes)
    peak_parts: Dict[str, int]
    traced_peak_bytes: Optional[int] = None  # allocations followed on the meta path

    def phase_ms(self, overlap: bool = False) -> Dict[str, float]:
        gpu = self.phase_overlap_gpu_ms if overlap else self.phase_gpu_ms
        return {p: max(gpu[p], self.phase_host_ms[p]) for p in gpu}

    @property
    def fwd_ms(self) -> float:
        return self.phase_ms()["forward"]

    @property
    def bwd_ms(self) -> float:
        return self.phase_ms()["backward"]

    @property
    def ms(self) -> float:
        return self.fwd_ms + self.bwd_ms

    @property
    def overlap_ms(self) -> float:
        return sum(self.phase_ms(overlap=True).values())

    @property
    def bound_ms(self) -> float:
        """This path's own N x d x N products at the GEMM rate alone."""
        return self.products * 2 * self.n * self.n * self.d / self.gemm_rate * 1e3

    def kind_ms(self, kind: str) -> float:
        return sum(i.gpu_ms for i in self.items if i.kind == kind)

    def as_json(self, gpu: GPU = H100, overlap: bool = False) -> dict:
        budget = self.memory_budget
        out = {"backend": "hybrid", "loss": self.loss, "n": self.n, "d": self.d,
               "dtype": self.dtype,
               "memory_budget": "inf" if budget is not None and math.isinf(budget) else budget,
               "fwd_ms": round(self.fwd_ms, 3), "bwd_ms": round(self.bwd_ms, 3),
               "ms": round(self.ms, 3), "bound_ms": round(self.bound_ms, 3),
               "peak_bytes": self.peak_bytes, "traced_peak_bytes": self.traced_peak_bytes,
               "gemm_ms": round(self.kind_ms("gemm"), 3),
               "epilogue_ms": round(self.kind_ms("epilogue") + self.kind_ms("rows"), 3),
               "torch_ms": round(self.kind_ms("torch"), 3),
               "host_ms": {p: round(v, 3) for p, v in self.phase_host_ms.items()},
               "panel_rows": self.panel_rows, "kept_rows": self.kept_rows,
               "products": self.products, "gemm_tflops": round(self.gemm_rate / 1e12, 1),
               "gpu": gpu.name, "model": True}
        if overlap:
            out["overlap_ms"] = round(self.overlap_ms, 3)
        return out


def hybrid_peak_bytes(n: int, d: int, dtype: str = "bf16", loss: str = "clip",
                      memory_budget: Optional[float] = None, panel: int = 0
                      ) -> Tuple[int, Dict[str, int], str]:
    """(peak bytes, what is live then, when) of one hybrid training step, N x N,
    beyond the features themselves, the input gradients included (both
    features, the scale and for SigLIP the bias requiring grad; fp16/bf16 or
    fp32 features on CUDA with torch's fp32-result half GEMMs).

    Panel sizes are the backend's own (``panels.panel_rows`` / ``kept_rows``).
    Live at the backward's peak: the forward's statistics and kept panels, the
    fp16 copies of X and Y (half features), the input gradient of X, dY's fp32
    accumulator, the fp32 scratch panel (unless every panel is kept), the W
    buffer of kept panels (theirs stay intact) and two fp32 dX panel row
    blocks (a panel's and the next one's, while it is allocated). Also
    compared: the fp16 copies' fp32 temporaries (8 bytes an element of one
    side while it is converted), the end of the backward (grad Y instead of
    the scratch panel) and the forward (kept + scratch + statistics; its
    column partials, P K / 8 bytes for 64-row blocks, left out: dY's
    accumulator, later, is larger whenever d > P / 32)."""
    from .backends.hybrid import panels as hp

    budget = 0.0 if memory_budget is None else float(memory_budget)
    b = _DTYPE_BYTES[dtype]
    half = dtype in ("bf16", "fp16")
    rows = hp.panel_rows(n, n, panel)
    kept_rows = hp.kept_rows(n, n, panel, budget)
    count = math.ceil(n / rows)
    stats = (6 if loss == "clip" else 2) * n * 4
    kept = kept_rows * n * 4
    scratch = rows * n * 4 if kept_rows < n else 0
    w_scratch = rows * n * (2 if half else 4) if kept_rows > 0 else 0
    copies = 2 * n * d * 2 if half else 0
    grad = n * d * b
    y_acc = n * d * 4
    dx_rows = (2 if count > 1 else 1) * rows * d * 4
    loop = {"statistics": stats, "kept panels": kept, "fp16 copies of X, Y": copies,
            "grad X": grad, "dY fp32 accumulator": y_acc, "fp32 scratch panel": scratch,
            "W of kept panels": w_scratch, "dX panel rows (fp32)": dx_rows}
    candidates = {
        "backward panel loop": loop,
        "backward end": {"statistics": stats, "kept panels": kept, "fp16 copies of X, Y": copies,
                         "grad X": grad, "dY fp32 accumulator": y_acc, "grad Y": grad},
        "fp16 copies": {"statistics": stats, "kept panels": kept,
                        "fp16 copies of X, Y": copies // 2,
                        "fp32 temporaries of one side": 8 * n * d if half else 0},
        "forward": {"inverse norms + statistics": (2 + 5) * n * 4, "kept panels": kept,
                    "fp32 scratch panel": scratch},
    }
    where = max(candidates, key=lambda k: sum(candidates[k].values()))
    parts = {k: v for k, v in candidates[where].items() if v}
    return sum(parts.values()), parts, where


def _hybrid_launch_cost(gpu: GPU, launch, info, prof: SassProfile):
    """(compute s, HBM s, bytes, per-element warp instructions or None, limit)
    of one epilogue / row-kernel launch, launch overhead excluded."""
    cfg, sc, name = launch.config, launch.scalars, launch.kernel
    warps = int(cfg.get("num_warps", 4))
    programs = launch.programs
    active = max(1, min(gpu.sms, programs))
    size = {k: _TORCH_BYTES.get(v, 4) for k, v in launch.dtypes.items()}
    per_element = None
    iterations = 0
    if name in ("_softmax_stats_kernel", "_sigmoid_sum_kernel", "_grad_panel_kernel"):
        m, k = sc["M"], sc["K"]
        iterations = launch.grid[0] * math.ceil(k / cfg["BLOCK_N"])
        per_element = warps * prof.loop_instrs / (cfg["BLOCK_M"] * cfg["BLOCK_N"])
        nbytes = m * k * 4
        if name == "_softmax_stats_kernel":
            nbytes += launch.grid[1] * m * 8 + m * 4 * cfg.get("HAS_DIAG", False)
            if cfg.get("WITH_COLS"):
                nbytes += launch.grid[0] * k * 8
        if name == "_grad_panel_kernel":
            nbytes += m * k * size.get("w_ptr", 2)
            nbytes += k * 4 * (1 + 2 * bool(cfg.get("HAS_COL")))
        nbytes += k * 4 * bool(cfg.get("NORMALIZE"))
    elif name == "_merge_stats_kernel":
        parts, k = sc["parts"], sc["K"]
        iterations = programs * parts
        nbytes = parts * k * 8 + k * 8 * (2 if cfg.get("ACCUMULATE") else 1)
    elif name == "_finish_grad_kernel":
        m, dd = sc["M"], sc["D"]
        nbytes = m * dd * (size.get("acc_ptr", 4) + size.get("feat_ptr", 2)
                           + size.get("out_ptr", 2))
    elif name == "_inverse_norms_kernel":
        nbytes = sc["N"] * sc["D"] * size.get("x_ptr", 2)
    else:
        raise KeyError(f"no hybrid model for {name}")
    t_hbm = nbytes / (gpu.hbm_bandwidth * active / gpu.sms)
    t_issue = t_mufu = 0.0
    if iterations:
        instrs = warps * (prof.loop_instrs * iterations + prof.epilogue_instrs * programs)
        t_issue = instrs / (active * gpu.issue_per_clk * gpu.clock_hz)
        t_mufu = (warps * 32 * prof.loop_mufu * iterations
                  / (active * gpu.mufu_per_clk * gpu.clock_hz))
    t_compute = max(t_issue, t_mufu)
    limit = "HBM" if t_hbm >= t_compute else ("issue" if t_issue >= t_mufu else "MUFU")
    return t_compute, t_hbm, nbytes, per_element, limit


def _gemm_detail(g) -> str:
    acc = " +=" if g.op == "addmm" else ""
    return f"{g.m}x{g.k} @ {g.k}x{g.n}{acc} ({g.operand_bytes}B -> fp32)"


_HYBRID_PROFILES: Dict[str, tuple] = {}  # compiled binary's hash -> (CompiledInfo, SassProfile)


def estimate_hybrid(n: int, d: int, dtype: str = "bf16", loss: str = "clip",
                    memory_budget: Optional[float] = None, gpu: GPU = H100,
                    arch: int = 90) -> HybridEstimate:
    """The hybrid backend's training step on ``gpu``: its own panel loops run
    on meta tensors with every Triton launch compiled for ``arch``
    (``backends/hybrid/aot.py``), so the model sees each GEMM, launch (grid,
    config, SASS) and PyTorch op the library would issue."""
    import torch

    from .backends.hybrid import aot as hybrid_aot
    from .backends.hybrid import panels as hp
    from .backends.triton import aot

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    budget = 0.0 if memory_budget is None else float(memory_budget)
    trace = hybrid_aot.trace_step(n, d, torch_dtype, loss, budget, arch, gpu.sms)
    rate, source = hybrid_gemm_rate(n, d, dtype, gpu)
    fp32_rate = gpu.gemm_rate["fp32"]
    profiles = _HYBRID_PROFILES
    items: Dict[tuple, HybridItem] = {}
    phase_gpu, phase_host, phase_overlap, phase_launches, phase_ops = {}, {}, {}, {}, {}
    for phase_name, phase in (("forward", trace.forward), ("backward", trace.backward)):
        gemm_s = other_s = bytes_total = 0.0
        panels = 0
        for what, event in phase.events:
            if what == "gemm":
                flops_rate = rate if event.operand_bytes == 2 else fp32_rate
                t_c, t_m = event.flops / flops_rate, event.min_bytes / gpu.hbm_bandwidth
                key = (phase_name, "gemm", event.op, _gemm_detail(event))
                nbytes, reg, per, limit = event.min_bytes, None, None, (
                    "tensor cores" if t_c >= t_m else "HBM")
            elif what == "launch":
                binary = event.compiled.hash
                if binary not in profiles:
                    info = aot.inspect(event.compiled)
                    profiles[binary] = (info, profile_sass(info.sass))
                info, prof = profiles[binary]
                t_c, t_m, nbytes, per, limit = _hybrid_launch_cost(gpu, event, info, prof)
                kind = "epilogue" if event.kernel in HYBRID_EPILOGUES else "rows"
                if event.kernel in ("_softmax_stats_kernel", "_sigmoid_sum_kernel",
                                    "_grad_panel_kernel"):
                    panels += 1
                key = (phase_name, kind, event.kernel, event.config_key())
                reg = info.registers
            else:
                t_c, t_m = 0.0, event.bytes / gpu.hbm_bandwidth
                key = (phase_name, "torch", event.name, "")
                nbytes, reg, per, limit = event.bytes, None, None, "HBM"
            t = max(t_c, t_m) + gpu.launch_gpu_s
            item = items.get(key)
            if item is None:
                item = items[key] = HybridItem(phase_name, key[1], key[2], key[3],
                                               registers=reg, per_element=per, limit=limit)
            item.count += 1
            item.compute_ms += t_c * 1e3
            item.hbm_ms += t_m * 1e3
            item.gpu_ms += t * 1e3
            item.nbytes += nbytes
            if what == "gemm":
                gemm_s += t
            else:
                other_s += t
            bytes_total += nbytes
        launches = len(phase.of("launch"))
        phase_gpu[phase_name] = (gemm_s + other_s) * 1e3
        # --overlap: each panel's epilogues beside the next panel's GEMMs (a
        # second stream and scratch panel), sharing HBM; one panel's epilogue
        # work cannot hide (the pipeline's fill).
        phase_overlap[phase_name] = (max(gemm_s, other_s, bytes_total / gpu.hbm_bandwidth)
                                     + other_s / max(1, panels)) * 1e3
        phase_host[phase_name] = (launches * gpu.host_launch_s + phase.ops * gpu.host_op_s) * 1e3
        phase_launches[phase_name] = launches
        phase_ops[phase_name] = phase.ops
    total_flops = sum(g.flops for p in (trace.forward, trace.backward) for g in p.of("gemm"))
    products = round(total_flops / (2 * n * n * d))
    peak, parts, _ = hybrid_peak_bytes(n, d, dtype, loss, memory_budget)
    return HybridEstimate(
        n, d, dtype, loss, memory_budget, hp.panel_rows(n, n, 0), hp.kept_rows(n, n, 0, budget),
        list(items.values()), phase_gpu, phase_host, phase_overlap, phase_launches, phase_ops,
        rate, source, products, peak, parts, trace.peak_bytes)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _budget_name(budget: Optional[float]) -> str:
    if budget is None:
        return "none"
    return "inf" if math.isinf(budget) else f"{budget:.3g} B"


def hybrid_header(gpu: GPU = H100) -> str:
    return (f"Model of the hybrid backend's {{loss}} on {gpu.name}: forward + backward "
            "(learnable scale), ms -- a model, not a measurement. GEMMs: 2 M K d FLOPs each at "
            f"cuBLAS's rate from the measured 4-GEMM anchors (per anchor shape, else "
            f"{gpu.gemm_rate['bf16'] / 1e12:.0f} TFLOP/s bf16/fp16, "
            f"{gpu.gemm_rate['fp32'] / 1e12:.0f} TF32), each no faster than its bytes at HBM "
            f"(fp32 output written, dY accumulator read and written); epilogues: max(bytes at "
            f"{gpu.hbm_bandwidth / 1e12:.2f} TB/s HBM, sm_90 SASS instructions x elements / "
            f"({gpu.sms} SMs x {gpu.issue_per_clk:g} issue/clk x {gpu.clock_hz / 1e9:.3f} GHz), "
            f"MUFU at {gpu.mufu_per_clk:g}/clk/SM), scaled to the SMs a grid fills; "
            f"{gpu.launch_gpu_s * 1e6:.0f} us a launch on the GPU; host "
            f"{gpu.host_launch_s * 1e6:.0f} us a Triton launch + {gpu.host_op_s * 1e6:.0f} us a "
            "PyTorch op, a pass taking the longer of GPU and host; no stream overlap "
            "(one stream: a panel's epilogue waits for its GEMM and the next GEMM for it). "
            "Peak: bytes beyond the features, gradients included (1 GB = 1e9 B).")


def format_hybrid_summary(estimates: List["HybridEstimate"], gpu: GPU = H100,
                          overlap: bool = False) -> str:
    title = "SigLIP loss" if estimates and estimates[0].loss == "siglip" else "CLIP loss"
    lines = [hybrid_header(gpu).format(loss=title), "",
             "| dtype | N | d | memory_budget | panel rows | kept rows | forward | backward "
             "| total "
             "| GEMMs | epilogues | torch ops | bound (its GEMMs) | 4-GEMM bound | x 4-GEMM | peak "
             + ("| overlapped " if overlap else "") + "|",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|" if overlap else "")]
    for e in estimates:
        bound4, how = gemm4_ms(e.n, e.d, e.dtype, gpu)
        lines.append(
            f"| {e.dtype} | {e.n} | {e.d} | {_budget_name(e.memory_budget)} | {e.panel_rows} | "
            f"{e.kept_rows} | {e.fwd_ms:.1f} | {e.bwd_ms:.1f} | {e.ms:.1f} | "
            f"{e.kind_ms('gemm'):.1f} | {e.kind_ms('epilogue') + e.kind_ms('rows'):.1f} | "
            f"{e.kind_ms('torch'):.1f} | {e.bound_ms:.1f} ({e.products} GEMMs) | "
            f"{bound4:.1f} ({how}) | {e.ms / bound4:.2f} | {_gb(e.peak_bytes)} |"
            + (f" {e.overlap_ms:.1f} |" if overlap else ""))
    return "\n".join(lines)


def format_hybrid_breakdown(e: "HybridEstimate") -> str:
    lines = [f"Breakdown, hybrid {e.loss} {e.dtype} N={e.n} d={e.d} memory_budget="
             f"{_budget_name(e.memory_budget)} (all launches of each; a model)", "",
             "| phase | kind | what | config / shape | launches | regs | warp instr / element "
             "| compute ms | HBM ms | GPU ms | bound by |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    small: Dict[str, list] = {}
    for i in sorted(e.items, key=lambda i: (i.phase != "forward", -i.gpu_ms)):
        if i.kind == "torch" and i.gpu_ms < 0.05:
            small.setdefault(i.phase, []).append(i)
            continue
        per = f"{i.per_element:.2f}" if i.per_element is not None else ""
        lines.append(f"| {i.phase} | {i.kind} | {i.name} | {i.detail} | {i.count} | "
                     f"{i.registers if i.registers is not None else ''} | {per} | "
                     f"{i.compute_ms:.2f} | {i.hbm_ms:.2f} | {i.gpu_ms:.2f} | {i.limit} |")
    for phase, rest in small.items():
        lines.append(f"| {phase} | torch | {len(rest)} other ops | "
                     f"{', '.join(sorted(i.name for i in rest))} | "
                     f"{sum(i.count for i in rest)} | | "
                     f"| 0.00 | {sum(i.hbm_ms for i in rest):.2f} | "
                     f"{sum(i.gpu_ms for i in rest):.2f} | HBM, launches |")
    for phase in e.phase_gpu_ms:
        lines.append(f"\n{phase}: GPU {e.phase_gpu_ms[phase]:.1f} ms, host "
                     f"{e.phase_host_ms[phase]:.1f} ms ({e.phase_launches[phase]} Triton launches, "
                     f"{e.phase_ops[phase]} PyTorch ops), overlapped GPU "
                     f"{e.phase_overlap_gpu_ms[phase]:.1f} ms")
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in e.peak_parts.items())
    lines.append(f"\npeak {_gb(e.peak_bytes)}: {parts}; traced on the meta path: "
                 f"{_gb(e.traced_peak_bytes or 0)}")
    return "\n".join(lines)


def gemm4_ms(n: int, d: int, dtype: str, gpu: GPU = H100) -> Tuple[float, str]:
    if dtype in ("bf16", "fp16") and (n, d) in GEMM4_MEASURED_MS:
        return GEMM4_MEASURED_MS[(n, d)], "measured"
    return 8 * n * n * d / gpu.gemm_rate[dtype] * 1e3, "rate"


def format_summary(estimates: List[Estimate], gpu: GPU = H100, backend: str = "triton",
                   loss: str = "clip") -> str:
    if loss == "siglip":
        title, other = "SigLIP loss", "published fused SigLIP (measured)"
    else:
        title, other = "CLIP loss", "torch.compile (measured)"
    lines = [f"Model of the {backend} backend's {title} on {gpu.name}: forward + backward, ms "
             "(a model from compiled SASS, not a measurement)", "",
             f"| dtype | N | d | forward | backward | total | 4-GEMM bound | x bound | {other} | host-bound phases |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        bound, how = gemm4_ms(e.n, e.d, e.dtype, gpu)
        if loss == "siglip":
            published = SIGLIP_PUBLISHED.get((e.n, e.d)) if e.dtype == "bf16" else None
            theirs = f"{published[0]:.1f} ({published[1]} GB)" if published else "-"
        else:
            tc = TORCH_COMPILE_MEASURED_MS.get((e.n, e.d)) if e.dtype != "fp32" else None
            theirs = f"{tc:.1f}" if tc else "-"
        host_bound = [p for p in e.phase_gpu_ms if e.phase_host_ms[p] > e.phase_gpu_ms[p]]
        lines.append(
            f"| {e.dtype} | {e.n} | {e.d} | {e.phase_ms['forward']:.1f} | {e.phase_ms['backward']:.1f} | "
            f"{e.total_ms:.1f} | {bound:.1f} ({how}) | {e.total_ms / bound:.2f} | "
            f"{theirs} | {', '.join(host_bound) or 'none'} |")
    return "\n".join(lines)


def l2_sensitivity(n: int, d: int, dtype: str, model=None,
                   bandwidths=(7e12, 10e12, 15e12, 20e12)) -> str:
    """The estimate under other L2 bandwidths, the model's least certain input."""
    import dataclasses

    model = model or (lambda n, d, gpu: estimate(n, d, dtype, gpu))
    parts = []
    for bw in bandwidths:
        e = model(n, d, dataclasses.replace(H100, l2_bandwidth=bw))
        bound, _ = gemm4_ms(n, d, dtype)
        parts.append(f"{bw / 1e12:.0f} TB/s: {e.total_ms:.1f} ms ({e.total_ms / bound:.2f}x)")
    return f"L2 bandwidth sensitivity, {dtype} N={n} d={d}: " + "; ".join(parts)


def format_breakdown(e: Estimate) -> str:
    lines = [f"Breakdown, {e.dtype} N={e.n} d={e.d} (per tile: tensor cores / L2 operands / epilogue, us)", "",
             "| phase | kernel | launches | programs | CTAs/SM | regs | tile | t_mma | t_L2 | t_epilogue | GPU ms | HBM ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(e.kernels, key=lambda k: (k.phase != "forward", -k.gpu_ms)):
        lines.append(f"| {k.phase} | {k.kernel} | {k.launches} | {k.programs} | {k.ctas_per_sm} | "
                     f"{k.registers} | {k.tile} | {k.t_mma_us:.2f} | {k.t_l2_us:.2f} | {k.t_epi_us:.2f} | "
                     f"{k.gpu_ms:.2f} | {k.hbm_ms:.2f} |")
    for phase in e.phase_gpu_ms:
        lines.append(f"\n{phase}: GPU {e.phase_gpu_ms[phase]:.1f} ms, host {e.phase_host_ms[phase]:.1f} ms "
                     f"({e.phase_launches[phase]} launches, {e.phase_ops[phase]} PyTorch ops)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# model_ms: the models' totals for a backend chooser, from a shipped table
# --------------------------------------------------------------------------- #

# The shapes the table holds (N x N logits, feature dimension d); fp16 reads
# bf16's entries (the same code at the same rates). Computing a point means
# compiling kernels for sm_90 through the launchers, which patches Triton's
# driver and JITFunction.run process-wide (aot.compiling_for): never done
# inside a process that runs kernels, so model_ms only reads this table.
def _table_variants():
    out = [("triton", loss, dt, "none") for loss in ("clip", "siglip") for dt in ("bf16", "fp32")]
    out += [("cuda", "clip", dt, "none") for dt in ("bf16", "fp32")]
    out += [("hybrid", loss, dt, budget) for loss in ("clip", "siglip") for dt in ("bf16", "fp32")
            for budget in ("none", "inf")]
    return out


def _table_point(variant, n: int, d: int, cuda_kernels=None) -> Optional[float]:
    backend, loss, dtype, budget = variant
    try:
        if backend == "hybrid":
            return estimate_hybrid(n, d, dtype, loss, math.inf if budget == "inf" else None).ms
        if backend == "cuda":
            return estimate_cuda(n, d, dtype, kernels=cuda_kernels).total_ms
        return estimate(n, d, dtype, loss=loss).total_ms
    except Exception as exc:  # a shape a launcher refuses: no entry
        print(f"  {variant} {n}x{d}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _table_row(variant) -> Tuple[str, List[Optional[float]]]:
    kernels = cuda_kernels() if variant[0] == "cuda" else None
    values = []
    for n in TABLE_NS:
        for d in TABLE_DS:
            value = _table_point(variant, n, d, kernels)
            values.append(None if value is None else round(value, 3))
    return _variant_key(*variant), values


def write_table(jobs: int = 1, path: Optional[str] = None) -> Dict[str, List[Optional[float]]]:
    """Compute MODEL_TABLE and rewrite its block in this file (or ``path``)."""
    variants = _table_variants()
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            rows = dict(pool.map(_table_row, variants))
    else:
        rows = dict(_table_row(v) for v in variants)
    _rewrite_table(rows, path)
    return rows


def _rewrite_table(rows: Dict[str, List[Optional[float]]], path: Optional[str] = None) -> None:
    import textwrap

    body = ["MODEL_TABLE: Dict[str, List[Optional[float]]] = {"]
    for key in (_variant_key(*v) for v in _table_variants()):
        values = ", ".join("None" if v is None else f"{v:g}" for v in rows[key]) + "],"
        body.append(f'    "{key}": [')
        body.extend(textwrap.wrap(values, 96, initial_indent=" " * 8, subsequent_indent=" " * 8))
    body.append("}")
    path = path or model_table.__file__
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin = text.index("# BEGIN MODEL TABLE")
    begin = text.index("\n", begin) + 1
    end = text.index("# END MODEL TABLE")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:begin] + "\n".join(body) + "\n" + text[end:])


def _budget_arg(text: str) -> Optional[float]:
    text = text.strip().lower()
    if text in ("", "none"):
        return None
    value = float(text)
    if math.isnan(value) or value < 0:
        raise ValueError(text)
    return value


def _json_line(backend, loss, e, dtype, memory_budget, gpu=H100) -> dict:
    bound, _ = gemm4_ms(e.n, e.d, dtype, gpu)
    return {"backend": backend, "loss": loss, "n": e.n, "d": e.d, "dtype": dtype,
            "memory_budget": "inf" if memory_budget is not None and math.isinf(memory_budget)
            else memory_budget,
            "fwd_ms": round(e.phase_ms["forward"], 3), "bwd_ms": round(e.phase_ms["backward"], 3),
            "ms": round(e.total_ms, 3), "bound_ms": round(bound, 3), "gemm4_ms": round(bound, 3),
            "peak_bytes": None, "gpu": gpu.name, "model": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipfast.perfmodel",
        description="Static H100 model of the triton, cuda and hybrid backends (no GPU).")
    parser.add_argument("--shapes", default="32768x512,32768x1024,65536x768,65536x1024,131072x1024",
                        help="comma-separated NxD")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda", "hybrid"],
                        help="which backend's kernels and schedule to model")
    parser.add_argument("--loss", default="clip", choices=["clip", "siglip"],
                        help="the CLIP (softmax) or SigLIP (sigmoid) loss; siglip: triton, hybrid")
    parser.add_argument("--memory-budget", default="none", metavar="BYTES|inf|none[,...]",
                        help="hybrid: bytes the forward may keep for the backward (default none; "
                             "a comma-separated list models each); the others ignore it")
    parser.add_argument("--overlap", action="store_true",
                        help="hybrid: also model each panel's epilogues beside the next panel's "
                             "GEMMs on a second stream (the library does not do this today)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per line (shape x budget) instead of tables")
    parser.add_argument("--breakdown", default="65536x1024",
                        help="NxD whose per-kernel breakdown to print ('' for none)")
    parser.add_argument("--write-table", action="store_true",
                        help="recompute MODEL_TABLE (model_ms's grid) and rewrite it in this file")
    parser.add_argument("--jobs", type=int, default=1, help="--write-table: processes")
    args = parser.parse_args(argv)
    if args.write_table:
        write_table(args.jobs)
        return 0
    shapes = []
    for item in args.shapes.split(","):
        try:
            n, d = (int(v) for v in item.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes: {item!r} is not NxD")
        if n < 2 or d < 1:
            parser.error(f"--shapes: {item!r} needs N >= 2 and D >= 1")
        shapes.append((n, d))
    try:
        budgets = [_budget_arg(b) for b in args.memory_budget.split(",")]
    except ValueError:
        parser.error(f"--memory-budget: {args.memory_budget!r} is not BYTES, inf or none")
    if args.loss == "siglip" and args.backend == "cuda":
        parser.error("--loss siglip is modelled for --backend triton and hybrid only")
    if args.overlap and args.backend != "hybrid":
        parser.error("--overlap models the hybrid backend only")
    if args.backend == "hybrid":
        estimates = [estimate_hybrid(n, d, args.dtype, args.loss, b)
                     for b in budgets for n, d in shapes]
        if args.json:
            for e in estimates:
                print(json.dumps(e.as_json(overlap=args.overlap)))
            return 0
        print(format_hybrid_summary(estimates, overlap=args.overlap))
        if args.breakdown:
            bn, bd = (int(v) for v in args.breakdown.lower().split("x"))
            for b in budgets:
                chosen = [e for e in estimates if (e.n, e.d) == (bn, bd) and e.memory_budget == b]
                print()
                print(format_hybrid_breakdown(
                    chosen[0] if chosen else estimate_hybrid(bn, bd, args.dtype, args.loss, b)))
        return 0
    if args.backend == "cuda":
        compiled = cuda_kernels()

        def model(n, d, gpu=H100):
            return estimate_cuda(n, d, args.dtype, gpu, kernels=compiled)
    else:
        def model(n, d, gpu=H100):
            return estimate(n, d, args.dtype, gpu, loss=args.loss)
    estimates = [model(n, d) for n, d in shapes]
    if args.json:
        for e in estimates:
            for b in budgets:  # ignored by these backends: the same numbers
                print(json.dumps(_json_line(args.backend, args.loss, e, args.dtype, b)))
        return 0
    print(format_summary(estimates, backend=args.backend, loss=args.loss))
    if args.breakdown:
        bn, bd = (int(v) for v in args.breakdown.lower().split("x"))
        chosen = [e for e in estimates if (e.n, e.d) == (bn, bd)] or [model(bn, bd)]
        print()
        print(format_breakdown(chosen[0]))
        print()
        print(l2_sensitivity(bn, bd, args.dtype, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
