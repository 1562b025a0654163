"""The coordinator: drives the pure engine against the store.

One ``reconcile`` observes the store (members' heartbeats, the round's results), asks
``engine.step`` what to do, carries the actions out, and repeats while there is progress to
make. It returns the new status; where the status is persisted is the caller's business: the
embedded runner keeps it in the store (``runs/<run>/status.json``), the Kubernetes operator in
the TrainingRun's ``.status``. Nothing here knows about Kubernetes or about processes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from alliance import engine, strategies, untrusted, weights
from alliance.engine import (
    Aggregate,
    AggregateResult,
    Finish,
    KeepRecord,
    MemberState,
    Observed,
    PublishTask,
    RunSpec,
    RunStatus,
    TaskKind,
)
from alliance.store import BadObject, Store, result_key

log = logging.getLogger(__name__)
T = TypeVar("T")
_ABSENT = object()

#: How many updates are fetched ahead of the one being checked.
PREFETCH = 4
#: Updates are read once to check them (and measure their distance from the global model,
#: which needs the whole round), and their arrays kept for the aggregation up to this many
#: bytes; the rest are read again (and must be the same bytes). The aggregation's memory is
#: this plus (1 + PREFETCH) updates, whatever the number of members (9c in the README).
KEEP_BYTES = 64 * 2**20


class Coordinator:
    def __init__(
        self,
        store: Store,
        run: str,
        spec: RunSpec,
        lost_members: Callable[[], set[str]] | None = None,
        heartbeat_timeout: float = 60.0,
        registered: Callable[[], Collection[str]] | None = None,
        clock: Callable[[], float] = time.time,
        member_refresh_seconds: float = 1.0,
    ):
        self.store = store
        self.run = run
        self.spec = spec
        self.lost_members = lost_members or set
        # Who the alliance's members are (the runner's processes, the operator's Member
        # objects); None: every member with a heartbeat (``alliance coordinate`` without
        # --members). Anyone else's heartbeat and results are ignored.
        self.registered = registered
        self._ignored: set[str] = set()  # members warned about once
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self._seed_model_id: str | None = None
        self.member_refresh_seconds = member_refresh_seconds
        self._listing: list = []
        self._listed_at = -float("inf")
        # member -> (etag, checked heartbeat, or the reason it was refused)
        self._heartbeats: dict[str, tuple[str, untrusted.Heartbeat | str]] = {}
        self._invalid: dict[str, str | None] = {}  # the reason last logged per member
        self._declared: dict[str, MemberState] = {}  # the ready members' declared rows
        self._results: dict[tuple[int, str, str], dict] = {}  # (round, kind, member) -> json
        # The global model this coordinator last wrote: the next round aggregates onto it, so
        # it is kept rather than downloaded and parsed again.
        self._last_model: tuple[str, list] | None = None

    # --- one reconcile ----------------------------------------------------------------------

    def reconcile(self, status: RunStatus) -> RunStatus:
        """Step the engine until it has nothing more to do right now."""
        for _ in range(16):  # a round has at most a handful of transitions in one go
            new, actions = engine.step(self.spec, status, self.observe(status))
            for action in actions:
                self.execute(action)
            if not actions:
                return new
            status = new
        return status

    # --- observing --------------------------------------------------------------------------

    def observe(self, status: RunStatus) -> Observed:
        now = self.clock()
        ready, lost = self._members(now)
        if status.round == 0 or status.phase in (engine.Phase.COMPLETED, engine.Phase.FAILED):
            return Observed(now=now, seed_model_id=self._seed(), ready=ready, lost=lost)
        # Each stage lists only what it waits for: at 1,000 members a LIST is not free.
        kinds = {
            engine.Stage.TRAINING: ("updates", "failures"),
            engine.Stage.AGGREGATING: ("updates",),
            engine.Stage.VALIDATING: ("validations",),
        }[status.stage]
        found = self.store.list_round(self.run, status.round, kinds)
        # Only the members asked are read: anyone may add keys under the round's prefix.
        asked = set(status.selected)
        failures = self._failures(status.round, found.get("failures", set()) & asked)
        validations = {}
        if status.stage == engine.Stage.VALIDATING:
            answered = found["validations"] & set(status.validators)
            validations = self._validations(status.round, answered)
        aggregate = None
        if status.stage == engine.Stage.AGGREGATING:
            aggregate = self._saved_aggregate(status.round)
        return Observed(
            now=now,
            seed_model_id=self._seed(),
            ready=ready,
            lost=lost,
            updates=frozenset(found.get("updates", ())),
            failures=failures,
            aggregate=aggregate,
            validations=validations,
        )

    def _seed(self) -> str | None:
        if self._seed_model_id is None:
            manifest = self.store.get_alliance()
            self._seed_model_id = manifest and manifest.get("seedModelId")
        return self._seed_model_id

    def _members(self, now: float) -> tuple[dict[str, MemberState], frozenset[str]]:
        """Ready and lost members from their heartbeats (content re-read only when it changed).

        The listing is refreshed at most every ``member_refresh_seconds``: heartbeats change
        every few seconds, and what the runner or the operator knows (``lost_members``) is
        merged on every call, so a failed member still drops out at once.
        """
        if time.monotonic() - self._listed_at >= self.member_refresh_seconds:
            self._listing = self.store.list_heartbeats()
            self._listed_at = time.monotonic()
        listing = self._listing
        changed = [
            o for o in listing if self._heartbeats.get(_member_of(o.key), ("",))[0] != o.etag
        ]
        for obj, content in zip(
            changed, self.store.map(self._member_json, [o.key for o in changed]), strict=True
        ):
            if content is None:
                continue
            try:
                beat: untrusted.Heartbeat | str = _parsed(content, untrusted.heartbeat)
            except untrusted.Rejected as exc:
                beat = f"heartbeat refused: {exc}"
                log.warning("member %s: %s", _member_of(obj.key), beat)
            self._heartbeats[_member_of(obj.key)] = (obj.etag, beat)
        registered = None if self.registered is None else set(self.registered())
        known_lost = set(self.lost_members())
        ready: dict[str, MemberState] = {}
        lost = set(known_lost)
        for obj in listing:
            name = _member_of(obj.key)
            if registered is not None and name not in registered:
                lost.add(name)  # a Member deleted, or never one: counts for nothing
                if name not in self._ignored:
                    self._ignored.add(name)
                    log.warning("ignoring %s: not a member of this alliance", name)
                continue
            beat = self._heartbeats.get(name, ("", None))[1]
            state = beat.state if isinstance(beat, untrusted.Heartbeat) else None
            if state == "invalid" and self._invalid.get(name) != beat.message:
                # Where the user looks (the runner's console, `alliance coordinate`): once per
                # reason, not once per heartbeat.
                log.warning("member %s cannot take part: %s", name, beat.message)
            self._invalid[name] = beat.message if state == "invalid" else None
            if state == "stopped" or now - obj.last_modified > self.heartbeat_timeout:
                lost.add(name)
            elif state == "ready" and name not in known_lost:
                ready[name] = MemberState(name, beat.train_rows, beat.test_rows)
        self._declared.update(ready)
        return ready, frozenset(lost)

    def _member_json(self, key: str) -> Any:
        """A member's JSON object (None: absent), or the Rejected saying why it is unusable."""
        try:
            content = self.store.get_json(
                key, max_bytes=untrusted.MAX_JSON_BYTES, attempts=2, missing=_ABSENT
            )
        except BadObject as exc:
            return untrusted.Rejected(str(exc))
        if content is None:  # JSON null: there, but not an object
            return untrusted.Rejected(f"{key}: null, not a JSON object")
        return None if content is _ABSENT else content

    def _fetch(self, round_: int, kind: str, members: set[str]) -> dict[str, Any]:
        """Results of a kind for a round, as the members wrote them; each is read once."""
        missing = [m for m in members if (round_, kind, m) not in self._results]
        keys = [result_key(self.run, round_, kind, m) for m in missing]
        for member, content in zip(missing, self.store.map(self._member_json, keys), strict=True):
            if content is not None:
                self._results[(round_, kind, member)] = content
        return {
            m: self._results[(round_, kind, m)]
            for m in members
            if (round_, kind, m) in self._results
        }

    def _failures(self, round_: int, members: set[str]) -> dict[str, str]:
        return {
            m: f"failed (unreadable report: {content})"
            if isinstance(content, untrusted.Rejected)
            else untrusted.failure(content)
            for m, content in self._fetch(round_, "failures", members).items()
        }

    def _validations(self, round_: int, members: set[str]) -> dict[str, dict]:
        """Checked validation results; ``{"rejected": why}`` for one that is unusable."""
        out = {}
        for m, content in self._fetch(round_, "validations", members).items():
            declared = self._declared.get(m, MemberState(m)).test_rows
            try:
                out[m] = _parsed(content, lambda c, n=declared: untrusted.validation(c, n))
            except untrusted.Rejected as exc:
                out[m] = {"rejected": str(exc)}
        return out

    # --- acting -----------------------------------------------------------------------------

    def execute(self, action: engine.Action) -> None:
        if isinstance(action, PublishTask):
            self.store.put_task(
                self.run,
                {
                    "run": self.run,
                    "round": action.round,
                    "kind": str(action.kind),
                    "members": list(action.members),
                    "modelId": action.model_id,
                    "deadline": action.deadline,
                    "epochs": self.spec.local_epochs,
                    "batchSize": self.spec.batch_size,
                },
            )
            if action.kind == TaskKind.TRAIN:  # read it now, while the members train
                self._model(action.model_id)
        elif isinstance(action, Aggregate):
            self.aggregate(action)
        elif isinstance(action, KeepRecord):
            self.store.put_round_record(self.run, action.round, action.record)
        elif isinstance(action, Finish):
            self.store.delete_task(self.run)

    def _model(self, model_id: str) -> list:
        if self._last_model is None or self._last_model[0] != model_id:
            self._remember(model_id, self.store.get_model(model_id))
        return self._last_model[1]

    def _remember(self, model_id: str, arrays: list) -> str:
        for a in arrays:  # shared with the next aggregation: it must equal the stored bytes
            a.flags.writeable = False
        self._last_model = (model_id, arrays)
        return model_id

    def _saved_aggregate(self, round_: int) -> AggregateResult | None:
        """The round's aggregation as stored; one that does not parse is done again (it is
        idempotent), rather than trusted or left to stall the run."""
        try:
            saved = self.store.get_aggregate(self.run, round_)
            return None if saved is None else AggregateResult.from_dict(saved)
        except (BadObject, AttributeError, TypeError, ValueError) as exc:
            log.warning("round %d: aggregate.json unusable (%s): aggregating again", round_, exc)
            return None

    def aggregate(self, action: Aggregate) -> AggregateResult:
        """Aggregate a round's updates once; a repeat returns the stored result."""
        saved = self._saved_aggregate(action.round)
        if saved is not None:
            return saved
        started = time.perf_counter()
        base = self._model(action.base_model_id)
        state = (
            self.store.get_model(action.optimizer_state_id) if action.optimizer_state_id else None
        )
        checked, rejected = self._check_updates(action.round, action.members, base)
        distances = {m: u.distance for m, u in checked.items()}
        for member, why in untrusted.outliers(distances, self.spec.max_update_norm).items():
            rejected[member] = f"update rejected: {why}"
            del checked[member]
        new_weights, new_state, error = self._combine(action.round, base, state, checked, rejected)
        for member, why in rejected.items():
            log.warning("round %d: %s: %s", action.round, member, why)
        metrics = [u.metrics for u in checked.values()]
        result = AggregateResult(
            model_id=None,
            accepted=tuple(checked),
            rejected=rejected,
            update_bytes=sum(u.size for u in checked.values()),
            error=error,
        )
        if new_weights is not None and len(checked) >= self.spec.min_members:
            model_id = self._remember(self.store.put_model(new_weights), new_weights)
            result = dataclasses.replace(
                result,
                model_id=model_id,
                optimizer_state_id=self.store.put_model(new_state) if new_state else None,
                num_examples=sum(m.num_examples for m in metrics),
                train_loss=engine.weighted_average(
                    (m.loss, m.num_examples) for m in metrics if m.loss is not None
                ),
                train_seconds=max((m.seconds for m in metrics), default=0.0),
            )
        # From the first read to the new model stored: fetching, checking and aggregating the
        # updates (not the write of aggregate.json below).
        result = dataclasses.replace(result, aggregation_seconds=time.perf_counter() - started)
        self.store.put_aggregate(self.run, action.round, result.to_dict())
        log.info(
            "round %d: aggregated %d updates (%d rejected, %d bytes) in %.2f s",
            action.round,
            len(checked),
            len(rejected),
            result.update_bytes,
            result.aggregation_seconds,
        )
        return result

    def _check_updates(
        self, round_: int, members: tuple[str, ...], base: list
    ) -> tuple[dict[str, _Checked], dict[str, str]]:
        """Read and check each update (untrusted.py); keep the arrays of the first ones, up to
        KEEP_BYTES, for the aggregation. Returns the usable updates and the refused ones."""
        checked: dict[str, _Checked] = {}
        rejected: dict[str, str] = {}
        kept = 0
        limit = int(weights.nbytes(base) * 1.1) + 65536  # the model's size, with headers
        for member, fetched in _prefetch(self.store, self.run, round_, members, limit):
            try:
                data, meta = fetched.result()
                declared = self._declared.get(member, MemberState(member)).train_rows
                metrics = untrusted.update_metrics(meta, declared)
                arrays = weights.loads(data)
                distance = untrusted.update_arrays(arrays, base)
            except (BadObject, weights.WeightsError, untrusted.Rejected) as exc:
                rejected[member] = f"update rejected: {exc}"
                continue
            keep = kept + len(data) <= KEEP_BYTES
            kept += len(data) if keep else 0
            checked[member] = _Checked(
                metrics, distance, len(data), meta["sha256"], arrays if keep else None
            )
        return checked, rejected

    def _combine(self, round_, base, state, checked, rejected):
        """The strategy's new weights and state from the checked updates, or the reason there
        are none. An update that changed since it was checked is refused and the rest tried
        again."""
        strategy = strategies.create(self.spec.aggregator, self.spec.aggregator_params)
        equal = self.spec.weighting == "equal"
        while True:
            updates = [
                strategies.Update(
                    m, 1 if equal else u.metrics.num_examples, self._loader(round_, m, u)
                )
                for m, u in checked.items()
            ]
            try:
                new_weights, new_state = strategy.aggregate(base, updates, state)
            except _Changed as exc:
                rejected[exc.member] = "update rejected: it changed while it was aggregated"
                del checked[exc.member]
                continue
            except strategies.StrategyError as exc:  # e.g. every update was refused
                return None, None, f"aggregation failed: {exc}"
            why = weights.nonfinite(new_weights)
            if why is not None:
                return None, None, f"the aggregated model is not finite: {why}"
            return new_weights, new_state, None

    def _loader(self, round_: int, member: str, update: _Checked) -> Callable[[], list]:
        if update.arrays is not None:
            return lambda: update.arrays

        def reload() -> list:
            data, meta = self.store.get_update(self.run, round_, member, max_bytes=update.size)
            if meta["sha256"] != update.sha256:
                raise _Changed(member)
            return weights.loads(data)

        return reload


@dataclass(frozen=True)
class _Checked:
    """An update that passed the checks: its metrics, its distance from the global model,
    its size and content id as read, and its arrays if kept in memory (else read again)."""

    metrics: untrusted.UpdateMetrics
    distance: float
    size: int
    sha256: str
    arrays: list | None


class _Changed(Exception):
    """An update read again for the aggregation is not the one checked."""

    def __init__(self, member: str):
        super().__init__(member)
        self.member = member


def _prefetch(
    store: Store, run: str, round_: int, members: tuple[str, ...], max_bytes: int
) -> Iterator[tuple[str, Future]]:
    """Yield (member, future of (bytes, meta)), keeping at most PREFETCH fetches ahead."""
    window: deque[tuple[str, Future]] = deque()
    pending = iter(members)
    for member in pending:
        window.append((member, store.submit(store.get_update, run, round_, member, max_bytes)))
        if len(window) > PREFETCH:
            yield window.popleft()
    while window:
        yield window.popleft()


def _parsed(content: Any, parse: Callable[[Any], T]) -> T:
    """``parse(content)``, or the Rejected that reading it already gave, raised."""
    if isinstance(content, untrusted.Rejected):
        raise content
    return parse(content)


def _member_of(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")
