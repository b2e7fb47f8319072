"""How ``backend="auto"`` chooses a backend: from measured benchmark results.

The choice table (``clipfast/auto_table.json``) lists benchmark points, each
with the forward+backward time of every backend measured there::

    {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "dtype": "bf16",
     "n": 65536, "d": 1024, "times_ms": {"triton": ..., "cuda": ..., "chunked": ...}}

For given inputs, ``choose`` keeps the points of the same device type, and
among them those of the same device name and dtype when there are any (fp16
and bf16 stand in for each other, since both run the same half-precision
code), takes the point nearest in (log N, log d), and returns the fastest
backend measured there among those that can run these inputs on this
machine.

The sources, in order, the first with a usable point deciding:

1. ``CLIPFAST_AUTO_TABLE``: a table file named by the user (any device's
   points count, as above);
2. the user's cache written by ``python -m clipfast.check``
   (``cache_path()``: ``$CLIPFAST_CACHE_DIR/auto_table.json``, else
   ``$XDG_CACHE_HOME/clipfast/auto_table.json``, else
   ``~/.cache/clipfast/auto_table.json``); only its points measured on this
   very device count (a home folder shared by several machines may hold
   others'), and a cache that cannot be read is skipped with a warning;
3. the shipped table (``clipfast/auto_table.json``);
4. on CUDA only, ``clipfast.model_table.model_ms``, the static H100 model: the
   fastest modelled backend among those that can run the inputs (skipped
   where the model does not exist or models none of them);
5. the static rule: ``triton`` for CUDA tensors (fp16/bf16/fp32), ``chunked``
   otherwise.

The candidates are the registry's backends (``clipfast.backends.REGISTRY``)
except ``reference``, which holds the N x N logits.

A table is built from ``python -m clipfast.bench`` results by
``python -m clipfast.autoselect RESULTS.jsonl ... --out TABLE.json``, or
measured and cached in one go by ``python -m clipfast.check``.
``python -m clipfast.autoselect --show`` prints the current choices.

Every distinct choice (device and backend) is logged once per process at INFO
on the ``clipfast`` logger, with the measurement behind it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .backends import REGISTRY
from .devices import device_name

# auto's choice where the table has no usable measurement (chunked runs anywhere).
STATIC_ORDER = ("triton", "chunked")

SHIPPED_TABLE = Path(__file__).with_name("auto_table.json")
TABLE_NAME = "auto_table.json"  # the file name of the user's cache, too
# Backends auto may pick: every registered backend but the reference (it holds
# N x N matrices; torch.compile is not a clipfast backend).
CANDIDATES = tuple(name for name in REGISTRY if name != "reference")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64"}
_HALF = ("fp16", "bf16")
_LOG = logging.getLogger("clipfast")
_LOGGED: set = set()
_LOGGED_LOCK = threading.Lock()


class Choice(NamedTuple):
    """What ``auto`` runs, and why (one sentence for logs and tables)."""

    backend: str
    reason: str


_POINT_KEYS = ("device_type", "device", "dtype", "n", "d", "times_ms")


def _point_problem(point) -> Optional[str]:
    """What is wrong with one entry of a table (None: nothing)."""
    if not isinstance(point, dict):
        return f"is a {type(point).__name__}, not an object"
    missing = [k for k in _POINT_KEYS if k not in point]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key in ("n", "d"):
        value = point[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"has {key} = {value!r}; it must be a positive integer"
    for key in ("device_type", "device", "dtype"):
        if not isinstance(point[key], str):
            return f"has {key} = {point[key]!r}; it must be a string"
    times = point["times_ms"]
    if not isinstance(times, dict):
        return f"has times_ms = {times!r}; it must map backend names to milliseconds"
    for backend, t in times.items():
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            return f"has times_ms[{backend!r}] = {t!r}; it must be a number of ms or null"
    return None


def _load(path: Path) -> List[dict]:
    """The points of a table file; a ValueError naming the file, the entry
    and what is wrong with it otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            points = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                         f"{err.colno}); a clipfast auto table is a JSON list of measured "
                         "points") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}); a clipfast auto table is a "
                         "JSON list of measured points") from None
    if not isinstance(points, list):
        raise ValueError(f"{path} is not a clipfast auto table: a JSON list of measured points "
                         f"(each with {', '.join(_POINT_KEYS)}), got a {type(points).__name__}")
    for index, point in enumerate(points):
        problem = _point_problem(point)
        if problem is not None:
            raise ValueError(f"{path}: entry {index} {problem}")
    return points


