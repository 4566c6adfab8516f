"""Certificates, keys and start-up kits for a fedmsk federation (``fedmsk provision``).

A federation needs three kinds of secrets, made here with ``cryptography`` and nothing else:

* a private certificate authority (CA). Every SuperNode trusts only this CA, so a hospital node
  talks to the coordinator's SuperLink and to nothing that merely holds a public web certificate
  (nor to a TLS-inspecting proxy);
* the SuperLink's TLS certificate, signed by the CA, valid for the name the hospitals dial;
* one EC P-384 key pair per site for Flower's node authentication: the SuperLink only accepts
  nodes whose public key the coordinator registered (``flwr supernode register``).

Layout of ``OUT`` (the contract the docs and the integration tests rely on)::

    OUT/provision.json                 manifest: what exists, fingerprints, no key material
    OUT/ca/ca.key (0600), ca.crt       the CA key never leaves this folder
    OUT/coordinator/                   ca.crt, server.crt, server.key (0600),
                                       start-superlink.sh, register-supernodes.sh,
                                       supernodes/<site>.pub, flwr-home/config.toml, state/
    OUT/sites/<site>/                  ca.crt, node.key (0600, OpenSSH), node.pub (OpenSSH),
                                       node-config.toml, start-supernode.sh, README.txt

Re-running is safe: existing keys and certificates are kept unless ``force`` is given, so a new
site can be added to a running federation without touching the others. Scripts, the Flower
CLI config and the manifest are derived files and are rewritten on every run; a site's
``node-config.toml`` is the hospital's own edit and is never overwritten.

Facts about Flower 1.41 that shaped this module (checked against the installed ``flwr``):
the SuperLink serves Fleet, Control and runtime APIs over HTTPS on one ``--host/--port``
(default 127.0.0.1:8000); its own SuperExec dials that port on 127.0.0.1 when bound to 0.0.0.0,
which is why the server certificate always names ``localhost`` and ``127.0.0.1`` as well;
``flower-supernode`` loads ``--auth-supernode-private-key`` with ``load_ssh_private_key`` and
``flwr supernode register`` loads the public key with ``load_ssh_public_key`` (NIST curves only);
``--node-config`` accepts the path of a ``.toml`` file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650
MAX_DAYS = 3650
DEFAULT_PORT = 8000
DEFAULT_BIND_HOST = "0.0.0.0"
DEFAULT_NODE_PORT_BASE = 9094
CONNECTION_NAME = "fedmsk"
MANIFEST_NAME = "provision.json"
MANIFEST_FORMAT = 1
DATA_DIR_PLACEHOLDER = "/path/to/site"
# The SuperLink's own SuperExec connects to 127.0.0.1 when it is bound to 0.0.0.0; co-hosted
# tools use localhost. Both must therefore be in the server certificate.
ALWAYS_SANS = ("DNS:localhost", "IP:127.0.0.1")

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CLOCK_SKEW = dt.timedelta(minutes=5)


class ProvisionError(ValueError):
    """A problem the coordinator can fix: the message names the setting or file and what to do."""


@dataclass(frozen=True)
class SiteKit:
    """One hospital's start-up kit. Hand ``dir`` over as a whole; it holds no CA key."""

    name: str
    dir: Path
    ca_cert: Path
    node_private_key: Path
    node_public_key: Path
    node_config: Path
    start_script: Path
    readme: Path
    node_port: int
    superlink_address: str
    command: list[str]
    """``flower-supernode`` argv with absolute paths (what ``start_script`` runs)."""


@dataclass(frozen=True)
class CoordinatorKit:
    """What the coordinator needs to run the SuperLink and admit the sites' nodes."""

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    start_script: Path
    register_script: Path
    flwr_home: Path
    flwr_config: Path
    state_dir: Path
    public_keys: dict[str, Path]
    superlink_command: list[str]
    """``flower-superlink`` argv with absolute paths (what ``start_script`` runs)."""
    register_commands: dict[str, list[str]]
    """Per site, ``flwr supernode register`` argv; run it with ``FLWR_HOME=flwr_home``."""


