"""What every aggregation strategy shares: the update record, the error, the base class.

A strategy turns the members' updates of one round into the next global weights. It sees
updates through :class:`Update`, whose ``load`` fetches the weights only when called, so a
strategy decides how many updates it holds in memory at once.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from alliance import weights


@dataclass
class Update:
    """One member's contribution: its full weights after local training, and how many
    examples it trained on. ``load`` reads the weights (from the object store); call it at
    most once per update."""

    member: str
    num_examples: int
    load: Callable[[], list[np.ndarray]]


class StrategyError(ValueError):
    """A strategy cannot run as asked: bad parameters, bad state, or nothing to aggregate."""


def load_update(update: Update, reference: list[np.ndarray]) -> list[np.ndarray]:
    """Call ``update.load()`` and check the arrays fit the model shaped like ``reference``.
    Their values are the caller's to check (the coordinator admits only finite updates)."""
    arrays = list(update.load())
    problem = weights.mismatch(arrays, reference)
    if problem is not None:
        raise StrategyError(f"update from {update.member!r} {problem}")
    return arrays


def check_num_examples(update: Update) -> int:
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise StrategyError(
            f"update from {update.member!r}: num_examples must be an integer >= 0, got {n!r}"
        )
    return int(n)


class Strategy(ABC):
    """Base class: validates parameters declared in ``params`` and exposes them in ``values``.

    ``params`` maps each parameter's name, camelCase as users write it in YAML, to
    ``(type, default)``. Subclasses check ranges in :meth:`_check`.
    """

    name: ClassVar[str]
    params: ClassVar[dict[str, tuple[type, Any]]] = {}
    stateful: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        for key in params:
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise StrategyError(
                    f"{self.name}: unknown parameter {key!r}; known parameters: {known}"
                )
        self.values: dict[str, Any] = {
            key: self._coerce(key, typ, params.get(key, default))
            for key, (typ, default) in self.params.items()
        }
        self._check()

    def _check(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Raise StrategyError (via :meth:`_require`) if a value is out of range."""

    def _require(self, key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise StrategyError(
                f"{self.name}: parameter {key!r} must be {expected}, got {self.values[key]!r}"
            )

    def _coerce(self, key: str, typ: type, value: Any) -> Any:
        if typ is float:
            # PyYAML reads ``1e-3`` (no dot) as a string, so accept numeric strings.
            number = value
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    number = float(value)
            is_number = isinstance(number, int | float) and not isinstance(number, bool)
            if is_number and math.isfinite(number):
                return float(number)
            raise StrategyError(f"{self.name}: parameter {key!r} must be a number, got {value!r}")
        if typ is int and isinstance(value, bool):
            raise StrategyError(f"{self.name}: parameter {key!r} must be an integer, got {value!r}")
        if not isinstance(value, typ):
            raise StrategyError(
                f"{self.name}: parameter {key!r} must be of type {typ.__name__}, got {value!r}"
            )
        return value

    @abstractmethod
    def aggregate(
        self,
        global_weights: list[np.ndarray],
        updates: Iterable[Update],
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Return the new global weights and the new server state (None if stateless).

        ``state`` is what the previous round returned (None in the first round); the caller
        persists it as a flat list of arrays.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"
