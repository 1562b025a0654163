"""The operator's Prometheus metrics: every metric is defined here.

The reconcilers call the small functions below; ``main.py`` serves prometheus_client's default
registry on ``ALLIANCE_OPERATOR_METRICS_PORT`` (9090; 0: not served), so the process's own
``process_*`` and ``python_*`` metrics come along.

Per TrainingRun (labels ``namespace``, ``run``: the TrainingRun's name):

    alliance_rounds_completed_total   counter    rounds that produced a model
    alliance_round_duration_seconds   histogram  start to finish of those rounds
    alliance_round_accuracy           gauge      the last validated round's accuracy
    alliance_round_loss               gauge      ... its validation loss
    alliance_members_dropped_total    counter    members dropped from rounds (lost, silent)
    alliance_update_bytes_total       counter    bytes of the member updates aggregated
    alliance_aggregation_seconds      histogram  the coordinator's wall time per aggregation

Per Alliance (labels ``namespace``, ``alliance``):

    alliance_members_ready            gauge      its Members whose Ready condition is True

Counters count what happens while this process runs, once: the TrainingRun reconciler compares
the status it read with the one it writes (as for its RoundCompleted Events), so a restarted
operator does not count a round the previous one saw finish, and starts its counters at 0 (a
counter reset, as Prometheus expects of a restarted process). Gauges are state: they are set
from the status on every pass, so a restarted operator shows them again at once. A deleted
TrainingRun's or Member's series are removed; its uid is remembered so that a pass already
running when the deletion started cannot bring them back.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from alliance.engine import RoundRecord

log = logging.getLogger(__name__)

RUN_LABELS = ("namespace", "run")
#: A round lasts seconds (a tiny model) to hours (a large one, slow members).
ROUND_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
#: An aggregation streams every update through the coordinator: well under a second for small
#: models, minutes for large models and many members.
AGGREGATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

ROUNDS_COMPLETED = Counter(
    "alliance_rounds_completed_total",
    "Rounds of the TrainingRun that finished with an aggregated model.",
    RUN_LABELS,
)
ROUND_DURATION = Histogram(
    "alliance_round_duration_seconds",
    "Wall time of a completed round, from its start to its end (after validation).",
    RUN_LABELS,
    buckets=ROUND_BUCKETS,
)
ROUND_ACCURACY = Gauge(
    "alliance_round_accuracy",
    "Accuracy of the TrainingRun's last validated round (status.accuracy): the validators' "
    "example-weighted mean, 0 to 1.",
    RUN_LABELS,
)
ROUND_LOSS = Gauge(
    "alliance_round_loss",
    "Validation loss of the TrainingRun's last validated round (status.loss).",
    RUN_LABELS,
)
MEMBERS_DROPPED = Counter(
    "alliance_members_dropped_total",
    "Members dropped from the TrainingRun's rounds: lost (pod failed, heartbeat stale) or "
    "silent until the round's deadline.",
    RUN_LABELS,
)
UPDATE_BYTES = Counter(
    "alliance_update_bytes_total",
    "Bytes of the member updates the TrainingRun's aggregations accepted (serialized weights, "
    "as stored).",
    RUN_LABELS,
)
AGGREGATION_SECONDS = Histogram(
    "alliance_aggregation_seconds",
    "The coordinator's wall time aggregating a round: fetching and checking the updates, "
    "aggregating them, storing the new model.",
    RUN_LABELS,
    buckets=AGGREGATION_BUCKETS,
)
MEMBERS_READY = Gauge(
    "alliance_members_ready",
    "Members of the Alliance whose Ready condition is True (agent running, data valid, "
    "heartbeat fresh).",
    ("namespace", "alliance"),
)

#: Zero from the first pass on, so a scrape tells "no round yet" from "no such run".
RUN_COUNTERS = (
    ROUNDS_COMPLETED,
    ROUND_DURATION,
    MEMBERS_DROPPED,
    UPDATE_BYTES,
    AGGREGATION_SECONDS,
)
RUN_METRICS = (*RUN_COUNTERS, ROUND_ACCURACY, ROUND_LOSS)

_lock = threading.Lock()
_deleted: set[str] = set()  # uids of deleted TrainingRuns and Members
#: (namespace, member) -> (its alliance, Ready); members_ready per alliance is the sum.
_members: dict[tuple[str, str], tuple[str, bool]] = {}
_server = None


# --- TrainingRuns -------------------------------------------------------------------------------


def run_seen(namespace: str, run: str, uid: str, status: dict) -> None:
    """Every pass over a TrainingRun: its series exist, the gauges follow its status."""
    with _lock:
        if uid in _deleted:
            return
        for metric in RUN_COUNTERS:
            metric.labels(namespace, run)
        for gauge, key in ((ROUND_ACCURACY, "accuracy"), (ROUND_LOSS, "loss")):
            if status.get(key) is not None:
                gauge.labels(namespace, run).set(status[key])


def round_aggregated(namespace: str, run: str, uid: str, record: RoundRecord) -> None:
    """A round's aggregation, seen recorded for the first time by this process."""
    with _lock:
        if uid in _deleted:
            return
        UPDATE_BYTES.labels(namespace, run).inc(record.update_bytes)
        AGGREGATION_SECONDS.labels(namespace, run).observe(record.aggregation_seconds)


def round_finished(namespace: str, run: str, uid: str, record: RoundRecord) -> None:
    """A round that finished while this process ran it: completed (a model) or failed."""
    with _lock:
        if uid in _deleted:
            return
        MEMBERS_DROPPED.labels(namespace, run).inc(len(record.dropped))
        if record.model_id is not None:
            ROUNDS_COMPLETED.labels(namespace, run).inc()
            ROUND_DURATION.labels(namespace, run).observe(max(0.0, record.seconds))


def forget_run(namespace: str, run: str, uid: str) -> None:
    """The TrainingRun is being deleted: its series go, for good."""
    with _lock:
        _deleted.add(uid)
        for metric in RUN_METRICS:
            metric.remove(namespace, run)


# --- Members ------------------------------------------------------------------------------------


def member_ready(namespace: str, member: str, uid: str, alliance: str, ready: bool) -> None:
    """A pass over a Member: whether it is Ready, and in which alliance."""
    with _lock:
        if uid in _deleted:
            return
        before = _members.get((namespace, member))
        _members[(namespace, member)] = (alliance, ready)
        _recount(namespace, {alliance, before[0] if before else alliance})


def forget_member(namespace: str, member: str, uid: str) -> None:
    """The Member is being deleted: it no longer counts; an alliance left with no Members
    loses its series."""
    with _lock:
        _deleted.add(uid)
        before = _members.pop((namespace, member), None)
        if before is not None:
            _recount(namespace, {before[0]})


def _recount(namespace: str, alliances: set[str]) -> None:
    for alliance in alliances:
        states = [r for (ns, _), (a, r) in _members.items() if (ns, a) == (namespace, alliance)]
        if states:
            MEMBERS_READY.labels(namespace, alliance).set(sum(states))
        else:
            MEMBERS_READY.remove(namespace, alliance)


# --- serving ------------------------------------------------------------------------------------


def serve(port: int, addr: str = "0.0.0.0") -> bool:
    """Serve the default registry on ``port`` (once per process; a repeat is a no-op). A port
    that cannot be bound logs an error: the operator works on without metrics."""
    global _server
    if _server is not None:
        return True
    try:
        _server = start_http_server(port, addr)
    except OSError as exc:
        log.error("metrics not served: cannot listen on %s:%d: %s", addr, port, exc)
        return False
    log.info("metrics served on http://%s:%d/metrics", addr, port)
    return True
