"""Which members the runs should count as lost, as the Member handler sees them.

The Member handler looks at every member's agent pod (every few seconds) and sees its
state here, and each TrainingRun's daemon asks for its alliance's lost members on every step
of its loop. A member is lost when its pod has failed, is stuck (e.g. CrashLoopBackOff), is
being deleted or is gone (``PodState.lost``); it is found again when its pod runs. (A deleted
Member leaves kopf's index of the alliance's members, main.py, which the runs read too.)
The heartbeats in the store say the rest (a stopped or silent agent), so nothing is lost
when this is empty, as after a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class MemberLosses:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (namespace, member) -> (alliance, lost)
        self._seen: dict[tuple[str, str], tuple[str, bool]] = {}

    def observe(self, namespace: str, member: str, alliance: str, lost: bool) -> None:
        with self._lock:
            self._seen[(namespace, member)] = (alliance, lost)

    def forget(self, namespace: str, member: str) -> None:
        with self._lock:
            self._seen.pop((namespace, member), None)

    def lost(self, namespace: str, alliance: str) -> set[str]:
        with self._lock:
            return {
                member
                for (ns, member), (of, lost) in self._seen.items()
                if lost and ns == namespace and of == alliance
            }

    def of(self, namespace: str, alliance: str) -> Callable[[], set[str]]:
        """What a run of this alliance passes to drive as ``lost``."""
        return lambda: self.lost(namespace, alliance)
