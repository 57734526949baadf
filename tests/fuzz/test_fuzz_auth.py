"""Fuzz a server running with authentication and a state directory: the
Admin service, and the credential checks in front of every RPC.

test_fuzz_rpcs.py fuzzes a server without auth, where the Admin service does
not exist. This one runs the same jobs with `auth=True`, an admin token file
and a state directory, against shadows of the enrolments and of every model,
and reads the state directory's SQLite file after every call. Four parts:

  admin            the Admin service with the admin token: planned
                   enrolments, rotations and revocations of new, known and odd
                   client ids (NUL, unicode, 129 characters...), then generated
                   messages and random bytes for each Admin RPC. The expected
                   code is exact: OK, INVALID_ARGUMENT, NOT_FOUND or
                   ALREADY_EXISTS, INTERNAL only for bytes that do not parse.
                   An OK must agree with the shadow (ListClients, Status, the
                   auth tables in SQLite); a new token must work at once, and
                   the token it replaced, or a revoked one, must stop working.
  client pushes    pushes from enrolled clients (the push fuzz of
                   test_fuzz_rpcs with the client's own id), some valid, some
                   naming another client id or a job the client is not enrolled
                   in, and generated messages and random bytes of every
                   Tributary RPC with a client's token
  bad credentials  every RPC of every service with no token, a malformed
                   `authorization` value, a random, revoked or replaced token,
                   the admin token on Tributary RPCs and a client token on
                   Admin RPCs
  the end          the model of every job equals the initial model plus
                   exactly the acknowledged updates, and the update log in
                   SQLite holds exactly their idempotency keys, each once;
                   then the server restarts on its state directory: the same
                   models and enrolments come back, every acknowledged push
                   sent again gets its first ack (odd keys read back from
                   SQLite included), and a revoked client stays refused

Where a request names a job or a client, the servicer checks the token's
rights first (server/servicer.py; `auth_refusal` below restates the order):
only a request that is malformed before the servicer can read those names
(bytes that do not parse: INTERNAL; a push or masked upload whose first
message is not its header: INVALID_ARGUMENT) is refused otherwise. A client
token naming a job it is not enrolled in, or another client id, is
PERMISSION_DENIED whatever else is wrong with the request; an empty client id
is no claim to be someone else, and the usual checks refuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import tributary_pb2 as pb
from server import ServerConfig
from server.app import RunningServer, running_server
from tests.fuzz.durable import StateDb
from tests.fuzz.shadow import PlainShadow, SecureShadow
from tests.fuzz.test_fuzz_rpcs import (
    FUZZ,
    IA,
    MODEL,
    NF,
    ODD_TEXT,
    OK,
    PLAIN,
    SECURE,
    SYNC,
    TRIBUTARY_RPCS,
    Code,
    PlannedCall,
    World,
    _as,
    draw_push,
    generic_allowed,
    server_config,
    vocabulary,
)
from tests.fuzz.wire import Caller, Outcome, Rpc, Vocabulary, all_rpcs, messages, parses, random_payloads, request_lists

UNAUTHENTICATED, DENIED, EXISTS, INTERNAL = Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.ALREADY_EXISTS, Code.INTERNAL
ADMIN_SERVICE = "tributary.v1.Admin"
ADMIN_RPCS = {rpc.method: rpc for rpc in all_rpcs() if rpc.service == ADMIN_SERVICE}
ADMIN_TOKEN = "trb_admin_fuzz_" + "0123456789abcdef" * 3
JOBS = (PLAIN, SYNC, SECURE)
OWNERS = {"owner-1": frozenset({PLAIN, SYNC, SECURE}), "owner-2": frozenset({PLAIN, SYNC}), "owner-3": frozenset({PLAIN})}
"""Enrolled clients that push; two of them in the fedavg job, which needs two
clients a round. The admin part may rotate or revoke them; they are enrolled
again, with these jobs, before the client part."""
OWNER_IDS = sorted(OWNERS)
CLIENT_ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
"""The client ids the Admin service enrols, as its error message states them."""
ODD_CLIENT_IDS = ["x" * 128, "x" * 129, "0", "a:b@c.d-e_f", "-lead", ".", "a b", "a\x00b", "\u00e9", "owner-1 ", "OWNER-1", "", "\U0001f600", "a/b", "ghost"]

EXAMPLES_ADMIN_PLANNED = 250
EXAMPLES_ADMIN_GENERATED = 80
EXAMPLES_ADMIN_RANDOM = 50
EXAMPLES_PUSH = 350
EXAMPLES_CLIENT_PLANNED = 150
EXAMPLES_CLIENT_MESSAGES = 70
EXAMPLES_BAD_CREDENTIALS = 60
MIN_MESSAGES_TOTAL = 4_000
MIN_MESSAGES_PER_RPC = 100


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class Enrolment:
    token: str
    jobs: frozenset[str]
    active: bool = True


@dataclass(frozen=True)
class Check:
    """A call made to confirm what an admin answer claimed (a token works, or not)."""

    token: str
    job_id: str
    code: Code
    details: str = ""


class Restartable:
    """A server that can be stopped and started again on its state directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._stack = contextlib.ExitStack()

    def start(self) -> tuple[RunningServer, grpc.Channel]:
        running = self._stack.enter_context(running_server(self.config, {job: MODEL for job in JOBS}, grace_s=0.5))
        return running, self._stack.enter_context(grpc.insecure_channel(running.address))

    def stop(self) -> None:
        self._stack.close()


