"""The client registry (real SQLite in a temporary state directory), the admin
credential, the call gate, the per-job authorizer, and the auth settings."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import stat
from pathlib import Path

import pytest

from server import ConfigError, ServerConfig
from server.auth import (
    AdminCredential,
    Authorizer,
    CallGate,
    ClientRegistry,
    bearer_token,
    new_token,
)
from server.errors import Unavailable, ClientAlreadyEnrolled, InvalidUpdate, NotAuthenticated, PermissionDenied, UnknownClient

ADMIN = "trb_admin_" + "a" * 40


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "tributary.db"


@pytest.fixture
def registry(db: Path) -> ClientRegistry:
    return ClientRegistry(db)


def test_tokens_are_prefixed_random_and_long() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("trb_") and len(t) >= 4 + 43 for t in tokens)
    assert new_token("trb_admin_").startswith("trb_admin_")


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("x-other", "1"), ("Authorization", "bearer  abc ")], "abc"),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization-bin", b"Bearer abc")], None),
        ([], None),
        (None, None),
    ],
)
def test_bearer_token_parsing(metadata: list[tuple[str, str | bytes]] | None, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_enrol_authenticate_and_count(registry: ClientRegistry) -> None:
    token = registry.enrol("phone-17", ["a", "b", "a"])
    client = registry.authenticate(token)
    assert (client.client_id, client.job_ids, client.active) == ("phone-17", frozenset({"a", "b"}), True)
    registry.enrol("laptop", ["b"])
    assert (registry.enrolled_count("a"), registry.enrolled_count("b"), registry.enrolled_count("c")) == (1, 2, 0)
    assert [c.client_id for c in registry.clients()] == ["laptop", "phone-17"]


@pytest.mark.parametrize("token", [None, "", "trb_unknown"])
def test_missing_or_unknown_tokens_are_not_authenticated(registry: ClientRegistry, token: str | None) -> None:
    registry.enrol("c1", ["a"])
    with pytest.raises(NotAuthenticated, match="tributary admin enrol"):
        registry.authenticate(token)


def test_enrolling_an_active_client_needs_rotate(registry: ClientRegistry) -> None:
    old = registry.enrol("c1", ["a"])
    with pytest.raises(ClientAlreadyEnrolled, match=r"client 'c1' is already enrolled \(jobs: a\); rotate"):
        registry.enrol("c1", ["b"])
    assert registry.authenticate(old).job_ids == {"a"}  # the refused call changed nothing
    new = registry.enrol("c1", ["b"], rotate=True)
    with pytest.raises(NotAuthenticated, match="replaced by a newer one"):
        registry.authenticate(old)
    assert registry.authenticate(new).job_ids == {"b"}
    assert registry.enrolled_count("a") == 0


def test_revocation_is_immediate_and_idempotent(registry: ClientRegistry) -> None:
    token = registry.enrol("c1", ["a"])
    client, was_active = registry.revoke("c1")
    assert was_active and not client.active
    with pytest.raises(NotAuthenticated, match="the token of client 'c1' was revoked at"):
        registry.authenticate(token)
    again, was_active = registry.revoke("c1")
    assert not was_active and again.revoked_at == client.revoked_at
    assert registry.enrolled_count("a") == 0
    with pytest.raises(UnknownClient, match="no client 'ghost' was ever enrolled"):
        registry.revoke("ghost")
    fresh = registry.enrol("c1", ["a"])  # a revoked client is enrolled again without rotate
    assert registry.authenticate(fresh).active
    with pytest.raises(NotAuthenticated):
        registry.authenticate(token)


@pytest.mark.parametrize("client_id", ["", " c1", "c 1", "-c1", "x" * 129, "c1\n"])
def test_bad_client_ids_are_refused(registry: ClientRegistry, client_id: str) -> None:
    with pytest.raises(InvalidUpdate, match="must be 1-128 characters"):
        registry.enrol(client_id, ["a"])
    assert registry.clients() == []


def test_enrolling_in_no_job_is_refused(registry: ClientRegistry) -> None:
    with pytest.raises(InvalidUpdate, match="at least one job"):
        registry.enrol("c1", [])


def test_registry_survives_reopening(db: Path) -> None:
    first = ClientRegistry(db)
    kept = first.enrol("kept", ["a", "b"])
    gone = first.enrol("gone", ["a"])
    first.revoke("gone")
    second = ClientRegistry(db)
    assert second.authenticate(kept).job_ids == {"a", "b"}
    with pytest.raises(NotAuthenticated, match="revoked"):
        second.authenticate(gone)
    assert [(c.client_id, c.active) for c in second.clients()] == [("gone", False), ("kept", True)]


def test_only_digests_reach_the_database(db: Path, registry: ClientRegistry) -> None:
    token = registry.enrol("c1", ["a"])
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT token_sha256 FROM auth_clients").fetchall()
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()
    assert rows == [(hashlib.sha256(token.encode()).digest(),)]
    assert mode == "wal"
    stored = b"".join(path.read_bytes() for path in db.parent.glob("tributary.db*"))
    assert token.encode() not in stored


def test_the_registry_shares_the_database_with_other_tables(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY)")
        connection.execute("INSERT INTO jobs VALUES ('a')")
    connection.close()
    ClientRegistry(db).enrol("c1", ["a"])
    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert connection.execute("SELECT id FROM jobs").fetchall() == [("a",)]
    connection.close()
    assert tables == {"jobs", "auth_clients", "auth_client_jobs"}


def test_a_change_that_fails_to_commit_changes_nothing(db: Path, registry: ClientRegistry) -> None:
    old = registry.enrol("c1", ["a"])
    with sqlite3.connect(db) as connection:
        connection.execute("DROP TABLE auth_client_jobs")  # the second statement of enrol will fail
    connection.close()
    with pytest.raises(Unavailable, match="no such table: auth_client_jobs"):  # UNAVAILABLE to the admin
        registry.enrol("c1", ["b"], rotate=True)
    assert registry.authenticate(old).job_ids == {"a"}  # memory: untouched
    with sqlite3.connect(db) as connection:  # disk: the first statement was rolled back
        assert connection.execute("SELECT token_sha256 FROM auth_clients").fetchall() == [(hashlib.sha256(old.encode()).digest(),)]
    connection.close()


def test_an_unusable_database_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open the client registry"):
        ClientRegistry(tmp_path / "missing-dir" / "tributary.db")


# -- admin credential ----------------------------------------------------------------------


def test_admin_token_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    credential, generated = AdminCredential.generated_in(tmp_path)
    path = tmp_path / "admin.token"
    token = path.read_text().strip()
    assert generated and credential.source == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token.startswith("trb_admin_")
    assert credential.matches(token) and not credential.matches(token + "x") and not credential.matches(None)
    again, generated = AdminCredential.generated_in(tmp_path)
    assert not generated and again.matches(token)
    assert path.read_text().strip() == token


def test_admin_token_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "admin"
    path.write_text(f"  {ADMIN}\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        credential = AdminCredential.from_file(path)
    assert credential.matches(ADMIN)
    assert "can be read by other users (mode 644); chmod 600 it" in caplog.text


@pytest.mark.parametrize(("content", "message"), [(None, "does not exist"), ("short", "at least 32"), ("a b" * 20, "without spaces")])
def test_bad_admin_token_files_are_config_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "admin"
    if content is not None:
        path.write_text(content)
        path.chmod(0o600)
    with pytest.raises(ConfigError, match=message):
        AdminCredential.from_file(path)


# -- gate and authorizer ---------------------------------------------------------------------


@pytest.fixture
def gate(registry: ClientRegistry, tmp_path: Path) -> CallGate:
    path = tmp_path / "admin"
    path.write_text(ADMIN)
    path.chmod(0o600)
    return CallGate(registry, AdminCredential.from_file(path))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_gate(gate: CallGate, registry: ClientRegistry) -> None:
    client = registry.enrol("c1", ["a"])
    revoked = registry.enrol("c2", ["a"])
    registry.revoke("c2")
    push, status = "/tributary.v1.Tributary/Push", "/tributary.v1.Admin/Status"
    gate.check("/grpc.health.v1.Health/Check", None)
    gate.check(push, bearer(client))
    gate.check(status, bearer(ADMIN))
    refusals = [
        (push, None, NotAuthenticated, "requires a client token"),
        (push, bearer(revoked), NotAuthenticated, "was revoked"),
        (push, bearer(ADMIN), PermissionDenied, "the admin token cannot act as a client"),
        ("/some.other.Service/Call", None, NotAuthenticated, "requires a client token"),  # closed by default
        (status, None, NotAuthenticated, "admin RPCs need the admin token"),
        (status, bearer(client), PermissionDenied, "this is a client token"),
        (status, bearer(revoked), NotAuthenticated, "the admin token is wrong"),
        (status, bearer("trb_admin_" + "b" * 40), NotAuthenticated, "the admin token is wrong"),
    ]
    for method, metadata, error, message in refusals:
        with pytest.raises(error, match=message):
            gate.check(method, metadata)


def test_authorizer(registry: ClientRegistry) -> None:
    token = registry.enrol("c1", ["a", "b"])
    authorizer = Authorizer(registry)
    assert authorizer.authorize(bearer(token), "a").client_id == "c1"
    assert authorizer.authorize(bearer(token), "b", "c1").client_id == "c1"
    with pytest.raises(PermissionDenied, match=r"client 'c1' is not enrolled in job 'z'; ask the operator to enrol it \(it is enrolled in: a, b\)"):
        authorizer.authorize(bearer(token), "z")
    with pytest.raises(PermissionDenied, match="issued to client 'c1'; it cannot act as client 'c2'"):
        authorizer.authorize(bearer(token), "a", "c2")
    registry.revoke("c1")
    with pytest.raises(NotAuthenticated, match="revoked"):
        authorizer.authorize(bearer(token), "a")


# -- settings ---------------------------------------------------------------------------------


def test_auth_needs_a_state_dir() -> None:
    with pytest.raises(ConfigError, match=r"auth \(--auth\) needs state_dir \(--state-dir\)"):
        ServerConfig(auth=True, insecure=True)
    with pytest.raises(ConfigError, match=r"admin_token_file \(--admin-token-file\) only applies with auth \(--auth\)"):
        ServerConfig(admin_token_file=Path("x"), state_dir=Path("s"), insecure=True)
    with pytest.raises(ConfigError, match="auth must be true or false, got 'yes'"):
        ServerConfig.from_mapping({"auth": "yes", "state_dir": "s", "insecure": True})
    with pytest.raises(ConfigError, match="state_dir must be a directory path, got 3"):
        ServerConfig.from_mapping({"state_dir": 3, "insecure": True})


def test_auth_settings_from_mapping_and_toml(tmp_path: Path) -> None:
    config = ServerConfig.from_mapping({"auth": True, "state_dir": "st", "admin_token_file": "adm", "insecure": True})
    assert (config.auth, config.state_dir, config.admin_token_file) == (True, Path("st"), Path("adm"))
    assert ServerConfig(insecure=True).auth is False and ServerConfig(insecure=True).state_dir is None
    toml = tmp_path / "server.toml"
    toml.write_text('insecure = true\nstate_dir = "state"\nauth = true\nadmin_token_file = "secrets/admin"\n[[jobs]]\nid = "a"\n')
    config = ServerConfig.from_toml(toml)
    assert config.state_dir == tmp_path.resolve() / "state"
    assert config.admin_token_file == tmp_path.resolve() / "secrets" / "admin"


def test_server_flags_override_a_config_file(tmp_path: Path) -> None:
    from tributary._server_cmd import build_config

    toml = tmp_path / "server.toml"
    toml.write_text('insecure = true\naddress = "127.0.0.1:7000"\n[[jobs]]\nid = "a"\nstrategy = "fedasync"\n')
    config, _ = build_config({"config_path": toml, "auth": True, "state_dir": tmp_path / "st", "address": None})
    assert (config.auth, config.state_dir, config.address) == (True, tmp_path / "st", "127.0.0.1:7000")
    assert config.jobs[0].strategy.name == "fedasync"
    with pytest.raises(ConfigError, match=r"needs state_dir \(--state-dir\)"):
        build_config({"config_path": toml, "auth": True})
