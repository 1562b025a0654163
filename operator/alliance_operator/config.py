"""The operator's settings: environment variables with one prefix, read once at start.

Every setting has a safe default except the member image, which a deployment should pin
(the Helm chart does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from alliance import __version__

PREFIX = "ALLIANCE_OPERATOR_"


@dataclass(frozen=True)
class OperatorConfig:
    #: The member agent's image, for Members and Alliances that name none.
    member_image: str = f"alliance-member:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    #: The uid/gid member pods run as (non-root).
    run_as_user: int = 10001
    #: A member whose heartbeat is older than this counts as lost (seconds).
    heartbeat_timeout: float = 60.0
    #: How often a TrainingRun's daemon looks at the store while the run waits for its members
    #: (the embedded runner's pace, alliance.driver.POLL_SECONDS), and how often a Member and
    #: an Alliance are reconciled (seconds).
    run_interval: float = 0.05
    member_interval: float = 3.0
    alliance_interval: float = 10.0
    #: How long one store call may retry before the reconcile gives up until the next tick.
    store_retry_seconds: float = 5.0
    #: Serve Prometheus metrics (alliance_operator.metrics) on this port; 0: not served.
    metrics_port: int = 9090

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls, f.name))
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(
                    f"{PREFIX}{f.name.upper()}: not a {kind.__name__}: {raw!r}"
                ) from exc
        config = cls(**values)
        if not 0 <= config.metrics_port <= 65535:
            raise ValueError(f"{PREFIX}METRICS_PORT: 0 (off) or a port number up to 65535")
        if config.run_as_user <= 0:
            raise ValueError(f"{PREFIX}RUN_AS_USER: member pods run as non-root: use a uid > 0")
        positive = (
            "heartbeat_timeout",
            "run_interval",
            "member_interval",
            "alliance_interval",
            "store_retry_seconds",
        )
        for name in positive:
            if getattr(config, name) <= 0:
                raise ValueError(f"{PREFIX}{name.upper()}: must be positive")
        return config
