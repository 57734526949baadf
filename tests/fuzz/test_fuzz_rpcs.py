"""Fuzz every RPC of a real server with malformed, inconsistent and
out-of-order messages (issue 4, part 7).

Every RPC that tributary.proto declares is read from the descriptors, so an
RPC or service added later is fuzzed by the generic parts without a change
here. Four parts, run in this order against one server:

  protocol steps    honest secure-aggregation cohorts, stepped one phase at
                    a time; between the phases, each step with a member's own
                    token (out of phase, or malformed in phase), forged
                    tokens, stale, aborted and unknown cohorts, other jobs;
                    beside the running phases, the same without live tokens;
                    and at unmasking, someone racing a member with made-up
                    shares, which must never be applied
  push streams      pushes built from a valid update with one or more known
                    defects (header vs payload lies, wrong names, dtypes and
                    shapes, NaN, stale or future bases, ids, chunks before the
                    header, two headers, truncated or oversized streams),
                    valid pushes, retries and reused keys
  inconsistent      well-formed messages of every RPC with any field values,
                    generated from the descriptors and seeded with live job
                    ids, cohort ids, tokens, keys and right-sized payloads
  random bytes      random and mutated encodings as each message, random
                    sequences of them for client streams

The server runs with a state directory, so every accepted push goes through
the durable path (logged to SQLite before it is applied and acknowledged);
at the end the update log must hold exactly the acknowledged updates, each
once. Client ids and idempotency keys include NUL, unicode and SQL-looking
strings, so odd text reaches SQLite. test_fuzz_auth.py fuzzes the same
server with authentication on.

Every call must end with a status code within the client deadline (2 s: a
DEADLINE_EXCEEDED is a hang) and the code must be one the contract allows for
what was sent: UNKNOWN (an unhandled exception) never is, INTERNAL only for
bytes that do not parse as the request type (gRPC's own answer). After every
call each job's model is compared with a shadow rebuilt from the updates the
server acknowledged, bit for bit, so an update that should have been refused,
or one counted twice, fails at once. Seeds are fixed (derandomize) for CI;
`pytest -s` prints messages sent and codes answered per RPC.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proto import tributary_pb2 as pb
from proto.secagg import shamir
from proto.tensors import CHUNK_BYTES, header_to_pb, iter_chunks, specs_from_pb, specs_of, split_payload
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import SERVICE_NAME, RunningServer, running_server
from server.config import SecAggConfig, StalenessConfig
from server.core import MAX_NUM_SAMPLES
from server.servicer import MAX_ID_LENGTH
from tests.conftest import small_model
from tests.fuzz.cohort import HonestCohort
from tests.fuzz.durable import StateDb
from tests.fuzz.shadow import PlainShadow, SecureShadow
from tests.fuzz.wire import (
    CALL_TIMEOUT_S,
    DESERIALIZE_FAILED,
    Caller,
    Outcome,
    Rpc,
    Vocabulary,
    all_rpcs,
    messages,
    parses,
    random_payloads,
    request_lists,
)

Code: TypeAlias = grpc.StatusCode
OK, IA, NF, FP, RE, ABORTED = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.ABORTED
REFUSALS = frozenset({IA, NF, FP, RE})
"""What a refused request may be answered with (DESIGN.md, Errors). UNAUTHENTICATED
and PERMISSION_DENIED join this once RPCs need credentials; until then they
would mean a handler is refusing what it should not."""

PLAIN, SYNC, SECURE = "plain", "sync", "secure"
MODEL = small_model()
SPECS = tuple(specs_of(MODEL))
PAYLOAD_BYTES = sum(s.nbytes for s in SPECS)
MASKED_LENGTH = sum(t.size for t in MODEL.values()) + 1
TRIBUTARY_RPCS = {rpc.method: rpc for rpc in all_rpcs() if rpc.service == SERVICE_NAME}
COHORT_RPCS = {"AdvertiseKeys", "ShareKeys", "GetUploadSlot", "UploadMasked", "Unmask"}
"""Protocol steps: a request outside a live cohort can only be refused."""

MIN_MESSAGES_TOTAL = 10_000
MIN_MESSAGES_PER_RPC = 300
COHORTS = 12
EXAMPLES_INCONSISTENT = 250
EXAMPLES_PUSH = 500
EXAMPLES_RANDOM = 300

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    # no shrinking: an example replayed later meets a server whose state has
    # moved on; the failure message carries the messages that were sent
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    report_multiple_bugs=False,
    print_blob=False,
)


def server_config(state_dir: Path) -> ServerConfig:
    constant = StalenessConfig(kind="constant")
    return ServerConfig(
        address="127.0.0.1:0",
        insecure=True,
        state_dir=state_dir,
        jobs=(
            # x <- x + delta for every accepted update: the shadow reproduces it exactly
            JobConfig(PLAIN, StrategyConfig(name="fedbuff", buffer_size=1), constant, max_staleness=3, max_update_bytes=4096),
            JobConfig(SYNC, StrategyConfig(name="fedavg", clients_per_round=2)),
            JobConfig(
                SECURE,
                StrategyConfig(name="fedbuff"),
                constant,
                # forming only with 3 members (the fuzz never has 3 waiting); deadlines far
                # beyond the fuzz between two phases, so only a hang can reach them
                secure_aggregation=SecAggConfig(
                    cohort_size=3, forming_timeout_s=60.0, phase_timeout_s=30.0, upload_timeout_s=30.0, clip_bound=64.0
                ),
            ),
        ),
    )


# -- the world: server, shadows, pools of live values ----------------------------------


@dataclass
class World:
    running: RunningServer
    channel: grpc.Channel
    caller: Caller
    shadows: dict[str, PlainShadow]
    secure: SecureShadow
    state_dir: Path | None = None
    cohort_ids: list[str] = field(default_factory=list)
    stale_refs: list[pb.MemberRef] = field(default_factory=list)
    client_ids: list[str] = field(default_factory=list)
    cohorts_completed: int = 0
    aborted_cohorts: set[str] = field(default_factory=set)
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    _serial: Iterator[int] = field(default_factory=itertools.count)

    def next_serial(self) -> int:
        return next(self._serial)

    @property
    def rpcs(self) -> dict[str, Rpc]:
        return TRIBUTARY_RPCS

    def check_state(self) -> None:
        for job_id, shadow in self.shadows.items():
            shadow.check(self.running.core.job(job_id))
        self.secure.check(self.running.core.job(SECURE))

    def expected_model(self, job_id: str) -> tuple[int, dict[str, np.ndarray]]:
        shadow = self.shadows.get(job_id)
        if shadow is not None:
            return shadow.version, shadow.tensors
        assert job_id == SECURE, job_id
        return self.secure.version, self.secure.tensors

    def assert_serving(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        for service in ("", SERVICE_NAME):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service

    def send(
        self,
        rpc: Rpc,
        requests: Sequence[bytes | Message],
        allowed: frozenset[Code],
        what: str,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> Outcome:
        outcome = self.caller.call(rpc, requests, metadata=metadata)
        self.judge(rpc, requests, outcome, allowed, what)
        return outcome

    def ok_judge(self, rpc: Rpc) -> Callable[[Any, Any, Sequence[bytes]], None] | None:
        """What checks an OK answer of `rpc` against the shadows (None: nothing to check)."""
        return OK_JUDGES.get(rpc.method) if rpc.service == SERVICE_NAME else None

    def accepted_keys(self) -> dict[str, dict[str, str]]:
        """Job -> idempotency key -> client id of every acknowledged push."""
        return {job_id: {key: a.client_id for key, a in shadow.accepted.items()} for job_id, shadow in self.shadows.items()}

    def judge(self, rpc: Rpc, requests: Sequence[bytes | Message], outcome: Outcome, allowed: frozenset[Code], what: str) -> None:
        """The answer is one the contract allows, says why when it refuses,
        and an OK answer is consistent with the shadows."""
        self.cases[what] += 1

        def context() -> str:
            return f"{rpc.name} ({what}) answered {outcome.code.name}: {outcome.details!r}; sent {_short(requests)}"

        if outcome.code not in allowed:
            raise AssertionError(context())
        if outcome.code is Code.INTERNAL:
            assert outcome.details == DESERIALIZE_FAILED, context()
        elif not outcome.ok:
            assert outcome.details.strip(), f"{context()}: a refusal must say why"
        else:
            for response in outcome.responses:
                assert parses(rpc.response_type, response), context()
            judge_ok = self.ok_judge(rpc)
            if judge_ok is not None:
                try:
                    judge_ok(self, [_as(rpc.request_type, r) for r in requests], outcome.responses)
                except AssertionError as error:
                    raise AssertionError(f"{error}\n{context()}") from None
        self.check_state()


def _as(message_type: type[Message], request: bytes | Message) -> Any:
    return message_type.FromString(request) if isinstance(request, bytes) else request


def _short(requests: Sequence[bytes | Message]) -> str:
    text = repr([r[:300] if isinstance(r, bytes) else type(r).__name__ + "(" + str(r)[:300].replace("\n", " ") + ")" for r in requests])
    return text if len(text) < 1200 else text[:1200] + "..."


def judge_push(world: World, requests: list[pb.PushRequest], responses: Sequence[bytes]) -> None:
    ack = pb.PushAck.FromString(responses[0])
    shadow = world.shadows.get(ack.job_id)
    assert shadow is not None, f"job {ack.job_id!r} acknowledged a plaintext push"
    shadow.judge(requests, ack)


def judge_pull(world: World, requests: list[pb.PullRequest], responses: Sequence[bytes]) -> None:
    answers = [pb.PullResponse.FromString(r) for r in responses]
    assert answers and answers[0].WhichOneof("kind") == "model", "a pull must start with the model header"
    assert all(a.WhichOneof("kind") == "chunk" for a in answers[1:]), "a pull carries one header, then chunks"
    header = answers[0].model
    assert header.job_id == requests[0].job_id
    specs = specs_from_pb(header.header)
    payload = b"".join(a.chunk.data for a in answers[1:])
    assert header.offset == (requests[0].resume_offset if requests[0].resume else 0), header.offset
    assert header.offset + len(payload) == sum(s.nbytes for s in specs) and all(len(a.chunk.data) <= CHUNK_BYTES for a in answers[1:])
    version, expected = world.expected_model(header.job_id)
    if requests[0].resume:  # a resumed pull: the version asked for, kept by the server (a recent one)
        assert header.version == requests[0].resume_version <= version, (header.version, version)
    else:
        assert header.version >= version if requests[0].min_version else header.version == version, (header.version, version)
    if header.version == version and header.offset == 0:
        for name, values in split_payload(specs, payload).items():
            np.testing.assert_array_equal(values, expected[name])


def judge_get_job(world: World, requests: list[pb.GetJobRequest], responses: Sequence[bytes]) -> None:
    info = pb.JobInfo.FromString(responses[0])
    version, _ = world.expected_model(info.job_id)
    assert info.job_id == requests[0].job_id and info.version == version, (info, version)
    assert tuple(specs_from_pb(info.model)) == SPECS


def judge_join(world: World, requests: list[pb.JoinCohortRequest], responses: Sequence[bytes]) -> None:
    plan = pb.CohortPlanMessage.FromString(responses[0])
    assert not plan.formed, f"a lone fuzz client was placed in a cohort: {plan}"


def judge_upload_slot(world: World, requests: list[pb.MemberRef], responses: Sequence[bytes]) -> None:
    assert pb.UploadSlot.FromString(responses[0]).version == world.secure.version


OK_JUDGES: dict[str, Callable[[World, Any, Sequence[bytes]], None]] = {
    "Push": judge_push,
    "Pull": judge_pull,
    "GetJob": judge_get_job,
    "JoinCohort": judge_join,
    "GetUploadSlot": judge_upload_slot,
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with running_server(server_config(tmp_path / "state"), {job: MODEL for job in (PLAIN, SYNC, SECURE)}, grace_s=0.5) as running:
        with grpc.insecure_channel(running.address) as channel:
            yield World(
                running,
                channel,
                Caller(channel),
                shadows={
                    PLAIN: PlainShadow(PLAIN, "fedbuff", dict(MODEL), max_staleness=3),
                    SYNC: PlainShadow(SYNC, "fedavg", dict(MODEL), max_staleness=None),
                },
                secure=SecureShadow(SECURE, dict(MODEL)),
                state_dir=tmp_path / "state",
            )


def test_every_rpc_survives_fuzzing(world: World) -> None:
    families = [fuzz_protocol_steps, fuzz_push_streams, fuzz_inconsistent_messages, fuzz_random_bytes]
    print()
    for family in families:
        sent_before, started = sum(world.caller.sent.values()), time.monotonic()
        family(world)
        print(f"{family.__name__}: {sum(world.caller.sent.values()) - sent_before} messages in {time.monotonic() - started:.1f} s")
    print(world.caller.table())
    print(f"cohorts: {world.cohorts_completed} completed, {len(world.aborted_cohorts)} aborted by a made-up unmasking answer")
    world.assert_serving()
    world.check_state()
    for job_id, shadow in world.shadows.items():
        job = world.running.core.job(job_id)
        assert job.stats.updates_accepted == len(shadow.accepted), job_id
        assert shadow.version > 0, f"no update was ever applied to {job_id!r}: the exact-model check checked nothing"
    assert world.secure.version == world.cohorts_completed > 0
    assert world.state_dir is not None
    db = StateDb(world.state_dir)
    try:
        db.check_update_log(world.accepted_keys())
    finally:
        db.close()
    assert any(not key.isascii() or "\x00" in key for keys in world.accepted_keys().values() for key in keys), "no odd key reached SQLite"
    sent = world.caller.sent
    assert sum(sent.values()) >= MIN_MESSAGES_TOTAL, world.caller.table()
    for rpc in all_rpcs():
        assert sent[rpc.name] >= MIN_MESSAGES_PER_RPC, f"{rpc.name} got only {sent[rpc.name]} messages"
    codes = {code for _, code in world.caller.codes}
    assert {"UNKNOWN", "DEADLINE_EXCEEDED"}.isdisjoint(codes)


# -- protocol steps out of order, around honest cohorts ---------------------------------


def fuzz_protocol_steps(world: World) -> None:
    @settings(FUZZ, max_examples=COHORTS)
    @given(st.data())
    def one_cohort(data: st.DataObject) -> None:
        serial = world.next_serial()
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        deltas = [rng.uniform(-1, 1, MASKED_LENGTH - 1).astype(np.float32) for _ in range(3)]
        samples = data.draw(st.lists(st.integers(1, 5), min_size=3, max_size=3), label="samples")
        cohort = HonestCohort(world.channel, SECURE, serial, deltas, samples)
        before = {n: np.array(t) for n, t in world.secure.tensors.items()}
        protocol_gap(data, world, cohort)
        while not cohort.done:
            noise = [draw_protocol_call(data, world, cohort, concurrent=True) for _ in range(data.draw(st.integers(0, 8), label="noise"))]
            hijack = data.draw(HIJACK, label="hijack") if cohort.next_step == "unmask" else None
            if hijack is not None and hijack["hijack"]:
                noise.insert(0, hijack_unmask(hijack, world, cohort))
            outcomes = run_beside(world, cohort.step, noise)
            if cohort.done:
                settle_cohort(world, cohort, before, noise[0] if hijack and hijack["hijack"] else None, outcomes)
            for call, outcome in zip(noise, outcomes):
                world.judge(call.rpc, call.requests, outcome, call.allowed, call.what + " (beside a running step)")
            protocol_gap(data, world, cohort)

    one_cohort()
    world.assert_serving()
    for phase in ("advertise_keys", "share_keys", "masked_input", "unmasking"):
        for op in COHORT_RPCS:
            assert world.cases[f"own token {op} in phase {phase}"], f"no {op} with a member's own token in phase {phase}"


HIJACK = st.fixed_dictionaries(
    {
        "hijack": st.integers(0, 3).map(lambda v: v == 0),
        "member": st.integers(0, 2),
        "indices": st.lists(st.integers(1, 4), min_size=3, max_size=3),
        "values": st.lists(st.integers(0, shamir.PRIME - 1), min_size=3, max_size=3),
        "duplicate": st.booleans(),
    }
)


def hijack_unmask(plan: dict[str, Any], world: World, cohort: HonestCohort) -> PlannedCall:
    """Someone holding a member's token answers the unmasking request for it,
    racing the member, with well-formed shares of made-up values (and, with
    `duplicate`, one peer twice). Made-up shares must never be applied: the
    cohort either completes with the members' true sum (the shares were not
    used, or arrived too late) or aborts, changing nothing."""
    ref = cohort.refs[plan["member"]]
    shares = [pb.SealedShare(peer=r.member, blob=shamir.Share(i, v).to_bytes()) for r, i, v in zip(cohort.refs, plan["indices"], plan["values"])]
    if plan["duplicate"]:
        shares.append(shares[0])
        return PlannedCall(world.rpcs["Unmask"], [pb.UnmaskResponseMessage(sender=ref, self_mask_shares=shares)], frozenset({IA}), "unmask with a peer twice, own token")
    message = pb.UnmaskResponseMessage(sender=ref, self_mask_shares=shares)
    return PlannedCall(world.rpcs["Unmask"], [message], frozenset({OK, FP, ABORTED}), "unmask with made-up shares, own token")


def settle_cohort(world: World, cohort: HonestCohort, before: dict[str, np.ndarray], hijack: PlannedCall | None, outcomes: list[Outcome]) -> None:
    """After the last step: the cohort applied the members' true aggregate
    once, or (only when someone answered for a member) aborted and changed nothing."""
    versions = [o for o in cohort.unmask_outcomes if isinstance(o, int)]
    errors = [o for o in cohort.unmask_outcomes if isinstance(o, grpc.RpcError)]
    if hijack is None or IA in hijack.allowed:
        assert not errors, [e.details() for e in errors]
    else:
        assert {e.code() for e in errors} <= {FP, ABORTED}, [(e.code(), e.details()) for e in errors]
        if outcomes and outcomes[0].ok:
            versions.append(pb.CohortOutcome.FromString(outcomes[0].responses[0]).version)
    world.cohort_ids.append(cohort.cohort_id)
    world.stale_refs.extend(cohort.refs)
    world.client_ids.extend(cohort.client_ids)
    if versions:
        assert set(versions) == {world.secure.version + 1}, versions
        world.cohorts_completed += 1
        world.secure.cohort_applied(world.running.core.job(SECURE), cohort.expected_aggregate(before))
    else:
        world.aborted_cohorts.add(cohort.cohort_id)


@dataclass(frozen=True)
class PlannedCall:
    rpc: Rpc
    requests: Sequence[Message]
    allowed: frozenset[Code]
    what: str


def protocol_gap(data: st.DataObject, world: World, cohort: HonestCohort) -> None:
    """Between two phases: the cohort's phase is known, so the members' own
    tokens can be used, for every step out of phase and malformed in phase
    (each step once, then a random mix)."""
    calls = []
    if cohort.refs and not cohort.done:
        for op in sorted(COHORT_RPCS):
            plan = data.draw(PROTOCOL_CALL, label=f"own-token {op}") | {"kind": "own token", "op": op}
            calls.append(protocol_call(plan, world, cohort, concurrent=False))
    for _ in range(data.draw(st.integers(0, 12), label="calls between phases")):
        calls.append(draw_protocol_call(data, world, cohort, concurrent=False))
    for call in calls:
        world.send(call.rpc, call.requests, call.allowed, call.what)


def run_beside(world: World, step: Callable[[], None], calls: list[PlannedCall]) -> list[Outcome]:
    """Run a cohort step while another thread sends `calls` (none with a live token)."""
    outcomes: list[Outcome] = []

    def noise() -> None:
        for call in calls:
            outcomes.append(world.caller.call(call.rpc, call.requests))

    thread = threading.Thread(target=noise)
    thread.start()
    step()
    thread.join(60)
    assert not thread.is_alive()
    return outcomes


# Hypothesis replays choice sequences and insists that the same choices lead to
# the same draws, but the server's state moves on between examples. So every
# draw below has fixed bounds: an abstract plan is drawn first, and only then
# turned into messages against the live state, without drawing again.

PROTOCOL_CALL = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["forged", "ghost", "plain job", "unknown job", "stale", "join"] + ["own token"] * 4),
        "op": st.sampled_from(sorted(COHORT_RPCS)),
        "pick": st.integers(0, 2**16),
        "forge": st.sampled_from(["token", "member", "other's token"]),
        "forged member": st.sampled_from([0, 4, 99, 2**32 - 1]),
        "forged token": st.binary(max_size=20),
        "ghost": st.sampled_from(["ghost", f"{SECURE}-1-00000000", ""]) | st.text(max_size=12),
        "wrong job": st.sampled_from(["nope", "", "SECURE"]),
        "key sizes": st.tuples(st.sampled_from([0, 16, 31, 32, 32, 33, 64]), st.sampled_from([32, 32, 3])),
        "shares": st.lists(st.tuples(st.sampled_from([1, 2, 3, 0, 99]), st.sampled_from([0, 16, 60, 160])), max_size=4),
        "self shares": st.lists(st.tuples(st.sampled_from([1, 2, 3, 99]), st.sampled_from([0, 5, 68, 100])), max_size=3, unique_by=lambda t: t[0]),
        "key shares": st.lists(st.tuples(st.sampled_from([1, 2, 3, 99]), st.sampled_from([0, 5, 68, 100])), max_size=2, unique_by=lambda t: t[0]),
        "upload shape": st.sampled_from(["wrong length", "chunk first", "two headers", "header only", "empty", "oversized chunk"] + ["right length"] * 3),
        "upload length": st.sampled_from([0, 4, MASKED_LENGTH * 4 - 4, MASKED_LENGTH * 4 - 1, MASKED_LENGTH * 4 + 4, MASKED_LENGTH * 8]),
        "chunk bytes": st.integers(1, 64),
        "join job": st.sampled_from([SECURE, SECURE, PLAIN, "nope"]),
        "join client": st.sampled_from(["", "x" * (MAX_ID_LENGTH + 1), "member"]) | st.text(min_size=1, max_size=8),
        "wait ms": st.integers(0, 50),
    }
)


def draw_protocol_call(data: st.DataObject, world: World, cohort: HonestCohort, *, concurrent: bool) -> PlannedCall:
    return protocol_call(data.draw(PROTOCOL_CALL, label="protocol call"), world, cohort, concurrent=concurrent)


def protocol_call(plan: dict[str, Any], world: World, cohort: HonestCohort, *, concurrent: bool) -> PlannedCall:
    """The messages for one drawn plan, against the cohort as it is now. Beside
    a running step (`concurrent`) nothing may carry a live member's token, nor
    join the job, since the step's outcome would then depend on timing."""
    rng = np.random.default_rng(plan["pick"])
    live = bool(cohort.refs) and not cohort.done
    kind = plan["kind"]
    if concurrent and kind in ("own token", "join"):
        kind = "forged"
    if kind == "own token" and not live:
        kind = "stale"
    if kind == "stale" and not world.stale_refs:
        kind = "ghost"
    if kind == "join":
        return _join_call(plan, world, cohort)
    op = plan["op"]
    pick = plan["pick"]
    if kind == "own token":
        ref = cohort.refs[pick % len(cohort.refs)]
    elif kind == "stale":
        ref = world.stale_refs[pick % len(world.stale_refs)]
    elif kind == "ghost":
        ref = pb.MemberRef(job_id=SECURE, cohort_id=plan["ghost"], member=1, token=bytes(16))
    else:
        bases = cohort.refs or world.stale_refs or [pb.MemberRef(job_id=SECURE, cohort_id="ghost", member=1)]
        base = bases[pick % len(bases)]
        ref = pb.MemberRef()
        ref.CopyFrom(base)
        if kind == "plain job":
            ref.job_id = PLAIN
        elif kind == "unknown job":
            ref.job_id = plan["wrong job"]
        elif plan["forge"] == "member":
            ref.member = plan["forged member"]
        elif plan["forge"] == "other's token" and len(bases) > 1:
            ref.token = next(r.token for r in bases if r.member != ref.member)
        else:
            ref.token = plan["forged token"] if plan["forged token"] != base.token else base.token + b"!"
    allowed = {NF} if kind == "unknown job" else {FP}
    if kind == "stale" and ref.cohort_id in world.aborted_cohorts:
        allowed = {ABORTED}
    if kind == "stale" and op == "Unmask" and ref.cohort_id not in world.aborted_cohorts:
        allowed = {FP, OK}  # a member of a completed cohort asking again is told the version it went into
    if kind == "ghost" or (kind == "forged" and not (cohort.refs or world.stale_refs)):
        allowed = {ABORTED}  # a cohort this server does not know: ended long ago, or lost in a restart
    in_phase = kind == "own token" and _accepted_in(cohort.phase) == op
    requests, extra = step_message(plan, op, ref, rng, must_be_malformed=in_phase)
    if kind == "own token" and op == "GetUploadSlot" and cohort.phase == "masked_input":
        allowed = {OK}
    return PlannedCall(world.rpcs[op], requests, frozenset(allowed | extra), f"{kind} {op} in phase {cohort.phase}")


