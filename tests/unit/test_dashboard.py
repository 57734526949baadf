"""server.dashboard's update rate, read from the job's per-second acceptance log."""

from __future__ import annotations

import numpy as np
import pytest

from proto.tensors import specs_of
from server.config import JobConfig, StrategyConfig
from server.core import VERSION_LOG_LENGTH, Job, JobStats, Update, UpdateHeader
from server.dashboard import RATE_BUCKET_S, RATE_SERIES_S, job_snapshot


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
    for index in range(5):
        job.submit(Update(UpdateHeader("j", "c", f"key-{index}", base_version=0, num_samples=1, specs=tuple(specs_of(delta))), delta))
    accepts = job.read_stats(lambda stats: list(stats.recent_accepts))
    assert sum(count for _, count in accepts) == 5
    assert len(accepts) <= 2  # five quick pushes fall in one second, or two at a second's edge
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
