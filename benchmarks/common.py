"""What the benchmarks share: paths, progress output, result rows, memory probes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: The full MNIST set (60,000 train and 10,000 test rows), next to the project, not in it.
MNIST_DIR = PROJECT_ROOT.parent / "shared" / "data" / "mnist"

_T0 = time.perf_counter()


class Skip(Exception):
    """This benchmark cannot run on this machine; the message says why."""


class BenchError(RuntimeError):
    """The benchmark ran but something in it went wrong."""


def say(text: str) -> None:
    """A progress line, with the seconds since the benchmarks started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {text}", flush=True)


def cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mnist_files() -> tuple[Path, Path]:
    """``train.csv(.gz)`` and ``test.csv(.gz)`` of the full MNIST set, or Skip."""
    found = []
    for split in ("train", "test"):
        for name in (f"{split}.csv", f"{split}.csv.gz"):
            if (MNIST_DIR / name).is_file():
                found.append(MNIST_DIR / name)
                break
        else:
            raise Skip(
                f"the full MNIST set is not here: no {split}.csv(.gz) in {MNIST_DIR} "
                "(../shared/data/mnist from the project root)"
            )
    return found[0], found[1]


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    measure: str
    result: str
    target: str = ""
    ok: bool | None = None  # None: informative, no target
    value: float | None = None  # the number behind ``result``, for the JSON

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "**FAIL**")


@dataclass
class Result:
    bench: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def row(
        self,
        measure: str,
        result: str,
        target: str = "",
        ok: bool | None = None,
        value: float | None = None,
    ) -> None:
        self.rows.append(Row(self.bench, measure, result, target, ok, value))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = [{**asdict(r), "verdict": r.verdict} for r in self.rows]
        return out


def markdown_table(results: list[Result]) -> str:
    lines = ["| Benchmark | Measure | Result | Target | |", "|---|---|---|---|---|"]
    for res in results:
        if res.skipped:
            lines.append(f"| {res.bench} | {res.title} | skipped: {res.skipped} | | |")
            continue
        if res.error:
            lines.append(f"| {res.bench} | {res.title} | error: {res.error} | | **FAIL** |")
        for r in res.rows:
            lines.append(f"| {r.bench} | {r.measure} | {r.result} | {r.target} | {r.verdict} |")
    return "\n".join(lines)


# --- memory -------------------------------------------------------------------------------


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so an RSS baseline means something."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:
            return None


class RssPeak:
    """Samples this process's RSS every ``interval`` seconds; ``delta`` = peak - start."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes() or 0)

    def __enter__(self) -> RssPeak:
        self.start = self.peak = rss_bytes() or 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)

    @property
    def delta(self) -> int:
        return self.peak - self.start


def mb(n: float) -> float:
    return n / 2**20


def python_info() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "cores": cores(), "platform": sys.platform}