def _accepted_in(phase: str) -> str | None:
    return {"advertise_keys": "AdvertiseKeys", "share_keys": "ShareKeys", "masked_input": "UploadMasked", "unmasking": "Unmask"}.get(phase)


def step_message(
    plan: dict[str, Any], op: str, ref: pb.MemberRef, rng: np.random.Generator, *, must_be_malformed: bool
) -> tuple[Sequence[Message], set[Code]]:
    """The request(s) for one protocol step, and the extra codes their shape
    allows. With `must_be_malformed`, the member's own token is used in the
    phase that takes this step: the message must then be refused on its
    content, or the fuzz would be taking part in the cohort."""

    def noise(size: int) -> bytes:
        return rng.bytes(size)

    if op == "AdvertiseKeys":
        share, mask = plan["key sizes"]
        if must_be_malformed and share == mask == 32:
            share = 31
        return [pb.KeyAdvertMessage(sender=ref, share_key=noise(share), mask_key=noise(mask))], set()
    if op == "ShareKeys":
        shares = list(plan["shares"])
        if must_be_malformed and 99 not in [p for p, _ in shares]:
            shares.append((99, 16))  # never a neighbour: the share set cannot be the right one
        peers = [p for p, _ in shares]
        message = pb.SealedSharesMessage(sender=ref, shares=[pb.SealedShare(peer=p, blob=noise(n)) for p, n in shares])
        return [message], ({IA} if len(set(peers)) < len(peers) else set())
    if op == "GetUploadSlot":
        return [ref], set()
    if op == "Unmask":
        self_shares, key_shares = list(plan["self shares"]), list(plan["key shares"])
        if must_be_malformed and 99 not in [p for p, _ in self_shares + key_shares]:
            self_shares.append((99, 68))  # not a member: refused before any share is kept
        return [
            pb.UnmaskResponseMessage(
                sender=ref,
                self_mask_shares=[pb.SealedShare(peer=p, blob=noise(n)) for p, n in self_shares],
                mask_key_shares=[pb.SealedShare(peer=p, blob=noise(n)) for p, n in key_shares],
            )
        ], set()
    assert op == "UploadMasked"
    shape = plan["upload shape"]
    if must_be_malformed and shape == "right length":
        shape = "wrong length"
    length = {"wrong length": plan["upload length"], "oversized chunk": CHUNK_BYTES + 1}.get(shape, MASKED_LENGTH * 4)
    payload = noise(length)
    cut = CHUNK_BYTES + 1 if shape == "oversized chunk" else plan["chunk bytes"]
    chunks = [pb.MaskedInputRequest(chunk=pb.Chunk(data=payload[i : i + cut])) for i in range(0, len(payload), cut)]
    header = pb.MaskedInputRequest(header=ref)
    requests = {
        "chunk first": chunks[:1] + [header] + chunks[1:],
        "two headers": [header] + chunks[:1] + [header] + chunks[1:],
        "header only": [header],
        "empty": [],
    }.get(shape, [header, *chunks])
    return list(requests), (set() if shape == "right length" else {IA})


