"""Every RPC of the wire contract, called with raw bytes, and messages of any
type generated from its descriptor.

The RPCs are read from the generated descriptors, so a service or method added
to tributary.proto is fuzzed without touching this file. Calls go through
`grpc.Channel` multi-callables without serializers: the fuzz sends arbitrary
bytes and reads the answers as bytes, then parses them itself.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

from proto import tributary_pb2 as pb

CALL_TIMEOUT_S = 2.0
"""Client deadline on every call: a handler that does not answer within it
is a hang, reported as DEADLINE_EXCEEDED and counted as a failure."""

LONG_POLL_FIELD = "wait_timeout_ms"
LONG_POLL_CAP_MS = 100
"""Requests carrying a documented long-poll wait (Pull, JoinCohort) ask for at
most this long, so any answer slower than CALL_TIMEOUT_S is a hang, not a wait."""

DESERIALIZE_FAILED = "Exception deserializing request!"
"""grpc's own INTERNAL answer to bytes that do not parse as the request type."""


@dataclass(frozen=True)
class Rpc:
    service: str
    method: str
    request_type: type[Message]
    response_type: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def name(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method}"


def all_rpcs() -> list[Rpc]:
    """Every method of every service in tributary.proto, from its descriptors."""
    rpcs = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            rpcs.append(
                Rpc(
                    service.full_name,
                    method.name,
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                    method.client_streaming,
                    method.server_streaming,
                )
            )
    return rpcs


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: tuple[bytes, ...]

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


def parses(message_type: type[Message], data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


def long_poll_ms(message: Message) -> int:
    """The wait a request asks the server for (0 when it has no such field)."""
    return int(getattr(message, LONG_POLL_FIELD, 0)) if LONG_POLL_FIELD in message.DESCRIPTOR.fields_by_name else 0


def within_long_poll_cap(message_type: type[Message], data: bytes) -> bool:
    """False for bytes that parse into a request asking for a long wait."""
    try:
        message = message_type.FromString(data)
    except DecodeError:
        return True
    return long_poll_ms(message) <= LONG_POLL_CAP_MS


@dataclass
class Caller:
    """Sends raw requests on one channel and counts every message sent."""

    channel: grpc.Channel
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(
        self,
        rpc: Rpc,
        requests: Sequence[bytes | Message],
        timeout_s: float = CALL_TIMEOUT_S,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> Outcome:
        """`metadata` replaces the caller's own for this call (credentials)."""
        credentials = self.metadata if metadata is None else tuple(metadata)
        raw = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
        if not rpc.client_streaming and len(raw) != 1:
            raise ValueError(f"{rpc.name} takes exactly one request, got {len(raw)}")
        with self._lock:
            self.sent[rpc.name] += len(raw)
        kind = ("stream" if rpc.client_streaming else "unary") + "_" + ("stream" if rpc.server_streaming else "unary")
        callable_ = getattr(self.channel, kind)(rpc.path, request_serializer=None, response_deserializer=None)
        argument: Any = iter(raw) if rpc.client_streaming else raw[0]
        responses: list[bytes] = []
        try:
            if rpc.server_streaming:
                for response in callable_(argument, timeout=timeout_s, metadata=credentials):
                    responses.append(response)
            else:
                responses.append(callable_(argument, timeout=timeout_s, metadata=credentials))
            outcome = Outcome(grpc.StatusCode.OK, "", tuple(responses))
        except grpc.RpcError as error:
            outcome = Outcome(error.code(), error.details() or "", tuple(responses))
        with self._lock:
            self.codes[(rpc.name, outcome.code.name)] += 1
        return outcome

    def table(self) -> str:
        """Messages sent and status codes answered, per RPC."""
        names = sorted(self.sent)
        all_codes = sorted({code for _, code in self.codes})
        width = max([len(n) for n in names] + [5])
        lines = [f"{'rpc':<{width}} {'sent':>7}  " + " ".join(f"{c:>19}" for c in all_codes)]
        for name in names:
            lines.append(f"{name:<{width}} {self.sent[name]:>7}  " + " ".join(f"{self.codes[(name, c)]:>19}" for c in all_codes))
        lines.append(f"{'total':<{width}} {sum(self.sent.values()):>7}")
        return "\n".join(lines)


# -- messages from descriptors ----------------------------------------------------------

Vocabulary = dict[str, Callable[[], Sequence[Any]]]
"""Field name -> the live values worth trying for it (known job ids, cohort ids,
tokens...), read when a value is drawn so that it can grow during the run."""

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}
_TEXT = st.text(max_size=24)
_ODD_TEXT = st.sampled_from(["", " ", "x" * 128, "x" * 129, "y" * 5000, "../../etc/passwd", "\x00", "é\u202e", "default"])


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (low, low + 1, -1, 0, 1, 2, 3, 4, 5, 64, high - 1, high) if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(0, 8).filter(lambda v: low <= v <= high), st.integers(low, high))


