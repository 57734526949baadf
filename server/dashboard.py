"""The dashboard's JSON snapshots, built from the core. No HTTP here
(server/http.py serves them; server/static/ draws them).

Everything is read under the locks that guard it (`Job.read_stats` for the
job's counters, the roster's and the slots' own locks, each cohort's lock),
one at a time, so a snapshot never holds two locks and never blocks a push
for longer than a copy of a few bounded deques takes.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from server.cohorts import CohortManager
from server.core import AggregationCore, Job, JobStats
from server.roster import ClientPresence

MAX_POINTS = 2000
"""Newest points of each time series a snapshot covers (versions, evaluations)..."""
MAX_SHOWN_POINTS = 500
"""...and at most how many of them it sends (downsample_by_version): a chart a
few hundred pixels wide shows no more, and the body stays small to encode."""
MAX_ROSTER_ROWS = 500
"""Clients listed, most recently heard from first; the state counts cover all of them."""
MAX_REJECTIONS = 50
RATE_WINDOWS_S = (10, 60, 300)
"""Windows the update rate is averaged over."""
RATE_BUCKET_S = 5
RATE_SERIES_S = 300
"""The update-rate chart: accepted updates per second in RATE_BUCKET_S buckets over the last RATE_SERIES_S."""
DROPPED_AFTER_HEARTBEATS = 2
"""A client is shown as dropped once it missed this many heartbeat intervals."""

JSON = dict[str, Any]
Point = TypeVar("Point")


def downsample_by_version(points: Sequence[Point], version: Callable[[Point], int], max_points: int = MAX_SHOWN_POINTS) -> list[Point]:
    """At most `max_points` of `points` (in version order): the first, and the
    newest of each run of `k` versions (k as small as fits), so the newest
    point is always kept. Runs are counted from version 0, not from the
    window's start, so the points picked stay the same from one snapshot to
    the next while the window slides and a chart does not flicker."""
    if len(points) <= max_points:
        return list(points)
    assert max_points >= 3
    span = version(points[-1]) - version(points[0])
    # runs met: at most span // k + 2; plus the first point
    k = max(1, math.ceil(span / (max_points - 3)))
    kept = [points[0]]
    for index, point in enumerate(points[1:], start=1):
        if index == len(points) - 1 or version(points[index + 1]) // k != version(point) // k:
            kept.append(point)
    return kept


@dataclass(frozen=True)
class _StatsCopy:
    versions: list[tuple[int, float]]
    evaluations: list[tuple[int, float, dict[str, float]]]
    staleness: dict[int, int]
    accepts: list[tuple[float, int]]
    rejections: list[tuple[float, str, str]]
    rejected: dict[str, int]
    updates_accepted: int
    duplicates: int
    cohorts_applied: int
    cohorts_aborted: dict[str, int]


def _copy(stats: JobStats) -> _StatsCopy:
    return _StatsCopy(
        versions=list(itertools.islice(reversed(stats.versions), MAX_POINTS))[::-1],
        evaluations=list(itertools.islice(reversed(stats.evaluations), MAX_POINTS))[::-1],
        staleness=dict(stats.staleness),
        # one entry per second that had acceptances: the newest RATE_SERIES_S + 1 cover the chart
        accepts=list(itertools.islice(reversed(stats.recent_accepts), RATE_SERIES_S + 1))[::-1],
        rejections=list(stats.recent_rejections)[-MAX_REJECTIONS:],
        rejected=dict(stats.rejected),
        updates_accepted=stats.updates_accepted,
        duplicates=stats.duplicates,
        cohorts_applied=stats.cohorts_applied,
        cohorts_aborted=dict(stats.cohorts_aborted),
    )


def overview(core: AggregationCore, *, now: float | None = None) -> JSON:
    """The jobs a server runs, with their current versions (the job selector)."""
    return {
        "server_time": time.time() if now is None else now,
        "jobs": [
            {"job_id": job.job_id, "version": job.snapshot().version, "strategy": job.config.strategy.name}
            for job in sorted(core.jobs.values(), key=lambda j: j.job_id)
        ],
    }


def job_snapshot(job: Job, cohorts: CohortManager | None = None, *, now: float | None = None) -> JSON:
    """Everything the dashboard shows about one job, as JSON-ready values.
    Times are unix seconds; `now` defaults to the current time."""
    now = time.time() if now is None else now
    stats = job.read_stats(_copy)
    snapshot = job.snapshot()
    holders = job.slots.holders() if job.slots is not None else {}  # read once: the roster and the slot count agree
    return {
        "job_id": job.job_id,
        "server_time": now,
        "strategy": job.config.strategy.name,
        "synchronous": job.synchronous,
        "secure_aggregation": job.config.secure_aggregation is not None,
        "version": snapshot.version,
        "version_published": snapshot.created_at,
        "versions": [[v, published] for v, published in downsample_by_version(stats.versions, lambda point: point[0])],
        "evaluations": [
            {"version": v, "time": t, "metrics": dict(m)} for v, t, m in downsample_by_version(stats.evaluations, lambda point: point[0])
        ],
        "staleness": [[staleness, count] for staleness, count in sorted(stats.staleness.items())],
        "update_rate": _update_rate(stats.accepts, now),
        "counters": {
            "updates_accepted": stats.updates_accepted,
            "duplicates": stats.duplicates,
            "pending_updates": job.pending_updates,
            "rejected": sum(stats.rejected.values()),
            "cohorts_applied": stats.cohorts_applied,
            "cohorts_aborted": sum(stats.cohorts_aborted.values()),
            "energy_joules": job.energy_joules_total,
        },
        "rejections": {
            "by_reason": dict(sorted(stats.rejected.items(), key=lambda item: -item[1])),
            "recent": [{"time": t, "client_id": client, "reason": reason} for t, client, reason in reversed(stats.rejections)],
        },
        "roster": _roster(job, holders),
        "slots": _slots(job, holders),
        "cohorts": _cohorts(cohorts, stats.cohorts_aborted),
    }


def _update_rate(accepts: list[tuple[float, int]], now: float) -> JSON:
    """Rates from one-second buckets (JobStats.recent_accepts): a bucket that
    straddles a window's start counts for the part of its second inside it."""
    windows = {}
    for window in RATE_WINDOWS_S:
        start = now - window
        count = sum(n * min(1.0, second + 1 - start) for second, n in accepts if second + 1 > start and second <= now)
        windows[str(window)] = count / window
    buckets = RATE_SERIES_S // RATE_BUCKET_S
    counts = [0] * buckets
    start = now - RATE_SERIES_S
    for second, n in accepts:
        middle = min(second + 0.5, now)  # a second falls in the chart's bucket that holds most of it
        if start < middle <= now:
            counts[min(buckets - 1, int((middle - start) // RATE_BUCKET_S))] += n
    series = [[start + (i + 1) * RATE_BUCKET_S, count / RATE_BUCKET_S] for i, count in enumerate(counts)]
    return {"per_second": windows, "series": series, "bucket_s": RATE_BUCKET_S}


def _client_row(client: ClientPresence, now: float, lapse_s: float, slots: Mapping[str, int], updates: Mapping[str, int]) -> JSON:
    silent = max(0.0, now - client.last_seen)
    device = client.device
    return {
        "client_id": client.client_id,
        "state": "dropped" if silent > lapse_s else client.state.value,
        "reported_state": client.state.value,
        "base_version": client.base_version,
        "last_seen_s": silent,
        "heartbeats": client.heartbeats,
        "slot_version": slots.get(client.client_id),
        "updates_accepted": updates.get(client.client_id, 0),
        "device": None
        if device is None
        else {
            "profile": device.profile,
            "battery_level": device.battery_level,
            "charging": device.charging,
            "idle": device.idle,
            "unmetered": device.unmetered,
        },
    }


def _roster(job: Job, slots: Mapping[str, int]) -> JSON:
    roster = job.roster
    now = roster.clock()
    clients = roster.clients()  # least recently heard from first
    lapse_s = DROPPED_AFTER_HEARTBEATS * job.config.heartbeat_interval_s
    updates = job.read_stats(lambda stats: {c.client_id: stats.updates_per_client.get(c.client_id, 0) for c in clients[-MAX_ROSTER_ROWS:]})
    rows = [_client_row(client, now, lapse_s, slots, updates) for client in reversed(clients[-MAX_ROSTER_ROWS:])]
    counts = {"idle": 0, "training": 0, "uploading": 0, "dropped": 0}
    for client in clients:
        counts["dropped" if now - client.last_seen > lapse_s else client.state.value] += 1
    return {"total": len(clients), "by_state": counts, "clients": rows, "dropped_after_s": lapse_s}


def _slots(job: Job, holders: Mapping[str, int]) -> JSON | None:
    if job.slots is None:
        return None
    return {
        "max_concurrent_trainers": job.slots.policy.max_concurrent_trainers,
        "active": len(holders),
        "round_size": job.slots.policy.round_size,
    }


def _cohorts(manager: CohortManager | None, aborted: Mapping[str, int]) -> JSON | None:
    if manager is None:
        return None
    progress = manager.progress()
    return {
        "waiting": progress.waiting,
        "cohort_size": progress.cohort_size,
        "aborted_by_reason": dict(aborted),
        "live": [
            {
                "cohort_id": c.cohort_id,
                "phase": c.phase,
                "members": c.members,
                "expected": c.expected,
                "answered": c.answered,
                "uploaded": c.uploaded,
                "needed": c.needed,
                "deadline": c.deadline_unix,
                "applied_version": c.applied_version,
                "abort_reason": c.abort_reason,
            }
            for c in progress.cohorts
        ],
    }
