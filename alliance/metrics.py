"""The member agent's Prometheus metrics, labelled by ``member`` (the agent's name).

    alliance_member_samples_per_second   gauge      training throughput of the last train task
    alliance_member_task_seconds         histogram  wall time of each task, label kind
    alliance_member_tasks_total          counter    tasks handled, labels kind and outcome

``kind`` is ``train`` or ``validate``, ``outcome`` ``done`` or ``failed``. They live in
prometheus_client's default registry and are served by ``serve(port)``
(``alliance member --metrics-port``, or ``ALLIANCE_METRICS_PORT``); nothing is served by default.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

KINDS = ("train", "validate")
OUTCOMES = ("done", "failed")

SAMPLES_PER_SECOND = Gauge(
    "alliance_member_samples_per_second",
    "Training throughput of the member's last train task: examples x epochs / fit seconds.",
    ["member"],
)
TASK_SECONDS = Histogram(
    "alliance_member_task_seconds",
    "Wall time of a member's task, from taking it to storing its result (done or failed).",
    ["member", "kind"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
TASKS = Counter(
    "alliance_member_tasks_total",
    "Tasks a member handled, by kind (train, validate) and outcome (done, failed).",
    ["member", "kind", "outcome"],
)


def agent_started(member: str) -> None:
    """A new agent: its series start from zero (tasks_total and task_seconds show 0 before the
    first task, so a scrape tells "none yet" from "no such agent"). Removing a label set that
    does not exist is a no-op."""
    for kind in KINDS:
        TASK_SECONDS.remove(member, kind)
        TASK_SECONDS.labels(member, kind)
        for outcome in OUTCOMES:
            TASKS.remove(member, kind, outcome)
            TASKS.labels(member, kind, outcome)
    SAMPLES_PER_SECOND.remove(member)


def task_finished(
    member: str, kind: str, seconds: float, ok: bool, samples_per_second: float | None = None
) -> None:
    TASKS.labels(member, kind, "done" if ok else "failed").inc()
    TASK_SECONDS.labels(member, kind).observe(seconds)
    if samples_per_second is not None:
        SAMPLES_PER_SECOND.labels(member).set(samples_per_second)


def samples_per_second(metrics: dict, epochs: int, task_seconds: float) -> float | None:
    """A train task's throughput: the trainer's own figure (the built-in Keras trainer times
    its fit), else examples x epochs over the trainer's seconds, else over the whole task."""
    if isinstance(metrics.get("samplesPerSecond"), int | float):
        return float(metrics["samplesPerSecond"])
    n = metrics.get("numExamples")
    seconds = metrics.get("seconds") or task_seconds
    if not isinstance(n, int | float) or not isinstance(seconds, int | float) or seconds <= 0:
        return None
    return n * max(1, int(epochs or 1)) / seconds


class MetricsServer:
    """The HTTP endpoint (``/metrics``, any path) on ``port``; ``stop()`` closes it."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.port = httpd.server_address[1]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(port: int, addr: str = "0.0.0.0") -> MetricsServer | None:
    """Serve the metrics on ``port``; a port that cannot be bound (another agent on this host
    has it) logs a warning and returns None: the agent works on without metrics."""
    try:
        httpd, thread = start_http_server(port, addr)
    except OSError as exc:
        log.warning("metrics not served: cannot listen on %s:%d: %s", addr, port, exc)
        return None
    log.info("metrics served on http://%s:%d/metrics", addr, port)
    return MetricsServer(httpd, thread)
