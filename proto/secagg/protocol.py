"""The cohort protocol both sides follow: phases, which message each phase
accepts, the neighbour graph, and the message types.

A cohort moves through its phases in one direction only:

    CHECK_IN -> ADVERTISE_KEYS -> SHARE_KEYS -> MASKED_INPUT -> UNMASKING -> COMPLETED
        (any phase before COMPLETED) -> ABORTED

`PHASE_TRANSITIONS` is that table; `ACCEPTS` says which member message each
phase takes. Coordinator and members both check every message against them
before any work, and tests try every illegal pair.

Double masking (Bonawitz et al. 2017) over the sparse neighbour graph of
SecAgg+ (Bell et al. 2020): member i adds its self mask PRG(b_i) and, for each
neighbour j, +PRG(s_ij) if i < j else -PRG(s_ij), where s_ij comes from X25519
agreement between the members' mask keys. Each member Shamir-shares b_i and
its mask private key among its neighbours only, so its cost grows with the
number of neighbours k, not with the cohort size n.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from proto.secagg.quantize import FixedPoint


class Phase(enum.Enum):
    CHECK_IN = "check_in"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    COMPLETED = "completed"
    ABORTED = "aborted"


PHASE_TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.CHECK_IN: frozenset({Phase.ADVERTISE_KEYS, Phase.ABORTED}),
    Phase.ADVERTISE_KEYS: frozenset({Phase.SHARE_KEYS, Phase.ABORTED}),
    Phase.SHARE_KEYS: frozenset({Phase.MASKED_INPUT, Phase.ABORTED}),
    Phase.MASKED_INPUT: frozenset({Phase.UNMASKING, Phase.ABORTED}),
    Phase.UNMASKING: frozenset({Phase.COMPLETED, Phase.ABORTED}),
    Phase.COMPLETED: frozenset(),
    Phase.ABORTED: frozenset(),
}


class MessageKind(enum.Enum):
    KEY_ADVERT = "key_advert"
    SEALED_SHARES = "sealed_shares"
    MASKED_INPUT = "masked_input"
    UNMASK_RESPONSE = "unmask_response"


ACCEPTS: Mapping[Phase, MessageKind] = {
    Phase.ADVERTISE_KEYS: MessageKind.KEY_ADVERT,
    Phase.SHARE_KEYS: MessageKind.SEALED_SHARES,
    Phase.MASKED_INPUT: MessageKind.MASKED_INPUT,
    Phase.UNMASKING: MessageKind.UNMASK_RESPONSE,
}
"""The one member message each phase accepts; any other is out of phase."""


class ProtocolViolation(Exception):
    """A message that the protocol does not allow here: wrong phase, wrong
    cohort, a replay, wrong length, a request a member must refuse."""


def check_transition(current: Phase, target: Phase) -> None:
    if target not in PHASE_TRANSITIONS[current]:
        raise ProtocolViolation(f"a cohort cannot go from {current.value} to {target.value}")


def check_accepts(phase: Phase, kind: MessageKind) -> None:
    if ACCEPTS.get(phase) is not kind:
        raise ProtocolViolation(f"{kind.value} is not accepted in phase {phase.value}")


def default_neighbour_count(cohort_size: int) -> int:
    """About 2 log2(n), as SecAgg+ suggests; everyone when the cohort is small."""
    if cohort_size < 2:
        return 0
    return min(cohort_size - 1, 2 * math.ceil(math.log2(cohort_size)))


def neighbour_graph(members: Sequence[int], neighbours: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """An undirected graph in which each member has `neighbours` neighbours
    (rounded up to even, or everyone): members are placed on a ring in an
    order drawn from `seed` and joined to the k/2 nearest on each side
    (a Harary graph). k >= n - 1 gives the complete graph of classic SecAgg."""
    n = len(members)
    if neighbours >= n - 1:
        return {m: tuple(sorted(o for o in members if o != m)) for m in members}
    half = math.ceil(neighbours / 2)
    order = list(members)
    random.Random(hashlib.sha256(seed).digest()).shuffle(order)
    graph: dict[int, set[int]] = {m: set() for m in members}
    for position, member in enumerate(order):
        for step in range(1, half + 1):
            other = order[(position + step) % n]
            graph[member].add(other)
            graph[other].add(member)
    return {m: tuple(sorted(graph[m])) for m in members}


def share_threshold(holders: int) -> int:
    """Shares of a member's secrets needed to rebuild them: a majority of the
    holders (its neighbours and itself), so no minority of colluding
    neighbours can rebuild them."""
    return holders // 2 + 1


def fewest_safe_survivors(cohort_size: int, neighbours: int) -> int:
    """The least min_survivors for which any cohort with that many survivors
    completes, wherever the dropouts fall: every member's secrets keep a
    majority of their k + 1 holders (n - t <= k + 1 - threshold), and the
    survivors stay connected on the k-connected Harary graph (n - t < k), so
    the server can remove masks only from the whole survivors' sum."""
    if neighbours >= cohort_size - 1:
        neighbours = cohort_size - 1
    tolerable = neighbours + 1 - share_threshold(neighbours + 1)
    return max(2, cohort_size - tolerable)


