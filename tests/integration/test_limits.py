"""Server limits over real gRPC: concurrent streams, per-client rate, stream
deadlines, message and update sizes. Each limit refuses with the right status
and a message, applies nothing, and leaves the server serving everyone else.

Streams are held open by request generators the test controls (they wait on an
Event), never by sleeping and hoping; the only sleep is one that must outlast
a deadline, which a sleep cannot fail to do.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from client_sdk import Client, LimitExceeded, RetryPolicy
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.metadata import RETRY_PUSHBACK_MS
from proto.tensors import header_to_pb, iter_chunks, specs_of
from server import JobConfig, StrategyConfig
from server.app import RunningServer
from server.config import SecAggConfig
from tests.integration.test_bad_input import assert_unchanged, good_delta, state_of

FEDASYNC = JobConfig(strategy=StrategyConfig(name="fedasync", alpha=0.5))
WAIT_S = 30.0
"""Upper bound on any wait in these tests, so that a failing test still ends."""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition` holds (`what` says what for a reader; a
    condition that never holds is ended by pytest's timeout)."""
    while not condition():
        time.sleep(0.01)


def header(client_id: str, delta: dict[str, np.ndarray], base_version: int = 0) -> pb.PushRequest:
    return pb.PushRequest(
        update=pb.UpdateHeader(
            job_id="default",
            client_id=client_id,
            idempotency_key=uuid.uuid4().hex,
            base_version=base_version,
            num_samples=1,
            header=header_to_pb(specs_of(delta)),
        )
    )


def chunks(delta: dict[str, np.ndarray], chunk_bytes: int = 16) -> list[pb.PushRequest]:
    return [pb.PushRequest(chunk=pb.Chunk(data=c)) for c in iter_chunks(delta.values(), chunk_bytes)]


def push(running: RunningServer, messages: Iterator[pb.PushRequest] | list[pb.PushRequest]) -> pb.PushAck | grpc.RpcError:
    """One raw push (no SDK, so no retries): the ack, or the error."""
    with grpc.insecure_channel(running.address) as channel:
        try:
            ack: pb.PushAck = pb_grpc.TributaryStub(channel).Push(iter(messages), timeout=WAIT_S)
            return ack
        except grpc.RpcError as error:
            return error


def refused(outcome: pb.PushAck | grpc.RpcError, code: grpc.StatusCode) -> grpc.RpcError:
    assert isinstance(outcome, grpc.RpcError), f"expected {code.name}, got an ack: {outcome}"
    assert outcome.code() == code, (outcome.code(), outcome.details())
    return outcome


def pushback_ms(error: grpc.RpcError) -> int | None:
    value = dict(error.trailing_metadata() or ()).get(RETRY_PUSHBACK_MS)
    return None if value is None else int(value)


def job_info(running: RunningServer) -> pb.JobInfo:
    with grpc.insecure_channel(running.address) as channel:
        info: pb.JobInfo = pb_grpc.TributaryStub(channel).GetJob(pb.GetJobRequest(job_id="default"), timeout=WAIT_S)
        return info


def accepted(running: RunningServer, client_id: str = "bystander") -> pb.PushAck:
    """A good push from another client is served: it is acked and applied."""
    version = running.core.job("default").snapshot().version
    outcome = push(running, [header(client_id, good_delta(), version), *chunks(good_delta())])
    assert isinstance(outcome, pb.PushAck), f"{outcome.code()}: {outcome.details()}"  # type: ignore[union-attr]
    assert outcome.version_after == version + 1
    return outcome


class HeldPush:
    """A raw push in a thread whose stream the test controls: it sends its
    header (and with `payload_first`, its whole payload), then waits for
    `release()` before sending the payload / closing its side."""

    def __init__(self, running: RunningServer, client_id: str, *, payload_first: bool = False) -> None:
        self._go = threading.Event()
        self.outcome: pb.PushAck | grpc.RpcError | None = None
        delta = good_delta()
        messages = [header(client_id, delta), *chunks(delta)]
        before, after = (messages, []) if payload_first else (messages[:1], messages[1:])

        def stream() -> Iterator[pb.PushRequest]:
            yield from before
            self._go.wait(WAIT_S)
            yield from after

        def run() -> None:
            self.outcome = push(running, stream())

        self._thread = threading.Thread(target=run, name=f"held-{client_id}")
        self._thread.start()

    def release(self) -> None:
        self._go.set()

    def result(self) -> pb.PushAck | grpc.RpcError:
        self._thread.join(WAIT_S)
        assert self.outcome is not None, "the held push never finished"
        return self.outcome


