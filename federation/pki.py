"""Keys and certificates for a real (deployed) Flower 1.41 federation.

Flower 1.41 secures a deployment in two independent layers:

* TLS. The SuperLink serves the Fleet, Control and Runtime APIs on ONE HTTPS port
  (`flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt
  --ssl-keyfile server.key`). SuperNodes and the `flwr` CLI verify it against the
  CA certificate (`flower-supernode --root-certificates ca.crt`, and
  `root-certificates = "ca.crt"` in the `flwr` SuperLink connection).
* SuperNode authentication. With `flower-superlink --enable-supernode-auth`, only
  SuperNodes whose EC (NIST curve) public key was registered beforehand through
  the Control API (`flwr supernode register site.pub <connection>`) may connect.
  Each site starts `flower-supernode --auth-supernode-private-key site.key`,
  where the private key is in OpenSSH format and the public key is an OpenSSH
  public key line ("ecdsa-sha2-nistp384 AAAA... comment").

Layout written by `generate_federation_credentials(out_dir, ...)`:

    out_dir/ca.crt                   every party (trust anchor)
    out_dir/ca.key                   nobody: keep offline, only signs server certs
    out_dir/server.crt, server.key   the coordinator (SuperLink)
    out_dir/sites/<site>.key         only that site (SuperNode)
    out_dir/sites/<site>.pub         the coordinator registers it
    out_dir/allowed_supernodes.txt   all site public keys, one OpenSSH line each

Run as `python -m federation.pki --out DIR --host 127.0.0.1 --sites a b`.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY_DAYS = 365
DEFAULT_CA_COMMON_NAME = "fedtune-ca"
DEFAULT_SERVER_COMMON_NAME = "fedtune-superlink"
# Back-date notBefore so peers whose clock runs slightly behind accept a fresh cert.
DEFAULT_CLOCK_SKEW = datetime.timedelta(minutes=5)
LOOPBACK_HOSTNAMES = ("127.0.0.1", "localhost")
PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644

ALLOW_LIST_FILENAME = "allowed_supernodes.txt"
SITES_DIRNAME = "sites"
# Site names become file names and SuperNode names, so keep them to a safe alphabet.
_SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CertificateAuthority:
    """Paths of the federation's CA certificate (PEM) and its private key (PEM, 0600)."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class ServerCertificate:
    """Paths of the SuperLink TLS certificate (PEM) and its private key (PEM PKCS8, 0600)."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class SiteKeyPair:
    """One SuperNode's auth key pair: OpenSSH private key (0600) and OpenSSH public key line."""

    site_name: str
    private_key_path: Path
    public_key_path: Path


@dataclass(frozen=True)
class SiteKeys:
    """All sites' key pairs plus the allow-list file holding every site public key."""

    sites: dict[str, SiteKeyPair]
    allow_list_path: Path


@dataclass(frozen=True)
class FederationCredentials:
    """Everything a deployment needs; see the module docstring for who gets which file."""

    ca: CertificateAuthority
    server: ServerCertificate
    site_keys: SiteKeys


def generate_ca(
    out_dir: str | Path,
    common_name: str = DEFAULT_CA_COMMON_NAME,
    days: int = DEFAULT_VALIDITY_DAYS,
    overwrite: bool = False,
    curve: ec.EllipticCurve | None = None,
) -> CertificateAuthority:
    """Create a self-signed CA (EC key, default P-384) as out_dir/ca.crt + ca.key."""
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / "ca.crt", out_dir / "ca.key"
    _refuse_existing([cert_path, key_path], overwrite)
    _check_days(days)

    key = ec.generate_private_key(curve or ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs leaf certificates only, never other CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private_file(key_path, _private_key_pem(key), overwrite)
    _write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite)
    return CertificateAuthority(cert_path=cert_path, key_path=key_path)


