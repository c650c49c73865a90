"""Site state that rounds advance, kept durably at the site per federation run and round.

What rounds advance at a site: the upload codec's error-feedback residual (client/app.py), SCAFFOLD's c_i
(client/scaffold.py), FedSA-LoRA's own lora_B (client/fedsa.py) and the DP-SGD accountant history
(client/app.py). Flower's ``Context.state`` keeps such state per *Flower* run, and a coordinator restart
(``federation.resume=true``) is a new Flower run: the sites would start from zero and the resumed run
would drift away from an uninterrupted one. So the state lives in files at the site instead, keyed by

* the **federation run id**, which the coordinator creates once per run, checkpoints, and sends with every
  message (``FEDERATION_RUN_ID_KEY``; a resumed run sends the same id), and
* the **round it is entered with**: after training round t a site saves the state it enters round t+1 with;
  round t loads the newest state saved for a round <= t. A round that is run again after a restart (the
  coordinator died before its checkpoint, the sites had already trained it) therefore starts from the same
  site state as the first time, and overwrites what that first attempt saved for round t+1.

Layout: ``<directory>/<run id>/<name>/round-NNNN.npz`` (arrays) or ``.json`` (JSON values). Every file is
written atomically (temp file, fsync, rename, fsync of the directory; a reader never sees a half-written file);
each name keeps its newest ``keep_rounds`` rounds.

The process keeps the arrays it saved last per (directory, run, name) in memory (a few, least recently saved
dropped first) and a later load takes them from there when the file it would read is still the one this process
wrote (same inode, size and mtime; another process, e.g. a simulation's other worker, may have replaced it):
a resident site reads back nothing it wrote itself. ``save_arrays(..., background=True)`` leaves the file's
serialization and fsync to one writer thread of the process, in order, off the reply's critical path; every
later load, save or listing of that name first waits for it. A crash before it lands leaves the state of the
round before, as a crash before any save does; so only state whose loss costs accuracy and not correctness
uses it (the upload codec's error-feedback residual: never the DP-SGD accountant). Pending writes finish at
interpreter exit. Where the directory comes from (``site_state``): the node config
``round-state-dir`` in deployment (client/daemon.py: ``<state_dir>/round-state``), else
``<output_dir>/sites/partition-<id>`` in simulation. Without either, or without a run id in the message,
the state stays in ``Context.state`` as before (``ContextState``), and a resumed run is not bit-identical.

Saved arrays may also be ``DeviceArrays`` (federation/compression.py: the bf16 codec's residual of a GPU site, one
flat tensor there). The process keeps them on their device, a load from memory gives a copy there, and the copy to
the host is part of writing the file (in the writer thread with ``background=True``: off the critical path). The
file holds numpy arrays as always: a restarted site loads those, and the codec moves them to the device once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from federation.compression import DeviceArrays, on_host
from federation.packing import pack_arrays, unpack_arrays
from federation.store import FEDERATION_RUN_ID_KEY, atomic_write_bytes

log = logging.getLogger("fedtune.client")

# Node config (deployment): the site's directory for round state.
NODE_STATE_DIR_KEY = "round-state-dir"
# Under output_dir (simulation): one directory per partition.
SIMULATION_SITES_DIR = "sites"
# Rounds kept per state name and run: a resume re-runs at most the round after the newest checkpoint, whose
# entry state is then one or two rounds behind the newest saved; one more for margin.
KEEP_ROUNDS = 3
# Run ids and state names become path components: nothing that could leave the directory.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ROUND_FILE = re.compile(r"round-(\d+)\.(npz|json)")
# Saved arrays the process keeps in memory, newest saves: a deployed site's one run needs one per state name; a
# simulation process serving many partitions gains little from them, so a handful bounds its memory (a GPU site's
# residual: device memory, one float32 adapter each).
SAVED_KEPT_IN_MEMORY = 4
# Background writes that may wait at once (each holds its arrays until written); one more waits for a slot.
MAX_PENDING_WRITES = 2


def _checked(value: str, what: str) -> str:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"site state: {what} {value!r} is not a safe name (letters, digits, '.', '_', '-')")
    return value


class SiteState(Protocol):
    """Round-keyed site state: what a site enters a round with, by name."""

    def load_arrays(self, name: str, server_round: int) -> dict[str, np.ndarray] | DeviceArrays | None: ...

    def save_arrays(self, name: str, server_round: int, arrays: dict[str, np.ndarray] | DeviceArrays,
                    background: bool = False) -> None: ...

    def load_json(self, name: str, server_round: int) -> Any | None: ...

    def save_json(self, name: str, server_round: int, value: Any) -> None: ...


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return _identity(path.stat())
    except FileNotFoundError:
        return None


@dataclass
class _SavedArrays:
    """Arrays this process saved to `path`; `identity` is the file's once written, `pending` a background write."""

    path: Path
    arrays: dict[str, np.ndarray] | DeviceArrays
    identity: tuple[int, int, int, int] | None = None
    pending: Future | None = None


