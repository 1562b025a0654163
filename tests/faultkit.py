"""A real alliance of processes for the fault tests: its own S3 server, member agents, ``alliance
init`` and ``alliance coordinate`` as subprocesses, with waits that time out instead of hanging
and a cleanup that leaves no process behind (and checks it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import pytest
import yaml

from alliance import weights
from alliance.embedded import MemberProcess, start_member, stop_processes
from alliance.engine import RunStatus
from alliance.s3server import S3Server
from alliance.store import Store

T = TypeVar("T")


def _die_with_parent() -> None:
    """In the child: SIGTERM it if the test process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def children() -> dict[int, str]:
    """The test process's live descendants: pid -> command line."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = " ".join(p.cmdline()[:6])
    return out


def strays(cache_dir: str, known: set[int]) -> dict[int, str]:
    """Live processes left by an alliance: the test process's descendants not in ``known``, and
    any process carrying the alliance's environment (an orphan, e.g. a killed member's train
    command, is no longer a descendant)."""
    out = {pid: cmd for pid, cmd in children().items() if pid not in known}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (
                p.pid not in out
                and p.pid != os.getpid()
                and p.environ().get("ALLIANCE_CACHE_DIR") == cache_dir
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                out[p.pid] = " ".join(p.cmdline()[:6])
    return out


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"--- {path.name}: (no file)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name}:\n" + "\n".join(text)


class Alliance:
    """One alliance under test; use as a context manager.

    On exit every process it started is stopped (SIGTERM, then SIGKILL), the S3 server too, and,
    unless the test already failed, it asserts that no process is left: no child of the test
    process, and no process with this alliance's environment.
    """

    def __init__(self, work: Path):
        self.work = Path(work)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server = S3Server(self.work / "s3")
        self.servers = [self.server]
        self.procs: list[subprocess.Popen] = []
        self.members: dict[str, MemberProcess] = {}
        self.store: Store | None = None
        self._children_before = set(children())

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Alliance:
        try:
            self.server.start()
            self.store = Store(self.server.config, retry_seconds=60)
            self.store.ensure_bucket()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        leftovers = self.close()
        if exc_type is None:
            assert leftovers == {}, f"processes left behind after the test: {leftovers}"

    def close(self) -> dict[int, str]:
        """Stop everything; return (and kill) whatever process is still left."""
        stop_processes([p for p in self.procs if p.poll() is None], grace=15)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for server in self.servers:
            server.stop()
        leftovers = strays(self.env()["ALLIANCE_CACHE_DIR"], self._children_before)
        for pid in leftovers:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.kill()
                proc.wait(5)
        return leftovers

    def restart_server(self) -> S3Server:
        """A new gateway on the same directory and port: same data, same credentials."""
        server = S3Server(self.work / "s3", port=self.server.port)
        self.servers.append(server)
        server.start()
        self.server = server
        return server

    def adopt(self, manifest: dict, seed: bytes) -> None:
        """Make this store an initialised alliance: what ``alliance init`` wrote elsewhere."""
        assert self.store.put_model(weights.loads(seed)) == manifest["seedModelId"]
        self.store.put_alliance(manifest)

    # --- processes ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {
            **self.server.config.to_env(),
            "ALLIANCE_CPU_THREADS": "1",
            "ALLIANCE_CACHE_DIR": str(self.work / "cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }

    def start_member(
        self, name: str, data_dir: Path, train_command: str | None = None
    ) -> MemberProcess:
        member = start_member(name, data_dir, self.env(), self.logs / f"{name}.log", train_command)
        self.procs.append(member.process)
        self.members[name] = member
        return member

    def alliance(self, *args: str, log: str) -> subprocess.Popen:
        """``python -m alliance ARGS`` with the store's env; stdout/stderr in logs/LOG.out/.err."""
        with (
            open(self.logs / f"{log}.out", "ab") as out,
            open(self.logs / f"{log}.err", "ab") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", "alliance", *args],
                env={**os.environ, **self.env()},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def init(self) -> subprocess.Popen:
        return self.alliance("init", log="init")

    def coordinate(
        self, run: str, spec: dict, *extra: str, log: str = "coordinator"
    ) -> subprocess.Popen:
        path = self.work / f"{run}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return self.alliance(
            "--log-level",
            "warning",
            "coordinate",
            "--run",
            run,
            "--spec",
            str(path),
            *extra,
            log=log,
        )

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    # --- observing ----------------------------------------------------------------------

    def diagnostics(self) -> str:
        return "\n".join(tail(p) for p in sorted(self.logs.iterdir()))

    def wait_for(
        self,
        what: str,
        check: Callable[[], T | None],
        timeout: float,
        poll: float = 0.1,
        alive: tuple[subprocess.Popen, ...] = (),
        show: Callable[[], str] | None = None,
    ) -> T:
        """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` s,
        or as soon as one of the ``alive`` processes exits. ``show`` describes the last state
        seen, for the failure message."""
        deadline = time.monotonic() + timeout
        while True:
            last = check()
            if last:
                return last
            for proc in alive:
                if proc.poll() is not None:
                    pytest.fail(
                        f"waiting for {what}: {_name(proc)} exited with "
                        f"{proc.returncode}\n{self.diagnostics()}"
                    )
            if time.monotonic() > deadline:
                seen = show() if show else repr(last)
                pytest.fail(
                    f"timed out after {timeout:.0f} s waiting for {what} (last seen: {seen})"
                    f"\n{self.diagnostics()}"
                )
            time.sleep(poll)

    def status(self, run: str) -> RunStatus | None:
        saved = self.store.get_run_status(run)
        return None if saved is None else RunStatus.from_dict(saved)

    def wait_status(
        self,
        run: str,
        what: str,
        pred: Callable[[RunStatus], bool],
        timeout: float,
        alive: tuple[subprocess.Popen, ...] = (),
    ) -> RunStatus:
        seen: list[RunStatus | None] = [None]

        def check():
            seen[0] = self.status(run)
            return seen[0] if seen[0] is not None and pred(seen[0]) else None

        def show() -> str:
            s = seen[0]
            return "no status" if s is None else f"{s.phase} round {s.round} {s.stage}: {s.message}"

        return self.wait_for(what, check, timeout, alive=alive, show=show)

    def heartbeat(self, name: str) -> dict | None:
        return self.store.get_json(f"members/{name}.json")

    def wait_states(self, states: dict[str, str], timeout: float) -> dict[str, dict]:
        """Wait until each member's heartbeat has the given state; returns the heartbeats."""

        beats: dict[str, dict | None] = {}

        def check():
            beats.update({name: self.heartbeat(name) for name in states})
            if all((beats[n] or {}).get("state") == s for n, s in states.items()):
                return dict(beats)
            return None

        def show() -> str:
            return str({n: (b or {}).get("state") for n, b in beats.items()})

        return self.wait_for(f"member states {states}", check, timeout, show=show)

    def finish(self, proc: subprocess.Popen, timeout: float) -> int:
        """Wait for a process to exit by itself; fail the test if it does not in time."""
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{_name(proc)} still running after {timeout:.0f} s\n{self.diagnostics()}")


