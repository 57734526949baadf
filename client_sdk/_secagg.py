"""The member side of the cohort protocol (see proto/secagg/protocol.py).

`CohortMember` is an explicit state machine: each operation is legal in one
state only (`MEMBER_STEPS`), checked before any work. A member never gives
the coordinator both the self-mask share and the mask-key share of the same
neighbour, and answers one unmasking request per cohort, so no request or
replay can make it reveal a neighbour's input.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from proto.secagg import keys, shamir
from proto.secagg.masks import MaskScratch, apply_mask
from proto.secagg.protocol import (
    CohortPlan,
    KeyAdvert,
    MaskedInput,
    ProtocolViolation,
    SealedShares,
    UnmaskRequest,
    UnmaskResponse,
    mask_info,
    share_key_info,
)
from proto.secagg.quantize import FixedPoint
from proto.secagg.sealing import associated_data, open_sealed, seal

SELF_MASK = b"self"
PAIR_MASK = b"pair"


class MemberState(enum.Enum):
    PLANNED = "planned"
    ADVERTISED = "advertised"
    SHARED = "shared"
    READY = "ready"  # holds its neighbours' shares, may upload
    UPLOADED = "uploaded"
    DONE = "done"
    ABORTED = "aborted"


MEMBER_STEPS: Mapping[str, tuple[MemberState, MemberState]] = {
    "advertise": (MemberState.PLANNED, MemberState.ADVERTISED),
    "share_keys": (MemberState.ADVERTISED, MemberState.SHARED),
    "receive_shares": (MemberState.SHARED, MemberState.READY),
    "masked_input": (MemberState.READY, MemberState.UPLOADED),
    "unmask": (MemberState.UPLOADED, MemberState.DONE),
}
"""operation -> (the state it needs, the state it leaves)."""


@dataclass(frozen=True)
class _HeldShares:
    self_mask: shamir.Share
    mask_key: shamir.Share


class CohortMember:
    def __init__(self, plan: CohortPlan) -> None:
        majority = (len(plan.neighbours) + 1) // 2 + 1
        if plan.threshold < majority or plan.threshold > len(plan.neighbours) + 1:
            raise ProtocolViolation(
                f"refusing a cohort plan with share threshold {plan.threshold}: with {len(plan.neighbours)} neighbours "
                f"it must be between {majority} (a majority) and {len(plan.neighbours) + 1}"
            )
        if not 2 <= plan.min_survivors <= len(plan.members):
            raise ProtocolViolation(f"refusing a cohort plan with min_survivors {plan.min_survivors}")
        self.plan = plan
        self.state = MemberState.PLANNED
        self._share_keys = keys.KeyPair.generate()
        self._mask_keys = keys.KeyPair.generate()
        self._self_seed = secrets.token_bytes(shamir.SECRET_BYTES)
        self._adverts: dict[int, KeyAdvert] = {}
        self._held: dict[int, _HeldShares] = {}
        self._masking_neighbours: tuple[int, ...] = ()
        self._own: _HeldShares | None = None
        self._fixed_point = FixedPoint(bits=plan.bits, scale=plan.scale, bound=plan.bound, max_summands=len(plan.members))
        self._weight_point = plan.weight_point(self._fixed_point)

    # -- steps -----------------------------------------------------------------

    def advertise(self) -> KeyAdvert:
        self._step("advertise")
        return KeyAdvert(self.plan.cohort_id, self.plan.member, self._share_keys.public, self._mask_keys.public)

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> SealedShares:
        """Shamir-share the self-mask seed and the mask private key among the
        neighbours that advertised keys, each share sealed for its receiver."""
        self._require("share_keys")
        for sender, advert in adverts.items():
            self._check_cohort(advert.cohort_id)
            if sender != advert.member or sender not in self.plan.neighbours:
                raise ProtocolViolation(f"member {sender} is not a neighbour of member {self.plan.member}")
        # the member holds a share of its own secrets too: as a survivor it can
        # hand in its own self-mask share, so one more neighbour may drop out
        holders = sorted([*adverts, self.plan.member])
        if len(holders) < self.plan.threshold:
            raise ProtocolViolation(
                f"only {len(holders) - 1} neighbours advertised keys; {self.plan.threshold - 1} are needed to share secrets"
            )
        self_shares = shamir.split(self._self_seed, threshold=self.plan.threshold, indices=holders)
        key_shares = shamir.split(self._mask_keys.private_bytes(), threshold=self.plan.threshold, indices=holders)
        sealed = {}
        for self_share, key_share in zip(self_shares, key_shares):
            receiver = self_share.index
            if receiver == self.plan.member:
                self._own = _HeldShares(self_share, key_share)
                continue
            key = keys.agree(self._share_keys.private, adverts[receiver].share_key, info=share_key_info(self.plan.cohort_id, self.plan.member, receiver))
            sealed[receiver] = seal(
                key,
                self_share.to_bytes() + key_share.to_bytes(),
                associated=associated_data(self.plan.cohort_id, self.plan.member, receiver),
            )
        self._adverts = dict(adverts)
        self._advance("share_keys")
        return SealedShares(self.plan.cohort_id, self.plan.member, sealed)

    def receive_shares(self, sealed_for_me: Mapping[int, bytes]) -> None:
        """Open the shares the neighbours that completed sharing sealed for this
        member; those neighbours are the ones its pairwise masks include. A
        broken tag raises sealing.VerificationFailed (and the member aborts)."""
        self._require("receive_shares")
        held = {}
        for sender, blob in sealed_for_me.items():
            advert = self._adverts.get(sender)
            if advert is None:
                raise ProtocolViolation(f"shares from member {sender}, which did not advertise keys to member {self.plan.member}")
            key = keys.agree(self._share_keys.private, advert.share_key, info=share_key_info(self.plan.cohort_id, sender, self.plan.member))
            try:
                plain = open_sealed(key, blob, associated=associated_data(self.plan.cohort_id, sender, self.plan.member))
            except Exception:
                self.state = MemberState.ABORTED
                raise
            half = len(plain) // 2
            held[sender] = _HeldShares(shamir.Share.from_bytes(plain[:half]), shamir.Share.from_bytes(plain[half:]))
        self._held = held
        self._masking_neighbours = tuple(sorted(held))
        self._advance("receive_shares")

    def masked_input(self, values: np.ndarray, weight: float, rng: np.random.Generator | None = None) -> MaskedInput:
        """Quantize [weight * values, weight] and add the self mask and the
        pairwise masks of the neighbours that completed sharing."""
        self._require("masked_input")
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if flat.size + 1 != self.plan.vector_length:
            raise ProtocolViolation(f"input has {flat.size} values; this cohort aggregates {self.plan.vector_length - 1}")
        # the weight is clipped like every value; cap it first, so w * delta is
        # scaled by the weight that is actually sent (no member counts for more than bound)
        weight = min(float(weight), self._weight_point.bound)
        weighted = np.empty(flat.size + 1, dtype=np.float64)
        np.multiply(flat, weight, out=weighted[:-1])
        weighted[-1] = weight
        rng = rng or np.random.default_rng()
        if self._weight_point is self._fixed_point:
            vector = self._fixed_point.encode(weighted, rng)
        else:  # the weight on its own grid (quantized cohorts)
            vector = np.empty(flat.size + 1, dtype=np.uint32)
            vector[:-1] = self._fixed_point.encode(weighted[:-1], rng)
            vector[-1:] = self._weight_point.encode(weighted[-1:], rng)
        bits = self.plan.bits
        scratch = MaskScratch()  # one keystream buffer for every mask: no new memory per neighbour
        apply_mask(vector, self._self_seed, bits=bits, purpose=SELF_MASK, scratch=scratch)
        for neighbour in self._masking_neighbours:
            # +mask towards higher-numbered neighbours, -mask towards lower: pairs cancel in the sum
            apply_mask(vector, self._pair_seed(neighbour), bits=bits, purpose=PAIR_MASK, subtract=self.plan.member > neighbour, scratch=scratch)
        self._advance("masked_input")
        return MaskedInput(self.plan.cohort_id, self.plan.member, vector)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Shares that let the coordinator remove masks: b_j of survivors, the
        mask key of dropped members; never both for one member, and only once."""
        self._require("unmask")
        self._check_cohort(request.cohort_id)
        both = request.survivors & request.dropped
        if both:
            self.state = MemberState.ABORTED
            raise ProtocolViolation(
                f"refusing to unmask: members {sorted(both)} are listed as both surviving and dropped, "
                "which would reveal their input"
            )
        if len(request.survivors) < self.plan.min_survivors:
            self.state = MemberState.ABORTED
            raise ProtocolViolation(
                f"refusing to unmask: {len(request.survivors)} survivors, fewer than the cohort's {self.plan.min_survivors}"
            )
        if self.plan.member not in request.survivors:
            self.state = MemberState.ABORTED
            raise ProtocolViolation(f"refusing to unmask: member {self.plan.member} uploaded but is not listed as a survivor")
        self_mask_shares = {j: self._held[j].self_mask.to_bytes() for j in self._held if j in request.survivors}
        if self._own is not None:
            self_mask_shares[self.plan.member] = self._own.self_mask.to_bytes()
        mask_key_shares = {j: self._held[j].mask_key.to_bytes() for j in self._held if j in request.dropped}
        self._advance("unmask")
        return UnmaskResponse(self.plan.cohort_id, self.plan.member, self_mask_shares, mask_key_shares)

    def abort(self) -> None:
        self.state = MemberState.ABORTED

    # -- helpers ---------------------------------------------------------------

    def _pair_seed(self, neighbour: int) -> bytes:
        return keys.agree(self._mask_keys.private, self._adverts[neighbour].mask_key, info=mask_info(self.plan.cohort_id, self.plan.member, neighbour))

    def _check_cohort(self, cohort_id: str) -> None:
        if cohort_id != self.plan.cohort_id:
            raise ProtocolViolation(f"message for cohort {cohort_id!r} sent to a member of cohort {self.plan.cohort_id!r}")

    def _require(self, operation: str) -> None:
        needed, _ = MEMBER_STEPS[operation]
        if self.state is not needed:
            raise ProtocolViolation(f"{operation} is not allowed when the member is {self.state.value} (it needs {needed.value})")

    def _step(self, operation: str) -> None:
        self._require(operation)
        self._advance(operation)

    def _advance(self, operation: str) -> None:
        self.state = MEMBER_STEPS[operation][1]
