"""The coordinator against a real S3 server, with members simulated through the store."""

import threading
import time

import numpy as np
import pytest

from alliance import weights
from alliance.coordinator import Coordinator
from alliance.driver import StoreSink, drive, sleeping
from alliance.engine import Phase, RunSpec, RunStatus, Stage

RUN = "r1"


def model(v):
    return [np.full((2, 3), v, np.float32), np.full(3, v, np.float32)]


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def alliance(store):
    """An initialised alliance (seed model of zeros) with three ready members."""
    seed = store.put_model(model(0.0))
    store.put_alliance({"model": {"kind": "builtin", "name": "cnn"}, "seedModelId": seed})
    for m in ("a", "b", "c"):
        store.put_heartbeat(m, {"state": "ready", "trainRows": 100, "testRows": 5})
    return store, seed


def train(store, member, round_, value, n, loss=0.5):
    store.put_update(
        RUN,
        round_,
        member,
        weights.dumps(model(value)),
        {"numExamples": n, "loss": loss, "seconds": 1.0},
    )


def validate(store, member, round_, acc, n=5):
    store.put_result(
        RUN,
        round_,
        "validations",
        member,
        {"numExamples": n, "accuracy": acc, "loss": 0.1, "seconds": 0.5},
    )


def test_a_round_end_to_end_through_the_store(alliance):
    store, seed = alliance
    coord = Coordinator(store, RUN, RunSpec(rounds=1, min_members=2))
    status = coord.reconcile(RunStatus())
    assert (status.phase, status.round, status.stage) == (Phase.RUNNING, 1, Stage.TRAINING)
    task = store.get_json(f"tasks/{RUN}.json")
    assert task["kind"] == "train" and task["members"] == ["a", "b", "c"]
    assert task["modelId"] == seed and task["epochs"] == 1 and task["batchSize"] == 32

    train(store, "a", 1, 1.0, 10)
    train(store, "b", 1, 4.0, 30)
    assert coord.reconcile(status).stage == Stage.TRAINING  # c still training
    train(store, "c", 1, 2.0, 10)
    status = coord.reconcile(status)
    assert status.stage == Stage.VALIDATING
    # FedAvg: (1*10 + 4*30 + 2*10) / 50 = 3.0
    np.testing.assert_allclose(store.get_model(status.model_id)[0], 3.0)
    assert store.get_json(f"tasks/{RUN}.json")["kind"] == "validate"

    for m, acc in (("a", 0.8), ("b", 0.9), ("c", 1.0)):
        validate(store, m, 1, acc)
    status = coord.reconcile(status)
    assert status.phase == Phase.COMPLETED
    record = status.history[0]
    assert record.accuracy == pytest.approx(0.9)
    assert record.members == ["a", "b", "c"] and record.num_examples == 50
    assert record.train_loss == pytest.approx(0.5)
    # The bytes aggregated are the three updates' as stored; the time is the coordinator's.
    sizes = sum(len(store.get_update(RUN, 1, m)[0]) for m in "abc")
    assert record.update_bytes == sizes == 3 * len(weights.dumps(model(1.0)))
    saved = store.get_aggregate(RUN, 1)
    assert saved["updateBytes"] == sizes
    assert 0 < record.aggregation_seconds == saved["aggregationSeconds"] < 30
    assert store.get_json(f"tasks/{RUN}.json") is None  # withdrawn


def test_poisoned_and_misshapen_updates_are_rejected_and_the_round_completes(alliance):
    store, _ = alliance
    coord = Coordinator(store, RUN, RunSpec(rounds=1, min_members=2, validation="none"))
    status = coord.reconcile(RunStatus())
    train(store, "a", 1, 1.0, 10)
    train(store, "b", 1, np.nan, 10)
    store.put_update(RUN, 1, "c", weights.dumps(model(1.0)[:1]), {"numExamples": 10})
    # Only a is acceptable, below the quorum of 2: the run fails and says why.
    status = coord.reconcile(status)
    assert status.phase == Phase.FAILED
    record = status.history[0]
    assert record.rejected == {
        "b": "update rejected: array 0 has 6 non-finite values (NaN or Inf)",
        "c": "update rejected: has 1 arrays, the model has 2",
    }
    assert "1 acceptable updates, minMembers is 2" in status.message


