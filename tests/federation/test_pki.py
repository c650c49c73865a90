"""Keys and certificates for a deployed Flower 1.41 federation (federation/pki.py)."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from federation import pki

SITES = ["hospital-a", "bank-b"]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


@pytest.fixture
def creds(tmp_path) -> pki.FederationCredentials:
    return pki.generate_federation_credentials(
        tmp_path / "creds", hostnames=["coordinator.example.org", "10.0.0.5"], site_names=SITES
    )


def test_ca_is_a_self_signed_ca_valid_for_exactly_the_given_days(tmp_path):
    ca = pki.generate_ca(tmp_path, common_name="test-ca", days=7)
    cert = _cert(ca.cert_path)

    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=test-ca"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == (
        datetime.timedelta(days=7) + pki.DEFAULT_CLOCK_SKEW
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def test_server_cert_is_signed_by_the_ca_with_ip_and_dns_sans(tmp_path):
    ca = pki.generate_ca(tmp_path / "ca", days=30)
    hosts = ["127.0.0.1", "localhost", "coordinator.example.org", "::1"]
    server = pki.generate_server_certificate(ca, tmp_path / "server", hosts, days=10)
    ca_cert, cert = _cert(ca.cert_path), _cert(server.cert_path)

    cert.verify_directly_issued_by(ca_cert)
    assert cert.issuer == ca_cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coordinator.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == (
        datetime.timedelta(days=10) + pki.DEFAULT_CLOCK_SKEW
    )


def test_server_cert_passes_tls_client_verification_only_for_its_names(tmp_path):
    ca = pki.generate_ca(tmp_path, days=30)
    server = pki.generate_server_certificate(ca, tmp_path, ["127.0.0.1", "localhost"], days=10)
    store = Store([_cert(ca.cert_path)])
    leaf = _cert(server.cert_path)

    def verify(name: x509.GeneralName) -> None:
        PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, [])

    verify(x509.DNSName("localhost"))
    verify(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    with pytest.raises(VerificationError):
        verify(x509.DNSName("evil.example.org"))
    with pytest.raises(VerificationError):
        verify(x509.IPAddress(ipaddress.ip_address("127.0.0.2")))


def test_server_cert_never_outlives_its_ca(tmp_path):
    ca = pki.generate_ca(tmp_path, days=5)
    server = pki.generate_server_certificate(ca, tmp_path, ["localhost"], days=10)

    assert _cert(server.cert_path).not_valid_after_utc == _cert(ca.cert_path).not_valid_after_utc


def test_federation_cert_includes_loopback_for_the_superlinks_own_serverapp(creds):
    san = _cert(creds.server.cert_path).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value

    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]


def test_private_keys_are_created_0600_and_public_files_0644(tmp_path, monkeypatch):
    # Forbid chmod: the 0600 mode must come from os.open at creation time.
    def no_chmod(*args, **kwargs):
        raise AssertionError("private keys must be created 0600, not chmod-ed afterwards")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old_umask = os.umask(0o022)
    try:
        creds = pki.generate_federation_credentials(tmp_path, ["localhost"], SITES)
    finally:
        os.umask(old_umask)

    private = [creds.ca.key_path, creds.server.key_path] + [
        s.private_key_path for s in creds.site_keys.sites.values()
    ]
    public = [creds.ca.cert_path, creds.server.cert_path, creds.site_keys.allow_list_path] + [
        s.public_key_path for s in creds.site_keys.sites.values()
    ]
    assert [_mode(p) for p in private] == [0o600] * (2 + len(SITES))
    assert [_mode(p) for p in public] == [0o644] * (3 + len(SITES))


def test_site_keys_are_matching_p384_openssh_pairs(creds):
    for name, site in creds.site_keys.sites.items():
        private_key = serialization.load_ssh_private_key(site.private_key_path.read_bytes(), None)
        public_key = serialization.load_ssh_public_key(site.public_key_path.read_bytes())

        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        assert isinstance(private_key.curve, ec.SECP384R1)
        assert _same_key(private_key.public_key(), public_key)
        key_type, _, comment = site.public_key_path.read_text().split()
        assert (key_type, comment) == ("ecdsa-sha2-nistp384", name)
    keys = [s.private_key_path.read_bytes() for s in creds.site_keys.sites.values()]
    assert len(set(keys)) == len(SITES)


def test_site_keys_load_with_flowers_own_loaders_and_sign(creds):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        sign_message,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for site in creds.site_keys.sites.values():
        # Exactly what `flower-supernode --auth-supernode-private-key` runs.
        args = argparse.Namespace(
            auth_supernode_private_key=str(site.private_key_path), auth_supernode_public_key=None
        )
        private_key, _ = _try_setup_client_authentication(args)
        # Exactly what `flwr supernode register <public key>` sends to the SuperLink.
        registered = bytes_to_public_key(try_load_public_key(site.public_key_path))

        signature = sign_message(private_key, b"2026-01-01T00:00:00+00:00")
        assert verify_signature(registered, b"2026-01-01T00:00:00+00:00", signature)


def test_allow_list_holds_exactly_the_site_public_keys(creds):
    lines = creds.site_keys.allow_list_path.read_text().splitlines()

    assert lines == [s.public_key_path.read_text().strip() for s in creds.site_keys.sites.values()]
    allowed = pki.read_allow_list(creds.site_keys.allow_list_path)
    assert list(allowed) == SITES
    for name, site in creds.site_keys.sites.items():
        private_key = serialization.load_ssh_private_key(site.private_key_path.read_bytes(), None)
        assert _same_key(allowed[name], private_key.public_key())


def test_register_command_names_the_site_and_its_public_key(creds):
    site = creds.site_keys.sites["bank-b"]

    assert pki.supernode_register_command(site, "prod") == [
        "flwr",
        "supernode",
        "register",
        str(site.public_key_path),
        "prod",
        "--name",
        "bank-b",
    ]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    first = pki.generate_federation_credentials(tmp_path, ["localhost"], SITES)
    ca_key_before = first.ca.key_path.read_bytes()

    with pytest.raises(FileExistsError):
        pki.generate_federation_credentials(tmp_path, ["localhost"], SITES)
    assert first.ca.key_path.read_bytes() == ca_key_before

    second = pki.generate_federation_credentials(tmp_path, ["localhost"], SITES, overwrite=True)
    assert second.ca.key_path.read_bytes() != ca_key_before
    assert _mode(second.ca.key_path) == 0o600


def test_one_existing_site_key_blocks_everything_before_any_write(tmp_path):
    (tmp_path / pki.SITES_DIRNAME).mkdir()
    (tmp_path / pki.SITES_DIRNAME / "bank-b.key").write_text("precious")

    with pytest.raises(FileExistsError):
        pki.generate_federation_credentials(tmp_path, ["localhost"], SITES)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["bank-b.key"]


@pytest.mark.parametrize(
    "sites", [[], ["a", "a"], ["../evil"], [".hidden"], ["has space"], ["a/b"]]
)
def test_rejects_unsafe_or_duplicate_site_names(tmp_path, sites):
    with pytest.raises(ValueError):
        pki.generate_site_keys(tmp_path, sites)
    assert list(tmp_path.iterdir()) == []


def test_rejects_missing_hostnames(tmp_path):
    ca = pki.generate_ca(tmp_path)
    with pytest.raises(ValueError):
        pki.generate_server_certificate(ca, tmp_path / "s", [])


def test_cli_writes_credentials_and_refuses_a_second_run(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--host", "127.0.0.1", "--host", "localhost"]
    argv += ["--sites", *SITES]

    assert pki.main(argv) == 0
    out = capsys.readouterr().out
    # The coordinator registers the allow-list itself: no manual register commands to follow.
    assert "flwr supernode register" not in out and "fedtune coordinator --certs" in out
    assert sorted(pki.read_allow_list(tmp_path / pki.ALLOW_LIST_FILENAME)) == sorted(SITES)
    assert pki.main(argv) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


SUPERLINK_STARTUP_TIMEOUT_S = 25.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None,
    reason="flower-superlink not installed next to this interpreter",
)
def test_real_superlink_serves_https_with_generated_credentials(tmp_path):
    creds = pki.generate_federation_credentials(tmp_path / "creds", ["localhost"], SITES)
    port = _free_port()
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "home"), FLWR_TELEMETRY_ENABLED="0")
    superlink = Path(sys.executable).parent / "flower-superlink"
    # process isolation: no ServerApp runner is spawned, so only the HTTPS API is tested.
    command = [
        str(superlink),
        "--ssl-ca-certfile", str(creds.ca.cert_path),
        "--ssl-certfile", str(creds.server.cert_path),
        "--ssl-keyfile", str(creds.server.key_path),
        "--enable-supernode-auth",
        "--isolation", "process",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    trusted = ssl.create_default_context(cafile=str(creds.ca.cert_path))
    url = f"https://localhost:{port}/health"
    try:
        deadline = time.monotonic() + SUPERLINK_STARTUP_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(url, context=trusted, timeout=5) as response:
                    status = response.status
                break
            except (urllib.error.URLError, ConnectionError) as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"SuperLink did not serve HTTPS: {err}")
                time.sleep(0.2)
        assert status == 200
        # The system trust store does not know our CA: verification must fail.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
