"""Three honest secure-aggregation members, driven one phase at a time so the
fuzz can send out-of-order and forged protocol messages between phases while
the cohort is in a known phase, and beside the phases while they run."""

from __future__ import annotations

import threading
from functools import partial
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np

from client_sdk._secagg import CohortMember
from client_sdk._secure import plan_of
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.secagg.protocol import KeyAdvert, UnmaskRequest
from proto.tensors import iter_chunks

T = TypeVar("T")
HONEST_TIMEOUT_S = 15.0
STEPS = ("join", "advertise", "share", "upload", "unmask")
PHASE_AFTER = {"join": "advertise_keys", "advertise": "share_keys", "share": "masked_input", "upload": "unmasking", "unmask": "completed"}


class HonestCohort:
    def __init__(self, channel: grpc.Channel, job_id: str, serial: int, deltas: list[np.ndarray], samples: list[int]) -> None:
        self._stub = pb_grpc.TributaryStub(channel)  # type: ignore[no-untyped-call]
        self.job_id = job_id
        self.client_ids = [f"honest-{serial}-{i}" for i in range(len(deltas))]
        self.deltas = deltas
        self.samples = samples
        self.phase = "check_in"
        self.cohort_id = ""
        self.refs: list[pb.MemberRef] = []
        self.vector_length = 0
        self.version: int | None = None
        self.unmask_outcomes: list[int | grpc.RpcError] = []
        """Per member: the version the cohort made, or the error. Someone else
        holding a member's token may have answered for it (see test_fuzz_rpcs)."""
        self._members: list[CohortMember] = []
        self._adverts: list[dict[int, KeyAdvert]] = []
        self._unmask_requests: list[pb.UnmaskRequestMessage] = []
        self._steps: Iterator[str] = iter(STEPS)

    @property
    def done(self) -> bool:
        return self.phase == "completed"

    @property
    def next_step(self) -> str | None:
        return {"check_in": "join", **{phase: STEPS[i + 1] for i, phase in enumerate(PHASE_AFTER.values()) if i + 1 < len(STEPS)}}.get(self.phase)

    def step(self) -> None:
        """Run the next protocol step for every member at once; each call waits
        for the others, as real members' calls do."""
        name = next(self._steps)
        getattr(self, f"_step_{name}")()
        self.phase = PHASE_AFTER[name]

    def expected_aggregate(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """fedbuff over one cohort, constant staleness: x + sum(n_i d_i) / sum(n_i)."""
        flat = np.sum([n * d.astype(np.float64) for n, d in zip(self.samples, self.deltas)], axis=0) / sum(self.samples)
        out, offset = {}, 0
        for name, x in model.items():
            out[name] = x + flat[offset : offset + x.size].reshape(x.shape)
            offset += x.size
        return out

    # -- steps ---------------------------------------------------------------------

    def _step_join(self) -> None:
        def join(client_id: str) -> pb.CohortPlanMessage:
            request = pb.JoinCohortRequest(job_id=self.job_id, client_id=client_id, wait_timeout_ms=10_000)
            plan: pb.CohortPlanMessage = self._stub.JoinCohort(request, timeout=HONEST_TIMEOUT_S)
            return plan

        plans = _in_parallel([partial(join, c) for c in self.client_ids])
        assert all(p.formed for p in plans) and len({p.cohort_id for p in plans}) == 1, plans
        self.cohort_id = plans[0].cohort_id
        self.vector_length = plans[0].vector_length
        for plan in plans:
            self._members.append(CohortMember(plan_of(plan)))
            self.refs.append(pb.MemberRef(job_id=self.job_id, cohort_id=plan.cohort_id, member=plan.member, token=plan.token))

    def _step_advertise(self) -> None:
        def advertise(member: CohortMember, ref: pb.MemberRef) -> dict[int, KeyAdvert]:
            advert = member.advertise()
            keys = self._stub.AdvertiseKeys(
                pb.KeyAdvertMessage(sender=ref, share_key=advert.share_key, mask_key=advert.mask_key), timeout=HONEST_TIMEOUT_S
            )
            return {k.member: KeyAdvert(self.cohort_id, k.member, k.share_key, k.mask_key) for k in keys.keys}

        self._adverts = _in_parallel([partial(advertise, m, r) for m, r in zip(self._members, self.refs)])

    def _step_share(self) -> None:
        def share(member: CohortMember, ref: pb.MemberRef, adverts: dict[int, KeyAdvert]) -> None:
            sealed = member.share_keys(adverts)
            mine = self._stub.ShareKeys(
                pb.SealedSharesMessage(sender=ref, shares=[pb.SealedShare(peer=p, blob=b) for p, b in sealed.sealed.items()]),
                timeout=HONEST_TIMEOUT_S,
            )
            member.receive_shares({s.peer: s.blob for s in mine.shares})

        _in_parallel([partial(share, m, r, a) for m, r, a in zip(self._members, self.refs, self._adverts)])

    def _step_upload(self) -> None:
        def upload(member: CohortMember, ref: pb.MemberRef, delta: np.ndarray, samples: int) -> pb.UnmaskRequestMessage:
            self.version = self._stub.GetUploadSlot(ref, timeout=HONEST_TIMEOUT_S).version
            vector = member.masked_input(delta, float(samples)).vector
            requests = [pb.MaskedInputRequest(header=ref)] + [pb.MaskedInputRequest(chunk=pb.Chunk(data=c)) for c in iter_chunks([vector])]
            response: pb.UnmaskRequestMessage = self._stub.UploadMasked(iter(requests), timeout=HONEST_TIMEOUT_S)
            return response

        self._unmask_requests = _in_parallel(
            [partial(upload, m, r, d, n) for m, r, d, n in zip(self._members, self.refs, self.deltas, self.samples)]
        )

    def _step_unmask(self) -> None:
        def unmask(member: CohortMember, ref: pb.MemberRef, request: pb.UnmaskRequestMessage) -> int:
            response = member.unmask(UnmaskRequest(self.cohort_id, frozenset(request.survivors), frozenset(request.dropped)))
            outcome = self._stub.Unmask(
                pb.UnmaskResponseMessage(
                    sender=ref,
                    self_mask_shares=[pb.SealedShare(peer=p, blob=b) for p, b in response.self_mask_shares.items()],
                    mask_key_shares=[pb.SealedShare(peer=p, blob=b) for p, b in response.mask_key_shares.items()],
                ),
                timeout=HONEST_TIMEOUT_S,
            )
            return int(outcome.version)

        self.unmask_outcomes = _in_parallel(
            [partial(unmask, m, r, u) for m, r, u in zip(self._members, self.refs, self._unmask_requests)],
            tolerate=grpc.RpcError,
        )


def _in_parallel(calls: list[Callable[[], T]], tolerate: type[BaseException] | None = None) -> list[Any]:
    """Each call's result, or the `tolerate` error it raised; any other error fails."""
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as error:  # handed back to the caller below
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HONEST_TIMEOUT_S + 5)
    errors = [r for r in results if isinstance(r, BaseException) and not (tolerate and isinstance(r, tolerate))]
    if errors:
        raise AssertionError(f"an honest member failed: {errors!r}") from errors[0]
    return results
