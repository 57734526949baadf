"""One update through a secure-aggregation cohort, over gRPC.

`SecureRound.start()` returns at once: joining a cohort, key advertisement
and share exchange run in a background thread, so the member trains while its
cohort forms and sets up; `submit()` then learns the job's current version, computes the member's
own weight w = s(tau) * n_samples, and uploads [w * delta, w] masked, then
answers the unmasking request. Cohort RPCs are not retried: a member that
lost a step is dropped by its cohort, which completes without it or aborts;
either way the member joins a later cohort (the caller retrains).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from client_sdk._client import Client
from client_sdk._errors import CohortAborted, NotAuthenticated, PermissionDenied, ServerUnavailable, TributaryError
from client_sdk._secagg import CohortMember
from proto import staleness
from proto import tributary_pb2 as pb
from proto.secagg.quantize import masked_dtype
from proto.secagg.protocol import CohortPlan, KeyAdvert, ProtocolViolation, UnmaskRequest
from proto.secagg.sealing import VerificationFailed
from proto.tensors import iter_chunks

logger = logging.getLogger("tributary.client")

JOIN_WAIT_S = 10.0


@dataclass(frozen=True)
class CohortReceipt:
    version: int  # the version that includes the cohort's aggregate
    staleness: int
    weight: float


class SecureRound:
    def __init__(self, client: Client, *, join_timeout_s: float = 600.0) -> None:
        self._client = client
        self._join_timeout_s = join_timeout_s
        self._member: CohortMember | None = None
        self._ref: pb.MemberRef | None = None
        self._rule: pb.StalenessRule | None = None
        self._setup: threading.Thread | None = None
        self._setup_error: BaseException | None = None

    def start(self) -> None:
        """Join a cohort and set up its keys in the background."""
        self._setup = threading.Thread(target=self._join_and_set_up, name="tributary-secagg-setup", daemon=True)
        self._setup.start()

    def _join_and_set_up(self) -> None:
        try:
            self._join_cohort()
        except BaseException as error:  # handed to submit(), which raises it on the caller's thread
            self._setup_error = error
            return
        self._set_up_keys()

    def _join_cohort(self) -> None:
        plan_message = self._join()
        plan = plan_of(plan_message)
        try:
            self._member = CohortMember(plan)
        except ProtocolViolation as error:
            raise CohortAborted(str(error)) from error
        self._rule = plan_message.staleness
        self._ref = pb.MemberRef(job_id=self._client.job, cohort_id=plan.cohort_id, member=plan.member, token=plan_message.token)
        logger.info(
            "joined cohort as member %d of %d", plan.member, len(plan_message.members), extra=self._client.log_context(cohort=plan.cohort_id)
        )

    def submit(self, base_version: int, delta: np.ndarray, num_samples: int, energy_joules: float = 0.0) -> CohortReceipt:
        """Upload the masked, weighted delta (flat, model order) and unmask;
        `energy_joules` travels in the upload's header."""
        if self._setup is None:
            raise RuntimeError("call start() before submit()")
        self._setup.join()
        if isinstance(self._setup_error, (CohortAborted, NotAuthenticated, PermissionDenied)):
            # an auth refusal is not this cohort's failure: another cohort would be refused too
            raise self._setup_error
        if isinstance(self._setup_error, (TributaryError, ProtocolViolation, VerificationFailed, ValueError)):
            # whatever went wrong in key setup, this cohort is lost to us: join another
            raise CohortAborted(f"key setup failed: {self._setup_error}") from self._setup_error
        if self._setup_error is not None:
            raise self._setup_error
        member, ref, rule = self._member, self._ref, self._rule
        assert member is not None and ref is not None and rule is not None
        stub = self._client._stub
        version = self._call("get an upload slot", partial(stub.GetUploadSlot, ref)).version
        tau = version - base_version
        weight = _weight(rule, tau, num_samples)
        if weight == 0.0:
            delta = np.zeros_like(delta)  # too stale: take part (the cohort needs us) but add nothing
        masked = member.masked_input(delta, weight)

        header = pb.MemberRef()
        header.CopyFrom(ref)
        header.energy_joules = energy_joules

        def requests() -> Iterator[pb.MaskedInputRequest]:
            yield pb.MaskedInputRequest(header=header)
            # at the ring's width: a quantized cohort's 11-bit ring travels as uint16, half of uint32
            for data in iter_chunks([masked.vector.astype(masked_dtype(member.plan.bits)).view(np.uint8)]):
                request = pb.MaskedInputRequest()
                request.chunk.data = data
                yield request

        unmask = self._call("upload the masked input", lambda: stub.UploadMasked(requests(), timeout=self._client.timeout_s + 600))
        response = member.unmask(UnmaskRequest(ref.cohort_id, frozenset(unmask.survivors), frozenset(unmask.dropped)))
        outcome = self._call(
            "unmask",
            partial(
                stub.Unmask,
                pb.UnmaskResponseMessage(
                    sender=ref,
                    self_mask_shares=[pb.SealedShare(peer=p, blob=b) for p, b in response.self_mask_shares.items()],
                    mask_key_shares=[pb.SealedShare(peer=p, blob=b) for p, b in response.mask_key_shares.items()],
                ),
            ),
            retry_transient=True,
        )
        logger.debug(
            "cohort finished: masked input counted, staleness %d (weight %.3g)", tau, weight,
            extra=self._client.log_context(outcome.version, ref.cohort_id),
        )  # fmt: skip
        return CohortReceipt(outcome.version, tau, weight)

    # -- internals -------------------------------------------------------------------

    def _join(self) -> pb.CohortPlanMessage:
        import time

        deadline = time.monotonic() + self._join_timeout_s
        request = pb.JoinCohortRequest(job_id=self._client.job, client_id=self._client.client_id, wait_timeout_ms=int(JOIN_WAIT_S * 1000))
        while True:
            plan: pb.CohortPlanMessage = self._client._with_retries(
                "join a cohort", lambda: self._client._stub.JoinCohort(request, timeout=JOIN_WAIT_S + 30)
            )
            if plan.formed:
                return plan
            if time.monotonic() >= deadline:
                raise CohortAborted(f"no cohort formed for job {self._client.job!r} within {self._join_timeout_s:.0f}s")

    def _set_up_keys(self) -> None:
        member, ref = self._member, self._ref
        assert member is not None and ref is not None
        stub = self._client._stub
        try:
            advert = member.advertise()
            keys = self._call(
                "advertise keys",
                partial(stub.AdvertiseKeys, pb.KeyAdvertMessage(sender=ref, share_key=advert.share_key, mask_key=advert.mask_key)),
            )
            adverts = {k.member: KeyAdvert(ref.cohort_id, k.member, k.share_key, k.mask_key) for k in keys.keys}
            sealed = member.share_keys(adverts)
            mine = self._call(
                "share keys",
                partial(
                    stub.ShareKeys,
                    pb.SealedSharesMessage(sender=ref, shares=[pb.SealedShare(peer=p, blob=b) for p, b in sealed.sealed.items()]),
                ),
            )
            member.receive_shares({s.peer: s.blob for s in mine.shares})
        except BaseException as error:  # handed to submit(), which raises it on the caller's thread
            member.abort()
            self._setup_error = error

    def _call(self, doing: str, call, *, retry_transient: bool = False):  # type: ignore[no-untyped-def]
        # Not retried on transient failures (see the module docstring), but a
        # refusal with a server pushback (all stream slots taken) happened
        # before the server read anything, so it is safe to repeat. Unmask is
        # the exception (`retry_transient`): the server answers a repeated one
        # with the version the cohort went into, even after a restart, so a
        # member whose answer was lost learns its update counted.
        timed = partial(call, timeout=self._client.timeout_s + 600) if isinstance(call, partial) else call
        try:
            return self._client._with_retries(f"{doing} in a cohort", timed, transient=retry_transient)
        except ServerUnavailable as error:
            # A cohort lives in the server's memory: a server that went away
            # (restart, crash) took it along, and a retry would only be told
            # so. The cohort is over for this member; it joins a new one.
            raise CohortAborted(f"lost the server while trying to {doing}; this cohort is over, join a new one ({error})") from None


def plan_of(message: pb.CohortPlanMessage) -> CohortPlan:
    """The member's plan, from the server's answer to JoinCohort."""
    return CohortPlan(
        cohort_id=message.cohort_id,
        member=message.member,
        members=tuple(message.members),
        neighbours=tuple(message.neighbours),
        threshold=message.threshold,
        min_survivors=message.min_survivors,
        bits=message.bits,
        scale=message.scale,
        bound=message.bound,
        vector_length=message.vector_length,
        weight_scale=message.weight_scale,
        weight_bound=message.weight_bound,
    )


def _weight(rule: pb.StalenessRule, tau: int, num_samples: int) -> float:
    """w = s(tau) * n_samples, or 0 past max_staleness (the server cannot check
    this under secure aggregation; an honest member applies the job's rule)."""
    if rule.max_staleness and tau > rule.max_staleness:
        return 0.0
    if rule.kind == "constant":
        factor = staleness.constant(tau)
    elif rule.kind == "polynomial":
        factor = staleness.polynomial(tau, rule.a)
    elif rule.kind == "hinge":
        factor = staleness.hinge(tau, rule.a, rule.b)
    else:
        raise TributaryError(f"the server sent an unknown staleness function {rule.kind!r}")
    return factor * num_samples