class TaskWatcher:
    """Records every task object the coordinator publishes for a run (polled in a thread)."""

    def __init__(self, store: Store, run: str, poll: float = 0.05):
        self.store, self.run, self.poll = store, run, poll
        self.tasks: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="task-watcher", daemon=True)

    def __enter__(self) -> TaskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                task = self.store.get_json(f"tasks/{self.run}.json")
                if task is not None and (not self.tasks or task != self.tasks[-1]):
                    self.tasks.append(task)
            self._stop.wait(self.poll)

    def seen(self, kind: str, round_: int) -> list[dict]:
        return [t for t in list(self.tasks) if t["kind"] == kind and t["round"] == round_]


def fedavg64(store: Store, run: str, round_: int, members: list[str]) -> list[np.ndarray]:
    """Recompute a round's FedAvg from its stored updates, in float64."""
    sums, total = None, 0
    for member in members:
        data, meta = store.get_update(run, round_, member)
        arrays = weights.loads(data)
        n = meta["numExamples"]
        total += n
        scaled = [n * a.astype(np.float64) for a in arrays]
        sums = scaled if sums is None else [s + a for s, a in zip(sums, scaled, strict=True)]
    return [s / total for s in sums]


def assert_models_close(
    actual: list[np.ndarray], expected: list[np.ndarray], atol: float = 1e-6
) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape, f"array {i}: shape {a.shape} != {e.shape}"
        np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=f"array {i}")


def _name(proc: subprocess.Popen) -> str:
    return " ".join(map(str, proc.args[2:7]))


class HostileMember:
    """A member that attacks the run with the store keys it holds, as a person would with the
    minio client: it says it is ready, watches the run's tasks and answers each one it is given
    with what ``update(base, round)`` (weights bytes, metrics) and ``validation(round)``
    return, written exactly where an honest agent writes (a thread of the test)."""

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        train_rows: int = 600,
        test_rows: int = 200,
        update: Callable[[list[np.ndarray], int], tuple[bytes, dict]] | None = None,
        validation: Callable[[int], object] | None = None,
    ):
        self.store, self.name = store, name
        self.heartbeat = {"state": "ready", "trainRows": train_rows, "testRows": test_rows}
        self.update, self.validation = update, validation
        self.answered: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self) -> HostileMember:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        beat_at = 0.0
        while not self._stop.is_set():
            if time.monotonic() - beat_at >= 1.0:
                self.store.put_heartbeat(self.name, self.heartbeat)
                beat_at = time.monotonic()
            for obj in self.store.list_tasks():
                task = self.store.get_json(obj.key)
                if isinstance(task, dict) and self.name in task["members"]:
                    self._answer(task)
            self._stop.wait(0.1)

    def _answer(self, task: dict) -> None:
        run, round_, kind = task["run"], task["round"], task["kind"]
        if (run, round_, kind) in self.answered:
            return
        self.answered.add((run, round_, kind))
        if kind == "train" and self.update is not None:
            data, meta = self.update(self.store.get_model(task["modelId"]), round_)
            self.store.put_update(run, round_, self.name, data, meta)
        elif kind == "validate" and self.validation is not None:
            self.store.put_result(run, round_, "validations", self.name, self.validation(round_))
