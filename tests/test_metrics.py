"""Prometheus metrics, scraped from their real HTTP endpoints and parsed the way Prometheus does.

Operator side: the reconcilers driven through real rounds (the real S3 server, the in-memory
Kubernetes API of tests/test_operator_handlers.py) with the operator's metrics server on a free
port; the values must move as rounds aggregate and finish, stay put on passes with nothing new,
and the series go when their object is deleted. Member side: real agents (the members' own
commands, no TensorFlow) with their metrics server, and a second agent on the same port.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import urllib.error
import urllib.request

import kopf
import numpy as np
import pytest
from alliance_operator import metrics as op_metrics
from alliance_operator.handlers import member as member_handler
from alliance_operator.handlers import trainingrun as run_handler
from prometheus_client.parser import text_string_to_metric_families

from alliance import cli, weights
from alliance import metrics as member_metrics
from alliance.coordinator import Coordinator
from alliance.engine import Phase, RunSpec, RunStatus
from alliance.member import Agent
from alliance.s3server import free_port
from tests import test_agent
from tests import test_operator_handlers as handlers
from tests.test_agent import wait_ready
from tests.test_operator_handlers import EVICTED, LOG, NS, running

# The fixtures of the handler and agent tests (pytest finds fixtures by module attribute).
bucket, cluster, ctx, events = handlers.bucket, handlers.cluster, handlers.ctx, handlers.events
federation, op, s3, seed = handlers.federation, handlers.op, handlers.s3, handlers.seed
agent_alliance = test_agent.alliance

# --- scraping ------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    """Every alliance_* sample the endpoint serves: (sample name, labels) -> value (the
    process_* and python_* ones move by themselves)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("alliance_")
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series_of(samples: Samples, **labels: str) -> set[str]:
    """The names of the samples that carry all of ``labels``."""
    want = set(labels.items())
    return {name for name, got in samples if want <= got}


# --- the operator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator_port() -> int:
    """The operator's metrics server, as main.py starts it (once per process)."""
    port = free_port()
    assert op_metrics.serve(port, "127.0.0.1")
    assert op_metrics.serve(port, "127.0.0.1")  # a repeated startup handler: a no-op
    return port


@pytest.fixture(autouse=True)
def no_members_counted_yet(monkeypatch):
    """The handler tests in this process leave Members the registry counts (nothing deletes
    them there): start each test here from none."""
    monkeypatch.setattr(op_metrics, "_members", {})
    op_metrics.MEMBERS_READY.clear()


def put_update(s3, store_run: str, round_: int, member: str, value: float) -> int:
    """A member's update, as an agent uploads it; returns its size in bytes."""
    data = weights.dumps([np.full((2, 2), value, np.float32)])
    meta = {"numExamples": 600, "loss": 0.5, "seconds": 1.5}
    s3.put_update(store_run, round_, member, data, meta)
    return len(data)


def put_score(s3, store_run: str, round_: int, member: str, accuracy: float, loss: float):
    result = {"accuracy": accuracy, "loss": loss, "numExamples": 200, "seconds": 0.5}
    s3.put_result(store_run, round_, "validations", member, result)


