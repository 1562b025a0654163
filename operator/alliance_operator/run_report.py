"""A TrainingRun's status, written by its daemon: the sink of ``alliance.driver.drive``.

Each step of the run becomes at most one merge patch of the status subresource: the engine's
RunStatus (nulls left out, as the API server drops them), ``storeRun``, the latest validated
accuracy and loss, the conditions StoreReady, Progressing and Completed (and, from the daemon,
AllianceFound and Invalid), an Event for every condition change, round and phase, and the
run's metrics. A change of the progress message alone is written at most once a second.
"""

from __future__ import annotations

import time

import kopf

from alliance.driver import only_progress
from alliance.engine import Phase, RoundRecord, RunSpec, RunStatus
from alliance_operator import k8s, metrics
from alliance_operator.conditions import is_true
from alliance_operator.constants import ALLIANCES, TRAININGRUNS
from alliance_operator.status import StatusUpdate

TERMINAL = (Phase.COMPLETED.value, Phase.FAILED.value)
#: Rounds a TrainingRun's status shows, the newest (the store keeps every round's record:
#: runs/<storeRun>/rounds/NNNNN/record.json), so a long run's object stays far below the API
#: server's size limit.
STATUS_ROUNDS = 10
#: Members listed with their reason per round (rejected, failed) in the status.
STATUS_REASONS = 20
#: How often a run that has not started looks at its Alliance for edits (seconds).
ALLIANCE_CHECK_SECONDS = 2.0


def store_run(body: dict) -> str:
    """The run's name in the store: the resource's name plus its uid's head, so a TrainingRun
    deleted and created again under the same name starts afresh instead of finding the old
    run's rounds."""
    meta = body["metadata"]
    return f"{meta['name']}-{meta['uid'][:8]}"


