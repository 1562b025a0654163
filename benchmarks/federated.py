"""9a and 9b: a real embedded alliance on the full MNIST set, against a centralized epoch.

9a. 3 members, each with an IID third of the 60,000 training rows and of the 10,000 test rows
    (so the round's example-weighted accuracy is the accuracy on the whole test set), 1 local
    epoch, batch 32, FedAvg, 3 rounds, through the real embedded runner: the S3 gateway, 3
    member agent processes with ALLIANCE_CPU_THREADS = cores // 3 (at least 1), and the
    coordinator in this process through ``alliance.driver.drive``. Before the run, each
    member's data is parsed once by ``alliance check-data`` with the members' ALLIANCE_CACHE_DIR,
    so the agents read the parse cache; round 1 is still reported apart from rounds 2-3 because
    each agent imports TensorFlow and builds its model on its first task. Then, in a separate
    process, one centralized epoch of the same model on the same 60,000 rows (default
    threading), timed for ``fit`` plus the evaluation on the 10,000 test rows.
9b. From the same run, per round: the round's wall time minus the slowest member's ``fit`` time
    minus the slowest validator's ``evaluate`` time, i.e. everything that is not model
    computation (task pick-up, model download, weight (de)serialization, uploads, aggregation,
    the coordinator's polling, status persistence).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.common import PROJECT_ROOT, BenchError, Result, cores, mnist_files, say

RUN = "bench"
MEMBERS = 3
TARGET = 0.988  # 9f: test accuracy
REPEATS = 3  # alternations of federated and centralized
MAX_ROUNDS = 5  # a federated run with the defaults stops at TARGET or after this many rounds
MAX_EPOCHS = 4  # the centralized run likewise
ROUNDS = 3  # the comparison recipe
RATIO_TARGET = 1.1
TIME_TO_ACCURACY_TARGET = 1.25
OVERHEAD_TARGET = 1.0  # seconds per round
CPU_TARGET_PERCENT = 2.0  # of one core, while members train
HARD_TIMEOUT = 20 * 60  # one federated run; a hung member must not hang `make bench`


class _AggregationLog(logging.Handler):
    """Picks the aggregation time out of the coordinator's log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("round %d: aggregated") and record.args:
            self.seconds[int(record.args[0])] = float(record.args[-1])


@dataclass
class FederatedRun:
    """One run of the embedded alliance: its status, what the members stored, and the CPU the
    platform's processes used."""

    status: Any
    members: dict[int, dict]
    aggregation_seconds: dict[int, float]
    cpu: CpuSampler
    member_pids: dict[str, int]
    parse_seconds: float

    @functools.cached_property
    def rounds(self) -> list[dict]:
        """Per round: times, accuracy, the orchestration overhead and the platform's CPU."""
        return _rounds(self)