def test_operator_metrics_move_as_rounds_complete(op, cluster, federation, s3, ctx, operator_port):
    run = "metered"
    labels = {"namespace": NS, "run": run}
    assert series_of(scrape(operator_port), **labels) == set()

    # 1. The run starts: its counters exist, at 0; no accuracy yet.
    cluster.apply("TrainingRun", run, {"alliance": "mnist", "rounds": 2})
    op.reconcile("TrainingRun", run)
    status = op.status("TrainingRun", run)
    assert (status["round"], status["stage"]) == (1, "Training")
    store_run = status["storeRun"]
    before = scrape(operator_port)
    assert value(before, "alliance_rounds_completed_total", **labels) == 0
    assert value(before, "alliance_round_duration_seconds_count", **labels) == 0
    assert value(before, "alliance_members_dropped_total", **labels) == 0
    assert value(before, "alliance_update_bytes_total", **labels) == 0
    assert value(before, "alliance_aggregation_seconds_count", **labels) == 0
    assert value(before, "alliance_round_accuracy", **labels) is None
    assert value(before, "alliance_round_loss", **labels) is None
    # The family names follow Prometheus' conventions: _total counters, base units.
    families = {f.name: f.type for f in text_string_to_metric_families(_text(operator_port))}
    assert families["alliance_rounds_completed"] == "counter"
    assert families["alliance_round_duration_seconds"] == "histogram"
    assert families["alliance_round_accuracy"] == "gauge"
    assert families["alliance_update_bytes"] == "counter"
    assert families["alliance_members_ready"] == "gauge"
    # Nothing new: nothing moves.
    assert op.reconcile("TrainingRun", run) == {}
    assert scrape(operator_port) == before

    # 2. m1's update is in; m2's pod is evicted: round 1 is aggregated without m2.
    size1 = put_update(s3, store_run, 1, "m1", 1.0)
    cluster.set_pod_status("m2-agent", EVICTED)
    op.reconcile("Member", "m2")  # the Member handler sees it: lost for the runs
    op.reconcile("TrainingRun", run)
    status = op.status("TrainingRun", run)
    assert status["stage"] == "Validating" and status["history"][0]["dropped"] == ["m2"]
    assert status["history"][0]["updateBytes"] == size1
    aggregated = scrape(operator_port)
    assert value(aggregated, "alliance_update_bytes_total", **labels) == size1 > 0
    assert value(aggregated, "alliance_aggregation_seconds_count", **labels) == 1
    assert value(aggregated, "alliance_aggregation_seconds_sum", **labels) == pytest.approx(
        status["history"][0]["aggregationSeconds"]
    )
    assert value(aggregated, "alliance_rounds_completed_total", **labels) == 0  # validating

    # 3. m1 scores it: round 1 is complete, round 2 starts (on m1 alone).
    put_score(s3, store_run, 1, "m1", 0.75, 0.6)
    op.reconcile("TrainingRun", run)
    status = op.status("TrainingRun", run)
    assert (status["round"], status["stage"]) == (2, "Training")
    first = status["history"][0]
    one = scrape(operator_port)
    assert value(one, "alliance_rounds_completed_total", **labels) == 1
    assert value(one, "alliance_round_duration_seconds_count", **labels) == 1
    assert value(one, "alliance_round_duration_seconds_sum", **labels) == pytest.approx(
        first["finishedAt"] - first["startedAt"]
    )
    assert value(one, "alliance_members_dropped_total", **labels) == 1
    assert value(one, "alliance_round_accuracy", **labels) == status["accuracy"] == 0.75
    assert value(one, "alliance_round_loss", **labels) == status["loss"] == 0.6
    assert op.reconcile("TrainingRun", run) == {}
    assert scrape(operator_port) == one

    # 4. Round 2: the run completes.
    size2 = put_update(s3, store_run, 2, "m1", 2.0)
    op.reconcile("TrainingRun", run)
    put_score(s3, store_run, 2, "m1", 0.875, 0.4)
    op.reconcile("TrainingRun", run)
    status = op.status("TrainingRun", run)
    assert status["phase"] == "Completed"
    two = scrape(operator_port)
    assert value(two, "alliance_rounds_completed_total", **labels) == 2
    assert value(two, "alliance_round_duration_seconds_count", **labels) == 2
    assert value(two, "alliance_aggregation_seconds_count", **labels) == 2
    assert value(two, "alliance_members_dropped_total", **labels) == 1
    assert value(two, "alliance_update_bytes_total", **labels) == size1 + size2
    assert size1 + size2 == sum(r["updateBytes"] for r in status["history"])
    assert value(two, "alliance_round_accuracy", **labels) == status["accuracy"] == 0.875
    assert value(two, "alliance_round_loss", **labels) == status["loss"] == 0.4
    # Another daemon (a restarted operator) counts nothing again.
    assert op.reconcile("TrainingRun", run) == {}
    assert op.reconcile("TrainingRun", run) == {}
    assert scrape(operator_port) == two

    # 5. Deleted: every series of the run goes, and a pass still in flight (a timer that read
    # the object as the deletion began) brings none back.
    body = cluster.get("TrainingRun", run)
    run_handler.cleanup(ctx, kopf.Body(copy.deepcopy(body)), LOG)
    assert series_of(scrape(operator_port), **labels) == set()
    op.reconcile("TrainingRun", run, body=body)
    assert series_of(scrape(operator_port), **labels) == set()


