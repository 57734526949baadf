"""Who may call the server, and what they may do. No gRPC here.

With authentication on (`ServerConfig.auth`), every call carries a bearer
token in its `authorization` metadata:

  client token   issued by `enrol` to one client id for a set of jobs; it
                 lets that client act in those jobs, as that id, and only there
  admin token    from `admin_token_file` or generated into
                 `<state_dir>/admin.token`; it may call the Admin service only

`ClientRegistry` keeps the enrolled clients in the state directory's SQLite
database (tables `auth_clients`, `auth_client_jobs`), holding only the SHA-256
digest of each token; `CallGate` decides from a method name and the metadata
whether a call may reach its handler (the interceptor's job); `Authorizer`
checks the job and client id a request names once the handler has read them
(the servicer's job). Every refusal is `NotAuthenticated` (no usable
credential) or `PermissionDenied` (a credential that may not do this), and
its message says what to do about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.errors import ClientAlreadyEnrolled, ConfigError, InvalidUpdate, NotAuthenticated, PermissionDenied, Unavailable, UnknownClient

logger = logging.getLogger(__name__)

DB_FILE_NAME = "tributary.db"
ADMIN_TOKEN_FILE_NAME = "admin.token"
CLIENT_TOKEN_PREFIX = "trb_"
ADMIN_TOKEN_PREFIX = "trb_admin_"
"""Prefixes make a leaked token recognisable (to a person, a secret scanner)
and say which kind it is; they add no secrecy."""
TOKEN_BYTES = 32
MIN_ADMIN_TOKEN_LENGTH = 32
ADMIN_SERVICE = "tributary.v1.Admin"
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
"""Callable without a credential: load balancers and orchestrators probe health."""
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what gRPC metadata carries

_SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_clients (
    client_id    TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL UNIQUE,
    enrolled_at  REAL NOT NULL,
    revoked_at   REAL
);
CREATE TABLE IF NOT EXISTS auth_client_jobs (
    client_id TEXT NOT NULL REFERENCES auth_clients (client_id),
    job_id    TEXT NOT NULL,
    PRIMARY KEY (client_id, job_id)
);
"""


def new_token(prefix: str = CLIENT_TOKEN_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> bytes:
    """SHA-256 of the token: all the server ever stores.

    A fast hash is enough here, unlike for passwords: slow hashes (bcrypt,
    scrypt, argon2) make guessing a low-entropy secret from a stolen digest
    expensive, but these tokens are 256 random bits from `secrets`, so there
    is nothing to guess at any speed, and SHA-256 cannot be inverted. A stolen
    database therefore yields no usable token, and checking one costs a
    microsecond on every RPC instead of tens of milliseconds."""
    return hashlib.sha256(token.encode()).digest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(unix))


@dataclass(frozen=True)
class EnrolledClient:
    client_id: str
    job_ids: frozenset[str]
    enrolled_at: float
    """Unix time of the latest enrolment (a rotation re-enrols)."""
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    client: EnrolledClient