@dataclass
class AuthWorld(World):
    server: Restartable | None = None
    db: StateDb | None = None
    enrolments: dict[str, Enrolment] = field(default_factory=dict)
    revoked_tokens: list[str] = field(default_factory=list)
    replaced_tokens: list[str] = field(default_factory=list)
    tokens_issued: set[str] = field(default_factory=set)
    checks: list[Check] = field(default_factory=list)
    fresh: Iterator[int] = field(default_factory=itertools.count)

    # -- the shadow of the enrolments ---------------------------------------------------

    def check_state(self) -> None:
        super().check_state()
        registry = self.running.registry
        assert registry is not None and self.db is not None
        clients = {c.client_id: c for c in registry.clients()}
        assert set(clients) == set(self.enrolments), (sorted(clients), sorted(self.enrolments))
        for client_id, enrolment in self.enrolments.items():
            client = clients[client_id]
            assert (client.job_ids, client.active) == (enrolment.jobs, enrolment.active), (client, enrolment)
        expected = {c: (digest(e.token), e.jobs, not e.active) for c, e in self.enrolments.items()}
        assert self.db.enrolments() == expected, "the auth tables in SQLite differ from the enrolments acknowledged"
        self.db.check_update_log(self.accepted_keys())

    def ok_judge(self, rpc: Rpc) -> Callable[[Any, Any, Sequence[bytes]], None] | None:
        if rpc.service == ADMIN_SERVICE:
            return ADMIN_OK_JUDGES[rpc.method]
        return super().ok_judge(rpc)

    def send(
        self,
        rpc: Rpc,
        requests: Sequence[bytes | Message],
        allowed: frozenset[Code],
        what: str,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> Outcome:
        """Send and judge; then confirm what an admin answer claimed about tokens."""
        outcome = super().send(rpc, requests, allowed, what, metadata)
        while self.checks:
            check = self.checks.pop(0)
            confirmed = super().send(
                TRIBUTARY_RPCS["GetJob"], [pb.GetJobRequest(job_id=check.job_id)], frozenset({check.code}), f"token check: {check.code.name}", bearer(check.token)
            )
            assert check.details in confirmed.details, (check, confirmed.details)
        return outcome

    def restart(self) -> None:
        assert self.server is not None and self.db is not None and self.state_dir is not None
        self.db.close()
        self.server.stop()
        self.running, self.channel = self.server.start()
        self.caller.channel = self.channel
        self.db = StateDb(self.state_dir)

    def fresh_id(self) -> str:
        return f"fuzz-{next(self.fresh)}"

    def known_ids(self) -> list[str]:
        return sorted(self.enrolments) or ["nobody"]

    def active_tokens(self) -> list[str]:
        return [e.token for _, e in sorted(self.enrolments.items()) if e.active]

    def owner(self, client_id: str) -> Enrolment:
        enrolment = self.enrolments[client_id]
        assert enrolment.active, client_id
        return enrolment

    def expect_enrol(self, request: pb.EnrolClientRequest) -> Code:
        """The Admin service's order: every job must exist, then the client id
        must be well-formed, then name a job, then not be active (unless rotated)."""
        if any(job not in JOBS for job in request.job_ids):
            return NF
        if not CLIENT_ID_RULE.fullmatch(request.client_id) or not request.job_ids:
            return IA
        known = self.enrolments.get(request.client_id)
        return EXISTS if known is not None and known.active and not request.rotate else OK

    def admin_allowed(self, rpc: Rpc, requests: Sequence[bytes | Message]) -> frozenset[Code]:
        raw = requests[0]
        if isinstance(raw, bytes) and not parses(rpc.request_type, raw):
            return frozenset({INTERNAL})
        request = _as(rpc.request_type, raw)
        if rpc.method == "EnrolClient":
            return frozenset({self.expect_enrol(request)})
        if rpc.method == "RevokeClient":
            return frozenset({OK if request.client_id in self.enrolments else NF})
        assert rpc.method in ("Status", "ListClients"), f"no expectation for Admin.{rpc.method}: add one"
        return frozenset({OK})

    def admin(self, rpc: Rpc, requests: Sequence[bytes | Message], what: str) -> None:
        self.send(rpc, requests, self.admin_allowed(rpc, requests), what, bearer(ADMIN_TOKEN))


# -- what an OK from the Admin service must mean ------------------------------------------


def judge_enrol(world: AuthWorld, requests: list[pb.EnrolClientRequest], responses: Sequence[bytes]) -> None:
    request, answer = requests[0], pb.EnrolledClientToken.FromString(responses[0])
    assert answer.client_id == request.client_id and list(answer.job_ids) == sorted(set(request.job_ids)), answer
    assert answer.token.startswith("trb_") and not answer.token.startswith("trb_admin_"), answer.token
    assert answer.token not in world.tokens_issued, "a token was issued twice"
    world.tokens_issued.add(answer.token)
    before = world.enrolments.get(request.client_id)
    world.enrolments[request.client_id] = Enrolment(answer.token, frozenset(request.job_ids))
    world.checks.append(Check(answer.token, sorted(request.job_ids)[0], OK))
    if before is not None and before.active:  # a rotation: the old token stops working at once
        world.replaced_tokens.append(before.token)
        world.checks.append(Check(before.token, sorted(before.jobs)[0], UNAUTHENTICATED, "not valid on this server"))
    world.cases["enrolment rotated" if before is not None and before.active else "client enrolled"] += 1


def judge_revoke(world: AuthWorld, requests: list[pb.RevokeClientRequest], responses: Sequence[bytes]) -> None:
    request, answer = requests[0], pb.RevokeClientResponse.FromString(responses[0])
    enrolment = world.enrolments[request.client_id]
    assert (answer.client_id, answer.was_active) == (request.client_id, enrolment.active), answer
    if enrolment.active:
        enrolment.active = False
        world.revoked_tokens.append(enrolment.token)
        world.checks.append(Check(enrolment.token, sorted(enrolment.jobs)[0], UNAUTHENTICATED, "was revoked at"))
        world.cases["client revoked"] += 1


def judge_list(world: AuthWorld, requests: list[pb.ListClientsRequest], responses: Sequence[bytes]) -> None:
    clients = pb.ClientList.FromString(responses[0]).clients
    assert [c.client_id for c in clients] == sorted(world.enrolments), "ListClients differs from the enrolments acknowledged"
    now_ms = time.time() * 1000 + 1000
    for client in clients:
        enrolment = world.enrolments[client.client_id]
        assert (list(client.job_ids), client.revoked) == (sorted(enrolment.jobs), not enrolment.active), client
        assert 0 < client.created_unix_ms < now_ms, client
        assert (client.revoked_unix_ms >= client.created_unix_ms) if client.revoked else client.revoked_unix_ms == 0, client


def judge_status(world: AuthWorld, requests: list[pb.ServerStatusRequest], responses: Sequence[bytes]) -> None:
    jobs = pb.ServerStatus.FromString(responses[0]).jobs
    assert [j.job_id for j in jobs] == sorted(JOBS), jobs
    for job in jobs:
        version, _ = world.expected_model(job.job_id)
        shadow = world.shadows.get(job.job_id)
        accepted, pending = (len(shadow.accepted), len(shadow.round)) if shadow else (0, 0)
        enrolled = sum(1 for e in world.enrolments.values() if e.active and job.job_id in e.jobs)
        assert (job.version, job.updates_accepted, job.pending_updates, job.enrolled_clients) == (version, accepted, pending, enrolled), job


ADMIN_OK_JUDGES: dict[str, Callable[[Any, Any, Sequence[bytes]], None]] = {
    "EnrolClient": judge_enrol,
    "RevokeClient": judge_revoke,
    "ListClients": judge_list,
    "Status": judge_status,
}


# -- the world --------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> Iterator[AuthWorld]:
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(ADMIN_TOKEN + "\n")
    admin_file.chmod(0o600)
    server = Restartable(replace(server_config(tmp_path / "state"), auth=True, admin_token_file=admin_file))
    running, channel = server.start()
    world = AuthWorld(
        running,
        channel,
        Caller(channel),
        shadows={
            PLAIN: PlainShadow(PLAIN, "fedbuff", dict(MODEL), max_staleness=3),
            SYNC: PlainShadow(SYNC, "fedavg", dict(MODEL), max_staleness=None),
        },
        secure=SecureShadow(SECURE, dict(MODEL)),
        state_dir=tmp_path / "state",
        server=server,
        db=StateDb(tmp_path / "state"),
    )
    try:
        yield world
    finally:
        assert world.db is not None
        world.db.close()
        server.stop()


def test_auth_server_survives_fuzzing(world: AuthWorld) -> None:
    print()
    parts: list[Callable[[AuthWorld], None]] = [
        fuzz_admin_plans,
        fuzz_admin_messages,
        enrol_owners,
        fuzz_client_pushes,
        fuzz_client_messages,
        retire_some_tokens,
        fuzz_bad_credentials,
    ]
    for part in parts:
        sent_before, started = sum(world.caller.sent.values()), time.monotonic()
        part(world)
        print(f"{part.__name__}: {sum(world.caller.sent.values()) - sent_before} messages in {time.monotonic() - started:.1f} s")
        world.assert_serving()
    print(world.caller.table())
    print(dict(sorted(world.cases.items(), key=lambda kv: -kv[1])[:12]))

    world.check_state()  # models, enrolments, and the update log in SQLite: exactly the acked updates, once each
    for job_id, shadow in world.shadows.items():
        assert world.running.core.job(job_id).stats.updates_accepted == len(shadow.accepted), job_id
        assert shadow.version > 0, f"no update was ever applied to {job_id!r}: the exact-model check checked nothing"
    keys = [key for keys in world.accepted_keys().values() for key in keys]
    assert any("\x00" in key or not key.isascii() for key in keys), "no odd idempotency key reached SQLite"
    assert world.cases["client enrolled"] >= 20 and world.cases["enrolment rotated"] >= 3 and world.cases["client revoked"] >= 3, world.cases

    sent, codes = world.caller.sent, world.caller.codes
    assert sum(sent.values()) >= MIN_MESSAGES_TOTAL, world.caller.table()
    for rpc in all_rpcs():
        assert sent[rpc.name] >= MIN_MESSAGES_PER_RPC, f"{rpc.name} got only {sent[rpc.name]} messages"
        for code in (UNAUTHENTICATED, DENIED, OK):
            assert codes[(rpc.name, code.name)] or (code is OK and rpc.method in COHORT_STEPS), f"{rpc.name} never answered {code.name}"
    assert {"UNKNOWN", "DEADLINE_EXCEEDED"}.isdisjoint(code for _, code in codes)

    sent_before = sum(sent.values())
    restart_and_retry(world)
    print(f"restart_and_retry: {sum(sent.values()) - sent_before} messages")
    assert {"UNKNOWN", "DEADLINE_EXCEEDED"}.isdisjoint(code for _, code in codes)


def restart_and_retry(world: AuthWorld) -> None:
    """After a restart on the state directory: the same models, enrolments and
    counts; every acknowledged push, sent again, gets its first ack (its key
    read back from SQLite); the revoked client's are refused."""
    world.restart()
    assert set(world.running.recovered) == set(JOBS), world.running.recovered
    world.check_state()
    for job_id, shadow in world.shadows.items():
        assert world.running.core.job(job_id).stats.updates_accepted == len(shadow.accepted), job_id
    push = TRIBUTARY_RPCS["Push"]
    retried = 0
    for shadow in world.shadows.values():
        for accepted in list(shadow.accepted.values()):
            enrolment = world.enrolments[accepted.client_id]
            if enrolment.active:
                as_client(world, PlannedCall(push, accepted.requests, frozenset({OK}), "retry after a restart"), accepted.client_id)
                retried += 1
            else:
                world.send(push, accepted.requests, frozenset({UNAUTHENTICATED}), "retry after a restart, revoked", bearer(enrolment.token))
    assert retried and world.cases["retry after a restart, revoked"], "the restart check retried nothing, or nothing revoked"
    for job_id, shadow in world.shadows.items():
        job = world.running.core.job(job_id)
        assert job.stats.duplicates >= sum(1 for a in shadow.accepted.values() if world.enrolments[a.client_id].active), job_id
    world.assert_serving()


COHORT_STEPS = {"AdvertiseKeys", "ShareKeys", "GetUploadSlot", "UploadMasked", "Unmask"}
"""No cohort runs here: these steps can only be refused."""


# -- admin --------------------------------------------------------------------------------

ADMIN_PLAN = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["enrol"] * 4 + ["rotate"] * 3 + ["revoke"] * 3 + ["Status", "ListClients"]),
        "who": st.sampled_from(["fresh", "fresh", "known", "known", "odd"]),
        "pick": st.integers(0, 2**16),
        "odd": st.sampled_from(ODD_CLIENT_IDS) | ODD_TEXT,
        "jobs": st.lists(st.sampled_from(JOBS), min_size=1, max_size=3) | st.lists(st.sampled_from([*JOBS, "nope", "", "PLAIN", PLAIN + "\x00"]), max_size=3),
    }
)


