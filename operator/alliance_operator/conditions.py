"""Status conditions in the shape of metav1.Condition, computed without reading a clock."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime


def now_rfc3339(ts: float | None = None) -> str:
    moment = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


#: metav1.Condition's limit on a message (characters).
MAX_MESSAGE = 32768


def set_condition(
    conditions: Iterable[dict] | None,
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict]:
    """A new list with ``type_`` set; lastTransitionTime moves only when the status changes.

    ``status`` True/False/None stands for "True"/"False"/"Unknown".
    """
    value = {True: "True", False: "False", None: "Unknown"}[status]
    out = [dict(c) for c in conditions or ()]
    old = next((c for c in out if c.get("type") == type_), None)
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…",
        "lastTransitionTime": (
            old["lastTransitionTime"] if old and old.get("status") == value else now
        ),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    if old is None:
        out.append(new)
    else:
        out[out.index(old)] = new
    return out


def get_condition(conditions: Iterable[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Iterable[dict] | None, type_: str) -> bool:
    found = get_condition(conditions, type_)
    return bool(found) and found.get("status") == "True"
