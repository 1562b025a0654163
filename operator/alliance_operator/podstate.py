"""What a pod's status means for the operator: running, starting, crash-looping or gone.

Pure functions over the pod dict as the API returns it (camelCase).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: Container waiting reasons that mean the container is not coming up by itself soon.
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


class PodHealth(StrEnum):
    ABSENT = "Absent"
    STARTING = "Starting"  # pending, being created, or restarting once
    RUNNING = "Running"  # the container runs and is ready
    STUCK = "Stuck"  # crash-looping, or cannot be created or pulled
    TERMINATING = "Terminating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # evicted, or the container exited and will not restart


@dataclass(frozen=True)
class PodState:
    health: PodHealth
    reason: str = ""
    message: str = ""
    restarts: int = 0
    exit_message: str = ""  # the last termination message (FallbackToLogsOnError: log tail)

    @property
    def lost(self) -> bool:
        """The agent in this pod cannot be counted on for the round in progress."""
        return self.health not in (PodHealth.RUNNING, PodHealth.STARTING)


def pod_state(pod: dict | None) -> PodState:
    if pod is None:
        return PodState(PodHealth.ABSENT, "PodAbsent", "the pod does not exist")
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    restarts = sum(int(c.get("restartCount") or 0) for c in containers)
    exit_message = _last_termination_message(containers)
    common = {"restarts": restarts, "exit_message": exit_message}
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return PodState(PodHealth.TERMINATING, "Terminating", "the pod is being deleted", **common)
    phase = status.get("phase") or "Pending"
    if phase == "Failed":
        reason = status.get("reason") or "Failed"
        message = status.get("message") or exit_message or "the pod failed"
        return PodState(PodHealth.FAILED, reason, message, **common)
    if phase == "Succeeded":
        return PodState(PodHealth.SUCCEEDED, "Completed", "the pod ran to completion", **common)
    for c in containers:
        waiting = (c.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") in STUCK_REASONS:
            message = waiting.get("message") or ""
            if exit_message:
                message = f"{message}; last exit: {exit_message}" if message else exit_message
            return PodState(PodHealth.STUCK, waiting["reason"], message, **common)
    if phase == "Running" and containers and all(c.get("ready") for c in containers):
        return PodState(PodHealth.RUNNING, "Running", "the agent is running", **common)
    reason, message = _pending_reason(status, containers)
    return PodState(PodHealth.STARTING, reason, message, **common)


def _pending_reason(status: dict, containers: list[dict]) -> tuple[str, str]:
    for c in containers:
        waiting = (c.get("state") or {}).get("waiting")
        if waiting:
            return waiting.get("reason") or "Waiting", waiting.get("message") or ""
    for cond in status.get("conditions") or []:
        if cond.get("status") == "False" and cond.get("reason"):
            return cond["reason"], cond.get("message") or ""
    return "Pending", "waiting for the pod to start"


def _last_termination_message(containers: list[dict]) -> str:
    for c in containers:
        for key in ("state", "lastState"):
            terminated = (c.get(key) or {}).get("terminated")
            if terminated and (terminated.get("exitCode") or 0) != 0:
                text = (terminated.get("message") or "").strip()
                code = terminated.get("exitCode")
                tail = text.splitlines()[-1] if text else terminated.get("reason") or ""
                return f"exit code {code}: {tail}" if tail else f"exit code {code}"
    return ""
