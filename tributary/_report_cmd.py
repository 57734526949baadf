"""`tributary report RUN`: plots and a summary of a run (see tributary/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def report_for_run(run_dir: Path) -> Path:
    """The report of a run `tributary demo` or `simulate` just wrote, into
    <run_dir>/report; returns its HTML page (what they print)."""
    from tributary.report import write_report

    written = write_report(run_dir, run_dir / "report", "both")
    return written[-1]


def run_report(options: dict[str, Any]) -> None:
    from tributary.report import ReportError, write_report

    target = options.get("target")
    if target is not None and not 0 < target <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {target}", param_hint="--target")
    try:
        written = write_report(options["run"], options["out_dir"], options["fmt"], target=target)
    except ReportError as error:
        raise click.ClickException(f"RUN {options['run']}: {error}") from error
    for path in written:
        click.echo(f"report: {path}")
