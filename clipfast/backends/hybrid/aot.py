"""Ahead-of-time compilation of the hybrid backend's epilogue kernels, through
its own panel loops (``losses`` / ``panels``), for ``python -m
clipfast.aot_check`` and ``python -m clipfast.perfmodel --backend hybrid``.

Inside ``clipfast.backends.triton.aot.compiling_for`` every Triton launch
compiles for the target instead of running; this module adds what the hybrid
path needs to take, on meta tensors, the path it takes on a CUDA GPU
(``gpu_path``):

* torch.mm / addmm of fp16/bf16 operands to an fp32 result (torch >= 2.8 on
  CUDA; the panels' probe answers yes for meta tensors), so no fp32 copies of
  the operands are made;
* the forward panels' column splits sized for the target's SM count (4 x
  SMs programs, ``launchers._AOT_SM_COUNT``), as ``panels._programs_target``
  sizes them on the GPU;
* autograd off, as inside the custom operators;
* host syncs on meta tensors (``bool(extreme.any())``: a row whose norm is out
  of fp32's range) read as False/0: the common case, whose launches are the
  same as the rare case's (only the operands' values differ).

``MetaGPU`` also records, in order, the GEMMs, the PyTorch ops that move
data and the Triton launches, and follows the bytes allocated (the
performance model prices them: ``trace_step``). The meta tensors' data
pointers carry their offsets, so slices of the kept panels and of the
inverse norms specialise (16-byte aligned or not) as on the GPU; but every
meta storage starts at address 0, so the first kept panel's separate W
buffer passes the panels' "W over its own dots" test (IN_PLACE=True, a
barrier more, the same bytes) where the GPU launches IN_PLACE=False; the
gate compiles IN_PLACE=False with the same specialisations on the later
kept panels.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._ops import KernelOptions
from ..triton import aot as triton_aot
from ..triton import launchers
from . import losses, panels

# The kernels the AOT check holds to "no spill" (they are not matmul main
# loops, but a spill there costs every element of every panel).
EPILOGUE_KERNELS = ("_softmax_stats_kernel", "_merge_stats_kernel", "_sigmoid_sum_kernel",
                    "_grad_panel_kernel")
_DEFAULT_SMS = 132  # outside compiling_for (the H100 SXM's)

_aten = torch.ops.aten
# The overloads torch.mm / addmm dispatch to (the out_dtype ones: torch >= 2.8).
_GEMM_OPS = {getattr(packet, overload): kind
             for packet, kind in ((_aten.mm, "mm"), (_aten.addmm, "addmm"), (_aten.addmm_, "addmm"))
             for overload in ("default", "out", "dtype", "dtype_out") if hasattr(packet, overload)}


@dataclass
class Gemm:
    """One library product the panel loop ran: (m x k) @ (k x n) -> m x n."""

    op: str                # mm / addmm (accumulates into its fp32 output)
    m: int
    k: int
    n: int
    operand_bytes: int     # per operand element
    out_bytes: int         # per output element

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n

    @property
    def min_bytes(self) -> float:
        """HBM bytes it must move at least: both operands read, the output
        written (and read first when it accumulates)."""
        out = self.m * self.n * self.out_bytes * (2 if self.op == "addmm" else 1)
        return (self.m * self.k + self.k * self.n) * self.operand_bytes + out


@dataclass
class TorchOp:
    """One PyTorch op that moves data (not a view, not an allocation)."""

    name: str
    bytes: int             # tensor inputs read plus outputs written


# Ops that launch nothing and move no data.
_NO_WORK = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
            _aten.new_empty.default, _aten.new_empty_strided.default,
            _aten._local_scalar_dense.default}
_WRITE_ONLY = {_aten.zero_.default, _aten.fill_.Scalar, _aten.fill_.Tensor}


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MetaGPU(TorchDispatchMode):
    """Answers host syncs on meta tensors (False / 0), counts PyTorch ops, and
    records the GEMMs, the other ops that move data, and the order of both
    among the Triton launches landing in ``launch_sink`` (``events``: ("gemm",
    Gemm), ("op", TorchOp), ("launch", aot.Launch)).

    ``track_memory``: also follows the bytes of every storage allocated under
    the mode (a storage is live while a Python tensor on it is): ``peak_bytes``
    is the most live at once, inputs created outside excluded."""

    def __init__(self, launch_sink: Optional[list] = None, track_memory: bool = False):
        super().__init__()
        self.ops = 0
        self.host_syncs = 0
        self.gemms: List[Gemm] = []
        self.events: list = []
        self._sink = launch_sink
        self._seen = 0 if launch_sink is None else len(launch_sink)
        self.track_memory = track_memory
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict = {}  # storage key -> [python tensors on it, bytes]

    def flush_launches(self) -> None:
        if self._sink is not None:
            while self._seen < len(self._sink):
                self.events.append(("launch", self._sink[self._seen]))
                self._seen += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.flush_launches()
        if func is _aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.host_syncs += 1
            return False if args[0].dtype == torch.bool else 0
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        kind = _GEMM_OPS.get(func)
        if kind is not None:
            a, b = (args[0], args[1]) if kind == "mm" else (args[1], args[2])
            gemm = Gemm(kind, a.shape[0], a.shape[1], b.shape[1], a.element_size(),
                        out.element_size())
            self.gemms.append(gemm)
            self.events.append(("gemm", gemm))
        elif not (func.is_view or func in _NO_WORK):
            read = inputs[1:] if func in _WRITE_ONLY else inputs
            moved = sum(_nbytes(t) for t in read) + sum(_nbytes(t) for t in _tensors(out))
            if moved:
                self.events.append(("op", TorchOp(str(func.overloadpacket.__name__), moved)))
        if self.track_memory:
            self._track(out, inputs)
        return out

    def _track(self, out, inputs) -> None:
        owned = {t.untyped_storage()._cdata for t in inputs}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self._live.get(key)
            if entry is None:
                if key in owned:
                    continue  # a view of (or written into) a tensor from outside
                entry = self._live[key] = [0, storage.nbytes()]
                self.live_bytes += entry[1]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            entry[0] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]
                self.live_bytes -= entry[1]


@contextlib.contextmanager
def gpu_path(sm_count: Optional[int] = None, launch_sink: Optional[list] = None,
             track_memory: bool = False) -> Iterator[MetaGPU]:
    """Meta tensors through the hybrid panels as CUDA tensors would go (see
    the module docstring); yields the op counter."""
    patched = []

    def patch(name, make):
        if hasattr(panels, name):
            original = getattr(panels, name)
            patched.append((name, original))
            setattr(panels, name, make(original))

    def sms():
        return launchers._AOT_SM_COUNT or sm_count or _DEFAULT_SMS

    patch("half_gemm_has_fp32_out",
          lambda original: lambda device: device.type == "meta" or original(device))
    patch("_probe",  # (device, "mm" / "addmm"), where the panels have it
          lambda original: lambda device, *what: device.type == "meta" or original(device, *what))
    patch("_programs_target",
          lambda original: lambda device: 4 * sms() if device.type == "meta" else original(device))
    try:
        # No autograd: the custom operators run these below it (and torch.mm's
        # out= refuses inputs that require grad).
        with torch.no_grad(), MetaGPU(launch_sink, track_memory) as mode:
            yield mode
            mode.flush_launches()
    finally:
        for name, original in reversed(patched):
            setattr(panels, name, original)


# --------------------------------------------------------------------------- #
# The hybrid entry points, launchers first (the custom operators would send
# meta tensors to their fake implementations, which launch nothing)
# --------------------------------------------------------------------------- #


def _options(normalize, allow_tf32, panel, budget) -> KernelOptions:
    return KernelOptions(normalize, allow_tf32, panel or 0, float(budget))


def clip_phases(x, y, scale, bias, normalize=True, allow_tf32=True, panel=0, budget=0.0):
    """(forward, backward) callables of one CLIP training step."""
    options = _options(normalize, allow_tf32, panel, budget)
    state = {}

    def forward():
        state["out"] = losses.hybrid_forward(x, y, scale, bias, options)

    def backward():
        loss, stats, kept = state.pop("out")
        losses.hybrid_backward(torch.ones_like(loss), x, y, scale, bias, stats, options,
                               x.requires_grad, y.requires_grad, scale.requires_grad, kept)

    return forward, backward


def siglip_phases(x, y, scale, bias, normalize=False, allow_tf32=True, panel=0, budget=0.0,
                  positives=True):
    options = _options(normalize, allow_tf32, panel, budget)
    state = {}

    def forward():
        state["out"] = losses.hybrid_siglip_forward(x, y, scale, bias, options, positives)

    def backward():
        loss, stats, kept = state.pop("out")
        losses.hybrid_siglip_backward(
            torch.ones_like(loss), x, y, scale, bias, stats, options, x.requires_grad,
            y.requires_grad, scale.requires_grad, bias is not None and bias.requires_grad,
            positives, kept)

    return forward, backward


def rows_phases(q, k, scale, bias, normalize=True, allow_tf32=True, panel=0, budget=0.0,
                label_offset=0):
    """One direction (open_clip's local_loss, InfoNCE rows): no column terms."""
    rows = losses.HybridRows(normalize, allow_tf32, panel or 0, float(budget))
    state = {}

    def forward():
        inv_q, inv_k, s, b = rows.prepare(q, k, scale, bias)
        row_max, row_sum, _ = rows.stats(q, k, inv_q, inv_k, s, b, label_offset)
        state["out"] = (inv_q, inv_k, s, b, row_max, torch.log(row_sum))

    def backward():
        inv_q, inv_k, s, b, row_max, row_logsum = state.pop("out")
        coef = torch.ones((), dtype=torch.float32, device=q.device) / q.shape[0]
        rows.grads(q, k, inv_q, inv_k, s, b, (row_max, row_logsum), label_offset, coef,
                   (q.requires_grad, k.requires_grad, scale.requires_grad),
                   (scale.shape, scale.dtype))

    return forward, backward


def _step(phases):
    forward, backward = phases
    with gpu_path():
        forward()
        backward()


# --------------------------------------------------------------------------- #
# Scenarios for clipfast.aot_check
# --------------------------------------------------------------------------- #

_DTYPES = triton_aot._DTYPES
_feat = triton_aot._features
_scale = triton_aot._scale


def scenarios(n: int = 383, d: int = 157) -> List[triton_aot.Scenario]:
    """The epilogues' every constexpr combination the entry points choose, at
    an odd N (the panels' row stride and K not multiples of 16) and, for the
    multiple-of-16 specialisations, at N = 384: each dtype (fp32 writes an
    fp32 W, fp16/bf16 an fp16 one), bias or not, normalisation on/off, SigLIP
    positives on/off, in-place W or kept panels (memory_budget), the rows-only
    loss, scalar gradients only."""
    out: List[triton_aot.Scenario] = []

    def add(label, make, *args, **kwargs):
        out.append(triton_aot.Scenario(f"hybrid {label}",
                                       lambda: _step(make(*args, **kwargs))))

    inf = float("inf")
    for name, dtype in _DTYPES.items():
        for normalize in (True, False):
            for with_bias in (False, True):
                bias = _scale() if with_bias else None
                add(f"clip {name} normalize={normalize} bias={with_bias}", clip_phases,
                    _feat(n, d, dtype), _feat(n, d, dtype), _scale(), bias, normalize)
        # Three kept panels of 128 rows (the first's W buffer passes for
        # in-place on meta tensors: see the module docstring).
        add(f"clip {name} N=384 kept panels", clip_phases, _feat(384, d, dtype),
            _feat(384, d, dtype), _scale(), None, True, panel=128, budget=inf)
        # Panels of 100 rows, two kept: kept and in-place panels in one call,
        # a last panel of 83 rows, panel slices 400 * 4 bytes apart.
        add(f"clip {name} panel=100, two kept", clip_phases, _feat(n, d, dtype),
            _feat(n, d, dtype), _scale(), None, True, panel=100, budget=2 * 100 * n * 4)
        # Slices not 16-byte aligned (rows 0, 99, 198, ... of the kept dots
        # and of the inverse norms).
        add(f"clip {name} panel=99 kept, unaligned slices", clip_phases, _feat(n, d, dtype),
            _feat(n, d, dtype), _scale(), None, True, panel=99, budget=inf)
        add(f"clip {name} scale grad only", clip_phases,
            _feat(n, d, dtype, requires_grad=False), _feat(n, d, dtype, requires_grad=False),
            _scale(), None, True)
        for normalize in (True, False):
            for positives in (True, False):
                add(f"siglip {name} normalize={normalize} positives={positives} bias",
                    siglip_phases, _feat(n, d, dtype), _feat(n, d, dtype), _scale(), _scale(),
                    normalize, positives=positives)
        add(f"siglip {name} no bias", siglip_phases, _feat(n, d, dtype), _feat(n, d, dtype),
            _scale(), None, True)
        add(f"siglip {name} N=384 kept panels", siglip_phases, _feat(384, d, dtype),
            _feat(384, d, dtype), _scale(), _scale(), False, panel=128, budget=inf)
        add(f"siglip {name} panel=100, two kept", siglip_phases, _feat(n, d, dtype),
            _feat(n, d, dtype), _scale(), _scale(), False, panel=100, budget=2 * 100 * n * 4)
        for normalize in (True, False):
            # local_loss: N queries against 3N keys, labels offset by N.
            add(f"rows {name} normalize={normalize} rectangular, label offset", rows_phases,
                _feat(n, d, dtype), _feat(3 * n, d, dtype), _scale(), None, normalize,
                label_offset=n)
        add(f"rows {name} kept panels, bias", rows_phases, _feat(n, d, dtype),
            _feat(n, d, dtype), _scale(), _scale(), True, budget=inf)
    add("clip mixed bf16+fp32", clip_phases, _feat(n, d, torch.bfloat16),
        _feat(n, d, torch.float32), _scale(), None, True)
    return out


def production_scenarios(shapes=None) -> List[triton_aot.Scenario]:
    """The training steps at the anchor shapes (``aot.PRODUCTION_SHAPES``):
    CLIP (normalised) in every dtype with the default budget and, bf16, with
    every panel kept; SigLIP as open_clip calls it (normalize=False, a bias)."""
    shapes = triton_aot.PRODUCTION_SHAPES if shapes is None else shapes
    out: List[triton_aot.Scenario] = []

    def add(label, make, *args, **kwargs):
        out.append(triton_aot.Scenario(f"hybrid {label}",
                                       lambda: _step(make(*args, **kwargs))))

    for n, d in shapes:
        for name, dtype in _DTYPES.items():
            tag = f"{name} N={n} d={d}"
            add(f"clip {tag}", clip_phases, _feat(n, d, dtype), _feat(n, d, dtype), _scale(),
                None, True)
            add(f"siglip {tag}", siglip_phases, _feat(n, d, dtype), _feat(n, d, dtype),
                _scale(), _scale(), False)
        add(f"clip bf16 N={n} d={d} all panels kept", clip_phases,
            _feat(n, d, torch.bfloat16), _feat(n, d, torch.bfloat16), _scale(), None, True,
            budget=math.inf)
    return out


# --------------------------------------------------------------------------- #
# For the performance model: one step's launches, GEMMs and ops per phase
# --------------------------------------------------------------------------- #


@dataclass
class Phase:
    """One pass of a training step, in launch order: ("gemm", Gemm),
    ("op", TorchOp) and ("launch", aot.Launch) events."""

    events: list = field(default_factory=list)
    ops: int = 0           # PyTorch ops dispatched (views and allocations too)
    host_syncs: int = 0

    def of(self, kind: str) -> list:
        return [item for what, item in self.events if what == kind]


@dataclass
class Trace:
    forward: Phase
    backward: Phase
    forward_peak_bytes: int  # most bytes live at once in the forward
    peak_bytes: int          # ... over forward and backward (the gradients included)


def trace_step(n: int, d: int, dtype: torch.dtype, loss: str = "clip", budget: float = 0.0,
               arch: int = 90, sm_count: int = 132, panel: int = 0) -> Trace:
    """One training step (features, scale and, for SigLIP, the bias all
    requiring grad) on meta tensors with every launch compiled for ``arch``:
    its events per pass and the bytes it allocates beyond the inputs. CLIP:
    normalize=True, no bias; SigLIP as open_clip calls it: normalize=False, a
    learnt bias, positives on the diagonal."""
    x, y = _feat(n, d, dtype), _feat(n, d, dtype)
    if loss == "siglip":
        forward, backward = siglip_phases(x, y, _scale(), _scale(), False, panel=panel,
                                          budget=budget)
    else:
        forward, backward = clip_phases(x, y, _scale(), None, True, panel=panel, budget=budget)
    sink: list = []
    with triton_aot.compiling_for(arch, sm_count, sink):
        with gpu_path(sm_count, sink, track_memory=True) as mode:
            forward()
            mode.flush_launches()
            fwd = Phase(list(mode.events), mode.ops, mode.host_syncs)
            forward_peak = mode.peak_bytes
            backward()
            mode.flush_launches()
    bwd = Phase(mode.events[len(fwd.events):], mode.ops - fwd.ops,
                mode.host_syncs - fwd.host_syncs)
    for phase in (fwd, bwd):
        for launch in phase.of("launch"):
            if launch.error:
                raise RuntimeError(f"{launch.kernel} does not compile: {launch.error}")
    return Trace(fwd, bwd, forward_peak, mode.peak_bytes)
