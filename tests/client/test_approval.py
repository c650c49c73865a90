"""The site's FAB approval rule (client/approval.py): no processes, FABs built in memory with Flower's own builder."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_files

from client.approval import FEDTUNE_CLIENTAPP, FEDTUNE_PUBLISHER, check_fab, installed_file_hashes, installed_root

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = f"""
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "{{publisher}}"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "{{clientapp}}"

[tool.flwr.app.config]
rounds = 3
"""
INSTALLED = {
    "client/__init__.py": b"",
    "client/app.py": b"app = object()\n",
    "server/app.py": b"app = object()\n",
}


@pytest.fixture
def installed(tmp_path) -> dict[str, str]:
    """File hashes of a stand-in for the installed fedtune tree."""
    for name, content in INSTALLED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_bytes(b"")  # not a fedtune package: never "installed"
    (tmp_path / "client" / "__pycache__").mkdir()
    (tmp_path / "client" / "__pycache__" / "x.py").write_bytes(b"")
    return installed_file_hashes(tmp_path)


def fab(files: dict[str, bytes] | None = None, clientapp: str = FEDTUNE_CLIENTAPP,
        publisher: str = FEDTUNE_PUBLISHER) -> bytes:
    pyproject = PYPROJECT.replace("{publisher}", publisher).replace("{clientapp}", clientapp)
    return build_fab_from_files({"pyproject.toml": pyproject.encode(), **(INSTALLED if files is None else files)})[0]


def test_fab_with_the_installed_files_is_approved(installed):
    decision = check_fab(fab(), installed=installed)
    assert decision.approved, decision.reason
    assert "identical" in decision.reason


def test_modified_clientapp_file_is_refused_and_named(installed):
    decision = check_fab(fab({**INSTALLED, "client/app.py": b"app = 'steal the data'\n"}), installed=installed)
    assert not decision.approved
    assert "client/app.py differs" in decision.reason


def test_one_changed_byte_in_any_python_file_is_refused(installed):
    decision = check_fab(fab({**INSTALLED, "server/app.py": b"app = object() \n"}), installed=installed)
    assert not decision.approved and "server/app.py differs" in decision.reason


def test_installed_file_hashes_cover_the_fedtune_packages_only(installed):
    assert sorted(installed) == sorted(INSTALLED)


@pytest.mark.parametrize("extra", ["client/extra.py", "evil/payload.py", "setup.py"])
def test_python_file_the_installed_fedtune_does_not_have_is_refused(installed, extra):
    decision = check_fab(fab({**INSTALLED, extra: b"import os\n"}), installed=installed)
    assert not decision.approved
    assert f"{extra} is not part of the installed fedtune" in decision.reason


def test_fab_without_the_clientapp_module_is_refused(installed):
    decision = check_fab(fab({"server/app.py": INSTALLED["server/app.py"]}), installed=installed)
    assert not decision.approved and "client/app.py" in decision.reason


@pytest.mark.parametrize("kwargs", [{"clientapp": "client.secagg:secagg_app"}, {"clientapp": "rogue.app:app"},
                                    {"publisher": "someone-else"}])
def test_other_app_is_refused_even_if_its_hash_is_allow_listed(installed, kwargs):
    content = fab(**kwargs)
    decision = check_fab(content, approved_fab_hashes=[hashlib.sha256(content).hexdigest()], installed=installed)
    assert not decision.approved
    assert "not the fedtune app" in decision.reason


def test_allow_listed_hash_is_approved_and_only_that_hash(installed):
    modified = fab({**INSTALLED, "client/app.py": b"app = 1\n"})
    digest = hashlib.sha256(modified).hexdigest()
    decision = check_fab(modified, approved_fab_hashes=[digest.upper()], installed=installed)
    assert decision.approved and "approved_fab_hashes" in decision.reason
    assert decision.fab_sha256 == digest
    assert not check_fab(modified, approved_fab_hashes=["0" * 64], installed=installed).approved


def test_bytes_that_are_not_a_fab_are_refused(installed):
    decision = check_fab(b"not a zip", installed=installed)
    assert not decision.approved and "not a readable Flower app bundle" in decision.reason


def test_constants_match_this_projects_pyproject():
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"]["clientapp"] == FEDTUNE_CLIENTAPP
    assert app["publisher"] == FEDTUNE_PUBLISHER


def test_fab_of_this_checkout_is_approved_against_the_installed_tree():
    files = {"pyproject.toml": (REPO / "pyproject.toml").read_bytes()}
    for package in ("client", "federation", "server", "strategies"):
        files.update({path.relative_to(REPO).as_posix(): path.read_bytes() for path in (REPO / package).rglob("*.py")})
    assert installed_root() == REPO
    decision = check_fab(build_fab_from_files(files)[0])
    assert decision.approved, decision.reason
