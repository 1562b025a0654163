"""9d: the coordinator and engine alone with 1,000 simulated members (no TensorFlow).

A real S3 gateway; a tiny model (2 arrays of 10 float32). The members are simulated by one
child process (``python -m benchmarks.engine_scale --simulate``), so their Python work does not
compete with the coordinator's for this process's GIL: it writes each member's heartbeat
(``ready``, 10 train and 10 test rows; every member's is rewritten every
``HEARTBEAT_SECONDS`` so none goes stale), watches ``store.list_tasks()`` and, for each new
task, writes every addressed member's update (``store.put_update``, the model plus a
member-specific offset) or validation (``store.put_result(..., "validations", ...)``) through
a pool of 32 threads. This process drives ``Coordinator.reconcile`` in the loop of
``alliance.driver.drive`` (persisting the status after every change, sleeping 50 ms when
nothing changed) for 3 rounds of FedAvg over all 1,000 members.

Reported per round: the seconds spent inside ``reconcile`` calls (observe + step + execute,
split further: heartbeat listing, round listing, result reads, aggregation, task publishing),
how many calls, the status persistence, the round wall time, and the coordinator's share of
the critical path: from the simulator's last update write to the validate task being published
(observe + aggregate 1,000 updates + publish), plus from the last validation write to the round
being closed. If the reconcile time is over the target (or with ``--profile``), one more
1-round run is profiled with cProfile and the hottest functions are reported.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PROJECT_ROOT, BenchError, Result, say

MEMBERS = 1000
ROUNDS = 3
TARGET = 10.0  # seconds of orchestration per round
HEARTBEAT_SECONDS = 20.0  # the coordinator's heartbeat timeout is 60 s
SIM_THREADS = 32
POLL_SECONDS = 0.05  # as alliance.driver.drive
RUN_TIMEOUT = 300.0


def _tiny_model() -> list[np.ndarray]:
    return [np.zeros(10, np.float32), np.zeros(10, np.float32)]


# --- the coordinator side -----------------------------------------------------------------


class _Timings:
    """Seconds per round bucket ("start" before round 1) and per named part."""

    def __init__(self) -> None:
        self.buckets: dict[Any, defaultdict[str, float]] = {}
        self.current: defaultdict[str, float] = defaultdict(float)
        self.published: dict[tuple[int, str], float] = {}  # (round, kind) -> time.time()
        self.finished_at: float | None = None

    def use(self, key: Any) -> None:
        self.current = self.buckets.setdefault(key, defaultdict(float))

    def wrap(self, obj: Any, name: str, part: str) -> None:
        """Replace ``obj.name`` (on the instance) by a wrapper adding its time to ``part``."""
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - started

        setattr(obj, name, timed)


def _instrumented(store, run: str, spec) -> tuple[Any, _Timings]:
    from alliance.coordinator import Coordinator
    from alliance.engine import Aggregate, Finish, KeepRecord, PublishTask

    coordinator = Coordinator(store, run, spec)
    t = _Timings()
    t.wrap(coordinator, "observe", "observe")
    t.wrap(coordinator, "_members", "observe: heartbeats")
    t.wrap(coordinator, "_fetch", "observe: read results")
    t.wrap(store, "list_round", "observe: list round")
    t.wrap(store, "get_aggregate", "observe: aggregate.json")
    original = coordinator.execute

    def execute(action):
        started = time.perf_counter()
        try:
            return original(action)
        finally:
            elapsed = time.perf_counter() - started
            part = {
                PublishTask: "execute: publish",
                Aggregate: "execute: aggregate",
                Finish: "execute: finish",
                KeepRecord: "execute: keep record",
            }[type(action)]
            t.current[part] += elapsed
            t.current["execute"] += elapsed
            if isinstance(action, PublishTask):
                t.published[(action.round, str(action.kind))] = time.time()
            elif isinstance(action, Finish):
                t.finished_at = time.time()

    coordinator.execute = execute
    return coordinator, t


def drive(store, run: str, spec, profiler: cProfile.Profile | None = None):
    """``alliance.driver.drive``'s loop, timing each ``reconcile`` by the round it is in."""
    from alliance.engine import Phase, RunStatus

    store.put_json(f"runs/{run}/spec.json", spec.to_dict())
    coordinator, t = _instrumented(store, run, spec)
    status = RunStatus()
    last = status.to_dict()
    deadline = time.monotonic() + RUN_TIMEOUT
    while status.phase not in (Phase.COMPLETED, Phase.FAILED):
        if time.monotonic() > deadline:
            raise BenchError(f"run {run} did not finish in {RUN_TIMEOUT:.0f} s: {status.message}")
        t.use(status.round or "start")
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        status = coordinator.reconcile(status)
        if profiler:
            profiler.disable()
        t.current["reconcile"] += time.perf_counter() - started
        t.current["calls"] += 1
        current = status.to_dict()
        if current != last:
            started = time.perf_counter()
            store.put_json(f"runs/{run}/status.json", current)
            t.current["persist status"] += time.perf_counter() - started
            t.current["calls with a change"] += 1
            last = current
            if status.stage is not None or status.phase != Phase.RUNNING:
                say(f"9d:   {status.message}")
        else:
            time.sleep(POLL_SECONDS)
    return status, t


