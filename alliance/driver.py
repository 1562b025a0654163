"""The one loop that drives a training run, wherever its status lives.

The embedded runner (``alliance run``, ``alliance coordinate``) and the Kubernetes operator
(a kopf daemon per TrainingRun) both call ``drive``; they differ only in their *sink*, the
place a run's status is loaded from and saved to::

        drive(store, run, spec, sink, stopped, lost)
          │
          ├─ status = sink.load()            StoreSink: runs/<run>/status.json
          ├─ spec = pin_spec(...)             the operator: the TrainingRun's .status,
          │                                   with conditions, Events and metrics
          └─ until the run ends or stopped(poll):
               status' = coordinator.reconcile(status)   ◄─► store: heartbeats, results,
               sink.save(status, status')                     models, tasks

Everything a run needs to resume is in the status and the store, so a driver stopped or killed
at any point is resumed by calling ``drive`` again: an action taken but not yet saved is
idempotent and is simply taken again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Protocol

from alliance.coordinator import Coordinator
from alliance.engine import Phase, RunSpec, RunStatus, SpecError
from alliance.store import Changes, Store, StoreError, run_key

log = logging.getLogger(__name__)

#: How often the loop looks at the store while it waits for members, when the store sends no
#: notifications (and before round 1: members getting ready announce it in no run's objects).
POLL_SECONDS = 0.05
#: With notifications the loop waits for the next object under the run's rounds, and looks
#: anyway this often: deadlines, heartbeats and lost members are announced by no object (a
#: look costs the store and the coordinator about 10 ms of CPU: 0.2 % of a core at this pace).
RECHECK_SECONDS = 5.0
FINISHED = (Phase.COMPLETED, Phase.FAILED)


class Sink(Protocol):
    """Where a run's status lives."""

    def load(self) -> RunStatus | None:
        """The status saved last, or None for a run that never started."""

    def save(self, old: RunStatus, new: RunStatus) -> None:
        """Called after every step of the loop (``old`` may equal ``new``): the sink decides
        what to write, and when."""

    def pinned(self, spec: RunSpec) -> None:
        """The spec the run keeps (it may differ from the one asked for: see pin_spec)."""


def pin_spec(store: Store, run: str, spec: RunSpec | None, status: RunStatus) -> RunSpec:
    """The spec a run follows: the caller's until round 1 starts (an edit before then
    applies), from then on the one stored when it started, so a run never changes its rules
    halfway. ``spec`` None: the caller has no valid spec, only a started run can go on."""
    saved = store.get_run_spec(run)
    if spec is not None and (status.round == 0 or saved is None):
        if saved != spec.to_dict():
            store.put_run_spec(run, spec.to_dict())
        return spec
    if saved is None:
        raise StoreError(f"runs/{run}/spec.json is missing from the store")
    try:
        pinned = RunSpec.from_dict(saved)
    except (SpecError, TypeError, ValueError) as exc:  # written by someone else than a driver
        raise StoreError(f"runs/{run}/spec.json is not a run spec: {exc}") from None
    if spec is not None and pinned != spec:
        log.warning("run %s has started: it keeps the spec it started with", run)
    return pinned


def drive(
    store: Store,
    run: str,
    spec: RunSpec | None,
    sink: Sink,
    stopped: Callable[[float], bool],
    lost: Callable[[], set[str]] = set,
    poll_seconds: float = POLL_SECONDS,
    heartbeat_timeout: float = 60.0,
    members: Callable[[], Collection[str]] | None = None,
) -> RunStatus:
    """Drive the run until it ends, or until ``stopped(poll_seconds)`` (which waits up to that
    long) says to stop; returns the last status. ``lost`` names the members known to be gone
    (their pod failed, their process died) before their heartbeat says so; ``members`` the
    alliance's members (None: whoever has a heartbeat): anyone else is ignored, and a member
    that leaves the list is lost at once."""
    status = sink.load() or RunStatus()
    spec = pin_spec(store, run, spec, status)
    sink.pinned(spec)
    coordinator = Coordinator(
        store,
        run,
        spec,
        lost_members=lost,
        heartbeat_timeout=heartbeat_timeout,
        registered=members,
    )
    changes = store.watch(run_key(run, "rounds/"))
    try:
        while True:
            stepped = time.monotonic()
            new = coordinator.reconcile(status)
            if new.phase in FINISHED and status.phase not in FINISHED:
                store_report(store, run, new)  # before the status says so: then it is there
            sink.save(status, new)
            status = new
            if status.phase in FINISHED or _wait(changes, status, stopped, poll_seconds, stepped):
                return status
    finally:
        changes.close()