class ClientRegistry:
    """Enrolled clients and the digests of their tokens, in SQLite.

    The database is `<state_dir>/tributary.db`, shared with the server's other
    state; this registry opens its own connections and touches only its own
    tables (`auth_*`). Every RPC is checked against an in-memory copy; every change
    commits to the database first and then updates that copy, under one lock,
    within the same call, so when `revoke` returns the token is refused, and
    a change that failed to commit changes nothing.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._by_id: dict[str, _Entry] = {}
        self._by_digest: dict[bytes, EnrolledClient] = {}
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")  # stays set in the file: readers never block the writer
                db.executescript(_SCHEMA)
                jobs: dict[str, set[str]] = {}
                for client_id, job_id in db.execute("SELECT client_id, job_id FROM auth_client_jobs"):
                    jobs.setdefault(client_id, set()).add(job_id)
                rows = db.execute("SELECT client_id, token_sha256, enrolled_at, revoked_at FROM auth_clients").fetchall()
        except Unavailable as error:
            raise ConfigError(f"cannot open the client registry in {self.db_path}: {error.__cause__}") from error
        for client_id, digest, enrolled_at, revoked_at in rows:
            self._remember(bytes(digest), EnrolledClient(client_id, frozenset(jobs.get(client_id, ())), enrolled_at, revoked_at))

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one change. Changes are rare (administration) and
        reads come from memory, so a connection per change costs nothing and
        leaves no connection for the server to close."""
        try:
            db = sqlite3.connect(self.db_path, timeout=10.0)
            try:
                with db:  # one transaction: commits on success, rolls back on any error
                    yield db
            finally:
                db.close()
        except sqlite3.Error as error:  # e.g. locked past the timeout, disk full: nothing changed
            raise Unavailable(f"the client registry could not be written ({error}); nothing changed, retry") from error

    # -- checks (every RPC) ----------------------------------------------------------

    def authenticate(self, token: str | None) -> EnrolledClient:
        """The active client holding `token`, or NotAuthenticated saying why not."""
        if not token:
            raise NotAuthenticated(
                "this server requires a client token: send `authorization: Bearer <token>` metadata "
                "(Client(..., token=...) or tributary client --token-file FILE); the operator issues one "
                "with `tributary admin enrol CLIENT --job JOB`"
            )
        # The lookup is keyed by the token's digest, so whatever its timing
        # could reveal is about SHA-256(token), which tells an attacker nothing
        # about a token they do not already hold.
        with self._lock:
            client = self._by_digest.get(token_digest(token))
        if client is None:
            raise NotAuthenticated(
                "the client token is not valid on this server (mistyped, from another server, or replaced by a "
                "newer one); ask the operator for this client's current token (tributary admin enrol CLIENT --rotate)"
            )
        if not client.active:
            assert client.revoked_at is not None
            raise NotAuthenticated(
                f"the token of client {client.client_id!r} was revoked at {_iso(client.revoked_at)}; "
                "ask the operator to enrol the client again"
            )
        return client

    def is_active_client_token(self, token: str) -> bool:
        with self._lock:
            client = self._by_digest.get(token_digest(token))
        return client is not None and client.active

    # -- administration --------------------------------------------------------------

    def enrol(self, client_id: str, job_ids: Collection[str], *, rotate: bool = False) -> str:
        """Enrol `client_id` in `job_ids` and return its new token, the only
        time it exists in the clear. An active client is ClientAlreadyEnrolled
        unless `rotate`, which replaces its token (the old one is refused at
        once) and its jobs; a revoked client is simply enrolled again."""
        if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
            raise InvalidUpdate(
                f"client id {client_id!r} must be 1-128 characters of letters, digits and '_.:@-', "
                "starting with a letter or digit"
            )
        jobs = frozenset(job_ids)
        if not jobs:
            raise InvalidUpdate(f"enrol client {client_id!r} in at least one job")
        token = new_token(CLIENT_TOKEN_PREFIX)
        digest = token_digest(token)
        now = time.time()
        with self._lock:
            existing = self._by_id.get(client_id)
            if existing is not None and existing.client.active and not rotate:
                raise ClientAlreadyEnrolled(
                    f"client {client_id!r} is already enrolled (jobs: {', '.join(sorted(existing.client.job_ids))}); "
                    "rotate its token to issue a new one (tributary admin enrol --rotate), or revoke it first"
                )
            with self._connect() as db:
                db.execute(
                    "INSERT INTO auth_clients (client_id, token_sha256, enrolled_at, revoked_at) VALUES (?, ?, ?, NULL) "
                    "ON CONFLICT (client_id) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                    "enrolled_at = excluded.enrolled_at, revoked_at = NULL",
                    (client_id, digest, now),
                )
                db.execute("DELETE FROM auth_client_jobs WHERE client_id = ?", (client_id,))
                db.executemany(
                    "INSERT INTO auth_client_jobs (client_id, job_id) VALUES (?, ?)", [(client_id, job) for job in sorted(jobs)]
                )
            if existing is not None:
                del self._by_digest[existing.digest]
            self._remember(digest, EnrolledClient(client_id, jobs, now))
        return token

    def revoke(self, client_id: str) -> tuple[EnrolledClient, bool]:
        """Revoke the client's token; its next call is refused. Returns the
        client and whether it was active (revoking twice changes nothing)."""
        with self._lock:
            existing = self._by_id.get(client_id)
            if existing is None:
                raise UnknownClient(f"no client {client_id!r} was ever enrolled here; `tributary admin clients` lists them")
            if not existing.client.active:
                return existing.client, False
            now = time.time()
            with self._connect() as db:
                db.execute("UPDATE auth_clients SET revoked_at = ? WHERE client_id = ?", (now, client_id))
            revoked = EnrolledClient(client_id, existing.client.job_ids, existing.client.enrolled_at, now)
            self._remember(existing.digest, revoked)
        return revoked, True

    def clients(self) -> list[EnrolledClient]:
        with self._lock:
            return sorted((entry.client for entry in self._by_id.values()), key=lambda c: c.client_id)

    def enrolled_count(self, job_id: str) -> int:
        """Active clients enrolled in `job_id`."""
        with self._lock:
            return sum(1 for entry in self._by_id.values() if entry.client.active and job_id in entry.client.job_ids)

    def _remember(self, digest: bytes, client: EnrolledClient) -> None:
        self._by_id[client.client_id] = _Entry(digest, client)
        self._by_digest[digest] = client


