"""Byzantine-robust aggregation: coordinate-wise median and trimmed mean (Yin et al., 2018).

Why: a mean follows any single member arbitrarily far, so one faulty or malicious member
(corrupted data, a bug, poisoning) can ruin the global model. Per coordinate, the median
and the trimmed mean ignore extreme values, so a minority of bad updates has bounded
effect. Use them when members are not all trusted; they cost some statistical efficiency
with honest members, and they are unweighted: every update counts once, whatever its
num_examples (weighting by a number the member reports would let a liar dominate).

Memory: an order statistic needs all K updates at once, so these strategies load every
update (K models in memory) and then work array by array, adding K copies of one array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import ClassVar

import numpy as np

from .base import Strategy, StrategyError, Update, load_update


def _coordinatewise(
    global_weights: list[np.ndarray],
    updates: Iterable[Update],
    reduce: Callable[[np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """Apply ``reduce`` to each array stacked over the K updates (axis 0)."""
    loaded = [load_update(u, global_weights) for u in updates]
    if not loaded:
        raise StrategyError("no updates to aggregate")
    result = []
    for i, w in enumerate(global_weights):
        stacked = np.stack([arrays[i] for arrays in loaded], dtype=np.float64)
        for arrays in loaded:
            arrays[i] = None  # free as we go: the peak is K models plus one stacked array
        result.append(reduce(stacked).astype(w.dtype))
    return result


class Median(Strategy):
    """Coordinate-wise median: each weight is the median of the members' values; with K
    updates it tolerates up to ⌈K/2⌉−1 arbitrary ones."""

    name: ClassVar[str] = "median"
    params: ClassVar[dict] = {}

    def aggregate(self, global_weights, updates, state):
        return _coordinatewise(global_weights, updates, lambda s: np.median(s, axis=0)), None


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean: per weight, drop the ⌊trimFraction·K⌋ largest and
    smallest values and average the rest. Closer to the mean than the median (more
    efficient with honest members) while tolerating up to that many bad updates per side."""

    name: ClassVar[str] = "trimmedmean"
    params: ClassVar[dict] = {"trimFraction": (float, 0.1)}

    def _check(self) -> None:
        self._require("trimFraction", 0 <= self.values["trimFraction"] < 0.5, "in [0, 0.5)")

    def aggregate(self, global_weights, updates, state):
        def reduce(stacked: np.ndarray) -> np.ndarray:
            k = len(stacked)
            # The epsilon makes e.g. 0.29 * 100 (= 28.999999999999996) trim 29, not 28.
            cut = min(math.floor(self.values["trimFraction"] * k + 1e-9), (k - 1) // 2)
            if cut == 0:
                return stacked.mean(axis=0)
            return np.sort(stacked, axis=0)[cut : k - cut].mean(axis=0)

        return _coordinatewise(global_weights, updates, reduce), None
