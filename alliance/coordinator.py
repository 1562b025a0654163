"""The coordinator: drives the pure engine against the store.

One ``reconcile`` observes the store (members' heartbeats, the round's results), asks
``engine.step`` what to do, carries the actions out, and repeats while there is progress to
make. It returns the new status; where the status is persisted is the caller's business: the
embedded runner keeps it in the store (``runs/<run>/status.json``), the Kubernetes operator in
the TrainingRun's ``.status``. Nothing here knows about Kubernetes or about processes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from alliance import engine, strategies, weights
from alliance.engine import (
    Aggregate,
    AggregateResult,
    Finish,
    MemberState,
    Observed,
    PublishTask,
    RunSpec,
    RunStatus,
)
from alliance.store import Store, StoreError, result_key

log = logging.getLogger(__name__)

#: How many updates are fetched ahead of the one being aggregated. Bounds the aggregation's
#: memory to (1 + PREFETCH) updates whatever the number of members.
PREFETCH = 4


class Coordinator:
    def __init__(
        self,
        store: Store,
        run: str,
        spec: RunSpec,
        lost_members: Callable[[], set[str]] | None = None,
        heartbeat_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
        member_refresh_seconds: float = 1.0,
    ):
        self.store = store
        self.run = run
        self.spec = spec
        self.lost_members = lost_members or set
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self._seed_model_id: str | None = None
        self.member_refresh_seconds = member_refresh_seconds
        self._listing: list = []
        self._listed_at = -float("inf")
        self._heartbeats: dict[str, tuple[str, dict]] = {}  # member -> (etag, content)
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
        failures = {
            m: r.get("reason", "failed")
            for m, r in self._fetch(status.round, "failures", found.get("failures", set())).items()
        }
        validations = {}
        if status.stage == engine.Stage.VALIDATING:
            validations = self._fetch(status.round, "validations", found["validations"])
        aggregate = None
        if status.stage == engine.Stage.AGGREGATING:
            saved = self.store.get_aggregate(self.run, status.round)
            aggregate = AggregateResult.from_dict(saved) if saved else None
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
            changed, self.store.map(lambda o: self.store.get_json(o.key), changed), strict=True
        ):
            if content is not None:
                self._heartbeats[_member_of(obj.key)] = (obj.etag, content)
        known_lost = set(self.lost_members())
        ready: dict[str, MemberState] = {}
        lost = set(known_lost)
        for obj in listing:
            name = _member_of(obj.key)
            content = self._heartbeats.get(name, ("", {}))[1]
            if (
                content.get("state") == "stopped"
                or now - obj.last_modified > self.heartbeat_timeout
            ):
                lost.add(name)
            elif content.get("state") == "ready" and name not in known_lost:
                ready[name] = MemberState(
                    name, content.get("trainRows", 0), content.get("testRows", 0)
                )
        return ready, frozenset(lost)

    def _fetch(self, round_: int, kind: str, members: set[str]) -> dict[str, dict]:
        """Results of a kind for a round; each member's JSON is read once."""
        missing = [m for m in members if (round_, kind, m) not in self._results]
        keys = [result_key(self.run, round_, kind, m) for m in missing]
        for member, content in zip(missing, self.store.map(self.store.get_json, keys), strict=True):
            if content is not None:
                self._results[(round_, kind, member)] = content
        return {
            m: self._results[(round_, kind, m)]
            for m in members
            if (round_, kind, m) in self._results
        }

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
        elif isinstance(action, Aggregate):
            self.aggregate(action)
        elif isinstance(action, Finish):
            self.store.delete_task(self.run)

    def _model(self, model_id: str) -> list:
        if self._last_model is not None and self._last_model[0] == model_id:
            return self._last_model[1]
        return self.store.get_model(model_id)

    def _remember(self, model_id: str, arrays: list) -> str:
        for a in arrays:  # shared with the next aggregation: it must equal the stored bytes
            a.flags.writeable = False
        self._last_model = (model_id, arrays)
        return model_id

    def aggregate(self, action: Aggregate) -> AggregateResult:
        """Aggregate a round's updates once; a repeat returns the stored result."""
        saved = self.store.get_aggregate(self.run, action.round)
        if saved is not None:
            return AggregateResult.from_dict(saved)
        started = time.perf_counter()
        base = self._model(action.base_model_id)
        state = (
            self.store.get_model(action.optimizer_state_id) if action.optimizer_state_id else None
        )
        strategy = strategies.create(self.spec.aggregator, self.spec.aggregator_params)
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        metas: list[dict] = []
        sizes: list[int] = []  # the accepted updates' bytes, as stored

        def admitted() -> Iterator[strategies.Update]:
            for member, fetched in _prefetch(self.store, self.run, action.round, action.members):
                try:
                    data, meta = fetched.result()
                    arrays = weights.loads(data)
                except (StoreError, weights.WeightsError) as exc:
                    rejected[member] = str(exc)
                    continue
                size = len(data)
                del data
                n = meta.get("numExamples")
                why = weights.mismatch(arrays, base) or weights.nonfinite(arrays)
                if why is None and (not isinstance(n, int) or n <= 0):
                    why = f"numExamples must be a positive integer, got {n!r}"
                if why is not None:
                    rejected[member] = f"update rejected: {why}"
                    log.warning("round %d: %s: update rejected: %s", action.round, member, why)
                    continue
                accepted.append(member)
                metas.append(meta)
                sizes.append(size)
                yield strategies.Update(member, n, lambda a=arrays: a)

        try:
            new_weights, new_state = strategy.aggregate(base, admitted(), state)
        except strategies.StrategyError as exc:  # e.g. every update was rejected
            log.warning("round %d: aggregation failed: %s", action.round, exc)
            new_weights, new_state = None, None
        if new_weights is None or len(accepted) < self.spec.min_members:
            result = AggregateResult(
                None,
                accepted=tuple(accepted),
                rejected=rejected,
                update_bytes=sum(sizes),
                aggregation_seconds=time.perf_counter() - started,
            )
        else:
            model_id = self._remember(self.store.put_model(new_weights), new_weights)
            state_id = self.store.put_model(new_state) if new_state else None
            result = AggregateResult(
                model_id=model_id,
                optimizer_state_id=state_id,
                accepted=tuple(accepted),
                rejected=rejected,
                num_examples=sum(m["numExamples"] for m in metas),
                train_loss=engine.weighted_average(
                    (m["loss"], m["numExamples"]) for m in metas if m.get("loss") is not None
                ),
                train_seconds=max((m.get("seconds", 0.0) for m in metas), default=0.0),
                update_bytes=sum(sizes),
                # From the first read to the new model stored: fetching, checking and
                # aggregating the updates (not the write of aggregate.json below).
                aggregation_seconds=time.perf_counter() - started,
            )
        self.store.put_aggregate(self.run, action.round, result.to_dict())
        log.info(
            "round %d: aggregated %d updates (%d rejected, %d bytes) in %.2f s",
            action.round,
            len(accepted),
            len(rejected),
            result.update_bytes,
            result.aggregation_seconds,
        )
        return result


def _prefetch(
    store: Store, run: str, round_: int, members: tuple[str, ...]
) -> Iterator[tuple[str, Future]]:
    """Yield (member, future of (bytes, meta)), keeping at most PREFETCH fetches ahead."""
    window: deque[tuple[str, Future]] = deque()
    pending = iter(members)
    for member in pending:
        window.append((member, store.submit(store.get_update, run, round_, member)))
        if len(window) > PREFETCH:
            yield window.popleft()
    while window:
        yield window.popleft()


def _member_of(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")
