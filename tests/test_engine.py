"""The round engine as a pure function: made-up observations in, decisions out."""

import pytest

from alliance.engine import (
    Aggregate,
    AggregateResult,
    Finish,
    KeepRecord,
    MemberState,
    Observed,
    Phase,
    PublishTask,
    RunSpec,
    RunStatus,
    SpecError,
    Stage,
    TaskKind,
    select_members,
    step,
)

SEED = "seed0"
M3 = ("a", "b", "c")


def kept(status: RunStatus, index: int = -1) -> KeepRecord:
    """The action that keeps a round's record in the store."""
    return KeepRecord(status.history[index].round, status.to_dict()["history"][index])


def ready(*names, test_rows=100):
    return {n: MemberState(n, 1000, test_rows) for n in names}


def obs(now, **kw):
    kw.setdefault("seed_model_id", SEED)
    kw.setdefault("ready", ready(*M3))
    return Observed(now=now, **kw)


def started(spec, now=0.0):
    status, actions = step(spec, RunStatus(), obs(now))
    return status, actions


def test_waits_for_seed_and_quorum_of_members():
    spec = RunSpec(min_members=2)
    status, actions = step(spec, RunStatus(), obs(0, seed_model_id=None))
    assert status.phase == Phase.PENDING and actions == []
    assert "seed model" in status.message
    status, actions = step(spec, RunStatus(), obs(0, ready=ready("a")))
    assert status.phase == Phase.PENDING and actions == []
    assert status.message == "waiting for members: 1 of 2 ready"


def test_first_round_publishes_training_to_all_ready_members():
    status, actions = started(RunSpec(min_members=2, round_deadline_seconds=60), now=10)
    assert status.phase == Phase.RUNNING and status.round == 1 and status.stage == Stage.TRAINING
    assert actions == [PublishTask(1, TaskKind.TRAIN, M3, SEED, 70.0)]
    assert status.model_id == SEED


def test_step_does_not_modify_its_input():
    before = RunStatus()
    step(RunSpec(), before, obs(0))
    assert before.phase == Phase.PENDING and before.history == []


def test_waits_until_every_selected_member_answers():
    spec = RunSpec(min_members=2)
    status, _ = started(spec)
    status, actions = step(spec, status, obs(5, updates=frozenset({"a", "b"})))
    assert actions == [] and status.stage == Stage.TRAINING
    assert status.message == "round 1: training, 2 of 3 updates in"


def test_all_answered_aggregates_at_once():
    spec = RunSpec(min_members=2)
    status, _ = started(spec)
    status, actions = step(spec, status, obs(5, updates=frozenset(M3)))
    assert status.stage == Stage.AGGREGATING
    assert actions == [Aggregate(1, M3, SEED, None)]


def test_lost_member_is_dropped_without_waiting_for_the_deadline():
    spec = RunSpec(min_members=2, round_deadline_seconds=600)
    status, _ = started(spec)
    status, actions = step(
        spec, status, obs(5, updates=frozenset({"a", "b"}), lost=frozenset({"c"}))
    )
    assert actions == [Aggregate(1, ("a", "b"), SEED, None)]
    assert status.current.dropped == ["c"]


def test_a_member_lost_mid_round_stays_out_of_it_when_it_comes_back():
    # Its pod failed and was replaced: the new agent is healthy, but the round does not wait
    # for it to train again from scratch.
    spec = RunSpec(min_members=2, round_deadline_seconds=600)
    status, _ = started(spec)
    status, actions = step(spec, status, obs(5, lost=frozenset({"c"})))
    assert actions == [] and status.current.dropped == ["c"]
    status, actions = step(spec, status, obs(6, updates=frozenset({"a"})))  # c is back
    assert actions == [] and status.message == "round 1: training, 1 of 3 updates in"
    status, actions = step(spec, status, obs(9, updates=frozenset({"a", "b"})))
    assert actions == [Aggregate(1, ("a", "b"), SEED, None)]
    assert status.current.dropped == ["c"]


def test_an_update_from_a_dropped_member_still_counts_while_the_round_waits():
    spec = RunSpec(min_members=2, round_deadline_seconds=600)
    status, _ = started(spec)
    status, _ = step(spec, status, obs(5, lost=frozenset({"c"})))
    status, actions = step(spec, status, obs(9, updates=frozenset({"a", "b", "c"})))
    assert actions == [Aggregate(1, M3, SEED, None)]
    assert status.current.dropped == []


