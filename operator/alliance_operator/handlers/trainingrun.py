"""TrainingRun: drive the engine's rounds and mirror them in the resource's status.

Each pass rebuilds what it needs from the TrainingRun's status and the store (the engine is
level-based), so a restarted operator resumes at the same round: an action the previous
process carried out but did not record is idempotent and is simply taken again.

Status: the engine's RunStatus (phase, round, stage, history of per-round metrics, model ids)
plus accuracy/loss of the latest validated model, ``storeRun`` (the run's key in the store) and
the conditions Invalid, AllianceFound, StoreReady, Progressing and Completed.
"""

from __future__ import annotations

import time

import kopf

from alliance.coordinator import Coordinator, pin_spec
from alliance.engine import Phase, RoundRecord, RunSpec, RunStatus, SpecError
from alliance.store import StoreError, run_key
from alliance_operator import k8s, metrics
from alliance_operator.conditions import is_true
from alliance_operator.constants import (
    ALLIANCES,
    LABEL_ALLIANCE,
    LABEL_COMPONENT,
    MEMBERS,
    TRAININGRUNS,
)
from alliance_operator.handlers.common import Context, StatusUpdate
from alliance_operator.podstate import pod_state
from alliance_operator.resources.pods import member_pod_name, short_name
from alliance_operator.stores import StoreUnavailable

#: The TrainingRun spec fields that are the engine's RunSpec (the rest are the operator's).
RUN_FIELDS = tuple(RunSpec().to_dict())
TERMINAL = (Phase.COMPLETED.value, Phase.FAILED.value)


def store_run(body: dict) -> str:
    """The run's name in the store: the resource's name plus its uid's head, so a TrainingRun
    deleted and created again under the same name starts afresh instead of finding the old
    run's rounds."""
    meta = body["metadata"]
    return f"{meta['name']}-{meta['uid'][:8]}"


def effective_spec(spec: dict, run_defaults: dict | None) -> dict:
    """The run's own fields, else the Alliance's runDefaults; the engine fills the rest.

    The default aggregatorParams belong to the default aggregator: a run that picks another
    aggregator does not inherit them.
    """
    merged = {k: v for k, v in (run_defaults or {}).items() if k in RUN_FIELDS}
    own = {k: v for k, v in spec.items() if k in RUN_FIELDS and v is not None}
    if own.get("aggregator", merged.get("aggregator")) != merged.get("aggregator"):
        merged.pop("aggregatorParams", None)
    merged.update(own)
    return merged