def _join_call(plan: dict[str, Any], world: World, cohort: HonestCohort) -> PlannedCall:
    job = plan["join job"]
    client = plan["join client"]
    if client == "member":  # a member of this or an earlier cohort asks again
        known = cohort.client_ids + world.client_ids
        client = known[plan["pick"] % len(known)]
    request = pb.JoinCohortRequest(job_id=job, client_id=client, wait_timeout_ms=plan["wait ms"])
    allowed = {SECURE: {OK}, PLAIN: {FP}}.get(job, {NF})
    if job in (SECURE, PLAIN) and (not client or len(client) > MAX_ID_LENGTH):
        allowed = {IA, FP}
    return PlannedCall(world.rpcs["JoinCohort"], [request], frozenset(allowed), f"join {job} as {client[:20]!r}")


# -- push streams: a valid update with known defects -------------------------------------

_ITEM_BYTES = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_FLOAT16: 2, pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_UINT8: 1, pb.DTYPE_UINT32: 4}


def _declare(header: pb.TensorHeader) -> None:
    """Make payload_bytes agree with the specs, so that only the defect drawn is wrong."""
    header.payload_bytes = sum(math.prod(s.shape) * _ITEM_BYTES.get(s.dtype, 4) for s in header.tensors if all(d >= 0 for d in s.shape)) % (1 << 64)


