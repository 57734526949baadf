"""The limits' logic on a fake clock: token buckets, stream slots, stream
deadlines and the watchdog that cancels silent streams."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest

from server import ServerConfig
from server.errors import LimitExceeded, RetryLater, StreamDeadlineExceeded
from server.limits import ClientRateLimit, ServerLimits, StreamClock, StreamSlots, StreamWatchdog, TokenBuckets


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- token buckets -----------------------------------------------------------------


def test_a_burst_then_refusals_until_the_bucket_refills(clock: FakeClock) -> None:
    buckets = TokenBuckets(1.0, 2, clock=clock)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("a") == pytest.approx(1.0)  # a refusal takes nothing
    clock.advance(0.25)
    assert buckets.take("a") == pytest.approx(0.75)
    clock.advance(0.75)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(1.0)


def test_the_bucket_never_holds_more_than_the_burst(clock: FakeClock) -> None:
    buckets = TokenBuckets(10.0, 3, clock=clock)
    buckets.take("a")
    clock.advance(3600)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.1)


def test_clients_have_separate_buckets(clock: FakeClock) -> None:
    buckets = TokenBuckets(1.0, 1, clock=clock)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0.0


def test_refilled_buckets_are_dropped(clock: FakeClock) -> None:
    buckets = TokenBuckets(1.0, 2, clock=clock)
    for client in ("a", "b", "c"):
        buckets.take(client)
    assert len(buckets) == 3
    clock.advance(1.0)  # each had 1 token left; now full again, the same as never seen
    buckets.take("d")
    assert len(buckets) == 1


def test_busy_buckets_are_kept_until_the_cap(clock: FakeClock) -> None:
    buckets = TokenBuckets(0.001, 1, max_keys=3, clock=clock)
    for client in ("a", "b", "c", "d", "e"):
        assert buckets.take(client) == 0.0
    assert len(buckets) == 3  # "a" and "b", least recently used, made room
    assert buckets.take("e") > 0  # the recent ones are still limited
    assert buckets.take("a") == 0.0  # an evicted one starts afresh: generous, never stricter


def test_a_busy_client_is_never_evicted_by_its_own_calls(clock: FakeClock) -> None:
    buckets = TokenBuckets(1.0, 1, max_keys=1, clock=clock)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bucket_parameters_are_checked(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBuckets(rate, burst)


def test_a_rate_limited_client_is_told_the_limit_and_when_to_retry(clock: FakeClock) -> None:
    limit = ClientRateLimit(0.5, 1, clock=clock)
    limit.check("phone-1")
    with pytest.raises(RetryLater) as caught:
        limit.check("phone-1")
    message = str(caught.value)
    assert "phone-1" in message and "rate_limit_per_s=0.5" in message and "rate_limit_burst=1" in message
    assert "retry in 2.00 s" in message and "retry-after=2000ms" in message
    assert caught.value.retry_after_s == pytest.approx(2.0)
    assert isinstance(caught.value, LimitExceeded)


# -- stream slots --------------------------------------------------------------------


def test_stream_slots_refuse_beyond_the_limit_and_come_back() -> None:
    slots = StreamSlots(2)
    slots.acquire()
    slots.acquire()
    with pytest.raises(RetryLater, match=r"server is handling 2 streams \(max_concurrent_streams=2\); retry later") as caught:
        slots.acquire()
    assert caught.value.retry_after_s > 0
    assert slots.in_use == 2
    slots.release()
    slots.acquire()
    assert slots.in_use == 2


def test_releasing_more_than_acquired_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        StreamSlots(1).release()


# -- stream deadlines -----------------------------------------------------------------


def test_a_message_after_a_long_silence_is_refused(clock: FakeClock) -> None:
    stream = StreamClock("Push", timeout_s=600, idle_timeout_s=5, clock=clock)
    stream.begin_wait()
    clock.advance(4.9)
    stream.end_wait()
    stream.begin_wait()
    clock.advance(5.1)
    with pytest.raises(StreamDeadlineExceeded, match=r"no message moved on the Push stream for 5.1 s, above this server's stream_idle_timeout_s=5"):
        stream.end_wait()


def test_the_server_s_own_time_is_not_silence(clock: FakeClock) -> None:
    stream = StreamClock("Pull", timeout_s=600, idle_timeout_s=5, clock=clock)
    clock.advance(30)  # a long poll before the first message
    stream.begin_wait()
    stream.end_wait()
    clock.advance(30)  # the handler working between messages
    stream.begin_wait()
    clock.advance(1)
    stream.end_wait()


def test_a_stream_open_too_long_is_refused_at_its_next_message(clock: FakeClock) -> None:
    stream = StreamClock("UploadMasked", timeout_s=10, idle_timeout_s=5, clock=clock)
    clock.advance(100)  # before the first message: not counted
    for _ in range(3):
        stream.begin_wait()
        clock.advance(3)
        stream.end_wait()
    stream.begin_wait()
    clock.advance(3)
    with pytest.raises(StreamDeadlineExceeded, match=r"open for 12.0 s, above this server's stream_timeout_s=10"):
        stream.end_wait()


def test_the_watchdog_cancels_only_streams_waiting_on_a_silent_peer(clock: FakeClock) -> None:
    cancelled: list[str] = []
    reasons: list[str] = []
    watchdog = StreamWatchdog(on_cancel=reasons.append)
    silent = StreamClock("Push", timeout_s=600, idle_timeout_s=5, clock=clock)
    busy = StreamClock("Push", timeout_s=600, idle_timeout_s=5, clock=clock)  # the handler is working, not waiting
    fresh = StreamClock("Pull", timeout_s=600, idle_timeout_s=5, clock=clock)
    watchdog.watch(silent, lambda reason: cancelled.append("silent"), "ipv4:1.2.3.4:5")
    watchdog.watch(busy, lambda reason: cancelled.append("busy"))
    watchdog.watch(fresh, lambda reason: cancelled.append("fresh"))
    silent.begin_wait()
    busy.begin_wait()
    busy.end_wait()
    clock.advance(5.5)
    fresh.begin_wait()
    assert watchdog.scan() == 1
    assert cancelled == ["silent"]
    assert reasons == [silent.cancelled]
    assert watchdog.scan() == 0  # cancelled once
    with pytest.raises(StreamDeadlineExceeded, match="no message moved on the Push stream for 5.5 s.*it was cancelled"):
        silent.end_wait()  # a message that slipped in after the cut is refused too
    with pytest.raises(StreamDeadlineExceeded):
        silent.end_stream()  # and so is the end of the stream: it was not complete
    watchdog.unwatch(silent)
    assert len(watchdog) == 2


def test_the_watchdog_logs_what_it_cancels(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    watchdog = StreamWatchdog()
    stream = StreamClock("Push", timeout_s=600, idle_timeout_s=1, clock=clock)
    watchdog.watch(stream, lambda reason: None, "ipv4:10.0.0.7:5555")
    stream.begin_wait()
    clock.advance(2)
    with caplog.at_level(logging.WARNING, logger="tributary.server.limits"):
        watchdog.scan()
    assert "cancelling Push from ipv4:10.0.0.7:5555" in caplog.text
    assert "stream_idle_timeout_s=1" in caplog.text


def test_the_watchdog_thread_starts_and_stops() -> None:
    watchdog = StreamWatchdog(interval_s=0.01)
    watchdog.start()
    watchdog.stop()


# -- from the server config ------------------------------------------------------------


def test_server_limits_from_config_and_their_counts(clock: FakeClock) -> None:
    config = ServerConfig(max_workers=8, max_concurrent_streams=1, rate_limit_per_s=1.0, stream_timeout_s=9, stream_idle_timeout_s=3, insecure=True)
    limits = ServerLimits.from_config(config, clock=clock)
    assert limits.streams.limit == 1
    assert limits.rates is not None and limits.rates.buckets.burst == 1
    limits.acquire_stream()
    with pytest.raises(RetryLater):
        limits.acquire_stream()
    limits.check_client("a")
    with pytest.raises(RetryLater):
        limits.check_client("a")
    stream = limits.stream_clock("Push")
    assert (stream.timeout_s, stream.idle_timeout_s) == (9, 3)
    assert limits.stats.counts() == {"streams_refused": 1, "rate_limited": 1, "deadline_exceeded": 0, "streams_cancelled": 0}


def test_no_rate_limit_by_default() -> None:
    limits = ServerLimits.from_config(ServerConfig(insecure=True))
    assert limits.rates is None
    for _ in range(1000):
        limits.check_client("a")
    assert limits.streams.limit == 240


# -- the request stream a handler reads (server/limits_interceptor.py) --------------------


def silenced_requests(clock: FakeClock, ending: BaseException) -> tuple[Iterator[str], ServerLimits]:
    """A watched request stream whose peer goes silent after one message; while
    the handler waits, the watchdog cuts the stream, and gRPC then ends the
    iterator with `ending` (StopIteration or an RpcError: which one is a race)."""
    from server.limits_interceptor import _Slot, _WatchedRequests

    limits = ServerLimits.from_config(ServerConfig(stream_idle_timeout_s=5, insecure=True), clock=clock)
    stream = limits.stream_clock("Push")
    limits.watchdog.watch(stream, lambda reason: None)
    limits.acquire_stream()

    class Peer:  # not a generator: one may not raise StopIteration (PEP 479), gRPC's iterator does
        sent = False

        def __next__(self) -> str:
            if not self.sent:
                self.sent = True
                return "header"
            clock.advance(6)
            assert limits.watchdog.scan() == 1
            raise ending

    return _WatchedRequests(Peer(), stream, _Slot(limits.streams), limits), limits  # type: ignore[arg-type]


@pytest.mark.parametrize("ending", [StopIteration(), grpc.RpcError()], ids=["stream-ended", "call-failed"])
def test_a_stream_cut_by_the_watchdog_is_never_taken_as_complete(clock: FakeClock, ending: BaseException) -> None:
    requests, limits = silenced_requests(clock, ending)
    assert next(requests) == "header"
    with pytest.raises(StreamDeadlineExceeded, match="no message moved on the Push stream for 6.0 s"):
        next(requests)
    assert limits.streams.in_use == 0
    assert limits.stats.counts()["streams_cancelled"] == 1


def test_a_watched_stream_gives_its_slot_back_when_the_peer_finishes(clock: FakeClock) -> None:
    from server.limits_interceptor import _Slot, _WatchedRequests

    limits = ServerLimits.from_config(ServerConfig(insecure=True), clock=clock)
    limits.acquire_stream()
    requests = _WatchedRequests(iter(["header", "chunk"]), limits.stream_clock("Push"), _Slot(limits.streams), limits)
    assert list(requests) == ["header", "chunk"]
    assert limits.streams.in_use == 0
    assert list(requests) == []