def reconcile(ctx: Context, body: dict, logger) -> dict:
    meta = body["metadata"]
    namespace, generation = meta["namespace"], meta.get("generation")
    spec = body["spec"]
    old = body.get("status") or {}
    if (
        old.get("phase") in TERMINAL
        and old.get("observedGeneration") == generation
        and not is_true(old.get("conditions"), "Invalid")  # runDefaults may be fixed since
    ):
        if not meta.get("deletionTimestamp"):
            metrics.run_seen(namespace, meta["name"], meta["uid"], old)
        return {}
    # The body kopf hands over may predate the status patch of the previous tick (it follows
    # the watch stream); the engine must start from the status last written, so read it.
    fresh = k8s.get_custom(namespace, TRAININGRUNS, meta["name"])
    if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
        return {}
    body, spec, generation = fresh, fresh["spec"], fresh["metadata"].get("generation")
    # Being deleted: the clean-up handler removes the run's metrics; this pass adds none.
    counted = not fresh["metadata"].get("deletionTimestamp")
    status_update = StatusUpdate(body)
    old, new, cond = status_update.old, status_update.new, status_update.set

    def finish() -> dict:
        if counted:
            metrics.run_seen(namespace, meta["name"], meta["uid"], new)
        return status_update.patch()

    alliance = k8s.get_custom(namespace, ALLIANCES, spec["alliance"])
    if alliance is None:
        cond("AllianceFound", False, "AllianceNotFound", f'Alliance "{spec["alliance"]}" not found')
        new.setdefault("phase", Phase.PENDING.value)
        new["message"] = f'waiting for Alliance "{spec["alliance"]}"'
        return finish()
    cond("AllianceFound", True, "Found", f'Alliance "{spec["alliance"]}"')

    defaults = alliance["spec"].get("runDefaults")
    # From round 1 on, the spec is pinned in the store: edits no longer apply.
    started = int(old.get("round") or 0) >= 1
    try:
        run_spec = RunSpec.from_dict(effective_spec(spec, defaults))
    except SpecError as exc:
        message = str(exc)
        if exc.field not in spec and exc.field in (defaults or {}):
            message += f' (from Alliance "{spec["alliance"]}" spec.runDefaults)'
        if not started:
            cond("Invalid", True, "InvalidSpec", message)
            new.update(phase=Phase.FAILED.value, message=message)
            return finish()
        cond("Invalid", True, "InvalidSpec", f"{message}; ignored: the run keeps its first spec")
        run_spec = None
    else:
        if status_update.is_true("Invalid") and not started:
            new.clear()  # fixed before it started: start afresh
        cond("Invalid", False, "Valid", "the spec is valid")

    try:
        store = ctx.stores.for_alliance(namespace, alliance)
        coordinator = _coordinator(ctx, body, store, run_spec, started)
        edited = old.get("observedGeneration") != generation
        if edited and run_spec is not None and coordinator.spec != run_spec:
            kopf.warn(
                body,
                reason="SpecChangeIgnored",
                message="the run keeps the spec it started with; edit a new TrainingRun",
            )
        members = _member_pods(namespace, spec["alliance"])
        coordinator.lost_members = lambda: {m for m, state in members.items() if state.lost}
        status = _until_next_step(coordinator, RunStatus.from_dict(new), ctx.config.run_interval)
    except StoreUnavailable as exc:
        cond("StoreReady", False, exc.reason, exc.message)
        new.setdefault("phase", Phase.PENDING.value)
        new["message"] = f"store unavailable: {exc.message}"
        return finish()
    except StoreError as exc:
        cond("StoreReady", False, "StoreUnreachable", str(exc))
        new.setdefault("phase", Phase.PENDING.value)
        new["message"] = f"store unreachable: {exc}"
        return finish()
    cond("StoreReady", True, "Connected", f"run objects under runs/{store_run(body)}/")

    # The API server drops nulls inside status (none of these fields is nullable): leave them
    # out here too, or every pass would see a change and write the status again.
    # (A None at the top level stays: the merge patch deletes that key.)
    new.update({k: _without_nulls(v) for k, v in status.to_dict().items()})
    new["storeRun"] = store_run(body)
    validated = [r for r in status.history if r.accuracy is not None]
    if validated:
        new["accuracy"] = round(validated[-1].accuracy, 6)
        if validated[-1].loss is not None:
            new["loss"] = round(validated[-1].loss, 6)
    _round_events(body, old, status)
    if counted:
        aggregated, finished = new_rounds(old, status)
        for record in aggregated:
            metrics.round_aggregated(namespace, meta["name"], meta["uid"], record)
        for record in finished:
            metrics.round_finished(namespace, meta["name"], meta["uid"], record)
    running = status.phase == Phase.RUNNING
    cond(
        "Progressing",
        running,
        "RoundInProgress" if running else str(status.phase),
        status.message or str(status.phase),
    )
    done = status.phase == Phase.COMPLETED
    cond(
        "Completed",
        done,
        "AllRoundsDone" if done else str(status.phase),
        status.message if done or status.phase == Phase.FAILED else "not finished",
    )
    if status.phase in (Phase.COMPLETED, Phase.FAILED):
        with ctx.lock:
            ctx.coordinators.pop(meta["uid"], None)
    return finish()


#: How often a pass looks at the store while it waits for the round's next step.
STORE_POLL_SECONDS = 0.1


def _until_next_step(coordinator: Coordinator, status: RunStatus, window: float) -> RunStatus:
    """Reconcile, and while the run waits for its members, keep looking at the store for up to
    ``window`` seconds: the pass ends as soon as the run takes a step (a stage, round or phase
    change), so a round moves on ~0.1 s after its last result lands instead of at the next
    pass. The Kubernetes reads (the run, its Alliance, Members and pods) stay one per pass."""
    deadline = time.monotonic() + window
    step = (status.phase, status.round, status.stage)
    status = coordinator.reconcile(status)
    while (
        status.phase in (Phase.PENDING, Phase.RUNNING)
        and (status.phase, status.round, status.stage) == step
        and time.monotonic() + STORE_POLL_SECONDS < deadline
    ):
        time.sleep(STORE_POLL_SECONDS)
        status = coordinator.reconcile(status)
    return status