@dataclass
class PushDraft:
    data: st.DataObject
    shadow: PlainShadow
    header: pb.UpdateHeader
    delta: dict[str, np.ndarray]
    requests: list[pb.PushRequest] = field(default_factory=list)


def _draw(draft: PushDraft, strategy: st.SearchStrategy[Any]) -> Any:
    return draft.data.draw(strategy)


def _tensor(draft: PushDraft) -> pb.TensorSpec:
    tensors = draft.header.header.tensors
    spec: pb.TensorSpec = tensors[_draw(draft, st.integers(0, len(tensors) - 1))]
    return spec


def _set_field(name: str, values: Callable[[PushDraft], st.SearchStrategy[Any]]) -> Callable[[PushDraft], None]:
    return lambda draft: setattr(draft.header, name, _draw(draft, values(draft)))


def _duplicate_name(draft: PushDraft) -> None:
    draft.header.header.tensors.add().CopyFrom(draft.header.header.tensors[0])
    _declare(draft.header.header)


def _empty_name(draft: PushDraft) -> None:
    _tensor(draft).name = ""


def _wrong_dtype(draft: PushDraft) -> None:
    _tensor(draft).dtype = _draw(draft, st.sampled_from([pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_INT32, pb.DTYPE_UINT32]))
    _declare(draft.header.header)