def fuzz_admin_plans(world: AuthWorld) -> None:
    """Enrolments, rotations and revocations of new, known and odd client ids."""

    @settings(FUZZ, max_examples=EXAMPLES_ADMIN_PLANNED)
    @given(ADMIN_PLAN)
    def planned(plan: dict[str, Any]) -> None:
        op = plan["op"]
        if op in ("Status", "ListClients"):
            request: Message = ADMIN_RPCS[op].request_type()
            world.admin(ADMIN_RPCS[op], [request], op)
            return
        known = world.known_ids()
        client_id = {"fresh": world.fresh_id(), "known": known[plan["pick"] % len(known)], "odd": plan["odd"]}[plan["who"]]
        if op == "revoke":
            world.admin(ADMIN_RPCS["RevokeClient"], [pb.RevokeClientRequest(client_id=client_id)], f"revoke a {plan['who']} client")
        else:
            request = pb.EnrolClientRequest(client_id=client_id, job_ids=plan["jobs"], rotate=op == "rotate")
            world.admin(ADMIN_RPCS["EnrolClient"], [request], f"{op} a {plan['who']} client")

    planned()


def admin_vocabulary(world: AuthWorld) -> Vocabulary:
    return {
        "client_id": lambda: [*world.known_ids(), world.fresh_id(), *ODD_CLIENT_IDS[:4]],
        "job_ids": lambda: [*JOBS, "nope"],
    }


