"""Authentication as an operator sets it up: `tributary server --auth`,
`tributary admin enrol`, `tributary client --token-file`, all as processes."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_cli import STARTUP, TRIBUTARY, start_server


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIBUTARY, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_enrol_then_train_with_the_token(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server, address = start_server("--insecure", "--task", "digits", "--buffer-size", "1", "--auth", "--state-dir", str(state))
    admin_token = state / "admin.token"
    admin = ["admin", "--server", address, "--insecure", "--admin-token-file", str(admin_token)]
    try:
        assert f"admin token in {admin_token} (generated now" in STARTUP[server.pid]
        assert stat.S_IMODE(admin_token.stat().st_mode) == 0o600

        token_file = tmp_path / "edge-1.token"
        enrolled = run(*admin, "enrol", "edge-1", "--job", "default", "--token-out", str(token_file))
        assert enrolled.returncode == 0, enrolled.stderr
        assert f"token written to {token_file}" in enrolled.stdout
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        printed = run(*admin, "enrol", "edge-2", "--job", "default")
        assert printed.returncode == 0, printed.stderr
        assert re.fullmatch(r"trb_[A-Za-z0-9_-]{43}\n", printed.stdout)  # the token alone on stdout, for scripts

        trained = run("client", "--insecure", "--server", address, "--updates", "2", "--client-id", "edge-1", "--token-file", str(token_file))
        assert trained.returncode == 0, trained.stdout + trained.stderr
        assert "2 updates accepted" in trained.stdout

        anonymous = run("client", "--insecure", "--server", address, "--updates", "1")
        assert anonymous.returncode != 0
        assert "this server requires a client token" in anonymous.stderr

        status = run(*admin, "status")
        assert status.returncode == 0, status.stderr
        assert re.search(r"default\s+fedbuff\s+2\s+2\s+0\s+2\s+0\s+0\.0", status.stdout), status.stdout

        assert run(*admin, "revoke", "edge-1").returncode == 0
        revoked = run("client", "--insecure", "--server", address, "--updates", "1", "--client-id", "edge-1", "--token-file", str(token_file))
        assert revoked.returncode != 0
        assert "the token of client 'edge-1' was revoked" in revoked.stderr

        clients = run(*admin, "clients")
        assert re.search(r"edge-1\s+default\s+\S+ \S+\s+\d{4}-", clients.stdout), clients.stdout
        assert re.search(r"edge-2\s+default\s+\S+ \S+\s+-", clients.stdout), clients.stdout
        other_token = tmp_path / "edge-2.token"
        other_token.write_text(printed.stdout)
        wrong = run("admin", "--server", address, "--insecure", "--admin-token-file", str(other_token), "status")
        assert wrong.returncode != 0
        assert "this is a client token; admin RPCs need the admin token" in wrong.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["server", "--insecure", "--task", "digits", "--auth"], "auth (--auth) needs state_dir (--state-dir)"),
        (["server", "--insecure", "--task", "digits", "--admin-token-file", "x"], "admin_token_file (--admin-token-file) only applies with auth (--auth)"),
        (["client", "--updates", "1", "--token-file", "t"], "--token-file needs --client-id"),
        (["client", "--updates", "1", "--client-id", "c", "--token-file", "/nonexistent/t"], "Invalid value for --token-file: cannot read /nonexistent/t"),
        (["admin", "--admin-token-file", "/nonexistent/a", "status"], "Invalid value for --admin-token-file: cannot read /nonexistent/a"),
    ],
)
def test_bad_auth_flags_are_named(args: list[str], message: str) -> None:
    result = run(*args, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_admin_token_file_that_is_too_short_stops_the_server(tmp_path: Path) -> None:
    short = tmp_path / "admin"
    short.write_text("hunter2\n")
    result = run("server", "--insecure", "--address", "127.0.0.1:0", "--task", "digits", "--auth", "--state-dir", str(tmp_path / "s"), "--admin-token-file", str(short), timeout=60)
    assert result.returncode != 0
    assert f"admin_token_file {short} must hold one token of at least 32" in result.stderr