def _unknown_dtype(draft: PushDraft) -> None:
    _tensor(draft).dtype = _draw(draft, st.sampled_from([0, 8, 99]))


def _reshape(shapes: list[list[int]]) -> Callable[[PushDraft], None]:
    def reshape(draft: PushDraft) -> None:
        spec = _tensor(draft)
        old = list(spec.shape)
        spec.ClearField("shape")
        spec.shape.extend(_draw(draft, st.sampled_from([s for s in shapes if s != old])))
        _declare(draft.header.header)

    return reshape


def _negative_dim(draft: PushDraft) -> None:
    spec = _tensor(draft)
    value = -_draw(draft, st.sampled_from([1, 4, 2**63]))
    if spec.shape:
        spec.shape[0] = value
    else:
        spec.shape.append(value)


def _reorder(draft: PushDraft) -> None:
    tensors = draft.header.header.tensors
    specs = [pb.TensorSpec.FromString(t.SerializeToString()) for t in tensors]
    del tensors[:]
    tensors.extend(reversed(specs) if len(specs) > 1 else specs * 2)  # one tensor left: a duplicate instead


def _missing_tensor(draft: PushDraft) -> None:
    # the first, not the last: "extra tensor" appends one, and must not be the one removed
    draft.header.header.tensors.pop(0)
    _declare(draft.header.header)