def test_one_poisoned_update_is_left_out_of_the_average(alliance):
    store, _ = alliance
    coord = Coordinator(store, RUN, RunSpec(rounds=1, min_members=2, validation="none"))
    status = coord.reconcile(RunStatus())
    train(store, "a", 1, 1.0, 10)
    train(store, "b", 1, 3.0, 10)
    train(store, "c", 1, np.inf, 10)
    status = coord.reconcile(status)
    assert status.phase == Phase.COMPLETED
    assert list(status.history[0].rejected) == ["c"]
    np.testing.assert_allclose(store.get_model(status.model_id)[1], 2.0)


def test_aggregation_is_done_once_even_when_asked_again(alliance):
    store, _ = alliance
    coord = Coordinator(store, RUN, RunSpec(rounds=1, validation="none"))
    status = coord.reconcile(RunStatus())
    for m in ("a", "b", "c"):
        train(store, m, 1, 1.0, 10)
    from alliance.engine import Aggregate

    action = Aggregate(1, ("a", "b", "c"), status.model_id, None)
    first = coord.aggregate(action)
    train(store, "a", 1, 100.0, 10)  # a late re-upload must not change the round's model
    assert coord.aggregate(action) == first


def test_deadline_drops_a_silent_member(alliance):
    store, _ = alliance
    clock = Clock()
    coord = Coordinator(
        store,
        RUN,
        RunSpec(rounds=1, min_members=2, validation="none", round_deadline_seconds=30),
        clock=clock,
    )
    status = coord.reconcile(RunStatus())
    train(store, "a", 1, 1.0, 10)
    train(store, "b", 1, 1.0, 10)
    clock.now += 29
    assert coord.reconcile(status).stage == Stage.TRAINING
    clock.now += 1
    status = coord.reconcile(status)
    assert status.phase == Phase.COMPLETED and status.history[0].dropped == ["c"]


def test_lost_member_is_dropped_at_once(alliance):
    store, _ = alliance
    lost: set[str] = set()
    coord = Coordinator(
        store, RUN, RunSpec(rounds=1, min_members=2, validation="none"), lost_members=lambda: lost
    )
    status = coord.reconcile(RunStatus())
    train(store, "a", 1, 1.0, 10)
    train(store, "b", 1, 1.0, 10)
    lost.add("c")  # its process exited / its pod failed
    status = coord.reconcile(status)
    assert status.phase == Phase.COMPLETED and status.history[0].dropped == ["c"]


def test_only_registered_members_count_and_one_that_leaves_is_lost_at_once(alliance, caplog):
    store, _ = alliance
    store.put_heartbeat("ghost", {"state": "ready", "trainRows": 10**6, "testRows": 10**6})
    members = {"a", "b", "c"}
    coord = Coordinator(
        store,
        RUN,
        RunSpec(rounds=1, min_members=2, validation="none"),
        registered=lambda: members,
    )
    status = coord.reconcile(RunStatus())
    assert status.selected == ["a", "b", "c"]
    coord.reconcile(status)
    warnings = [r.message for r in caplog.records if "ghost" in r.message]
    assert warnings == ["ignoring ghost: not a member of this alliance"]  # once
    train(store, "a", 1, 1.0, 10)
    train(store, "b", 1, 1.0, 10)
    train(store, "ghost", 1, 100.0, 10)  # not selected: never read
    members.discard("c")  # its Member was deleted
    status = coord.reconcile(status)
    assert status.phase == Phase.COMPLETED and status.history[0].dropped == ["c"]
    assert status.history[0].members == ["a", "b"]


def test_an_unreadable_aggregate_json_is_aggregated_again(alliance):
    store, _ = alliance
    coord = Coordinator(store, RUN, RunSpec(rounds=1, validation="none"))
    status = coord.reconcile(RunStatus())
    for m in ("a", "b", "c"):
        train(store, m, 1, 1.0, 10)
    from alliance.engine import Aggregate

    action = Aggregate(1, ("a", "b", "c"), status.model_id, None)
    first = coord.aggregate(action)
    for garbage in (b"[1, 2", b"[]", b'{"modelId": 5, "accepted": 3}'):
        store.put_bytes(f"runs/{RUN}/rounds/00001/aggregate.json", garbage)
        again = coord.aggregate(action)
        assert again.model_id == first.model_id and again.accepted == first.accepted


