"""The round engine: a pure state machine over (spec, status, observed state).

``step(spec, status, observed)`` decides what happens next and returns the new status and the
actions to carry out. It does no I/O and reads no clock (the time comes in ``Observed.now``),
so the embedded runner and the Kubernetes operator drive the same logic, and tests drive it
table-style with made-up observations.

A round goes TRAINING → AGGREGATING → VALIDATING, then the next round starts:

- TRAINING: the round's members were sent the global model. The round moves on as soon as every
  selected member has answered (an update or a failure) or is known to be lost, or when the round
  deadline passes with at least ``min_members`` updates. Members that did not answer are dropped.
- AGGREGATING: the driver aggregates the updates (rejecting NaN/Inf or misshapen ones) and
  records the result in the store under a deterministic key, so a crash here re-runs the same,
  idempotent aggregation and never applies an update twice.
- VALIDATING: validators score the new global model on their test data; the round's accuracy is
  the example-weighted mean. Validators that do not answer by the deadline are left out.

Crash safety: the driver carries out the actions *before* persisting the returned status. A crash
in between leaves the old status, from which ``step`` makes the same decision again (member
selection is seeded by the round), and every action is idempotent.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"


class Stage(StrEnum):
    TRAINING = "Training"
    AGGREGATING = "Aggregating"
    VALIDATING = "Validating"


class TaskKind(StrEnum):
    TRAIN = "train"
    VALIDATE = "validate"


class SpecError(ValueError):
    """An invalid run spec; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"spec.{field_name}: {message}")
        self.field = field_name


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class RunSpec:
    rounds: int = 3
    members_per_round: int = 0  # 0: every ready member
    min_members: int = 1  # quorum: updates needed to aggregate
    local_epochs: int = 1
    batch_size: int = 32
    aggregator: str = "fedavg"
    aggregator_params: dict = field(default_factory=dict)
    round_deadline_seconds: float = 600.0
    validation_deadline_seconds: float = 120.0
    validation: str = "members"  # "members": every ready member with test data; "none"
    seed: int = 0
    weighting: str = "examples"  # an update's weight: its numExamples, or "equal"
    max_update_norm: float = 0.0  # refuse updates further than this from the model; 0: no bound

    @classmethod
    def from_dict(cls, data: dict | None) -> RunSpec:
        """From a camelCase dict (YAML file, custom resource spec); errors name the field."""
        data = dict(data or {})
        known = {_camel(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            f = known.get(key)
            if f is None:
                raise SpecError(key, f"unknown field; known fields: {', '.join(sorted(known))}")
            kwargs[f.name] = _coerce(key, value, getattr(cls(), f.name))
        spec = cls(**kwargs)
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return {_camel(k): v for k, v in asdict(self).items()}

    def validate(self) -> None:
        for name in ("rounds", "min_members", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(_camel(name), f"must be at least 1, got {getattr(self, name)}")
        if self.members_per_round < 0:
            raise SpecError("membersPerRound", "must be 0 (all ready members) or more")
        if 0 < self.members_per_round < self.min_members:
            raise SpecError(
                "minMembers",
                f"{self.min_members} is more than membersPerRound ({self.members_per_round})",
            )
        for name in ("round_deadline_seconds", "validation_deadline_seconds"):
            if not getattr(self, name) > 0:
                raise SpecError(_camel(name), "must be positive")
        if self.weighting not in ("examples", "equal"):
            raise SpecError("weighting", f"must be 'examples' or 'equal', got {self.weighting!r}")
        if not (0 <= self.max_update_norm < math.inf):
            raise SpecError("maxUpdateNorm", "must be 0 (no bound) or a positive number")
        if self.validation not in ("members", "none"):
            raise SpecError("validation", f"must be 'members' or 'none', got {self.validation!r}")
        # Imported here so the engine's pure core has no import-time dependency on numpy.
        from alliance import strategies

        try:
            strategies.create(self.aggregator, self.aggregator_params)
        except strategies.StrategyError as exc:
            raise SpecError("aggregator", str(exc)) from exc


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(key, f"must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(key, f"must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SpecError(key, f"must be a string, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise SpecError(key, f"must be a mapping, got {value!r}")
        return value
    return value


@dataclass
class RoundRecord:
    """What happened in one round; kept in status, so small (no per-member weights)."""

    round: int
    model_id: str | None = None
    members: list[str] = field(default_factory=list)  # whose updates were aggregated
    dropped: list[str] = field(default_factory=list)  # did not answer or were lost
    failed: dict[str, str] = field(default_factory=dict)  # reported failure: reason
    rejected: dict[str, str] = field(default_factory=dict)  # update refused: reason
    num_examples: int = 0
    train_loss: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    validators: int = 0
    started_at: float = 0.0
    aggregated_at: float = 0.0
    finished_at: float = 0.0
    train_seconds: float = 0.0  # the slowest member's training time
    validation_seconds: float = 0.0  # the slowest validator's time
    update_bytes: int = 0  # the size of the accepted updates, as stored
    aggregation_seconds: float = 0.0  # the coordinator's wall time aggregating them

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at


@dataclass
class RunStatus:
    phase: Phase = Phase.PENDING
    round: int = 0  # the round in progress (1-based); 0 before the first
    stage: Stage | None = None
    stage_started_at: float = 0.0
    selected: list[str] = field(default_factory=list)  # asked to train this round
    validators: list[str] = field(default_factory=list)  # asked to validate this round
    model_id: str | None = None  # the current global model
    optimizer_state_id: str | None = None  # the server optimizer's state (FedAdam & co.)
    history: list[RoundRecord] = field(default_factory=list)
    message: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def current(self) -> RoundRecord | None:
        return self.history[-1] if self.history and self.history[-1].round == self.round else None

    def to_dict(self) -> dict:
        out = {_camel(k): v for k, v in asdict(self).items() if k != "history"}
        out["history"] = [{_camel(k): v for k, v in asdict(r).items()} for r in self.history]
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> RunStatus:
        if not data:
            return cls()
        names = {_camel(f.name): f.name for f in fields(cls)}
        kwargs = {names[k]: v for k, v in data.items() if k in names and k != "history"}
        if kwargs.get("phase"):
            kwargs["phase"] = Phase(kwargs["phase"])
        if kwargs.get("stage"):
            kwargs["stage"] = Stage(kwargs["stage"])
        rnames = {_camel(f.name): f.name for f in fields(RoundRecord)}
        history = [
            RoundRecord(**{rnames[k]: v for k, v in r.items() if k in rnames})
            for r in data.get("history", [])
        ]
        return cls(**kwargs, history=history)


@dataclass(frozen=True)
class MemberState:
    name: str
    train_rows: int = 0
    test_rows: int = 0


@dataclass(frozen=True)
class AggregateResult:
    """What the driver's aggregation wrote to the store for a round."""

    model_id: str | None  # None: too few acceptable updates
    optimizer_state_id: str | None = None
    accepted: tuple[str, ...] = ()
    rejected: dict = field(default_factory=dict)  # member -> reason
    num_examples: int = 0
    train_loss: float | None = None
    train_seconds: float = 0.0
    update_bytes: int = 0  # the accepted updates' size, as stored (serialized weights)
    aggregation_seconds: float = 0.0  # wall time of the aggregation, measured by the driver
    error: str | None = None  # why there is no model, when it is not too few updates

    def to_dict(self) -> dict:
        return {
            _camel(k): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict) -> AggregateResult:
        names = {_camel(f.name): f.name for f in fields(cls)}
        kwargs = {names[k]: v for k, v in data.items() if k in names}
        kwargs["accepted"] = tuple(kwargs.get("accepted", ()))
        return cls(**kwargs)


@dataclass(frozen=True)
class Observed:
    """What the driver saw: the clock, the members, and the current round's results."""

    now: float
    seed_model_id: str | None = None  # set once the alliance is initialised
    ready: dict[str, MemberState] = field(default_factory=dict)  # live members with valid data
    lost: frozenset[str] = frozenset()  # known gone: process exited, pod failed, heartbeat stale
    updates: frozenset[str] = frozenset()  # members whose update for this round is stored
    failures: dict[str, str] = field(default_factory=dict)  # member -> reason, this round
    aggregate: AggregateResult | None = None  # this round's aggregation, once done
    # member -> metrics ({"error": reason} when it could not validate), this round
    validations: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishTask:
    """Ask ``members`` to train on, or validate, ``model_id`` (replaces the run's task)."""

    round: int
    kind: TaskKind
    members: tuple[str, ...]
    model_id: str
    deadline: float


@dataclass(frozen=True)
class Aggregate:
    round: int
    members: tuple[str, ...]
    base_model_id: str
    optimizer_state_id: str | None


@dataclass(frozen=True)
class Finish:
    """The run is over: withdraw its task."""


@dataclass(frozen=True)
class KeepRecord:
    """A round has ended: keep its record in the store for good (the status keeps only the
    newest STATUS_HISTORY_ROUNDS)."""

    round: int
    record: dict


Action = PublishTask | Aggregate | Finish | KeepRecord

#: Rounds a run's status keeps in its history, the newest; every round's record is kept in the
#: store too (``runs/<run>/rounds/NNNNN/record.json``), so a long run's status stays small.
STATUS_HISTORY_ROUNDS = 100


def step(spec: RunSpec, status: RunStatus, obs: Observed) -> tuple[RunStatus, list[Action]]:
    """Decide the next move. Returns a new status (the input is not modified) and actions."""
    status = RunStatus.from_dict(status.to_dict())  # a deep copy keeps step pure
    if status.phase in (Phase.COMPLETED, Phase.FAILED):
        return status, []
    if status.phase == Phase.PENDING:
        return _start(spec, status, obs)
    if status.stage == Stage.TRAINING:
        return _training(spec, status, obs)
    if status.stage == Stage.AGGREGATING:
        return _aggregating(spec, status, obs)
    return _validating(spec, status, obs)


def _start(spec: RunSpec, status: RunStatus, obs: Observed):
    if obs.seed_model_id is None:
        status.message = "waiting for the alliance's seed model"
        return status, []
    if len(training_members(obs.ready)) < spec.min_members:
        status.message = (
            f"waiting for members: {len(training_members(obs.ready))} of {spec.min_members} ready"
        )
        return status, []
    status.phase = Phase.RUNNING
    status.started_at = obs.now
    status.model_id = obs.seed_model_id
    return _start_round(spec, status, obs, 1)


def training_members(ready: dict[str, MemberState]) -> list[str]:
    """Ready members with training data (validators hold only a test set)."""
    return sorted(name for name, member in ready.items() if member.train_rows > 0)


def weighted_average(pairs: Iterable[tuple[float, int]]) -> float | None:
    """The mean of the values weighted by their counts; None when there is no weight."""
    pairs = list(pairs)
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def select_members(spec: RunSpec, ready: list[str], round_: int) -> list[str]:
    """The members asked to train in a round: a seeded sample, so a re-run picks the same."""
    ready = sorted(ready)
    if spec.members_per_round == 0 or spec.members_per_round >= len(ready):
        return ready
    return sorted(random.Random(f"{spec.seed}:{round_}").sample(ready, spec.members_per_round))


def _start_round(spec: RunSpec, status: RunStatus, obs: Observed, round_: int):
    selected = select_members(spec, training_members(obs.ready), round_)
    if len(selected) < spec.min_members:
        return _fail(
            status,
            obs,
            f"round {round_}: only {len(selected)} members ready, minMembers is {spec.min_members}",
        )
    status.round = round_
    status.stage = Stage.TRAINING
    status.stage_started_at = obs.now
    status.selected = selected
    status.validators = []
    status.history = status.history[-(STATUS_HISTORY_ROUNDS - 1) :]
    status.history.append(RoundRecord(round=round_, started_at=obs.now))
    status.message = f"round {round_}: training on {len(selected)} members"
    deadline = obs.now + spec.round_deadline_seconds
    return status, [PublishTask(round_, TaskKind.TRAIN, tuple(selected), status.model_id, deadline)]


def _training(spec: RunSpec, status: RunStatus, obs: Observed):
    selected = set(status.selected)
    updated = selected & obs.updates
    failed = {m: r for m, r in obs.failures.items() if m in selected and m not in updated}
    record = status.current
    # A member once seen lost stays out of this round even if it comes back (a replaced pod,
    # a restarted process): the round does not wait for it to train again. Its update still
    # counts if it arrives before the round moves on.
    lost = ((selected & obs.lost) | set(record.dropped)) - updated - set(failed)
    waiting = selected - updated - set(failed) - lost
    late = obs.now >= status.stage_started_at + spec.round_deadline_seconds
    if waiting and not late:
        record.dropped = sorted(lost)
        status.message = (
            f"round {status.round}: training, {len(updated)} of {len(selected)} updates in"
        )
        return status, []
    record.failed = dict(sorted(failed.items()))
    record.dropped = sorted(waiting | lost)
    if len(updated) < spec.min_members:
        why = "the deadline passed" if waiting else "the others failed or were lost"
        return _fail(
            status,
            obs,
            f"round {status.round}: {len(updated)} updates, minMembers is "
            f"{spec.min_members}, and {why}",
        )
    status.stage = Stage.AGGREGATING
    status.stage_started_at = obs.now
    status.message = f"round {status.round}: aggregating {len(updated)} updates"
    return status, [
        Aggregate(status.round, tuple(sorted(updated)), status.model_id, status.optimizer_state_id)
    ]


def _aggregating(spec: RunSpec, status: RunStatus, obs: Observed):
    result = obs.aggregate
    record = status.current
    if result is None:  # not yet carried out (or lost in a crash): ask again, it is idempotent
        members = tuple(sorted(set(status.selected) & obs.updates))
        return status, [
            Aggregate(status.round, members, status.model_id, status.optimizer_state_id)
        ]
    record.members = list(result.accepted)
    record.rejected = dict(sorted(result.rejected.items()))
    record.num_examples = result.num_examples
    record.train_loss = result.train_loss
    record.train_seconds = result.train_seconds
    record.update_bytes = result.update_bytes
    record.aggregation_seconds = result.aggregation_seconds
    record.aggregated_at = obs.now
    if result.model_id is None or len(result.accepted) < spec.min_members:
        why = result.error or (
            f"{len(result.accepted)} acceptable updates, minMembers is {spec.min_members}"
        )
        return _fail(status, obs, f"round {status.round}: {why}")
    status.model_id = result.model_id
    status.optimizer_state_id = result.optimizer_state_id
    record.model_id = result.model_id
    validators = []
    if spec.validation == "members":
        validators = sorted(m for m, s in obs.ready.items() if s.test_rows > 0)
    if not validators:
        return _finish_round(spec, status, obs)
    status.stage = Stage.VALIDATING
    status.stage_started_at = obs.now
    status.validators = validators
    status.message = f"round {status.round}: validating on {len(validators)} members"
    deadline = obs.now + spec.validation_deadline_seconds
    return status, [
        PublishTask(status.round, TaskKind.VALIDATE, tuple(validators), status.model_id, deadline)
    ]


def _validating(spec: RunSpec, status: RunStatus, obs: Observed):
    validators = set(status.validators)
    answered = {m: v for m, v in obs.validations.items() if m in validators}
    done = {m: v for m, v in answered.items() if "accuracy" in v}
    gone = (validators & obs.lost) | (set(answered) - set(done))
    waiting = validators - set(done) - gone
    late = obs.now >= status.stage_started_at + spec.validation_deadline_seconds
    if waiting and not late:
        status.message = (
            f"round {status.round}: validating, {len(done)} of {len(validators)} scores in"
        )
        return status, []
    record = status.current
    for m, v in sorted(answered.items()):
        if "rejected" in v:
            _note(record.rejected, m, f"validation rejected: {v['rejected']}")
        elif "error" in v:
            _note(record.failed, m, f"validation failed: {v['error']}")
    counted = {m: v for m, v in done.items() if v.get("numExamples", 0) > 0}
    record.validators = len(counted)
    record.accuracy = weighted_average((v["accuracy"], v["numExamples"]) for v in counted.values())
    record.loss = weighted_average(
        (v["loss"], v["numExamples"])
        for v in counted.values()
        if v.get("loss") is not None and math.isfinite(v["loss"])
    )
    record.validation_seconds = max((v.get("seconds", 0.0) for v in done.values()), default=0.0)
    return _finish_round(spec, status, obs)


def _note(reasons: dict[str, str], member: str, reason: str) -> None:
    """Add a reason for a member (one that also had its update refused keeps both)."""
    reasons[member] = f"{reasons[member]}; {reason}" if member in reasons else reason


def _finish_round(spec: RunSpec, status: RunStatus, obs: Observed):
    record = status.current
    record.finished_at = obs.now
    kept = _keep(record)
    if status.round >= spec.rounds:
        status.phase = Phase.COMPLETED
        status.stage = None
        status.finished_at = obs.now
        acc = "" if record.accuracy is None else f", accuracy {record.accuracy:.4f}"
        status.message = f"completed {status.round} rounds{acc}"
        return status, [kept, Finish()]
    status, actions = _start_round(spec, status, obs, status.round + 1)
    return status, [kept, *actions]


def _keep(record: RoundRecord) -> KeepRecord:
    return KeepRecord(record.round, {_camel(k): v for k, v in asdict(record).items()})


def _fail(status: RunStatus, obs: Observed, message: str):
    status.phase = Phase.FAILED
    status.finished_at = obs.now
    status.message = message
    if status.current:
        status.current.finished_at = obs.now
        return status, [_keep(status.current), Finish()]
    return status, [Finish()]