def test_deadline_drops_stragglers_when_quorum_is_met():
    spec = RunSpec(min_members=2, round_deadline_seconds=60)
    status, _ = started(spec)
    status, actions = step(spec, status, obs(59.9, updates=frozenset({"a", "b"})))
    assert actions == []
    status, actions = step(spec, status, obs(60, updates=frozenset({"a", "b"})))
    assert actions == [Aggregate(1, ("a", "b"), SEED, None)]
    assert status.current.dropped == ["c"]


def test_deadline_without_quorum_fails_the_run():
    spec = RunSpec(min_members=2, round_deadline_seconds=60)
    status, _ = started(spec)
    status, actions = step(spec, status, obs(61, updates=frozenset({"a"})))
    assert status.phase == Phase.FAILED and actions == [kept(status), Finish()]
    assert "round 1: 1 updates, minMembers is 2" in status.message


def test_reported_failure_counts_as_an_answer():
    spec = RunSpec(min_members=2)
    status, _ = started(spec)
    status, actions = step(
        spec, status, obs(5, updates=frozenset({"a", "b"}), failures={"c": "out of memory"})
    )
    assert actions == [Aggregate(1, ("a", "b"), SEED, None)]
    assert status.current.failed == {"c": "out of memory"}


def aggregated(spec, model="m1", accepted=M3, rejected=None):
    status, _ = started(spec)
    status, _ = step(spec, status, obs(5, updates=frozenset(M3)))
    result = AggregateResult(model, None, tuple(accepted), rejected or {}, 3000, 0.5, 4.0, 96, 0.2)
    return step(spec, status, obs(6, updates=frozenset(M3), aggregate=result))


def test_aggregating_repeats_the_idempotent_action_until_a_result_is_stored():
    spec = RunSpec()
    status, _ = started(spec)
    status, _ = step(spec, status, obs(5, updates=frozenset(M3)))
    again, actions = step(spec, status, obs(6, updates=frozenset(M3)))
    assert actions == [Aggregate(1, M3, SEED, None)] and again.stage == Stage.AGGREGATING


def test_aggregation_result_starts_validation_on_members_with_test_data():
    spec = RunSpec(validation_deadline_seconds=30)
    status, actions = aggregated(spec)
    assert status.stage == Stage.VALIDATING and status.model_id == "m1"
    assert actions == [PublishTask(1, TaskKind.VALIDATE, M3, "m1", 36.0)]
    record = status.current
    assert (record.num_examples, record.train_loss, record.train_seconds) == (3000, 0.5, 4.0)
    assert (record.update_bytes, record.aggregation_seconds) == (96, 0.2)


def test_rejected_updates_below_quorum_fail_the_run():
    spec = RunSpec(min_members=3)
    status, actions = aggregated(spec, accepted=("a", "b"), rejected={"c": "NaN"})
    assert status.phase == Phase.FAILED and actions == [kept(status), Finish()]
    assert status.current.rejected == {"c": "NaN"}


def test_validation_accuracy_is_weighted_by_examples_and_next_round_starts():
    spec = RunSpec(rounds=2)
    status, _ = aggregated(spec)
    vals = {
        "a": {"numExamples": 100, "accuracy": 0.9, "loss": 0.3, "seconds": 1.0},
        "b": {"numExamples": 300, "accuracy": 0.7, "loss": 0.5, "seconds": 2.0},
        "c": {"error": "test.csv vanished"},
    }
    status, actions = step(spec, status, obs(8, validations=vals))
    first = status.history[0]
    # (0.9*100 + 0.7*300) / 400 = 0.75 ; loss (0.3*100 + 0.5*300) / 400 = 0.45
    assert first.accuracy == pytest.approx(0.75) and first.loss == pytest.approx(0.45)
    assert first.validators == 2 and first.validation_seconds == 2.0
    assert first.finished_at == 8 and first.seconds == 8
    assert status.round == 2 and status.stage == Stage.TRAINING
    assert actions == [
        kept(status, 0),
        PublishTask(2, TaskKind.TRAIN, M3, "m1", 608.0),
    ]