_SAVED: OrderedDict[tuple[str, str], _SavedArrays] = OrderedDict()  # (run dir, name) -> newest save
_SAVED_LOCK = threading.Lock()
_PENDING_SLOTS = threading.BoundedSemaphore(MAX_PENDING_WRITES)
_WRITER: ThreadPoolExecutor | None = None


def _writer() -> ThreadPoolExecutor:
    """The process's one state-writing thread (in order); concurrent.futures lets its queue finish at exit."""
    global _WRITER
    with _SAVED_LOCK:
        if _WRITER is None:
            _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="site-state-writer")
        return _WRITER


def wait_for_background_writes() -> None:
    """Return once every background write this process started has landed (or failed: its next use raises)."""
    with _SAVED_LOCK:
        writer = _WRITER
    if writer is not None:
        writer.submit(lambda: None).result()  # one thread, in order: everything queued before it is done


def _forget_in_child() -> None:
    """A forked child has no writer thread and did not write the parent's files: it starts afresh."""
    global _WRITER, _SAVED_LOCK, _PENDING_SLOTS
    _WRITER, _SAVED_LOCK, _PENDING_SLOTS = None, threading.Lock(), threading.BoundedSemaphore(MAX_PENDING_WRITES)
    _SAVED.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _after_background_write(future: Future, slots: threading.BoundedSemaphore) -> None:
    slots.release()
    if future.exception() is not None:
        log.error("writing site state in the background failed (its next use raises it): %s", future.exception())


class SiteStateStore:
    """State files of one federation run at one site: ``<directory>/<run id>/<name>/round-NNNN.{npz,json}``."""

    def __init__(self, directory: str | Path, run_id: str, keep_rounds: int = KEEP_ROUNDS):
        if keep_rounds < 2:  # a re-run round needs the state before the one its first attempt saved
            raise ValueError(f"keep_rounds must be >= 2, got {keep_rounds}")
        self.run_dir = Path(directory) / _checked(str(run_id), "run id")
        self.keep_rounds = keep_rounds

    def _rounds(self, name: str) -> dict[int, Path]:
        folder = self.run_dir / _checked(name, "state name")
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            match = _ROUND_FILE.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def rounds(self, name: str) -> list[int]:
        """The rounds that `name` has state saved for (the state entering them), oldest first."""
        self._settled(name)
        return sorted(self._rounds(name))

    def _key(self, name: str) -> tuple[str, str]:
        return os.path.abspath(self.run_dir), _checked(name, "state name")

    def _settled(self, name: str) -> _SavedArrays | None:
        """This process's newest save of `name`, after its background write landed (whose error it raises, once)."""
        key = self._key(name)
        with _SAVED_LOCK:
            saved = _SAVED.get(key)
        if saved is None or saved.pending is None:
            return saved
        try:
            saved.pending.result()
        except BaseException:
            with _SAVED_LOCK:
                if _SAVED.get(key) is saved:
                    del _SAVED[key]
            raise
        return saved

    def _entry(self, name: str, server_round: int) -> Path | None:
        """The file of the state entering `server_round`: the newest saved for a round <= server_round."""
        rounds = self._rounds(name)
        entering = [r for r in rounds if r <= server_round]
        return rounds[max(entering)] if entering else None

    def _path(self, name: str, server_round: int, suffix: str) -> Path:
        return self.run_dir / _checked(name, "state name") / f"round-{int(server_round):04d}.{suffix}"

    def _save(self, name: str, server_round: int, data: bytes, suffix: str) -> os.stat_result:
        """Write the file (atomically), then drop the rounds it makes obsolete; the written file's stat."""
        written = atomic_write_bytes(self._path(name, server_round, suffix), data)
        # Entries after this round belong to an abandoned attempt (a resume went back further); older ones
        # beyond keep_rounds are no longer needed.
        rounds = self._rounds(name)
        kept = sorted(r for r in rounds if r <= server_round)[-self.keep_rounds:]
        for other, other_path in rounds.items():
            if other not in kept:
                other_path.unlink(missing_ok=True)
        return written

    def load_arrays(self, name: str, server_round: int) -> dict[str, np.ndarray] | DeviceArrays | None:
        """The arrays `name` holds when the site enters `server_round`; None if nothing was saved up to it.

        DeviceArrays only when this process saved them and the file is still its own; numpy arrays otherwise.
        """
        saved = self._settled(name)
        path = self._entry(name, server_round)
        if path is None:
            return None
        if path.suffix != ".npz":
            raise ValueError(f"{path}: site state {name!r} was saved as JSON, not arrays")
        if saved is not None and saved.path == path and saved.identity == _file_identity(path):
            if isinstance(saved.arrays, DeviceArrays):
                return saved.arrays.clone()  # callers may change it
            return {key: value.copy(order="K") for key, value in saved.arrays.items()}  # callers may change them
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def save_arrays(self, name: str, server_round: int, arrays: dict[str, np.ndarray] | DeviceArrays,
                    background: bool = False) -> None:
        """Save `arrays` (dtypes kept) as what `name` holds when the site enters `server_round`.

        The process keeps `arrays` as given (not copied, DeviceArrays on their device): the caller must not change
        them afterwards.
        background: return at once and let the process's writer thread write the file (module docstring).
        """
        self._settled(name)  # in order: the name's previous write first (and its error)
        kept = arrays if isinstance(arrays, DeviceArrays) else {key: np.asarray(value) for key, value in arrays.items()}
        saved = _SavedArrays(self._path(name, server_round, "npz"), kept)
        if background:
            slots = _PENDING_SLOTS
            slots.acquire()
            try:
                saved.pending = _writer().submit(self._write_arrays, name, server_round, saved)
            except BaseException:
                slots.release()
                raise
            saved.pending.add_done_callback(lambda future: _after_background_write(future, slots))
        else:
            self._write_arrays(name, server_round, saved)
        key = self._key(name)
        with _SAVED_LOCK:
            _SAVED[key] = saved
            _SAVED.move_to_end(key)
            for old_key in [k for k, v in _SAVED.items() if v.pending is None or v.pending.done()]:
                if len(_SAVED) <= SAVED_KEPT_IN_MEMORY:
                    break
                del _SAVED[old_key]

    def _write_arrays(self, name: str, server_round: int, saved: _SavedArrays) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **on_host(saved.arrays))  # DeviceArrays: the device->host copy, here
        saved.identity = _identity(self._save(name, server_round, buffer.getvalue(), "npz"))


    def load_json(self, name: str, server_round: int) -> Any | None:
        """The JSON value `name` holds when the site enters `server_round`; None if nothing was saved up to it."""
        self._settled(name)
        path = self._entry(name, server_round)
        if path is None:
            return None
        if path.suffix != ".json":
            raise ValueError(f"{path}: site state {name!r} was saved as arrays, not JSON")
        return json.loads(path.read_text(encoding="utf-8"))

    def save_json(self, name: str, server_round: int, value: Any) -> None:
        """Save a JSON-able `value` as what `name` holds when the site enters `server_round`."""
        self._settled(name)
        self._save(name, server_round, json.dumps(value, sort_keys=True).encode("utf-8"), "json")


