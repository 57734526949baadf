"""The coordinator side of the cohort protocol (see proto/secagg/protocol.py).

`CohortCoordinator` holds one cohort: it forms it, routes keys and sealed
shares between neighbours, collects masked inputs, asks the survivors for the
shares that remove masks, and recovers only sum(w * delta) and sum(w). It
never holds an individual update in the clear: every vector it handles is a
masked input or a sum of masked inputs (`observe`, a test hook, sees each).

Phases close either when every expected member has answered or when the
caller decides a deadline passed (`close_phase`); members who did not answer
by then are dropped. Fewer than `min_survivors` left at any close, or a secret
that cannot be rebuilt, aborts the cohort: nothing is applied.

No gRPC here; the servicer drives it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from proto.secagg import keys, shamir
from proto.secagg.masks import MaskScratch, apply_mask
from proto.secagg.protocol import (
    CohortPlan,
    KeyAdvert,
    MaskedInput,
    MessageKind,
    Phase,
    ProtocolViolation,
    SealedShares,
    UnmaskRequest,
    UnmaskResponse,
    check_accepts,
    check_transition,
    connected,
    mask_info,
    neighbour_graph,
    share_threshold,
)
from proto.secagg.quantize import FixedPoint

SELF_MASK = b"self"
PAIR_MASK = b"pair"


class CohortAborted(Exception):
    """The cohort cannot complete; nothing from it is applied."""


@dataclass(frozen=True)
class CohortResult:
    weighted_sum: np.ndarray  # float64, sum over survivors of w_i * delta_i
    weight_sum: float  # sum over survivors of w_i
    survivors: frozenset[int]


class CohortCoordinator:
    def __init__(
        self,
        cohort_id: str,
        members: Sequence[int],
        *,
        neighbours: int,
        min_survivors: int,
        fixed_point: FixedPoint,
        vector_length: int,
        weight_point: FixedPoint | None = None,
        observe: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        if len(set(members)) != len(members) or any(m < 1 for m in members):
            raise ValueError("members must be distinct positive integers")
        if not 1 <= min_survivors <= len(members):
            raise ValueError(f"min_survivors must be in [1, {len(members)}], got {min_survivors}")
        self.cohort_id = cohort_id
        self.members = tuple(members)
        self.graph = neighbour_graph(self.members, neighbours, cohort_id.encode())
        degree = min(len(n) for n in self.graph.values())
        # shares go to each member's neighbours and to itself (k + 1 holders)
        self.threshold = share_threshold(degree + 1)
        self.min_survivors = min_survivors
        self.fixed_point = fixed_point
        self.weight_point = weight_point
        """The weight element's own fixed point (quantized cohorts); None: fixed_point's."""
        if weight_point is not None and (weight_point.bits, weight_point.max_summands) != (fixed_point.bits, fixed_point.max_summands):
            raise ValueError("the weight's fixed point must share the values' ring and summand count")
        self.vector_length = vector_length
        self.phase = Phase.CHECK_IN
        self.abort_reason: str | None = None
        self._observe = observe or (lambda _label, _vector: None)
        self._adverts: dict[int, KeyAdvert] = {}
        self._sealed: dict[int, SealedShares] = {}
        self._inputs: dict[int, np.ndarray] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self.advertised: frozenset[int] = frozenset()
        self.shared: frozenset[int] = frozenset()
        self.uploaded: frozenset[int] = frozenset()

    # -- forming -----------------------------------------------------------------

    def plans(self) -> dict[int, CohortPlan]:
        """Start key advertisement; the plan each member receives."""
        self._advance(Phase.ADVERTISE_KEYS)
        return {
            member: CohortPlan(
                cohort_id=self.cohort_id,
                member=member,
                members=self.members,
                neighbours=self.graph[member],
                threshold=self.threshold,
                min_survivors=self.min_survivors,
                bits=self.fixed_point.bits,
                scale=self.fixed_point.scale,
                bound=self.fixed_point.bound,
                vector_length=self.vector_length,
                weight_scale=self.weight_point.scale if self.weight_point is not None else 0.0,
                weight_bound=self.weight_point.bound if self.weight_point is not None else 0.0,
            )
            for member in self.members
        }

    # -- receiving -----------------------------------------------------------------

    def receive_advert(self, advert: KeyAdvert) -> None:
        self._check(MessageKind.KEY_ADVERT, advert.cohort_id, advert.member, self.members, self._adverts)
        if len(advert.share_key) != keys.KEY_BYTES or len(advert.mask_key) != keys.KEY_BYTES:
            raise ProtocolViolation("public keys must be 32-byte X25519 keys")
        for name, public in (("share_key", advert.share_key), ("mask_key", advert.mask_key)):
            try:
                keys.check_public_key(public)
            except ValueError as error:
                # refused now: forwarded, it would fail every neighbour's key agreement
                # and the cohort would die only at the phase deadline
                raise ProtocolViolation(
                    f"member {advert.member}'s {name} cannot be used: {error}; advertise the public key of a freshly generated X25519 key pair"
                ) from None
        self._adverts[advert.member] = advert

    def receive_shares(self, shares: SealedShares) -> None:
        self._check(MessageKind.SEALED_SHARES, shares.cohort_id, shares.sender, self.advertised, self._sealed)
        expected = set(self.graph[shares.sender]) & self.advertised
        if set(shares.sealed) != expected:
            raise ProtocolViolation(
                f"member {shares.sender} must send one sealed share to each of its advertised neighbours {sorted(expected)}"
            )
        self._sealed[shares.sender] = shares

    def receive_input(self, masked: MaskedInput) -> None:
        self._check(MessageKind.MASKED_INPUT, masked.cohort_id, masked.member, self.shared, self._inputs)
        vector = masked.vector
        if vector.dtype != np.uint32 or vector.shape != (self.vector_length,):
            raise ProtocolViolation(
                f"masked input of member {masked.member} has {vector.size} {vector.dtype} values; "
                f"this cohort takes {self.vector_length} uint32 values"
            )
        if self.fixed_point.bits < 32 and int(vector.max(initial=0)) >= 1 << self.fixed_point.bits:
            raise ProtocolViolation(f"masked input of member {masked.member} has values outside Z_2^{self.fixed_point.bits}")
        self._observe(f"input/{masked.member}", vector)
        self._inputs[masked.member] = vector

    def receive_unmask(self, response: UnmaskResponse) -> None:
        self._check(MessageKind.UNMASK_RESPONSE, response.cohort_id, response.member, self.uploaded, self._responses)
        dropped = self.shared - self.uploaded
        if not set(response.self_mask_shares) <= set(self.uploaded) or not set(response.mask_key_shares) <= dropped:
            raise ProtocolViolation(
                f"member {response.member} sent shares for members outside the survivors / dropped lists it was given"
            )
        for blob in [*response.self_mask_shares.values(), *response.mask_key_shares.values()]:
            try:
                shamir.Share.from_bytes(blob)
            except ValueError as error:
                raise ProtocolViolation(f"member {response.member} sent a malformed share: {error}") from None
        self._responses[response.member] = response

    # -- closing phases -------------------------------------------------------------

    def close_advertising(self) -> dict[int, dict[int, KeyAdvert]]:
        """Members that advertised keys go on; each learns its neighbours' keys."""
        self.advertised = frozenset(self._adverts)
        self._require_survivors(self.advertised, "advertised keys")
        self._advance(Phase.SHARE_KEYS)
        return {m: {n: self._adverts[n] for n in self.graph[m] if n in self.advertised} for m in self.advertised}

    def close_sharing(self) -> dict[int, dict[int, bytes]]:
        """Members that sent their shares go on; each receives the shares
        sealed for it by the others that did."""
        self.shared = frozenset(self._sealed)
        self._require_survivors(self.shared, "shared their keys")
        self._advance(Phase.MASKED_INPUT)
        return {
            m: {s: self._sealed[s].sealed[m] for s in self.graph[m] if s in self.shared and m in self._sealed[s].sealed}
            for m in self.shared
        }

    def close_input(self) -> UnmaskRequest:
        self.uploaded = frozenset(self._inputs)
        self._require_survivors(self.uploaded, "uploaded a masked input")
        if not connected(self.uploaded, self.graph):
            # a group of survivors without a neighbour among the others could be
            # unmasked on its own: its partial sum would be revealed
            self._fail("the survivors are split into groups with no neighbours in common")
        self._advance(Phase.UNMASKING)
        return UnmaskRequest(self.cohort_id, self.uploaded, self.shared - self.uploaded)

    def finish(self) -> CohortResult:
        """Rebuild the secrets, remove every mask, decode the sum. The cohort
        stays in UNMASKING until `complete()` (or `abort()`)."""
        responders = frozenset(self._responses)
        self._require_survivors(responders, "answered the unmasking request")
        bits = self.fixed_point.bits
        total = np.zeros(self.vector_length, dtype=np.uint32)
        for vector in self._inputs.values():
            np.add(total, vector, out=total)  # uint32 wraps mod 2^32; reduced to 2^bits below
        if bits < 32:
            total &= np.uint32((1 << bits) - 1)
        scratch = MaskScratch()  # every mask goes through one keystream buffer, in place
        for member in sorted(self.uploaded):
            seed = self._rebuild(member, "self_mask_shares")
            apply_mask(total, seed, bits=bits, purpose=SELF_MASK, subtract=True, scratch=scratch)
        for dropped in sorted(self.shared - self.uploaded):
            private = self._rebuild(dropped, "mask_key_shares")
            for survivor in self.graph[dropped]:
                if survivor not in self.uploaded:
                    continue
                seed = keys.agree_from_private_bytes(private, self._adverts[survivor].mask_key, info=mask_info(self.cohort_id, dropped, survivor))
                # the survivor added +mask if survivor < dropped, else -mask: undo it
                apply_mask(total, seed, bits=bits, purpose=PAIR_MASK, subtract=survivor < dropped, scratch=scratch)
        self._observe("sum", total)
        decoded = self.fixed_point.decode(total)
        if self.weight_point is not None:
            decoded[-1:] = self.weight_point.decode(total[-1:])
        self._inputs.clear()  # the masked inputs are no longer needed; free them
        return CohortResult(decoded[:-1], float(decoded[-1]), self.uploaded)

    def complete(self) -> None:
        """The caller applied the result; until then the cohort can still abort."""
        self._advance(Phase.COMPLETED)

    def abort(self, reason: str) -> None:
        if self.phase in (Phase.COMPLETED, Phase.ABORTED):
            return
        self.abort_reason = reason
        self.phase = Phase.ABORTED
        self._inputs.clear()

    # -- internals -------------------------------------------------------------

    def _rebuild(self, owner: int, field: str) -> bytes:
        shares = []
        for holder, response in self._responses.items():
            blob = getattr(response, field).get(owner)
            if blob is not None and (holder in self.graph[owner] or holder == owner):
                shares.append(shamir.Share.from_bytes(blob))
        if len(shares) < self.threshold:
            self._fail(f"only {len(shares)} of the {self.threshold} shares needed to remove member {owner}'s mask arrived")
        try:
            return shamir.combine(shares, threshold=self.threshold)
        except ValueError as error:
            self._fail(f"shares of member {owner} are inconsistent: {error}")
            raise  # unreachable: _fail raises

    def _check(self, kind: MessageKind, cohort_id: str, sender: int, allowed: Sequence[int] | frozenset[int], seen: Mapping[int, object]) -> None:
        if cohort_id != self.cohort_id:
            raise ProtocolViolation(f"message for cohort {cohort_id!r} sent to cohort {self.cohort_id!r} (a replay?)")
        check_accepts(self.phase, kind)
        if sender not in allowed:
            raise ProtocolViolation(f"member {sender} may not send {kind.value} in cohort {self.cohort_id!r} now")
        if sender in seen:
            raise ProtocolViolation(f"member {sender} already sent its {kind.value} (a replay?)")

    def _require_survivors(self, group: frozenset[int], did: str) -> None:
        if len(group) < self.min_survivors:
            self._fail(f"only {len(group)} members {did}; the cohort needs {self.min_survivors}")

    def _fail(self, reason: str) -> None:
        self.abort(reason)
        raise CohortAborted(f"cohort {self.cohort_id!r} aborted: {reason}")

    def _advance(self, target: Phase) -> None:
        check_transition(self.phase, target)
        self.phase = target
