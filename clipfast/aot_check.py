"""Compile every GPU kernel for sm_80 and sm_90 on a machine without a GPU.

    python -m clipfast.aot_check [--targets sm_80,sm_90] [--no-cuda] [--extra FILE]
                                 [--scenarios REGEX]

Triton kernels are compiled through the launchers (``clipfast/backends/triton/aot.py``)
with every configuration they can choose, the hybrid backend's epilogues
through its panel loops (``clipfast/backends/hybrid/aot.py``); CUDA sources
with nvcc and ptxas' resource report. One table: kernel, config, target, registers, spill bytes,
shared memory, MMA family. Exit status 1 on any compile error, any spill in a
main-loop kernel or a hybrid epilogue kernel, shared memory above the
target's per-block limit, or a tile kernel whose logits could round
differently in forward and backward (FP contraction left on, or an f32 FMA in
a tensor-core tile kernel's PTX).

``--extra FILE`` adds a module's ``aot_scenarios()`` (a list of
``aot.Scenario``); its kernels count as main-loop kernels. The tests use it
to show that broken kernels fail the check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

# The tile kernels hold the matmul main loops; a spill there costs every tile.
MAIN_LOOP_KERNELS = {"_forward_tiles_kernel", "_grad_logits_kernel", "_panel_grads_kernel",
                     "_siglip_forward_kernel", "_siglip_grad_kernel"}
# The hybrid backend's epilogues (hybrid/aot.py EPILOGUE_KERNELS): no matmul
# loop, but they stream every panel element, and must not spill either.
NO_SPILL_KERNELS = {"_softmax_stats_kernel", "_merge_stats_kernel", "_sigmoid_sum_kernel",
                    "_grad_panel_kernel"}
# Tile kernels whose logits must round identically forward and backward.
LOGIT_KERNELS = {"_forward_tiles_kernel", "_grad_logits_kernel",
                 # hybrid: the forward epilogues and the gradient panel's.
                 "_softmax_stats_kernel", "_sigmoid_sum_kernel", "_grad_panel_kernel"}
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    source: str          # triton / cuda
    kernel: str
    config: str
    target: str
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    mma: str = ""
    launches: int = 0
    problems: str = ""
    variants: int = 0    # distinct binaries (integer specialisations) of this config


def _load_extra(path: str):
    spec = importlib.util.spec_from_file_location("clipfast_aot_extra", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def gate_scenarios():
    """The gate's own scenarios: the Triton launchers' (small shapes, then the
    production shapes) and the hybrid panel loops'."""
    from .backends.hybrid import aot as hybrid_aot
    from .backends.triton import aot

    return (aot.scenarios() + aot.production_scenarios() + hybrid_aot.scenarios()
            + hybrid_aot.production_scenarios())


def triton_rows(targets: List[str], extra=None, only_extra: bool = False,
                label_filter: Optional[str] = None) -> List[Row]:
    from .backends.triton import aot

    rows: List[Row] = []
    for target in targets:
        arch, sm_count = aot.TARGETS[target]
        extra_scenarios = extra.aot_scenarios() if extra is not None else []
        extra_labels = {s.label for s in extra_scenarios}
        chosen = [] if only_extra else gate_scenarios()
        chosen += extra_scenarios
        if label_filter:
            chosen = [s for s in chosen if re.search(label_filter, s.label)]
        by_config: Dict[tuple, Row] = {}
        problems: Dict[tuple, List[str]] = {}
        seen = set()
        for scenario in aot.compile_scenarios(arch, sm_count, chosen):
            for launch in scenario.launches:
                key = (launch.kernel, launch.config_key())
                row = by_config.get(key)
                if row is None:
                    row = by_config[key] = Row("triton", launch.kernel, launch.config_key(), target)
                row.launches += 1
                # One row per config, but every distinct binary inspected: the
                # same constexprs compile differently as integer arguments'
                # specialisations (1, multiple of 16) change with the shape.
                binary = launch.error or launch.compiled.hash
                if (key, binary) in seen:
                    continue
                seen.add((key, binary))
                row.variants += 1
                main_loop = launch.kernel in MAIN_LOOP_KERNELS or scenario.label in extra_labels
                found = _triton_problems(aot, launch, row, arch, main_loop,
                                         launch.kernel in NO_SPILL_KERNELS)
                if found and found not in problems.setdefault(key, []):
                    problems[key].append(found)
        for key, row in by_config.items():
            row.problems = "; ".join(problems.get(key, []))
        rows.extend(by_config.values())
    return rows


def _worst(old: Optional[int], new: int) -> int:
    return new if old is None else max(old, new)


def _triton_problems(aot, launch, row: Row, arch: int, main_loop: bool,
                     no_spill: bool = False) -> str:
    """Problems of one compiled binary; the row keeps the worst registers,
    spills and shared memory over its binaries."""
    if launch.error is not None:
        return f"compile error: {launch.error}"
    info = aot.inspect(launch.compiled)
    row.registers = _worst(row.registers, info.registers)
    row.spill_bytes = _worst(row.spill_bytes, info.spill_bytes)
    row.shared_bytes = _worst(row.shared_bytes, info.shared_bytes)
    row.mma = info.mma
    problems = []
    if info.spill_bytes and main_loop:
        problems.append(f"spills {info.spill_bytes} bytes in a main-loop kernel")
    elif info.spill_bytes and no_spill:
        problems.append(f"spills {info.spill_bytes} bytes in a hybrid epilogue kernel")
    if info.shared_bytes > aot.SHARED_LIMIT[arch]:
        problems.append(f"shared memory {info.shared_bytes} > {aot.SHARED_LIMIT[arch]}")
    if launch.kernel in LOGIT_KERNELS:
        if launch.config.get("enable_fp_fusion", True):
            problems.append("FP contraction on: forward/backward logits may round differently")
        elif info.mma != "none" and re.search(r"\bfma\.rn\.f32\b", info.ptx):
            problems.append("f32 FMA in a tile kernel compiled without contraction")
    return "; ".join(problems)