def test_heartbeats_that_are_not_heartbeats_keep_their_member_out(alliance, caplog):
    store, _ = alliance
    store.put_bytes("members/a.json", b"[1, 2, 3]")
    store.put_heartbeat("b", {"state": "ready", "trainRows": "lots"})
    store.put_bytes("members/c.json", b"{" * 100_000)  # too large to read
    obs = Coordinator(store, RUN, RunSpec()).observe(RunStatus())
    assert obs.ready == {}
    refused = sorted(r.message for r in caplog.records if "heartbeat refused" in r.message)
    assert refused == [
        "member a: heartbeat refused: expected a JSON object, got list",
        "member b: heartbeat refused: trainRows must be an integer in [0, 9007199254740992], "
        "got 'lots'",
        "member c: heartbeat refused: members/c.json: 100000 bytes, more than the 65536 allowed",
    ]


def test_stale_heartbeat_and_invalid_data_keep_members_out(alliance, caplog):
    store, _ = alliance
    store.put_heartbeat("c", {"state": "invalid", "message": "train.csv, line 3: nan"})
    clock = Clock()
    coord = Coordinator(store, RUN, RunSpec(rounds=1), heartbeat_timeout=60, clock=clock)
    obs = coord.observe(RunStatus())
    assert sorted(obs.ready) == ["a", "b"]
    # Said where the user looks (the runner's console, `alliance coordinate`), once.
    coord.member_refresh_seconds = 0
    coord.observe(RunStatus())
    said = [r.message for r in caplog.records if "cannot take part" in r.message]
    assert said == ["member c cannot take part: train.csv, line 3: nan"]
    coord.clock = lambda: clock.now + 10**9  # every heartbeat is now ancient
    obs = coord.observe(RunStatus())
    assert obs.ready == {} and obs.lost == {"a", "b", "c"}


def test_a_restarted_coordinator_resumes_from_the_persisted_status(alliance):
    """Crash between rounds, mid-round and mid-aggregation: no round lost or repeated."""
    store, _ = alliance
    spec = RunSpec(rounds=2, min_members=3, validation="none")
    status = Coordinator(store, RUN, spec).reconcile(RunStatus())
    store.put_run_status(RUN, status.to_dict())
    for m in ("a", "b", "c"):
        train(store, m, 1, 1.0, 10)
    # The coordinator "crashes": a new one picks the status up from the store.
    status = Coordinator(store, RUN, spec).reconcile(RunStatus.from_dict(store.get_run_status(RUN)))
    assert status.round == 2 and status.stage == Stage.TRAINING
    first_model = status.history[0].model_id
    for m in ("a", "b", "c"):
        train(store, m, 2, 3.0, 10)
    status = drive(store, RUN, spec, StoreSink(store, RUN), sleeping(), poll_seconds=0.01)
    assert status.phase == Phase.COMPLETED
    assert [r.round for r in status.history] == [1, 2]
    assert status.history[0].model_id == first_model
    np.testing.assert_allclose(store.get_model(status.model_id)[0], 3.0)


# --- the driver: the one run loop ------------------------------------------------------------


def test_the_spec_follows_edits_until_round_1_then_stays_pinned(store):
    from alliance.driver import pin_spec
    from alliance.store import StoreError

    first, edited = RunSpec(rounds=2), RunSpec(rounds=5)
    assert pin_spec(store, RUN, first, RunStatus()) == first
    assert pin_spec(store, RUN, edited, RunStatus()) == edited  # not started: the edit applies
    started = RunStatus(phase=Phase.RUNNING, round=1)
    assert pin_spec(store, RUN, RunSpec(rounds=9), started) == edited  # started: pinned
    assert pin_spec(store, RUN, None, started) == edited  # an invalid edit: the pinned one
    assert RunSpec.from_dict(store.get_run_spec(RUN)) == edited
    with pytest.raises(StoreError, match=r"spec\.json is missing"):
        pin_spec(store, "another-run", None, started)
    # Overwritten by someone else (a member holding the store's keys): a clear error.
    for garbage in ([1, 2], {"rounds": "many"}):
        store.put_run_spec(RUN, garbage)
        with pytest.raises(StoreError, match=r"spec\.json is not a run spec"):
            pin_spec(store, RUN, None, started)
    # The same for its status.
    for garbage in ([1, 2], {"phase": "Exploded"}, {"history": [{"nope": 1}]}):
        store.put_run_status(RUN, garbage)
        with pytest.raises(StoreError, match=r"status\.json is not a run status"):
            StoreSink(store, RUN).load()