def test_last_round_completes_the_run():
    spec = RunSpec(rounds=1)
    status, _ = aggregated(spec)
    status, actions = step(
        spec,
        status,
        obs(8, validations={m: {"numExamples": 10, "accuracy": 1.0, "loss": 0.0} for m in M3}),
    )
    assert status.phase == Phase.COMPLETED and actions == [kept(status), Finish()]
    assert status.message == "completed 1 rounds, accuracy 1.0000"
    assert step(spec, status, obs(9)) == (status, [])


def test_no_validation_goes_straight_to_the_next_round():
    spec = RunSpec(rounds=2, validation="none")
    status, actions = aggregated(spec)
    assert status.round == 2 and actions[0] == kept(status, 0) and actions[1].kind == TaskKind.TRAIN


def test_status_round_trips_through_its_dict_form():
    spec = RunSpec(rounds=2)
    status, _ = aggregated(spec, rejected={"x": "bad"})
    assert RunStatus.from_dict(status.to_dict()) == status
    assert "stageStartedAt" in status.to_dict()


def test_member_selection_is_seeded_by_round():
    spec = RunSpec(members_per_round=2, min_members=1, seed=7)
    names = [f"m{i}" for i in range(10)]
    first = select_members(spec, names, 1)
    assert len(first) == 2 and first == select_members(spec, list(reversed(names)), 1)
    assert any(select_members(spec, names, r) != first for r in range(2, 6))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": "3"}, "rounds"),
        ({"minMembers": 3, "membersPerRound": 2}, "minMembers"),
        ({"aggregator": "fedmagic"}, "aggregator"),
        ({"aggregator": "fedadam", "aggregatorParams": {"nope": 1}}, "aggregator"),
        ({"validation": "all"}, "validation"),
        ({"roundDeadline": 5}, "roundDeadline"),
    ],
)
def test_invalid_spec_names_the_field(data, field):
    with pytest.raises(SpecError) as err:
        RunSpec.from_dict(data)
    assert err.value.field == field
    assert str(err.value).startswith(f"spec.{field}:")


def test_spec_from_camel_case():
    spec = RunSpec.from_dict(
        {
            "rounds": 5,
            "localEpochs": 2,
            "roundDeadlineSeconds": 30,
            "aggregator": "trimmedmean",
            "aggregatorParams": {"trimFraction": 0.2},
        }
    )
    assert (spec.rounds, spec.local_epochs, spec.round_deadline_seconds) == (5, 2, 30.0)
    assert RunSpec.from_dict(spec.to_dict()) == spec


def test_validators_without_training_data_only_validate():
    spec = RunSpec(min_members=2)
    members = {**ready(*M3), "v": MemberState("v", train_rows=0, test_rows=10_000)}
    status, actions = step(spec, RunStatus(), obs(0, ready=members))
    assert actions[0].members == M3  # v never trains
    status, _ = step(spec, status, obs(5, ready=members, updates=frozenset(M3)))
    result = AggregateResult("m1", None, M3, {}, 3000, 0.5, 4.0)
    status, actions = step(spec, status, obs(6, ready=members, aggregate=result))
    assert actions[0].kind == TaskKind.VALIDATE and actions[0].members == (*M3, "v")
    status, _ = step(spec, RunStatus(), obs(0, ready={"v": members["v"], "a": members["a"]}))
    assert status.message == "waiting for members: 1 of 2 ready"


def test_the_status_keeps_the_newest_rounds_and_every_record_is_kept():
    from alliance.engine import STATUS_HISTORY_ROUNDS

    spec = RunSpec(rounds=STATUS_HISTORY_ROUNDS + 5, validation="none")
    status, _ = started(spec)
    kept_rounds = []
    for r in range(1, spec.rounds + 1):
        status, _ = step(spec, status, obs(r, updates=frozenset(M3)))
        result = AggregateResult(f"m{r}", accepted=M3, num_examples=30)
        status, actions = step(spec, status, obs(r, updates=frozenset(M3), aggregate=result))
        kept_rounds += [a.round for a in actions if isinstance(a, KeepRecord)]
    assert status.phase == Phase.COMPLETED
    assert kept_rounds == list(range(1, spec.rounds + 1))
    assert [r.round for r in status.history] == list(range(6, spec.rounds + 1))
