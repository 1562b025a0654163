"""The embedded runner: a whole alliance on one machine, no cluster.

A real S3 server (``alliance.s3server``), N member agents as local processes, each with its own
data directory, and the same coordinator and engine the Kubernetes operator drives. The run's
status is persisted in the store after every change, so ``alliance run --resume`` (or simply
running again with the same ``--run``) continues where a stopped run left off.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alliance.coordinator import Coordinator, pin_spec
from alliance.engine import Phase, RunSpec, RunStatus
from alliance.s3server import S3Server
from alliance.store import Store, heartbeat_key, run_key

log = logging.getLogger(__name__)


# --- splitting a dataset into member directories ------------------------------------------


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return f.read().splitlines()


def split_labels(
    labels: np.ndarray, members: int, mode: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Row indices per member. IID: a seeded shuffle cut in equal parts. Dirichlet: for each
    class, its rows are shared out in proportions drawn from Dir(alpha) (smaller alpha, more
    skew), the usual way to simulate non-IID members."""
    rng = np.random.default_rng(seed)
    if mode == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), members)]
    if mode != "dirichlet":
        raise ValueError(f"split mode must be 'iid' or 'dirichlet', got {mode!r}")
    parts: list[list[int]] = [[] for _ in range(members)]
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet([alpha] * members)) * len(rows)).astype(int)[:-1]
        for i, chunk in enumerate(np.split(rows, cuts)):
            parts[i].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_dataset(
    train: Path,
    test: Path | None,
    out_dir: Path,
    members: int,
    mode: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    label_column: str = "label",
) -> list[Path]:
    """Write ``member-<i>/train.csv`` (and ``test.csv``) under ``out_dir``; returns the dirs.

    Rows are copied as text, byte for byte; nothing is re-encoded.
    """
    dirs = [out_dir / f"member-{i + 1}" for i in range(members)]
    for split, path in (("train", train), ("test", test)):
        if path is None:
            continue
        header, *rows = _read_lines(Path(path))
        col = header.split(",").index(label_column)
        labels = np.array([int(r.split(",", col + 1)[col]) for r in rows])
        parts = split_labels(labels, members, mode, alpha, seed if split == "train" else seed + 1)
        for d, idx in zip(dirs, parts, strict=True):
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{split}.csv", "w", newline="") as f:
                f.write(header + "\n")
                f.writelines(rows[i] + "\n" for i in idx)
    return dirs


# --- member processes --------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the runner dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class MemberProcess:
    name: str
    data_dir: Path
    process: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    extra_args: list[str] | None = None
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def start_member(
    name: str,
    data_dir: Path,
    env: dict[str, str],
    log_path: Path,
    extra_args: list[str] | None = None,
) -> MemberProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 (owned by the child)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alliance",
            "--log-level",
            "info",
            "member",
            "--name",
            name,
            "--data-dir",
            str(data_dir),
            *(extra_args or []),
        ],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    return MemberProcess(name, data_dir, proc, env, log_path, extra_args)


