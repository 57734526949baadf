"""`tributary certs`, and a server and clients started with its files, as a user runs them."""

from __future__ import annotations

import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_cli import STARTUP, TRIBUTARY, start_server


def certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIBUTARY, "certs", *args], capture_output=True, text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_writes_the_layout_with_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = certs(str(out), "--client", "alice", "--client", "bob", "--server-name", "localhost", "--ip", "127.0.0.1", "--days", "30")
    assert result.returncode == 0, result.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["ca.key", "ca.pem", "clients/alice.key", "clients/alice.pem", "clients/bob.key", "clients/bob.pem", "server.key", "server.pem"]
    for name in files:
        assert mode(out / name) == (0o600 if name.endswith(".key") else 0o644), name
        assert f"wrote {out / name}" in result.stdout  # every file written is reported
    assert f"--tls-client-ca {out / 'ca.pem'}" in result.stdout  # and how to use them


def test_certs_refuses_to_overwrite_and_adds_clients_to_an_existing_ca(tmp_path: Path) -> None:
    assert certs(str(tmp_path), "--client", "alice").returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    again = certs(str(tmp_path), "--client", "alice")
    assert again.returncode != 0
    assert "alice.pem" in again.stderr and "already exist; pass --force to replace them (nothing was written)" in again.stderr
    nothing = certs(str(tmp_path))
    assert nothing.returncode != 0 and "nothing to write" in nothing.stderr
    assert {p: p.read_bytes() for p in before} == before

    more = certs(str(tmp_path), "--client", "carol")
    assert more.returncode == 0, more.stderr
    assert "clients/carol.pem" in more.stdout and "ca.pem" not in more.stdout.split("\n\n")[0]
    assert {p: p.read_bytes() for p in before} == before  # the CA, the server and alice untouched
    assert mode(tmp_path / "clients" / "carol.key") == 0o600

    forced = certs(str(tmp_path), "--client", "alice", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "clients" / "alice.key").read_bytes() != before[tmp_path / "clients" / "alice.key"]
    assert (tmp_path / "ca.key").read_bytes() == before[tmp_path / "ca.key"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ip", "300.1.2.3"], "'300.1.2.3' is not an IPv4 or IPv6 address"),
        (["--server-name", "bad name"], "server name 'bad name' is not a DNS name"),
        (["--client", "../escape"], "client id '../escape' must be"),
        (["--days", "0"], "days must be a whole number of days"),
    ],
)
def test_bad_certs_flags_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    result = certs(str(tmp_path / "out"), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_server_refuses_to_start_without_tls_or_insecure() -> None:
    result = subprocess.run([*TRIBUTARY, "server", "--address", "127.0.0.1:0", "--task", "digits"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "give --tls-cert FILE --tls-key FILE" in result.stderr and "--insecure" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "{out}/server.pem"], "tls.key is missing: give --tls-cert FILE and --tls-key FILE"),
        (["--tls-cert", "{out}/nope.pem", "--tls-key", "{out}/server.key"], "nope.pem does not exist"),
        (["--tls-cert", "{out}/server.pem", "--tls-key", "{out}/ca.key"], "does not belong to the certificate"),
        (["--tls-cert", "{out}/server.pem", "--tls-key", "{out}/server.key", "--insecure"], "TLS files and insecure exclude each other"),
    ],
)
def test_bad_tls_flags_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    assert certs(str(tmp_path)).returncode == 0
    flags = [arg.format(out=tmp_path) for arg in args]
    result = subprocess.run([*TRIBUTARY, "server", "--address", "127.0.0.1:0", "--task", "digits", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_insecure_server_warns_that_it_serves_plaintext() -> None:
    server, address = start_server("--insecure", "--task", "digits")
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=30)
    assert f"serving plaintext on {address} (insecure)" in STARTUP[server.pid]
    assert f"listening on {address} (plaintext)" in STARTUP[server.pid]


def test_client_flags_for_tls_are_checked(tmp_path: Path) -> None:
    both = subprocess.run(
        [*TRIBUTARY, "client", "--server", "127.0.0.1:1", "--updates", "1", "--insecure", "--ca", str(tmp_path / "ca.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert both.returncode != 0 and "--insecure talks plaintext; drop it to use --ca" in both.stderr
    half = subprocess.run(
        [*TRIBUTARY, "client", "--server", "127.0.0.1:1", "--updates", "1", "--cert", str(tmp_path / "me.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert half.returncode != 0 and "needs both --cert FILE and --key FILE" in half.stderr
    missing = subprocess.run(
        [*TRIBUTARY, "client", "--server", "127.0.0.1:1", "--updates", "1", "--ca", str(tmp_path / "ca.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode != 0 and f"ClientTLS ca_file {tmp_path / 'ca.pem'} does not exist" in missing.stderr


def test_server_and_clients_over_mutual_tls_as_processes(tmp_path: Path) -> None:
    out, other = tmp_path / "certs", tmp_path / "other"
    assert certs(str(out), "--client", "alice").returncode == 0
    assert certs(str(other), "--client", "mallory").returncode == 0
    server, address = start_server(
        "--task", "digits", "--buffer-size", "1",
        "--tls-cert", str(out / "server.pem"), "--tls-key", str(out / "server.key"), "--tls-client-ca", str(out / "ca.pem"),
    )  # fmt: skip
    try:
        assert "(mutual TLS)" in STARTUP[server.pid]
        ok = subprocess.run(
            [
                *TRIBUTARY, "client", "--server", address, "--updates", "2", "--client-id", "alice",
                "--ca", str(out / "ca.pem"), "--cert", str(out / "clients" / "alice.pem"), "--key", str(out / "clients" / "alice.key"),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "2 updates accepted" in ok.stdout
        # a client that does not trust the server's CA gives up at once, and says why
        untrusting = subprocess.run(
            [
                *TRIBUTARY, "client", "--server", address, "--updates", "1",
                "--ca", str(other / "ca.pem"), "--cert", str(other / "clients" / "mallory.pem"), "--key", str(other / "clients" / "mallory.key"),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert untrusting.returncode != 0
        assert "not signed by a CA this client trusts" in untrusting.stderr, untrusting.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
