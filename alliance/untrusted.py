"""What members write, checked before the engine sees it: the coordinator trusts no member.

Every object a member writes to the store (its heartbeat, its update and the update's
metrics, its validation scores, its failure reports) is parsed here into a clean value, or
refused with a :class:`Rejected` whose message says what is wrong. A refusal concerns that
member's result alone: the round goes on without it and records the reason. Nothing a member
writes can raise anything else out of these functions, so a hostile or broken member can
neither crash nor stall the coordinator.

The bounds (docs/architecture.md, "Threat model"):

- counts are integers in [1, what the member declared in its heartbeat when it became ready];
- accuracies are in [0, 1]; losses and durations are finite and >= 0;
- reasons and messages are strings, cut to ``MAX_REASON_CHARS``;
- an update has the global model's arrays (number, shapes, dtypes), finite values, and its
  distance from the global model is within ``maxUpdateNorm`` (when set) and within
  ``OUTLIER_FACTOR`` times the round's median distance (when 3 or more updates are in).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

import numpy as np

from alliance import weights

#: Largest JSON object read from a member (heartbeat, validation, failure report): bytes.
MAX_JSON_BYTES = 64 * 1024
#: Longest reason or message kept from a member (characters).
MAX_REASON_CHARS = 500
#: An update further from the global model than this many times the round's median distance
#: is refused. Honest members measured on the MNIST sample (IID, Dirichlet 0.3 and 0.1, 3 to 10
#: members, training sets of 16 to 2,410 rows): at most 1.55x (docs/architecture.md).
OUTLIER_FACTOR = 10.0
#: The median rule needs this many updates to say what is normal.
OUTLIER_MIN_UPDATES = 3
#: The most rows a member may declare (the JSON number must also be an exact integer).
MAX_ROWS = 2**53


class Rejected(ValueError):
    """A member's object that the run cannot use; the message says why."""


@dataclass(frozen=True)
class Heartbeat:
    state: str  # "starting", "ready", "invalid", "stopped"
    train_rows: int = 0
    test_rows: int = 0
    message: str = ""  # an invalid member's reason, bounded (shown to people, never parsed)


@dataclass(frozen=True)
class UpdateMetrics:
    num_examples: int
    loss: float | None = None
    seconds: float = 0.0


def text(value: Any, limit: int = MAX_REASON_CHARS) -> str:
    """A member's free text, as a bounded one-line string."""
    s = value if isinstance(value, str) else repr(value)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _shown(value: Any) -> str:
    """A member's value in a message: its repr, bounded."""
    return text(repr(value), 60)


def _count(obj: dict, key: str, limit: int, what: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(f"{key} must be an integer, got {_shown(value)}")
    if not 1 <= value <= limit:
        raise Rejected(f"{key} {value} is not in [1, {limit}] ({what})")
    return value


def _number(obj: dict, key: str, low: float = 0.0, high: float = math.inf) -> float | None:
    """An optional finite number in [low, high]."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(f"{key} must be a number, got {_shown(value)}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g} and finite"
        raise Rejected(f"{key} {value!r} is not {bounds}")
    return value


def _mapping(content: Any) -> dict:
    if not isinstance(content, dict):
        raise Rejected(f"expected a JSON object, got {type(content).__name__}")
    return content


def heartbeat(content: Any) -> Heartbeat:
    """A member's heartbeat (``members/<name>.json``). Rows are read from a ready one (and a
    stopped one, which keeps the last summary); only a ready member's count."""
    content = _mapping(content)
    state = content.get("state")
    if state not in ("starting", "ready", "invalid", "stopped"):
        raise Rejected(f"state must be starting, ready, invalid or stopped, got {_shown(state)}")
    if state == "invalid":
        return Heartbeat(state, message=text(content.get("message", "no reason given")))
    if state not in ("ready", "stopped"):
        return Heartbeat(state)
    train = content.get("trainRows", 0)
    test = content.get("testRows", 0)
    for key, value in (("trainRows", train), ("testRows", test)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROWS:
            raise Rejected(f"{key} must be an integer in [0, {MAX_ROWS}], got {_shown(value)}")
    return Heartbeat(state, train, test)


def update_metrics(meta: Any, declared_rows: int) -> UpdateMetrics:
    """The metrics stored with an update: ``numExamples`` may not exceed the training rows the
    member declared, since FedAvg weighs the update by it."""
    meta = _mapping(meta)
    n = _count(meta, "numExamples", declared_rows, "the training rows it declared")
    return UpdateMetrics(
        num_examples=n,
        loss=_number(meta, "loss"),
        seconds=_number(meta, "seconds") or 0.0,
    )


def validation(content: Any, declared_rows: int) -> dict:
    """A validation result: ``{"accuracy", "numExamples"[, "loss"], "seconds"}`` checked, or
    ``{"error": reason}`` as the member reported it."""
    content = _mapping(content)
    if "error" in content:
        return {"error": text(content["error"])}
    checked = {
        "numExamples": _count(content, "numExamples", declared_rows, "the test rows it declared"),
        "accuracy": _number(content, "accuracy", 0.0, 1.0),
        "seconds": _number(content, "seconds") or 0.0,
    }
    if checked["accuracy"] is None:
        raise Rejected("accuracy is missing")
    loss = _number(content, "loss")
    if loss is not None:
        checked["loss"] = loss
    return checked


def failure(content: Any) -> str:
    """A member's report that it could not train: its reason, bounded."""
    if not isinstance(content, dict):
        return f"failed (unreadable report: {type(content).__name__})"
    return text(content.get("reason", "failed"))


def update_arrays(arrays: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> float:
    """Check an update's arrays against the global model; returns its distance from it (the
    L2 norm of the difference over all arrays)."""
    why = weights.mismatch(arrays, base) or weights.nonfinite(arrays)
    if why is None:
        why = next(
            (
                f"array {i} has dtype {a.dtype}, the model's is {b.dtype}"
                for i, (a, b) in enumerate(zip(arrays, base, strict=True))
                if a.dtype != b.dtype
            ),
            None,
        )
    if why is not None:
        raise Rejected(why)
    return distance(arrays, base)


def distance(arrays: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``arrays - base`` over all arrays (inf if it overflows float64)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for a, b in zip(arrays, base, strict=True):
            d = np.subtract(a, b, dtype=np.float64).ravel()
            total += float(np.dot(d, d))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def outliers(distances: dict[str, float], max_norm: float = 0.0) -> dict[str, str]:
    """The members whose update is too far from the global model, with the reason: beyond
    ``max_norm`` (when > 0), or beyond OUTLIER_FACTOR times the round's median distance."""
    out = {}
    if max_norm > 0:
        out = {
            m: f"distance from the global model {d:.4g} exceeds maxUpdateNorm {max_norm:g}"
            for m, d in distances.items()
            if d > max_norm
        }
    if len(distances) >= OUTLIER_MIN_UPDATES:
        typical = median(distances.values())
        for m, d in distances.items():
            if m not in out and typical > 0 and d > OUTLIER_FACTOR * typical:
                out[m] = (
                    f"distance from the global model {d:.4g} is more than {OUTLIER_FACTOR:g}x "
                    f"the round's median ({typical:.4g})"
                )
    return out