def stop_processes(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --- the run ------------------------------------------------------------------------------


def load_status(store: Store, run: str) -> RunStatus | None:
    saved = store.get_json(run_key(run, "status.json"))
    return None if saved is None else RunStatus.from_dict(saved)


def coordinate(
    store: Store,
    run: str,
    spec: RunSpec,
    on_change: Callable[[RunStatus], None] = lambda s: None,
    lost_members: Callable[[], set[str]] | None = None,
    poll_seconds: float = 0.05,
    heartbeat_timeout: float = 60.0,
) -> RunStatus:
    """Drive a run to its end, persisting its status in the store after every change."""
    spec = pin_spec(store, run, spec)
    coordinator = Coordinator(
        store, run, spec, lost_members=lost_members, heartbeat_timeout=heartbeat_timeout
    )
    status = load_status(store, run) or RunStatus()
    shown = saved = status.to_dict()
    saved_at = time.monotonic()
    on_change(status)
    while status.phase not in (Phase.COMPLETED, Phase.FAILED):
        status = coordinator.reconcile(status)
        current = status.to_dict()
        if current != shown:
            on_change(status)
            shown = current
        # Every decision is persisted at once; a change of the progress message alone (one
        # more member answered) at most once a second: it carries nothing a resume needs.
        if _without_message(current) != _without_message(saved) or (
            current != saved and time.monotonic() - saved_at >= 1.0
        ):
            store.put_json(run_key(run, "status.json"), current)
            saved, saved_at = current, time.monotonic()
        if status.phase not in (Phase.COMPLETED, Phase.FAILED):
            time.sleep(poll_seconds)
    return status


def _without_message(status: dict) -> dict:
    return {k: v for k, v in status.items() if k != "message"}


def init_in_subprocess(
    env: dict[str, str], log_path: Path, keras_file: Path | None, seed: int
) -> subprocess.Popen:
    """Create the seed model in a child, so the runner itself never imports TensorFlow."""
    args = [sys.executable, "-m", "alliance", "init", "--seed", str(seed)]
    if keras_file:
        args += ["--model", str(keras_file)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115
    return subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )


class LocalAlliance:
    """The S3 server and member processes of one embedded alliance, stopped together.

    A member process that dies is started again, as Kubernetes restarts a member's pod, up to
    ``max_restarts`` times; the restarted agent skips what it already uploaded and takes up
    the current task, so its round does not lose it.
    """

    def __init__(self, work_dir: Path, bucket: str = "alliance", max_restarts: int = 3):
        self.work_dir = Path(work_dir)
        self.max_restarts = max_restarts
        self.server = S3Server(self.work_dir / "s3", bucket=bucket)
        self.members: list[MemberProcess] = []
        self.store: Store | None = None

    def __enter__(self) -> LocalAlliance:
        self.server.start()
        self.store = Store(self.server.config)
        self.store.ensure_bucket()
        return self

    def env(self, threads: int) -> dict[str, str]:
        return {
            **self.server.config.to_env(),
            "ALLIANCE_CPU_THREADS": str(threads),
            "ALLIANCE_CACHE_DIR": str(self.work_dir / "cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }

    def start_members(
        self, dirs: list[Path], threads: int, extra_args: list[str] | None = None
    ) -> None:
        for d in dirs:
            self.members.append(
                start_member(
                    d.name,
                    d,
                    self.env(threads),
                    self.work_dir / "logs" / f"{d.name}.log",
                    extra_args,
                )
            )

    def wait_until_ready(
        self, timeout: float = 300.0, check: Callable[[], object] = lambda: None
    ) -> None:
        """Wait until every started member is ready (data checked, TensorFlow and the model
        loaded) or has said its data is invalid, so round 1 asks all of them, and a resumed
        run does not mistake the "stopped" heartbeat of a member's previous process for a
        member that is gone. ``check`` is called on every poll and may raise to give up."""
        names = {m.name for m in self.members}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.supervise():
            check()
            beats = {
                o.key.rsplit("/", 1)[-1].removesuffix(".json") for o in self.store.list_heartbeats()
            }
            states = [
                (self.store.get_json(heartbeat_key(n)) or {}).get("state") for n in names & beats
            ]
            if len(states) == len(names) and set(states) <= {"ready", "invalid"}:
                return
            time.sleep(0.1)

    def lost(self) -> set[str]:
        return {m.name for m in self.members if not m.alive}

    def supervise(self) -> set[str]:
        """Restart members whose process died; return those given up on (restarts used up)."""
        for i, m in enumerate(self.members):
            if m.alive or m.restarts >= self.max_restarts:
                continue
            log.warning(
                "%s exited with %s; starting it again (%d of %d), log in %s",
                m.name,
                m.process.returncode,
                m.restarts + 1,
                self.max_restarts,
                m.log_path,
            )
            again = start_member(m.name, m.data_dir, m.env, m.log_path, m.extra_args)
            again.restarts = m.restarts + 1
            self.members[i] = again
        return self.lost()

    def __exit__(self, *exc) -> None:
        stop_processes([m.process for m in self.members])
        self.server.stop()