def test_a_round_seen_finished_by_an_earlier_process_is_not_counted_again(
    op, cluster, federation, s3, operator_port
):
    run = "resumed-metered"
    labels = {"namespace": NS, "run": run}
    cluster.apply("TrainingRun", run, {"alliance": "mnist", "rounds": 2, "minMembers": 2})
    op.reconcile("TrainingRun", run)
    store_run = op.status("TrainingRun", run)["storeRun"]
    for member in ("m1", "m2"):
        put_update(s3, store_run, 1, member, 1.0)
    op.reconcile("TrainingRun", run)
    for member in ("m1", "m2"):
        put_score(s3, store_run, 1, member, 0.5, 1.0)
    op.reconcile("TrainingRun", run)
    assert op.status("TrainingRun", run)["round"] == 2
    assert value(scrape(operator_port), "alliance_rounds_completed_total", **labels) == 1
    # A new process: counters from zero; it resumes from status, where round 1 is done.
    for metric in op_metrics.RUN_METRICS:
        metric.remove(NS, run)
    op.reconcile("TrainingRun", run)
    after = scrape(operator_port)
    assert value(after, "alliance_rounds_completed_total", **labels) == 0
    assert value(after, "alliance_update_bytes_total", **labels) == 0
    # The gauges come back at once: they are the status's.
    assert value(after, "alliance_round_accuracy", **labels) == 0.5


def test_members_ready_counts_ready_members_and_forgets_deleted_ones(
    op, cluster, federation, s3, operator_port
):
    labels = {"namespace": NS, "alliance": "mnist"}
    assert value(scrape(operator_port), "alliance_members_ready", **labels) == 2

    # m2's pod is evicted: m2 is not Ready.
    cluster.set_pod_status("m2-agent", EVICTED)
    op.reconcile("Member", "m2")
    assert op.condition("Member", "m2", "Ready")[0] == "False"
    assert value(scrape(operator_port), "alliance_members_ready", **labels) == 1
    # Its new pod runs: Ready again.
    op.reconcile("Member", "m2")
    cluster.set_pod_status("m2-agent", running())
    op.reconcile("Member", "m2")
    assert value(scrape(operator_port), "alliance_members_ready", **labels) == 2

    # A Member moves to another alliance: it counts there, no longer here.
    cluster.apply("Member", "m2", {"alliance": "other", "dataVolumeClaim": "m2-data"})
    op.reconcile("Member", "m2")
    now = scrape(operator_port)
    assert value(now, "alliance_members_ready", **labels) == 1
    assert value(now, "alliance_members_ready", namespace=NS, alliance="other") == 0

    # Deleted Members leave no stale series, even when a pass runs after the deletion began.
    m2 = cluster.get("Member", "m2")
    member_handler.deleted(op.ctx, kopf.Body(m2), LOG)
    op.reconcile("Member", "m2", body=m2)
    now = scrape(operator_port)
    assert value(now, "alliance_members_ready", namespace=NS, alliance="other") is None
    assert value(now, "alliance_members_ready", **labels) == 1
    m1 = cluster.get("Member", "m1")
    m1["metadata"]["deletionTimestamp"] = "2030-01-01T00:01:00Z"
    op.reconcile("Member", "m1", body=m1)  # kopf's timer, as the deletion starts
    member_handler.deleted(op.ctx, kopf.Body(m1), LOG)
    assert series_of(scrape(operator_port), **labels) == set()


def test_an_operator_metrics_port_in_use_is_reported(caplog, monkeypatch):
    monkeypatch.setattr(op_metrics, "_server", None)
    port = free_port()
    taken = member_metrics.serve(port, "127.0.0.1")
    try:
        with caplog.at_level(logging.ERROR, logger=op_metrics.__name__):
            assert op_metrics.serve(port, "127.0.0.1") is False
        assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    finally:
        taken.stop()


def _text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


# --- the member agent ----------------------------------------------------------------------------