@functools.lru_cache(maxsize=None)
def _tables(override: Optional[str]) -> tuple:
    """(override points, shipped points)."""
    shipped = _load(SHIPPED_TABLE) if SHIPPED_TABLE.exists() else []
    if not override:
        return [], shipped
    try:
        return _load(Path(override).expanduser()), shipped
    except (OSError, ValueError) as err:
        # Named by the user: an error, not a silent fallback, and it says where
        # the path came from.
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"CLIPFAST_AUTO_TABLE={override}: {detail}") from None


def cache_path() -> Path:
    """Where ``python -m clipfast.check`` writes its measured table, and where
    ``auto`` looks for it: ``$CLIPFAST_CACHE_DIR/auto_table.json``, else
    ``$XDG_CACHE_HOME/clipfast/auto_table.json``, else
    ``~/.cache/clipfast/auto_table.json``."""
    folder = os.environ.get("CLIPFAST_CACHE_DIR")
    if folder:
        return Path(folder).expanduser() / TABLE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clipfast" / TABLE_NAME


def _cache_key() -> Optional[tuple]:
    """(path, mtime, size) of the user's cache, None when there is none: a
    cache rewritten in this process (by clipfast.check) is read again."""
    try:
        path = cache_path()
        stat = path.stat()
    except (OSError, RuntimeError):  # RuntimeError: no home folder to expand
        return None
    return (str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _cache_points(key: Optional[tuple]) -> tuple:
    """The points of the user's cache (empty when absent or unreadable: the
    cache is implicit, so a bad one warns once and is ignored)."""
    if key is None:
        return ()
    try:
        return tuple(_load(Path(key[0])))
    except (OSError, ValueError) as err:
        _LOG.warning("ignoring the measured table %s (%s); run python -m clipfast.check "
                     "to write it again", key[0], err)
        return ()


def _same_kind(a: str, b: str) -> bool:
    return a == b or (a in _HALF and b in _HALF)


def _nearest(points: Sequence[dict], n: int, d: int) -> Optional[dict]:
    def distance(p):
        return math.hypot(math.log(p["n"] / n), math.log(p["d"] / d))

    return min(points, key=distance, default=None)


def pick(points: Iterable[dict], device_type: str, device: str, dtype: str, n: int, d: int,
         usable: Sequence[str]) -> Optional[str]:
    """The fastest usable backend at the measured point nearest to (n, d)."""
    return _pick_point(points, device_type, device, dtype, n, d, usable)[0]


def _pick_point(points: Iterable[dict], device_type: str, device: str, dtype: str, n: int, d: int,
                usable: Sequence[str]) -> Tuple[Optional[str], Optional[dict]]:
    rows = [p for p in points if p["device_type"] == device_type
            and any(b in usable for b in p["times_ms"])]
    for narrow in (lambda p: p["device"] == device, lambda p: _same_kind(p["dtype"], dtype)):
        subset = [p for p in rows if narrow(p)]
        rows = subset or rows
    exact = [p for p in rows if p["dtype"] == dtype]
    point = _nearest(exact or rows, n, d)
    if point is None:
        return None, None
    times = {b: t for b, t in point["times_ms"].items() if b in usable and t is not None}
    return (min(times, key=times.get), point) if times else (None, None)


def usable_backends(device: torch.device, dtypes: Sequence[torch.dtype]) -> List[str]:
    """Candidates that can run features of these dtypes on this device here
    (each backend's ``native``: no interpreter, no emulation)."""
    return [name for name, backend in REGISTRY.items() if backend.native(device, dtypes)]


def _static_choice(device: torch.device, dtypes: Sequence[torch.dtype]) -> str:
    """Where nothing was measured: the first native backend of ``STATIC_ORDER``."""
    usable = usable_backends(device, dtypes)
    return next(name for name in STATIC_ORDER if name in usable)


def _modelled_times(usable: Sequence[str], n: int, d: int, dtype: str) -> Dict[str, float]:
    """{backend: ms} from ``clipfast.model_table.model_ms`` (the static
    model's shipped table) for the usable candidates it models (empty where
    it models none)."""
    from .model_table import model_ms

    times = {}
    for backend in usable:
        if backend not in CANDIDATES:
            continue
        try:
            t = model_ms(backend, n, d, dtype, loss="clip", memory_budget=None)
        except Exception as err:  # noqa: BLE001 - a model failure must not fail a loss call
            _LOG.debug("model_table.model_ms(%r, %d, %d, %r) failed: %s", backend, n, d, dtype, err)
            continue
        if t is not None and math.isfinite(t) and t > 0:
            times[backend] = float(t)
    return times


def _measured_choice(point: dict, choice: str, source: str) -> Choice:
    times = {b: t for b, t in point["times_ms"].items() if t is not None}
    measured = ", ".join(f"{b} {t:.1f} ms" for b, t in sorted(times.items(), key=lambda kv: kv[1]))
    return Choice(choice, f"fastest usable backend at the nearest measured point "
                          f"({point['device']}, {point['dtype']}, N={point['n']}, "
                          f"d={point['d']}: {measured}) in {source}")


@functools.lru_cache(maxsize=4096)
def _choose_cached(device: torch.device, dtypes: tuple, n: int, d: int,
                   override: Optional[str], cache: Optional[tuple] = None) -> Choice:
    usable = usable_backends(device, dtypes)
    dtype = _DTYPE_NAMES[dtypes[0] if dtypes[0] == dtypes[1] else torch.float32]
    name = device_name(device)
    override_points, shipped_points = _tables(override)
    # The cache's points of other machines (a shared home folder) do not count.
    cached = [p for p in _cache_points(cache) if p["device"] == name]
    sources = (
        (f"CLIPFAST_AUTO_TABLE ({override})", override_points),
        (f"the measured table of python -m clipfast.check ({cache[0] if cache else ''})", cached),
        ("the shipped table", shipped_points),
    )
    for source, points in sources:
        choice, point = _pick_point(points, device.type, name, dtype, n, d, usable)
        if choice is not None:
            return _measured_choice(point, choice, source)
    if device.type == "cuda":
        modelled = _modelled_times(usable, n, d, dtype)
        if modelled:
            fastest = min(modelled, key=modelled.get)
            listed = ", ".join(f"{b} {t:.1f} ms" for b, t in
                               sorted(modelled.items(), key=lambda kv: kv[1]))
            return Choice(fastest, f"nothing measured that fits {device.type} {dtype}; fastest "
                                   f"usable backend by the static H100 model (clipfast.model_table) "
                                   f"(N={n}, d={d}: {listed}; modelled, not measured)")
    return Choice(_static_choice(device, dtypes),
                  f"nothing measured that fits {device.type} {dtype}; the static rule "
                  "(triton for CUDA tensors, chunked otherwise)")


def explain(device, dtypes: Sequence[torch.dtype], n: int, d: int) -> Choice:
    """The backend ``auto`` picks for (n, d) features of ``dtypes`` (image,
    text) on ``device``, and the reason; no tensors needed and nothing logged
    (the benchmark's table and the training summary show it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtypes = tuple(dtypes)
    if len(dtypes) == 1:
        dtypes = dtypes * 2
    return _choose_cached(device, dtypes, int(n), int(d),
                          os.environ.get("CLIPFAST_AUTO_TABLE") or None, _cache_key())


def choose(image_features: torch.Tensor, text_features: torch.Tensor) -> str:
    """The backend ``backend="auto"`` runs for these features.

    The first time a process makes a given choice on a given device it is
    logged at INFO on the ``clipfast`` logger, with its reason; later calls
    stay silent (this runs on every loss call).
    """
    n, d = image_features.shape
    choice = explain(image_features.device, (image_features.dtype, text_features.dtype), n, d)
    key = (str(image_features.device), choice.backend)
    if key not in _LOGGED:
        with _LOGGED_LOCK:
            first = key not in _LOGGED
            _LOGGED.add(key)
        if first:
            dtypes = "/".join(sorted({_DTYPE_NAMES.get(t, str(t)) for t in
                                      (image_features.dtype, text_features.dtype)}))
            _LOG.info("backend='auto' chose %r for %s features on %s (N=%d, d=%d): %s",
                      choice.backend, dtypes, image_features.device, n, d, choice.reason)
    return choice.backend


# ----------------------------- building tables ----------------------------- #


def table_from_results(paths: Iterable[Path]) -> List[dict]:
    """Measured points of ``clipfast.bench`` results files (results.jsonl)."""
    merged: Dict[tuple, dict] = {}
    for path in paths:
        device = None
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    # A run killed while writing leaves a partial last line;
                    # the complete lines around it are still measurements.
                    _LOG.warning("%s:%d is not a JSON line (an interrupted run?); skipped", path, number)
                    continue
                if "meta" in row:
                    device = row["meta"]["device"]
                    continue
                if row.get("provider") not in CANDIDATES or row.get("status") != "ok":
                    continue
                key = (row["device"], device, row["dtype"], row["n"], row["d"])
                point = merged.setdefault(key, {
                    "device_type": row["device"], "device": device, "dtype": row["dtype"],
                    "n": row["n"], "d": row["d"], "times_ms": {}, "peak_extra_bytes": {},
                })
                point["times_ms"][row["provider"]] = round(row["time_ms"], 3)
                point["peak_extra_bytes"][row["provider"]] = row["peak_extra_bytes"]
    return sorted(merged.values(), key=_key)


def _key(point: dict) -> tuple:
    return (point["device_type"], point["device"], point["dtype"], point["d"], point["n"])


def show(points: Sequence[dict]) -> str:
    """Markdown table: the backend auto picks at every measured point."""
    lines = ["| device | dtype | d | N | auto picks | measured (ms) |", "|---|---|---|---|---|---|"]
    for p in points:
        times = p["times_ms"]
        fastest = min(times, key=times.get)
        measured = ", ".join(f"{b} {t:.1f}" for b, t in sorted(times.items(), key=lambda kv: kv[1]))
        lines.append(f"| {p['device']} | {p['dtype']} | {p['d']} | {p['n']} | {fastest} | {measured} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipfast.autoselect",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="results.jsonl files of clipfast.bench")
    parser.add_argument("--out", type=Path, help="write the table here (default: print it)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the points of --out that the results do not measure again")
    parser.add_argument("--show", action="store_true",
                        help="print the choices of the table in use (or of the new one)")
    args = parser.parse_args(argv)
    if args.results:
        points = table_from_results(args.results)
        if args.merge and args.out is not None and args.out.exists():
            fresh = {_key(p) for p in points}
            kept = [p for p in _load(args.out) if _key(p) not in fresh]
            points = sorted(kept + points, key=_key)
        if args.out is not None:
            args.out.write_text(json.dumps(points, indent=1) + "\n", encoding="utf-8")
        elif not args.show:
            print(json.dumps(points, indent=1))
    else:
        override = os.environ.get("CLIPFAST_AUTO_TABLE") or None
        override_points, shipped_points = _tables(override)
        points = list(override_points) + list(_cache_points(_cache_key())) + list(shipped_points)
    if args.show:
        print(show(points))


if __name__ == "__main__":
    main()
