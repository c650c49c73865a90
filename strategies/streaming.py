"""FedAvg's weighted mean, accumulated one update at a time: memory does not grow with the number of sites.

``weighted_mean`` needs every site's update in memory at once (N adapters); here each update is
added to a running sum and can be freed right after, so a coordinator holds one accumulator
(float64: 2 float32 adapters' worth; float32: 1) plus a scratch buffer of one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.fedavg import AdapterArrays, UpdateRejected

ACCUMULATORS = ("float64", "float32", "kahan32")


class StreamingWeightedMean:
    """Sum_i w_i u_i / Sum_i w_i over updates added one by one, key by key; result() has the updates' shapes.

    accumulator:
      "float64"  exact reference (same as weighted_mean up to rounding order); 2 adapters' worth of state.
      "float32"  half the memory and ~2x faster; relative error grows like N * 2^-24 in the worst case.
      "kahan32"  float32 sum with Kahan compensation: float64-like accuracy, 2 adapters' worth of state.
    """

    def __init__(self, accumulator: str = "float64") -> None:
        if accumulator not in ACCUMULATORS:
            raise ValueError(f"accumulator must be one of {ACCUMULATORS}, got {accumulator!r}")
        self.accumulator = accumulator
        self.dtype = np.float64 if accumulator == "float64" else np.float32
        self.sums: AdapterArrays = {}
        self.compensation: AdapterArrays = {}  # kahan32 only: the low-order part lost by each float32 add
        self.total_weight = 0.0
        self.count = 0
        self._scratch: list[np.ndarray] = []  # one tensor's worth, reused for every key and update
        self._finished = False

    def _check(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        if self._finished:
            raise RuntimeError("result() was already taken; start a new StreamingWeightedMean")
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and non-negative, got {weight}")
        if not self.sums:
            return
        missing, extra = sorted(set(self.sums) - set(update)), sorted(set(update) - set(self.sums))
        if missing or extra:
            raise UpdateRejected(f"wrong keys: {len(missing)} missing {missing[:3]}, "
                                 f"{len(extra)} unexpected {extra[:3]}")
        for key, acc in self.sums.items():
            shape = np.shape(update[key])
            if shape != acc.shape:
                raise UpdateRejected(f"wrong shape for {key}: got {shape}, expected {acc.shape}")

    def _start(self, update: Mapping[str, np.ndarray]) -> None:
        for key, value in update.items():
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                raise UpdateRejected(f"non-float dtype {np.asarray(value).dtype} for {key}")
        self.sums = {key: np.zeros(np.shape(value), self.dtype) for key, value in update.items()}
        if self.accumulator == "kahan32":
            self.compensation = {key: np.zeros_like(acc) for key, acc in self.sums.items()}
        largest = max((acc.size for acc in self.sums.values()), default=0)
        self._scratch = [np.empty(largest, self.dtype) for _ in range(2 if self.accumulator == "kahan32" else 1)]

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """sums += weight * update; keys and shapes must match the first update's (checked before anything is added)."""
        weight = float(weight)
        self._check(update, weight)
        if not self.sums:
            self._start(update)
        w = self.dtype(weight)  # a numpy scalar, so w * u is computed in the accumulator's dtype
        for key, acc in self.sums.items():
            value = np.asarray(update[key])
            # In-place into a reused scratch tensor: no adapter-sized temporaries (the scratch stays in cache).
            scaled = self._scratch[0][:acc.size].reshape(acc.shape)
            np.multiply(value, w, out=scaled)
            if self.accumulator != "kahan32":
                np.add(acc, scaled, out=acc)
                continue
            comp = self.compensation[key]
            new_sum = self._scratch[1][:acc.size].reshape(acc.shape)
            np.subtract(scaled, comp, out=scaled)       # y = w u - c
            np.add(acc, scaled, out=new_sum)            # t = sum + y
            np.subtract(new_sum, acc, out=comp)         # c = (t - sum) - y: what the float32 add lost
            np.subtract(comp, scaled, out=comp)
            np.copyto(acc, new_sum)
        self.total_weight += weight
        self.count += 1

    def result(self) -> AdapterArrays:
        """The weighted mean {key: array (accumulator dtype)}; divides the sums in place, so call it once."""
        if self.count == 0:
            raise ValueError("nothing to aggregate")
        if self.total_weight <= 0:
            raise ValueError(f"weights must have a positive sum, got {self.total_weight}")
        for key, acc in self.sums.items():
            if self.accumulator == "kahan32":
                np.subtract(acc, self.compensation[key], out=acc)
            np.divide(acc, self.total_weight, out=acc)
        self._finished = True
        self.compensation = {}
        self._scratch = []
        return self.sums