def generate_server_certificate(
    ca: CertificateAuthority,
    out_dir: str | Path,
    hostnames: Sequence[str],
    days: int = DEFAULT_VALIDITY_DAYS,
    common_name: str = DEFAULT_SERVER_COMMON_NAME,
    overwrite: bool = False,
    curve: ec.EllipticCurve | None = None,
) -> ServerCertificate:
    """Create the SuperLink TLS cert signed by `ca` (expiring no later than it).

    IP literals go into the SAN as IPAddress, everything else as DNSName. With
    `flower-superlink --host 0.0.0.0` the ServerApp process dials the SuperLink at
    127.0.0.1 over TLS, so the SAN must also hold 127.0.0.1 (see
    `generate_federation_credentials(include_loopback=True)`).
    """
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / "server.crt", out_dir / "server.key"
    _refuse_existing([cert_path, key_path], overwrite)
    _check_days(days)
    subject_alt_names = subject_alternative_names(hostnames)

    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    key = ec.generate_private_key(curve or ec.SECP384R1())
    public_key = key.public_key()
    not_before, not_after = _validity(days)
    # A leaf valid past its CA fails verification then anyway; clamping also absorbs
    # the second or so between creating a CA and a server cert with the same `days`.
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(subject_alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Python >= 3.13 verifies with VERIFY_X509_STRICT, which requires the AKI.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private_file(key_path, _private_key_pem(key), overwrite)
    _write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite)
    return ServerCertificate(cert_path=cert_path, key_path=key_path)


def generate_site_keys(
    out_dir: str | Path,
    site_names: Sequence[str],
    overwrite: bool = False,
    curve: ec.EllipticCurve | None = None,
) -> SiteKeys:
    """Create one SuperNode auth key pair per site (EC P-384, OpenSSH format) and the allow-list."""
    out_dir = Path(out_dir)
    _check_site_names(site_names)
    sites_dir = out_dir / SITES_DIRNAME
    allow_list_path = out_dir / ALLOW_LIST_FILENAME
    pairs = {
        name: SiteKeyPair(
            site_name=name,
            private_key_path=sites_dir / f"{name}.key",
            public_key_path=sites_dir / f"{name}.pub",
        )
        for name in site_names
    }
    _refuse_existing(
        [p for pair in pairs.values() for p in (pair.private_key_path, pair.public_key_path)]
        + [allow_list_path],
        overwrite,
    )

    sites_dir.mkdir(parents=True, exist_ok=True)
    allow_list_lines = []
    for name, pair in pairs.items():
        # flower-supernode reads the key with cryptography's load_ssh_private_key and
        # `flwr supernode register` with load_ssh_public_key, hence OpenSSH formats.
        key = ec.generate_private_key(curve or ec.SECP384R1())
        private_bytes = key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        )
        public_line = openssh_public_key_line(key.public_key(), comment=name)
        _write_private_file(pair.private_key_path, private_bytes, overwrite)
        _write_public_file(pair.public_key_path, (public_line + "\n").encode("ascii"), overwrite)
        allow_list_lines.append(public_line)
    _write_public_file(
        allow_list_path, ("\n".join(allow_list_lines) + "\n").encode("ascii"), overwrite
    )
    return SiteKeys(sites=pairs, allow_list_path=allow_list_path)


def generate_federation_credentials(
    out_dir: str | Path,
    hostnames: Sequence[str],
    site_names: Sequence[str],
    days: int = DEFAULT_VALIDITY_DAYS,
    ca_common_name: str = DEFAULT_CA_COMMON_NAME,
    overwrite: bool = False,
    include_loopback: bool = True,
) -> FederationCredentials:
    """Create CA, SuperLink TLS cert for `hostnames` and one auth key pair per site in out_dir.

    include_loopback adds 127.0.0.1 and localhost to the server cert: the SuperLink's
    own ServerApp runner (SuperExec) dials 127.0.0.1 over TLS when the SuperLink binds
    127.0.0.1 or 0.0.0.0, and crashes with "IP address mismatch" without it.
    """
    out_dir = Path(out_dir)
    hostnames = list(hostnames)
    if include_loopback:
        hostnames += [h for h in LOOPBACK_HOSTNAMES if h not in hostnames]
    # Validate every input and target before writing anything, so a refusal leaves
    # out_dir exactly as it was.
    subject_alternative_names(hostnames)
    _check_site_names(site_names)
    _check_days(days)
    targets = [out_dir / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    sites_dir = out_dir / SITES_DIRNAME
    targets += [sites_dir / f"{s}.{ext}" for s in site_names for ext in ("key", "pub")]
    targets.append(out_dir / ALLOW_LIST_FILENAME)
    _refuse_existing(targets, overwrite)

    ca = generate_ca(out_dir, common_name=ca_common_name, days=days, overwrite=overwrite)
    server = generate_server_certificate(ca, out_dir, hostnames, days=days, overwrite=overwrite)
    site_keys = generate_site_keys(out_dir, site_names, overwrite=overwrite)
    return FederationCredentials(ca=ca, server=server, site_keys=site_keys)


def subject_alternative_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """Map host strings to SAN entries: IP literals -> IPAddress, everything else -> DNSName."""
    if not hostnames:
        raise ValueError("at least one hostname or IP address is required for the server cert")
    names: list[x509.GeneralName] = []
    for host in hostnames:
        host = host.strip()
        if not host:
            raise ValueError("empty hostname")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def openssh_public_key_line(public_key: ec.EllipticCurvePublicKey, comment: str = "") -> str:
    """Return 'ecdsa-sha2-nistp384 AAAA... comment', the format `flwr supernode register` reads."""
    line = public_key.public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    ).decode("ascii")
    return f"{line} {comment}" if comment else line


