"""Run reports: PNG plots and a Markdown / HTML summary of a finished (or
running) federation, from what the run recorded.

Three kinds of run are read, without importing the server:
- a server state directory (`tributary.db`, read only): versions, the server
  evaluator's metrics, the update log (staleness, clients, bytes on the wire);
- a `tributary simulate` folder (results.json, devices.json);
- a `tributary demo` folder (results.json).
What a source does not record is said in the report ("not recorded: ..."),
never made up. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLOTS = ("accuracy_time", "accuracy_version", "staleness", "updates_per_client", "bytes")
FORMATS = ("md", "html", "both")


class ReportError(Exception):
    """The run folder cannot be read (the message names it and says why)."""


@dataclass
class RunRecord:
    """What one job of one run recorded, in the shapes the plots need."""

    name: str
    source: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    time_label: str = "seconds"
    accuracy: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds, version, accuracy), oldest first."""
    federated_accuracy: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds, version, example-weighted accuracy the clients reported on their own
    held-out data), oldest first: federated evaluation, server state directories only."""
    target: float | None = None
    staleness: Counter[int] | None = None
    updates_per_client: Counter[str] | None = None
    bytes_over: list[tuple[float, int]] | None = None
    """(x, bytes): per version, or over time (see bytes_label)."""
    bytes_label: str = "version"
    accepted: int | None = None
    rejected: dict[str, int] | None = None
    energy_j: float | None = None
    final_version: int | None = None
    missing: list[str] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    """Plot kind -> PNG file name (relative to the report)."""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name) or "run"

    def time_to(self, target: float) -> tuple[float, int] | None:
        return next(((t, v) for t, v, a in self.accuracy if a >= target), None)


# -- reading runs --------------------------------------------------------------------


def load_run(path: Path, *, target: float | None = None) -> list[RunRecord]:
    """The jobs a run folder recorded; ReportError naming it when it is not one."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist; give a server state directory or a `tributary simulate`/`demo` run folder")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; give a server state directory or a `tributary simulate`/`demo` run folder")
    records = _load(path, target)
    for record in records:
        record.target = target if target is not None else record.target
        # a version evaluated again (simulate's final point, stamped with the run's end) counts from when it was first seen
        first_seen: dict[int, tuple[float, int, float]] = {}
        for point in record.accuracy:
            first_seen.setdefault(point[1], point)
        record.accuracy = sorted(first_seen.values())
    return records


def _load(path: Path, target: float | None) -> list[RunRecord]:
    if (path / "tributary.db").is_file():
        return _load_state_dir(path, target)
    results = path / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
        except (OSError, ValueError) as error:
            raise ReportError(f"{results} cannot be read as JSON: {error}") from error
        try:
            if isinstance(data, dict) and "summary" in data:
                return [_load_simulate(path, data)]
            if isinstance(data, dict) and "history" in data and "strategy" in data:
                return [_load_demo(path, data)]
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # a field missing or of the wrong shape
            raise ReportError(f"{results} is malformed: {type(error).__name__}: {error}") from error
        raise ReportError(f"{results} is neither a `tributary simulate` nor a `tributary demo` result")
    raise ReportError(
        f"{path} holds neither tributary.db (a server state directory) nor results.json (a `tributary simulate` or `demo` run)"
    )


def _load_state_dir(path: Path, target: float | None) -> list[RunRecord]:
    database = path / "tributary.db"
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise ReportError(f"{database} cannot be opened: {error}") from error
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "jobs", "versions", "update_log"} <= tables:
            raise ReportError(f"{database} is not a tributary state database (tables: {', '.join(sorted(tables)) or 'none'})")
        schema = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        jobs = db.execute("SELECT job_id, settings, created_at, pruned_updates FROM jobs ORDER BY job_id").fetchall()
        if not jobs:
            raise ReportError(f"{database} holds no jobs yet")
        return [_state_job(db, tables, str(schema[0]) if schema else "?", *job, target=target) for job in jobs]
    except sqlite3.Error as error:
        raise ReportError(f"{database} cannot be read: {error}") from error
    finally:
        db.close()


