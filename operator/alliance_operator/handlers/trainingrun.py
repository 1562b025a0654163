"""TrainingRun: a daemon per run drives it with the engine's one loop and mirrors it in status.

    daemon ── Alliance found? spec valid? store reachable? ── no ──► status says why; look again
       │
       └── yes ──► alliance.driver.drive(store, storeRun, spec, RunReport, stopped, lost)
                      RunReport.save: RunStatus → .status, conditions, Events, metrics (1 patch)

The daemon keeps the status it wrote in memory, so it never starts from a body older than its
own last patch; a restarted operator starts each daemon from the stored status, and the engine
resumes at the same round (an action taken but not recorded is idempotent). Until round 1
starts, edits of the run (a new generation) or of its Alliance apply: the daemon starts the
loop again with them; from round 1 on the run keeps the spec pinned in the store.

Status: the engine's RunStatus plus accuracy/loss of the latest validated model, ``storeRun``
(the run's key in the store) and the conditions Invalid, AllianceFound, StoreReady, Progressing
and Completed.
"""

from __future__ import annotations

import kopf

from alliance.driver import FINISHED, drive
from alliance.engine import RunSpec, SpecError
from alliance.store import StoreError, run_key
from alliance_operator import k8s, metrics
from alliance_operator.constants import ALLIANCES
from alliance_operator.context import Context
from alliance_operator.run_report import RunReport, store_run
from alliance_operator.stores import StoreUnavailable

#: The TrainingRun spec fields that are the engine's RunSpec (the rest are the operator's).
RUN_FIELDS = tuple(RunSpec().to_dict())
#: How soon a run that waits for its Alliance, its store or a fixed spec looks again (seconds).
RETRY_SECONDS = 2.0


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


def daemon(ctx: Context, body: dict, stopped, logger) -> None:
    """Run the TrainingRun until it ends or is deleted. ``body`` is kopf's live view of the
    object; ``stopped`` is kopf's stop flag (``stopped.wait(seconds)``)."""
    report = RunReport(body)
    while not stopped:
        if report.settled():
            return
        if attempt(ctx, body, report, stopped):
            return
        stopped.wait(RETRY_SECONDS)


def attempt(ctx: Context, body: dict, report: RunReport, stopped) -> bool:
    """Prepare the run and drive it; True once it has ended. Returns False when it has to wait
    (for its Alliance, its store, a fixed spec) or when an edit before round 1 restarts it."""
    meta, spec = body["metadata"], body["spec"]
    namespace, generation = meta["namespace"], meta.get("generation")
    report.begin()
    alliance = k8s.get_custom(namespace, ALLIANCES, spec["alliance"])
    if alliance is None:
        report.set(
            "AllianceFound", False, "AllianceNotFound", f'Alliance "{spec["alliance"]}" not found'
        )
        report.waiting(f'waiting for Alliance "{spec["alliance"]}"')
        return False
    report.set("AllianceFound", True, "Found", f'Alliance "{spec["alliance"]}"')

    defaults = alliance["spec"].get("runDefaults")
    started = report.round >= 1
    try:
        run_spec = RunSpec.from_dict(effective_spec(spec, defaults))
    except SpecError as exc:
        message = str(exc)
        if exc.field not in spec and exc.field in (defaults or {}):
            message += f' (from Alliance "{spec["alliance"]}" spec.runDefaults)'
        if not started:
            report.invalid(message)
            return False
        report.set(
            "Invalid", True, "InvalidSpec", f"{message}; ignored: the run keeps its first spec"
        )
        run_spec = None
    else:
        if report.is_true("Invalid") and not started:
            report.restart()  # fixed before it started: start afresh
        report.set("Invalid", False, "Valid", "the spec is valid")
    report.requested = run_spec

    def restart_or_stop(seconds: float) -> bool:
        """drive's stop flag: the daemon is stopped, or an edit must restart the loop."""
        if stopped.wait(seconds):
            return True
        if meta.get("generation") != generation:
            return True  # before round 1 the edit applies; after, it is reported and ignored
        return report.round == 0 and report.alliance_changed(namespace, alliance)

    try:
        store = ctx.stores.for_alliance(namespace, alliance)
        status = drive(
            store,
            store_run(body),
            run_spec,
            report,
            restart_or_stop,
            lost=ctx.losses.of(namespace, spec["alliance"]),
            poll_seconds=ctx.config.run_interval,
            heartbeat_timeout=ctx.config.heartbeat_timeout,
        )
    except StoreUnavailable as exc:
        report.store_down(exc.reason, exc.message, f"store unavailable: {exc.message}")
        return False
    except StoreError as exc:
        report.store_down("StoreUnreachable", str(exc), f"store unreachable: {exc}")
        return False
    return status.phase in FINISHED


def cleanup(ctx: Context, body: dict, logger) -> None:
    """On deletion: withdraw the run's task; with storeCleanupPolicy Delete, remove its
    objects from the store too (models are content-addressed and shared: they stay)."""
    meta, spec = body["metadata"], body["spec"]
    metrics.forget_run(meta["namespace"], meta["name"], meta["uid"])
    alliance = k8s.get_custom(meta["namespace"], ALLIANCES, spec["alliance"])
    if alliance is None:
        logger.warning("Alliance %s is gone: nothing to clean in its store", spec["alliance"])
        return
    run = store_run(body)
    try:
        store = ctx.stores.for_alliance(meta["namespace"], alliance)
        store.delete_task(run)
        if spec.get("storeCleanupPolicy") == "Delete":
            removed = store.delete_prefix(run_key(run, ""))
            logger.info("deleted %d objects under runs/%s/", removed, run)
    except (StoreUnavailable, StoreError) as exc:
        raise kopf.TemporaryError(f"cannot clean up the store: {exc}", delay=10) from exc
