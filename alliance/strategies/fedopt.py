"""Adaptive server optimizers: FedAdagrad, FedAdam, FedYogi (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2).

Why: FedAvg moves the model by the averaged change with the same step for every weight.
When members' data differ (non-IID) or updates are noisy, treating that change as a
pseudo-gradient and applying an adaptive optimizer on the server (momentum plus a
per-coordinate step size) converges faster and is less sensitive to the client learning
rate. The price is server state: two arrays per weight array, carried between rounds.

Each round, with x the global weights and Δ = weighted_mean(updates) − x:

    m ← β1·m + (1−β1)·Δ
    v ← v + Δ²                                  FedAdagrad
    v ← β2·v + (1−β2)·Δ²                        FedAdam
    v ← v − (1−β2)·Δ²·sign(v − Δ²)              FedYogi
    x ← x + η·m / (√v + τ)

Initial state: m = 0 and v = τ², the paper's v₋₁ ≥ τ² (Flower starts v at 0; with a small
τ the difference is negligible). No bias correction, as in the paper.

Defaults:
  serverLearningRate (η) 0.01: the paper tunes η per task and reports no universal value;
    Flower uses 1e-2 for FedYogi and 1e-1 for FedAdam (bias-corrected) and FedAdagrad.
    Without bias correction the first step moves every coordinate by about η, so 0.01 is
    the cautious choice for all three.
  beta1 0.9, beta2 0.99: the values the paper fixes for FedAdam and FedYogi, also Flower's.
    FedAdagrad has no beta2 and its beta1 defaults to 0 (plain Adagrad), as in Flower.
  tau 1e-3: Flower's current default for all three (its older releases used 1e-9 for
    Adam/Adagrad); smaller τ means more adaptivity.

State (the ``state`` list): the m arrays followed by the v arrays, in the global weights'
dtype; its length is twice the number of weight arrays.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from alliance import weights

from .base import Strategy, StrategyError, Update
from .fedavg import weighted_mean


class FedOpt(Strategy):
    """Shared by the three server optimizers; subclasses define :meth:`_second_moment`."""

    stateful: ClassVar[bool] = True
    params: ClassVar[dict] = {
        "serverLearningRate": (float, 0.01),
        "beta1": (float, 0.9),
        "beta2": (float, 0.99),
        "tau": (float, 1e-3),
    }

    def _check(self) -> None:
        v = self.values
        self._require("serverLearningRate", v["serverLearningRate"] > 0, "> 0")
        self._require("beta1", 0 <= v["beta1"] < 1, "in [0, 1)")
        if "beta2" in v:
            self._require("beta2", 0 <= v["beta2"] < 1, "in [0, 1)")
        self._require("tau", v["tau"] > 0, "> 0")

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate(
        self,
        global_weights: list[np.ndarray],
        updates: Iterable[Update],
        state: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        m_prev, v_prev = self._unpack(global_weights, state)
        mean, _ = weighted_mean(global_weights, updates, dtype=np.float64)
        eta, beta1, tau = (self.values[k] for k in ("serverLearningRate", "beta1", "tau"))
        new_x, new_m, new_v = [], [], []
        for x, avg, m, v in zip(global_weights, mean, m_prev, v_prev, strict=True):
            x64 = x.astype(np.float64)
            delta = avg - x64
            m = beta1 * m + (1 - beta1) * delta
            v = self._second_moment(v, delta * delta)
            new_x.append((x64 + eta * m / (np.sqrt(v) + tau)).astype(x.dtype))
            new_m.append(m.astype(x.dtype))
            new_v.append(v.astype(x.dtype))
        return new_x, new_m + new_v

    def _unpack(
        self, global_weights: list[np.ndarray], state: list[np.ndarray] | None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """m and v as float64: zeros and τ² in the first round, else checked from ``state``."""
        if state is None:
            tau_sq = self.values["tau"] ** 2
            return (
                [np.zeros(w.shape, np.float64) for w in global_weights],
                [np.full(w.shape, tau_sq, np.float64) for w in global_weights],
            )
        n = len(global_weights)
        if len(state) != 2 * n:
            raise StrategyError(
                f"{self.name}: state has {len(state)} arrays, expected {2 * n} "
                f"(m and v for each of the model's {n} arrays)"
            )
        for part, arrays in (("m", state[:n]), ("v", state[n:])):
            problem = weights.mismatch(arrays, global_weights) or weights.nonfinite(arrays)
            if problem is not None:
                raise StrategyError(
                    f"{self.name}: state ({part}) does not fit the model: {problem}"
                )
        return (
            [np.asarray(a, np.float64) for a in state[:n]],
            [np.asarray(a, np.float64) for a in state[n:]],
        )


class FedAdagrad(FedOpt):
    """Adagrad on the server: v only grows, so steps shrink over rounds. Suited to sparse
    or rarely-updated weights (e.g. embeddings); no beta2."""

    name: ClassVar[str] = "fedadagrad"
    params: ClassVar[dict] = {
        "serverLearningRate": (float, 0.01),
        "beta1": (float, 0.0),
        "tau": (float, 1e-3),
    }

    def _second_moment(self, v, delta_sq):
        return v + delta_sq


class FedAdam(FedOpt):
    """Adam on the server: v is an exponential average of Δ², so step sizes track the
    recent scale of each coordinate's change."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v, delta_sq):
        return self.values["beta2"] * v + (1 - self.values["beta2"]) * delta_sq


class FedYogi(FedOpt):
    """Yogi on the server: like Adam, but v moves towards Δ² by at most (1−β2)·Δ² per round,
    so when updates become small the effective step size grows slowly instead of jumping."""

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v, delta_sq):
        return v - (1 - self.values["beta2"]) * delta_sq * np.sign(v - delta_sq)