class _Simulator:
    """The child process simulating the members, and its event lines."""

    def __init__(self, config_env: dict[str, str], members: int, log_path: Path):
        self.events: list[dict] = []
        self._ready = threading.Event()
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.engine_scale",
                "--simulate",
                "--members",
                str(members),
                "--heartbeat-seconds",
                str(HEARTBEAT_SECONDS),
            ],
            cwd=PROJECT_ROOT,
            env={**os.environ, **config_env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(event)
            if event.get("event") == "ready":
                self._ready.set()

    def wait_ready(self, timeout: float) -> dict:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise BenchError(
                f"the member simulator did not start (exit {self.proc.poll()}); "
                f"see {self._log.name}"
            )
        return next(e for e in self.events if e["event"] == "ready")

    def task(self, run: str, round_: int, kind: str) -> dict | None:
        return next(
            (
                e
                for e in self.events
                if e["event"] == "task"
                and e["run"] == run
                and e["round"] == round_
                and e["kind"] == kind
            ),
            None,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: the simulator stops
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run(work: Path, members: int = MEMBERS, rounds: int = ROUNDS, profile: bool = False) -> Result:
    from alliance.engine import RunSpec
    from alliance.s3server import S3Server, S3ServerError
    from alliance.store import Store

    res = Result("9d", f"engine with {members:,} simulated members")
    try:
        server = S3Server(work / "s3").start()
    except S3ServerError as exc:
        from benchmarks.common import Skip

        raise Skip(str(exc)) from exc
    sim = None
    try:
        store = Store(server.config)  # the coordinator's store, as in production
        store.ensure_bucket()
        seed = store.put_model(_tiny_model())
        store.put_alliance(
            {
                "model": {"kind": "builtin", "name": "tiny"},
                "seedModelId": seed,
                "parameters": 20,
                "createdAt": time.time(),
            }
        )
        say(
            f"9d: S3 gateway at {server.endpoint}; simulating {members:,} members "
            f"(heartbeats every {HEARTBEAT_SECONDS:.0f} s)"
        )
        sim = _Simulator(server.config.to_env(), members, work / "simulator.log")
        ready = sim.wait_ready(180)
        say(f"9d: {members:,} heartbeats written in {ready['seconds']:.1f} s")
        spec = RunSpec(
            rounds=rounds,
            min_members=members // 2 + 1,
            round_deadline_seconds=600,
            validation_deadline_seconds=300,
            seed=0,
        )
        status, t = drive(store, "bench-engine", spec)
        if status.phase != "Completed":
            raise BenchError(f"the run ended {status.phase}: {status.message}")
        _report(res, status, t, sim, "bench-engine", members)
        res.details["heartbeatWriteSeconds"] = ready["seconds"]
        over = any(r["reconcileSeconds"] > TARGET for r in res.details["rounds"])
        if profile or over:
            say(
                "9d: profiling one more round with cProfile"
                + (" (reconcile time over the target)" if over else "")
            )
            prof = cProfile.Profile()
            drive(
                store,
                "bench-engine-profile",
                RunSpec(
                    rounds=1,
                    min_members=members // 2 + 1,
                    round_deadline_seconds=600,
                    validation_deadline_seconds=300,
                    seed=0,
                ),
                profiler=prof,
            )
            text, top = _profile_summary(prof)
            (work / "profile-9d.txt").write_text(text)
            res.details["profile"] = top
            say("9d: hottest functions (cumulative seconds inside reconcile, main thread):")
            for entry in top[:18]:
                print(
                    f"    {entry['cumulativeSeconds']:7.2f} s {entry['share']:5.0%} "
                    f"{entry['calls']:>8} calls  {entry['function']}",
                    flush=True,
                )
            say(f"9d: full profile in {work / 'profile-9d.txt'}")
    finally:
        if sim is not None:
            sim.stop()
        server.stop()
    return res


def _report(res: Result, status, t: _Timings, sim: _Simulator, run: str, members: int) -> None:
    rows = []
    for r in status.history:
        b = t.buckets.get(r.round, {})
        pub_train = t.published.get((r.round, "train"))
        pub_val = t.published.get((r.round, "validate"))
        end = t.published.get((r.round + 1, "train")) or t.finished_at
        sim_train = sim.task(run, r.round, "train") or {}
        sim_val = sim.task(run, r.round, "validate") or {}
        after_updates = (pub_val - sim_train["last"]) if pub_val and sim_train else None
        after_validations = (end - sim_val["last"]) if end and sim_val else None
        observe = b.get("observe", 0.0)
        execute = b.get("execute", 0.0)
        rows.append(
            {
                "round": r.round,
                "wallSeconds": r.seconds,
                "reconcileSeconds": b.get("reconcile", 0.0),
                "reconcileCalls": int(b.get("calls", 0)),
                "callsWithChange": int(b.get("calls with a change", 0)),
                "observeSeconds": observe,
                "heartbeatsSeconds": b.get("observe: heartbeats", 0.0),
                "listRoundSeconds": b.get("observe: list round", 0.0),
                "readResultsSeconds": b.get("observe: read results", 0.0),
                "aggregateJsonSeconds": b.get("observe: aggregate.json", 0.0),
                "executeSeconds": execute,
                "aggregateSeconds": b.get("execute: aggregate", 0.0),
                "publishSeconds": b.get("execute: publish", 0.0),
                "stepSeconds": b.get("reconcile", 0.0) - observe - execute,
                "persistSeconds": b.get("persist status", 0.0),
                "afterLastUpdateSeconds": after_updates,
                "afterLastValidationSeconds": after_validations,
                "criticalPathSeconds": (after_updates or 0.0) + (after_validations or 0.0),
                "simulatorTrainSeconds": (sim_train["last"] - pub_train) if sim_train else None,
                "simulatorValidateSeconds": (sim_val["last"] - pub_val) if sim_val else None,
                "accuracy": r.accuracy,
                "members": len(r.members),
            }
        )
    start = t.buckets.get("start", {})
    res.details.update(
        rounds=rows,
        members=members,
        startReconcileSeconds=start.get("reconcile", 0.0),
        startHeartbeatsSeconds=start.get("observe: heartbeats", 0.0),
    )
    for r in rows:
        res.row(
            f"round {r['round']}: time inside reconcile ({r['reconcileCalls']} calls)",
            f"{r['reconcileSeconds']:.1f} s of a {r['wallSeconds']:.1f} s round of "
            f"{r['members']} members (heartbeats "
            f"{r['heartbeatsSeconds']:.1f}, list round {r['listRoundSeconds']:.1f}, read results "
            f"{r['readResultsSeconds']:.1f}, aggregate {r['aggregateSeconds']:.1f}, step "
            f"{r['stepSeconds']:.1f}; + persist {r['persistSeconds']:.1f})",
            f"≤ {TARGET:.0f} s",
            r["reconcileSeconds"] <= TARGET,
            r["reconcileSeconds"],
        )
    for r in rows:
        res.row(
            f"round {r['round']}: coordinator on the critical path",
            f"{r['criticalPathSeconds']:.1f} s (last update → validate task "
            f"{r['afterLastUpdateSeconds']:.1f} s, last validation → round closed "
            f"{r['afterLastValidationSeconds']:.1f} s)",
            value=r["criticalPathSeconds"],
        )
    res.row(
        "before round 1: first observation (reads every heartbeat)",
        f"{res.details['startReconcileSeconds']:.1f} s",
        value=res.details["startReconcileSeconds"],
    )


def _profile_summary(prof: cProfile.Profile) -> tuple[str, list[dict]]:
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(35)
    buf.write("\n--- by own time ---\n")
    stats.sort_stats("tottime").print_stats(20)
    total = max((v[3] for v in stats.stats.values()), default=0.0)
    here = str(Path(__file__).resolve().parent)
    top = sorted(
        ((k, v) for k, v in stats.stats.items() if not k[0].startswith(here)),
        key=lambda kv: kv[1][3],
        reverse=True,
    )
    summary = [
        {
            "function": f"{Path(f).name}:{line}:{name}",
            "calls": nc,
            "cumulativeSeconds": ct,
            "ownSeconds": tt,
            "share": ct / total if total else 0,
        }
        for (f, line, name), (_, nc, tt, ct, _) in top[:25]
    ]
    return buf.getvalue(), summary


# --- the simulator (child process) --------------------------------------------------------


def simulate(members: int, heartbeat_seconds: float) -> None:
    from alliance import weights
    from alliance.store import Store, StoreConfig

    store = Store(StoreConfig.from_env(), workers=SIM_THREADS)
    names = [f"sim-{i:04d}" for i in range(members)]
    beat = {"state": "ready", "trainRows": 10, "testRows": 10}
    emit_lock = threading.Lock()

    def emit(event: dict) -> None:
        with emit_lock:
            print(json.dumps(event), flush=True)

    started = time.time()
    store.map(lambda m: store.put_heartbeat(m, beat), names)
    emit({"event": "ready", "t": time.time(), "seconds": time.time() - started})

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def heartbeats() -> None:
        # Every member's heartbeat is rewritten every heartbeat_seconds, the members spread
        # evenly over the interval; whatever is due is written by a few threads, so a slow
        # gateway delays the heartbeats a little instead of letting them go stale.
        last = {m: started + heartbeat_seconds * (i / members - 1) for i, m in enumerate(names)}
        with ThreadPoolExecutor(4, thread_name_prefix="heartbeat") as pool:
            while not stop.wait(0.5):
                now = time.time()
                due = [m for m in names if now - last[m] >= heartbeat_seconds]
                list(pool.map(lambda m: store.put_heartbeat(m, beat), due))
                for m in due:
                    last[m] = now

    threading.Thread(target=heartbeats, daemon=True).start()
    known = set(names)
    seen: dict[str, str] = {}
    done: set[tuple] = set()
    while not stop.is_set():
        for obj in store.list_tasks():
            if seen.get(obj.key) == obj.etag:
                continue
            task = store.get_json(obj.key)
            seen[obj.key] = obj.etag
            if task is None:
                continue
            ident = (task["run"], task["round"], task["kind"])
            if ident in done:
                continue
            done.add(ident)
            seen_at = time.time()
            run, round_ = task["run"], task["round"]
            model = store.get_model(task["modelId"])
            addressed = [m for m in task["members"] if m in known]

            def answer(member: str, kind=task["kind"], run=run, round_=round_, model=model):
                if kind == "train":
                    offset = np.float32(1e-4 * (int(member.rsplit("-", 1)[1]) % 100))
                    data = weights.dumps([a + offset for a in model])
                    store.put_update(
                        run, round_, member, data, {"numExamples": 10, "loss": 0.1, "seconds": 0.0}
                    )
                else:
                    store.put_result(
                        run,
                        round_,
                        "validations",
                        member,
                        {"numExamples": 10, "accuracy": 0.9, "loss": 0.1, "seconds": 0.0},
                    )
                return time.time()

            times = store.map(answer, addressed)
            emit(
                {
                    "event": "task",
                    "run": run,
                    "round": round_,
                    "kind": task["kind"],
                    "members": len(addressed),
                    "seen": seen_at,
                    "first": min(times, default=seen_at),
                    "last": max(times, default=seen_at),
                }
            )
        stop.wait(POLL_SECONDS)


def main() -> None:
    p = argparse.ArgumentParser(description="The member simulator of benchmark 9d.")
    p.add_argument("--simulate", action="store_true", required=True)
    p.add_argument("--members", type=int, default=MEMBERS)
    p.add_argument("--heartbeat-seconds", type=float, default=HEARTBEAT_SECONDS)
    args = p.parse_args()
    simulate(args.members, args.heartbeat_seconds)


if __name__ == "__main__":
    main()