@pytest.fixture
def held() -> Iterator[list[HeldPush]]:
    """Held pushes to release when the test ends, whatever happened."""
    pushes: list[HeldPush] = []
    yield pushes
    for stream in pushes:
        stream.release()
        stream.result()


# -- concurrent streams ----------------------------------------------------------------


def test_streams_beyond_the_limit_are_refused_and_the_others_served(serve, held) -> None:  # type: ignore[no-untyped-def]
    running = serve(FEDASYNC, max_workers=6, max_concurrent_streams=2)
    held.extend(HeldPush(running, f"slow-{i}") for i in range(2))
    wait_until(lambda: running.limits.streams.in_use == 2, "both held pushes hold a slot")
    before = state_of(running)

    error = refused(push(running, [header("third", good_delta()), *chunks(good_delta())]), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "server is handling 2 streams (max_concurrent_streams=2); retry later (retry-after=1s)" in error.details()
    assert pushback_ms(error) == 1000
    with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.TributaryStub(channel).Pull(pb.PullRequest(job_id="default"), timeout=WAIT_S))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # a pull is a stream too
    assert job_info(running).version == before[0]  # quick calls take no slot
    assert_unchanged(before, running)

    for stream in held:
        stream.release()
    assert all(isinstance(stream.result(), pb.PushAck) for stream in held)
    assert running.limits.streams.in_use == 0
    accepted(running)
    assert running.limits.stats.counts()["streams_refused"] == 2


def test_the_sdk_backs_off_and_retries_while_every_slot_is_taken(serve, held) -> None:  # type: ignore[no-untyped-def]
    running = serve(FEDASYNC, max_workers=4, max_concurrent_streams=1)
    held.append(HeldPush(running, "slow"))
    wait_until(lambda: running.limits.streams.in_use == 1, "the held push holds the slot")
    results: list[object] = []

    def sdk_push() -> None:
        with Client(running.address, client_id="patient", insecure=True) as client:
            try:
                results.append(client.push(0, good_delta()))
            except Exception as error:  # handed to the test
                results.append(error)

    thread = threading.Thread(target=sdk_push)
    thread.start()
    wait_until(lambda: running.limits.stats.counts()["streams_refused"] >= 1, "the SDK's push was refused once")
    held[0].release()
    thread.join(WAIT_S)
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    assert running.core.job("default").stats.updates_per_client["patient"] == 1


