"""TrainingRun: a daemon per run drives it with the engine's one loop and mirrors it in status.

    daemon ── Alliance found? spec valid? store reachable? ── no ──► status says why; look again
       │
       └── yes ──► alliance.driver.drive(store, storeRun, spec, RunReport, stopped, lost)
                      RunReport.save: RunStatus → .status, conditions, Events, metrics (1 patch)

The daemon starts from the status it last wrote (a restarted operator: the stored one). Until
round 1 an edit of the run or its Alliance restarts the loop; from round 1 on the spec is pinned
in the store. A run whose Alliance is deleted pauses (AllianceFound=False) until it is back.
"""

from __future__ import annotations

import kopf

from alliance.driver import FINISHED, drive
from alliance.engine import SpecError
from alliance.store import StoreError, run_key
from alliance_operator import k8s, metrics
from alliance_operator.constants import ALLIANCES
from alliance_operator.context import Context
from alliance_operator.run_report import RunReport, store_run
from alliance_operator.runspec import requested_spec
from alliance_operator.stores import StoreUnavailable

#: How soon a run that waits for its Alliance, its store or a fixed spec looks again (seconds).
RETRY_SECONDS = 2.0


def daemon(ctx: Context, body: dict, stopped, logger, alliance_members: kopf.Index) -> None:
    """Run the TrainingRun until it ends or is deleted. ``body``: kopf's live view of the object;
    ``stopped``: kopf's stop flag; ``alliance_members``: Member names by (namespace, alliance)."""
    report = RunReport(body)
    while not stopped and not report.settled():
        if attempt(ctx, body, report, stopped, alliance_members):
            return
        stopped.wait(RETRY_SECONDS)


def attempt(ctx: Context, body: dict, report: RunReport, stopped, alliance_members) -> bool:
    """Prepare the run and drive it; True once it has ended. False when it has to wait (for
    its Alliance, its store, a fixed spec) or when an edit before round 1 restarts it."""
    meta, spec = body["metadata"], body["spec"]
    namespace, generation = meta["namespace"], meta.get("generation")
    alliance = k8s.get_custom(namespace, ALLIANCES, spec["alliance"])
    if not report.alliance_found(spec["alliance"], alliance):
        return False
    try:
        run_spec = requested_spec(spec, alliance)
    except SpecError as exc:
        if not report.spec_invalid(str(exc)):
            return False
        run_spec = None  # started: the run keeps its pinned spec
    else:
        report.spec_valid(run_spec)

    def restart_or_stop(seconds: float) -> bool:
        """drive's stop flag: the daemon is stopped, or an edit must restart the loop."""
        if stopped.wait(seconds) or meta.get("generation") != generation:
            return True  # after round 1 an edit is reported (SpecChangeIgnored) and ignored
        return report.alliance_changed(namespace, alliance)

    try:
        status = drive(
            ctx.stores.for_alliance(namespace, alliance),
            store_run(body),
            run_spec,
            report,
            restart_or_stop,
            lost=ctx.losses.of(namespace, spec["alliance"]),
            members=lambda: alliance_members.get((namespace, spec["alliance"]), ()),
            poll_seconds=ctx.config.run_interval,
            heartbeat_timeout=ctx.config.heartbeat_timeout,
        )
    except (StoreUnavailable, StoreError) as exc:
        report.store_down(exc)
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