def _state_job(
    db: sqlite3.Connection, tables: set[str], schema: str, job_id: str, settings: str, created_at: float, pruned: int, *, target: float | None
) -> RunRecord:
    strategy = json.loads(settings).get("strategy", {}).get("name", "?")
    secure = bool(json.loads(settings).get("secure_aggregation"))
    record = RunRecord(job_id, "server state directory", time_label="seconds since the job was created", target=target)
    versions = db.execute("SELECT version, published_at, energy_joules FROM versions WHERE job_id = ? ORDER BY version", (job_id,)).fetchall()
    published = {int(v): float(t) for v, t, _ in versions}
    record.final_version = max(published, default=0)
    record.energy_j = float(sum(e for _, _, e in versions))
    if "evaluations" in tables:
        rows = db.execute("SELECT version, evaluated_at, metrics FROM evaluations WHERE job_id = ? ORDER BY version", (job_id,)).fetchall()
        for version, evaluated_at, metrics in rows:
            values = json.loads(metrics)
            seconds = published.get(int(version), float(evaluated_at)) - created_at
            for name, series in (("accuracy", record.accuracy), ("federated_accuracy", record.federated_accuracy)):
                if isinstance(values.get(name), (int, float)):
                    series.append((seconds, int(version), float(values[name])))
        if not rows:
            record.missing.append(
                "accuracy: no evaluations (start the server with an evaluator: --evaluator module:function, "
                "or have clients report theirs: federated evaluation)"
            )
        elif not record.accuracy and not record.federated_accuracy:
            record.missing.append("accuracy: the evaluator's metrics have no \"accuracy\"")
    else:
        record.missing.append(f"accuracy: this state directory (schema {schema}) predates server-side evaluation")
    updates = db.execute(
        "SELECT client_id, staleness, COUNT(*) FROM update_log WHERE job_id = ? AND kind = 'update' GROUP BY client_id, staleness", (job_id,)
    ).fetchall()
    (contributors,) = db.execute("SELECT COALESCE(SUM(contributors), 0) FROM update_log WHERE job_id = ?", (job_id,)).fetchone()
    record.accepted = int(pruned) + int(contributors)
    if updates:
        record.staleness, record.updates_per_client = Counter(), Counter()
        for client, staleness, count in updates:
            record.staleness[int(staleness)] += count
            record.updates_per_client[str(client)] += count
    if secure:
        record.missing.append("staleness and updates per client: secure aggregation hides individual updates from the server")
    if pruned:
        record.missing.append(f"{pruned} older updates were pruned from the log (keep_log_entries): staleness, clients and bytes cover the rest")
    columns = {row[1] for row in db.execute("PRAGMA table_info(update_log)")}
    if "wire_bytes" in columns:
        per_version = db.execute(
            # an update goes into the version after the one current at its arrival (a buffer or round applies then)
            "SELECT version_at_arrival + 1 AS into_version, SUM(wire_bytes), COUNT(*) - COUNT(wire_bytes) FROM update_log "
            "WHERE job_id = ? AND kind = 'update' GROUP BY into_version ORDER BY into_version",
            (job_id,),
        ).fetchall()
        record.bytes_over = [(int(v), int(b)) for v, b, _ in per_version if b is not None]
        unknown = sum(int(n) for _, _, n in per_version)
        if unknown:
            record.missing.append(f"bytes: {unknown} updates were logged before bytes were recorded (before schema 3)")
    else:
        record.missing.append(f"bytes: this state directory (schema {schema}) predates bytes per update")
    record.bytes_label = "version (the updates that went into it)"
    record.missing.append("rejected updates: not kept in the state directory (the server's metrics and logs count them)")
    record.facts = [
        ("source", "server state directory"),
        ("job", job_id),
        ("strategy", strategy + (" + secure aggregation" if secure else "")),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created_at))),
        ("last version published", _age(max(published.values(), default=created_at) - created_at)),
    ]
    return record