def _extra_tensor(draft: PushDraft) -> None:
    draft.header.header.tensors.add(name="layer.extra", dtype=pb.DTYPE_FLOAT32, shape=[2])
    _declare(draft.header.header)


def _payload_lie(draft: PushDraft) -> None:
    declared = draft.header.header.payload_bytes
    draft.header.header.payload_bytes = _draw(draft, st.sampled_from([0, 4, declared + 1, declared + 4, 2**64 - 1]).filter(lambda v: v != declared))


HEADER_DEFECTS: dict[str, tuple[frozenset[Code], Callable[[PushDraft], None]]] = {
    "unknown job": (frozenset({NF}), _set_field("job_id", lambda d: st.sampled_from(["", "nope", "PLAIN", "plain "]))),
    "secure job": (frozenset({FP}), _set_field("job_id", lambda d: st.just(SECURE))),
    "empty client": (frozenset({IA}), _set_field("client_id", lambda d: st.just(""))),
    "long client": (frozenset({IA}), _set_field("client_id", lambda d: st.just("c" * (MAX_ID_LENGTH + 1)))),
    "empty key": (frozenset({IA}), _set_field("idempotency_key", lambda d: st.just(""))),
    "long key": (frozenset({IA}), _set_field("idempotency_key", lambda d: st.sampled_from(["k" * (MAX_ID_LENGTH + 1), "k" * 5000]))),
    "no samples": (frozenset({IA}), _set_field("num_samples", lambda d: st.just(0))),
    "too many samples": (frozenset({IA}), _set_field("num_samples", lambda d: st.sampled_from([MAX_NUM_SAMPLES + 1, 2**64 - 1]))),
    "future base": (frozenset({FP}), _set_field("base_version", lambda d: st.sampled_from([1, 2, 2**63]).map(lambda v: d.shadow.version + v))),
    "duplicate name": (frozenset({IA}), _duplicate_name),
    "empty name": (frozenset({IA}), _empty_name),
    "wrong dtype": (frozenset({IA}), _wrong_dtype),
    "unknown dtype": (frozenset({IA}), _unknown_dtype),
    "wrong shape": (frozenset({IA}), _reshape([[3, 4], [2, 2], [12], [4, 3, 1], [], [0]])),
    "negative dim": (frozenset({IA}), _negative_dim),
    # past max_update_bytes (RESOURCE_EXHAUSTED) or past the 1 TiB any header may declare
    "huge dims": (frozenset({IA, RE}), _reshape([[1 << 20], [1 << 40], [1 << 31, 1 << 31], [2**63 - 1], [2**62, 4]])),
    "payload lie": (frozenset({IA}), _payload_lie),
    "reordered": (frozenset({IA}), _reorder),
    "missing tensor": (frozenset({IA}), _missing_tensor),
    "extra tensor": (frozenset({IA}), _extra_tensor),
}