def fuzz_admin_messages(world: AuthWorld) -> None:
    """Generated messages, then random bytes, for every Admin RPC, with the admin token."""
    words = admin_vocabulary(world)
    for rpc in ADMIN_RPCS.values():
        for name, single, examples in (
            ("generated message", messages(rpc.request_type.DESCRIPTOR, words), EXAMPLES_ADMIN_GENERATED),
            ("random bytes", random_payloads(rpc, words), EXAMPLES_ADMIN_RANDOM),
        ):

            @settings(FUZZ, max_examples=examples)
            @given(request_lists(rpc, single))
            def admin_call(requests: list[Message | bytes]) -> None:
                world.admin(rpc, requests, name)

            admin_call()


def enrol_owners(world: AuthWorld) -> None:
    """The clients that push, enrolled (again) in their jobs whatever the admin part did to them."""
    for client_id, jobs in OWNERS.items():
        request = pb.EnrolClientRequest(client_id=client_id, job_ids=sorted(jobs), rotate=True)
        world.send(ADMIN_RPCS["EnrolClient"], [request], frozenset({OK}), "enrol an owner", bearer(ADMIN_TOKEN))


def retire_some_tokens(world: AuthWorld) -> None:
    """A revoked owner and a rotated one, so that their old tokens are tried below."""
    world.admin(ADMIN_RPCS["RevokeClient"], [pb.RevokeClientRequest(client_id="owner-3")], "revoke an owner")
    world.admin(ADMIN_RPCS["EnrolClient"], [pb.EnrolClientRequest(client_id="owner-2", job_ids=sorted(OWNERS["owner-2"]), rotate=True)], "rotate an owner")
    assert world.revoked_tokens and world.replaced_tokens