def _load_simulate(path: Path, data: dict[str, Any]) -> RunRecord:
    summary = data["summary"]
    record = RunRecord(str(summary.get("name", path.name)), "tributary simulate run", time_label="emulated seconds")
    record.accuracy = [(float(p["emulated_s"]), int(p["version"]), float(p["accuracy"])) for p in data.get("history", [])]
    record.target = summary.get("target_accuracy")
    record.final_version = summary.get("final_version")
    record.accepted = summary.get("updates_accepted")
    server = summary.get("server") or {}
    rejected = dict(server.get("rejected") or {})
    refused = summary.get("updates_refused")
    record.rejected = rejected if rejected or not refused else {"refused (as the devices saw it)": int(refused)}
    record.energy_j = summary.get("energy_reported_j")
    devices_file = path / "devices.json"
    try:
        devices = json.loads(devices_file.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"{devices_file} cannot be read: {error}") from error
    record.staleness = Counter(int(s) for d in devices for s in d.get("staleness", []))
    record.updates_per_client = Counter({str(d.get("client_id") or f"device-{d['index']}"): int(d["updates_accepted"]) for d in devices})
    if any("uploads" in d for d in devices):
        uploads = sorted((float(t), int(b)) for d in devices for t, b in d.get("uploads", []))
        total = 0
        record.bytes_over = []
        for t, b in uploads:
            total += b
            record.bytes_over.append((t, total))
        record.bytes_label = "emulated seconds (cumulative bytes of accepted pushes)"
        if summary.get("secure_aggregation"):
            record.missing.append("bytes: masked uploads of secure cohorts are not recorded")
    else:
        record.missing.append("bytes: this run predates bytes per upload in devices.json")
    record.facts = [
        ("source", "tributary simulate run"),
        ("experiment", str(summary.get("name"))),
        ("strategy", str(summary.get("strategy")) + (" + secure aggregation" if summary.get("secure_aggregation") else "")),
        ("devices", str(summary.get("devices"))),
        ("seed", str(summary.get("seed"))),
        ("backend", str(summary.get("backend"))),
        ("emulated duration", f"{summary.get('emulated_duration_s')} s ({summary.get('real_seconds')} real s)"),
        ("energy spent by the devices", f"{summary.get('energy_j')} J"),
    ]
    return record


def _load_demo(path: Path, data: dict[str, Any]) -> RunRecord:
    record = RunRecord(path.name, "tributary demo run", time_label="wall-clock seconds")
    history = data.get("history", [])
    record.accuracy = [(float(p["seconds"]), int(p["version"]), float(p["accuracy"])) for p in history]
    record.target = data.get("target_accuracy")
    record.final_version = data.get("final_version")
    record.accepted = data.get("updates_accepted")
    record.rejected = dict(data.get("updates_rejected") or {})
    record.energy_j = data.get("energy_joules_total")
    if record.energy_j is None:
        record.missing.append("energy: this demo run predates energy in results.json")
    if data.get("secure_aggregation"):
        record.missing.append("staleness and updates per client: secure aggregation hides individual updates from the server")
    else:
        record.staleness = Counter({int(k): int(v) for k, v in (data.get("staleness_histogram") or {}).items()})
        record.updates_per_client = Counter({str(k): int(v) for k, v in (data.get("updates_per_client") or {}).items()})
    update_bytes = data.get("update_bytes")
    if update_bytes and history and all("updates_accepted" in p for p in history):
        record.bytes_over = [(float(p["seconds"]), int(p["updates_accepted"]) * int(update_bytes)) for p in history]
        record.bytes_label = f"wall-clock seconds (cumulative: accepted updates x {update_bytes} bytes, uncompressed)"
    else:
        record.missing.append("bytes: not recorded by this demo run (secure aggregation, or a run from before)")
    record.facts = [
        ("source", "tributary demo run"),
        ("strategy", str(data.get("strategy")) + (" + secure aggregation" if data.get("secure_aggregation") else "")),
        ("clients", str(data.get("clients"))),
        ("transport", str(data.get("transport"))),
        ("wall time", f"{data.get('wall_seconds')} s"),
    ]
    return record


