"""Which Flower app bundles (FABs) a site serves: only runs of the fedtune app it has installed.

A site never runs code from a FAB: its resident worker (client/worker.py) runs the installed
``client.app:app``. The FAB still says which app the coordinator thinks the sites run, so a
run is served only if its FAB is this app:

1. the FAB's pyproject names the fedtune ClientApp (``[tool.flwr.app.components] clientapp``) and
   publisher (``[tool.flwr.app] publisher``), and
2. either the FAB's sha256 is on the site's allow-list (``approved_fab_hashes`` in site.yaml), or
   every Python file in the FAB is byte-identical to the installed fedtune's file of the same path
   (and the FAB contains the ClientApp's module).

Rule 2's file comparison is the one that normally applies: ``fedtune launch`` declares the run's
overrides in the FAB's pyproject, so the FAB's hash changes with every launch while its code does not.
The allow-list is for operators who approve specific bundles by hash. The hash is computed here from
the FAB's bytes (Flower's FAB hash is the sha256 of the zip), not taken from a label.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

# Must match pyproject.toml's [tool.flwr.app] (tests/client/test_approval.py checks that they do).
FEDTUNE_PUBLISHER = "fedtune"
FEDTUNE_CLIENTAPP = "client.app:app"
# Top-level packages of the installed fedtune; a FAB's Python file elsewhere is not part of it.
FEDTUNE_PACKAGES = ("client", "federation", "server", "strategies", "simulations")


@dataclass(frozen=True)
class Approval:
    """The decision on one FAB: approved or not, and why (one line, for the site log and the refusal reply)."""

    approved: bool
    reason: str
    fab_sha256: str


def installed_root() -> Path:
    """The directory that holds the installed fedtune packages (the repo root in an editable install)."""
    import client

    return Path(client.__file__).resolve().parent.parent


def installed_file_hashes(root: Path | None = None) -> dict[str, str]:
    """sha256 of every Python file of the installed fedtune packages, by path relative to `root` ('client/app.py').

    The worker takes this snapshot once at start, so it describes the code that worker imported; a site
    upgraded on disk while a worker runs is compared as the worker runs it, until the worker restarts.
    """
    root = installed_root() if root is None else root
    return {path.relative_to(root).as_posix(): _sha256(path.read_bytes())
            for package in FEDTUNE_PACKAGES if (root / package).is_dir()
            for path in sorted((root / package).rglob("*.py")) if "__pycache__" not in path.parts}


def _clientapp_module_path() -> str:
    module = FEDTUNE_CLIENTAPP.split(":", 1)[0]
    return module.replace(".", "/") + ".py"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_fab(fab_content: bytes, approved_fab_hashes: Collection[str] = (),
              installed: Mapping[str, str] | None = None) -> Approval:
    """Whether this site serves a run with this FAB (see the module docstring); never runs or imports FAB code.

    `installed`: installed_file_hashes() (computed here if not given).
    """
    from flwr.common.config import get_fab_config

    digest = _sha256(fab_content)

    def refuse(reason: str) -> Approval:
        return Approval(False, reason, digest)

    try:
        config = get_fab_config(fab_content)
        with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
            files = {name: archive.read(name) for name in archive.namelist() if name.endswith(".py")}
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        return refuse(f"not a readable Flower app bundle ({exc})")
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    clientapp = app.get("components", {}).get("clientapp")
    publisher = app.get("publisher")
    if clientapp != FEDTUNE_CLIENTAPP or publisher != FEDTUNE_PUBLISHER:
        return refuse(f"it is not the fedtune app (clientapp {clientapp!r}, publisher {publisher!r}; this site "
                      f"serves clientapp {FEDTUNE_CLIENTAPP!r} of publisher {FEDTUNE_PUBLISHER!r})")
    if digest in {h.strip().lower() for h in approved_fab_hashes}:
        return Approval(True, "its sha256 is on this site's approved_fab_hashes", digest)
    if _clientapp_module_path() not in files:
        return refuse(f"it does not contain the ClientApp module {_clientapp_module_path()}")
    installed = installed_file_hashes() if installed is None else installed
    for name, content in sorted(files.items()):
        if name not in installed:
            return refuse(f"{name} is not part of the installed fedtune")
        if installed[name] != _sha256(content):
            return refuse(f"{name} differs from the installed fedtune's")
    return Approval(True, f"its {len(files)} Python files are identical to the installed fedtune's", digest)