def drive(store, spec: RunSpec, run: str = "run", timeout: float = 60.0) -> RunStatus:
    coordinator = Coordinator(store, run, spec)
    status = RunStatus()
    deadline = time.monotonic() + timeout
    while status.phase not in (Phase.COMPLETED, Phase.FAILED):
        assert time.monotonic() < deadline, status.message
        status = coordinator.reconcile(status)
        time.sleep(0.05)
    return status


def start_metered_agent(store, tmp_path, name: str, port: int) -> tuple[Agent, threading.Thread]:
    return test_agent.start_agent(store, tmp_path, name, metrics_port=port)


def test_member_metrics_move_as_the_agent_works(agent_alliance, tmp_path, caplog):
    store, _ = agent_alliance
    port = free_port()
    first = start_metered_agent(store, tmp_path, "metered-a", port)
    agents = [first]
    try:
        wait_ready(store, ["metered-a"])
        a = {"member": "metered-a"}
        before = scrape(port)
        assert value(before, "alliance_member_tasks_total", **a, kind="train", outcome="done") == 0
        assert value(before, "alliance_member_task_seconds_count", **a, kind="train") == 0
        assert value(before, "alliance_member_samples_per_second", **a) is None

        status = drive(store, RunSpec(rounds=1, local_epochs=2))
        assert status.phase == "Completed", status.message
        after = scrape(port)
        assert value(after, "alliance_member_tasks_total", **a, kind="train", outcome="done") == 1
        assert value(after, "alliance_member_tasks_total", **a, kind="train", outcome="failed") == 0
        done_validate = value(
            after, "alliance_member_tasks_total", **a, kind="validate", outcome="done"
        )
        assert done_validate == 1
        assert value(after, "alliance_member_task_seconds_count", **a, kind="train") == 1
        assert value(after, "alliance_member_task_seconds_sum", **a, kind="train") > 0
        throughput = value(after, "alliance_member_samples_per_second", **a)
        assert throughput > 0
        # 8 rows x 2 epochs over the command's own seconds, as stored with the update.
        _, meta = store.get_update("run", 1, "metered-a")
        assert throughput == pytest.approx(8 * 2 / meta["seconds"])

        # A second agent on this host, on the same port: a warning, and it works without.
        with caplog.at_level(logging.WARNING, logger=member_metrics.__name__):
            agents.append(start_metered_agent(store, tmp_path, "metered-b", port))
            wait_ready(store, ["metered-b"])
        assert f"metrics not served: cannot listen on 0.0.0.0:{port}" in caplog.text
        coordinated = drive(store, RunSpec(rounds=1, min_members=2), run="run-2")
        assert coordinated.phase == "Completed", coordinated.message
        assert coordinated.history[0].members == ["metered-a", "metered-b"]
        # (One process, one registry: the first agent's server shows the second's too.)
        b = {"member": "metered-b", "kind": "train", "outcome": "done"}
        assert value(scrape(port), "alliance_member_tasks_total", **b) == 1
    finally:
        for agent, thread in agents:
            agent.stop()
            thread.join(10)
    # Stopped: the port is free again.
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_the_member_command_takes_its_metrics_port_from_the_flag_or_the_environment(
    monkeypatch,
):
    monkeypatch.delenv("ALLIANCE_METRICS_PORT", raising=False)
    args = cli.build_parser().parse_args(["member", "--name", "m", "--data-dir", "/data"])
    assert cli._metrics_port(args.metrics_port) == 0  # off by default
    monkeypatch.setenv("ALLIANCE_METRICS_PORT", "9100")
    assert cli._metrics_port(args.metrics_port) == 9100
    args = cli.build_parser().parse_args(
        ["member", "--name", "m", "--data-dir", "/data", "--metrics-port", "9200"]
    )
    assert cli._metrics_port(args.metrics_port) == 9200  # the flag wins
    monkeypatch.setenv("ALLIANCE_METRICS_PORT", "metrics")
    with pytest.raises(ValueError, match="ALLIANCE_METRICS_PORT: not a port number"):
        cli._metrics_port(None)
    with pytest.raises(ValueError, match="must be 0"):
        cli._metrics_port(70000)