# -- enrolled clients -------------------------------------------------------------------------


def _job_and_client(method: str, first: Any) -> tuple[str, str] | None:
    """The job and client id the servicer authorizes for a request whose first
    message is `first`; None when it refuses the request before that (a push or
    masked upload that does not start with its header)."""
    if method == "Push":
        return (first.update.job_id, first.update.client_id) if first.WhichOneof("kind") == "update" else None
    if method == "UploadMasked":
        return (first.header.job_id, "") if first.WhichOneof("kind") == "header" else None
    if method in ("AdvertiseKeys", "ShareKeys", "Unmask"):
        return first.sender.job_id, ""
    if method in ("JoinCohort", "Heartbeat", "AcquireTrainingSlot", "GetUploadOffset", "ReportEvaluation"):
        return first.job_id, first.client_id
    if method in ("GetJob", "Pull", "GetUploadSlot", "GetVersionHistory"):
        return first.job_id, ""
    raise AssertionError(f"no rule for Tributary.{method}: say which job and client it names")


def auth_refusal(rpc: Rpc, requests: Sequence[bytes | Message], client_id: str, jobs: frozenset[str]) -> Code | None:
    """PERMISSION_DENIED when the servicer's check of the token's rights
    refuses the request; None when the request passes it, or is refused before
    it (no message, bytes that do not parse, a stream without its header)."""
    if not requests:
        return None
    first = requests[0]
    if isinstance(first, bytes):
        if not parses(rpc.request_type, first):
            return None
        first = rpc.request_type.FromString(first)
    named = _job_and_client(rpc.method, first)
    if named is None:
        return None
    job_id, named_client = named
    if job_id not in jobs or (named_client and named_client != client_id):
        return DENIED
    return None


