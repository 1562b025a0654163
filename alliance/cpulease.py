"""A local CPU lease: co-located members take turns on the cores instead of time-slicing them.

Three single-threaded TensorFlow processes on two cores lose about a third of the machine to
time-slicing (each one's working set is evicted from the cache every few milliseconds); one
process at a time with every core does not. Members on one machine (the embedded runner's
processes, member pods on one node sharing a hostPath) therefore hold one of ``slots`` leases
while they compute: lock files ``<directory>/cpu-lease.<i>``, held with ``flock``, which the
kernel releases when the holder dies, so a crashed member never keeps the others waiting.

A member computes with ``threads = cores ÷ slots`` TensorFlow threads (``plan``), so that
whoever holds a lease has its share of the cores to itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: How often a waiting member tries the leases again: a few system calls, no measurable CPU.
RETRY_SECONDS = 0.05


@dataclass(frozen=True)
class CpuPlan:
    """How co-located members share the cores: at most ``slots`` compute at once (None: all of
    them, no lease), each with ``threads`` TensorFlow threads."""

    slots: int | None
    threads: int

    def describe(self, members: int) -> str:
        if self.slots is None or self.slots >= members:
            return f"all {members} at once, {self.threads} CPU thread(s) each"
        if self.slots == 1:
            return f"taking turns, {self.threads} CPU thread(s) each"
        return f"{self.slots} at a time, {self.threads} CPU thread(s) each"


def plan(cores: int, members: int, mode: str = "auto") -> CpuPlan:
    """How ``members`` processes share ``cores``: ``mode`` "turns" (one at a time, every
    core), "shared" (all at once, cores ÷ members each), a number of members computing at
    once, or "auto": the measured best, which is "shared". On 2 cores with 3 members
    (benchmarks/cpu_sharing.py, README "Performance") all at once with one thread each took
    1.10× a centralized epoch where taking turns took 1.30× (TensorFlow's two threads in one
    process did not scale reliably there) and pairs 1.6×."""
    cores, members = max(1, cores), max(1, members)
    if mode == "auto":
        mode = "shared"
    if mode == "turns":
        return CpuPlan(1, cores)
    if mode == "shared":
        return CpuPlan(None, max(1, cores // members))
    try:
        slots = int(mode)
    except ValueError:
        raise ValueError(
            f"CPU sharing {mode!r}: use auto, turns, shared or a number of members at once"
        ) from None
    if slots < 1:
        raise ValueError(f"CPU sharing {mode!r}: at least 1 member computes at once")
    if slots >= members:
        return CpuPlan(None, max(1, cores // members))
    return CpuPlan(slots, max(1, cores // slots))


class CpuLease:
    """``with lease.hold() as waited:`` computes while holding one of the ``slots`` leases."""

    def __init__(self, directory: Path, slots: int = 1):
        if slots < 1:
            raise ValueError("a CPU lease needs at least one slot")
        self.directory = Path(directory)
        self.slots = slots
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self._paths():  # a directory the member cannot write fails here, not mid-task
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))

    @contextlib.contextmanager
    def hold(self, stop: threading.Event | None = None) -> Iterator[float]:
        """Wait for a free lease (or ``stop``), yield the seconds waited, release it."""
        started = time.monotonic()
        fd = self._acquire(stop)
        try:
            yield time.monotonic() - started
        finally:
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock

    def _paths(self) -> list[Path]:
        return [self.directory / f"cpu-lease.{i}" for i in range(self.slots)]

    def _acquire(self, stop: threading.Event | None) -> int | None:
        paths = self._paths()
        while True:
            for path in paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            if stop is None:
                time.sleep(RETRY_SECONDS)
            elif stop.wait(RETRY_SECONDS):
                return None  # stopping: compute without the lease rather than hang
