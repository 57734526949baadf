"""`tributary report RUN`: plots and a summary of a run (see tributary/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def report_for_run(run_dir: Path) -> str:
    """The report of a run `tributary demo` or `simulate` just wrote, into
    <run_dir>/report: where its HTML page is, or why there is none (the run's
    own results are written already and must not be lost to a failed report)."""
    from tributary.report import ReportError, write_report

    try:
        written = write_report(run_dir, run_dir / "report", "both")
    except ImportError as error:  # matplotlib comes with the `report` extra
        return f"not written ({error}; install tributary[report], then run `tributary report {run_dir}`)"
    except (ReportError, OSError) as error:
        return f"not written ({error})"
    return str(written[-1])


def run_report(options: dict[str, Any]) -> None:
    from tributary.report import ReportError, write_report

    target = options.get("target")
    if target is not None and not 0 < target <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {target}", param_hint="--target")
    try:
        written = write_report(options["run"], options["out_dir"], options["fmt"], target=target)
    except ReportError as error:
        raise click.ClickException(f"RUN {options['run']}: {error}") from error
    except OSError as error:  # e.g. --out not writable
        raise click.ClickException(f"cannot write the report: {error}") from error
    for path in written:
        click.echo(f"report: {path}")
