"""Partial uploads (server/uploads.py) on their own: budget, expiry, takeover."""

from __future__ import annotations

import numpy as np
import pytest

from proto.tensors import CHUNK_BYTES, MalformedPayload, iter_chunks, specs_of
from server.core import UpdateHeader
from server.errors import InvalidUpdate, PreconditionFailed, UploadSuperseded
from server.uploads import PartialUploads

MIB = CHUNK_BYTES
DELTA = {"w": np.arange(5 * MIB // 4, dtype=np.float32)}  # 5 MiB: five chunks
CHUNKS = list(iter_chunks(DELTA.values()))


def header(key: str = "k", client: str = "c", num_samples: int = 1) -> UpdateHeader:
    return UpdateHeader("job", client, key, 0, num_samples, tuple(specs_of(DELTA)))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def interrupted(uploads: PartialUploads, key: str, chunks: int, data: list[bytes] = CHUNKS) -> None:
    ticket = uploads.attach(header(key), 0)
    for chunk in data[:chunks]:
        ticket.add(chunk)
    ticket.park()


def test_a_parked_upload_resumes_and_yields_the_whole_payload() -> None:
    uploads = PartialUploads()
    ticket = uploads.attach(header(), 0)
    ticket.add(CHUNKS[0])
    ticket.add(CHUNKS[1][: MIB // 2])  # half a chunk: not a boundary, not offered
    ticket.park()
    assert uploads.offset("job", "c", "k") == MIB
    resumed = uploads.attach(header(), MIB)
    for chunk in CHUNKS[1:]:
        resumed.add(chunk)
    np.testing.assert_array_equal(resumed.take()["w"], DELTA["w"])
    assert uploads.offset("job", "c", "k") == 0 and uploads.stats().resumed == 1


def test_the_oldest_parked_uploads_go_first_and_one_over_the_budget_is_not_kept() -> None:
    uploads = PartialUploads(budget_bytes=5 * MIB)
    interrupted(uploads, "a", 2)
    interrupted(uploads, "b", 2)
    interrupted(uploads, "c", 2)  # 6 MiB: "a" goes
    assert [uploads.offset("job", "c", k) for k in "abc"] == [0, 2 * MIB, 2 * MIB]
    small = PartialUploads(budget_bytes=MIB)
    interrupted(small, "big", 2)
    assert small.offset("job", "c", "big") == 0
    assert small.stats().parked_bytes == 0 and small.stats().evicted == 1


def test_parked_uploads_expire() -> None:
    clock = Clock()
    uploads = PartialUploads(expiry_s=60, clock=clock)
    interrupted(uploads, "k", 2)
    clock.now = 59.0
    assert uploads.offset("job", "c", "k") == 2 * MIB
    clock.now = 60.0
    assert uploads.offset("job", "c", "k") == 0
    assert uploads.stats().expired == 1
    with pytest.raises(PreconditionFailed, match="holds 0 bytes"):
        uploads.attach(header(), MIB)


def test_bad_resumes_change_nothing() -> None:
    uploads = PartialUploads()
    interrupted(uploads, "k", 2)
    with pytest.raises(InvalidUpdate, match="not a multiple"):
        uploads.attach(header(), 100)
    with pytest.raises(PreconditionFailed, match="holds 2097152 bytes"):
        uploads.attach(header(), 3 * MIB)
    with pytest.raises(PreconditionFailed, match="another header"):
        uploads.attach(header(num_samples=2), MIB)
    assert uploads.offset("job", "c", "k") == 2 * MIB and uploads.stats().parked == 1


def test_a_resume_takes_the_upload_from_a_stream_still_writing() -> None:
    uploads = PartialUploads()
    original = uploads.attach(header(), 0)
    for chunk in CHUNKS[:3]:
        original.add(chunk)
    resumed = uploads.attach(header(), 2 * MIB)
    with pytest.raises(UploadSuperseded):
        original.add(CHUNKS[3])
    original.park()  # the original's end changes nothing
    for chunk in CHUNKS[2:]:
        resumed.add(chunk)
    np.testing.assert_array_equal(resumed.take()["w"], DELTA["w"])
    with pytest.raises(UploadSuperseded):
        original.take()


def test_a_fresh_push_under_the_key_starts_over() -> None:
    uploads = PartialUploads()
    interrupted(uploads, "k", 3)
    fresh = uploads.attach(header(), 0)
    assert uploads.offset("job", "c", "k") == 0 and uploads.stats().parked_bytes == 0
    fresh.add(CHUNKS[0])
    # a stream that ends short is refused, but what arrived is kept: a cut
    # connection can reach the servicer as a stream that ended
    with pytest.raises(MalformedPayload, match="truncated"):
        fresh.take()
    assert uploads.offset("job", "c", "k") == MIB