@dataclass(frozen=True)
class ProvisionResult:
    """Paths of everything provisioned, plus what this run created and what it kept."""

    out: Path
    manifest: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    server_name: str
    superlink_address: str
    coordinator: CoordinatorKit
    sites: dict[str, SiteKit]
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Ledger:
    """What one run created and kept, for the summary the coordinator reads."""

    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- validation


def validate_site_names(sites: list[str]) -> list[str]:
    """Check site names: they become folder names and the node's ``site-alias``."""
    cleaned = [s.strip() for s in sites if s.strip()]
    if not cleaned:
        raise ProvisionError("--sites: give at least one site name, e.g. --sites A,B,C")
    seen: dict[str, str] = {}
    for name in cleaned:
        if not _SITE_NAME.fullmatch(name):
            raise ProvisionError(
                f"--sites: site name {name!r} is not allowed; use 1-63 letters, digits, '.', "
                "'_' or '-', starting with a letter or digit"
            )
        key = name.lower()
        if key in seen:
            raise ProvisionError(
                f"--sites: site {name!r} is given twice (names are compared ignoring case, "
                "because they become folder names)"
            )
        seen[key] = name
    return cleaned


def _is_dns_name(name: str, allow_wildcard: bool = False) -> bool:
    if allow_wildcard and name.startswith("*."):
        name = name[2:]
    if not name or len(name) > 253:
        return False
    return all(_DNS_LABEL.fullmatch(label) for label in name.rstrip(".").split("."))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def validate_server_name(server_name: str) -> str:
    """Check the name the SuperNodes dial: a DNS name or an IP address, without port or URL."""
    name = server_name.strip()
    if not name:
        raise ProvisionError("--server-name: give the host name or IP the hospitals connect to")
    if "://" in name or "/" in name:
        raise ProvisionError(
            f"--server-name {server_name!r}: give a bare host name or IP address, not a URL"
        )
    if _ip(name) is not None:
        return str(_ip(name))
    if re.fullmatch(r"[0-9.]+", name):
        raise ProvisionError(f"--server-name {server_name!r} is not a valid IP address")
    if ":" in name:
        raise ProvisionError(
            f"--server-name {server_name!r}: give the port with --port, not in the server name"
        )
    if not _is_dns_name(name):
        raise ProvisionError(
            f"--server-name {server_name!r} is not a valid DNS name or IP address (labels of "
            "letters, digits and '-', separated by dots)"
        )
    return name.rstrip(".").lower()


def parse_san(text: str) -> x509.GeneralName:
    """Parse one subject alternative name written ``DNS:name`` or ``IP:address``."""
    kind, sep, value = text.strip().partition(":")
    kind = kind.strip().upper()
    value = value.strip()
    if sep and kind == "DNS" and _is_dns_name(value, allow_wildcard=True):
        return x509.DNSName(value.rstrip(".").lower())
    if sep and kind == "IP" and _ip(value) is not None:
        return x509.IPAddress(_ip(value))  # type: ignore[arg-type]
    raise ProvisionError(
        f"--san {text!r}: expected DNS:<host name> or IP:<address>, e.g. DNS:fl.example.org "
        "or IP:10.0.0.5"
    )


def parse_sans(items: list[str]) -> list[x509.GeneralName]:
    """Parse ``--san`` values; each may hold several names separated by commas."""
    return [parse_san(part) for item in items for part in item.split(",") if part.strip()]


def _server_name_san(server_name: str) -> x509.GeneralName:
    ip = _ip(server_name)
    return x509.IPAddress(ip) if ip is not None else x509.DNSName(server_name)


def _all_sans(server_name: str, sans: list[str]) -> list[x509.GeneralName]:
    """Server name first, then the extra names, then the always-present local names."""
    ordered = [_server_name_san(server_name), *parse_sans(sans), *parse_sans(list(ALWAYS_SANS))]
    unique: list[x509.GeneralName] = []
    for name in ordered:
        if name not in unique:
            unique.append(name)
    return unique