def _live(name: str, vocabulary: Vocabulary) -> st.SearchStrategy[Any]:
    # fixed bounds whatever the pool holds now: Hypothesis replays choices and
    # needs the same choices to draw the same way while the pools grow
    values = vocabulary[name]
    return st.integers(0, 1 << 16).map(lambda i: (lambda pool: pool[i % len(pool)])(values()))


def scalar_values(field: FieldDescriptor, vocabulary: Vocabulary) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        values: st.SearchStrategy[Any] = _integers(low, high)
        if field.name == LONG_POLL_FIELD:
            values = st.integers(0, LONG_POLL_CAP_MS)
    elif kind == FieldDescriptor.TYPE_BOOL:
        values = st.booleans()
    elif kind == FieldDescriptor.TYPE_FLOAT:
        values = st.floats(width=32)
    elif kind == FieldDescriptor.TYPE_DOUBLE:
        values = st.floats()
    elif kind == FieldDescriptor.TYPE_STRING:
        values = st.one_of(_TEXT, _ODD_TEXT)
    elif kind == FieldDescriptor.TYPE_BYTES:
        values = st.one_of(st.binary(max_size=80), st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32))
    elif kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [v.number for v in field.enum_type.values]
        values = st.one_of(st.sampled_from(numbers), st.sampled_from([max(numbers) + 1, 99, -1, (1 << 31) - 1]))
    else:
        raise AssertionError(f"no strategy for field type {kind} of {field.full_name}")
    if field.name in vocabulary:
        values = st.one_of(_live(field.name, vocabulary), values)
    return values


def messages(descriptor: Any, vocabulary: Vocabulary, depth: int = 0) -> st.SearchStrategy[Message]:
    """Well-formed messages of any field values: each oneof set to one of its
    fields or none, every other field set or left at its default."""
    message_class = message_factory.GetMessageClass(descriptor)
    plain: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.containing_oneof is None:
            plain[field.name] = _field_values(field, vocabulary, depth)
    oneofs = [
        st.one_of(st.none(), *[st.tuples(st.just(f.name), _field_values(f, vocabulary, depth)) for f in oneof.fields])
        for oneof in descriptor.oneofs
    ]

    def build(values: dict[str, Any], chosen: tuple[tuple[str, Any] | None, ...]) -> Message:
        message = message_class()
        items = list(values.items()) + [c for c in chosen if c is not None]
        for name, value in items:
            _assign(message, descriptor.fields_by_name[name], value)
        return message

    return st.builds(build, st.fixed_dictionaries({}, optional=plain), st.tuples(*oneofs))


def _field_values(field: FieldDescriptor, vocabulary: Vocabulary, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None and field.containing_type is not None
        if depth >= 3:
            return st.just(message_factory.GetMessageClass(field.message_type)())
        one: st.SearchStrategy[Any] = messages(field.message_type, vocabulary, depth + 1)
        special = f"{field.containing_type.name}.{field.name}"
        if special in vocabulary:
            one = st.one_of(_live(special, vocabulary), one)
    else:
        one = scalar_values(field, vocabulary)
    if _is_repeated(field):
        return st.lists(one, max_size=5)
    return one


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if _is_repeated(field):
        entry_type = field.message_type
        if entry_type is not None and entry_type.GetOptions().map_entry:
            for entry in value:  # a map field: entries are generated as its key/value messages
                value_field = entry_type.fields_by_name["value"]
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    target[entry.key].CopyFrom(entry.value)
                else:
                    target[entry.key] = entry.value
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# -- random bytes ---------------------------------------------------------------------


def mutated(encodings: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with bytes flipped, cut or appended: malformed protobuf
    that still starts like a real message."""

    def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        buffer = bytearray(data)
        for kind, position, value in edits:
            if kind == 0 and buffer:
                buffer[position % len(buffer)] = value
            elif kind == 1:
                del buffer[position % (len(buffer) + 1) :]
            else:
                buffer[position % (len(buffer) + 1) : position % (len(buffer) + 1)] = bytes([value])
        return bytes(buffer)

    edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4)
    return st.builds(mutate, encodings, edits)


def random_payloads(rpc: Rpc, vocabulary: Vocabulary) -> st.SearchStrategy[bytes]:
    encodings = messages(rpc.request_type.DESCRIPTOR, vocabulary).map(lambda m: m.SerializeToString())
    raw = st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=2048), mutated(encodings))
    return raw.map(lambda data: cap_long_poll(rpc.request_type, data))


def cap_long_poll(message_type: type[Message], data: bytes) -> bytes:
    """Bytes that parse into a request asking for a long wait get the wait
    field appended again, small: the last value of a field wins when parsing."""
    if within_long_poll_cap(message_type, data):
        return data
    return data + message_type(**{LONG_POLL_FIELD: LONG_POLL_CAP_MS}).SerializeToString()


def request_lists(rpc: Rpc, single: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """One request for unary RPCs; zero or more for client streams."""
    if rpc.client_streaming:
        return st.lists(single, max_size=8)
    return single.map(lambda one: [one])
