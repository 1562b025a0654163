"""Aggregation strategies: how a round's member updates become the next global weights.

Pick one by name (``create("fedavg")``) with parameters as written in the YAML spec.
numpy only: importable by the coordinator without TensorFlow.
"""

from __future__ import annotations

from typing import Any

from .base import Strategy, StrategyError, Update
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedopt import FedAdagrad, FedAdam, FedYogi
from .robust import Median, TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean)
}


def create(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """The strategy registered as ``name`` (case-insensitive), built with ``params``."""
    cls = STRATEGIES.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise StrategyError(
            f"unknown strategy {name!r}; known strategies: {', '.join(sorted(STRATEGIES))}"
        )
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise StrategyError(f"{cls.name}: parameters must be a mapping, got {params!r}")
    bad = [k for k in params if not isinstance(k, str)]
    if bad:
        raise StrategyError(f"{cls.name}: parameter names must be strings, got {bad[0]!r}")
    return cls(**params)


__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Median",
    "Strategy",
    "StrategyError",
    "TrimmedMean",
    "Update",
    "create",
]
