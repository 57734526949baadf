"""What each job's model must be, rebuilt from the pushes the server acknowledged.

The fuzz sends whatever it likes; whenever the server answers a push with OK,
the shadow re-reads the messages that were sent, checks that they were an
update the server was allowed to accept (right job, the model's exact layout,
a payload of exactly the declared bytes, finite values, fresh key, acceptable
base version) and applies it with the server's own arithmetic (see
server/strategies.py: fedbuff and fedavg accumulate in float64 and cast back).
After every call the server's model must equal the shadow bit for bit: an
update that should have been refused, or one counted twice, shows up at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from proto import tributary_pb2 as pb
from proto.tensors import CHUNK_BYTES, MalformedPayload, specs_from_pb, specs_of, split_payload
from server.core import MAX_NUM_SAMPLES, Job
from server.servicer import MAX_ID_LENGTH


@dataclass(frozen=True)
class Accepted:
    client_id: str
    base_version: int
    num_samples: int
    ack: pb.PushAck
    requests: tuple[pb.PushRequest, ...]


@dataclass
class PlainShadow:
    """A plaintext job that is either fedbuff with buffer_size=1 and constant
    staleness (each update is applied as x + delta) or fedavg with
    clients_per_round=2 and server_lr=1."""

    job_id: str
    strategy: str
    tensors: dict[str, np.ndarray]
    max_staleness: int | None
    version: int = 0
    accepted: dict[str, Accepted] = field(default_factory=dict)
    round: list[tuple[str, dict[str, np.ndarray], int]] = field(default_factory=list)
    """fedavg: (client, delta, num_samples) taken in the open round."""

    def __post_init__(self) -> None:
        assert self.strategy in ("fedbuff", "fedavg")
        self.specs = tuple(specs_of(self.tensors))

    def judge(self, requests: Sequence[pb.PushRequest], ack: pb.PushAck) -> None:
        """The server answered OK to this push: fail unless it was an update
        it may accept; then take it into the shadow."""
        assert requests and requests[0].WhichOneof("kind") == "update", "OK for a push stream that did not start with a header"
        header = requests[0].update
        key = header.idempotency_key
        assert ack.job_id == self.job_id, (ack.job_id, self.job_id)
        if ack.duplicate:
            first = self.accepted.get(key)
            assert first is not None, f"duplicate ack for key {key!r}, which was never accepted"
            assert (first.client_id, first.base_version, first.num_samples) == (header.client_id, header.base_version, header.num_samples)
            expected = pb.PushAck()
            expected.CopyFrom(first.ack)
            expected.duplicate = True
            assert ack == expected, (ack, first.ack)
            return
        assert key not in self.accepted, f"update with key {key!r} counted twice"
        assert header.client_id and len(header.client_id) <= MAX_ID_LENGTH, f"accepted client_id {header.client_id!r}"
        assert key and len(key) <= MAX_ID_LENGTH, f"accepted idempotency key {key!r}"
        assert 1 <= header.num_samples <= MAX_NUM_SAMPLES, f"accepted num_samples={header.num_samples}"
        try:
            specs = specs_from_pb(header.header)
        except MalformedPayload as error:
            raise AssertionError(f"accepted an update with a malformed header: {error}") from None
        assert tuple(specs) == self.specs, f"accepted an update whose tensors {specs} are not the model's {self.specs}"
        chunks = []
        for request in requests[1:]:
            assert request.WhichOneof("kind") == "chunk", "accepted a push with a second header"
            assert len(request.chunk.data) <= CHUNK_BYTES, "accepted an oversized chunk"
            chunks.append(request.chunk.data)
        payload = b"".join(chunks)
        assert len(payload) == sum(s.nbytes for s in specs), f"accepted {len(payload)} payload bytes for a {specs} header"
        delta = split_payload(specs, payload)
        for name, values in delta.items():
            assert np.isfinite(values).all(), f"accepted NaN or Inf in {name!r}"
        base = header.base_version
        assert base <= self.version, f"accepted base version {base} > {self.version}"
        staleness = self.version - base
        if self.max_staleness is not None:
            assert staleness <= self.max_staleness, f"accepted an update {staleness} versions stale"
        if self.strategy == "fedavg":
            assert base == self.version, f"fedavg accepted base version {base} in round {self.version}"
            assert header.client_id not in {c for c, _, _ in self.round}, f"fedavg accepted {header.client_id!r} twice in a round"
        arrival = self.version
        self._apply(header.client_id, dict(delta), header.num_samples)
        assert (ack.version_at_arrival, ack.staleness, ack.version_after) == (arrival, staleness, self.version), ack
        assert ack.staleness_weight == 1.0, ack  # constant staleness (fedbuff job); fedavg updates are fresh
        self.accepted[key] = Accepted(header.client_id, base, header.num_samples, ack, tuple(requests))

    def _apply(self, client_id: str, delta: dict[str, np.ndarray], num_samples: int) -> None:
        if self.strategy == "fedbuff":  # buffer_size=1, constant staleness: x + 1.0 * delta / 1
            self.tensors = {n: (d.astype(np.float64) + self.tensors[n]).astype(np.float32) for n, d in delta.items()}
            self.version += 1
            return
        self.round.append((client_id, delta, num_samples))
        if len(self.round) < 2:
            return
        (_, first, n1), (_, last, n2) = self.round
        scale = 1.0 / (float(n1) + n2)
        new = {}
        for name, x in self.tensors.items():
            total = last[name].astype(np.float64) * float(n2)
            total += first[name].astype(np.float64) * float(n1)
            total *= scale
            total += x
            new[name] = total.astype(x.dtype)
        self.tensors = new
        self.round = []
        self.version += 1

    def check(self, job: Job) -> None:
        snapshot = job.snapshot()
        assert snapshot.version == self.version, f"job {self.job_id!r} is at version {snapshot.version}, the acked updates make {self.version}"
        assert job.pending_updates == len(self.round), (job.pending_updates, len(self.round))
        assert job.stats.updates_accepted == len(self.accepted), f"job {self.job_id!r} counts {job.stats.updates_accepted} updates accepted, {len(self.accepted)} were acked"
        for name, expected in self.tensors.items():
            np.testing.assert_array_equal(snapshot.tensors[name], expected, err_msg=f"job {self.job_id!r} tensor {name!r}")


@dataclass
class SecureShadow:
    """A secure-aggregation job: its version moves only when an honest cohort
    completes, and its model stays bit-identical between cohorts."""

    job_id: str
    tensors: dict[str, np.ndarray]
    version: int = 0

    def cohort_applied(self, job: Job, expected: Mapping[str, np.ndarray]) -> None:
        snapshot = job.snapshot()
        assert snapshot.version == self.version + 1, (snapshot.version, self.version)
        for name, values in expected.items():
            np.testing.assert_allclose(snapshot.tensors[name], values, atol=1e-4, err_msg=f"cohort aggregate, tensor {name!r}")
        self.version = snapshot.version
        self.tensors = {n: np.array(t) for n, t in snapshot.tensors.items()}

    def check(self, job: Job) -> None:
        snapshot = job.snapshot()
        assert snapshot.version == self.version, f"secure job is at version {snapshot.version} with {self.version} cohorts completed"
        for name, expected in self.tensors.items():
            np.testing.assert_array_equal(snapshot.tensors[name], expected, err_msg=f"secure job tensor {name!r}")