def _wait(
    changes: Changes,
    status: RunStatus,
    stopped: Callable[[float], bool],
    poll_seconds: float,
    stepped: float,
) -> bool:
    """Wait until the next step is due; True: stop. With store notifications, a step follows
    each change under the run's rounds (a member's update, failure or validation) within
    milliseconds, or RECHECK_SECONDS without one, and waiting costs no request: ``stopped``
    is asked every Changes.STOP_CHECK_SECONDS without waiting. Without them, one poll
    interval."""
    if not changes.live or status.round == 0:
        return stopped(poll_seconds)
    changes.wait_for(RECHECK_SECONDS, lambda: stopped(0))
    # At most one step per poll interval: a member rewriting its objects in a loop must not
    # make the coordinator spin (each step lists the round).
    return stopped(max(0.0, poll_seconds - (time.monotonic() - stepped)))


def store_report(store: Store, run: str, status: RunStatus) -> None:
    """The run's report page (alliance/report.py) at runs/<run>/report.html, once it ends, for
    either runner: best effort, a report that cannot be made never fails the run."""
    from alliance import report

    try:
        page = report.render_html(report.load(store, run, status.to_dict()))
        store.put_bytes(report.REPORT_KEY.format(run=run), page.encode(), "text/html")
    except (report.ReportError, StoreError, OSError, ValueError) as exc:
        log.warning("no report page for run %s: %s", run, exc)


class StoreSink:
    """A run's status as ``runs/<run>/status.json`` in the store (the embedded runner and
    ``alliance coordinate``). Every decision is saved at once; a change of the progress message
    alone (one more member answered) at most once a second: it carries nothing a resume needs.
    ``on_change`` sees every change, for progress output."""

    def __init__(
        self,
        store: Store,
        run: str,
        on_change: Callable[[RunStatus], None] = lambda status: None,
    ):
        self.store, self.run, self.on_change = store, run, on_change
        self._saved: dict | None = None
        self._saved_at = -float("inf")
        self._shown: dict | None = None

    def load(self) -> RunStatus | None:
        saved = self.store.get_run_status(self.run)
        try:
            status = None if saved is None else RunStatus.from_dict(saved)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # not a driver's
            raise StoreError(f"runs/{self.run}/status.json is not a run status: {exc}") from None
        self._saved = saved
        self._show(status or RunStatus())
        return status

    def pinned(self, spec: RunSpec) -> None:
        pass

    def save(self, old: RunStatus, new: RunStatus) -> None:
        current = new.to_dict()
        progress = only_progress(self._saved or {}, current)
        if current != self._saved and (not progress or time.monotonic() - self._saved_at >= 1.0):
            self.store.put_run_status(self.run, current)
            self._saved, self._saved_at = current, time.monotonic()
        # Shown once saved: what the progress output reports done survives an interrupt.
        self._show(new, current)

    def _show(self, status: RunStatus, as_dict: dict | None = None) -> None:
        as_dict = as_dict if as_dict is not None else status.to_dict()
        if as_dict != self._shown:
            self.on_change(status)
            self._shown = as_dict


def only_progress(old: dict, new: dict) -> bool:
    """Whether two statuses (as dicts) differ in their progress message alone: nothing a
    resume needs, so the sinks write such a change at most once a second."""
    return {k: v for k, v in old.items() if k != "message"} == {
        k: v for k, v in new.items() if k != "message"
    }


def sleeping(stop: Callable[[], bool] = lambda: False) -> Callable[[float], bool]:
    """A ``stopped`` for ``drive`` that sleeps between steps and stops when ``stop()`` says so
    (by default never: the embedded runner's process ends with its run)."""

    def stopped(seconds: float) -> bool:
        if not stop():
            time.sleep(seconds)
        return stop()

    return stopped
