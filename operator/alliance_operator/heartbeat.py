"""What a member agent's heartbeat says, as the Member handler reports it: the heartbeat is
member-written (untrusted), so it is read as the coordinator reads it (alliance.untrusted) and
becomes the DataReady condition, bounded.
"""

from __future__ import annotations

from alliance import untrusted

#: Of the data warnings in a heartbeat (member-written, untrusted): the most kept, and the
#: longest each may be (characters).
MAX_DATA_WARNINGS = 5
MAX_WARNING_CHARS = 300


def read(content) -> dict | None:
    """The agent's heartbeat as this handler reads it: member-written, so checked as the
    coordinator checks it (alliance.untrusted); one that is refused reads as invalid data."""
    if content is None:
        return None
    try:
        checked = untrusted.heartbeat(content)
    except untrusted.Rejected as exc:
        return {"state": "invalid", "message": f"the agent's heartbeat is refused: {exc}"}
    beat = {"state": checked.state, "warnings": content.get("warnings")}
    if "message" in content:
        beat["message"] = untrusted.text(content["message"], 4096)
    if "trainRows" in content:
        beat.update(trainRows=checked.train_rows, testRows=checked.test_rows)
    return beat


def data_condition(cond, beat: dict | None) -> None:
    state = (beat or {}).get("state")
    if beat is None:
        cond("DataReady", None, "NoHeartbeat", "the agent has not reported yet")
    elif state == "invalid":
        cond("DataReady", False, "InvalidData", beat.get("message") or "the data is invalid")
    elif state == "ready" or (state == "stopped" and "trainRows" in beat):
        rows = f"{beat.get('trainRows', 0)} training rows, {beat.get('testRows', 0)} test rows"
        warnings = _warnings(beat.get("warnings"))
        if warnings:  # valid data that is likely not what was meant (e.g. one label only)
            label = "warning" if len(warnings) == 1 else "warnings"
            cond("DataReady", True, "ValidWithWarnings", f"{rows}; {label}: {'; '.join(warnings)}")
        else:
            cond("DataReady", True, "Valid", rows)
    else:
        cond("DataReady", None, "Validating", "the agent is validating its data")


def _warnings(value) -> list[str]:
    """The heartbeat's ``warnings`` when it is a list of strings (else none), bounded: at most
    MAX_DATA_WARNINGS, each on one line and cut to MAX_WARNING_CHARS."""
    if not isinstance(value, list):
        return []
    value = value[:MAX_DATA_WARNINGS]
    if not all(isinstance(w, str) for w in value):
        return []
    out = []
    for w in value:
        w = " ".join(w[: 2 * MAX_WARNING_CHARS].split())
        if w:
            out.append(w if len(w) <= MAX_WARNING_CHARS else w[: MAX_WARNING_CHARS - 1] + "…")
    return out
