"""The coordinator's durable state: per-round PEFT adapter checkpoints (atomic) and metrics.jsonl."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from federation.protocol import FEDERATION_RUN_ID_KEY  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SERVER_STATE = "server_state.json"
STRATEGY_STATE = "strategy_state.npz"
# The federation run id: made once per run by the coordinator, kept in every checkpoint's server state (so a
# resumed run reuses it) and sent to the sites with every message, which key their round state by it
# (client/site_state.py).
FEDERATION_RUN_ID_STATE = "federation_run_id"


def new_federation_run_id() -> str:
    """A fresh federation run id: 32 hex digits from the OS's randomness (uuid4), unique across runs."""
    return uuid.uuid4().hex


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> os.stat_result:
    """Write `data` to `path` so that a crash leaves the old file or the new one: temp file, fsync, rename.

    Returns the written file's stat (taken before the rename, which keeps its inode, size and mtime), so a
    writer can later tell its own file from one that replaced it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            written = os.fstat(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return written


def write_peft_adapter(directory: Path, arrays: Mapping[str, np.ndarray], peft_config) -> None:
    """Write adapter_config.json + adapter_model.safetensors (what PeftModel.from_pretrained reads)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(directory / ADAPTER_WEIGHTS))


def read_peft_adapter(directory: str | Path) -> dict[str, np.ndarray]:
    """Adapter tensors of a PEFT adapter directory as float32 numpy."""
    from safetensors.numpy import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no adapter weights here (expected a PEFT adapter directory)")
    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


class GlobalAdapterStore:
    """Run directory layout: checkpoints/round-NNNN/ (PEFT dir + server_state.json), global_adapter -> newest.

    Each checkpoint is written into a temp directory, fsynced and renamed into place, and only then
    is the ``global_adapter`` symlink swapped with an atomic rename, so a crash at any instant leaves
    the previous global adapter intact and loadable.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 0):
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    @property
    def global_adapter_dir(self) -> Path:
        """Symlink to the newest complete checkpoint."""
        return self.run_dir / "global_adapter"

    def round_dir(self, server_round: int) -> Path:
        """Directory of one round's checkpoint."""
        return self.checkpoints / f"round-{server_round:04d}"

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray], peft_config,
             state: Mapping[str, Any] | None = None,
             strategy_state: Mapping[str, Any] | None = None) -> Path:
        """Atomically write round `server_round`'s adapter, JSON-able server state and strategy arrays (npz)."""
        from federation.adapter import adapter_digest

        final = self.round_dir(server_round)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.checkpoints))
        try:
            write_peft_adapter(tmp, arrays, peft_config)
            if strategy_state:
                np.savez(tmp / STRATEGY_STATE, **{k: np.asarray(v) for k, v in strategy_state.items()})
            record = {"round": server_round, "adapter_sha256": sha256_file(tmp / ADAPTER_WEIGHTS),
                      "adapter_digest": adapter_digest(arrays), **(state or {})}
            (tmp / SERVER_STATE).write_text(json.dumps(record, indent=1, sort_keys=True))
            for name in os.listdir(tmp):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():  # re-running a round after resume: replace the stale copy
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.checkpoints)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        link_tmp = self.run_dir / f".global_adapter.tmp-{os.getpid()}"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(os.path.relpath(final, self.run_dir), link_tmp)
        os.replace(link_tmp, self.global_adapter_dir)
        _fsync_dir(self.run_dir)
        self._prune(server_round)
        return final

    def _prune(self, newest: int) -> None:
        if self.keep_last <= 0:
            return
        for path in sorted(self.checkpoints.glob("round-*")):
            if int(path.name.split("-")[1]) <= newest - self.keep_last:
                shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> tuple[int, Path] | None:
        """(round, directory) of the newest complete checkpoint, or None."""
        if not self.global_adapter_dir.exists():
            return None
        target = self.global_adapter_dir.resolve()
        state = json.loads((target / SERVER_STATE).read_text())
        return int(state["round"]), target

    def federation_run_id(self) -> str | None:
        """The federation run id in the newest checkpoint; None without a checkpoint or in one written before ids."""
        latest = self.latest()
        if latest is None:
            return None
        return json.loads((latest[1] / SERVER_STATE).read_text()).get(FEDERATION_RUN_ID_STATE)

    def load(self, directory: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(adapter arrays, server state) of a checkpoint, default the newest; verifies the sha256."""
        directory = Path(directory) if directory else self.global_adapter_dir.resolve()
        arrays = read_peft_adapter(directory)
        state_path = directory / SERVER_STATE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        expected = state.get("adapter_sha256")
        if expected and sha256_file(directory / ADAPTER_WEIGHTS) != expected:
            raise ValueError(f"{directory}: adapter sha256 does not match {SERVER_STATE}; checkpoint is corrupt")
        return arrays, state


    def load_strategy_state(self, directory: str | Path) -> dict[str, Any]:
        """The strategy/aggregator state saved with a checkpoint (0-d arrays back to Python scalars)."""
        path = Path(directory) / STRATEGY_STATE
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: (data[k].item() if data[k].ndim == 0 else data[k]) for k in data.files}


class MetricsLog:
    """metrics.jsonl: one JSON object per round, flushed and fsynced as it is written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one row."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(row), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, server_round: int) -> None:
        """Drop rows of rounds after `server_round` (they are redone after a resume); atomic rewrite."""
        keep = [r for r in self.rows() if r["round"] <= server_round]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def rows(self) -> list[dict[str, Any]]:
        """All rows written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