def run(
    work: Path,
    with_centralized: bool = True,
    repeats: int = REPEATS,
    cpu_sharing: str = "auto",
    compare_polling: bool = True,
) -> list[Result]:
    """9a, 9b and 9f: ``repeats`` alternations of a federated run with the platform's defaults
    (until TARGET, at most MAX_ROUNDS rounds) and a centralized run (until TARGET, at most
    MAX_EPOCHS epochs), then one run of the 3-round FedAvg recipe for comparison."""
    a = Result("9a", "3 members × 20,000 MNIST rows vs centralized")
    b = Result("9b", "orchestration overhead and platform CPU per round")
    f = Result("9f", "time to 0.988 test accuracy, federated vs centralized")
    train_file, test_file = mnist_files()  # raises Skip

    from alliance import cpulease
    from alliance.data.split import split_dataset

    cpu = cpulease.plan(cores(), MEMBERS, cpu_sharing)
    started = time.perf_counter()
    say(f"9a: splitting {train_file.name} and {test_file.name} into {MEMBERS} IID members")
    dirs = split_dataset(train_file, test_file, work / "members", MEMBERS, "iid", seed=0)
    split_seconds = time.perf_counter() - started
    defaults = default_spec()
    federated, central = [], []
    for i in range(1, repeats + 1):
        say(f"9a: alternation {i}/{repeats}: federated, defaults ({_recipe(defaults)})")
        federated.append(_federated(work, f"defaults-{i}", dirs, defaults, cpu, stop_at=TARGET))
        if with_centralized:
            say(f"9a: alternation {i}/{repeats}: centralized")
            central.append(_centralized(work, MAX_EPOCHS, TARGET))
    recipe = recipe_spec()
    comparison = None
    if dataclasses.replace(recipe, rounds=defaults.rounds) != defaults and with_centralized:
        say(f"9f: the 3-round recipe for comparison ({_recipe(recipe)})")
        comparison = _federated(work, "recipe", dirs, recipe, cpu, stop_at=None)
    polling = None
    if compare_polling:
        say("9b: for comparison, the coordinator polling the store every 0.05 s")
        polling = _federated(work, "polling", dirs, recipe, cpu, stop_at=None, notify=False)

    _report_9a(a, federated, central, cpu)
    _report_9b(b, federated, polling)
    if with_centralized:
        _report_9f(f, federated, central, comparison, defaults, recipe)
    for res in (a, b, f):
        res.details.update(
            splitSeconds=split_seconds,
            cpuPlan={"slots": cpu.slots, "threads": cpu.threads, "mode": cpu_sharing},
            cores=cores(),
            cpuModel=cpu_model(),
        )
    return [a, b, f] if with_centralized else [a, b]


def default_spec():
    """What ``alliance run`` does with no flags but the rounds, on 9a's members."""
    from alliance.engine import RunSpec

    return RunSpec(
        rounds=MAX_ROUNDS,
        min_members=MEMBERS,
        round_deadline_seconds=900,
        validation_deadline_seconds=300,
    )


def recipe_spec():
    """The 3-round recipe 9a was first written for: FedAvg, 1 local epoch, batch 32."""
    return dataclasses.replace(
        default_spec(), rounds=ROUNDS, local_epochs=1, batch_size=32, aggregator="fedavg"
    )


def _recipe(spec) -> str:
    params = ", ".join(f"{k} {v}" for k, v in sorted(spec.aggregator_params.items()))
    return (
        f"{spec.aggregator}{f' ({params})' if params else ''}, {spec.local_epochs} local "
        f"epoch(s), batch {spec.batch_size}"
    )