def client_allowed(world: AuthWorld, rpc: Rpc, requests: Sequence[bytes | Message], client_id: str) -> frozenset[Code]:
    refusal = auth_refusal(rpc, requests, client_id, world.owner(client_id).jobs)
    return frozenset({refusal}) if refusal is not None else generic_allowed(world, rpc, requests)


def as_client(world: AuthWorld, call: PlannedCall, client_id: str) -> None:
    """Send `call` with `client_id`'s token; what it may answer follows from
    the auth rule first, from the call's own expectation otherwise."""
    refusal = auth_refusal(call.rpc, call.requests, client_id, world.owner(client_id).jobs)
    allowed = frozenset({refusal}) if refusal is not None else call.allowed
    world.send(call.rpc, call.requests, allowed, f"{call.what}, as {client_id}", bearer(world.owner(client_id).token))


def other_client_ids(world: AuthWorld, client_id: str) -> list[str]:
    """Ids a client might claim that are not its own."""
    others = [c for c in world.known_ids() if c != client_id][:20]
    return [*others, client_id.upper(), client_id + " ", client_id + "\x00", " " + client_id, client_id[:-1], "nobody", "\u00f6wner-1"]


PUSH_AS = st.fixed_dictionaries(
    {
        "owner": st.integers(0, len(OWNER_IDS) - 1),
        "twist": st.sampled_from(["none"] * 5 + ["other client id", "job not enrolled in"]),
        "pick": st.integers(0, 2**16),
    }
)


def fuzz_client_pushes(world: AuthWorld) -> None:
    """The push fuzz of test_fuzz_rpcs, from enrolled clients with their own
    ids (valid pushes, defects, retries), and pushes naming another client or
    a job the client is not enrolled in."""

    @settings(FUZZ, max_examples=EXAMPLES_PUSH)
    @given(st.data())
    def push(data: st.DataObject) -> None:
        plan: dict[str, Any] = data.draw(PUSH_AS, label="as whom")
        acting = OWNER_IDS[plan["owner"]]

        def client_for(job: str) -> str:
            nonlocal acting
            acting = pusher(world, job, acting)
            return acting

        call = draw_push(data, world, client_for)
        first = call.requests[0] if call.requests else None
        if isinstance(first, pb.PushRequest) and first.WhichOneof("kind") == "update":
            header = first.update
            if call.what == "retry of an accepted push" and header.client_id in OWNERS:
                acting = header.client_id  # the client whose ack was lost retries
            if plan["twist"] == "other client id":
                others = other_client_ids(world, acting)
                header.client_id = others[plan["pick"] % len(others)]
            elif plan["twist"] == "job not enrolled in":
                foreign = [j for j in [*JOBS, "nope", ""] if j not in OWNERS[acting]]
                header.job_id = foreign[plan["pick"] % len(foreign)]
        as_client(world, replace(call, what=f"{call.what} ({plan['twist']})"), acting)

    push()


def pusher(world: AuthWorld, job_id: str, preferred: str) -> str:
    """`preferred`, unless it already pushed in the open fedavg round (one push
    a round each): then another active client of that job."""
    pushed = {client for client, _, _ in world.shadows[SYNC].round}
    if job_id != SYNC or preferred not in pushed:
        return preferred
    others = [c for c in OWNER_IDS if SYNC in OWNERS[c] and c not in pushed and world.enrolments[c].active]
    return others[0] if others else preferred


def client_vocabulary(world: AuthWorld) -> Vocabulary:
    words = vocabulary(world)
    words["client_id"] = lambda: OWNER_IDS * 3 + other_client_ids(world, "owner-1")
    words["job_id"] = lambda: [*JOBS, "nope"]
    return words