def _age(seconds: float) -> str:
    return f"{seconds:.1f} s after the job was created"


# -- plotting ------------------------------------------------------------------------


def plot(record: RunRecord, out_dir: Path) -> None:
    """Write the record's PNGs into out_dir; fills record.plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(kind: str, figure: Any) -> None:
        name = f"{record.slug}-{kind}.png"
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        record.plots[kind] = name

    if record.accuracy or record.federated_accuracy:
        both = bool(record.accuracy) and bool(record.federated_accuracy)
        for kind, index, xlabel in (("accuracy_time", 0, record.time_label), ("accuracy_version", 1, "model version")):
            figure, axes = plt.subplots(figsize=(6, 3.5))
            if record.accuracy:
                axes.plot([p[index] for p in record.accuracy], [p[2] for p in record.accuracy], marker=".", linewidth=1,
                          label="server evaluator (held-out set)" if record.federated_accuracy else None)  # fmt: skip
            if record.federated_accuracy:
                axes.plot([p[index] for p in record.federated_accuracy], [p[2] for p in record.federated_accuracy], marker=".",
                          linewidth=1, linestyle="--", label="federated (clients' own held-out data)")  # fmt: skip
            if record.target is not None:
                axes.axhline(record.target, color="grey", linestyle="--", linewidth=1, label=f"target {record.target:.0%}")
            if record.target is not None or both or record.federated_accuracy:
                axes.legend(loc="lower right")
            axes.set_xlabel(xlabel)
            axes.set_ylabel("test accuracy")
            axes.set_title(f"{record.name}: accuracy vs {'time' if index == 0 else 'version'}")
            save(kind, figure)
    if record.staleness:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        taus = sorted(record.staleness)
        axes.bar(taus, [record.staleness[t] for t in taus])
        axes.set_xlabel("staleness tau (versions behind at arrival)")
        axes.set_ylabel("accepted updates")
        axes.set_title(f"{record.name}: staleness")
        save("staleness", figure)
    if record.updates_per_client:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        counts = sorted(record.updates_per_client.values(), reverse=True)
        axes.bar(range(len(counts)), counts)
        axes.set_xlabel(f"clients, most updates first ({len(counts)})")
        axes.set_ylabel("accepted updates")
        axes.set_title(f"{record.name}: updates per client")
        save("updates_per_client", figure)
    if record.bytes_over:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        xs, ys = [x for x, _ in record.bytes_over], [b / 1e6 for _, b in record.bytes_over]
        if record.bytes_label.startswith("version"):
            axes.bar(xs, ys)
            axes.set_ylabel("MB uploaded into the version")
        else:
            axes.step([0.0, *xs], [0.0, *ys], where="post", linewidth=1)
            axes.set_ylim(bottom=0)
            axes.set_ylabel("MB uploaded (cumulative)")
        axes.set_xlabel(textwrap.fill(record.bytes_label, 64))  # the long labels wrap rather than run off the figure
        axes.set_title(f"{record.name}: bytes on the wire")
        save("bytes", figure)


# -- the summary -----------------------------------------------------------------------


def summary_rows(record: RunRecord) -> list[tuple[str, str]]:
    rows = list(record.facts)
    if record.accuracy:
        final = record.accuracy[-1]
        best = max(record.accuracy, key=lambda p: p[2])
        rows.append(("final accuracy", f"{final[2]:.2%} (version {final[1]})"))
        rows.append(("best accuracy", f"{best[2]:.2%} (version {best[1]})"))
    if record.federated_accuracy:
        final = record.federated_accuracy[-1]
        rows.append(("final federated accuracy", f"{final[2]:.2%} (version {final[1]}, reported by the clients)"))
    if record.target is not None:
        hit = record.time_to(record.target)
        rows.append((
            f"time to {record.target:.0%}",
            "not reached" if hit is None else f"{hit[0]:.1f} {record.time_label} (version {hit[1]})",
        ))  # fmt: skip
    if record.final_version is not None:
        rows.append(("model versions", str(record.final_version)))
    if record.accepted is not None:
        rows.append(("updates accepted", str(record.accepted)))
    if record.rejected is not None:
        rows.append(("updates rejected", ", ".join(f"{k}: {v}" for k, v in sorted(record.rejected.items())) or "0"))
    if record.staleness:
        total = sum(record.staleness.values())
        mean = sum(t * n for t, n in record.staleness.items()) / total
        rows.append(("staleness", f"mean {mean:.2f}, max {max(record.staleness)} over {total} updates"))
    if record.updates_per_client:
        rows.append(("clients that pushed", str(sum(1 for n in record.updates_per_client.values() if n > 0))))
    if record.bytes_over:
        total_bytes = sum(b for _, b in record.bytes_over) if record.bytes_label.startswith("version") else record.bytes_over[-1][1]
        rows.append(("bytes uploaded", f"{total_bytes / 1e6:.2f} MB"))
    if record.energy_j is not None:
        rows.append(("energy reported", f"{record.energy_j:.1f} J"))
    return rows


_PLOT_TITLES = {
    "accuracy_time": "Accuracy vs time",
    "accuracy_version": "Accuracy vs version",
    "staleness": "Staleness",
    "updates_per_client": "Updates per client",
    "bytes": "Bytes",
}


def markdown(records: list[RunRecord], run: Path) -> str:
    lines = [f"# Tributary run report: {run}", ""]
    for record in records:
        lines += [f"## {record.name} ({record.source})", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in summary_rows(record)]
        lines.append("")
        if record.missing:
            lines += ["Not recorded:", ""] + [f"- {note}" for note in record.missing] + [""]
        for kind, name in record.plots.items():
            lines += [f"### {_PLOT_TITLES[kind]}", "", f"![{_PLOT_TITLES[kind]}]({name})", ""]
    return "\n".join(lines)


def html_page(records: list[RunRecord], run: Path) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Tributary run report: {e(str(run))}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>Tributary run report: {e(str(run))}</h1>",
    ]
    for record in records:
        parts.append(f"<h2>{e(record.name)} ({e(record.source)})</h2><table>")
        parts += [f"<tr><td>{e(key)}</td><td>{e(value)}</td></tr>" for key, value in summary_rows(record)]
        parts.append("</table>")
        if record.missing:
            parts.append("<p>Not recorded:</p><ul>" + "".join(f"<li>{e(note)}</li>" for note in record.missing) + "</ul>")
        for kind, name in record.plots.items():
            parts.append(f'<h3>{_PLOT_TITLES[kind]}</h3><img src="{e(name)}" alt="{_PLOT_TITLES[kind]}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run: Path, out_dir: Path | None = None, fmt: str = "both", *, target: float | None = None) -> list[Path]:
    """Read `run`, write PNGs and index.md / index.html into out_dir (default:
    <run>/report); returns the summaries written."""
    if fmt not in FORMATS:
        raise ReportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    records = load_run(run, target=target)
    out = Path(out_dir) if out_dir is not None else Path(run) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"cannot create the report folder {out}: {error.strerror}") from error
    for record in records:
        plot(record, out)
    written = []
    if fmt in ("md", "both"):
        written.append(out / "index.md")
        written[-1].write_text(markdown(records, Path(run)))
    if fmt in ("html", "both"):
        written.append(out / "index.html")
        written[-1].write_text(html_page(records, Path(run)))
    return written
