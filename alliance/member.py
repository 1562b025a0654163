"""The member agent: a long-running loop next to a member's data.

    validate the local data → heartbeat → wait for a task → train / validate → upload

It needs no rights but the store's: the same agent runs in a Kubernetes pod bound to the
member's PVC, as a local process of the embedded runner, or at another site. TensorFlow stays
imported, the model compiled and the data parsed between rounds; only the weights change.

The heartbeat (``members/<name>.json``) holds the member's state and data summary, or the exact
data validation error. Its content changes only when the state does, so the coordinator, which
reads liveness from the object's modification time, re-reads it only then.

It waits for tasks on the notifications of the notice bucket (``contract.notice_bucket``),
which only the coordinator writes to, and polls the task list when the store sends none.

With ``metrics_port`` set the agent serves Prometheus metrics (``alliance.metrics``): tasks by
kind and outcome, their seconds, and the last training throughput.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from alliance import contract, weights
from alliance import metrics as metrics_mod
from alliance.cpulease import CpuLease
from alliance.data.datadir import validate_data_dir
from alliance.data.errors import DataError
from alliance.data.schema import DataSchema
from alliance.model import ModelError
from alliance.store import Changes, Store, StoreError, result_key
from alliance.trainers import CommandTrainer, KerasTrainer, TaskError, Trainer

log = logging.getLogger(__name__)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_threads(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """This member's CPU share: ALLIANCE_CPU_THREADS, else the cgroup CPU limit, else all."""
    if os.environ.get(contract.ENV_CPU_THREADS):
        return max(1, int(os.environ[contract.ENV_CPU_THREADS]))
    try:  # cgroup v2: "max 100000" or "<quota> <period>"; a pod's CPU limit lands here
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            return max(1, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@dataclass
class AgentConfig:
    name: str
    data_dir: Path
    #: None: the schema the alliance was initialised with (alliance.json), else mnist-in-csv.
    schema: DataSchema | None = None
    train_command: str | None = None
    validate_command: str | None = None
    #: With the notice bucket's notifications the agent looks at the tasks when the
    #: coordinator changes one, and every recheck_seconds anyway. Without them, it polls the
    #: task list: every poll_seconds for fast_seconds after the member's last
    #: task or a change of its tasks (the next stage usually follows within that), then every
    #: waiting_poll_seconds while a run counts on it, every idle_poll_seconds when none does.
    #: A poll costs the member and the store about 2 ms of CPU (README "Performance").
    poll_seconds: float = 0.1
    fast_seconds: float = 5.0
    waiting_poll_seconds: float = 0.3
    idle_poll_seconds: float = 2.0
    recheck_seconds: float = 10.0
    #: Liveness for the coordinator (lost after 60 s by default): a beat costs the store a
    #: write, about 7 ms of the embedded gateway's CPU.
    heartbeat_seconds: float = 10.0
    cache_dir: Path | None = None
    validator: bool = False  # only test.csv: scores each round's model, never trains
    metrics_port: int = 0  # serve Prometheus metrics on this port; 0: not served
    #: Members on one machine taking turns on its cores (alliance/cpulease.py); None: no lease.
    cpu_lease: CpuLease | None = None


class Agent:
    def __init__(self, store: Store, config: AgentConfig):
        self.store = store
        self.config = config
        self.name = config.name
        self._stop = threading.Event()
        self._state: dict = {"state": "starting"}
        self._state_lock = threading.Lock()
        self._trainer: Trainer | None = None
        self._done: set[tuple[str, int, str]] = set()
        self._tasks: dict[str, tuple[str, dict]] = {}  # key -> (etag, task)
        self._model_cache: tuple[str, list] | None = None  # the last global model fetched
        self.tasks_done = 0
        self.schema: DataSchema | None = config.schema

    # --- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        changes = None
        metrics_mod.agent_started(self.name)
        server = metrics_mod.serve(self.config.metrics_port) if self.config.metrics_port else None
        try:
            self._publish_state({"state": "starting"})
            beat.start()
            if self.schema is None:
                try:
                    self.schema = self._alliance_schema()
                except TaskError:  # stopped while waiting for the alliance
                    return
            summary = None
            while summary is None and not self._stop.is_set():
                summary = self._check_data()
                if summary is None:
                    self._stop.wait(5.0)  # data invalid: wait for the member to fix it
            if summary is not None:
                # TensorFlow and the model are loaded before the member says it is ready, so
                # the first round does not wait for them.
                try:
                    self.trainer()
                except TaskError:  # stopped while waiting for the alliance
                    return
                except ModelError as exc:  # the alliance's model does not fit this data
                    log.error("the alliance's model does not fit this member's data: %s", exc)
                    message = f"the alliance's model does not fit this member's data: {exc}"
                    self._publish_state({"state": "invalid", "message": message})
                    self._stop.wait()
                    return
                self._publish_state(summary)
                log.info(
                    "%s ready: %d training rows, %d test rows; waiting for tasks",
                    self.name,
                    summary["trainRows"],
                    summary["testRows"],
                )
            changes = self.store.watch_tasks()
            active = time.monotonic()
            while not self._stop.is_set():
                if self.poll_near():
                    active = time.monotonic()
                self._wait_for_tasks(changes, time.monotonic() - active)
        finally:
            self._stop.set()
            if changes is not None:
                changes.close()
            if server is not None:
                server.stop()
            beat.join(timeout=2.0)
            try:  # best effort: a store that is down must not keep the member from stopping
                self.store.with_retry(3.0).put_heartbeat(
                    self.name, {**self._state, "state": "stopped"}
                )
            except StoreError as exc:
                log.warning("could not publish the stopped state: %s", exc)

    def _wait_for_tasks(self, changes: Changes | None, quiet_seconds: float) -> None:
        """Until the coordinator's next task change (the notice bucket's notifications), or
        ``recheck_seconds``; while there is no stream (connecting, refused, or down), one poll
        interval, cut short when the stream comes up."""
        if changes is None:
            self._stop.wait(self._poll_interval(quiet_seconds))
            return
        wait = self.config.recheck_seconds if changes.live else self._poll_interval(quiet_seconds)
        changes.wait_for(wait, self._stop.is_set)

    def _poll_interval(self, quiet_seconds: float) -> float:
        if quiet_seconds < self.config.fast_seconds:
            return self.config.poll_seconds
        if self._asked():
            return self.config.waiting_poll_seconds
        return self.config.idle_poll_seconds

    def _asked(self) -> bool:
        return any(self._for_me(task) for _, task in self._tasks.values())

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_seconds):
            try:
                with self._state_lock:
                    state = self._state
                self.store.with_retry(self.config.heartbeat_seconds).put_heartbeat(self.name, state)
            except StoreError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _publish_state(self, state: dict) -> None:
        with self._state_lock:
            self._state = state
        self.store.put_heartbeat(self.name, state)

    # --- data -------------------------------------------------------------------------------

    def _check_data(self) -> dict | None:
        """Validate the local data before taking any work: the ready state, or None after
        publishing the exact error."""
        try:
            summary = validate_data_dir(
                self.config.data_dir,
                self.schema,
                cache_dir=self.config.cache_dir,
                require_train=not self.config.validator,
                require_test=self.config.validator,
            )
        except DataError as exc:
            log.error("data invalid: %s", exc)
            self._publish_state({"state": "invalid", "error": exc.to_dict(), "message": str(exc)})
            return None
        log.info("data valid: %d train rows, %d test rows", summary.train_rows, summary.test_rows)
        ready = {
            "state": "ready",
            "trainRows": summary.train_rows,
            "testRows": summary.test_rows,
            "schema": self.schema.to_dict(),
        }
        if summary.warnings:  # valid, but likely not what was meant (e.g. one label only)
            ready["warnings"] = list(summary.warnings)
            for warning in summary.warnings:
                log.warning("data: %s", warning)
        return ready

    def trainer(self) -> Trainer:
        if self._trainer is None:
            if self.config.train_command or self.config.validate_command:
                self._trainer = CommandTrainer(
                    self.config.data_dir, self.config.train_command, self.config.validate_command
                )
            else:
                from alliance import model as model_mod

                model_mod.configure_threads(cpu_threads())
                manifest = self._alliance()
                keras_model = model_mod.build(manifest["model"], self.store)
                model_mod.check_fits(keras_model, self.schema)
                self._trainer = KerasTrainer(
                    keras_model,
                    self.config.data_dir,
                    self.schema,
                    self.config.cache_dir,
                )
        return self._trainer

    def _alliance_schema(self) -> DataSchema:
        """The schema the alliance was initialised with (none recorded: mnist-in-csv)."""
        recorded = self._alliance().get("dataSchema")
        schema = DataSchema.from_dict(recorded) if isinstance(recorded, dict) else DataSchema()
        log.info("data schema from the alliance: %s", schema.to_dict())
        return schema

    def _alliance(self) -> dict:
        while not self._stop.is_set():
            manifest = self.store.get_alliance()
            if manifest is not None:
                return manifest
            self._stop.wait(0.5)
        raise TaskError("stopped before the alliance was initialised")

    # --- tasks ------------------------------------------------------------------------------

    def poll_near(self) -> bool:
        """Poll once; True when the next stage is likely near: this member just worked, or
        a task addressed to it changed. A change of other members' tasks does not count."""
        before = self._my_tasks()
        return self.poll_once() or self._my_tasks() != before

    def _my_tasks(self) -> dict[str, str]:
        return {key: etag for key, (etag, task) in self._tasks.items() if self._for_me(task)}

    def _for_me(self, task: dict) -> bool:
        return self.name in task["members"]

    def poll_once(self) -> bool:
        """Look at the runs' tasks once; do every task addressed to this member."""
        did = False
        for task in self._pending_tasks():
            if self._stop.is_set():
                break
            self.handle(task)
            did = True
        return did

    def _pending_tasks(self) -> list[dict]:
        listing = self.store.list_tasks()
        live = {o.key for o in listing}
        for key in list(self._tasks):
            if key not in live:
                del self._tasks[key]
        for obj in listing:
            if self._tasks.get(obj.key, ("",))[0] != obj.etag:
                task = self.store.get_json(obj.key)
                if task is not None:
                    self._tasks[obj.key] = (obj.etag, task)
        now = time.time()
        pending = []
        for _, task in self._tasks.values():
            ident = (task["run"], task["round"], task["kind"])
            if self._for_me(task) and ident not in self._done:
                if task["deadline"] < now:
                    self._done.add(ident)  # too late to count; do not waste the CPU
                elif self._already_done(task):
                    self._done.add(ident)
                else:
                    pending.append(task)
        return sorted(pending, key=lambda t: (t["run"], t["round"], t["kind"] != "validate"))

    def _already_done(self, task: dict) -> bool:
        """After a restart, a task whose result is already stored is not done twice."""
        if task["kind"] == "train":
            return self.store.update_exists(task["run"], task["round"], self.name)
        key = result_key(task["run"], task["round"], "validations", self.name)
        return self.store.exists(key)

    def _model(self, model_id: str) -> list:
        if self._model_cache is None or self._model_cache[0] != model_id:
            self._model_cache = (model_id, self.store.get_model(model_id))
        return self._model_cache[1]

    def handle(self, task: dict) -> None:
        run, round_, kind = task["run"], task["round"], task["kind"]
        started = time.perf_counter()
        throughput = None
        try:
            arrays = self._model(task["modelId"])
            if kind == "train":
                with self._cpu() as waited:
                    new, metrics = self.trainer().train(arrays, task["epochs"], task["batchSize"])
                metrics["cpuWaitSeconds"] = waited
                data = weights.dumps(new)
                metrics["taskSeconds"] = time.perf_counter() - started
                self.store.put_update(run, round_, self.name, data, metrics)
                throughput = metrics_mod.samples_per_second(
                    metrics, task["epochs"], metrics["taskSeconds"]
                )
            else:
                with self._cpu() as waited:
                    metrics = self.trainer().validate(arrays)
                metrics["cpuWaitSeconds"] = waited
                metrics["taskSeconds"] = time.perf_counter() - started
                self.store.put_result(run, round_, "validations", self.name, metrics)
            log.info(
                "%s round %d %s done in %.1f s: %s",
                run,
                round_,
                kind,
                metrics["taskSeconds"],
                ", ".join(
                    f"{k} {v:.4f}"
                    for k, v in metrics.items()
                    if isinstance(v, float) and k != "taskSeconds"
                ),
            )
        except (TaskError, DataError, StoreError, weights.WeightsError) as exc:
            log.error("%s round %d %s failed: %s", run, round_, kind, exc)
            self._report_failure(task, str(exc))
            metrics_mod.task_finished(self.name, kind, time.perf_counter() - started, ok=False)
        else:
            seconds = time.perf_counter() - started
            metrics_mod.task_finished(
                self.name, kind, seconds, ok=True, samples_per_second=throughput
            )
        self._done.add((run, round_, kind))
        self.tasks_done += 1

    def _cpu(self) -> contextlib.AbstractContextManager[float]:
        """Computing: with the machine's CPU lease when members take turns on it."""
        if self.config.cpu_lease is None:
            return contextlib.nullcontext(0.0)
        return self.config.cpu_lease.hold(self._stop)

    def _report_failure(self, task: dict, reason: str) -> None:
        kind = "failures" if task["kind"] == "train" else "validations"
        payload = {"reason": reason} if kind == "failures" else {"error": reason}
        try:
            self.store.put_result(task["run"], task["round"], kind, self.name, payload)
        except StoreError as exc:
            log.error("could not report the failure: %s", exc)