class AdminCredential:
    """The admin token, held only as its digest."""

    def __init__(self, token: str, source: Path) -> None:
        _check_admin_token(token, source)
        self._digest = token_digest(token)
        self.source = source

    def matches(self, token: str | None) -> bool:
        # The digest comparison is constant-time, though comparing digests
        # leaks nothing useful anyway (see `token_digest`).
        return token is not None and hmac.compare_digest(token_digest(token), self._digest)

    @classmethod
    def from_file(cls, path: Path) -> AdminCredential:
        try:
            mode = path.stat().st_mode
            token = path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"admin_token_file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read admin_token_file {path}: {error}") from error
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("admin token file %s can be read by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
        return cls(token, path)

    @classmethod
    def generated_in(cls, state_dir: Path) -> tuple[AdminCredential, bool]:
        """The admin token in `<state_dir>/admin.token`, generated (mode 0600)
        if the file does not exist yet. Returns it and whether it was generated."""
        path = state_dir / ADMIN_TOKEN_FILE_NAME
        token = new_token(ADMIN_TOKEN_PREFIX)
        try:
            # O_EXCL: two servers starting on one directory cannot both write it;
            # the mode is set at creation, so the token is never readable by others.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.from_file(path), False
        except OSError as error:
            raise ConfigError(f"cannot create the admin token file {path}: {error.strerror}") from error
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        logger.warning("generated an admin token into %s (mode 0600): tributary admin --admin-token-file %s ...", path, path)
        return cls(token, path), True


def _check_admin_token(token: str, source: Path) -> None:
    if len(token) < MIN_ADMIN_TOKEN_LENGTH or not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(
            f"admin_token_file {source} must hold one token of at least {MIN_ADMIN_TOKEN_LENGTH} printable "
            "ASCII characters without spaces (make one with: python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\")"
        )


class CallGate:
    """Whether a call may reach its handler, from its method and metadata
    alone (the gRPC interceptor asks before any request is read):

      grpc.health.v1.Health   open
      tributary.v1.Admin      the admin token; a client token is PermissionDenied
      anything else           an active enrolled client's token
    """

    def __init__(self, registry: ClientRegistry, admin: AdminCredential) -> None:
        self.registry = registry
        self.admin = admin

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        service = method.lstrip("/").partition("/")[0]
        if service in OPEN_SERVICES:
            return
        token = bearer_token(metadata)
        if service == ADMIN_SERVICE:
            self._check_admin(token)
        elif token is not None and self.admin.matches(token):
            raise PermissionDenied(
                "the admin token cannot act as a client; enrol a client (tributary admin enrol CLIENT --job JOB) "
                "and use its token"
            )
        else:
            self.registry.authenticate(token)

    def _check_admin(self, token: str | None) -> None:
        if self.admin.matches(token):
            return
        if token is None:
            raise NotAuthenticated(
                "admin RPCs need the admin token: send `authorization: Bearer <admin token>` metadata "
                "(tributary admin --admin-token-file FILE)"
            )
        if self.registry.is_active_client_token(token):
            raise PermissionDenied("this is a client token; admin RPCs need the admin token (tributary admin --admin-token-file FILE)")
        # No path in the message: the caller is not known to be the operator.
        raise NotAuthenticated(
            "the admin token is wrong; use the one in the server's admin token file "
            "(its --admin-token-file, or <state-dir>/admin.token)"
        )


class Authorizer:
    """What an authenticated client may do: act in the jobs it is enrolled in,
    under its own client id. The servicer asks once it has read the request."""

    def __init__(self, registry: ClientRegistry) -> None:
        self.registry = registry

    def authorize(self, metadata: Iterable[tuple[str, str | bytes]] | None, job_id: str, client_id: str = "") -> EnrolledClient:
        """The caller, if it may act in `job_id` (and as `client_id`, when the
        request names one); else NotAuthenticated or PermissionDenied. The
        token is looked up again, so a revocation since the interceptor's
        check is already in force."""
        client = self.registry.authenticate(bearer_token(metadata))
        if job_id not in client.job_ids:
            raise PermissionDenied(
                f"client {client.client_id!r} is not enrolled in job {job_id!r}; ask the operator to enrol it "
                f"(it is enrolled in: {', '.join(sorted(client.job_ids))})"
            )
        if client_id and client_id != client.client_id:
            raise PermissionDenied(
                f"this token was issued to client {client.client_id!r}; it cannot act as client {client_id!r} "
                f"(use client_id={client.client_id!r})"
            )
        return client