def test_drive_saves_every_decision_and_stops_when_told(alliance):
    store, _ = alliance
    seen: list[RunStatus] = []
    sink = StoreSink(store, RUN, on_change=seen.append)
    # One step, then stop: round 1 starts and the status is saved.
    status = drive(store, RUN, RunSpec(rounds=1, min_members=3), sink, lambda seconds: True)
    assert (status.phase, status.round) == (Phase.RUNNING, 1)
    assert RunStatus.from_dict(store.get_run_status(RUN)) == status
    assert [s.phase for s in seen] == [Phase.PENDING, Phase.RUNNING]
    # Driven again (a restarted runner) from the saved status, to the end.
    for m in ("a", "b", "c"):
        train(store, m, 1, 1.0, 10)
        validate(store, m, 1, 0.9)
    deadline = time.monotonic() + 30
    status = drive(
        store,
        RUN,
        RunSpec(rounds=7),
        StoreSink(store, RUN),
        sleeping(lambda: time.monotonic() > deadline),
    )
    assert status.phase == Phase.COMPLETED and len(status.history) == 1  # the pinned spec
    assert RunStatus.from_dict(store.get_run_status(RUN)) == status


def test_drive_waits_on_store_notifications_not_on_polls(alliance, monkeypatch):
    """While members train the loop sends no request; an update wakes it within a second."""
    store, _ = alliance
    lists = []
    real = store.list_round
    monkeypatch.setattr(store, "list_round", lambda *a, **k: lists.append(1) or real(*a, **k))
    done = []
    runner = threading.Thread(
        target=lambda: done.append(
            drive(store, RUN, RunSpec(rounds=1, min_members=3), StoreSink(store, RUN), sleeping())
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while store.get_json(f"tasks/{RUN}.json") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # The loop polls until the store has taken its subscription: the gateway answers
        # with its first keep-alive, after 0.5 s.
        time.sleep(1.0)
        before = len(lists)
        time.sleep(2.0)  # members "training": at 0.05 s polls this would be 40 listings
        assert len(lists) - before <= 1
        started = time.monotonic()
        for m in ("a", "b", "c"):
            train(store, m, 1, 1.0, 10)
        while (store.get_json(f"tasks/{RUN}.json") or {}).get("kind") != "validate":
            assert time.monotonic() - started < 1.5, "the last update did not wake the loop"
            time.sleep(0.01)
        started = time.monotonic()
        for m in ("a", "b", "c"):
            validate(store, m, 1, 0.9)
        runner.join(timeout=10)
        assert done and done[0].phase == Phase.COMPLETED
        assert time.monotonic() - started < 1.5, "the last validation did not wake the loop"
    finally:
        if runner.is_alive():
            for m in ("a", "b", "c"):
                validate(store, m, 1, 0.9)
            runner.join(timeout=10)


def test_a_member_writing_in_a_loop_does_not_make_the_loop_spin(alliance, monkeypatch):
    """Each notification wakes the loop, but it steps at most once per poll interval."""
    store, _ = alliance
    lists = []
    real = store.list_round
    monkeypatch.setattr(store, "list_round", lambda *a, **k: lists.append(1) or real(*a, **k))
    stop = threading.Event()
    runner = threading.Thread(
        target=drive,
        args=(store, RUN, RunSpec(rounds=1, min_members=3), StoreSink(store, RUN)),
        kwargs={"stopped": sleeping(stop.is_set)},
    )
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while store.get_json(f"tasks/{RUN}.json") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        before, started = len(lists), time.monotonic()
        for _ in range(300):  # a hostile member rewriting its failure report
            store.put_result(RUN, 1, "failures", "x", {"reason": "spam"})
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        steps = len(lists) - before
        assert steps <= elapsed / 0.05 + 5, (steps, elapsed)
    finally:
        stop.set()
        runner.join(timeout=10)
