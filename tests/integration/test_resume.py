"""Resumable transfers (issue 5): a push or pull cut off mid-stream resumes
from the last whole chunk instead of starting again.

The cuts are real: a TCP proxy on loopback between the SDK and the server
forwards bytes, counts them each way, and closes both sockets once a chosen
number of bytes went through in one direction. Bad resumes are sent with raw
stubs, against a partial upload left by a push the test cancels mid-stream.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from client_sdk import Client, DeviceState, RetryPolicy
from proto import tributary_pb2 as pb
from proto.compression import Encoding, encode_update
from proto import tributary_pb2_grpc as pb_grpc
from proto.tensors import CHUNK_BYTES, header_to_pb, iter_chunks, specs_of
from server import JobConfig, StrategyConfig
from server.app import RunningServer
from server.config import StalenessConfig

MIB = CHUNK_BYTES
FAST_RETRY = RetryPolicy(max_attempts=8, initial_backoff_s=0.05, max_backoff_s=0.5)


def big_model(seed: int = 0) -> dict[str, np.ndarray]:
    """About 30.5 MiB: thirty whole chunks and a part."""
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.standard_normal((2000, 4000)).astype(np.float32),
        "encoder.bias": rng.standard_normal(1000).astype(np.float32),
    }


MODEL = big_model()
MODEL_BYTES = sum(a.nbytes for a in MODEL.values())
DELTA = {name: (array * 0.01).astype(np.float32) for name, array in big_model(1).items()}


def one_per_version(keep: int = 2) -> JobConfig:
    """x <- x + delta on every push, each push a new version."""
    return JobConfig(
        strategy=StrategyConfig(name="fedbuff", buffer_size=1),
        staleness=StalenessConfig(kind="constant"),
        keep_versions_for_resume=keep,
    )


class CuttingProxy:
    """Forwards TCP from its own loopback port to `target_port`, counting the
    bytes each way ("up": client to server, "down": server to client). The
    first connection to move `cut_after` bytes in `direction` is cut there:
    both of its sockets are closed, and `on_cut` runs. Later connections pass."""

    def __init__(self, target_port: int, direction: str, cut_after: int, on_cut: Callable[[], None] | None = None) -> None:
        self.target_port = target_port
        self.direction = direction
        self.cut_after = cut_after
        self.on_cut = on_cut
        self.moved = {"up": 0, "down": 0}
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.connections += 1
                self._sockets += [downstream, upstream]
            pair = (downstream, upstream)
            threading.Thread(target=self._pump, args=(downstream, upstream, "up", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, "down", pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str, pair: tuple[socket.socket, socket.socket]) -> None:
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            cut = False
            with self._lock:
                if direction == self.direction and self.cuts == 0 and self.moved[direction] + len(data) >= self.cut_after:
                    data = data[: self.cut_after - self.moved[direction]]
                    self.cuts, cut = 1, True
                self.moved[direction] += len(data)
            try:
                sink.sendall(data)
            except OSError:
                break
            if cut:
                if self.on_cut is not None:
                    self.on_cut()
                break
        _close(*pair)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            _close(*self._sockets)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


@pytest.fixture
def proxy() -> Iterator[Callable[..., CuttingProxy]]:
    made: list[CuttingProxy] = []

    def make(*args: Any, **kwargs: Any) -> CuttingProxy:
        made.append(CuttingProxy(*args, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def model_of(running: RunningServer, job: str = "default") -> dict[str, np.ndarray]:
    return {name: np.array(t) for name, t in running.core.job(job).snapshot().tensors.items()}


# -- through a real cut connection ----------------------------------------------------------


def test_a_push_cut_mid_stream_resumes_from_the_last_whole_chunk(serve, proxy) -> None:  # type: ignore[no-untyped-def]
    clean = serve(one_per_version(), models={"default": MODEL})
    with Client(clean.address, insecure=True) as client:
        client.push(0, DELTA, num_samples=10)
    running = serve(one_per_version(), models={"default": MODEL})
    # late in the stream: starting over would send 1.9 times the update. Far from the end,
    # as what gRPC buffered but had not handed to the servicer when the connection went
    # (several MiB on a busy machine) is lost and sent again.
    cut_after = 28 * MIB + MIB // 2
    link = proxy(running.port, "up", cut_after)
    with Client(link.address, insecure=True, retry=FAST_RETRY) as client:
        ack = client.push(0, DELTA, num_samples=10)
    assert link.cuts == 1 and link.connections >= 2
    assert not ack.duplicate and ack.version_after == 1
    job = running.core.job("default")
    assert job.stats.updates_accepted == 1 and job.snapshot().version == 1
    for name, expected in model_of(clean).items():
        np.testing.assert_array_equal(model_of(running)[name], expected)
    assert running.uploads is not None and running.uploads.stats().resumed == 1
    # resumed, not restarted: whole chunks the server had were not sent again
    sent = link.moved["up"]
    print(f"\npush of {MODEL_BYTES} B cut after {cut_after} B: {sent} B from the client in all ({sent / MODEL_BYTES:.2f}x)")
    assert sent < cut_after + MODEL_BYTES - MIB
    assert sent < 1.5 * MODEL_BYTES


def test_a_pull_cut_mid_stream_resumes_on_the_same_version(serve, proxy) -> None:  # type: ignore[no-untyped-def]
    running = serve(one_per_version(), models={"default": MODEL})
    cut_after = 28 * MIB + MIB // 2
    link = proxy(running.port, "down", cut_after)
    with Client(link.address, insecure=True, retry=FAST_RETRY) as client:
        pulled = client.pull()
    assert link.cuts == 1 and link.connections >= 2
    assert pulled.version == 0
    for name, expected in MODEL.items():
        np.testing.assert_array_equal(pulled.tensors[name], expected)
    received = link.moved["down"]
    print(f"\npull of {MODEL_BYTES} B cut after {cut_after} B: {received} B from the server in all ({received / MODEL_BYTES:.2f}x)")
    assert received < cut_after + MODEL_BYTES - MIB
    assert received < 1.5 * MODEL_BYTES


def test_a_pull_whose_version_is_gone_starts_over_with_the_current_one(serve, proxy) -> None:  # type: ignore[no-untyped-def]
    running = serve(one_per_version(keep=1), models={"default": MODEL})

    def publish_two_versions() -> None:  # while the client is cut off: version 0 leaves the kept ones
        with Client(running.address, insecure=True) as direct:
            for _ in range(2):
                direct.push(direct.job_info().version, DELTA, num_samples=1)

    link = proxy(running.port, "down", 3 * MIB, on_cut=publish_two_versions)
    with Client(link.address, insecure=True, retry=FAST_RETRY) as client:
        pulled = client.pull()
    assert link.cuts == 1 and pulled.version == 2
    for name, expected in model_of(running).items():
        np.testing.assert_array_equal(pulled.tensors[name], expected)


# -- partial uploads, driven by raw stubs ----------------------------------------------------


def _header(key: str = "k1", num_samples: int = 10, resume_offset: int = 0, client_id: str = "c1") -> pb.UpdateHeader:
    return pb.UpdateHeader(
        job_id="default",
        client_id=client_id,
        idempotency_key=key,
        base_version=0,
        num_samples=num_samples,
        header=header_to_pb(specs_of(DELTA)),
        resume_offset=resume_offset,
    )


CHUNKS = list(iter_chunks(DELTA.values()))


def _stream(header: pb.UpdateHeader, chunks: list[bytes], hold: threading.Event | None = None, after: int = 0) -> Iterator[pb.PushRequest]:
    yield pb.PushRequest(update=header)
    for index, data in enumerate(chunks):
        if hold is not None and index == after:
            hold.wait(30)
        yield pb.PushRequest(chunk=pb.Chunk(data=data))


def _offset(stub: pb_grpc.TributaryStub, key: str = "k1", client_id: str = "c1") -> pb.UploadOffset:
    answer: pb.UploadOffset = stub.GetUploadOffset(pb.UploadOffsetRequest(job_id="default", client_id=client_id, idempotency_key=key), timeout=10)
    return answer


def _wait_until(condition: Callable[[], bool]) -> None:
    while not condition():  # pytest's timeout ends a wait that never comes true
        time.sleep(0.01)


def _interrupted_upload(running: RunningServer, stub: pb_grpc.TributaryStub, key: str = "k1", chunks: int = 2) -> None:
    """A push of DELTA under `key` cancelled by its client after `chunks` chunks reached the server."""
    hold = threading.Event()
    call = stub.Push.future(_stream(_header(key), CHUNKS, hold, after=chunks), timeout=60)
    _wait_until(lambda: _offset(stub, key).offset == chunks * MIB)
    call.cancel()
    hold.set()
    _wait_until(lambda: running.uploads is not None and running.uploads.stats().active == 0)  # parked, or dropped


@pytest.fixture
def stub_for(serve) -> Iterator[Callable[..., tuple[RunningServer, pb_grpc.TributaryStub]]]:  # type: ignore[no-untyped-def]
    channels: list[grpc.Channel] = []

    def make(**settings: Any) -> tuple[RunningServer, pb_grpc.TributaryStub]:
        running = serve(one_per_version(), models={"default": MODEL}, **settings)
        channels.append(grpc.insecure_channel(running.address))
        return running, pb_grpc.TributaryStub(channels[-1])

    yield make
    for channel in channels:
        channel.close()


def _refused(call: Callable[[], Any], code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == code, refused.value.details()
    for word in words:
        assert word in (refused.value.details() or ""), refused.value.details()


def test_bad_resumes_are_refused_and_change_nothing(stub_for) -> None:  # type: ignore[no-untyped-def]
    running, stub = stub_for()
    job = running.core.job("default")
    assert _offset(stub, "never-sent").offset == 0 and not _offset(stub, "never-sent").accepted
    _interrupted_upload(running, stub)
    assert _offset(stub).offset == 2 * MIB

    def push(header: pb.UpdateHeader, chunks: list[bytes]) -> Callable[[], Any]:
        return lambda: stub.Push(_stream(header, chunks), timeout=30)

    _refused(push(_header(resume_offset=3 * MIB), CHUNKS[3:]), grpc.StatusCode.FAILED_PRECONDITION, "holds 2097152 bytes")
    _refused(push(_header(resume_offset=MIB + 7), CHUNKS[1:]), grpc.StatusCode.INVALID_ARGUMENT, "multiple of the 1048576-byte chunk size")
    _refused(push(_header(num_samples=11, resume_offset=2 * MIB), CHUNKS[2:]), grpc.StatusCode.FAILED_PRECONDITION, "another header")
    _refused(push(_header("unknown", resume_offset=MIB), CHUNKS[1:]), grpc.StatusCode.FAILED_PRECONDITION, "holds 0 bytes")
    _refused(lambda: _offset(stub, ""), grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key")
    _refused(lambda: stub.GetUploadOffset(pb.UploadOffsetRequest(job_id="nope", client_id="c1", idempotency_key="k1"), timeout=10), grpc.StatusCode.NOT_FOUND)
    assert job.stats.updates_accepted == 0 and job.snapshot().version == 0
    for name, expected in MODEL.items():
        np.testing.assert_array_equal(job.snapshot().tensors[name], expected)
    assert _offset(stub).offset == 2 * MIB  # the refusals left the partial upload as it was
    # another client's upload under the same key is another upload
    assert _offset(stub, client_id="c2").offset == 0
    # resuming before what is held is allowed: the rest is sent again
    ack = stub.Push(_stream(_header(resume_offset=MIB), CHUNKS[1:]), timeout=30)
    assert not ack.duplicate and job.stats.updates_accepted == 1
    assert _offset(stub).accepted
    again = stub.Push(_stream(_header(resume_offset=2 * MIB), CHUNKS[2:]), timeout=30)
    assert again.duplicate and job.stats.updates_accepted == 1


def test_a_resumed_push_racing_the_original_stream_counts_once(stub_for) -> None:  # type: ignore[no-untyped-def]
    running, stub = stub_for()
    job = running.core.job("default")
    hold = threading.Event()
    original = stub.Push.future(_stream(_header(), CHUNKS, hold, after=3), timeout=60)
    _wait_until(lambda: _offset(stub).offset == 3 * MIB)  # the original is still open, waiting to send more
    resumed = stub.Push(_stream(_header(resume_offset=2 * MIB), CHUNKS[2:]), timeout=30)
    assert not resumed.duplicate and resumed.version_after == 1
    hold.set()  # the original sends the rest: its upload belongs to the resumed push now
    with pytest.raises(grpc.RpcError) as superseded:
        original.result(timeout=30)
    assert superseded.value.code() == grpc.StatusCode.ABORTED, superseded.value.details()
    assert "taken over" in (superseded.value.details() or "")
    assert job.stats.updates_accepted == 1 and job.snapshot().version == 1
    expected = {name: MODEL[name] + DELTA[name] for name in MODEL}
    for name, values in expected.items():
        np.testing.assert_allclose(job.snapshot().tensors[name], values, rtol=0, atol=0)


def test_partial_uploads_beyond_the_budget_drop_the_oldest(stub_for) -> None:  # type: ignore[no-untyped-def]
    running, stub = stub_for(resume_budget_bytes=3 * MIB)
    _interrupted_upload(running, stub, "old")
    _interrupted_upload(running, stub, "new")
    assert _offset(stub, "old").offset == 0 and _offset(stub, "new").offset == 2 * MIB
    assert running.uploads is not None
    stats = running.uploads.stats()
    assert (stats.parked, stats.parked_bytes, stats.evicted) == (1, 2 * MIB, 1)
    # the dropped one can only start over; the kept one resumes
    _refused(lambda: stub.Push(_stream(_header("old", resume_offset=2 * MIB), CHUNKS[2:]), timeout=30), grpc.StatusCode.FAILED_PRECONDITION, "holds 0 bytes")
    assert not stub.Push(_stream(_header("new", resume_offset=2 * MIB), CHUNKS[2:]), timeout=30).duplicate


def test_bad_resumed_pulls_are_refused(stub_for) -> None:  # type: ignore[no-untyped-def]
    running, stub = stub_for()
    for key in ("a", "b", "c"):  # versions 1-3; keep_versions_for_resume=2 keeps 1 and 2 beside 3
        stub.Push(_stream(_header(key, client_id=key), CHUNKS), timeout=30)

    def pull(**fields: Any) -> Callable[[], list[pb.PullResponse]]:
        return lambda: list(stub.Pull(pb.PullRequest(job_id="default", resume=True, **fields), timeout=30))

    _refused(pull(resume_version=0), grpc.StatusCode.FAILED_PRECONDITION, "version 0", "no longer held", "1-3")
    _refused(pull(resume_version=9), grpc.StatusCode.FAILED_PRECONDITION, "never published")
    _refused(pull(resume_version=1, resume_offset=MIB + 1), grpc.StatusCode.INVALID_ARGUMENT, "multiple of")
    _refused(pull(resume_version=1, resume_offset=31 * MIB), grpc.StatusCode.INVALID_ARGUMENT, "at most")
    _refused(pull(resume_version=1, min_version=2), grpc.StatusCode.INVALID_ARGUMENT, "min_version")
    answers = pull(resume_version=1, resume_offset=6 * MIB)()
    assert answers[0].model.version == 1 and answers[0].model.offset == 6 * MIB
    assert sum(len(a.chunk.data) for a in answers[1:]) == MODEL_BYTES - 6 * MIB


def test_a_compressed_push_under_a_training_slot_resumes_and_keeps_its_slot(serve) -> None:  # type: ignore[no-untyped-def]
    """The offsets of a compressed push count its encoded bytes, and a push cut
    off mid-stream keeps the client's training slot for the resume."""
    config = JobConfig(
        strategy=StrategyConfig(name="fedbuff", buffer_size=1),
        staleness=StalenessConfig(kind="constant"),
        max_concurrent_trainers=1,
    )
    running = serve(config, models={"default": MODEL})
    job = running.core.job("default")
    encoding = Encoding(quantize_bits=8)
    encoded = encode_update(DELTA, encoding, np.random.default_rng(7))
    payload = b"".join(bytes(tensor.data) for tensor in encoded.values())
    chunks = list(iter_chunks([np.frombuffer(payload, np.uint8)]))
    assert len(chunks) >= 4  # 8 bits a value: a quarter of DELTA's bytes, still several chunks

    def header(resume_offset: int = 0) -> pb.UpdateHeader:
        message = _header(resume_offset=resume_offset)
        message.header.payload_bytes = len(payload)
        message.encoding.CopyFrom(encoding.to_pb())
        return message

    with grpc.insecure_channel(running.address) as channel, Client(running.address, client_id="c1", insecure=True) as client:
        stub = pb_grpc.TributaryStub(channel)
        assert client.acquire_training_slot(DeviceState(battery_level=None, charging=True, idle=True, unmetered=True)).granted
        hold = threading.Event()
        cut = stub.Push.future(_stream(header(), chunks, hold, after=2), timeout=60)
        _wait_until(lambda: _offset(stub).offset == 2 * MIB)
        cut.cancel()
        hold.set()
        _wait_until(lambda: running.uploads is not None and running.uploads.stats().active == 0)
        assert job.slots is not None and job.slots.active == 1  # the cut push still holds its slot
        ack = stub.Push(_stream(header(resume_offset=2 * MIB), chunks[2:]), timeout=30)
    assert not ack.duplicate and ack.version_after == 1
    assert job.slots.active == 0  # released by the accepted push
    for name, tensor in encoded.items():
        np.testing.assert_array_equal(job.snapshot().tensors[name], MODEL[name] + tensor.decoded)
