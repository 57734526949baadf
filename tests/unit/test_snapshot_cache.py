"""server.http.SnapshotCache: encoded snapshots shared for a short while,
built by one request at a time (a fake clock: no timing asserted)."""

from __future__ import annotations

import threading
import time

import pytest

from server.http import SnapshotCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Builds:
    """A build function that counts its calls and returns b"build N"."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> bytes:
        self.count += 1
        return f"build {self.count}".encode()


def test_requests_within_the_age_share_one_build_and_a_stale_entry_is_rebuilt() -> None:
    clock, build = FakeClock(), Builds()
    cache = SnapshotCache(1.0, clock=clock)
    assert cache.get("job", build) == b"build 1"
    clock.now += 0.99
    assert cache.get("job", build) == b"build 1"
    clock.now += 0.01  # exactly max_age_s after the build: stale
    assert cache.get("job", build) == b"build 2"
    assert cache.get("job", build) == b"build 2" and build.count == 2


def test_keys_are_cached_apart() -> None:
    clock = FakeClock()
    cache = SnapshotCache(1.0, clock=clock)
    assert cache.get(("job", "a"), lambda: b"a") == b"a"
    assert cache.get(("job", "b"), lambda: b"b") == b"b"
    assert cache.get(("job", "a"), lambda: b"not asked") == b"a"
    assert len(cache) == 2


def test_age_zero_builds_every_time() -> None:
    build = Builds()
    cache = SnapshotCache(0.0, clock=FakeClock())
    assert [cache.get("job", build) for _ in range(3)] == [b"build 1", b"build 2", b"build 3"]
    assert len(cache) == 0


def test_a_failed_build_is_not_cached_and_leaves_no_entry_behind() -> None:
    clock, build = FakeClock(), Builds()
    cache = SnapshotCache(1.0, clock=clock)

    def unknown_job() -> bytes:
        raise LookupError("no job 'x'")

    for _ in range(3):
        with pytest.raises(LookupError, match="no job 'x'"):
            cache.get(("job", "x"), unknown_job)
    assert len(cache) == 0, "unknown job ids must not pile up entries"
    # a failure while an older body is cached keeps neither the failure nor a fresher time
    assert cache.get("job", build) == b"build 1"
    clock.now += 5
    with pytest.raises(LookupError):
        cache.get("job", unknown_job)
    assert cache.get("job", build) == b"build 2"


@pytest.mark.parametrize("age", [-1.0, float("nan"), float("inf")])
def test_a_bad_age_is_refused(age: float) -> None:
    with pytest.raises(ValueError, match="snapshot_max_age_s must be a finite number >= 0"):
        SnapshotCache(age)


def test_concurrent_requests_for_a_stale_entry_wait_for_one_build() -> None:
    cache = SnapshotCache(1.0, clock=FakeClock())
    building, release = threading.Event(), threading.Event()
    builds: list[int] = []

    def slow_build() -> bytes:
        builds.append(1)
        building.set()
        assert release.wait(60)
        return b"shared"

    results: list[bytes] = []
    first = threading.Thread(target=lambda: results.append(cache.get("job", slow_build)))
    first.start()
    assert building.wait(60)
    others = [threading.Thread(target=lambda: results.append(cache.get("job", slow_build))) for _ in range(8)]
    for thread in others:
        thread.start()
    time.sleep(0.2)  # let the others reach the entry's lock (fewer would only weaken the test)
    release.set()
    for thread in [first, *others]:
        thread.join(60)
    assert results == [b"shared"] * 9
    assert len(builds) == 1


def test_after_a_failed_build_the_waiters_build_one_at_a_time() -> None:
    cache = SnapshotCache(1.0, clock=FakeClock())
    building, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def failing_build() -> bytes:
        calls.append("failed")
        building.set()
        assert release.wait(60)
        raise RuntimeError("broke")

    def good_build() -> bytes:
        calls.append("built")
        return b"ok"

    errors: list[BaseException] = []

    def failing_request() -> None:
        try:
            cache.get("job", failing_build)
        except RuntimeError as error:
            errors.append(error)

    first = threading.Thread(target=failing_request)
    first.start()
    assert building.wait(60)
    results: list[bytes] = []
    others = [threading.Thread(target=lambda: results.append(cache.get("job", good_build))) for _ in range(4)]
    for thread in others:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in [first, *others]:
        thread.join(60)
    assert len(errors) == 1 and results == [b"ok"] * 4
    assert calls.count("failed") == 1 and 1 <= calls.count("built") <= 2