def _federated(
    work: Path, name: str, dirs: list[Path], spec, cpu, stop_at: float | None, notify: bool = True
):
    """One federated run; ``notify`` False: the coordinator polls, as before notifications."""
    from alliance.driver import StoreSink, drive
    from alliance.embedded import EmbeddedAlliance, init_in_subprocess
    from alliance.store import Store

    home = work / name
    home.mkdir(parents=True)
    (work / "cache").mkdir(exist_ok=True)
    (home / "cache").symlink_to(work / "cache")  # one parse cache for every alternation
    agg_log = _AggregationLog()
    coord_logger = logging.getLogger("alliance.coordinator")
    old_level = coord_logger.level
    coord_logger.addHandler(agg_log)
    coord_logger.setLevel(logging.INFO)
    (home / "logs").mkdir()
    file_log = logging.FileHandler(home / "logs" / "coordinator.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger("alliance")
    root_level = root_logger.level
    root_logger.addHandler(file_log)
    root_logger.setLevel(logging.INFO)
    try:
        with EmbeddedAlliance(home) as alliance:
            env = {**os.environ, **alliance.env(cpu)}
            t0 = time.perf_counter()
            checks = [
                subprocess.Popen(
                    [sys.executable, "-m", "alliance", "check-data", str(d)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                for d in dirs
            ]
            for d, p in zip(dirs, checks, strict=True):
                out = p.communicate()[0].decode(errors="replace")
                if p.returncode != 0:
                    raise BenchError(f"check-data {d.name} failed: {out.strip()[-500:]}")
            parse_seconds = time.perf_counter() - t0

            init = init_in_subprocess(alliance.env(cpu), home / "logs" / "init.log", None, 0)
            alliance.start_members(dirs, cpu)
            say(
                f"9a: S3 gateway at {alliance.server.endpoint}; {MEMBERS} member agents, "
                f"{cpu.describe(MEMBERS)}; logs in {home / 'logs'}"
            )
            alliance.wait_until_ready(check=lambda: _init_ok(init, home))
            deadline = time.monotonic() + HARD_TIMEOUT
            progress = _Progress(spec.rounds)
            sink = StoreSink(alliance.store, RUN, on_change=progress)

            def stop(seconds: float) -> bool:
                time.sleep(seconds)
                _init_ok(init, home)
                if time.monotonic() > deadline:
                    raise BenchError(f"the federated run took over {HARD_TIMEOUT} s")
                return stop_at is not None and progress.best >= stop_at

            pids = {m.name: m.process.pid for m in alliance.members}
            polls = contextlib.nullcontext()
            if not notify:
                polls = mock.patch.object(Store, "watch", lambda self, prefix: _NoChanges())
            with polls, CpuSampler({"gateway": alliance.server.process.pid, **pids}) as sampler:
                status = drive(
                    alliance.store,
                    RUN,
                    spec,
                    sink,
                    stop,
                    lost=alliance.lost,
                    members=alliance.names,
                )
            init.wait()
            # Stopped at the target, the next round may have begun: only finished rounds count.
            status.history = [r for r in status.history if r.finished_at]
            if status.phase == "Failed" or not status.history:
                raise BenchError(f"the run ended {status.phase}: {status.message}")
            members = _member_metrics(alliance.store, status)
    finally:
        coord_logger.removeHandler(agg_log)
        coord_logger.setLevel(old_level)
        root_logger.removeHandler(file_log)
        root_logger.setLevel(root_level)
        file_log.close()
    return FederatedRun(status, members, agg_log.seconds, sampler, pids, parse_seconds)


class _NoChanges:
    """A store that sends no notifications: the driver polls every POLL_SECONDS."""

    live = False

    def wait(self, timeout: float) -> bool:
        return False

    def close(self) -> None:
        pass


def _init_ok(init, home: Path) -> None:
    if init.poll() not in (None, 0):
        raise BenchError(f"alliance init failed; see {home / 'logs' / 'init.log'}")


class _Progress:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.stage: tuple = ()
        self.reported: set[int] = set()
        self.best = 0.0  # the best global accuracy so far

    def __call__(self, status) -> None:
        for r in status.history:
            if r.finished_at and r.round not in self.reported:
                self.reported.add(r.round)
                self.best = max(self.best, r.accuracy or 0.0)
                acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
                say(
                    f"9a: round {r.round}/{self.rounds} done in {r.seconds:.1f} s "
                    f"(slowest fit {r.train_seconds:.1f} s, slowest validation "
                    f"{r.validation_seconds:.1f} s), accuracy {acc}"
                )
        if (status.round, status.stage) != self.stage and status.message:
            self.stage = (status.round, status.stage)
            say(f"9a:   {status.message}")


def _member_metrics(store, status) -> dict[int, dict]:
    """Per round and member: the update's / validation's metrics, and its pick-up delay.

    The pick-up delay is when the result object was stored (the gateway's modification time)
    minus the member's task time minus the stage's start (when the coordinator published the
    task, to within its poll): the time to notice the task, plus the result's upload.
    """
    out: dict[int, dict] = {}
    for r in status.history:
        prefix = f"runs/{RUN}/rounds/{r.round:05d}/"
        stored = {o.key.removeprefix(prefix): o.last_modified for o in store.list(prefix)}
        updates = {}
        for m in r.members:
            _, meta = store.get_update(RUN, r.round, m)
            updates[m] = {
                k: meta.get(k)
                for k in (
                    "seconds",
                    "taskSeconds",
                    "cpuWaitSeconds",
                    "loss",
                    "samplesPerSecond",
                    "numExamples",
                )
            }
            when = stored.get(f"updates/{m}.npz")
            updates[m]["storedAt"] = when
            if when and meta.get("taskSeconds") is not None:
                updates[m]["pickupSeconds"] = when - meta["taskSeconds"] - r.started_at
        validations = {}
        # The round's own validators (status.validators names the current round's only).
        for m in sorted(
            k[len("validations/") : -len(".json")] for k in stored if k.startswith("validations/")
        ):
            v = store.get_json(f"{prefix}validations/{m}.json") or {}
            validations[m] = {
                k: v.get(k)
                for k in ("seconds", "taskSeconds", "cpuWaitSeconds", "accuracy", "numExamples")
            }
            when = stored.get(f"validations/{m}.json")
            if when and v.get("taskSeconds") is not None:
                validations[m]["pickupSeconds"] = when - v["taskSeconds"] - r.aggregated_at
        out[r.round] = {"updates": updates, "validations": validations}
    return out


def _centralized(work: Path, epochs: int, until: float) -> dict:
    data_dir = mnist_files()[0].parent
    say("9a: centralized baseline in a separate process (default threading, all cores)")
    log_path = work / "logs" / "centralized.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.centralized",
                "--data-dir",
                str(data_dir),
                "--cache-dir",
                str(work / "cache"),
                "--epochs",
                str(epochs),
                "--until",
                str(until),
                "--batch-size",
                "32",
            ],
            cwd=PROJECT_ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        last = ""
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("progress: "):
                say("9a:   centralized: " + line.removeprefix("progress: "))
            elif line:
                last = line
        proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError("the centralized baseline failed: " + " | ".join(tail))
    result = json.loads(last)
    say(
        f"9a: centralized epoch 1: fit {result['fitSeconds']:.1f} s + evaluate "
        f"{result['evalSeconds']:.1f} s = {result['seconds']:.1f} s, accuracy "
        f"{result['accuracy']:.4f}"
    )
    return result


def _rounds(fr: FederatedRun) -> list[dict]:
    out = []
    for r in fr.status.history:
        m = fr.members.get(r.round, {"updates": {}, "validations": {}})
        ups, vals = m["updates"].values(), m["validations"].values()
        # The slowest member's computation, with its wait for the CPU lease when members
        # take turns (their fits then follow one another).
        fit = max(((u["seconds"] or 0) + (u["cpuWaitSeconds"] or 0) for u in ups), default=0)
        evaluate = max(((v["seconds"] or 0) + (v["cpuWaitSeconds"] or 0) for v in vals), default=0)
        fit, evaluate = fit or r.train_seconds, evaluate or r.validation_seconds
        training = r.aggregated_at - r.started_at  # to the aggregate being observed
        gateway_training = fr.cpu.used("gateway", r.started_at, r.aggregated_at)
        coordinator_training = fr.cpu.used("coordinator", r.started_at, r.aggregated_at)
        platform_training = gateway_training + coordinator_training
        # While every member computes: from the last member's task start to the first
        # update's upload, a second inside each end so that neither the model transfers nor
        # the aggregation fall in (the "while the members train").
        starts = [
            u["storedAt"] - u["taskSeconds"] for u in ups if _has(u, "storedAt", "taskSeconds")
        ]
        ends = [u["storedAt"] for u in ups if _has(u, "storedAt")]
        computing = (max(starts) + 1.0, min(ends) - 1.0) if starts and ends else None
        computing_seconds = computing[1] - computing[0] if computing else 0.0
        computing_cpu = (
            fr.cpu.used("gateway", *computing) + fr.cpu.used("coordinator", *computing)
            if computing_seconds > 5
            else None
        )
        idle_members = sum(
            fr.cpu.used(name, u["storedAt"], r.aggregated_at)
            for name, u in m["updates"].items()
            if u.get("storedAt") and u["storedAt"] < r.aggregated_at
        )
        # An agent waiting for the next stage: members that uploaded 2 s or more before the
        # aggregation, from half a second after their upload (its response and log line).
        idle = [
            (name, u["storedAt"] + 0.5, r.aggregated_at)
            for name, u in m["updates"].items()
            if u.get("storedAt") and r.aggregated_at - u["storedAt"] >= 2.0
        ]
        idle_seconds = sum(t1 - t0 for _, t0, t1 in idle)
        idle_rate = (
            100 * sum(fr.cpu.used(*w) for w in idle) / idle_seconds if idle_seconds else None
        )
        out.append(
            {
                "round": r.round,
                "seconds": r.seconds,
                "accuracy": r.accuracy,
                "loss": r.loss,
                "trainLoss": r.train_loss,
                "fitSeconds": fit,
                "evaluateSeconds": evaluate,
                "overheadSeconds": r.seconds - fit - evaluate,
                "trainingStageSeconds": training,
                "trainingStageOverhead": training - fit,
                "validationStageOverhead": r.finished_at - r.aggregated_at - evaluate,
                "aggregationSeconds": fr.aggregation_seconds.get(r.round),
                "memberPickupMax": max((u.get("pickupSeconds", 0.0) for u in ups), default=None),
                "validatorPickupMax": max(
                    (v.get("pickupSeconds", 0.0) for v in vals), default=None
                ),
                # CPU seconds of the gateway and the coordinator over the whole round.
                "platformCpuSeconds": fr.cpu.used("gateway", r.started_at, r.finished_at)
                + fr.cpu.used("coordinator", r.started_at, r.finished_at),
                # While members train: the gateway, the coordinator, and each member from its
                # update's upload to the aggregation (idle, waiting for the next stage).
                "platformCpuTrainingPercent": 100
                * (platform_training + idle_members)
                / max(training, 1e-9),
                "idleMemberCpuSeconds": idle_members,
                "computingSeconds": computing_seconds,
                "idleAgentSeconds": idle_seconds,
                "idleAgentCpuPercent": idle_rate,
                "platformCpuComputingPercent": None
                if computing_cpu is None
                else 100 * computing_cpu / computing_seconds,
                "gatewayCpuTrainingSeconds": gateway_training,
                "coordinatorCpuTrainingSeconds": coordinator_training,
                "members": m,
            }
        )
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} %"


def _has(d: dict, *keys: str) -> bool:
    return all(d.get(k) is not None for k in keys)


def _report_9a(a: Result, federated: list[FederatedRun], central: list[dict], cpu) -> None:
    ratios, later_ratios = [], []
    for i, fr in enumerate(federated):
        rounds = fr.rounds
        curve = " · ".join(f"{r['seconds']:.1f} s / {r['accuracy']:.4f}" for r in rounds)
        every = [r["seconds"] for r in rounds]
        if i < len(central):
            c = central[i]["seconds"]
            ratio = sum(every) / len(every) / c
            later = every[1:] or every
            ratios.append(ratio)
            later_ratios.append(sum(later) / len(later) / c)
            a.row(
                f"alternation {i + 1}: rounds (wall / accuracy); centralized epoch 1",
                f"{curve}; {central[i]['fitSeconds']:.1f} + {central[i]['evalSeconds']:.1f} = "
                f"{c:.1f} s / {central[i]['accuracy']:.4f}; ratio {ratio:.2f}",
                value=ratio,
            )
        else:
            a.row(f"run {i + 1}: rounds (wall / accuracy)", curve, value=every[0])
    a.details["alternations"] = [
        {"rounds": fr.rounds, "parseSeconds": fr.parse_seconds} for fr in federated
    ]
    a.details["centralized"] = central
    a.details["cpuSharing"] = cpu.describe(MEMBERS)
    if ratios:
        med = statistics.median(ratios)
        a.details.update(ratioMedian=med, ratios=ratios, ratiosRounds2on=later_ratios)
        a.row(
            f"mean round wall time ÷ centralized epoch, median of {len(ratios)} alternations "
            f"(members {cpu.describe(MEMBERS)})",
            f"{med:.2f} (spread {min(ratios):.2f}–{max(ratios):.2f}; rounds 2 on: "
            f"{statistics.median(later_ratios):.2f})",
            f"≤ {RATIO_TARGET}",
            med <= RATIO_TARGET,
            med,
        )


def _report_9b(b: Result, federated: list[FederatedRun], polling: FederatedRun | None) -> None:
    per_round: dict[int, list[dict]] = {}
    for fr in federated:
        for r in fr.rounds:
            per_round.setdefault(r["round"], []).append(r)
    for n, rs in sorted(per_round.items()):
        over = statistics.median(r["overheadSeconds"] for r in rs)
        cpu_s = statistics.median(r["platformCpuSeconds"] for r in rs)
        stage_pct = statistics.median(r["platformCpuTrainingPercent"] for r in rs)
        computing = [r["platformCpuComputingPercent"] for r in rs]
        pct = statistics.median(computing) if None not in computing else None
        agg = statistics.median(r["aggregationSeconds"] or 0 for r in rs)
        pick = statistics.median(r["validatorPickupMax"] or 0 for r in rs)
        b.row(
            f"round {n} ({len(rs)} runs, medians): wall − slowest fit − slowest validation",
            f"{over:.2f} s (aggregation {agg:.2f}, validators' pick-up ≤ {pick:.2f})",
            f"≤ {OVERHEAD_TARGET:.0f} s",
            over <= OVERHEAD_TARGET,
            over,
        )
        b.row(
            f"round {n}: platform CPU (gateway + coordinator) while every member computes",
            "-" if pct is None else f"{pct:.2f} % of one core",
            f"< {CPU_TARGET_PERCENT:.0f} %",
            pct is not None and pct < CPU_TARGET_PERCENT,
            pct,
        )
        b.row(
            f"round {n}: CPU of the gateway + coordinator over the whole round; over the "
            "training stage with the model transfers, the aggregation and members idle after "
            "their upload",
            f"{cpu_s:.2f} s; {stage_pct:.2f} % of one core",
            value=stage_pct,
        )
    idle = [r for rs in per_round.values() for r in rs if r["idleAgentCpuPercent"] is not None]
    if idle:
        seconds = sum(r["idleAgentSeconds"] for r in idle)
        rate = sum(r["idleAgentCpuPercent"] * r["idleAgentSeconds"] for r in idle) / seconds
        b.row(
            "an agent waiting for the next stage (members that uploaded ≥ 2 s before the "
            f"aggregation; {seconds:.0f} s observed)",
            f"{rate:.2f} % of one core",
            value=rate,
        )
    b.details["rounds"] = [
        [{k: v for k, v in r.items() if k != "members"} for r in fr.rounds] for fr in federated
    ]
    if polling is not None:
        rs = polling.rounds
        b.row(
            "for comparison, the coordinator polling every 0.05 s (as before notifications), "
            "rounds 1-3: overhead; platform CPU while every member computes; over the "
            "training stage",
            " · ".join(f"{r['overheadSeconds']:.2f} s" for r in rs)
            + "; "
            + " · ".join(_pct(r["platformCpuComputingPercent"]) for r in rs)
            + "; "
            + " · ".join(_pct(r["platformCpuTrainingPercent"]) for r in rs),
            value=statistics.median(r["platformCpuTrainingPercent"] for r in rs),
        )
        b.details["pollingRounds"] = [{k: v for k, v in r.items() if k != "members"} for r in rs]


def _time_to(target: float, rounds: list[dict]) -> tuple[float | None, int | None]:
    """Seconds from the start of round 1 to the end of the first round at ``target``."""
    total = 0.0
    for r in rounds:
        total = r["end"]
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return total, r["n"]
    return None, None


def _report_9f(f, federated, central, comparison, defaults, recipe) -> None:
    ratios = []
    for i, fr in enumerate(federated):
        start = fr.status.history[0].started_at
        fed = [
            {"n": r.round, "end": r.finished_at - start, "accuracy": r.accuracy}
            for r in fr.status.history
        ]
        ends, cen = 0.0, []
        for e in central[i]["epochs"]:
            ends += e["seconds"]
            cen.append({"n": e["epoch"], "end": ends, "accuracy": e["accuracy"]})
        t_fed, n_fed = _time_to(TARGET, fed)
        t_cen, n_cen = _time_to(TARGET, cen)
        ratio = t_fed / t_cen if t_fed and t_cen else None
        if ratio is not None:
            ratios.append(ratio)
        f.row(
            f"alternation {i + 1}: federated (defaults) per round; centralized per epoch",
            f"{_curve(fed)}; {_curve(cen)} → {TARGET} after {_num(t_fed)} s (round {n_fed}) "
            f"vs {_num(t_cen)} s (epoch {n_cen}): ratio {_num(ratio)}",
            value=ratio,
        )
    if comparison is not None:
        start = comparison.status.history[0].started_at
        rec = [
            {"n": r.round, "end": r.finished_at - start, "accuracy": r.accuracy}
            for r in comparison.status.history
        ]
        t_rec, _ = _time_to(TARGET, rec)
        f.row(
            f"for comparison, the 3-round recipe ({_recipe(recipe)}) per round",
            f"{_curve(rec)}; {TARGET} " + (f"after {t_rec:.1f} s" if t_rec else "not reached"),
            value=t_rec,
        )
        f.details["recipe"] = rec
    med = statistics.median(ratios) if len(ratios) == len(federated) else None
    f.row(
        f"time to {TARGET}, federated with the defaults ({_recipe(defaults)}) ÷ centralized, "
        f"median of {len(federated)}",
        "not reached in every run"
        if med is None
        else f"{med:.2f} (spread {min(ratios):.2f}–{max(ratios):.2f})",
        f"≤ {TIME_TO_ACCURACY_TARGET}",
        med is not None and med <= TIME_TO_ACCURACY_TARGET,
        med,
    )
    f.details.update(ratios=ratios, ratioMedian=med, defaults=defaults.to_dict())


def _curve(points: list[dict]) -> str:
    return " ".join(f"{p['accuracy']:.4f}" for p in points)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


class CpuSampler:
    """Samples the CPU seconds of some processes (and this one: the coordinator) every
    ``interval``; ``used(name, t0, t1)`` interpolates between samples (wall-clock times)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1):
        self.pids = {**pids, "coordinator": os.getpid()}
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._own = 0.0  # this sampler's CPU, not the coordinator's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
            self._own = time.thread_time()

    def _sample(self) -> None:
        now = time.time()
        values = {n: _cpu_seconds(p) for n, p in self.pids.items()}
        if values["coordinator"] is not None:
            values["coordinator"] -= self._own
        self.samples.append((now, values))

    def used(self, name: str, t0: float, t1: float) -> float:
        return max(0.0, self._at(name, t1) - self._at(name, t0))

    def _at(self, name: str, t: float) -> float:
        prev = None
        for when, values in self.samples:
            if when >= t:
                if prev is None or values.get(name) is None or prev[1].get(name) is None:
                    return values.get(name) or 0.0
                w0, v0 = prev[0], prev[1][name]
                return v0 + (values[name] - v0) * (t - w0) / max(when - w0, 1e-9)
            prev = (when, values)
        return (self.samples[-1][1].get(name) or 0.0) if self.samples else 0.0


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_model() -> str:
    """The CPU's model name, and whether it has AVX-512 (TensorFlow's kernels differ)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name or 'unknown'} ({simd})"