def _check_int(value: int, low: int, high: int, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProvisionError(f"{setting}={value!r}: give a whole number from {low} to {high}")
    return value


def format_address(host: str, port: int) -> str:
    """``host:port`` as Flower expects it, with brackets around an IPv6 address."""
    ip = _ip(host)
    return f"[{ip}]:{port}" if ip is not None and ip.version == 6 else f"{host}:{port}"


def san_strings(names: list[x509.GeneralName]) -> list[str]:
    """``DNS:x`` / ``IP:y`` strings, for the manifest and messages."""
    return [f"IP:{n.value}" if isinstance(n, x509.IPAddress) else f"DNS:{n.value}" for n in names]


# --------------------------------------------------------------------------- file writing


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same folder, created with ``mode`` from the start,
    so a private key is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_secret(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes | str, executable: bool = False) -> None:
    payload = data.encode() if isinstance(data, str) else data
    _write_atomic(path, payload, 0o755 if executable else 0o644)


def _make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


# --------------------------------------------------------------------------- crypto


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, colon-separated, as ``openssl x509 -fingerprint`` prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmsk federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedmsk federation CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
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
        .add_extension(_ski(key), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_name: str,
    sans: list[x509.GeneralName],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate: serverAuth only, names in the SAN extension (clients
    ignore the common name), never valid past the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
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
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_ski(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys(site: str) -> tuple[bytes, bytes]:
    """An EC P-384 key pair in the OpenSSH formats Flower 1.41 reads: the private key
    unencrypted (the SuperNode starts unattended), the public key with a comment naming the
    site so the coordinator can tell registered keys apart."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedmsk-{site}\n".encode()


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisionError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{path}: expected an EC private key; re-create it with --force")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ProvisionError(f"{path}: not a PEM certificate ({exc})") from exc


def _same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _cert_sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


# --------------------------------------------------------------------------- steps


def _ensure_ca(
    ca_dir: Path, ca_days: int, force: bool, ledger: _Ledger
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bool]:
    """Load the existing CA, or make one. Returns (key, cert, created)."""
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    _make_private_dir(ca_dir)
    if not force and (key_path.exists() or cert_path.exists()):
        if not (key_path.exists() and cert_path.exists()):
            missing = cert_path if key_path.exists() else key_path
            raise ProvisionError(
                f"{missing} is missing while its partner exists: the CA is incomplete. "
                "Restore it from your backup, or re-create everything with --force (every "
                "site then needs its new kit)"
            )
        key, cert = _load_pem_key(key_path), _load_cert(cert_path)
        if not _same_public_key(key, cert):
            raise ProvisionError(
                f"{key_path} does not belong to {cert_path}; restore the pair or use --force"
            )
        ledger.kept += [key_path, cert_path]
        ledger.notes.append(f"kept the existing CA in {ca_dir} (use --force to replace it)")
        return key, cert, False
    key, cert = make_ca(ca_days)
    _write_secret(key_path, _pem_private(key))
    _write_public(cert_path, _pem_cert(cert))
    ledger.created += [key_path, cert_path]
    return key, cert, True


def _ensure_server(
    coord_dir: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_name: str,
    sans: list[x509.GeneralName],
    days: int,
    renew: bool,
    ledger: _Ledger,
) -> x509.Certificate:
    """Keep a server certificate that still fits (same CA, same names), else refuse; make a
    new one when there is none or ``renew`` is set."""
    key_path, cert_path = coord_dir / "server.key", coord_dir / "server.crt"
    reissue = (
        f"to re-issue it from the same CA (site kits stay valid), delete server.crt and "
        f"server.key in {coord_dir} and re-run; --force re-creates the whole federation"
    )
    if not renew and (key_path.exists() or cert_path.exists()):
        if not (key_path.exists() and cert_path.exists()):
            raise ProvisionError(f"only one of {key_path} and {cert_path} exists; {reissue}")
        key, cert = _load_pem_key(key_path), _load_cert(cert_path)
        if not _same_public_key(key, cert) or not _issued_by(cert, ca_cert):
            raise ProvisionError(
                f"{cert_path} does not match {key_path} or was not issued by the CA in "
                f"{coord_dir.parent / 'ca' / 'ca.crt'}; {reissue}"
            )
        if set(san_strings(_cert_sans(cert))) != set(san_strings(sans)):
            raise ProvisionError(
                f"{cert_path} was issued for {', '.join(san_strings(_cert_sans(cert)))}, not "
                f"{', '.join(san_strings(sans))}; {reissue}"
            )
        ledger.kept += [key_path, cert_path]
        expires = cert.not_valid_after_utc.date().isoformat()
        ledger.notes.append(f"kept the SuperLink certificate {cert_path} (expires {expires})")
        if cert.not_valid_after_utc <= _now():
            ledger.notes.append(f"WARNING: {cert_path} has expired; {reissue}")
        return cert
    if _now() + dt.timedelta(days=days) > ca_cert.not_valid_after_utc + dt.timedelta(days=1):
        raise ProvisionError(
            f"--days {days}: the CA in ca/ca.crt expires on "
            f"{ca_cert.not_valid_after_utc.date().isoformat()}, before the requested server "
            "certificate would; ask for fewer days or re-create the CA with --force"
        )
    key, cert = make_server_cert(ca_key, ca_cert, server_name, sans, days)
    _write_secret(key_path, _pem_private(key))
    _write_public(cert_path, _pem_cert(cert))
    ledger.created += [key_path, cert_path]
    return cert


def _ensure_node_keys(site_dir: Path, site: str, force: bool, ledger: _Ledger) -> bytes:
    """Keep the site's key pair unless forced. A deleted private key with its public key still
    present means the kit was handed over and cleaned up: keep the public key."""
    key_path, pub_path = site_dir / "node.key", site_dir / "node.pub"
    if not force and (key_path.exists() or pub_path.exists()):
        if key_path.exists():
            try:
                private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
            except (ValueError, TypeError) as exc:
                raise ProvisionError(
                    f"{key_path}: not an unencrypted OpenSSH private key ({exc}); re-create "
                    "it with --force"
                ) from exc
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise ProvisionError(f"{key_path}: not an EC key; re-create it with --force")
            derived = private.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            if not pub_path.exists() or pub_path.read_bytes().split()[:2] != derived.split():
                _write_public(pub_path, derived + f" fedmsk-{site}\n".encode())
                ledger.notes.append(f"re-derived {pub_path} from {key_path}")
            ledger.kept.append(key_path)
        else:
            ledger.notes.append(
                f"{key_path} is absent (kit handed over?); kept the public key {pub_path}"
            )
        ledger.kept.append(pub_path)
        return pub_path.read_bytes()
    private, public = make_node_keys(site)
    _write_secret(key_path, private)
    _write_public(pub_path, public)
    ledger.created += [key_path, pub_path]
    return public


def node_config_text(site: str, data_dir: str = DATA_DIR_PLACEHOLDER, device: str = "auto") -> str:
    """The SuperNode's ``--node-config`` file: where the site's data lives, the alias that
    reports use for it, and the training device. Only the alias ever leaves the site."""
    return (
        f"# fedmsk node configuration for site {site}. Edit data-dir, then start the node.\n"
        "# data-dir: the site folder that `fedmsk data check` accepted (stays on this machine).\n"
        "# device: auto, cpu, cuda, cuda:N or mps.\n"
        f"data-dir = {json.dumps(data_dir)}\n"
        f"site-alias = {json.dumps(site)}\n"
        f"device = {json.dumps(device)}\n"
    )


def write_node_config(kit: SiteKit, data_dir: Path | str, device: str = "auto") -> Path:
    """Fill in a kit's ``node-config.toml`` (for scripted set-ups and integration tests)."""
    _write_public(kit.node_config, node_config_text(kit.name, str(data_dir), device))
    return kit.node_config


# --------------------------------------------------------------------------- commands


def supernode_command(kit_dir: str, superlink_address: str, node_port: int) -> list[str]:
    """``flower-supernode`` argv. The node only dials out; ``--port`` is its local runtime API
    on 127.0.0.1, distinct per site so that several nodes can share a host."""
    return [
        "flower-supernode",
        "--superlink",
        superlink_address,
        "--root-certificates",
        f"{kit_dir}/ca.crt",
        "--auth-supernode-private-key",
        f"{kit_dir}/node.key",
        "--node-config",
        f"{kit_dir}/node-config.toml",
        "--port",
        str(node_port),
    ]


def superlink_command(kit_dir: str, bind_host: str, port: int) -> list[str]:
    """``flower-superlink`` argv: TLS, node authentication, no dependency installation at run
    time (the default ``uv sync`` fails offline), and a state file so registered node keys
    survive a restart."""
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        f"{kit_dir}/ca.crt",
        "--ssl-certfile",
        f"{kit_dir}/server.crt",
        "--ssl-keyfile",
        f"{kit_dir}/server.key",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        bind_host,
        "--port",
        str(port),
        "--database",
        f"{kit_dir}/state/superlink.db",
    ]


def register_command(public_key: str, site: str) -> list[str]:
    """``flwr supernode register`` argv for one site (needs ``FLWR_HOME`` set to the kit's)."""
    return ["flwr", "supernode", "register", public_key, CONNECTION_NAME, "--name", site]


def _sh(args: list[str]) -> str:
    """Shell words, one option per line; ``$KIT_DIR`` paths stay expandable."""
    words = [f'"{a}"' if a.startswith("$KIT_DIR") else shlex.quote(a) for a in args]
    i = 1
    while i < len(words) and not words[i].startswith("--"):
        i += 1
    lines = [" ".join(words[:i])]
    while i < len(words):
        if words[i].startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
            lines.append(f"{words[i]} {words[i + 1]}")
            i += 2
        else:
            lines.append(words[i])
            i += 1
    return " \\\n    ".join(lines)


_SCRIPT_HEAD = """#!/bin/sh
# Generated by `fedmsk provision`; re-running it rewrites this file.
{comment}
set -eu
KIT_DIR=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
"""


def _supernode_script(site: str, superlink_address: str, node_port: int) -> str:
    head = _SCRIPT_HEAD.format(
        comment=(
            f"# Starts the fedmsk SuperNode of site {site}. It dials out to {superlink_address}"
            "\n# over TLS and accepts no connection from outside this machine."
        )
    )
    check = (
        f'if grep -q \'^data-dir = "{DATA_DIR_PLACEHOLDER}"\' "$KIT_DIR/node-config.toml"; '
        "then\n"
        '    echo "$KIT_DIR/node-config.toml: set data-dir to this site\'s data folder first" >&2\n'
        "    exit 2\n"
        "fi\n"
    )
    command = _sh([*supernode_command("$KIT_DIR", superlink_address, node_port), "$@"])
    return head + check + "exec " + command.replace("'$@'", '"$@"') + "\n"


def _superlink_script(bind_host: str, port: int) -> str:
    head = _SCRIPT_HEAD.format(
        comment=(
            "# Starts the fedmsk SuperLink with TLS and SuperNode authentication. Register the\n"
            "# sites' public keys with register-supernodes.sh once it is up."
        )
    )
    command = _sh([*superlink_command("$KIT_DIR", bind_host, port), "$@"])
    return head + "exec " + command.replace("'$@'", '"$@"') + "\n"


def _register_script(sites: list[str]) -> str:
    head = _SCRIPT_HEAD.format(
        comment=(
            "# Registers each site's public key with the running SuperLink and records the\n"
            "# node ID Flower gives it in supernodes/node-ids.txt (`flwr supernode list` shows\n"
            "# IDs, not site names). A key that is already registered is reported and skipped.\n"
            "# Runs bind each site to its key through that file (federation.node_registry)."
        )
    )
    register = " ".join(
        '"$KIT_DIR/supernodes/$1.pub"' if w == "PUBKEY" else ('"$1"' if w == "SITE" else w)
        for w in register_command("PUBKEY", "SITE")
    )
    body = f"""export FLWR_HOME="$KIT_DIR/flwr-home"
status=0
register_site() {{
    if output=$({register} 2>&1); then
        printf '%s\\n' "$output"
        printf '%s\\n' "$output" | grep -o 'SuperNode [0-9][0-9]*' | sed "s/^SuperNode /$1 /" \\
            >> "$KIT_DIR/supernodes/node-ids.txt" || true
    else
        case $output in
        *"already in use"*) echo "site $1: key already registered" ;;
        *) printf 'site %s: %s\\n' "$1" "$output" >&2; status=1 ;;
        esac
    fi
}}
"""
    calls = "".join(f"register_site {site}\n" for site in sites)
    tail = (
        'if [ "$status" -ne 0 ]; then echo "some keys were not registered (see above)" >&2; fi\n'
        'exit "$status"\n'
    )
    return head + body + calls + tail


def flwr_config_text(superlink_address: str, ca_cert: Path) -> str:
    """``$FLWR_HOME/config.toml`` for the coordinator's ``flwr`` CLI; Flower wants an absolute
    ``root-certificates`` path."""
    return (
        "# Generated by `fedmsk provision`. Use with FLWR_HOME set to this folder.\n"
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f"address = {json.dumps(superlink_address)}\n"
        f"root-certificates = {json.dumps(str(ca_cert.resolve()))}\n"
    )


def _site_readme(site: str, superlink_address: str) -> str:
    return (
        f"fedmsk start-up kit for site {site}\n\n"
        "1. Keep node.key secret: it is this site's identity in the federation (mode 0600).\n"
        "2. Run `fedmsk data check /path/to/site` and fix what it reports.\n"
        "3. Set data-dir in node-config.toml to that folder.\n"
        "4. Run ./start-supernode.sh (needs fedmsk installed on this machine).\n\n"
        f"The node opens one outbound HTTPS connection to {superlink_address} and no inbound\n"
        "port. Only model weights, example counts and aggregate metrics leave the site.\n"
        "See docs/hospital-it.md in the fedmsk repository for details.\n"
    )


# --------------------------------------------------------------------------- manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProvisionError(
            f"{path}: unreadable manifest ({exc}); fix or delete it (keys and certificates "
            "are kept either way)"
        ) from exc
    if not isinstance(data, dict):
        raise ProvisionError(f"{path}: expected a JSON object; fix or delete it")
    return data


def _previous_sites(manifest: dict[str, Any], sites_dir: Path) -> dict[str, int | None]:
    """Sites already provisioned, with their node ports, in their original order."""
    found: dict[str, int | None] = {}
    for entry in manifest.get("sites", []):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            port = entry.get("node_port")
            found[entry["name"]] = port if isinstance(port, int) else None
    if sites_dir.is_dir():
        for child in sorted(sites_dir.iterdir()):
            known = child.name in found or not _SITE_NAME.fullmatch(child.name)
            if (child / "node.pub").exists() and not known:
                found[child.name] = None
    return found


def _assign_ports(names: list[str], known: dict[str, int | None], base: int) -> dict[str, int]:
    """Keep each site's port; give new sites the lowest free port from ``base``."""
    ports = {n: p for n, p in known.items() if n in names and p is not None}
    used = set(ports.values())
    for name in names:
        if name not in ports:
            port = base
            while port in used:
                port += 1
            ports[name] = port
            used.add(port)
    return ports


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _manifest(
    result: ProvisionResult, ca_cert: x509.Certificate, server_cert: x509.Certificate
) -> dict[str, Any]:
    """Paths relative to OUT, fingerprints and dates; no key material."""
    out = result.out
    coord = result.coordinator
    return {
        "format": MANIFEST_FORMAT,
        "tool": "fedmsk provision",
        "server_name": result.server_name,
        "superlink_address": result.superlink_address,
        "flwr_connection": CONNECTION_NAME,
        "ca": {
            "cert": _rel(result.ca_cert, out),
            "key": _rel(result.ca_key, out),
            "subject": ca_cert.subject.rfc4514_string(),
            "sha256": fingerprint(ca_cert),
            "not_after": ca_cert.not_valid_after_utc.isoformat(),
        },
        "server": {
            "cert": _rel(result.server_cert, out),
            "key": _rel(result.server_key, out),
            "sans": san_strings(_cert_sans(server_cert)),
            "sha256": fingerprint(server_cert),
            "not_before": server_cert.not_valid_before_utc.isoformat(),
            "not_after": server_cert.not_valid_after_utc.isoformat(),
        },
        "coordinator": {
            "dir": _rel(coord.dir, out),
            "start_script": _rel(coord.start_script, out),
            "register_script": _rel(coord.register_script, out),
            "flwr_home": _rel(coord.flwr_home, out),
            "superlink_command": coord.superlink_command,
        },
        "sites": [
            {
                "name": kit.name,
                "dir": _rel(kit.dir, out),
                "node_port": kit.node_port,
                "public_key": _rel(kit.node_public_key, out),
                "public_key_sha256": hashlib.sha256(
                    b" ".join(kit.node_public_key.read_bytes().split()[:2])
                ).hexdigest(),
                "private_key_present": kit.node_private_key.exists(),
                "files": sorted(_rel(p, out) for p in kit.dir.iterdir() if p.is_file()),
            }
            for kit in result.sites.values()
        ],
        "private_keys": [
            _rel(p, out)
            for p in [result.ca_key, result.server_key]
            + [k.node_private_key for k in result.sites.values()]
            if p.exists()
        ],
    }


# --------------------------------------------------------------------------- entry point


def provision(
    out: Path,
    sites: list[str],
    server_name: str,
    sans: list[str] | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    *,
    port: int = DEFAULT_PORT,
    bind_host: str = DEFAULT_BIND_HOST,
    ca_days: int = DEFAULT_CA_DAYS,
    node_port_base: int = DEFAULT_NODE_PORT_BASE,
) -> ProvisionResult:
    """Create or complete a federation's CA, SuperLink certificate and site kits under ``out``.

    ``sites`` may name only new sites: sites already in ``out`` stay part of the federation.
    Without ``force`` nothing secret is overwritten; with it the CA, the server certificate and
    the named sites' node keys are all made anew (every site then needs its new ``ca.crt``).
    ``bind_host``/``port`` are where the SuperLink listens; nodes dial ``server_name:port``.
    Raises :class:`ProvisionError` for input the caller can fix.
    """
    names = validate_site_names(list(sites))
    server_name = validate_server_name(server_name)
    all_sans = _all_sans(server_name, list(sans or []))
    _check_int(days, 1, MAX_DAYS, "--days")
    _check_int(ca_days, 1, 2 * MAX_DAYS, "--ca-days")
    _check_int(port, 1, 65535, "--port")
    _check_int(node_port_base, 1024, 65535, "--node-port-base")
    if _ip(bind_host) is None and not _is_dns_name(bind_host):
        raise ProvisionError(f"--bind-host {bind_host!r}: give an IP address such as 0.0.0.0")

    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"{out}: exists and is not a folder; choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    previous = _previous_sites(_read_manifest(manifest_path), out / "sites")
    lowered = {n.lower(): n for n in previous}
    for name in names:
        if name.lower() in lowered and lowered[name.lower()] != name:
            raise ProvisionError(
                f"--sites: {name!r} clashes with the existing site {lowered[name.lower()]!r} "
                "(names are compared ignoring case)"
            )
    all_names = list(previous) + [n for n in names if n not in previous]
    ports = _assign_ports(all_names, previous, node_port_base)

    ledger = _Ledger()
    ca_key, ca_cert, ca_created = _ensure_ca(out / "ca", ca_days, force, ledger)
    coord_dir = out / "coordinator"
    _make_private_dir(coord_dir)
    server_cert = _ensure_server(
        coord_dir, ca_key, ca_cert, server_name, all_sans, days, force or ca_created, ledger
    )
    address = format_address(server_name, port)

    kits: dict[str, SiteKit] = {}
    for site in all_names:
        kits[site] = _build_site_kit(
            out, site, address, ports[site], force and site in names, ledger
        )
    if ca_created and len(previous) > 0:
        ledger.notes.append(
            "the CA is new: give every site its new ca.crt (the whole kit folder is simplest)"
        )
    coordinator = _build_coordinator_kit(coord_dir, out, kits, bind_host, port, address)
    result = ProvisionResult(
        out=out,
        manifest=manifest_path,
        ca_cert=out / "ca" / "ca.crt",
        ca_key=out / "ca" / "ca.key",
        server_cert=coordinator.server_cert,
        server_key=coordinator.server_key,
        server_name=server_name,
        superlink_address=address,
        coordinator=coordinator,
        sites=kits,
        created=ledger.created,
        kept=ledger.kept,
        notes=ledger.notes,
    )
    _write_public(manifest_path, json.dumps(_manifest(result, ca_cert, server_cert), indent=2))
    return result


def _build_site_kit(
    out: Path, site: str, address: str, node_port: int, force: bool, ledger: _Ledger
) -> SiteKit:
    """Write one site's kit. The CA certificate is copied in; the CA key never is."""
    site_dir = out / "sites" / site
    _make_private_dir(site_dir)
    _ensure_node_keys(site_dir, site, force, ledger)
    _write_public(site_dir / "ca.crt", (out / "ca" / "ca.crt").read_bytes())
    config = site_dir / "node-config.toml"
    if config.exists():
        ledger.kept.append(config)
    else:
        _write_public(config, node_config_text(site))
        ledger.created.append(config)
    script = site_dir / "start-supernode.sh"
    _write_public(script, _supernode_script(site, address, node_port), executable=True)
    readme = site_dir / "README.txt"
    _write_public(readme, _site_readme(site, address))
    return SiteKit(
        name=site,
        dir=site_dir,
        ca_cert=site_dir / "ca.crt",
        node_private_key=site_dir / "node.key",
        node_public_key=site_dir / "node.pub",
        node_config=config,
        start_script=script,
        readme=readme,
        node_port=node_port,
        superlink_address=address,
        command=supernode_command(str(site_dir), address, node_port),
    )


def _build_coordinator_kit(
    coord_dir: Path,
    out: Path,
    kits: dict[str, SiteKit],
    bind_host: str,
    port: int,
    address: str,
) -> CoordinatorKit:
    ca_cert = coord_dir / "ca.crt"
    _write_public(ca_cert, (out / "ca" / "ca.crt").read_bytes())
    pub_dir = coord_dir / "supernodes"
    public_keys: dict[str, Path] = {}
    for site, kit in kits.items():
        public_keys[site] = pub_dir / f"{site}.pub"
        _write_public(public_keys[site], kit.node_public_key.read_bytes())
    state_dir = coord_dir / "state"
    _make_private_dir(state_dir)
    flwr_home = coord_dir / "flwr-home"
    flwr_config = flwr_home / "config.toml"
    _write_public(flwr_config, flwr_config_text(address, ca_cert))
    start_script = coord_dir / "start-superlink.sh"
    _write_public(start_script, _superlink_script(bind_host, port), executable=True)
    register_script = coord_dir / "register-supernodes.sh"
    _write_public(register_script, _register_script(list(kits)), executable=True)
    return CoordinatorKit(
        dir=coord_dir,
        ca_cert=ca_cert,
        server_cert=coord_dir / "server.crt",
        server_key=coord_dir / "server.key",
        start_script=start_script,
        register_script=register_script,
        flwr_home=flwr_home,
        flwr_config=flwr_config,
        state_dir=state_dir,
        public_keys=public_keys,
        superlink_command=superlink_command(str(coord_dir), bind_host, port),
        register_commands={s: register_command(str(p), s) for s, p in public_keys.items()},
    )
