"""Weighted means of model states, folded in one reply at a time (pure NumPy, no Flower)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

State = Mapping[str, np.ndarray]


class WeightedMean:
    """Running FedAvg: ``sum_k w_k * x_k / sum_k w_k``, accumulated in float32, returned in each tensor's dtype.

    Each reply is folded in as it arrives and can be dropped right after, so the server holds one running sum
    instead of every client's state.
    """

    def __init__(self, reference: State):
        self._reference = {k: (v.shape, v.dtype) for k, v in reference.items()}
        self._sum = {k: np.zeros(shape, dtype=np.float32) for k, (shape, _) in self._reference.items()}
        self.total_weight = 0.0
        self.count = 0

    def mismatch(self, state: State) -> str | None:
        """Why ``state`` cannot be averaged with the reference (names, shapes, dtypes, non-finite values), or None."""
        missing = self._reference.keys() - state.keys()
        extra = state.keys() - self._reference.keys()
        if missing or extra:
            return f"tensor names differ: {len(missing)} missing (e.g. {min(missing, default='-')}), {len(extra)} unexpected (e.g. {min(extra, default='-')})"
        for key, (shape, dtype) in self._reference.items():
            value = state[key]
            if value.shape != shape or value.dtype != dtype:
                return f"{key} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
            if not np.isfinite(value).all():
                return f"{key} holds NaN or Inf"
        return None

    def add(self, state: State, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        problem = self.mismatch(state)
        if problem:
            raise ValueError(problem)
        w = np.float32(weight)
        for key, acc in self._sum.items():
            acc += w * state[key].astype(np.float32, copy=False)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no state was added")
        total = np.float32(self.total_weight)  # divide, not multiply by 1/total: one rounding, not two
        return {k: (acc / total).astype(self._reference[k][1]) for k, acc in self._sum.items()}


def weighted_mean(states: list[State], weights: list[float]) -> dict[str, np.ndarray]:
    """All-at-once FedAvg over ``states``; identical to folding them into a :class:`WeightedMean` in order."""
    mean = WeightedMean(states[0])
    for state, weight in zip(states, weights, strict=True):
        mean.add(state, weight)
    return mean.result()


def weighted_average(values: list[float], weights: list[float]) -> float:
    return float(np.dot(values, weights) / np.sum(weights))