class ContextState:
    """Fallback without a state directory or run id: Flower's Context.state, newest value only (rounds ignored)."""

    def __init__(self, context: Context):
        self.state = context.state

    def load_arrays(self, name: str, server_round: int) -> dict[str, np.ndarray] | None:
        """The newest arrays saved under `name` in this Flower run."""
        record = self.state.array_records.get(name)
        return None if record is None else unpack_arrays(record)

    def save_arrays(self, name: str, server_round: int, arrays: dict[str, np.ndarray] | DeviceArrays,
                    background: bool = False) -> None:
        """Replace `name`'s arrays (in memory: `background` changes nothing)."""
        self.state[name] = pack_arrays(on_host(arrays))  # Context.state travels between SuperNode and ClientApp process

    def load_json(self, name: str, server_round: int) -> Any | None:
        """The newest JSON value saved under `name` in this Flower run."""
        record = self.state.config_records.get(name)
        return None if record is None else json.loads(str(record["json"]))

    def save_json(self, name: str, server_round: int, value: Any) -> None:
        """Replace `name`'s JSON value."""
        self.state[name] = ConfigRecord({"json": json.dumps(value, sort_keys=True)})


_FALLBACK_LOGGED: set[str] = set()


def site_state_dir(node_config, output_dir: str) -> Path | None:
    """Where this site keeps round state: node config round-state-dir, else the simulation partition's folder."""
    if NODE_STATE_DIR_KEY in node_config:
        return Path(str(node_config[NODE_STATE_DIR_KEY]))
    if "partition-id" in node_config and "data-path" not in node_config and output_dir:
        return Path(output_dir) / SIMULATION_SITES_DIR / f"partition-{int(node_config['partition-id'])}"
    return None


def site_state(msg: Message, context: Context, output_dir: str) -> SiteState:
    """This site's round state for the run `msg` belongs to (files), or Context.state when that is impossible."""
    config = msg.content.config_records.get("config")
    run_id = None if config is None else config.get(FEDERATION_RUN_ID_KEY)
    directory = site_state_dir(context.node_config, output_dir)
    if run_id is not None and directory is not None:
        return SiteStateStore(directory, str(run_id))
    reason = ("the coordinator sent no federation run id" if run_id is None
              else f"this site has no '{NODE_STATE_DIR_KEY}' in its node config (fedtune site sets it from state_dir)")
    if reason not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(reason)
        log.warning("site state (error feedback, SCAFFOLD c_i, FedSA-LoRA B, DP-SGD accountant) stays in Flower's "
                    "Context.state because %s: a resumed run will not be bit-identical", reason)
    return ContextState(context)


def server_round_of(msg: Message) -> int:
    """The round a message belongs to (Flower's 'server-round' config entry; 0 if absent)."""
    config = msg.content.config_records.get("config")
    return int(config.get("server-round", 0)) if config is not None else 0