CLIENT_PLAN = st.fixed_dictionaries(
    {
        "owner": st.integers(0, len(OWNER_IDS) - 1),
        "rpc": st.sampled_from(["GetJob", "Pull", "JoinCohort"]),
        "job": st.sampled_from(["own"] * 3 + ["other"]),
        "client": st.sampled_from(["own"] * 3 + ["other", "empty"]),
        "pick": st.integers(0, 2**16),
        "wait ms": st.integers(0, 50),
    }
)


def fuzz_client_messages(world: AuthWorld) -> None:
    """Reads and cohort joins for jobs the client is enrolled in or not, as
    itself or not; then generated messages and random bytes of every Tributary
    RPC with an enrolled client's token, whatever job and client they name."""

    for client_id in OWNER_IDS:  # first each read and join in every job, as itself
        for job_id in [*JOBS, "nope"]:
            for request in (
                pb.GetJobRequest(job_id=job_id),
                pb.PullRequest(job_id=job_id),
                pb.JoinCohortRequest(job_id=job_id, client_id=client_id),
                pb.HeartbeatRequest(job_id=job_id, client_id=client_id, state=pb.CLIENT_STATE_IDLE),
                pb.TrainingSlotRequest(job_id=job_id, client_id=client_id, device=pb.DeviceState(charging=True)),
                pb.VersionHistoryRequest(job_id=job_id),
                pb.EvaluationReport(
                    job_id=job_id, client_id=client_id, version=0, num_examples=1, metrics={"accuracy": 0.5}, idempotency_key=f"eval-{job_id}"
                ),
            ):
                rpc = TRIBUTARY_RPCS[
                    {
                        pb.GetJobRequest: "GetJob", pb.PullRequest: "Pull", pb.HeartbeatRequest: "Heartbeat",
                        pb.TrainingSlotRequest: "AcquireTrainingSlot", pb.VersionHistoryRequest: "GetVersionHistory",
                        pb.EvaluationReport: "ReportEvaluation",
                    }.get(type(request), "JoinCohort")
                ]  # fmt: skip
                as_client(world, PlannedCall(rpc, [request], client_allowed(world, rpc, [request], client_id), "in every job"), client_id)

    @settings(FUZZ, max_examples=EXAMPLES_CLIENT_PLANNED)
    @given(CLIENT_PLAN)
    def planned(plan: dict[str, Any]) -> None:
        client_id = OWNER_IDS[plan["owner"]]
        jobs = sorted(OWNERS[client_id]) if plan["job"] == "own" else [j for j in [*JOBS, "nope", ""] if j not in OWNERS[client_id]]
        job_id = jobs[plan["pick"] % len(jobs)]
        others = other_client_ids(world, client_id)
        named = {"own": client_id, "other": others[plan["pick"] % len(others)], "empty": ""}[plan["client"]]
        rpc = TRIBUTARY_RPCS[plan["rpc"]]
        request: Message
        if plan["rpc"] == "GetJob":
            request = pb.GetJobRequest(job_id=job_id)
        elif plan["rpc"] == "Pull":
            request = pb.PullRequest(job_id=job_id, min_version=plan["pick"] % 2, wait_timeout_ms=plan["wait ms"])
        else:
            request = pb.JoinCohortRequest(job_id=job_id, client_id=named, wait_timeout_ms=plan["wait ms"])
        as_client(world, PlannedCall(rpc, [request], client_allowed(world, rpc, [request], client_id), f"planned {plan['rpc']}"), client_id)

    planned()
    words = client_vocabulary(world)
    for rpc in TRIBUTARY_RPCS.values():
        single = st.one_of(messages(rpc.request_type.DESCRIPTOR, words), random_payloads(rpc, words))

        @settings(FUZZ, max_examples=EXAMPLES_CLIENT_MESSAGES)
        @given(st.integers(0, len(OWNER_IDS) - 1), request_lists(rpc, single))
        def client_call(owner: int, requests: list[Message | bytes]) -> None:
            client_id = OWNER_IDS[owner]
            allowed = client_allowed(world, rpc, requests, client_id)
            what = "generated request" + (" (refused for auth)" if allowed == {DENIED} else "")
            world.send(rpc, requests, allowed, f"{what}, as {client_id}", bearer(world.owner(client_id).token))

        client_call()


# -- bad credentials ----------------------------------------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
"""What gRPC metadata values may hold: anything else never leaves the client."""

