"""A resource's status as a handler writes it: conditions, the merge patch, condition Events."""

from __future__ import annotations

import kopf

from alliance_operator.conditions import is_true, now_rfc3339, set_condition


class StatusUpdate:
    """The status one pass computes: it starts as the stored status; the pass sets conditions
    and fields; ``patch()`` reports the condition changes as Events and returns the merge patch
    (empty when nothing changed). One clock reading per pass, so its conditions agree."""

    def __init__(self, body: dict):
        self.body = body
        self.generation = body["metadata"].get("generation")
        self.old = body.get("status") or {}
        self.new = dict(self.old)
        self.conditions: list[dict] = list(self.old.get("conditions") or [])
        self.now = now_rfc3339()

    def set(self, type_: str, ok: bool | None, reason: str, message: str) -> None:
        self.conditions = set_condition(
            self.conditions, type_, ok, reason, message, self.generation, self.now
        )

    def drop(self, type_: str) -> None:
        """Remove a condition that no longer applies (a Member that became remote has no pod)."""
        self.conditions = [c for c in self.conditions if c["type"] != type_]

    def get(self, type_: str) -> dict:
        return next((c for c in self.conditions if c["type"] == type_), {})

    def is_true(self, type_: str) -> bool:
        return is_true(self.conditions, type_)

    def patch(self) -> dict:
        self.new["conditions"] = self.conditions
        self.new["observedGeneration"] = self.generation
        report_transitions(self.body, self.old.get("conditions"), self.conditions)
        return changed(self.old, self.new)


def changed(old: dict, new: dict) -> dict:
    """The merge patch from ``old`` to ``new`` status: changed keys, and None (delete) for
    keys that are gone."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


#: Reasons of a False or Unknown condition that are normal progress (a pod being created, an
#: agent validating its data), not trouble: their Events are Normal, not Warnings.
PROGRESS_REASONS = frozenset(
    {
        "Initializing",
        "WaitingForStore",
        "PodAbsent",
        "Pending",
        "ContainerCreating",
        "PodInitializing",
        "Terminating",
        "NoHeartbeat",
        "Validating",
        "Valid",
        "Running",
    }
)
#: Summaries of other conditions, or news the run's own Events (Started, RoundCompleted,
#: Completed, Failed) already tell.
SILENT_TYPES = frozenset({"Ready", "Progressing", "Completed"})
#: Conditions whose True is the trouble.
TRUE_IS_BAD = frozenset({"Invalid"})


def report_transitions(body: dict, old: list[dict] | None, new: list[dict]) -> None:
    """An Event for every condition that changed status or reason: a Warning when it now
    reports trouble, Normal otherwise."""
    before = {c["type"]: c for c in old or ()}
    for cond in new:
        prev = before.get(cond["type"])
        if prev and (prev["status"], prev["reason"]) == (cond["status"], cond["reason"]):
            continue
        if prev is None and cond["status"] == "Unknown":
            continue  # nothing learned yet
        if cond["type"] in SILENT_TYPES:
            continue
        bad = (
            cond["status"] == "True"
            if cond["type"] in TRUE_IS_BAD
            else (cond["status"] == "False" and cond["reason"] not in PROGRESS_REASONS)
        )
        kopf.event(
            body,
            type="Warning" if bad else "Normal",
            reason=cond["reason"],
            message=f"{cond['type']}={cond['status']}: {cond['message']}"[:1024],
        )