def test_a_long_poll_holds_a_slot_while_it_waits(serve) -> None:  # type: ignore[no-untyped-def]
    fedavg = JobConfig(strategy=StrategyConfig(name="fedavg", clients_per_round=2))
    running = serve(fedavg, max_workers=6, max_concurrent_streams=2)
    polls: list[object] = []
    threads = [threading.Thread(target=lambda: polls.append(long_poll(running, 5000))) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: running.limits.streams.in_use == 2, "both long polls hold a slot")
    refused(push(running, [header("pusher", good_delta()), *chunks(good_delta())]), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert job_info(running).version == 0
    for thread in threads:
        thread.join(WAIT_S)
    assert len(polls) == 2  # the polls ran out (no round closed) and answered with version 0
    assert push(running, [header("pusher", good_delta()), *chunks(good_delta())]).version_at_arrival == 0  # type: ignore[union-attr]


# -- per-client rate -------------------------------------------------------------------


def test_a_client_over_its_rate_is_refused_and_others_served(serve) -> None:  # type: ignore[no-untyped-def]
    # 0.1/s: the bucket cannot refill between three immediate calls, however slow the machine
    running = serve(FEDASYNC, rate_limit_per_s=0.1, rate_limit_burst=2)
    for _ in range(2):
        version = running.core.job("default").snapshot().version
        assert isinstance(push(running, [header("phone", good_delta(), version), *chunks(good_delta())]), pb.PushAck)
    before = state_of(running)

    error = refused(push(running, [header("phone", good_delta(), before[0]), *chunks(good_delta())]), grpc.StatusCode.RESOURCE_EXHAUSTED)
    details = error.details()
    assert "client 'phone' is over this server's rate limit of 0.1 requests/s" in details
    assert "rate_limit_per_s=0.1, rate_limit_burst=2" in details and "retry-after=" in details
    hint = pushback_ms(error)
    assert hint is not None and 0 < hint <= 10_000
    assert_unchanged(before, running)
    accepted(running, "tablet")
    assert running.limits.stats.counts()["rate_limited"] == 1


def test_the_rate_limit_covers_cohort_joins(serve) -> None:  # type: ignore[no-untyped-def]
    secure = JobConfig(secure_aggregation=SecAggConfig(cohort_size=3))
    running = serve(secure, rate_limit_per_s=0.1, rate_limit_burst=1)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TributaryStub(channel)
        request = pb.JoinCohortRequest(job_id="default", client_id="member", wait_timeout_ms=0)
        assert not stub.JoinCohort(request, timeout=WAIT_S).formed
        with pytest.raises(grpc.RpcError) as caught:
            stub.JoinCohort(request, timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client 'member' is over this server's rate limit" in caught.value.details()
        other = pb.JoinCohortRequest(job_id="default", client_id="other", wait_timeout_ms=0)
        assert not stub.JoinCohort(other, timeout=WAIT_S).formed


def test_the_sdk_waits_out_a_short_rate_limit(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(FEDASYNC, rate_limit_per_s=0.4, rate_limit_burst=1)
    with Client(running.address, client_id="eager", insecure=True) as client:
        first = client.push(0, good_delta())
        second = client.push(first.version_after, good_delta())  # refused once, retried after the hint
    assert second.version_after == first.version_after + 1
    assert running.limits.stats.counts()["rate_limited"] >= 1


def test_the_sdk_hands_a_long_rate_limit_to_the_app(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(FEDASYNC, rate_limit_per_s=0.01, rate_limit_burst=1)
    with Client(running.address, client_id="eager", retry=RetryPolicy(max_backoff_s=10), insecure=True) as client:
        client.push(0, good_delta())
        with pytest.raises(LimitExceeded, match="retry-after=") as caught:
            client.push(1, good_delta())
    assert caught.value.retry_after_s is not None and 10 < caught.value.retry_after_s <= 100
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.limits.stats.counts()["rate_limited"] == 1  # asked once: the hint is past max_backoff_s


def test_the_sdk_does_not_retry_an_update_too_large(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync"), max_update_bytes=4096))
    with Client(running.address, insecure=True) as client, pytest.raises(LimitExceeded, match="max_update_bytes=4096") as caught:
        client.push(0, {**good_delta(), "layer.weight": np.zeros((64, 64), np.float32)})
    assert caught.value.retry_after_s is None
    assert running.core.job("default").stats.rejected["LimitExceeded"] == 1  # one attempt, no retries


# -- stream deadlines ---------------------------------------------------------------------


def test_a_stream_open_past_stream_timeout_is_refused_at_its_next_message(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(FEDASYNC, stream_timeout_s=2.0, stream_idle_timeout_s=30.0)
    before = state_of(running)
    delta = good_delta()

    def slow() -> Iterator[pb.PushRequest]:
        yield header("slow", delta)
        time.sleep(2.5)  # longer than stream_timeout_s, shorter than the idle timeout
        yield from chunks(delta)

    error = refused(push(running, slow()), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "Push stream has been open for" in error.details()
    assert "above this server's stream_timeout_s=2; a stream this long needs a faster link" in error.details()
    assert_unchanged(before, running)
    accepted(running)
    assert running.limits.stats.counts()["deadline_exceeded"] == 1


def test_silent_streams_are_cancelled_and_their_threads_freed(serve, held, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    # three threads: two for streams, one for quick calls; a stuck handler
    # thread would leave too few for the two new streams below
    running = serve(FEDASYNC, max_workers=3, max_concurrent_streams=2, stream_idle_timeout_s=1.0)
    before = state_of(running)
    with caplog.at_level(logging.WARNING, logger="tributary.server.limits"):
        # whole payloads sent, but the stream never closed: not a complete update
        silent = [HeldPush(running, f"silent-{i}", payload_first=True) for i in range(2)]
        for stream in silent:
            error = refused(stream.result(), grpc.StatusCode.DEADLINE_EXCEEDED)
            assert "stream_idle_timeout_s=1" in (error.details() or "")
        held.extend(silent)
    assert running.limits.stats.counts()["streams_cancelled"] == 2
    assert caplog.text.count("cancelling Push from") == 2
    assert "stream_idle_timeout_s=1" in caplog.text
    assert_unchanged(before, running)

    wait_until(lambda: running.limits.streams.in_use == 0, "the cancelled streams gave their slots back")
    # Two new streams at once, plus a quick call: all three threads are free
    # again. Long polls hold their slot and thread without being idle (the
    # server is the one waiting), so the idle timeout cannot race this check.
    polls = [threading.Thread(target=long_poll, args=(running, 5000)) for _ in range(2)]
    for thread in polls:
        thread.start()
    wait_until(lambda: running.limits.streams.in_use == 2, "two new streams run at once")
    assert job_info(running).version == before[0]
    for thread in polls:
        thread.join(WAIT_S)
    accepted(running)


def long_poll(running: RunningServer, wait_ms: int) -> list[pb.PullResponse]:
    """A pull for a version that will not come: it holds its slot for wait_ms."""
    with grpc.insecure_channel(running.address) as channel:
        request = pb.PullRequest(job_id="default", min_version=1_000_000, wait_timeout_ms=wait_ms)
        return list(pb_grpc.TributaryStub(channel).Pull(request, timeout=WAIT_S))


def test_a_pull_the_client_stops_reading_is_cancelled(serve) -> None:  # type: ignore[no-untyped-def]
    # 32 MiB: more than gRPC's flow-control windows hold, so the server's send blocks
    running = serve(JobConfig(), models={"default": {"w": np.zeros(8 << 20, np.float32)}}, stream_idle_timeout_s=1.0)
    with grpc.insecure_channel(running.address) as channel:
        call = pb_grpc.TributaryStub(channel).Pull(pb.PullRequest(job_id="default"), timeout=WAIT_S)
        assert next(call).WhichOneof("kind") == "model"
        wait_until(lambda: running.limits.stats.counts()["streams_cancelled"] == 1, "the stalled pull is cancelled")
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_timeout_s=1" in (caught.value.details() or "")
    wait_until(lambda: running.limits.streams.in_use == 0, "the pull gave its slot back")
    assert job_info(running).version == 0


# -- message and update sizes ---------------------------------------------------------------


def test_a_single_message_over_grpc_s_limit_is_refused(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(FEDASYNC)
    before = state_of(running)
    huge = pb.PushRequest(chunk=pb.Chunk(data=b"\0" * (5 << 20)))
    error = refused(push(running, [header("huge", good_delta()), huge]), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "Received message larger than max" in error.details() and "4194304" in error.details()
    assert_unchanged(before, running)
    accepted(running)
    # gRPC answered the client itself; the handler gives its slot back as it unwinds
    wait_until(lambda: running.limits.streams.in_use == 0, "the refused push gave its slot back")


def test_an_update_over_max_update_bytes_is_refused_before_its_payload(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(strategy=StrategyConfig(name="fedasync"), max_update_bytes=4096))
    go = threading.Event()
    big = {**good_delta(), "layer.weight": np.zeros((64, 64), np.float32)}

    def stream() -> Iterator[pb.PushRequest]:
        yield header("big", big)
        go.wait(WAIT_S)  # the payload is only sent once the test has the answer
        yield from chunks(big, 1 << 20)

    try:
        error = refused(push(running, stream()), grpc.StatusCode.RESOURCE_EXHAUSTED)
    finally:
        go.set()
    assert "exceeds this job's max_update_bytes=4096" in error.details()
    assert pushback_ms(error) is None  # no retry can pass a size limit


def test_an_overlong_masked_upload_is_refused_at_the_first_byte_too_many(serve) -> None:  # type: ignore[no-untyped-def]
    running = serve(JobConfig(secure_aggregation=SecAggConfig(cohort_size=3)))
    length = running.core.job("default").vector_length + 1
    go = threading.Event()

    def stream() -> Iterator[pb.MaskedInputRequest]:
        yield pb.MaskedInputRequest(header=pb.MemberRef(job_id="default", cohort_id="c", member=0, token=b"t"))
        yield pb.MaskedInputRequest(chunk=pb.Chunk(data=b"\0" * (4 * length)))
        yield pb.MaskedInputRequest(chunk=pb.Chunk(data=b"\0" * 4))
        go.wait(WAIT_S)  # more would follow; the answer must come first
        yield pb.MaskedInputRequest(chunk=pb.Chunk(data=b"\0" * 4))

    with grpc.insecure_channel(running.address) as channel:
        try:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.TributaryStub(channel).UploadMasked(stream(), timeout=WAIT_S)
        finally:
            go.set()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"masked input must be {length} uint32 values ({4 * length} bytes)" in caught.value.details()
    assert "stream carries more than" in caught.value.details()
    assert running.limits.streams.in_use == 0