class RunReport:
    """The TrainingRun's status, as the daemon last wrote it: ``drive``'s sink (``load``,
    ``pinned``, ``save``) and what the daemon says while it waits. Each write is one merge
    patch of the status subresource, with the condition changes as Events."""

    def __init__(self, body: dict):
        self.body = body
        self.written: dict = dict(body.get("status") or {})
        self.requested: RunSpec | None = None
        self._update: StatusUpdate | None = None
        self._written_at = -float("inf")
        self._alliance_checked = time.monotonic()

    # --- what the daemon asks

    @property
    def round(self) -> int:
        return int(self.written.get("round") or 0)

    def settled(self) -> bool:
        """Ended, for this generation, for a reason an Alliance edit cannot change."""
        meta = self.body["metadata"]
        done = (
            self.written.get("phase") in TERMINAL
            and self.written.get("observedGeneration") == meta.get("generation")
            and not is_true(self.written.get("conditions"), "Invalid")  # defaults may be fixed
        )
        if done and not meta.get("deletionTimestamp"):
            metrics.run_seen(meta["namespace"], meta["name"], meta["uid"], self.written)
        return done

    def alliance_changed(self, namespace: str, alliance: dict) -> bool:
        """Must the loop stop to look at the Alliance again: it is gone or being deleted, or
        (before round 1) its spec changed? Looked up at most every ALLIANCE_CHECK_SECONDS."""
        if time.monotonic() - self._alliance_checked < ALLIANCE_CHECK_SECONDS:
            return False
        self._alliance_checked = time.monotonic()
        now = k8s.get_custom(namespace, ALLIANCES, alliance["metadata"]["name"])
        if now is None or now["metadata"].get("deletionTimestamp"):
            return True
        return self.round == 0 and now.get("spec") != alliance.get("spec")

    # --- what the daemon found

    @property
    def _pending(self) -> StatusUpdate:
        """The status this step builds, from the one last written."""
        if self._update is None:
            self._update = StatusUpdate({"metadata": self.body["metadata"], "status": self.written})
        return self._update

    def alliance_found(self, name: str, alliance: dict | None) -> bool:
        """Record whether the run's Alliance is there (and not being deleted)."""
        if alliance is not None and not alliance["metadata"].get("deletionTimestamp"):
            self._pending.set("AllianceFound", True, "Found", f'Alliance "{name}"')
            return True
        reason, why = (
            ("AllianceNotFound", "not found")
            if alliance is None
            else ("AllianceDeleting", "is being deleted")
        )
        paused = f"; the run is paused in round {self.round} until it is back" * (self.round >= 1)
        self._pending.set("AllianceFound", False, reason, f'Alliance "{name}" {why}{paused}')
        self._waiting(f'waiting for Alliance "{name}"{paused}')
        return False

    def spec_valid(self, spec: RunSpec) -> None:
        if self._pending.is_true("Invalid") and self.round == 0:  # fixed before it started: afresh
            self._pending.new = {}
        self._pending.set("Invalid", False, "Valid", "the spec is valid")
        self.requested = spec

    def spec_invalid(self, message: str) -> bool:
        """Record an invalid spec. Before round 1 it fails the run (False: wait for a fix);
        once started the run goes on with its pinned spec (True)."""
        self.requested = None
        if self.round >= 1:
            message += "; ignored: the run keeps its first spec"
            self._pending.set("Invalid", True, "InvalidSpec", message)
            return True
        self._pending.set("Invalid", True, "InvalidSpec", message)
        self._pending.new.update(phase=Phase.FAILED.value, message=message)
        self._write()
        return False

    def store_down(self, exc: Exception) -> None:
        """The store cannot be used (StoreUnavailable has its own reason)."""
        reason = getattr(exc, "reason", "StoreUnreachable")
        self._pending.set("StoreReady", False, reason, str(exc))
        unavailable = "unavailable" if hasattr(exc, "reason") else "unreachable"
        self._waiting(f"store {unavailable}: {exc}")

    def _waiting(self, message: str) -> None:
        self._pending.new.setdefault("phase", Phase.PENDING.value)
        self._pending.new["message"] = message
        self._write()

    # --- drive's sink

    def load(self) -> RunStatus | None:
        new = self._update.new if self._update is not None else self.written
        return RunStatus.from_dict(new) if new.get("phase") else None

    def pinned(self, spec: RunSpec) -> None:
        meta = self.body["metadata"]
        edited = self.written.get("observedGeneration") != meta.get("generation")
        if edited and self.requested is not None and spec != self.requested:
            kopf.warn(
                self.body,
                reason="SpecChangeIgnored",
                message="the run keeps the spec it started with; edit a new TrainingRun",
            )

    def save(self, old: RunStatus, status: RunStatus) -> None:
        update, self._update = self._pending, None
        meta = self.body["metadata"]
        new, cond = update.new, update.set
        cond("StoreReady", True, "Connected", f"run objects under runs/{store_run(self.body)}/")
        # The API server drops nulls inside status (none of these fields is nullable): leave them
        # out here too, or every step would see a change. (A None at the top level stays: the
        # merge patch deletes that key.)
        new.update({k: _without_nulls(v) for k, v in status.to_dict().items()})
        new["history"] = [_shortened(r) for r in new["history"][-STATUS_ROUNDS:]]
        new["storeRun"] = store_run(self.body)
        validated = [r for r in status.history if r.accuracy is not None]
        if validated:
            new["accuracy"] = round(validated[-1].accuracy, 6)
            if validated[-1].loss is not None:
                new["loss"] = round(validated[-1].loss, 6)
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
        # A change of the progress message alone (one more member answered) is written at
        # most once a second: it carries nothing a resume needs.
        progress_only = only_progress(old.to_dict(), status.to_dict()) and self.written.get("phase")
        if progress_only and time.monotonic() - self._written_at < 1.0:
            self._update = update  # written with the next step
            return
        counted = not meta.get("deletionTimestamp")
        _round_events(self.body, self.written, status)
        if counted:
            aggregated, finished = new_rounds(self.written, status)
            for record in aggregated:
                metrics.round_aggregated(meta["namespace"], meta["name"], meta["uid"], record)
            for record in finished:
                metrics.round_finished(meta["namespace"], meta["name"], meta["uid"], record)
        self._update = update
        self._write()
        if counted:
            metrics.run_seen(meta["namespace"], meta["name"], meta["uid"], self.written)

    def _write(self) -> None:
        update, self._update = self._update, None
        patch = update.patch()
        if patch:
            meta = self.body["metadata"]
            k8s.patch_custom_status(meta["namespace"], TRAININGRUNS, meta["name"], patch)
            self._written_at = time.monotonic()
        self.written = update.new


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _shortened(record: dict) -> dict:
    """A round for the status: at most STATUS_REASONS members per reason map, and a count of
    the rest (all of them are in the round's record in the store)."""
    for key in ("rejected", "failed"):
        reasons = record.get(key) or {}
        if len(reasons) > STATUS_REASONS:
            kept = dict(sorted(reasons.items())[:STATUS_REASONS])
            kept["..."] = f"{len(reasons) - STATUS_REASONS} more in the round's record.json"
            record[key] = kept
    return record


def new_rounds(old: dict, status: RunStatus) -> tuple[list[RoundRecord], list[RoundRecord]]:
    """The rounds aggregated and the rounds finished since the status ``old``: what an
    earlier process recorded is not news, so Events and metrics count each round once,
    whichever operator process ran it. (Rounds go in order, and the status keeps the newest.)"""
    history = old.get("history") or ()
    aggregated = max((r["round"] for r in history if r.get("aggregatedAt")), default=0)
    finished = max((r["round"] for r in history if r.get("finishedAt")), default=0)
    return (
        [r for r in status.history if r.aggregated_at and r.round > aggregated],
        [r for r in status.history if r.finished_at and r.round > finished],
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
        if r.rejected:  # a member's update or score refused: someone should look (kopf cuts it)
            kopf.warn(
                body,
                reason="ResultsRejected",
                message=f"round {r.round}: "
                + "; ".join(f"{m}: {why}" for m, why in sorted(r.rejected.items())),
            )
    if old.get("phase") != status.phase:
        if status.phase == Phase.COMPLETED:
            kopf.info(body, reason="Completed", message=status.message or "all rounds done")
        elif status.phase == Phase.FAILED:
            kopf.warn(body, reason="Failed", message=status.message or "the run failed")
        elif status.phase == Phase.RUNNING:
            kopf.info(body, reason="Started", message="round 1 started")