def default_min_survivors(cohort_size: int, neighbours: int) -> int:
    """t by default: a majority of the cohort, and `fewest_safe_survivors`, so
    that any t survivors complete the cohort. A lower t (down to a majority)
    still never reveals less than the survivors' whole sum (the coordinator
    checks the survivors are connected), but completes only if no member lost
    a majority of its share holders: near certain for few dropouts spread at
    random, and the cohort aborts cleanly otherwise."""
    neighbours = min(neighbours, cohort_size - 1)
    return min(cohort_size, max(cohort_size // 2 + 1, fewest_safe_survivors(cohort_size, neighbours)))


def connected(members: frozenset[int], graph: Mapping[int, Sequence[int]]) -> bool:
    """Whether `members` form one piece of `graph` restricted to them."""
    if not members:
        return True
    start = min(members)
    seen = {start}
    frontier = [start]
    while frontier:
        for other in graph[frontier.pop()]:
            if other in members and other not in seen:
                seen.add(other)
                frontier.append(other)
    return seen == set(members)


def mask_info(cohort_id: str, a: int, b: int) -> bytes:
    """HKDF info for the pairwise mask seed of members a and b (symmetric)."""
    low, high = sorted((a, b))
    return b"tributary.secagg.v1/pair/" + cohort_id.encode() + b"/" + f"{low}/{high}".encode()


def share_key_info(cohort_id: str, a: int, b: int) -> bytes:
    """HKDF info for the key that encrypts shares between a and b (symmetric)."""
    low, high = sorted((a, b))
    return b"tributary.secagg.v1/shares/" + cohort_id.encode() + b"/" + f"{low}/{high}".encode()


@dataclass(frozen=True)
class CohortPlan:
    """What the coordinator tells each member once the cohort is formed."""

    cohort_id: str
    member: int
    members: tuple[int, ...]
    neighbours: tuple[int, ...]
    threshold: int
    min_survivors: int
    bits: int
    scale: float
    bound: float
    vector_length: int  # model parameters + 1 (the weight)
    weight_scale: float = 0.0
    """Non-zero: the weight (last element) has its own scale and bound (quantized
    cohorts, whose few levels must not be spent on the weight's range)."""
    weight_bound: float = 0.0

    def weight_point(self, values: FixedPoint) -> FixedPoint:
        """The fixed point of the weight element, given that of the values."""
        if not self.weight_scale:
            return values
        return FixedPoint(bits=self.bits, scale=self.weight_scale, bound=self.weight_bound, max_summands=len(self.members))


@dataclass(frozen=True)
class KeyAdvert:
    cohort_id: str
    member: int
    share_key: bytes  # X25519 public key for encrypting shares
    mask_key: bytes  # X25519 public key for pairwise masks


@dataclass(frozen=True)
class SealedShares:
    cohort_id: str
    sender: int
    sealed: Mapping[int, bytes]  # receiver -> AES-GCM blob of (self-mask share, mask-key share)


@dataclass(frozen=True)
class MaskedInput:
    cohort_id: str
    member: int
    vector: np.ndarray  # uint32, CohortPlan.vector_length elements


@dataclass(frozen=True)
class UnmaskRequest:
    cohort_id: str
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskResponse:
    cohort_id: str
    member: int
    self_mask_shares: Mapping[int, bytes]  # survivor j -> this member's share of b_j
    mask_key_shares: Mapping[int, bytes]  # dropped j -> this member's share of j's mask private key
