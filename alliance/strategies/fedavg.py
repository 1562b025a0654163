"""Federated Averaging (McMahan et al., 2017): the example-weighted mean of the members' weights.

The default strategy. Members with more data pull the model harder, which is what you want
when members are honest and their data come from similar distributions. It offers no
defence against a member sending bad weights: use ``median`` or ``trimmedmean`` for that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from .base import Strategy, StrategyError, Update, check_num_examples, load_update


def weighted_mean(
    global_weights: list[np.ndarray],
    updates: Iterable[Update],
    dtype: np.dtype | type | None = None,
) -> tuple[list[np.ndarray], int]:
    """The num_examples-weighted mean of the updates, and the total number of examples.

    Streams: the updates are iterated once and loaded one at a time into a float64 running
    sum, so the peak memory is the sum plus one update, whatever the number of updates.
    The mean has ``dtype`` (default: each global array's dtype). Updates with 0 examples
    are not loaded.
    """
    sums = [np.zeros(w.shape, dtype=np.float64) for w in global_weights]
    total = 0
    count = 0
    for update in updates:
        count += 1
        n = check_num_examples(update)
        if n:
            # The loaded arrays live only inside this call, so they are freed before the
            # next update is loaded.
            _accumulate(sums, load_update(update, global_weights), n)
            total += n
    if count == 0:
        raise StrategyError("no updates to aggregate")
    if total == 0:
        raise StrategyError(f"the {count} updates report 0 examples in total")
    return [
        (s / total).astype(dtype or w.dtype, copy=False)
        for s, w in zip(sums, global_weights, strict=True)
    ], total


def _accumulate(sums: list[np.ndarray], arrays: list[np.ndarray], n: int) -> None:
    for s, a in zip(sums, arrays, strict=True):
        s += n * np.asarray(a, dtype=np.float64)


class FedAvg(Strategy):
    """Example-weighted average of the members' weights; stateless, O(model) memory."""

    name: ClassVar[str] = "fedavg"
    params: ClassVar[dict] = {}

    def aggregate(self, global_weights, updates, state):
        mean, _ = weighted_mean(global_weights, updates)
        return mean, None
