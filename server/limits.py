"""Limits that keep one client from taking the server from the others. No gRPC here.

A threaded gRPC server has `max_workers` threads, and every RPC that is in
flight holds one. Three limits protect them (server/limits_interceptor.py and
the servicer apply them to calls):

  StreamSlots      at most `max_concurrent_streams` RPCs that can hold a thread
                   for long: streams while their data moves, and long waits.
                   What counts (the interceptor decides, by method):
                     Push, UploadMasked  from the call's start until the client
                                         has sent its whole stream
                     Pull                from the call's start (its fedavg long
                                         poll included) until the model is sent
                     JoinCohort          the whole call (it waits for a cohort)
                   Not counted: quick unary calls (GetJob, health) and the
                   cohort steps (AdvertiseKeys, ShareKeys, GetUploadSlot, Unmask,
                   and UploadMasked after its stream): a cohort needs all its
                   members in those at once, so refusing one would stall the
                   cohort, and their number is bounded by the members of
                   cohorts in flight, each of which first got a JoinCohort slot.
                   Keeping the limit below max_workers leaves threads for them.
  ClientRateLimit  a token bucket per client id over the RPCs that name a
                   client (Push, JoinCohort): `rate_per_s` tokens a second, up
                   to `burst` saved up.
  StreamClock      deadlines of one stream: `timeout_s` from its first message
                   (checked as each message moves) and `idle_timeout_s` without
                   one. A client that goes silent blocks its handler thread
                   inside gRPC, where no check runs; the StreamWatchdog thread
                   finds such streams and cancels them.

Refusals that may succeed later raise `RetryLater`, with a hint of when.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.config import ServerConfig
from server.errors import RetryLater, StreamDeadlineExceeded

Clock = Callable[[], float]
LOG = logging.getLogger("tributary.server.limits")

STREAM_RETRY_AFTER_S = 1.0
"""What a client refused for lack of stream slots is told to wait: streams end
at their own pace, so this is a polite guess, not a promise."""
MAX_TRACKED_CLIENTS = 100_000
"""Most token buckets kept; see TokenBuckets for what eviction costs."""
WATCHDOG_INTERVAL_S = 1.0
"""How often the watchdog looks for silent streams (shorter for short timeouts)."""


class StreamSlots:
    """A counter of long-held RPCs with a ceiling."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def acquire(self) -> None:
        """Take a slot, or raise RetryLater when all are taken."""
        with self._lock:
            if self._in_use >= self.limit:
                in_use = self._in_use
            else:
                self._in_use += 1
                return
        raise RetryLater(
            f"server is handling {in_use} streams (max_concurrent_streams={self.limit}); "
            f"retry later (retry-after={STREAM_RETRY_AFTER_S:g}s)",
            STREAM_RETRY_AFTER_S,
        )

    def release(self) -> None:
        with self._lock:
            if self._in_use <= 0:
                raise RuntimeError("released a stream slot that was never acquired")
            self._in_use -= 1


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key: `rate_per_s` tokens a second, at most `burst`.

    Memory stays bounded: a bucket that has refilled is the same as no bucket,
    so full buckets are dropped as the least recently used ones come up; if
    `max_keys` busy buckets are still held, the least recently used is dropped
    anyway (that client gets a full bucket back early: generous, never wrong
    the other way). Keys are kept in last-use order, so both cost O(1) per call.
    """

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = MAX_TRACKED_CLIENTS, clock: Clock = time.monotonic) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when one was there, else the seconds
        until one will be (nothing is taken then)."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.pop(key, None)
            if bucket is None:
                bucket = _Bucket(float(self.burst), now)
            else:
                bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
                bucket.updated = now
            self._evict(now)
            self._buckets[key] = bucket  # most recently used last
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate_per_s

    def _evict(self, now: float) -> None:
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            refilled = oldest.tokens + (now - oldest.updated) * self.rate_per_s >= self.burst
            if not refilled and len(self._buckets) < self._max_keys:
                return
            del self._buckets[key]


class ClientRateLimit:
    """Refuses a client's RPC when its bucket is empty (RetryLater)."""

    def __init__(self, rate_per_s: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        self.buckets = TokenBuckets(rate_per_s, burst, clock=clock)

    def check(self, client_id: str) -> None:
        wait = self.buckets.take(client_id)
        if wait > 0:
            raise RetryLater(
                f"client {client_id!r} is over this server's rate limit of {self.buckets.rate_per_s:g} requests/s "
                f"(rate_limit_per_s={self.buckets.rate_per_s:g}, rate_limit_burst={self.buckets.burst}); "
                f"retry in {wait:.2f} s (retry-after={math.ceil(wait * 1000)}ms)",
                wait,
            )


class StreamClock:
    """Deadlines of one stream, told when the handler waits on the peer.

    The handler calls `begin_wait()` before it blocks on the peer (reading the
    next message, or sending one) and `end_wait()` once the message moved;
    `end_wait` raises StreamDeadlineExceeded when the stream is over either
    limit. The clock starts at the first `begin_wait`, so time the server
    spends on its own (a long poll, admission) is never the client's fault.
    The watchdog calls `overdue()`; a clock it marks cancelled refuses every
    later message, and the end of the stream too (`end_stream`), so a stream
    cut off by the watchdog is never taken as complete.
    """

    def __init__(self, rpc: str, timeout_s: float, idle_timeout_s: float, *, clock: Clock = time.monotonic) -> None:
        self.rpc = rpc
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started: float | None = None
        self._waiting_since: float | None = None
        self.cancelled: str | None = None
        """Why the watchdog cancelled this stream; None while it has not."""

    def begin_wait(self) -> None:
        with self._lock:
            now = self._clock()
            if self._started is None:
                self._started = now
            self._waiting_since = now

    def end_wait(self) -> None:
        with self._lock:
            now = self._clock()
            waited = now - (self._waiting_since if self._waiting_since is not None else now)
            self._waiting_since = None
            if self.cancelled is not None:
                raise StreamDeadlineExceeded(self.cancelled)
            if waited > self.idle_timeout_s:
                raise StreamDeadlineExceeded(
                    f"no message moved on the {self.rpc} stream for {waited:.1f} s, above this server's "
                    f"stream_idle_timeout_s={self.idle_timeout_s:g}; keep the stream moving"
                )
            open_s = now - (self._started if self._started is not None else now)
            if open_s > self.timeout_s:
                raise StreamDeadlineExceeded(
                    f"{self.rpc} stream has been open for {open_s:.1f} s, above this server's "
                    f"stream_timeout_s={self.timeout_s:g}; a stream this long needs a faster link "
                    "or a longer stream_timeout_s on the server"
                )

    def end_stream(self) -> None:
        """The peer closed its side; raise if the watchdog cut the stream first."""
        with self._lock:
            self._waiting_since = None
            if self.cancelled is not None:
                raise StreamDeadlineExceeded(self.cancelled)

    def overdue(self) -> str | None:
        """If the handler has waited on the peer for longer than the idle
        timeout, mark the stream cancelled and say why; else None."""
        with self._lock:
            if self._waiting_since is None or self.cancelled is not None:
                return None
            waited = self._clock() - self._waiting_since
            if waited <= self.idle_timeout_s:
                return None
            self.cancelled = (
                f"no message moved on the {self.rpc} stream for {waited:.1f} s, above this server's "
                f"stream_idle_timeout_s={self.idle_timeout_s:g}; it was cancelled"
            )
            return self.cancelled


@dataclass(frozen=True)
class _Watched:
    clock: StreamClock
    cancel: Callable[[str], None]
    peer: str


class StreamWatchdog:
    """A thread that cancels streams whose peer has gone silent.

    `cancel(reason)` is whatever ends the call and frees its handler (the
    interceptor ends it with DEADLINE_EXCEEDED and the reason); it is called
    outside the watchdog's lock."""

    def __init__(self, interval_s: float = WATCHDOG_INTERVAL_S, *, on_cancel: Callable[[str], None] | None = None) -> None:
        self.interval_s = interval_s
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._watched: dict[int, _Watched] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, clock: StreamClock, cancel: Callable[[str], None], peer: str = "") -> None:
        with self._lock:
            self._watched[id(clock)] = _Watched(clock, cancel, peer)

    def unwatch(self, clock: StreamClock) -> None:
        with self._lock:
            self._watched.pop(id(clock), None)

    def __len__(self) -> int:
        return len(self._watched)

    def scan(self) -> int:
        """Cancel every overdue stream once; returns how many were cancelled."""
        with self._lock:
            watched = list(self._watched.values())
        overdue = [(entry, reason) for entry in watched if (reason := entry.clock.overdue()) is not None]
        for entry, reason in overdue:
            LOG.warning("cancelling %s from %s: %s", entry.clock.rpc, entry.peer or "a client", reason)
            if self._on_cancel is not None:  # counted before the client can see the cancel
                self._on_cancel(reason)
            entry.cancel(reason)
        return len(overdue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tributary-stream-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # a failing cancel must not end the watch over every other stream
                LOG.exception("stream watchdog scan failed")


class LimitStats:
    """How often each limit refused or cut something, by kind."""

    KINDS = ("streams_refused", "rate_limited", "deadline_exceeded", "streams_cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def note(self, kind: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown limit event {kind!r}")
        with self._lock:
            self._counts[kind] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: self._counts[kind] for kind in self.KINDS}


