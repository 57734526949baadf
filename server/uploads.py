"""Partial uploads: the bytes of pushes cut off mid-stream, kept so that the
client can resume instead of sending the whole update again. No gRPC here.

Every push the server starts reading registers here under (job, client id,
idempotency key) and writes its chunks through its `UploadTicket`. When the
stream ends normally the ticket `take`s the payload out (the update then goes
to the job); when it breaks (connection lost, a deadline) the ticket `park`s
what arrived, for a later push with the same key and header to resume from
`offset()`: the bytes received, rounded down to the 1 MiB chunk size, so an
offset is always a chunk boundary the server fully received.

Bounds: the bytes held by parked uploads count against `budget_bytes` (the
oldest parked uploads are dropped first to make room; one larger than the
whole budget is not kept), and a parked upload is dropped `expiry_s` after
its last byte arrived. Streams in progress are not counted: they are bounded
as before, by max_concurrent_streams times max_update_bytes. Everything is in
memory: a restart loses it, and clients then start their uploads over.

A resumed stream takes the upload over from whichever stream held it: should
the original stream still be open (the client gave up on it before the server
noticed), its next chunk is refused with `UploadSuperseded` and only the
resumed one can complete. The job's idempotency check counts an update once
whatever the streams do.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from proto.tensors import CHUNK_BYTES, MalformedPayload, PayloadAssembler
from server.core import UpdateHeader
from server.errors import InvalidUpdate, PreconditionFailed, UploadSuperseded


class TruncatedPayload(MalformedPayload):
    """A push stream that ended short. Refused, but what arrived is kept: it
    may have been a cut connection, and the client resumes it."""

QUIET_S = 0.5
"""A stream that sent nothing for this long is taken to have stopped (see `offset`)."""
UploadKey = tuple[str, str, str]
"""(job id, client id, idempotency key)."""


@dataclass(frozen=True)
class UploadStats:
    parked: int
    parked_bytes: int
    active: int
    resumed: int
    evicted: int
    expired: int


class _Upload:
    def __init__(self, header: UpdateHeader, owner: int, now: float) -> None:
        self.header = header
        self.assembler = PayloadAssembler(list(header.wire_specs))
        self.owner = owner
        """The ticket writing to it; 0 while parked."""
        self.touched = now
        self.lock = threading.Lock()

    @property
    def offset(self) -> int:
        received = self.assembler.received_bytes
        return received - received % CHUNK_BYTES


class PartialUploads:
    def __init__(self, budget_bytes: int = 1 << 30, expiry_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_bytes = budget_bytes
        self.expiry_s = expiry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        """Notified when a stream lets go of its upload."""
        self._uploads: dict[UploadKey, _Upload] = {}
        self._parked: collections.OrderedDict[UploadKey, int] = collections.OrderedDict()
        """Parked uploads, oldest first, with the bytes each holds."""
        self._parked_bytes = 0
        self._tickets = itertools.count(1)
        self._resumed = self._evicted = self._expired = 0

    def attach(self, header: UpdateHeader, resume_offset: int) -> UploadTicket:
        """Start writing `header`'s payload from `resume_offset` (0: a whole
        payload; anything held under its key is dropped). A resume must name a
        chunk boundary at most what is held, under an identical header."""
        key = (header.job_id, header.client_id, header.idempotency_key)
        if resume_offset % CHUNK_BYTES:
            raise InvalidUpdate(
                f"resume_offset {resume_offset} is not a multiple of the {CHUNK_BYTES}-byte chunk size; "
                "resume at the offset GetUploadOffset gives"
            )
        with self._lock:
            now = self._clock()
            self._expire(now)
            ticket = next(self._tickets)
            upload = self._uploads.get(key)
            if resume_offset == 0:
                if upload is not None:
                    self._unpark(key)
                    with upload.lock:
                        upload.owner = -1  # a stream still writing to it is superseded
                upload = self._uploads[key] = _Upload(header, ticket, now)
                return UploadTicket(self, key, upload, ticket)
            held = 0 if upload is None else upload.offset
            if upload is not None and upload.header != header:
                raise PreconditionFailed(
                    f"the upload held under idempotency key {header.idempotency_key!r} has another header "
                    "(base version, sample count or tensors); resume with the first attempt's header, "
                    "or send the whole update (resume_offset 0)"
                )
            if upload is None or resume_offset > held:
                raise PreconditionFailed(
                    f"cannot resume at byte {resume_offset}: this server holds {held} bytes of upload "
                    f"{header.idempotency_key!r}; ask GetUploadOffset and resume there (0: send the whole update)"
                )
            self._unpark(key)
            with upload.lock:
                upload.owner = ticket
                upload.assembler.rewind(resume_offset)
                upload.touched = now
            self._resumed += 1
            return UploadTicket(self, key, upload, ticket)

    def offset(self, job_id: str, client_id: str, idempotency_key: str, settle_s: float = 0.0) -> int:
        """Bytes held of this upload, at a chunk boundary (0: none).

        A client asks after its stream broke, often before the server has seen
        the connection go and read what had already arrived: while a stream
        still writes to the upload, wait up to `settle_s` for it to end (parked,
        taken or dropped) or to go `QUIET_S` without a chunk, so that the
        answer covers every byte that made it here."""
        key = (job_id, client_id, idempotency_key)
        give_up = time.monotonic() + settle_s
        with self._changed:
            while True:
                self._expire(self._clock())
                upload = self._uploads.get(key)
                if upload is None:
                    return 0
                with upload.lock:
                    active, quiet, held = upload.owner > 0, self._clock() - upload.touched >= QUIET_S, upload.offset
                left = give_up - time.monotonic()
                if not active or quiet or left <= 0:
                    return held
                self._changed.wait(min(left, QUIET_S / 4))

    def stats(self) -> UploadStats:
        with self._lock:
            return UploadStats(
                parked=len(self._parked),
                parked_bytes=self._parked_bytes,
                active=len(self._uploads) - len(self._parked),
                resumed=self._resumed,
                evicted=self._evicted,
                expired=self._expired,
            )

    # -- for UploadTicket ---------------------------------------------------------------

    def _park(self, key: UploadKey, upload: _Upload, ticket: int) -> None:
        with self._lock:
            with upload.lock:
                if upload.owner != ticket:
                    return
                upload.owner = 0
                upload.touched = self._clock()
                held = upload.offset
            self._changed.notify_all()
            if held == 0 or held > self.budget_bytes:
                del self._uploads[key]  # nothing to resume from, or more than may ever be kept
                self._evicted += held > 0
                return
            self._parked[key] = held
            self._parked_bytes += held
            while self._parked_bytes > self.budget_bytes:
                oldest = next(iter(self._parked))
                self._drop(oldest)
                self._evicted += 1

    def _release(self, key: UploadKey, upload: _Upload, ticket: int) -> bool:
        """Remove the upload if `ticket` still owns it; False if it does not."""
        with self._lock:
            with upload.lock:
                if upload.owner != ticket:
                    return False
                upload.owner = -1
            if self._uploads.get(key) is upload:
                del self._uploads[key]
            self._changed.notify_all()
            return True

    def _unpark(self, key: UploadKey) -> None:
        held = self._parked.pop(key, None)
        if held is not None:
            self._parked_bytes -= held

    def _drop(self, key: UploadKey) -> None:
        self._unpark(key)
        del self._uploads[key]

    def _expire(self, now: float) -> None:
        while self._parked:
            key = next(iter(self._parked))
            if now - self._uploads[key].touched < self.expiry_s:
                break
            self._drop(key)
            self._expired += 1


class UploadTicket:
    """One stream's right to write an upload, until a resumed stream takes it over."""

    def __init__(self, uploads: PartialUploads, key: UploadKey, upload: _Upload, ticket: int) -> None:
        self._uploads = uploads
        self._key = key
        self._upload = upload
        self._ticket = ticket

    @property
    def resumed_at(self) -> int:
        return self._upload.assembler.received_bytes

    def add(self, data: bytes) -> None:
        upload = self._upload
        with upload.lock:
            if upload.owner != self._ticket:
                raise UploadSuperseded(
                    f"upload {self._key[2]!r} was taken over by a newer push with the same idempotency key; "
                    "this stream's bytes are not used"
                )
            upload.assembler.add(data)  # MalformedPayload on a chunk too many or too large
            upload.touched = self._uploads._clock()

    def take(self) -> dict[str, np.ndarray]:
        """The whole payload, removed from the store. A stream that ended
        short is refused (MalformedPayload) but parked: gRPC can hand the
        servicer a cancelled stream (a cut connection) as one that ended, so
        what arrived is kept for a resume all the same."""
        assembler = self._upload.assembler
        with self._upload.lock:
            received, expected = assembler.received_bytes, assembler.expected_bytes
        if received != expected:
            self.park()
            raise TruncatedPayload(f"stream ended after {received} of {expected} payload bytes (truncated)")
        if not self._uploads._release(self._key, self._upload, self._ticket):
            raise UploadSuperseded(
                f"upload {self._key[2]!r} was taken over by a newer push with the same idempotency key; "
                "this stream's bytes are not used"
            )
        return self._upload.assembler.finish()

    def park(self) -> None:
        """The stream broke: keep what arrived for a resumed push (within the bounds)."""
        self._uploads._park(self._key, self._upload, self._ticket)

    def discard(self) -> None:
        """The stream was refused: keep nothing."""
        self._uploads._release(self._key, self._upload, self._ticket)
