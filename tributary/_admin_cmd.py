"""`tributary admin`: a gRPC client of the server's Admin service (no server code)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from client_sdk import AdminClient, ClientTLS, TributaryError


def _tls(settings: dict[str, Any]) -> ClientTLS | None:
    files = {key: settings[key] for key in ("ca_file", "cert_file", "key_file") if settings[key] is not None}
    if files and settings["insecure"]:
        raise click.UsageError("--insecure talks plaintext; drop it, or drop --ca/--cert/--key")
    return ClientTLS(**files) if files else None


@contextlib.contextmanager
def _admin(settings: dict[str, Any]) -> Iterator[AdminClient]:
    path: Path = settings["admin_token_file"]
    try:
        token = path.read_text()
    except OSError as error:
        raise click.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--admin-token-file") from error
    try:
        client = AdminClient(settings["address"], token, tls=_tls(settings), insecure=settings["insecure"])
    except ValueError as error:
        raise click.ClickException(f"{error} (admin token from {path})") from error
    try:
        with client:
            yield client
    except TributaryError as error:
        raise click.ClickException(str(error)) from error


def show_status(settings: dict[str, Any]) -> None:
    with _admin(settings) as admin:
        jobs = admin.status()
    rows = [("JOB", "STRATEGY", "VERSION", "UPDATES", "PENDING", "ENROLLED", "TRAINING", "ENERGY_J")]
    rows += [
        (
            j.job_id, j.strategy, str(j.version), str(j.updates_accepted), str(j.pending_updates), str(j.enrolled_clients),
            str(j.active_trainers), f"{j.energy_joules_total:.1f}",
        )  # fmt: skip
        for j in jobs
    ]
    _table(rows)


def enrol(settings: dict[str, Any], options: dict[str, Any]) -> None:
    token_out: Path | None = options["token_out"]
    out_fd = None
    created = False
    if token_out is not None:
        # Opened before enrolling: a token that cannot be written would be lost.
        created = not token_out.exists()
        try:
            out_fd = os.open(token_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(out_fd, 0o600)  # an existing file keeps its mode otherwise
        except OSError as error:
            raise click.BadParameter(f"cannot write {token_out}: {error.strerror}", param_hint="--token-out") from error
    try:
        with _admin(settings) as admin:
            enrolment = admin.enrol(options["client_id"], options["jobs"], rotate=options["rotate"])
    except BaseException:
        if out_fd is not None:
            os.close(out_fd)
            if created and token_out is not None:
                token_out.unlink()
        raise
    jobs = ", ".join(enrolment.job_ids)
    if out_fd is not None:
        with os.fdopen(out_fd, "w") as file:
            file.write(enrolment.token + "\n")
        click.echo(f"enrolled client {enrolment.client_id!r} in job(s) {jobs}; token written to {token_out}")
        return
    click.echo(f"enrolled client {enrolment.client_id!r} in job(s) {jobs}; its token (shown once, keep it secret):", err=True)
    click.echo(enrolment.token)
    sys.stdout.flush()


def revoke(settings: dict[str, Any], client_id: str) -> None:
    with _admin(settings) as admin:
        was_active = admin.revoke(client_id)
    click.echo(f"revoked client {client_id!r}" if was_active else f"client {client_id!r} was already revoked")


def list_clients(settings: dict[str, Any]) -> None:
    with _admin(settings) as admin:
        clients = admin.clients()
    if not clients:
        click.echo("no clients enrolled; enrol one with: tributary admin enrol CLIENT --job JOB")
        return
    rows = [("CLIENT", "JOBS", "ENROLLED", "REVOKED")]
    rows += [(c.client_id, ",".join(c.job_ids), _when(c.enrolled_at), _when(c.revoked_at) if c.revoked_at else "-") for c in clients]
    _table(rows)


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(unix))


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
