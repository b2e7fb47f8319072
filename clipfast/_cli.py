"""What the command-line tools (bench, train) share: files written so that an
interruption never leaves half of one, output folders that one run never
takes over from another, one-line errors, the machine and versions a result
was produced with, progress that stays readable in logs, and the ``clipfast``
logger's INFO lines shown on the console.

Only the standard library is imported here (tqdm when progress is shown), so
that a tool's ``--help`` and argument errors cost no torch import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NoReturn, Optional

LOGGER_NAME = "clipfast"


# ------------------------------ atomic files ------------------------------- #


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only when
    the block finishes without an exception.

    Readers, and whatever is left after a crash or Ctrl-C, see either the old
    file or the complete new one. The rename is atomic because the temporary
    file lives in the same folder (same file system); the fsync before it
    makes the new contents durable before the old ones disappear.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry is data too)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def temporary_files(folder: Path, names: Iterable[str]) -> List[Path]:
    """The temporary files ``atomic_output`` left in ``folder`` for ``names``
    (a process killed mid-write cannot remove its own)."""
    folder = Path(folder)
    pattern = re.compile(r"\.(" + "|".join(re.escape(n) for n in names) + r")\.\d+\.tmp")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


# ------------------------------ output folders ----------------------------- #


def folder_entries(path: Path) -> List[str]:
    """The names in the folder ``path`` (none when it does not exist)."""
    path = Path(path)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def occupied_folder(path: Path, continue_hint: str, option: str = "--out") -> Optional[str]:
    """Why a run may not write into ``path`` (None when it is empty or
    missing): a folder that holds files is another run's, which a new run
    would overwrite. ``continue_hint`` says how ``--resume`` continues it."""
    entries = folder_entries(path)
    if not entries:
        return None
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    return (f"the folder {str(path)!r} is not empty ({shown}): an earlier run wrote there; "
            f"{continue_hint}, --overwrite to replace its results, or another {option}")


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """Exit with one line on stderr (``PROG: error: MESSAGE``), no traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ----------------------------- machine, versions --------------------------- #


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor"), from /proc/cpuinfo
    on Linux; the platform's processor or machine name elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(packages: Iterable[str] = ("torch", "numpy")) -> Dict[str, object]:
    """What a result depends on besides its settings: the machine (CPU model,
    cores, architecture, OS), torch's CPU thread count and the versions of
    Python, clipfast and ``packages`` (the installed distributions' names)."""
    import torch

    env: Dict[str, object] = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "clipfast": _version("clipfast"),
    }
    for name in packages:
        env[name] = torch.__version__ if name == "torch" else _version(name)
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def unwritable_folder(path: Path) -> Optional[str]:
    """Why files cannot be written in the folder ``path`` (created if missing),
    or None when they can. Checked before long runs, so that a bad ``--out``
    fails in a second rather than after the work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the folder {str(path)!r}: {err.strerror or err}"
    probe = path / f".clipfast-write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot write in the folder {str(path)!r}: {err.strerror or err}"
    return None


# -------------------------------- logging ---------------------------------- #


def show_info_logs() -> None:
    """Let the ``clipfast`` logger's INFO lines (which backend ``auto`` chose)
    reach the console of a command-line run.

    A handler is added only when logging is not configured at all, so an
    application's or pytest's own handlers keep receiving the records instead.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)


# -------------------------------- progress --------------------------------- #


class LineProgress:
    """The part of tqdm's interface the tools use, printing whole lines.

    tqdm redraws its bar with carriage returns; in a log file or CI output
    that is one line growing by every redraw (10+ KB). This prints tqdm's own
    status text as separate lines, at most one per ``interval`` seconds, plus
    the final state.
    """

    def __init__(self, total: int, desc: str, unit: str, file, interval: float):
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n = 0
        self.postfix = None
        self._start = time.monotonic()
        self._last_line: Optional[float] = None
        self._printed_n = -1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.interval or self.n >= self.total:
            self._line(now)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = text

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:  # noqa: ARG002
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self._printed_n != self.n:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        from tqdm import tqdm

        text = tqdm.format_meter(self.n, self.total, now - self._start, prefix=self.desc,
                                 unit=self.unit, postfix=self.postfix, ascii=True)
        print(text, file=self.file, flush=True)
        self._last_line, self._printed_n = now, self.n


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str, *, enabled: bool = True, file=None,
             interval: float = 10.0):
    """A tqdm bar on a terminal, ``LineProgress`` otherwise (None when not
    ``enabled``: callers write ``if bar: ...``).

    On a terminal, the ``clipfast`` logger's console lines are routed through
    tqdm so they do not tear the bar.
    """
    file = sys.stderr if file is None else file
    if not enabled:
        yield None
        return
    if hasattr(file, "isatty") and file.isatty():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        logger = logging.getLogger(LOGGER_NAME)
        # Only a console handler of our own logger is rerouted: the redirect
        # would otherwise add one, duplicating what the root's handlers print.
        console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                      for h in logger.handlers)
        redirect = logging_redirect_tqdm(loggers=[logger]) if console else contextlib.nullcontext()
        with redirect, tqdm(total=total, desc=desc, unit=unit, file=file) as bar:
            yield bar
        return
    bar = LineProgress(total, desc, unit, file, interval)
    try:
        yield bar
    finally:
        bar.close()
