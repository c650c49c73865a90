"""FedAvg's weighted mean, accumulated one update at a time: memory does not grow with the number of sites.

``weighted_mean`` needs every site's update in memory at once (N adapters); here each update is
added to a running sum and can be freed right after, so a coordinator holds one accumulator
(float64: 2 float32 adapters' worth; float32: 1) plus a scratch buffer of one tensor.

Updates may be numpy arrays or torch tensors of any float dtype, bfloat16 included (a zero-copy view
of a bf16 upload's bytes). The float32/float64 sums run on torch's CPU kernels (torch views of the
numpy sums): its dtype conversion and ``add_(alpha=w)`` are vectorised and multi-threaded, which
is what makes the sum memory-bandwidth bound (BENCHMARKS.md: 2.5x faster than the numpy path).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from strategies.fedavg import AdapterArrays, UpdateRejected

ACCUMULATORS = ("float64", "float32", "kahan32")
# Tensors are summed in groups of about this many elements (16 MB of float32 scratch): one concatenation,
# one conversion and one add per group instead of per tensor, since an adapter has hundreds of small tensors
# and per-call overhead, not memory bandwidth, would otherwise dominate.
GROUP_ELEMENTS = 1 << 22


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
        self._torch_scratch: torch.Tensor | None = None
        self._staging: dict[torch.dtype, torch.Tensor] = {}
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
            if not _is_float(value):
                raise UpdateRejected(f"non-float dtype {value.dtype} for {key}")
        shapes = {key: tuple(np.shape(value)) for key, value in update.items()}
        sizes = {key: int(np.prod(shape)) for key, shape in shapes.items()}
        # One flat buffer; the per-key sums are views into it, in update order (so groups are contiguous).
        self._flat = np.zeros(sum(sizes.values()), self.dtype)
        self.sums, offset = {}, 0
        for key in update:
            self.sums[key] = self._flat[offset:offset + sizes[key]].reshape(shapes[key])
            offset += sizes[key]
        self._groups, keys, start, end = [], [], 0, 0
        for key in update:
            if keys and end - start + sizes[key] > GROUP_ELEMENTS:
                self._groups.append((keys, start, end))
                keys, start = [], end
            keys.append(key)
            end += sizes[key]
        if keys:
            self._groups.append((keys, start, end))
        largest_group = max((e - s for _, s, e in self._groups), default=0)
        self._torch_flat = torch.from_numpy(self._flat)
        self._torch_scratch = torch.empty(largest_group, dtype=self._torch_flat.dtype)
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        if self.accumulator == "kahan32":
            self.compensation = {key: np.zeros_like(acc) for key, acc in self.sums.items()}
            largest = max((acc.size for acc in self.sums.values()), default=0)
            self._scratch = [np.empty(largest, self.dtype) for _ in range(2)]

    def _add_grouped(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """flat += weight * update, a group of tensors at a time (concatenate, convert, one fused add)."""
        with warnings.catch_warnings():  # read-only numpy inputs: torch warns, and we only read them
            warnings.simplefilter("ignore", UserWarning)
            for keys, start, end in self._groups:
                parts = [_as_tensor(update[key]).reshape(-1) for key in keys]
                dtype = parts[0].dtype if all(p.dtype == parts[0].dtype for p in parts) else self._torch_flat.dtype
                if dtype not in self._staging:
                    self._staging[dtype] = torch.empty(self._torch_scratch.numel(), dtype=dtype)
                staged = torch.cat(parts, out=self._staging[dtype][:end - start]) if len(parts) > 1 else \
                    parts[0].to(dtype)
                if dtype != self._torch_flat.dtype:
                    staged = self._torch_scratch[:end - start].copy_(staged)
                self._torch_flat[start:end].add_(staged, alpha=weight)

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """sums += weight * update; keys and shapes must match the first update's (checked before anything is added)."""
        weight = float(weight)
        self._check(update, weight)
        if not self.sums:
            self._start(update)
        if self.accumulator != "kahan32":
            self._add_grouped(update, weight)
            self.total_weight += weight
            self.count += 1
            return
        w = self.dtype(weight)  # a numpy scalar, so w * u is computed in the accumulator's dtype
        for key, acc in self.sums.items():
            value = _as_numpy(update[key])
            # In-place into a reused scratch tensor: no adapter-sized temporaries (the scratch stays in cache).
            scaled = self._scratch[0][:acc.size].reshape(acc.shape)
            np.multiply(value, w, out=scaled)
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
        self._scratch, self._torch_scratch, self._staging = [], None, {}
        return self.sums


def _is_float(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _as_tensor(value) -> torch.Tensor:
    """A torch view of a numpy array (no copy) or the tensor itself."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _as_numpy(value) -> np.ndarray:
    return value.float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class SpillingUpdates:
    """Site updates for aggregators that need every one of them (median, trimmed mean, Krum): held in RAM up to
    `ram_budget_bytes`, each further one written to an np.memmap file under `directory` and read back from there
    (the page cache, not the coordinator's heap, holds it). Behaves as the list of {key: array} the aggregators
    take; the files are removed by close()."""

    def __init__(self, ram_budget_bytes: int, directory: str | None = None) -> None:
        self.ram_budget_bytes = int(ram_budget_bytes)
        self.directory = directory
        self.updates: list[AdapterArrays] = []
        self.ram_bytes = 0
        self.spilled = 0
        self._tmp = None

    def append(self, update: Mapping[str, np.ndarray]) -> None:
        """Keep `update` (in RAM while under budget, else on disk as a read-only memmap per tensor)."""
        nbytes = int(sum(np.asarray(value).nbytes for value in update.values()))
        if self.ram_bytes + nbytes <= self.ram_budget_bytes:
            self.updates.append(dict(update))
            self.ram_bytes += nbytes
            return
        if self._tmp is None:
            if self.directory is not None:
                Path(self.directory).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="spilled-updates-", dir=self.directory)
        path = Path(self._tmp.name) / f"update-{len(self.updates)}.bin"
        stored = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(nbytes, 1),))
        views, offset = {}, 0
        for key, value in update.items():
            value = np.ascontiguousarray(value)
            stored[offset:offset + value.nbytes] = value.reshape(-1).view(np.uint8)
            views[key] = (offset, value.dtype, value.shape)
            offset += value.nbytes
        stored.flush()
        del stored
        readonly = np.memmap(path, dtype=np.uint8, mode="r")
        self.updates.append({key: readonly[start:start + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
                             for key, (start, dtype, shape) in views.items()})
        self.spilled += 1

    def reorder(self, order: list[int]) -> None:
        """Put the updates in `order` (indices into the current order)."""
        self.updates = [self.updates[i] for i in order]

    def __len__(self) -> int:
        return len(self.updates)

    def __iter__(self):
        return iter(self.updates)

    def __getitem__(self, index):
        return self.updates[index]

    def close(self) -> None:
        """Drop the updates and delete the spill files."""
        self.updates = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
