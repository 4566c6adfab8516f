"""Tests for ``fedmsk provision``: certificates, keys, kits, re-runs and a real TLS handshake.

Everything stays in tmp folders and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import socket
import ssl
import stat
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmsk import provision as prov
from fedmsk.commands import provision as cmd

SERVER = "fl.example.org"
SITES = ["siteA", "siteB", "siteC"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> prov.ProvisionResult:
    out = tmp_path_factory.mktemp("fed") / "out"
    return prov.provision(out, SITES, SERVER, sans=["IP:10.0.0.5,DNS:alt.example.org"], days=30)


@pytest.fixture(scope="module")
def other_fed(tmp_path_factory: pytest.TempPathFactory) -> prov.ProvisionResult:
    out = tmp_path_factory.mktemp("other") / "out"
    return prov.provision(out, ["x"], SERVER, days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_files(result: prov.ProvisionResult) -> list[Path]:
    return [result.ca_key, result.server_key] + [k.node_private_key for k in result.sites.values()]


def _snapshot(result: prov.ProvisionResult) -> dict[Path, bytes]:
    paths = _secret_files(result) + [result.ca_cert, result.server_cert]
    paths += [k.node_public_key for k in result.sites.values()]
    return {p: p.read_bytes() for p in paths}


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmsk")
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


# --------------------------------------------------------------------------- certificates


def test_server_cert_chains_to_ca(
    fed: prov.ProvisionResult, other_fed: prov.ProvisionResult
) -> None:
    ca, server = _cert(fed.ca_cert), _cert(fed.server_cert)
    ca.public_key().verify(  # raises InvalidSignature if not signed by this CA
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    assert server.issuer == ca.subject
    ca.public_key().verify(ca.signature, ca.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    other_ca = _cert(other_fed.ca_cert)
    with pytest.raises(InvalidSignature):
        other_ca.public_key().verify(
            server.signature,
            server.tbs_certificate_bytes,
            ec.ECDSA(server.signature_hash_algorithm),
        )


def test_server_cert_names_validity_and_usage(fed: prov.ProvisionResult) -> None:
    server, ca = _cert(fed.server_cert), _cert(fed.ca_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SERVER in sans.get_values_for_type(x509.DNSName)
    assert "alt.example.org" in sans.get_values_for_type(x509.DNSName)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.0.0.5", "127.0.0.1"}

    now = dt.datetime.now(dt.UTC)
    assert server.not_valid_before_utc <= now
    lifetime = server.not_valid_after_utc - now
    assert dt.timedelta(days=29, hours=23) < lifetime <= dt.timedelta(days=30)
    assert server.not_valid_after_utc <= ca.not_valid_after_utc

    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)


def test_node_keys_are_p384_openssh_pairs(fed: prov.ProvisionResult) -> None:
    seen = set()
    for site, kit in fed.sites.items():
        assert kit.node_private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
        private = serialization.load_ssh_private_key(kit.node_private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(kit.node_public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        fmt = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert private.public_key().public_bytes(*fmt) == public.public_bytes(*fmt)
        assert kit.node_public_key.read_text().split()[2] == f"fedmsk-{site}"
        assert fed.coordinator.public_keys[site].read_bytes() == kit.node_public_key.read_bytes()
        seen.add(public.public_bytes(*fmt))
    assert len(seen) == len(SITES)


def test_node_keys_accepted_by_installed_flower(fed: prov.ProvisionResult) -> None:
    register = pytest.importorskip("flwr.cli.supernode.register")
    kit = fed.sites["siteA"]
    key_bytes = register.try_load_public_key(kit.node_public_key)
    private = serialization.load_ssh_private_key(kit.node_private_key.read_bytes(), None)
    der = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_bytes == der


# --------------------------------------------------------------------------- files and kits


def test_private_keys_are_0600_and_ca_key_stays_home(fed: prov.ProvisionResult) -> None:
    for path in _secret_files(fed):
        assert _mode(path) == 0o600, path
    assert _mode(fed.ca_key.parent) == 0o700
    ca_key = fed.ca_key.read_bytes()
    handed_out = [p for p in (fed.out / "sites").rglob("*") if p.is_file()]
    handed_out += [p for p in fed.coordinator.dir.rglob("*") if p.is_file()]
    assert handed_out
    for path in handed_out:
        data = path.read_bytes()
        assert data != ca_key and b"BEGIN PRIVATE KEY" not in data or path == fed.server_key
    for kit in fed.sites.values():
        files = {p.name for p in kit.dir.iterdir()}
        assert files == {
            "ca.crt",
            "node.key",
            "node.pub",
            "node-config.toml",
            "start-supernode.sh",
            "README.txt",
        }
        assert kit.ca_cert.read_bytes() == fed.ca_cert.read_bytes()


def test_manifest_lists_files_without_key_material(fed: prov.ProvisionResult) -> None:
    text = fed.manifest.read_text()
    data = json.loads(text)
    assert [s["name"] for s in data["sites"]] == SITES
    assert data["superlink_address"] == f"{SERVER}:{prov.DEFAULT_PORT}"
    assert "ca/ca.key" in data["private_keys"]
    assert data["server"]["sha256"] == prov.fingerprint(_cert(fed.server_cert))
    for site in data["sites"]:
        for rel in site["files"]:
            assert (fed.out / rel).is_file()
    assert "PRIVATE KEY" not in text
    for secret in _secret_files(fed):
        body = [ln for ln in secret.read_text().splitlines() if not ln.startswith("-----")]
        assert all(line not in text for line in body)


def test_kit_commands_and_configs(fed: prov.ProvisionResult) -> None:
    ports = [kit.node_port for kit in fed.sites.values()]
    assert len(set(ports)) == len(ports)
    kit = fed.sites["siteB"]
    argv = kit.command
    assert argv[0] == "flower-supernode"
    assert argv[argv.index("--superlink") + 1] == f"{SERVER}:{prov.DEFAULT_PORT}"
    assert Path(argv[argv.index("--root-certificates") + 1]) == kit.ca_cert
    assert Path(argv[argv.index("--auth-supernode-private-key") + 1]) == kit.node_private_key
    assert Path(argv[argv.index("--node-config") + 1]) == kit.node_config
    assert argv[argv.index("--port") + 1] == str(kit.node_port)
    script = kit.start_script.read_text()
    assert "--root-certificates" in script and "--auth-supernode-private-key" in script
    assert f"--port {kit.node_port}" in script

    node_cfg = tomllib.loads(kit.node_config.read_text())
    assert node_cfg == {"data-dir": "/path/to/site", "site-alias": "siteB", "device": "auto"}

    link = fed.coordinator.superlink_command
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in link
    assert Path(link[link.index("--ssl-ca-certfile") + 1]).read_bytes() == (
        fed.ca_cert.read_bytes()
    )
    assert Path(link[link.index("--ssl-certfile") + 1]) == fed.server_cert
    assert Path(link[link.index("--ssl-keyfile") + 1]) == fed.server_key
    assert "--insecure" not in link

    flwr_cfg = tomllib.loads(fed.coordinator.flwr_config.read_text())
    conn = flwr_cfg["superlink"][flwr_cfg["superlink"]["default"]]
    assert conn["address"] == f"{SERVER}:{prov.DEFAULT_PORT}"
    root = Path(conn["root-certificates"])
    assert root.is_absolute() and root.read_bytes() == fed.ca_cert.read_bytes()
    register = fed.coordinator.register_script.read_text()
    assert all(f"register_site {s}\n" in register for s in SITES)
    assert fed.coordinator.register_commands["siteC"][:3] == ["flwr", "supernode", "register"]


def test_scripts_are_valid_sh_and_node_refuses_placeholder(fed: prov.ProvisionResult) -> None:
    scripts = [k.start_script for k in fed.sites.values()]
    scripts += [fed.coordinator.start_script, fed.coordinator.register_script]
    for script in scripts:
        assert _mode(script) & 0o100
        subprocess.run(["sh", "-n", str(script)], check=True)
    done = subprocess.run(
        [str(fed.sites["siteA"].start_script)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2
    assert "node-config.toml: set data-dir" in done.stderr


def test_write_node_config(tmp_path: Path) -> None:
    result = prov.provision(tmp_path / "out", ["s1"], "localhost")
    kit = result.sites["s1"]
    prov.write_node_config(kit, tmp_path / 'data "x"', device="cpu")
    cfg = tomllib.loads(kit.node_config.read_text())
    assert cfg["data-dir"] == str(tmp_path / 'data "x"') and cfg["device"] == "cpu"


# --------------------------------------------------------------------------- re-runs


def test_rerun_keeps_keys_and_force_replaces_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prov.provision(out, ["a", "b"], SERVER)
    before = _snapshot(first)
    kit = first.sites["a"]
    kit.node_config.write_text(prov.node_config_text("a", "/srv/a", "cpu"))
    edited = kit.node_config.read_bytes()

    again = prov.provision(out, ["a", "b"], SERVER)
    assert _snapshot(again) == before
    assert set(before) <= set(again.kept) and not again.created
    assert any("kept the existing CA" in n for n in again.notes)
    assert kit.node_config.read_bytes() == edited

    forced = prov.provision(out, ["a", "b"], SERVER, force=True)
    after = _snapshot(forced)
    assert set(after) == set(before)
    for path in before:
        assert after[path] != before[path], path
    for path in _secret_files(forced):
        assert _mode(path) == 0o600
    assert _cert(forced.server_cert).verify_directly_issued_by(_cert(forced.ca_cert)) is None
    assert forced.sites["a"].ca_cert.read_bytes() == forced.ca_cert.read_bytes()
    assert kit.node_config.read_bytes() == edited


def test_adding_a_site_reuses_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prov.provision(out, ["a", "b"], SERVER)
    before = _snapshot(first)
    added = prov.provision(out, ["c"], SERVER)
    assert list(added.sites) == ["a", "b", "c"]
    now = _snapshot(added)
    assert {p: now[p] for p in before} == before
    assert added.sites["c"].node_private_key in added.created
    assert added.ca_cert not in added.created
    assert added.sites["c"].ca_cert.read_bytes() == first.ca_cert.read_bytes()
    ports = {k.name: k.node_port for k in added.sites.values()}
    assert ports["a"] == first.sites["a"].node_port and len(set(ports.values())) == 3
    manifest = json.loads(added.manifest.read_text())
    assert [s["name"] for s in manifest["sites"]] == ["a", "b", "c"]
    assert "register_site c\n" in added.coordinator.register_script.read_text()


def test_handed_over_private_key_keeps_public_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prov.provision(out, ["a"], SERVER)
    public = first.sites["a"].node_public_key.read_bytes()
    first.sites["a"].node_private_key.unlink()
    again = prov.provision(out, ["a"], SERVER)
    assert again.sites["a"].node_public_key.read_bytes() == public
    assert not again.sites["a"].node_private_key.exists()
    assert any("absent" in n for n in again.notes)
    assert json.loads(again.manifest.read_text())["sites"][0]["private_key_present"] is False


def test_rotating_one_site_key_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prov.provision(out, ["a", "b"], SERVER)
    before = _snapshot(first)
    first.sites["a"].node_private_key.unlink()
    first.sites["a"].node_public_key.unlink()
    again = prov.provision(out, ["a"], SERVER)
    after = _snapshot(again)
    changed = {p for p in before if after[p] != before[p]}
    assert changed == {first.sites["a"].node_private_key, first.sites["a"].node_public_key}
    new_public = after[first.sites["a"].node_public_key]
    assert again.coordinator.public_keys["a"].read_bytes() == new_public


def test_changed_server_name_needs_reissue(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prov.provision(out, ["a"], SERVER)
    with pytest.raises(prov.ProvisionError, match=r"server\.crt was issued for .*delete"):
        prov.provision(out, ["a"], "other.example.org")
    before = _snapshot(first)
    first.server_cert.unlink()
    first.server_key.unlink()
    renewed = prov.provision(out, ["a"], "other.example.org")
    after = _snapshot(renewed)
    assert after[first.ca_key] == before[first.ca_key]
    assert after[first.sites["a"].node_private_key] == before[first.sites["a"].node_private_key]
    assert _cert(renewed.server_cert).verify_directly_issued_by(_cert(renewed.ca_cert)) is None
    names = _cert(renewed.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "other.example.org" in names.value.get_values_for_type(x509.DNSName)


def test_ip_server_name(tmp_path: Path) -> None:
    result = prov.provision(tmp_path / "v4", ["a"], "192.168.7.9", port=9443)
    sans = _cert(result.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "192.168.7.9" in {str(i) for i in sans.value.get_values_for_type(x509.IPAddress)}
    assert result.superlink_address == "192.168.7.9:9443"
    assert prov.format_address("::1", 8000) == "[::1]:8000"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": ["../evil"]}, "--sites: site name '../evil'"),
        ({"sites": ["a b"]}, "--sites: site name 'a b'"),
        ({"sites": ["A", "a"]}, "given twice"),
        ({"sites": [" ", ""]}, "at least one site"),
        ({"server_name": "https://fl.example.org"}, "not a URL"),
        ({"server_name": "fl.example.org:8000"}, "--port"),
        ({"server_name": "bad_name!"}, "--server-name 'bad_name!'"),
        ({"server_name": ""}, "--server-name"),
        ({"server_name": "300.1.2.3"}, "not a valid IP address"),
        ({"sans": ["FOO:bar"]}, "--san 'FOO:bar'"),
        ({"sans": ["DNS:"]}, "--san 'DNS:'"),
        ({"sans": ["IP:999.1.1.1"]}, "--san 'IP:999.1.1.1'"),
        ({"days": 0}, "--days=0"),
        ({"days": 100, "ca_days": 10}, "--days 100: the CA"),
        ({"port": 70000}, "--port=70000"),
    ],
)
def test_bad_input_is_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"sites": ["a"], "server_name": SERVER} | kwargs
    out = tmp_path / "out"
    with pytest.raises(prov.ProvisionError) as info:
        prov.provision(out, **args)
    assert message in str(info.value)
    assert not (out / "ca" / "ca.key").exists() or "CA" in message or "--days" in message


def test_out_must_be_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(prov.ProvisionError, match="not a folder"):
        prov.provision(target, ["a"], SERVER)


def test_new_site_clashing_by_case_is_refused(tmp_path: Path) -> None:
    prov.provision(tmp_path / "out", ["Site1"], SERVER)
    with pytest.raises(prov.ProvisionError, match="clashes with the existing site 'Site1'"):
        prov.provision(tmp_path / "out", ["site1"], SERVER)


# --------------------------------------------------------------------------- command line


def test_cli_provisions_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["provision", "--sites", "h1,h2", "--server-name", SERVER, "--san", "IP:10.1.1.1"]
    assert _run_cli([*argv, "--days", "10", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "created  ca/ca.key" in printed and f"{SERVER}:{prov.DEFAULT_PORT}" in printed
    assert (out / "sites" / "h2" / "node.key").exists()
    assert _run_cli([*argv, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept     sites/h1/node.key" in printed and "created" not in printed


def test_cli_errors_name_the_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _run_cli(["provision", "--sites", "ok,bad/x", "--server-name", SERVER, str(tmp_path)])
    assert code == 2
    assert "--sites: site name 'bad/x'" in capsys.readouterr().err


def test_cli_defaults_match_library() -> None:
    assert cmd.DEFAULT_DAYS == prov.DEFAULT_DAYS
    assert cmd.DEFAULT_CA_DAYS == prov.DEFAULT_CA_DAYS
    assert cmd.DEFAULT_PORT == prov.DEFAULT_PORT
    assert cmd.DEFAULT_BIND_HOST == prov.DEFAULT_BIND_HOST
    assert cmd.DEFAULT_NODE_PORT_BASE == prov.DEFAULT_NODE_PORT_BASE


# --------------------------------------------------------------------------- real TLS


@contextlib.contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS echo-once server on an ephemeral 127.0.0.1 port, serving until the block ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"fedmsk-ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _client_read(port: int, cafile: Path, hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        return tls.recv(64)


def test_real_tls_handshake(fed: prov.ProvisionResult, other_fed: prov.ProvisionResult) -> None:
    with _tls_server(fed.server_cert, fed.server_key) as port:
        assert _client_read(port, fed.sites["siteA"].ca_cert, SERVER) == b"fedmsk-ok"
        assert _client_read(port, fed.coordinator.ca_cert, "127.0.0.1") == b"fedmsk-ok"
        assert _client_read(port, fed.ca_cert, "localhost") == b"fedmsk-ok"
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            _client_read(port, other_fed.ca_cert, SERVER)
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
            _client_read(port, fed.ca_cert, "evil.example.org")