def read_allow_list(path: str | Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """Parse an allow-list file (one OpenSSH public key line per site, comment = site name)."""
    allowed: dict[str, ec.EllipticCurvePublicKey] = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"allow-list line is not '<type> <base64 key> <site>': {line!r}")
        key_type, key_b64, site_name = fields
        if site_name in allowed:
            raise ValueError(f"duplicate allow-list entry for {site_name!r}")
        public_key = serialization.load_ssh_public_key(f"{key_type} {key_b64}".encode("ascii"))
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError(f"allow-list entry {site_name!r} is not an EC public key")
        allowed[site_name] = public_key
    return allowed


def supernode_register_command(
    site: SiteKeyPair, superlink_connection: str, flwr_executable: str = "flwr"
) -> list[str]:
    """Argv the coordinator runs to put one site on the SuperLink's SuperNode allow-list."""
    return [
        flwr_executable,
        "supernode",
        "register",
        str(site.public_key_path),
        superlink_connection,
        "--name",
        site.site_name,
    ]


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    # X.509 stores whole seconds; truncating here keeps the stored dates exact.
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now - DEFAULT_CLOCK_SKEW, now + datetime.timedelta(days=days)


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")


def _check_site_names(site_names: Sequence[str]) -> None:
    if not site_names:
        raise ValueError("at least one site name is required")
    for name in site_names:
        if not _SITE_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"invalid site name {name!r}: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
    if len(set(site_names)) != len(site_names):
        raise ValueError(f"duplicate site names in {list(site_names)}")


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite existing credentials (pass overwrite=True): {existing}"
        )


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: flower-superlink/uvicorn load --ssl-keyfile without a passphrase.
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write_private_file(path: Path, data: bytes, overwrite: bool) -> None:
    # Create with 0600 atomically: a chmod after writing would leave a window in
    # which the key is world-readable. O_EXCL also refuses to follow a planted link.
    if overwrite and (path.exists() or path.is_symlink()):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public_file(path: Path, data: bytes, overwrite: bool) -> None:
    if overwrite and (path.exists() or path.is_symlink()):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PUBLIC_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune keys",
        description="Generate the CA, SuperLink TLS certificate and per-site SuperNode auth keys.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP address of the SuperLink as the sites dial it (repeatable)",
    )
    parser.add_argument("--sites", nargs="+", required=True, help="site (SuperNode) names")
    parser.add_argument("--days", type=int, default=DEFAULT_VALIDITY_DAYS, help="validity in days")
    parser.add_argument("--ca-name", default=DEFAULT_CA_COMMON_NAME, help="CA common name")
    parser.add_argument(
        "--superlink-connection",
        default="fedtune",
        help="unused (kept for old scripts): the coordinator registers the allow-list itself",
    )
    parser.add_argument(
        "--no-loopback",
        action="store_true",
        help="do not add 127.0.0.1/localhost to the server cert (only if the SuperLink "
        "binds a specific non-loopback --host)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: `fedtune keys --out DIR --host H [--host H2] --sites A B`."""
    args = _build_parser().parse_args(argv)
    try:
        creds = generate_federation_credentials(
            args.out,
            hostnames=args.host,
            site_names=args.sites,
            days=args.days,
            ca_common_name=args.ca_name,
            overwrite=args.overwrite,
            include_loopback=not args.no_loopback,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"CA certificate (give to every party): {creds.ca.cert_path}")
    print(f"CA private key (keep offline):        {creds.ca.key_path}")
    print(f"SuperLink TLS cert/key:               {creds.server.cert_path} {creds.server.key_path}")
    print(f"SuperNode allow-list:                 {creds.site_keys.allow_list_path}")
    # `fedtune coordinator --certs DIR` registers every key of the allow-list itself at each start.
    print(f"Start the coordinator with: fedtune coordinator --certs {args.out} (it registers the allow-list)")
    for site in creds.site_keys.sites.values():
        print(f"  give {site.private_key_path} and {creds.ca.cert_path} to {site.site_name} only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
