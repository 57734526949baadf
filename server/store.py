"""The state directory: an SQLite database and model checkpoints.

    <state_dir>/tributary.db                 jobs, the update log, versions, checkpoints
    <state_dir>/checkpoints/<job>/v<N>.safetensors

Durability is a write-ahead log. Every accepted update (or securely aggregated
cohort) is written to `update_log` with its payload, in one transaction
committed with a full fsync, before the strategy takes it and before its ack
is sent. Checkpoints of the model are written in the background every
`checkpoint_every` versions (atomically: temporary file, fsync, rename, then a
database row naming its SHA-256). Recovery loads the newest intact checkpoint
and replays the log entries after it through the job's own code path
(`Job.replay_update`), which rebuilds the exact model, the fedbuff buffer and
the idempotency keys, so nothing acknowledged is lost and nothing counts twice.

Kept, and for how long:
- update payloads until every retained checkpoint covers them;
- update metadata (key, client, versions, staleness; what answers retried
  pushes and feeds run reports) for the newest `keep_log_entries` per job;
- the newest `keep_checkpoints` checkpoints per job (0 keeps all);
- one row per published version, always (a few dozen bytes each), with the
  energy clients reported for the updates that went into it.
- one row per evaluated version, always (its metrics as JSON: the server
  evaluator's and the federated aggregate's, `federated_` names);
- one row per client evaluation report (federated evaluation; a replaced one
  too, so its key still answers a retry), always; the newest versions' reports
  are read back, in the order taken, to go on aggregating after a restart.

Schema 2 added `energy_joules` to update_log and versions; schema 3 added
`wire_bytes` to update_log (the update's size on the wire, for run reports;
NULL: logged before) and the `evaluations` table (the server evaluator's
metrics per version, restored into JobStats.evaluations on restart). An older
database is migrated in place when opened (old rows count 0 J), after which an
older server refuses it by its schema number instead of misreading it.
Schema 4 added the `federated_reports` table (created with the schema).

Lock order: the job's lock, then StateStore._lock (the job calls in while
holding its own; this class never calls into a job while holding its lock).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from proto.logcontext import log_context
from proto.tensors import TensorSpec
from server import faults
from server.config import JobConfig, RetentionConfig
from server.core import Job, ModelSnapshot, PushOutcome, UpdateHeader
from server.errors import IdempotencyConflict, ServerError, StateError, Unavailable
from server.federated import KEPT_VERSIONS, EvaluationReport

log = logging.getLogger("tributary.server")

DATABASE_NAME = "tributary.db"
LOCK_NAME = "lock"
"""Held (flock) by the one server using the directory: two writers would
interleave their logs and leave the directory unrecoverable."""
REPLAYABLE_CHECKPOINTS = 3
"""Update payloads are kept until this many of the newest checkpoints cover
them (fewer if fewer are kept): recovery can fall back that far."""
SCHEMA_VERSION = "4"
_TO_3 = ("ALTER TABLE update_log ADD COLUMN wire_bytes INTEGER",)
"""Schema 3: the bytes each update took on the wire (NULL for rows logged
before: unknown), and the `evaluations` table (created with the schema)."""
_MIGRATIONS = {
    "1": (
        "ALTER TABLE update_log ADD COLUMN energy_joules REAL NOT NULL DEFAULT 0",
        "ALTER TABLE versions ADD COLUMN energy_joules REAL NOT NULL DEFAULT 0",
        *_TO_3,
    ),
    "2": _TO_3,
    "3": (),  # schema 4: only the `federated_reports` table, which _SCHEMA creates
}
"""Schema -> the statements that bring it to SCHEMA_VERSION (in one transaction)."""
PART_BYTES = 64 << 20
"""Payloads are stored in parts: SQLite caps one value at 1 GB."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    created_at REAL NOT NULL,
    pruned_updates INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS update_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('update', 'cohort')),
    idempotency_key TEXT,
    client_id TEXT,
    base_version INTEGER,
    num_samples INTEGER,
    version_at_arrival INTEGER NOT NULL,
    staleness INTEGER,
    staleness_weight REAL,
    version_after INTEGER NOT NULL,
    cohort_id TEXT,
    weight_sum REAL,
    contributors INTEGER NOT NULL DEFAULT 1,
    received_at REAL NOT NULL,
    energy_joules REAL NOT NULL DEFAULT 0,
    wire_bytes INTEGER,
    UNIQUE (job_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS update_log_by_job ON update_log (job_id, seq);
CREATE TABLE IF NOT EXISTS update_payloads (
    seq INTEGER NOT NULL,
    part INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (seq, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    job_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    published_at REAL NOT NULL,
    energy_joules REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evaluations (
    job_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    evaluated_at REAL NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (job_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS federated_reports (
    job_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    reported_at REAL NOT NULL,
    PRIMARY KEY (job_id, idempotency_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS federated_reports_by_version ON federated_reports (job_id, version);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    written_at REAL NOT NULL,
    PRIMARY KEY (job_id, version)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class _Entry:
    """One update_log row."""

    seq: int
    job_id: str
    kind: str
    idempotency_key: str | None
    client_id: str | None
    base_version: int | None
    num_samples: int | None
    version_at_arrival: int
    staleness: int | None
    staleness_weight: float | None
    version_after: int
    cohort_id: str | None
    weight_sum: float | None
    contributors: int
    received_at: float
    energy_joules: float


_ENTRY_COLUMNS = ", ".join(f.name for f in dataclasses.fields(_Entry))


@dataclass(frozen=True)
class _Published:
    snapshot: ModelSnapshot
    seq: int


def job_settings(config: JobConfig, specs: Sequence[TensorSpec]) -> dict[str, object]:
    """What must not change across restarts: replaying the log under other
    settings would build another model than the one clients were acked for."""
    return {
        "strategy": dataclasses.asdict(config.strategy),
        "staleness": dataclasses.asdict(config.staleness),
        "max_staleness": config.max_staleness,
        "secure_aggregation": config.secure_aggregation is not None,
        "model": [[s.name, s.dtype.str, list(s.shape)] for s in specs],
    }


class StateStore:
    """Implements `server.core.Journal` for the jobs it opened."""

    def __init__(self, state_dir: Path, retention: RetentionConfig = RetentionConfig()) -> None:
        self.state_dir = Path(state_dir)
        self.retention = retention
        self._lock_file: IO[str] | None = None
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = _lock_exclusively(self.state_dir / LOCK_NAME)
            (self.state_dir / "checkpoints").mkdir(exist_ok=True)
            self._db = sqlite3.connect(self.state_dir / DATABASE_NAME, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA page_size=65536")  # payloads are large blobs: fewer, larger pages (new databases only)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: each commit is fsynced before it returns
            with self._transaction():
                for statement in _SCHEMA.split(";"):  # not executescript(): it would commit mid-transaction
                    if statement.strip():
                        self._db.execute(statement)
                found = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if found is None:
                    self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                elif found[0] in _MIGRATIONS:
                    for statement in _MIGRATIONS[found[0]]:
                        self._db.execute(statement)
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
                    log.info("state directory %s: migrated schema %s to %s", self.state_dir, found[0], SCHEMA_VERSION)
                elif found[0] != SCHEMA_VERSION:
                    raise StateError(f"state directory {self.state_dir} has schema {found[0]}; this server reads {SCHEMA_VERSION}")
        except StateError:
            if hasattr(self, "_db"):  # a newer schema: the lock is ours, and the database open
                self._db.close()
            self._release_lock()
            raise
        except sqlite3.DatabaseError as error:
            self._release_lock()
            raise StateError(f"state directory {self.state_dir}: {DATABASE_NAME} cannot be used: {error}") from error
        except OSError as error:
            self._release_lock()
            raise StateError(f"state directory {self.state_dir} cannot be used: {error}") from error
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._latest: dict[str, _Published] = {}
        self._checkpointed: dict[str, int] = {}
        self._due: dict[str, _Published] = {}
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._worker = threading.Thread(target=self._checkpoint_loop, name="tributary-checkpoints", daemon=True)
        self._worker.start()

    # -- opening jobs ----------------------------------------------------------------

    def open_job(self, job: Job) -> bool:
        """Recover `job` from the directory, or register it there if new; from
        then on the job logs to this store. True when state was recovered."""
        settings = json.dumps(job_settings(job.config, job.specs), sort_keys=True)
        row = self._db.execute("SELECT settings FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        if row is None:
            self._register(job, settings)
            recovered = False
        else:
            _check_settings(job.job_id, json.loads(row[0]), json.loads(settings), self.state_dir)
            self._recover(job)
            recovered = True
        self._jobs[job.job_id] = job
        job.attach_journal(self)
        return recovered

    def _register(self, job: Job, settings: str) -> None:
        snapshot = job.snapshot()
        with self._transaction():
            self._db.execute("INSERT INTO jobs (job_id, settings, created_at) VALUES (?, ?, ?)", (job.job_id, settings, time.time()))
            self._db.execute("INSERT INTO versions (job_id, version, seq, published_at) VALUES (?, 0, 0, ?)", (job.job_id, snapshot.created_at))
        self._write_checkpoint(job.job_id, _Published(snapshot, 0))
        self._latest[job.job_id] = _Published(snapshot, 0)

    def _recover(self, job: Job) -> None:
        self._remove_orphan_files(job.job_id)
        version, seq, tensors = self._newest_checkpoint(job)
        published_at = self._db.execute(
            "SELECT published_at FROM versions WHERE job_id = ? AND version = ?", (job.job_id, version)
        ).fetchone()
        job.restore(version, tensors, published_at[0] if published_at else time.time())
        latest_seq = seq
        for entry in self._entries_after(job.job_id, seq):
            try:
                self._replay(job, entry)
            except ServerError as error:
                # The strategy refused it when it first came (e.g. an overflowing
                # aggregate) and the crash came before the entry was dropped: the
                # client was never acked, so drop it now, as the server would have.
                log.warning("job %r: dropping logged update %d, refused on replay: %s", job.job_id, entry.seq, error, extra=log_context(job=job.job_id))
                self.forget(entry.seq)
                continue
            if job.snapshot().version != entry.version_after:
                raise StateError(
                    f"job {job.job_id!r}: replaying log entry {entry.seq} gave version {job.snapshot().version}, "
                    f"the log says {entry.version_after}; the state directory is inconsistent"
                )
            if entry.version_after > entry.version_at_arrival:
                latest_seq = entry.seq
        self._restore_acks_and_stats(job)
        self._latest[job.job_id] = _Published(job.snapshot(), latest_seq)
        self._checkpointed[job.job_id] = version
        log.info(
            "job %r: recovered version %d (checkpoint %d plus the log after it)", job.job_id, job.snapshot().version, version,
            extra=log_context(job=job.job_id, version=job.snapshot().version),
        )  # fmt: skip

    def _newest_checkpoint(self, job: Job) -> tuple[int, int, dict[str, np.ndarray]]:
        rows = self._db.execute(
            "SELECT version, seq, file, sha256 FROM checkpoints WHERE job_id = ? ORDER BY version DESC", (job.job_id,)
        ).fetchall()
        for version, seq, file, digest in rows:
            path = self.state_dir / file
            try:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ValueError("its SHA-256 does not match the one recorded")
                tensors = load(data)
            except (OSError, ValueError, SafetensorError) as error:
                log.warning(
                    "job %r: checkpoint %s of version %d is unusable (%s); trying an older one", job.job_id, path, version, error,
                    extra=log_context(job=job.job_id, version=version),
                )  # fmt: skip
                continue
            return int(version), int(seq), {spec.name: tensors[spec.name] for spec in job.specs if spec.name in tensors}
        raise StateError(f"job {job.job_id!r}: no intact checkpoint in {self.state_dir}; it cannot be recovered")

    def _entries_after(self, job_id: str, seq: int) -> list[_Entry]:
        rows = self._db.execute(f"SELECT {_ENTRY_COLUMNS} FROM update_log WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [_Entry(*row) for row in rows.fetchall()]

    def _replay(self, job: Job, entry: _Entry) -> None:
        payload = self._payload(entry.seq)
        if payload is None:
            raise StateError(f"job {job.job_id!r}: the payload of log entry {entry.seq} is missing; the state directory is inconsistent")
        if entry.kind == "cohort":
            job.replay_cohort(np.frombuffer(payload, dtype="<f8"), float(entry.weight_sum or 0.0), entry.contributors, entry.seq, entry.energy_joules)
            return
        header, outcome = _header_and_outcome(job, entry)
        job.replay_update(header, outcome, _split(payload, job.specs), entry.seq)

    def _payload(self, seq: int) -> bytes | None:
        parts = self._db.execute("SELECT data FROM update_payloads WHERE seq = ? ORDER BY part", (seq,)).fetchall()
        return b"".join(p[0] for p in parts) if parts else None

    def _restore_acks_and_stats(self, job: Job) -> None:
        window = job.config.idempotency_window
        rows = self._db.execute(
            f"SELECT * FROM (SELECT {_ENTRY_COLUMNS} FROM update_log WHERE job_id = ? AND kind = 'update' ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (job.job_id, window),
        )
        (logged,) = self._db.execute("SELECT COUNT(*) FROM update_log WHERE job_id = ? AND kind = 'update'", (job.job_id,)).fetchone()
        job.remember_acks((_header_and_outcome(job, _Entry(*row), with_specs=False) for row in rows.fetchall()), more_in_log=logged > window)
        stats = job.stats
        pruned = self._db.execute("SELECT pruned_updates FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()[0]
        (accepted,) = self._db.execute("SELECT COALESCE(SUM(contributors), 0) FROM update_log WHERE job_id = ?", (job.job_id,)).fetchone()
        stats.updates_accepted = int(pruned) + int(accepted)
        (stats.cohorts_applied,) = self._db.execute(
            "SELECT COUNT(*) FROM update_log WHERE job_id = ? AND kind = 'cohort'", (job.job_id,)
        ).fetchone()
        stats.staleness.clear()
        stats.updates_per_client.clear()
        for client_id, staleness, count in self._db.execute(
            "SELECT client_id, staleness, COUNT(*) FROM update_log WHERE job_id = ? AND kind = 'update' GROUP BY client_id, staleness",
            (job.job_id,),
        ):
            stats.staleness[int(staleness)] += count
            stats.updates_per_client[client_id] += count
        stats.versions.clear()
        recent = self._db.execute(
            "SELECT version, published_at FROM versions WHERE job_id = ? ORDER BY version DESC LIMIT ?",
            (job.job_id, stats.versions.maxlen),
        ).fetchall()
        stats.versions.extend((int(v), float(t)) for v, t in reversed(recent))
        (published_energy,) = self._db.execute("SELECT COALESCE(SUM(energy_joules), 0) FROM versions WHERE job_id = ?", (job.job_id,)).fetchone()
        recent_energy = self._db.execute(
            "SELECT version, energy_joules FROM versions WHERE job_id = ? ORDER BY version DESC LIMIT ?",
            (job.job_id, stats.version_energy.maxlen),
        ).fetchall()
        job.restore_energy(float(published_energy), ((int(v), float(e)) for v, e in reversed(recent_energy)))
        evaluated = self._db.execute(
            "SELECT version, evaluated_at, metrics FROM evaluations WHERE job_id = ? ORDER BY version DESC LIMIT ?",
            (job.job_id, stats.evaluations.maxlen),
        ).fetchall()
        job.restore_evaluations((int(v), float(t), json.loads(m)) for v, t, m in reversed(evaluated))
        reports = self._db.execute(
            "SELECT version, client_id, idempotency_key, num_examples, metrics FROM federated_reports "
            "WHERE job_id = ? AND version >= ? ORDER BY reported_at",
            (job.job_id, job.snapshot().version - KEPT_VERSIONS + 1),
        ).fetchall()
        job.restore_federated_reports(
            EvaluationReport(client_id=c, version=int(v), num_examples=int(n), metrics=json.loads(m), idempotency_key=k) for v, c, k, n, m in reports
        )

    # -- the journal (called by jobs, under their lock) -----------------------------

    def record_update(
        self, job_id: str, header: UpdateHeader, outcome: PushOutcome, delta: Mapping[str, np.ndarray], *, version_energy_joules: float = 0.0
    ) -> int:
        parts = _parts(delta[spec.name] for spec in header.specs)
        now = time.time()
        with self._lock, self._transaction(writing=True):
            seq = self._insert(
                "INSERT INTO update_log (job_id, kind, idempotency_key, client_id, base_version, num_samples, "
                "version_at_arrival, staleness, staleness_weight, version_after, received_at, energy_joules, wire_bytes) "
                "VALUES (?, 'update', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, header.idempotency_key, header.client_id, header.base_version, header.num_samples,
                 outcome.version_at_arrival, outcome.staleness, outcome.staleness_weight, outcome.version_after, now,
                 header.energy_joules, header.payload_bytes),
            )  # fmt: skip
            self._db.executemany("INSERT INTO update_payloads VALUES (?, ?, ?)", ((seq, i, part) for i, part in enumerate(parts)))
            if outcome.version_after > outcome.version_at_arrival:
                self._insert_version(job_id, outcome.version_after, seq, now, version_energy_joules)
        return seq

    def record_cohort(
        self, job_id: str, cohort_id: str, weighted_sum: np.ndarray, weight_sum: float, contributors: int, version: int, *, energy_joules: float = 0.0
    ) -> int:
        parts = _parts([np.ascontiguousarray(weighted_sum, dtype="<f8")])
        now = time.time()
        with self._lock, self._transaction(writing=True):
            seq = self._insert(
                "INSERT INTO update_log (job_id, kind, cohort_id, version_at_arrival, version_after, weight_sum, contributors, received_at, energy_joules) "
                "VALUES (?, 'cohort', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, cohort_id, version - 1, version, weight_sum, contributors, now, energy_joules),
            )
            self._db.executemany("INSERT INTO update_payloads VALUES (?, ?, ?)", ((seq, i, part) for i, part in enumerate(parts)))
            self._insert_version(job_id, version, seq, now, energy_joules)
        return seq

    def _insert_version(self, job_id: str, version: int, seq: int, published_at: float, energy_joules: float) -> None:
        self._db.execute(
            "INSERT INTO versions (job_id, version, seq, published_at, energy_joules) VALUES (?, ?, ?, ?, ?)",
            (job_id, version, seq, published_at, energy_joules),
        )

    def forget(self, seq: int) -> None:
        with self._lock, self._transaction(writing=True):
            self._db.execute("DELETE FROM update_payloads WHERE seq = ?", (seq,))
            self._db.execute("DELETE FROM versions WHERE seq = ? AND seq > 0", (seq,))
            self._db.execute("DELETE FROM update_log WHERE seq = ?", (seq,))

    def recall(self, job_id: str, idempotency_key: str) -> tuple[UpdateHeader, PushOutcome] | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM update_log WHERE job_id = ? AND idempotency_key = ?", (job_id, idempotency_key)
            ).fetchone()
        if row is None:
            return None
        job = self._jobs[job_id]
        return _header_and_outcome(job, _Entry(*row), with_specs=False)

    def cohort_version(self, job_id: str, cohort_id: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version_after FROM update_log WHERE job_id = ? AND kind = 'cohort' AND cohort_id = ?", (job_id, cohort_id)
            ).fetchone()
        return None if row is None else int(row[0])

    def record_evaluation(self, job_id: str, version: int, evaluated_at: float, metrics: Mapping[str, float]) -> None:
        with self._lock, self._transaction(writing=True):
            self._db.execute(
                "INSERT OR REPLACE INTO evaluations (job_id, version, evaluated_at, metrics) VALUES (?, ?, ?, ?)",
                (job_id, version, evaluated_at, json.dumps(dict(metrics), sort_keys=True)),
            )

    def record_federated_report(self, job_id: str, report: EvaluationReport, evaluated_at: float, metrics: Mapping[str, float]) -> None:
        with self._lock:
            # keys of versions the job no longer keeps in memory are still here, forever
            used = self._db.execute(
                "SELECT version FROM federated_reports WHERE job_id = ? AND idempotency_key = ?", (job_id, report.idempotency_key)
            ).fetchone()
        if used is not None:
            raise IdempotencyConflict(
                f"idempotency_key {report.idempotency_key!r} was used for an earlier report (version {used[0]}); use a new key per report"
            )
        with self._lock, self._transaction(writing=True):
            self._db.execute(
                "INSERT INTO federated_reports (job_id, version, client_id, idempotency_key, num_examples, metrics, reported_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, report.version, report.client_id, report.idempotency_key, report.num_examples,
                 json.dumps(dict(report.metrics), sort_keys=True), time.time()),
            )  # fmt: skip
            self._db.execute(
                "INSERT OR REPLACE INTO evaluations (job_id, version, evaluated_at, metrics) VALUES (?, ?, ?, ?)",
                (job_id, report.version, evaluated_at, json.dumps(dict(metrics), sort_keys=True)),
            )

    def published(self, job_id: str, snapshot: ModelSnapshot, seq: int) -> None:
        with self._lock:
            self._latest[job_id] = published = _Published(snapshot, seq)
            if snapshot.version - self._checkpointed.get(job_id, 0) >= self.retention.checkpoint_every:
                self._due[job_id] = published
                self._wake.notify()

    # -- checkpoints ------------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        while True:
            with self._wake:
                while not self._due and not self._closing:
                    self._wake.wait()
                if not self._due:
                    return
                job_id, published = self._due.popitem()
            try:
                self._write_checkpoint(job_id, published)
            except (OSError, sqlite3.Error) as error:  # the log still holds everything; try again next time
                log.error(
                    "job %r: checkpoint of version %d failed: %s", job_id, published.snapshot.version, error,
                    extra=log_context(job=job_id, version=published.snapshot.version),
                )  # fmt: skip

    def _write_checkpoint(self, job_id: str, published: _Published) -> None:
        snapshot = published.snapshot
        folder = self.state_dir / "checkpoints" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        name = f"v{snapshot.version:012d}.safetensors"
        data = save(dict(snapshot.tensors))
        tmp = folder / (name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        faults.point("checkpoint.written")
        os.replace(tmp, folder / name)
        _fsync_directory(folder)
        faults.point("checkpoint.renamed")
        with self._lock:
            with self._transaction(writing=True):
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, snapshot.version, published.seq, f"checkpoints/{job_id}/{name}", hashlib.sha256(data).hexdigest(), time.time()),
                )
                stale_files = self._prune(job_id)
            self._checkpointed[job_id] = max(self._checkpointed.get(job_id, 0), snapshot.version)
        for file in stale_files:
            (self.state_dir / file).unlink(missing_ok=True)

    def _prune(self, job_id: str) -> list[str]:
        """Apply the retention rules after a checkpoint; returns files to delete."""
        stale: list[str] = []
        keep = self.retention.keep_checkpoints
        if keep:
            old = self._db.execute(
                "SELECT version, file FROM checkpoints WHERE job_id = ? ORDER BY version DESC LIMIT -1 OFFSET ?", (job_id, keep)
            ).fetchall()
            for version, file in old:
                self._db.execute("DELETE FROM checkpoints WHERE job_id = ? AND version = ?", (job_id, version))
                stale.append(file)
        replayable = min(keep, REPLAYABLE_CHECKPOINTS) if keep else REPLAYABLE_CHECKPOINTS
        (oldest_seq,) = self._db.execute(
            "SELECT MIN(seq) FROM (SELECT seq FROM checkpoints WHERE job_id = ? ORDER BY version DESC LIMIT ?)", (job_id, replayable)
        ).fetchone()
        self._db.execute(
            "DELETE FROM update_payloads WHERE seq IN (SELECT seq FROM update_log WHERE job_id = ? AND seq <= ?)", (job_id, oldest_seq)
        )
        cutoff = self._db.execute(
            "SELECT seq FROM update_log WHERE job_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?", (job_id, self.retention.keep_log_entries)
        ).fetchone()
        if cutoff is not None:
            limit = min(int(cutoff[0]), int(oldest_seq))
            (pruned,) = self._db.execute(
                "SELECT COALESCE(SUM(contributors), 0) FROM update_log WHERE job_id = ? AND seq <= ?", (job_id, limit)
            ).fetchone()
            self._db.execute("UPDATE jobs SET pruned_updates = pruned_updates + ? WHERE job_id = ?", (pruned, job_id))
            self._db.execute("DELETE FROM update_log WHERE job_id = ? AND seq <= ?", (job_id, limit))
        return stale

    def _remove_orphan_files(self, job_id: str) -> None:
        """Checkpoint files a crash left behind before their database row."""
        folder = self.state_dir / "checkpoints" / job_id
        if not folder.is_dir():
            return
        known = {row[0] for row in self._db.execute("SELECT file FROM checkpoints WHERE job_id = ?", (job_id,))}
        for path in folder.iterdir():
            if f"checkpoints/{job_id}/{path.name}" not in known:
                path.unlink(missing_ok=True)

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint every job's latest version (so a restart replays nothing)
        and close the database. Updates still buffered stay in the log."""
        with self._wake:
            self._closing = True
            self._due.clear()
            self._wake.notify()
        self._worker.join()
        for job_id, published in list(self._latest.items()):
            if published.snapshot.version > self._checkpointed.get(job_id, -1):
                self._write_checkpoint(job_id, published)
        with self._lock:
            self._db.close()
        self._release_lock()

    def _release_lock(self) -> None:
        lock_file = getattr(self, "_lock_file", None)
        if lock_file is not None:
            lock_file.close()  # closing the file releases the flock
            self._lock_file = None

    # -- machinery ---------------------------------------------------------------------

    def _insert(self, sql: str, values: tuple[object, ...]) -> int:
        try:
            cursor = self._db.execute(sql, values)
        except sqlite3.IntegrityError as error:  # the key is logged already (Job._recall looks there first)
            raise Unavailable(f"the update log refused this entry ({error}); nothing was applied, retry") from error
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _transaction(self, *, writing: bool = False) -> _Transaction:
        return _Transaction(self._db, writing)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error. A failed write is
    reported to the client as UNAVAILABLE (nothing was acknowledged)."""

    def __init__(self, db: sqlite3.Connection, writing: bool) -> None:
        self._db = db
        self._writing = writing

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:  # e.g. locked by another process past the busy timeout
            if self._writing:
                raise Unavailable(f"the server could not store this durably ({error}); nothing was applied, retry later") from error
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as commit_error:
                self._db.execute("ROLLBACK")
                error, kind = commit_error, type(commit_error)
        else:
            self._db.execute("ROLLBACK")
        if self._writing and isinstance(error, (sqlite3.Error, OSError)):
            raise Unavailable(f"the server could not store this durably ({error}); nothing was applied, retry later") from error


def _parts(arrays: Iterator[np.ndarray] | Sequence[np.ndarray]) -> list[memoryview]:
    """The arrays' raw bytes, concatenated, cut into parts of PART_BYTES."""
    views = [memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data) for a in arrays]
    parts: list[memoryview] = []
    for view in views:
        for start in range(0, max(len(view), 1), PART_BYTES):
            parts.append(view[start : start + PART_BYTES])
    return parts


def _split(payload: bytes, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    arrays = {}
    offset = 0
    for spec in specs:
        arrays[spec.name] = np.frombuffer(payload, dtype=spec.dtype, count=spec.nbytes // spec.dtype.itemsize, offset=offset).reshape(spec.shape)
        offset += spec.nbytes
    if offset != len(payload):
        raise StateError(f"a logged payload holds {len(payload)} bytes; the model needs {offset}")
    return arrays


def _header_and_outcome(job: Job, entry: _Entry, *, with_specs: bool = True) -> tuple[UpdateHeader, PushOutcome]:
    if entry.kind != "update" or entry.base_version is None or entry.num_samples is None:
        raise StateError(f"job {job.job_id!r}: log entry {entry.seq} is not a complete update record")
    header = UpdateHeader(
        job_id=job.job_id,
        client_id=entry.client_id or "",
        idempotency_key=entry.idempotency_key or "",
        base_version=entry.base_version,
        num_samples=entry.num_samples,
        specs=job.specs if with_specs else (),
        energy_joules=float(entry.energy_joules),
    )
    outcome = PushOutcome(entry.version_at_arrival, entry.staleness or 0, entry.staleness_weight or 0.0, entry.version_after)
    return header, outcome


def _check_settings(job_id: str, stored: dict[str, object], given: dict[str, object], state_dir: Path) -> None:
    changed = sorted(key for key in stored.keys() | given.keys() if stored.get(key) != given.get(key))
    if changed:
        details = "; ".join(f"{key}: stored {stored.get(key)!r}, given {given.get(key)!r}" for key in changed)
        raise StateError(
            f"job {job_id!r} in {state_dir} was created with other settings ({details}); "
            "start with the same settings, or use a new --state-dir"
        )


def _lock_exclusively(path: Path) -> IO[str]:
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise StateError(
            f"state directory {path.parent} is in use by {holder}; one server per state directory "
            "(stop the other one first, or give this one another --state-dir)"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"tributary server pid {os.getpid()}\n")
    lock_file.flush()
    return lock_file


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