CREDENTIAL_KINDS = [
    "none", "other metadata", "empty", "scheme only", "wrong scheme", "glued", "junk after", "truncated",
    "random text", "random token", "revoked", "replaced", "two tokens", "admin token", "client token",
]  # fmt: skip
CREDENTIAL = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(CREDENTIAL_KINDS + ["admin token", "client token"]),
        "pick": st.integers(0, 2**16),
        "text": st.text(PRINTABLE, max_size=60),
        "scheme": st.sampled_from(["Basic", "Token", "Bearer:", "Digest", "bearer=", "Bearer\\"]),
    }
)


def credentials(world: AuthWorld, plan: dict[str, Any], service: str) -> tuple[tuple[tuple[str, str | bytes], ...], Code]:
    """Metadata that is no valid credential for `service`, and the code it must get."""
    kind, pick, text = plan["kind"], plan["pick"], plan["text"]
    live = [ADMIN_TOKEN, *world.active_tokens()]
    token = live[pick % len(live)]

    def one(pool: list[str]) -> str:
        return pool[pick % len(pool)] if pool else "trb_" + "z" * 43

    if kind == "admin token" and service != ADMIN_SERVICE:
        return bearer(ADMIN_TOKEN), DENIED
    if kind == "client token" and service == ADMIN_SERVICE:
        return bearer(one(world.active_tokens())), DENIED
    value = {
        "empty": "",
        "scheme only": ["Bearer", "Bearer ", "Bearer  ", "bearer"][pick % 4],
        "wrong scheme": f"{plan['scheme']} {token}",
        "glued": f"Bearer{token}",
        "junk after": f"Bearer {token} x{text}",
        "truncated": f"Bearer {token[:-1 - pick % 8]}",
        "random text": text,
        "random token": f"Bearer {['trb_', 'trb_admin_', ''][pick % 3]}{text.replace(' ', '') or 'x'}",
        "revoked": f"Bearer {one(world.revoked_tokens)}",
        "replaced": f"Bearer {one(world.replaced_tokens)}",
    }.get(kind)
    if kind == "two tokens":  # the server takes the first bearer token: a refused one, then one it would take
        first = one(world.revoked_tokens + world.replaced_tokens)
        second = ADMIN_TOKEN if service == ADMIN_SERVICE else one(world.active_tokens())
        return (("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}")), UNAUTHENTICATED
    if value is None:  # none; other metadata; the admin token on Admin or a client token on Tributary (tested elsewhere)
        metadata: tuple[tuple[str, str | bytes], ...] = ()
        if kind == "other metadata":
            metadata = (("x-api-key", token), ("authorization-bin", token.encode()))[pick % 2 : pick % 2 + 1]
        return metadata, UNAUTHENTICATED
    assert value.strip() not in {f"Bearer {t}" for t in live}, value
    return (("authorization", value),), UNAUTHENTICATED


def fuzz_bad_credentials(world: AuthWorld) -> None:
    """Every RPC of every service, any request, without a usable credential:
    refused before the request is read, and nothing changes; between them,
    now and then a valid push from an enrolled client."""
    words = client_vocabulary(world)
    for rpc in all_rpcs():
        for kind in CREDENTIAL_KINDS:  # first each kind of credential once, with an empty request
            metadata, code = credentials(world, {"kind": kind, "pick": 0, "text": "", "scheme": "Basic"}, rpc.service)
            world.send(rpc, [rpc.request_type()], frozenset({code}), f"{kind} credential", metadata)
        single = st.one_of(messages(rpc.request_type.DESCRIPTOR, words), random_payloads(rpc, words))

        @settings(FUZZ, max_examples=EXAMPLES_BAD_CREDENTIALS)
        @given(CREDENTIAL, request_lists(rpc, single), st.data())
        def refused(plan: dict[str, Any], requests: list[Message | bytes], data: st.DataObject) -> None:
            metadata, code = credentials(world, plan, rpc.service)
            world.send(rpc, requests, frozenset({code}), f"{plan['kind']} credential", metadata)
            if data.draw(st.integers(0, 9), label="push now") == 0:
                client_push(world, data)

        refused()


def client_push(world: AuthWorld, data: st.DataObject) -> None:
    """A push (valid, defective, a retry) from an enrolled client still active."""
    acting = "owner-1"

    def client_for(job: str) -> str:
        nonlocal acting
        acting = pusher(world, job, acting)
        return acting

    call = draw_push(data, world, client_for)
    first = call.requests[0] if call.requests else None
    if isinstance(first, pb.PushRequest) and first.WhichOneof("kind") == "update" and call.what == "retry of an accepted push":
        retrying = first.update.client_id
        acting = retrying if retrying in OWNERS and world.enrolments[retrying].active else acting
    as_client(world, call, acting)