# --------------------------------------------------------------------------- #
# CUDA sources
# --------------------------------------------------------------------------- #

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = {}
    for name, line in zip(names, out.splitlines()):
        line = re.sub(r"clipfast::cuda::(\(anonymous namespace\)::)?", "", line)
        pretty[name] = re.sub(r"\(.*\)$", "", line)  # drop the parameter list
    return pretty


def _sass_mma_counts(obj: str) -> Dict[str, str]:
    """Per mangled kernel: its tensor-core instruction family from the SASS."""
    from .backends.triton.aot import _nvidia_tool

    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", obj],
                          capture_output=True, text=True).stdout
    counts: Dict[str, Dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            counts[current] = {}
            continue
        for op in ("HGMMA", "HMMA", "LDSM", "LDGSTS"):
            if current and re.search(rf"\b{op}\.", line):
                counts[current][op] = counts[current].get(op, 0) + 1
    family = {}
    for fn, c in counts.items():
        mma = "wgmma" if c.get("HGMMA") else "mma.sync" if c.get("HMMA") else "none"
        extras = [f"{op} {c[op]}" for op in ("LDSM", "LDGSTS") if c.get(op)]
        family[fn] = mma + (f" ({', '.join(extras)})" if extras else "")
    return family


def cuda_rows(targets: List[str]) -> List[Row]:
    from .backends.triton.aot import SHARED_LIMIT

    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        return [Row("cuda", "<nvcc>", "", ",".join(targets), problems="nvcc not found")]
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    rows: List[Row] = []
    for target in targets:
        arch = int(target.split("_")[1])
        for src in sources:
            with tempfile.TemporaryDirectory() as tmp:
                obj = os.path.join(tmp, src.stem + ".o")
                proc = subprocess.run(
                    [nvcc, "-std=c++17", "-O3", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                     f"-I{REPO / 'csrc'}", f"-I{REPO / 'csrc' / 'include'}", "-Xptxas", "-v",
                     "-c", str(src), "-o", obj],
                    capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append(Row("cuda", src.name, "", target,
                                    problems="compile error: " + proc.stderr.strip()[-400:]))
                    continue
                mma = _sass_mma_counts(obj)
            entries = _parse_ptxas(proc.stderr)
            pretty = _demangle([e[0] for e in entries])
            for name, regs, spill, smem in entries:
                row = Row("cuda", pretty[name], src.name, target, regs, spill, smem,
                          mma.get(name, "none"), 1)
                problems = []
                if spill:
                    problems.append(f"spills {spill} bytes")
                if smem > SHARED_LIMIT[arch]:
                    problems.append(f"shared memory {smem} > {SHARED_LIMIT[arch]}")
                row.problems = "; ".join(problems)
                rows.append(row)
    return rows


def _parse_ptxas(log: str):
    entries, name, spill = [], None, 0
    for line in log.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            name, spill = m.group(1), 0
            continue
        m = _SPILL_RE.search(line)
        if m and name:
            spill = int(m.group(2)) + int(m.group(3))
            continue
        m = _USED_RE.search(line)
        if m and name:
            entries.append((name, int(m.group(1)), spill, int(m.group(2) or 0)))
            name = None
    return entries


# --------------------------------------------------------------------------- #


def format_table(rows: List[Row]) -> str:
    # regs / spill / smem: the worst over the config's binaries (Triton
    # compiles one per specialisation of its integer arguments).
    lines = ["| source | kernel | config | target | regs | spill B | smem B | MMA | launches "
             "| binaries | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.source} | {r.kernel} | {r.config} | {r.target} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes} | {r.mma} | {r.launches} | "
                     f"{r.variants or 1} | {r.problems or 'ok'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipfast.aot_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="sm_80,sm_90", help="comma-separated, from sm_80,sm_90")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc compiles of csrc/cuda")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--extra", help="a Python file with aot_scenarios() to compile as well")
    parser.add_argument("--only-extra", action="store_true",
                        help="compile only --extra's scenarios (implies --no-cuda)")
    parser.add_argument("--scenarios", metavar="REGEX",
                        help="compile only the scenarios whose label matches (re.search), "
                             "e.g. '^hybrid' (implies --no-cuda)")
    parser.add_argument("--json", help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    from .backends.triton.aot import TARGETS

    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        parser.error(f"--targets: unknown {bad or targets}; choose from {sorted(TARGETS)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")

    import triton

    rows: List[Row] = []
    if args.only_extra and not args.extra:
        parser.error("--only-extra needs --extra")
    if not args.no_triton:
        rows += triton_rows(targets, _load_extra(args.extra) if args.extra else None,
                            args.only_extra, args.scenarios)
    if not (args.no_cuda or args.only_extra or args.scenarios):
        rows += cuda_rows(targets)
    print(f"triton {triton.__version__}, targets {', '.join(targets)}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")
    failed = [r for r in rows if r.problems]
    print(f"\n{len(rows)} kernel configurations, {len(failed)} with problems")
    for r in failed:
        print(f"FAIL {r.source} {r.kernel} [{r.config}] {r.target}: {r.problems}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
