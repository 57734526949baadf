"""server.dashboard: the update rate, read from the job's per-second acceptance
log, and the downsampled version and evaluation series."""

from __future__ import annotations

import time

import numpy as np
import pytest

from proto.tensors import specs_of
from server.config import JobConfig, StrategyConfig
from server.core import VERSION_LOG_LENGTH, Job, JobStats, Update, UpdateHeader
from server.dashboard import MAX_POINTS, MAX_SHOWN_POINTS, RATE_BUCKET_S, RATE_SERIES_S, downsample_by_version, job_snapshot


def make_job() -> Job:
    return Job(JobConfig(job_id="j", strategy=StrategyConfig(name="fedbuff", buffer_size=2), max_staleness=None), {"w": np.zeros(3, np.float32)})


def test_acceptances_are_kept_one_entry_per_second() -> None:
    stats = JobStats()
    stats.note_accepted(1, now=100.2)
    stats.note_accepted(1, now=100.9)
    stats.note_accepted(3, now=101.0)  # a cohort of three
    stats.note_accepted(1, now=104.5)
    assert list(stats.recent_accepts) == [(100.0, 2), (101.0, 3), (104.0, 1)]


def test_pushes_accepted_by_the_job_are_counted_in_the_current_second() -> None:
    job = make_job()
    delta = {"w": np.ones(3, np.float32)}
    first_second = int(time.time())
    for index in range(5):
        job.submit(Update(UpdateHeader("j", "c", f"key-{index}", base_version=0, num_samples=1, specs=tuple(specs_of(delta))), delta))
    accepts = job.read_stats(lambda stats: list(stats.recent_accepts))
    assert sum(count for _, count in accepts) == 5
    # one bucket per wall-clock second the pushes spanned, however long they took
    assert len(accepts) <= int(time.time()) - first_second + 1
    assert all(second == int(second) for second, _ in accepts)


def test_rates_cover_the_whole_window_when_more_updates_than_the_log_length_arrived() -> None:
    # 100 updates/s for 300 s: 30,000 acceptances, three times what a log of one
    # entry per update (VERSION_LOG_LENGTH) would hold; every window must read 100/s
    job = make_job()
    rate, seconds, now = 100, RATE_SERIES_S, 1_000_000.0
    assert rate * seconds > VERSION_LOG_LENGTH
    for tick in range(rate * seconds):
        job.stats.note_accepted(1, now=now - seconds + tick / rate)
    update_rate = job_snapshot(job, now=now)["update_rate"]
    assert update_rate["per_second"] == {"10": pytest.approx(rate), "60": pytest.approx(rate), "300": pytest.approx(rate)}
    assert len(update_rate["series"]) == RATE_SERIES_S // RATE_BUCKET_S
    assert [per_second for _, per_second in update_rate["series"]] == [pytest.approx(rate)] * (RATE_SERIES_S // RATE_BUCKET_S)


def test_a_second_straddling_a_window_start_counts_for_its_part_inside() -> None:
    job = make_job()
    job.stats.note_accepted(10, now=1000.3)  # the bucket [1000, 1001)
    assert job_snapshot(job, now=1009.5)["update_rate"]["per_second"]["10"] == pytest.approx(10 / 10)
    assert job_snapshot(job, now=1010.25)["update_rate"]["per_second"]["10"] == pytest.approx(10 * 0.75 / 10)
    assert job_snapshot(job, now=1011.0)["update_rate"]["per_second"]["10"] == 0
    assert job_snapshot(job, now=1011.0)["update_rate"]["per_second"]["60"] == pytest.approx(10 / 60)


def test_a_short_series_is_sent_whole() -> None:
    points = [(v, float(v)) for v in range(MAX_SHOWN_POINTS)]
    assert downsample_by_version(points, lambda p: p[0]) == points


@pytest.mark.parametrize(("first", "count", "step"), [(0, 501, 1), (0, 2000, 1), (7_999, 2000, 1), (3, 2000, 10), (0, 1200, 3)])
def test_a_long_series_keeps_first_newest_and_evenly_spread_points(first: int, count: int, step: int) -> None:
    points = [(first + i * step, 1000.0 + i) for i in range(count)]
    kept = downsample_by_version(points, lambda p: p[0])
    assert MAX_SHOWN_POINTS // 2 < len(kept) <= MAX_SHOWN_POINTS  # k is a whole number of versions
    assert kept[0] == points[0] and kept[-1] == points[-1]
    assert all(a[0] < b[0] for a, b in zip(kept, kept[1:])), "in order, no repeats"
    gaps = [b[0] - a[0] for a, b in zip(kept[1:], kept[2:-1])]
    assert max(gaps) <= 2 * min(gaps), "evenly spread between the ends"


def test_the_points_kept_stay_the_same_while_the_window_slides() -> None:
    # the newest MAX_POINTS of a growing history, one poll after another: a
    # point shown once stays shown while it is in the window (no flicker)
    history = [(v, float(v)) for v in range(10_000)]
    before = downsample_by_version(history[5000 : 5000 + MAX_POINTS], lambda p: p[0])
    after = downsample_by_version(history[5003 : 5003 + MAX_POINTS], lambda p: p[0])
    overlap = set(before[1:-1]) & {p for p in history[5003 : 5002 + MAX_POINTS]}
    assert overlap <= set(after)


def test_the_snapshot_sends_at_most_max_shown_points_of_versions_and_evaluations() -> None:
    job = make_job()

    def fill(stats: JobStats) -> None:
        stats.versions.clear()
        stats.versions.extend((v, 1000.0 + v) for v in range(3000))
        stats.evaluations.extend((v, 1000.0 + v, {"accuracy": v / 3000}) for v in range(0, 3000, 2))

    job.read_stats(fill)
    snapshot = job_snapshot(job, now=5000.0)
    versions, evaluations = snapshot["versions"], snapshot["evaluations"]
    assert len(versions) <= MAX_SHOWN_POINTS and len(evaluations) <= MAX_SHOWN_POINTS
    assert versions[0] == [3000 - MAX_POINTS, 1000.0 + 3000 - MAX_POINTS] and versions[-1] == [2999, 3999.0]
    assert evaluations[0]["version"] == 0 and evaluations[-1] == {"version": 2998, "time": 3998.0, "metrics": {"accuracy": 2998 / 3000}}