def _poison(draft: PushDraft) -> None:
    name = _draw(draft, st.sampled_from(sorted(draft.delta)))
    flat = draft.delta[name].reshape(-1)
    flat[_draw(draft, st.integers(0, flat.size - 1))] = _draw(draft, st.sampled_from([math.nan, math.inf, -math.inf]))


def _truncate(draft: PushDraft) -> None:
    del draft.requests[_draw(draft, st.integers(1, len(draft.requests) - 1)) :]


def _chunk_first(draft: PushDraft) -> None:
    draft.requests.insert(0, draft.requests.pop(_draw(draft, st.integers(1, len(draft.requests) - 1))))


STREAM_DEFECTS: dict[str, Callable[[PushDraft], None]] = {
    "truncated": _truncate,
    "extra bytes": lambda d: d.requests.insert(_draw(d, st.integers(1, len(d.requests))), pb.PushRequest(chunk=pb.Chunk(data=bytes(_draw(d, st.integers(1, 8)))))),
    "oversized chunk": lambda d: d.requests.insert(1, pb.PushRequest(chunk=pb.Chunk(data=bytes(CHUNK_BYTES + 1)))),
    "chunk first": _chunk_first,
    "second header": lambda d: d.requests.insert(_draw(d, st.integers(1, len(d.requests))), d.requests[0]),
    "no header": lambda d: d.requests.__delitem__(0),
    "empty stream": lambda d: d.requests.clear(),
}
"""At most one per push: two of them could cancel out (cut 4 bytes, add 4)."""


def fuzz_push_streams(world: World) -> None:
    rpc = world.rpcs["Push"]

    @settings(FUZZ, max_examples=EXAMPLES_PUSH)
    @given(st.data())
    def push(data: st.DataObject) -> None:
        call = draw_push(data, world)
        world.send(rpc, call.requests, call.allowed, call.what)

    push()
    world.assert_serving()


ODD_TEXT = st.sampled_from(["\x00", "a\x00b", "\u00e9\u202e", "\U0001f600", "'; DROP TABLE update_log; --", " ", "%s", "\u65e5\u672c"]) | st.text(max_size=16)
"""Parts of client ids and idempotency keys: NUL, unicode, SQL, whatever
text. An accepted push carries them into the update log in SQLite."""


def draw_push(data: st.DataObject, world: World, client_for: Callable[[str], str] | None = None) -> PlannedCall:
    """One push; `client_for(job)` names the client pushing to `job`
    (default: a new client id for each push)."""
    rpc = world.rpcs["Push"]
    accepted = [a for s in world.shadows.values() for a in s.accepted.values()]
    kind = data.draw(st.sampled_from(["valid"] * 3 + ["defective"] * 8 + ["retry", "conflict"]), label="push kind")
    if kind in ("retry", "conflict"):
        pick = data.draw(st.integers(0, 2**16), label="earlier push")
        if not accepted:
            return PlannedCall(rpc, [], frozenset({IA}), "empty stream (nothing accepted yet to retry)")
        requests = [pb.PushRequest.FromString(r.SerializeToString()) for r in accepted[pick % len(accepted)].requests]
        if kind == "retry":  # the ack was lost: the same update again is counted once
            return PlannedCall(rpc, requests, frozenset({OK}), "retry of an accepted push")
        header = requests[0].update
        if data.draw(st.booleans(), label="conflict by client"):
            header.client_id += "-other"
            return PlannedCall(rpc, requests, frozenset({IA}), "idempotency key reused by another client")
        header.num_samples = 2 if header.num_samples == 1 else 1
        return PlannedCall(rpc, requests, frozenset({IA}), "idempotency key reused for another update")
    job = data.draw(st.sampled_from([PLAIN, SYNC]), label="job")
    shadow = world.shadows[job]
    serial = world.next_serial()
    staleness = min(data.draw(st.integers(0, 3), label="staleness"), shadow.version) if job == PLAIN else 0
    odd = data.draw(st.none() | ODD_TEXT, label="odd id text")
    key = uuid.UUID(int=serial).hex if odd is None else f"{odd}#{uuid.UUID(int=serial).hex}"
    if client_for is not None:
        client_id = client_for(job)
    else:
        client_id = f"pusher-{serial}" if odd is None else f"{odd}-{serial}"
    header = pb.UpdateHeader(
        job_id=job,
        client_id=client_id,
        idempotency_key=key,
        base_version=shadow.version - staleness,
        num_samples=data.draw(st.integers(1, 1000) | st.just(MAX_NUM_SAMPLES), label="samples"),
        header=header_to_pb(SPECS),
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="delta seed"))
    scale = data.draw(st.sampled_from([1e-3, 0.1, 1.0]), label="scale")
    draft = PushDraft(data, shadow, header, {n: (rng.uniform(-1, 1, t.shape) * scale).astype(np.float32) for n, t in MODEL.items()})
    defects: list[str] = []
    if kind == "defective":
        defects = data.draw(st.lists(st.sampled_from(sorted(HEADER_DEFECTS) + ["stale base"]), max_size=2, unique=True), label="header defects")
        defects += ["nan or inf"] if data.draw(st.booleans(), label="value defect") else []
        defects += [data.draw(st.sampled_from(sorted(STREAM_DEFECTS)), label="stream defect")] if not defects or data.draw(st.booleans()) else []
    allowed: set[Code] = set()
    for name in defects:
        if name == "stale base":
            # past max_staleness (plain) or a closed round (sync); before any, a future base instead
            oldest_refused = shadow.version - (4 if job == PLAIN else 1)
            raw = data.draw(st.integers(0, 2**16), label="stale base")
            header.base_version = raw % (oldest_refused + 1) if oldest_refused >= 0 else shadow.version + 1
            if job == SYNC and shadow.round and raw % 2:
                header.base_version, header.client_id = shadow.version, shadow.round[0][0]  # already pushed this round
            allowed.add(FP)
        elif name in HEADER_DEFECTS:
            codes, apply = HEADER_DEFECTS[name]
            apply(draft)
            allowed |= codes
    if "nan or inf" in defects:
        _poison(draft)
        allowed.add(IA)
    chunk_bytes = data.draw(st.sampled_from([PAYLOAD_BYTES, 32, 16, 7, 1]), label="chunk bytes")
    draft.requests = [pb.PushRequest(update=header)] + [
        pb.PushRequest(chunk=pb.Chunk(data=c)) for c in iter_chunks(draft.delta.values(), chunk_bytes)
    ]
    for name in defects:
        if name in STREAM_DEFECTS:
            STREAM_DEFECTS[name](draft)
            allowed.add(IA)
    return PlannedCall(rpc, list(draft.requests), frozenset(allowed or {OK}), f"{kind} push to {job}: {', '.join(defects) or 'no defect'}")