def _coordinator(
    ctx: Context, body: dict, store, run_spec: RunSpec | None, started: bool
) -> Coordinator:
    """The run's coordinator. Until round 1 starts it follows the spec as edited; from then on
    it keeps the spec pinned in the store (``run_spec`` None: the edited spec is invalid)."""
    uid = body["metadata"]["uid"]
    with ctx.lock:
        cached = ctx.coordinators.get(uid)
    if cached is not None and cached.store is store and (started or cached.spec == run_spec):
        return cached
    run = store_run(body)
    if not started:
        store.put_json(run_key(run, "spec.json"), run_spec.to_dict())
    elif run_spec is None:
        saved = store.get_json(run_key(run, "spec.json"))
        if saved is None:
            raise StoreError(f"runs/{run}/spec.json is missing from the store")
        run_spec = RunSpec.from_dict(saved)
    else:
        run_spec = pin_spec(store, run, run_spec)
    coordinator = Coordinator(store, run, run_spec, heartbeat_timeout=ctx.config.heartbeat_timeout)
    with ctx.lock:
        ctx.coordinators[uid] = coordinator
    return coordinator


def _member_pods(namespace: str, alliance: str) -> dict:
    """Each Member of the alliance in this namespace → its agent pod's state."""
    members = [
        m["metadata"]["name"]
        for m in k8s.list_custom(namespace, MEMBERS)
        if (m.get("spec") or {}).get("alliance") == alliance
    ]
    selector = f"{LABEL_ALLIANCE}={short_name(alliance)},{LABEL_COMPONENT}=member"
    pods = {p["metadata"]["name"]: p for p in k8s.list_pods(namespace, selector)}
    return {m: pod_state(pods.get(member_pod_name(m))) for m in members}


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def new_rounds(old: dict, status: RunStatus) -> tuple[list[RoundRecord], list[RoundRecord]]:
    """The rounds aggregated and the rounds finished in this pass: in the new status, not in
    the status read at its start. What an earlier process recorded is not news, so Events and
    metrics count each round once, whichever operator process ran it."""
    history = old.get("history") or ()
    aggregated_before = {r["round"] for r in history if r.get("aggregatedAt")}
    finished_before = {r["round"] for r in history if r.get("finishedAt")}
    return (
        [r for r in status.history if r.aggregated_at and r.round not in aggregated_before],
        [r for r in status.history if r.finished_at and r.round not in finished_before],
    )


def _round_events(body: dict, old: dict, status: RunStatus) -> None:
    for r in new_rounds(old, status)[1]:
        accuracy = "n/a" if r.accuracy is None else f"{r.accuracy:.4f}"
        kopf.info(
            body,
            reason="RoundCompleted",
            message=f"round {r.round}: accuracy {accuracy}, {len(r.members)} members, "
            f"{len(r.dropped)} dropped, {r.seconds:.1f} s",
        )
    if old.get("phase") != status.phase:
        if status.phase == Phase.COMPLETED:
            kopf.info(body, reason="Completed", message=status.message or "all rounds done")
        elif status.phase == Phase.FAILED:
            kopf.warn(body, reason="Failed", message=status.message or "the run failed")
        elif status.phase == Phase.RUNNING:
            kopf.info(body, reason="Started", message="round 1 started")


def cleanup(ctx: Context, body: dict, logger) -> None:
    """On deletion: withdraw the run's task; with storeCleanupPolicy Delete, remove its
    objects from the store too (models are content-addressed and shared: they stay)."""
    meta, spec = body["metadata"], body["spec"]
    metrics.forget_run(meta["namespace"], meta["name"], meta["uid"])
    alliance = k8s.get_custom(meta["namespace"], ALLIANCES, spec["alliance"])
    if alliance is None:
        logger.warning("Alliance %s is gone: nothing to clean in its store", spec["alliance"])
        return
    with ctx.lock:
        ctx.coordinators.pop(meta["uid"], None)
    run = store_run(body)
    try:
        store = ctx.stores.for_alliance(meta["namespace"], alliance)
        store.delete_task(run)
        if spec.get("storeCleanupPolicy") == "Delete":
            removed = store.delete_prefix(run_key(run, ""))
            logger.info("deleted %d objects under runs/%s/", removed, run)
    except (StoreUnavailable, StoreError) as exc:
        raise kopf.TemporaryError(f"cannot clean up the store: {exc}", delay=10) from exc