class ServerLimits:
    """The limits of one server, built from its config's flat keys."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int,
        rate_limit_per_s: float | None,
        rate_limit_burst: int,
        stream_timeout_s: float,
        stream_idle_timeout_s: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.stats = LimitStats()
        self.streams = StreamSlots(max_concurrent_streams)
        self.rates = ClientRateLimit(rate_limit_per_s, rate_limit_burst, clock=clock) if rate_limit_per_s is not None else None
        self.stream_timeout_s = stream_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._clock = clock
        interval = min(WATCHDOG_INTERVAL_S, stream_idle_timeout_s / 4)
        self.watchdog = StreamWatchdog(interval, on_cancel=lambda _reason: self.stats.note("streams_cancelled"))

    @classmethod
    def from_config(cls, config: ServerConfig, *, clock: Clock = time.monotonic) -> ServerLimits:
        return cls(
            max_concurrent_streams=config.stream_limit,
            rate_limit_per_s=config.rate_limit_per_s,
            rate_limit_burst=config.rate_burst,
            stream_timeout_s=config.stream_timeout_s,
            stream_idle_timeout_s=config.stream_idle_timeout_s,
            clock=clock,
        )

    def acquire_stream(self) -> None:
        try:
            self.streams.acquire()
        except RetryLater:
            self.stats.note("streams_refused")
            raise

    def check_client(self, client_id: str) -> None:
        """Call first in every RPC that names a client; raises RetryLater."""
        if self.rates is None:
            return
        try:
            self.rates.check(client_id)
        except RetryLater:
            self.stats.note("rate_limited")
            raise

    def stream_clock(self, rpc: str) -> StreamClock:
        return StreamClock(rpc, self.stream_timeout_s, self.stream_idle_timeout_s, clock=self._clock)
