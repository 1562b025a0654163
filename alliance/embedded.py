"""The embedded runner: a whole alliance on one machine, no cluster.

A real S3 server (``alliance.s3server``), N member agents as local processes, each with its own
data directory. The run itself is driven by ``alliance.driver.drive``, the loop the Kubernetes
operator runs too, with its status in the store, so ``alliance run --resume`` (or simply running
again with the same ``--run``) continues where a stopped run left off.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alliance import contract, identities
from alliance.cpulease import CpuPlan
from alliance.s3server import S3Server
from alliance.store import Store, heartbeat_key

log = logging.getLogger(__name__)


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
    train_command: str | None = None  # the member's own, instead of the built-in Keras code
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def last_line(self) -> str:
        return last_line(self.log_path)


def last_line(log_path: Path) -> str:
    """The last line of a log: a crashed Python process's is its exception (or, for the
    alliance command, its one-line error)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]


def start_member(
    name: str,
    data_dir: Path,
    env: dict[str, str],
    log_path: Path,
    train_command: str | None = None,
) -> MemberProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 (owned by the child)
    args = contract.member_args(name, data_dir, log_level="info", train_command=train_command)
    proc = subprocess.Popen(
        [sys.executable, "-m", "alliance", *args],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    return MemberProcess(name, data_dir, proc, env, log_path, train_command)


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


@dataclass
class InitProcess:
    """``alliance init`` in a child, with its log."""

    process: subprocess.Popen
    log_path: Path

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        return self.process.wait()

    def last_line(self) -> str:
        return last_line(self.log_path)


def init_in_subprocess(
    env: dict[str, str],
    log_path: Path,
    keras_file: Path | None,
    seed: int,
    schema_file: Path | None = None,
) -> InitProcess:
    """Create the seed model in a child, so the runner itself never imports TensorFlow."""
    init = contract.init_args(seed, model_file=keras_file, schema_file=schema_file)
    args = [sys.executable, "-m", "alliance", *init]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    return InitProcess(proc, log_path)


class EmbeddedAlliance:
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

    def __enter__(self) -> EmbeddedAlliance:
        self.server.start()
        self.store = Store(self.server.config)
        self.store.ensure_bucket()
        return self

    def env(self, cpu: CpuPlan) -> dict[str, str]:
        """The environment of the processes this runner starts; ``cpu`` says how the members
        share the machine's cores (alliance/cpulease.py)."""
        env = {
            **self.server.config.to_env(),
            contract.ENV_CPU_THREADS: str(cpu.threads),
            contract.ENV_CACHE_DIR: str(self.work_dir / "cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }
        if cpu.slots is not None:
            env[contract.ENV_CPU_LEASE] = str(self.work_dir / "cpu-lease")
            env[contract.ENV_CPU_LEASE_SLOTS] = str(cpu.slots)
        return env

    def start_members(self, dirs: list[Path], cpu: CpuPlan) -> None:
        """Start a member agent per data dir, each with its own store identity: its keys read
        what every member needs and write only its own objects (alliance/identities.py)."""
        keys = identities.provision(self.server.config, [d.name for d in dirs])
        for d in dirs:
            env = {**self.env(cpu), **keys[d.name].to_env()}
            log_path = self.work_dir / "logs" / f"{d.name}.log"
            self.members.append(start_member(d.name, d, env, log_path))

    def wait_until_ready(
        self, timeout: float = 300.0, check: Callable[[], object] = lambda: None
    ) -> dict[str, str]:
        """Wait until every started member is ready (data checked, TensorFlow and the model
        loaded), has said why it cannot take part, or has crashed for good, so round 1 asks
        all that can, and a resumed run does not mistake the "stopped" heartbeat of a
        member's previous process for a member that is gone. ``check`` is called on every
        poll and may raise to give up. Returns each member's problem ("data invalid: …",
        "crashed: <its last log line>"); ValueError when none is ready in ``timeout``."""
        names = self.names()
        deadline = time.monotonic() + timeout
        while True:
            check()
            given_up = self.supervise()
            problems = {
                m.name: f"crashed: {m.last_line()}" for m in self.members if m.name in given_up
            }
            ready = set()
            for name in names - set(problems):
                beat = self.store.get_json(heartbeat_key(name))
                state = _state(beat)
                if state == "ready":
                    ready.add(name)
                elif state == "invalid":
                    problems[name] = "invalid: " + str(beat.get("message") or "no reason")[:500]
            if len(ready) + len(problems) == len(names):
                if not ready:
                    raise ValueError(
                        "no member can take part: "
                        + "; ".join(f"{n}: {p}" for n, p in sorted(problems.items()))
                    )
                return problems
            if time.monotonic() > deadline:
                waiting = sorted(names - ready - set(problems))
                raise ValueError(
                    f"members not ready after {timeout:.0f} s: "
                    + "; ".join(
                        f"{m.name} (last log line: {m.last_line() or 'none'})"
                        for m in self.members
                        if m.name in waiting
                    )
                )
            time.sleep(0.2)

    def names(self) -> set[str]:
        """The alliance's members: the runs count no one else."""
        return {m.name for m in self.members}

    def lost(self) -> set[str]:
        return {m.name for m in self.members if not m.alive}

    def supervise(self) -> set[str]:
        """Restart members whose process died; return those given up on (restarts used up)."""
        for i, m in enumerate(self.members):
            if m.alive or m.restarts >= self.max_restarts:
                continue
            log.warning(
                "%s crashed (exit %s): %s; starting it again (%d of %d), log in %s",
                m.name,
                m.process.returncode,
                m.last_line() or "no output",
                m.restarts + 1,
                self.max_restarts,
                m.log_path,
            )
            again = start_member(m.name, m.data_dir, m.env, m.log_path, m.train_command)
            again.restarts = m.restarts + 1
            self.members[i] = again
        return self.lost()

    def __exit__(self, *exc) -> None:
        stop_processes([m.process for m in self.members])
        self.server.stop()


def _state(heartbeat: object) -> object:
    return heartbeat.get("state") if isinstance(heartbeat, dict) else None
