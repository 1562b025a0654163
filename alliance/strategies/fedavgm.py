"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019).

Why: the averaged change of a round is a noisy step; accumulating it with momentum on the
server smooths that noise across rounds and speeds up convergence, notably with non-IID
members, at the cost of one state array per weight array.

Each round, with x the global weights and Δ = weighted_mean(updates) − x:

    v ← β·v + Δ
    x ← x + η·v

With β = 0 and η = 1 this is exactly FedAvg. Defaults: serverMomentum β 0.9 and
serverLearningRate η 1.0, the setting the paper reports as robust. Initial v = 0.
State (the ``state`` list): the v arrays, in the global weights' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from alliance import weights

from .base import Strategy, StrategyError, Update
from .fedavg import weighted_mean


class FedAvgM(Strategy):
    name: ClassVar[str] = "fedavgm"
    stateful: ClassVar[bool] = True
    params: ClassVar[dict] = {
        "serverLearningRate": (float, 1.0),
        "serverMomentum": (float, 0.9),
    }

    def _check(self) -> None:
        self._require("serverLearningRate", self.values["serverLearningRate"] > 0, "> 0")
        self._require("serverMomentum", 0 <= self.values["serverMomentum"] < 1, "in [0, 1)")

    def aggregate(
        self,
        global_weights: list[np.ndarray],
        updates: Iterable[Update],
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if state is None:
            state = [np.zeros(w.shape, w.dtype) for w in global_weights]
        problem = weights.mismatch(state, global_weights) or weights.nonfinite(state)
        if problem is not None:
            raise StrategyError(f"{self.name}: state does not fit the model: {problem}")
        mean, _ = weighted_mean(global_weights, updates, dtype=np.float64)
        eta, beta = self.values["serverLearningRate"], self.values["serverMomentum"]
        new_x, new_v = [], []
        for x, avg, v in zip(global_weights, mean, state, strict=True):
            x64 = x.astype(np.float64)
            v = beta * v.astype(np.float64) + (avg - x64)
            new_x.append((x64 + eta * v).astype(x.dtype))
            new_v.append(v.astype(x.dtype))
        return new_x, new_v
