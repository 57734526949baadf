"""What the server wrote to its state directory, read straight from the
SQLite file (read-only, beside the running server: WAL lets a reader in
while the server writes), to compare with the shadows.

The table and column names are the state directory's on-disk format
(server/store.py: `update_log`; server/auth.py: `auth_clients`,
`auth_client_jobs`); the fuzz reads the file, not the server's objects, so a
row the server logged but never acknowledged, or an enrolment it kept in
memory only, shows up.
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Mapping
from pathlib import Path

DB_NAME = "tributary.db"


class StateDb:
    def __init__(self, state_dir: Path) -> None:
        path = state_dir / DB_NAME
        assert path.exists(), f"the server wrote no {DB_NAME} in {state_dir}"
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)

    def close(self) -> None:
        self._db.close()

    def logged_updates(self) -> collections.Counter[tuple[str, str, str]]:
        """(job, idempotency key, client) of every plaintext update in the log, counted."""
        rows = self._db.execute("SELECT job_id, idempotency_key, client_id FROM update_log WHERE kind = 'update'").fetchall()
        return collections.Counter((str(job), str(key), str(client)) for job, key, client in rows)

    def check_update_log(self, accepted: Mapping[str, Mapping[str, str]]) -> None:
        """The log holds exactly the acknowledged updates, each once:
        `accepted` is job -> idempotency key -> client id."""
        logged = self.logged_updates()
        twice = {entry: n for entry, n in logged.items() if n > 1}
        assert not twice, f"updates logged more than once: {twice}"
        expected = {(job, key, client) for job, keys in accepted.items() for key, client in keys.items()}
        unacked = set(logged) - expected
        assert not unacked, f"the update log holds updates that were never acknowledged: {sorted(unacked)[:5]}"
        missing = expected - set(logged)
        assert not missing, f"acknowledged updates missing from the update log: {sorted(missing)[:5]}"

    def enrolments(self) -> dict[str, tuple[bytes, frozenset[str], bool]]:
        """Client id -> (token digest, jobs, revoked)."""
        jobs: dict[str, set[str]] = collections.defaultdict(set)
        for client_id, job_id in self._db.execute("SELECT client_id, job_id FROM auth_client_jobs"):
            jobs[client_id].add(job_id)
        return {
            client_id: (bytes(digest), frozenset(jobs.get(client_id, ())), revoked_at is not None)
            for client_id, digest, revoked_at in self._db.execute("SELECT client_id, token_sha256, revoked_at FROM auth_clients")
        }