# -- inconsistent messages of every RPC, from the descriptors ---------------------------


def vocabulary(world: World) -> Vocabulary:
    """Live values that make generated messages reach past the first check:
    real job ids, model tensor names, cohort ids and tokens of finished
    cohorts, idempotency keys already used, payloads of the right size."""
    rng = np.random.default_rng(0)
    finite = b"".join(iter_chunks([(rng.uniform(-1, 1, t.shape)).astype(np.float32) for t in MODEL.values()]))
    nan = np.full(PAYLOAD_BYTES // 4, np.nan, np.float32).tobytes()

    def refs() -> list[pb.MemberRef]:
        return world.stale_refs or [pb.MemberRef(job_id=SECURE, cohort_id="ghost")]

    return {
        "job_id": lambda: [PLAIN, SYNC, SECURE, "nope"],
        "name": lambda: [s.name for s in SPECS],
        "dtype": lambda: [pb.DTYPE_FLOAT32],
        "payload_bytes": lambda: [PAYLOAD_BYTES, 48, 16],
        "cohort_id": lambda: world.cohort_ids or ["ghost"],
        "token": lambda: [r.token for r in refs()],
        "member": lambda: [1, 2, 3],
        "peer": lambda: [1, 2, 3],
        "client_id": lambda: world.client_ids or ["nobody"],
        "idempotency_key": lambda: [k for s in world.shadows.values() for k in s.accepted] or ["unused"],
        "base_version": lambda: [s.version for s in world.shadows.values()],
        "min_version": lambda: [s.version + 1 for s in world.shadows.values()],
        "data": lambda: [finite, nan, finite[:16], finite[16:], bytes(MASKED_LENGTH * 4)],
        "UpdateHeader.header": lambda: [header_to_pb(SPECS)],
        "MaskedInputRequest.header": refs,
        "KeyAdvertMessage.sender": refs,
        "SealedSharesMessage.sender": refs,
        "UnmaskResponseMessage.sender": refs,
    }


def generic_allowed(world: World, rpc: Rpc, requests: Sequence[bytes | Message]) -> frozenset[Code]:
    if rpc.service != SERVICE_NAME:
        # The Admin service exists only with auth on (this server runs without):
        # gRPC itself answers, whatever was sent.
        return frozenset({Code.UNIMPLEMENTED})
    allowed = set(REFUSALS)
    if rpc.service != SERVICE_NAME or rpc.method not in COHORT_RPCS:
        allowed.add(OK)
    else:
        allowed.add(ABORTED)  # a cohort that aborted, or one this server does not know
        if rpc.method == "Unmask" and world.cohorts_completed:
            allowed.add(OK)  # a member of a completed cohort (its real token) asking again for its outcome
    if any(isinstance(r, bytes) and not parses(rpc.request_type, r) for r in requests):
        allowed.add(Code.INTERNAL)
    return frozenset(allowed)


def fuzz_inconsistent_messages(world: World) -> None:
    words = vocabulary(world)
    for rpc in all_rpcs():

        @settings(FUZZ, max_examples=EXAMPLES_INCONSISTENT)
        @given(request_lists(rpc, messages(rpc.request_type.DESCRIPTOR, words)))
        def inconsistent(requests: list[Message]) -> None:
            world.send(rpc, requests, generic_allowed(world, rpc, requests), "generated message")

        inconsistent()
        world.assert_serving()


# -- random bytes -------------------------------------------------------------------------


def fuzz_random_bytes(world: World) -> None:
    words = vocabulary(world)
    for rpc in all_rpcs():

        @settings(FUZZ, max_examples=EXAMPLES_RANDOM)
        @given(request_lists(rpc, random_payloads(rpc, words)))
        def random_bytes(requests: list[bytes]) -> None:
            world.send(rpc, requests, generic_allowed(world, rpc, requests), "random bytes")

        random_bytes()
        world.assert_serving()


