"""The cohort protocol in process: coordinator and members as objects, every
message passed by hand, so dropouts and tampering can happen at any step."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from client_sdk._secagg import MEMBER_STEPS, CohortMember, MemberState
from proto.secagg.protocol import (
    ACCEPTS,
    PHASE_TRANSITIONS,
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
    default_neighbour_count,
    fewest_safe_survivors,
    neighbour_graph,
)
from proto.secagg.quantize import FixedPoint
from proto.secagg.sealing import VerificationFailed
from server.secagg import CohortAborted, CohortCoordinator

LENGTH = 50  # model values; the masked vector has LENGTH + 1 (the weight)
BOUND = 8.0


def make_cohort(n: int, *, neighbours: int | None = None, min_survivors: int | None = None, cohort_id: str = "c1"):  # type: ignore[no-untyped-def]
    fixed = FixedPoint.for_cohort(bits=32, bound=BOUND, max_summands=n)
    coordinator = CohortCoordinator(
        cohort_id,
        list(range(1, n + 1)),
        neighbours=neighbours if neighbours is not None else default_neighbour_count(n),
        min_survivors=min_survivors if min_survivors is not None else max(2, n // 2),
        fixed_point=fixed,
        vector_length=LENGTH + 1,
    )
    members = {m: CohortMember(plan) for m, plan in coordinator.plans().items()}
    return coordinator, members


def inputs(n: int, seed: int = 0) -> dict[int, tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return {m: (rng.uniform(-0.5, 0.5, LENGTH), float(rng.uniform(0.2, 2.0))) for m in range(1, n + 1)}


def run(coordinator: CohortCoordinator, members: dict[int, CohortMember], data, drop: dict[str, set[int]] | None = None):  # type: ignore[no-untyped-def]
    """Drive one cohort; members in drop[step] vanish before that step."""
    drop = drop or {}
    gone: set[int] = set()

    def alive(step: str) -> list[int]:
        gone.update(drop.get(step, set()))
        return [m for m in members if m not in gone]

    for m in alive("advertise"):
        coordinator.receive_advert(members[m].advertise())
    adverts = coordinator.close_advertising()
    for m in alive("share"):
        if m in adverts:
            coordinator.receive_shares(members[m].share_keys(adverts[m]))
    sealed = coordinator.close_sharing()
    uploaders = alive("upload")
    for m in uploaders:
        if m in sealed:
            members[m].receive_shares(sealed[m])
            values, weight = data[m]
            coordinator.receive_input(members[m].masked_input(values, weight, np.random.default_rng(m)))
    request = coordinator.close_input()
    for m in alive("unmask"):
        if m in request.survivors:
            coordinator.receive_unmask(members[m].unmask(request))
    result = coordinator.finish()
    coordinator.complete()
    return result


def plaintext(data, survivors) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    total = sum(data[m][1] * data[m][0] for m in survivors)
    return np.asarray(total), sum(data[m][1] for m in survivors)


def assert_matches(result, data, fixed_point_resolution: float) -> None:  # type: ignore[no-untyped-def]
    expected, weight = plaintext(data, result.survivors)
    bound = len(result.survivors) * fixed_point_resolution  # stochastic rounding: < 1 step per value
    assert np.max(np.abs(result.weighted_sum - expected)) <= bound
    assert abs(result.weight_sum - weight) <= bound


@pytest.mark.parametrize(("n", "neighbours"), [(5, None), (10, None), (10, 9), (16, 4)])
def test_cohort_recovers_the_staleness_weighted_sum(n: int, neighbours: int | None) -> None:
    coordinator, members = make_cohort(n, neighbours=neighbours)
    data = inputs(n)
    result = run(coordinator, members, data)
    assert result.survivors == frozenset(range(1, n + 1))
    assert_matches(result, data, coordinator.fixed_point.resolution)
    assert coordinator.phase is Phase.COMPLETED


@pytest.mark.parametrize("step", ["advertise", "share", "upload", "unmask"])
def test_dropouts_in_each_phase(step: str) -> None:
    n = 12
    coordinator, members = make_cohort(n, min_survivors=6)
    data = inputs(n, seed=3)
    result = run(coordinator, members, data, drop={step: {2, 7}})
    expected_survivors = frozenset(range(1, n + 1)) - ({2, 7} if step != "unmask" else set())
    assert result.survivors == expected_survivors
    assert_matches(result, data, coordinator.fixed_point.resolution)


def test_dropouts_in_every_phase_at_once() -> None:
    n = 20
    # 12 neighbours, 7 shares needed: survives the 5 dropouts even if all are one member's neighbours
    coordinator, members = make_cohort(n, neighbours=12, min_survivors=8)
    data = inputs(n, seed=4)
    result = run(coordinator, members, data, drop={"advertise": {1}, "share": {5}, "upload": {9, 10}, "unmask": {12}})
    assert result.survivors == frozenset(range(1, n + 1)) - {1, 5, 9, 10}
    assert_matches(result, data, coordinator.fixed_point.resolution)


@pytest.mark.parametrize("step", ["advertise", "share", "upload", "unmask"])
def test_too_few_survivors_abort_and_apply_nothing(step: str) -> None:
    n = 8
    coordinator, members = make_cohort(n, min_survivors=6)
    with pytest.raises(CohortAborted, match="the cohort needs 6"):
        run(coordinator, members, inputs(n), drop={step: {1, 2, 3}})
    assert coordinator.phase is Phase.ABORTED
    assert coordinator.abort_reason is not None


def test_dropouts_that_strand_a_secret_abort_cleanly() -> None:
    """With k = 2 each member's secrets have 3 holders and need 2: if both
    neighbours of an uploader vanish before unmasking, its self mask cannot be
    removed, so the cohort aborts instead of producing a wrong sum."""
    n = 8
    coordinator, members = make_cohort(n, neighbours=2, min_survivors=5)
    target = 1
    with pytest.raises(CohortAborted, match=f"remove member {target}'s mask"):
        run(coordinator, members, inputs(n), drop={"unmask": set(coordinator.graph[target])})


@pytest.mark.parametrize("n", [6, 10, 16, 25])
def test_any_dropouts_leaving_the_safe_number_of_survivors_complete(n: int) -> None:
    """From fewest_safe_survivors up, completion is certain wherever the
    dropouts fall: here all of them next to one member."""
    coordinator, _ = make_cohort(n)
    k = min(len(v) for v in coordinator.graph.values())
    t = fewest_safe_survivors(n, k)
    dropped = set(coordinator.graph[1][: n - t])
    coordinator, members = make_cohort(n, min_survivors=t)
    data = inputs(n, seed=n)
    result = run(coordinator, members, data, drop={"upload": dropped})
    assert len(result.survivors) == t
    assert_matches(result, data, coordinator.fixed_point.resolution)


@pytest.mark.parametrize("n", [10, 16, 25, 40, 100])
def test_ten_percent_random_dropouts_complete_with_a_lower_t(n: int) -> None:
    """t below the certain bound (t = 90% of n): dropouts spread at random
    still leave every member a majority of its share holders (for n = 100,
    k = 14, more than the certain bound of default_min_survivors allows)."""
    coordinator, _ = make_cohort(n)
    k = min(len(v) for v in coordinator.graph.values())
    t = n - max(1, n // 10)
    assert t >= n // 2 + 1 and k >= 2
    rng = np.random.default_rng(n)
    for _ in range(3):
        dropped = set(rng.choice(np.arange(1, n + 1), n - t, replace=False).tolist())
        coordinator, members = make_cohort(n, min_survivors=t)
        data = inputs(n, seed=len(dropped))
        result = run(coordinator, members, data, drop={"upload": dropped})
        assert len(result.survivors) == t
        assert_matches(result, data, coordinator.fixed_point.resolution)


def test_split_survivors_abort_instead_of_revealing_a_partial_sum() -> None:
    """Defence in depth: if t were set below the safe bound, survivors split in
    two groups must abort (one group's sum could be unmasked alone)."""
    n = 12
    coordinator, members = make_cohort(n, neighbours=2)
    coordinator.min_survivors = 2  # below the bound the coordinator would choose
    ring_order = _ring_order(coordinator.graph)
    dropped = {ring_order[0], ring_order[6]}
    with pytest.raises(CohortAborted, match="split into groups"):
        run(coordinator, members, inputs(n), drop={"upload": dropped})


def _ring_order(graph: dict[int, tuple[int, ...]]) -> list[int]:
    start = min(graph)
    order, previous = [start], None
    while len(order) < len(graph):
        step = next(o for o in graph[order[-1]] if o != previous and o not in order)
        previous = order[-1]
        order.append(step)
    return order


def test_weight_is_capped_at_the_clipping_bound() -> None:
    """A weight above the bound is capped before it scales the update, so the
    recovered mean is still the mean of the updates (not inflated)."""
    n = 4
    coordinator, members = make_cohort(n)
    data = {m: (np.full(LENGTH, 0.01), 100.0 if m == 1 else 1.0) for m in range(1, n + 1)}
    result = run(coordinator, members, data)
    np.testing.assert_allclose(result.weighted_sum / result.weight_sum, 0.01, atol=1e-4)
    assert result.weight_sum == pytest.approx(BOUND + 3, abs=1e-3)


def test_malformed_share_in_an_unmask_response_is_refused() -> None:
    coordinator, members, sealed = advanced_to_sharing()
    for m in members:
        members[m].receive_shares(sealed[m])
        coordinator.receive_input(members[m].masked_input(np.zeros(LENGTH), 1.0))
    request = coordinator.close_input()
    response = members[1].unmask(request)
    broken = UnmaskResponse("c1", 1, {j: blob[:-1] for j, blob in response.self_mask_shares.items()}, {})
    with pytest.raises(ProtocolViolation, match="malformed share"):
        coordinator.receive_unmask(broken)
    foreign = UnmaskResponse("c1", 1, {}, {2: next(iter(response.self_mask_shares.values()))})
    with pytest.raises(ProtocolViolation, match="outside the survivors / dropped lists"):
        coordinator.receive_unmask(foreign)


def test_member_refuses_a_plan_with_a_weak_threshold() -> None:
    plan = replace(_a_plan(), threshold=1)
    with pytest.raises(ProtocolViolation, match="share threshold 1"):
        CohortMember(plan)


def _a_plan():  # type: ignore[no-untyped-def]
    coordinator = CohortCoordinator(
        "c9", [1, 2, 3, 4, 5], neighbours=4, min_survivors=3,
        fixed_point=FixedPoint.for_cohort(bits=32, bound=BOUND, max_summands=5), vector_length=LENGTH + 1,
    )  # fmt: skip
    return coordinator.plans()[1]


def test_member_refuses_to_unmask_with_fewer_than_t_survivors() -> None:
    coordinator, members, sealed = advanced_to_sharing()
    for m in members:
        members[m].receive_shares(sealed[m])
        members[m].masked_input(np.zeros(LENGTH), 1.0)
    request = UnmaskRequest("c1", frozenset({1}), frozenset())
    with pytest.raises(ProtocolViolation, match="fewer than the cohort's"):
        members[1].unmask(request)


# -- misuse and tampering ------------------------------------------------------------


def advanced_to_sharing(n: int = 5):  # type: ignore[no-untyped-def]
    coordinator, members = make_cohort(n)
    for member in members.values():
        coordinator.receive_advert(member.advertise())
    adverts = coordinator.close_advertising()
    shares = {m: members[m].share_keys(adverts[m]) for m in members}
    for s in shares.values():
        coordinator.receive_shares(s)
    sealed = coordinator.close_sharing()
    return coordinator, members, sealed


def test_share_with_broken_tag_is_rejected() -> None:
    coordinator, members, sealed = advanced_to_sharing()
    sender = next(iter(sealed[1]))
    blob = bytearray(sealed[1][sender])
    blob[-1] ^= 0x01
    with pytest.raises(VerificationFailed):
        members[1].receive_shares({**sealed[1], sender: bytes(blob)})
    assert members[1].state is MemberState.ABORTED


def test_share_sealed_for_another_member_is_rejected() -> None:
    """A coordinator that forwards j's share for member 2 to member 1 is caught by the associated data."""
    coordinator, members, sealed = advanced_to_sharing()
    common = next(s for s in sealed[1] if s in sealed[2] and s not in (1, 2))
    with pytest.raises(VerificationFailed):
        members[1].receive_shares({**sealed[1], common: sealed[2][common]})


def test_message_replayed_from_an_earlier_cohort_is_rejected() -> None:
    old_coordinator, old_members = make_cohort(5, cohort_id="c-old")
    old_advert = old_members[1].advertise()
    coordinator, members = make_cohort(5, cohort_id="c-new")
    with pytest.raises(ProtocolViolation, match="for cohort 'c-old' sent to cohort 'c-new'"):
        coordinator.receive_advert(old_advert)
    # and a member refuses the old cohort's keys
    for member in members.values():
        coordinator.receive_advert(member.advertise())
    adverts = coordinator.close_advertising()
    stale = {k: replace(v, cohort_id="c-old") for k, v in adverts[1].items()}
    with pytest.raises(ProtocolViolation, match="cohort 'c-old'"):
        members[1].share_keys(stale)


@pytest.mark.parametrize("field", ["share_key", "mask_key"])
def test_a_low_order_public_key_is_refused_on_arrival(field: str) -> None:
    """Forwarded, it would fail every neighbour's key agreement; the member
    may still advertise a usable key, and the cohort completes."""
    coordinator, members = make_cohort(5)
    advert = members[1].advertise()
    with pytest.raises(ProtocolViolation, match=f"member 1's {field} cannot be used: it is a low-order X25519 point"):
        coordinator.receive_advert(replace(advert, **{field: bytes(32)}))
    coordinator.receive_advert(advert)
    for m in range(2, 6):
        coordinator.receive_advert(members[m].advertise())
    assert set(coordinator.close_advertising()) == {1, 2, 3, 4, 5}


def test_replay_within_a_cohort_is_rejected() -> None:
    coordinator, members = make_cohort(5)
    advert = members[1].advertise()
    coordinator.receive_advert(advert)
    with pytest.raises(ProtocolViolation, match="already sent"):
        coordinator.receive_advert(advert)


def test_message_in_the_wrong_phase_is_rejected() -> None:
    coordinator, members = make_cohort(5)
    vector = np.zeros(LENGTH + 1, np.uint32)
    with pytest.raises(ProtocolViolation, match="masked_input is not accepted in phase advertise_keys"):
        coordinator.receive_input(MaskedInput("c1", 1, vector))


def test_masked_vector_of_the_wrong_length_is_rejected() -> None:
    coordinator, members, sealed = advanced_to_sharing()
    members[1].receive_shares(sealed[1])
    with pytest.raises(ProtocolViolation, match="this cohort takes 51 uint32 values"):
        coordinator.receive_input(MaskedInput("c1", 1, np.zeros(LENGTH, np.uint32)))
    with pytest.raises(ProtocolViolation, match="input has 49 values"):
        members[1].masked_input(np.zeros(LENGTH - 1), 1.0)


def test_member_refuses_to_reveal_both_secrets_of_a_neighbour() -> None:
    coordinator, members, sealed = advanced_to_sharing()
    for m in members:
        members[m].receive_shares(sealed[m])
        coordinator.receive_input(members[m].masked_input(np.zeros(LENGTH), 1.0))
    neighbour = coordinator.graph[1][0]
    request = UnmaskRequest("c1", frozenset(members), frozenset({neighbour}))
    with pytest.raises(ProtocolViolation, match="both surviving and dropped"):
        members[1].unmask(request)
    assert members[1].state is MemberState.ABORTED


def test_member_answers_one_unmasking_request_only() -> None:
    """A second request (say, now claiming a survivor dropped) is refused."""
    coordinator, members, sealed = advanced_to_sharing()
    for m in members:
        members[m].receive_shares(sealed[m])
        coordinator.receive_input(members[m].masked_input(np.zeros(LENGTH), 1.0))
    request = coordinator.close_input()
    members[1].unmask(request)
    neighbour = coordinator.graph[1][0]
    second = UnmaskRequest("c1", request.survivors - {neighbour}, frozenset({neighbour}))
    with pytest.raises(ProtocolViolation, match="unmask is not allowed when the member is done"):
        members[1].unmask(second)


# -- the state machines, exhaustively -------------------------------------------------


def test_every_illegal_phase_transition_is_rejected() -> None:
    for current, target in itertools.product(Phase, Phase):
        if target in PHASE_TRANSITIONS[current]:
            check_transition(current, target)
        else:
            with pytest.raises(ProtocolViolation):
                check_transition(current, target)


def test_every_phase_accepts_exactly_one_message_kind() -> None:
    for phase, kind in itertools.product(Phase, MessageKind):
        if ACCEPTS.get(phase) is kind:
            check_accepts(phase, kind)
        else:
            with pytest.raises(ProtocolViolation):
                check_accepts(phase, kind)


def test_coordinator_rejects_every_out_of_phase_message() -> None:
    """Drive a real coordinator into each phase and send it every kind of message."""
    senders = {
        MessageKind.KEY_ADVERT: lambda c, m: c.receive_advert(KeyAdvert("c1", 1, bytes(32), bytes(32))),
        MessageKind.SEALED_SHARES: lambda c, m: c.receive_shares(SealedShares("c1", 1, {})),
        MessageKind.MASKED_INPUT: lambda c, m: c.receive_input(MaskedInput("c1", 1, np.zeros(LENGTH + 1, np.uint32))),
        MessageKind.UNMASK_RESPONSE: lambda c, m: c.receive_unmask(UnmaskResponse("c1", 1, {}, {})),
    }
    for phase in Phase:
        for kind, send in senders.items():
            coordinator, members = make_cohort(5)
            _drive_to(coordinator, members, phase)
            if ACCEPTS.get(phase) is kind:
                continue
            with pytest.raises(ProtocolViolation):
                send(coordinator, members)


def _drive_to(coordinator: CohortCoordinator, members: dict[int, CohortMember], phase: Phase) -> None:
    if phase is Phase.CHECK_IN:
        coordinator.phase = Phase.CHECK_IN  # plans() already moved it; rewind to probe the first phase
        return
    if phase is Phase.ABORTED:
        coordinator.abort("probe")
        return
    order = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASKING, Phase.COMPLETED]
    data = inputs(len(members))
    for step in order[: order.index(phase)]:
        if step is Phase.ADVERTISE_KEYS:
            for m in members.values():
                coordinator.receive_advert(m.advertise())
            adverts = coordinator.close_advertising()
        elif step is Phase.SHARE_KEYS:
            for k, m in members.items():
                coordinator.receive_shares(m.share_keys(adverts[k]))
            sealed = coordinator.close_sharing()
        elif step is Phase.MASKED_INPUT:
            for k, m in members.items():
                m.receive_shares(sealed[k])
                coordinator.receive_input(m.masked_input(*data[k]))
            request = coordinator.close_input()
        elif step is Phase.UNMASKING:
            for m in members.values():
                coordinator.receive_unmask(m.unmask(request))
            coordinator.finish()
            coordinator.complete()


def test_member_rejects_every_operation_out_of_order() -> None:
    calls = {
        "advertise": lambda m: m.advertise(),
        "share_keys": lambda m: m.share_keys({}),
        "receive_shares": lambda m: m.receive_shares({}),
        "masked_input": lambda m: m.masked_input(np.zeros(LENGTH), 1.0),
        "unmask": lambda m: m.unmask(UnmaskRequest("c1", frozenset({1}), frozenset())),
    }
    for state in MemberState:
        for operation, call in calls.items():
            needed, _ = MEMBER_STEPS[operation]
            if state is needed:
                continue
            _, members = make_cohort(5)
            member = members[1]
            member.state = state
            with pytest.raises(ProtocolViolation, match=f"{operation} is not allowed"):
                call(member)


def test_neighbour_graph_is_symmetric_and_sparse() -> None:
    members = list(range(1, 101))
    k = default_neighbour_count(100)
    graph = neighbour_graph(members, k, b"seed")
    assert k == 14
    for member, neighbours in graph.items():
        assert member not in neighbours
        assert len(neighbours) == k
        for other in neighbours:
            assert member in graph[other]
    assert neighbour_graph(members, 99, b"seed")[5] == tuple(m for m in members if m != 5)
