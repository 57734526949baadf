"""Sending a bearer token with every call.

A client interceptor, not call credentials: gRPC attaches call credentials
only on TLS channels, and a Tributary client may talk plaintext on a trusted
network (or to a TLS-terminating proxy). The interceptor adds
`authorization: Bearer <token>` to the metadata of every call on the
channel, so the low-level calls, `fit` and secure-aggregation cohorts all
carry it without passing it around.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def check_token(token: str, what: str = "token") -> str:
    """`token` without surrounding whitespace, or ValueError if gRPC metadata
    could not carry it."""
    if not isinstance(token, str):
        raise ValueError(f"{what} must be a string, got {type(token).__name__}")
    token = token.strip()
    if not token or not _TOKEN_CHARS.fullmatch(token):
        raise ValueError(f"{what} must be one word of printable ASCII (as `tributary admin enrol` prints it)")
    return token


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,  # type: ignore[misc]  # grpc ships no type hints
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {check_token(token)}")

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [entry for entry in (details.metadata or ()) if entry[0].lower() != "authorization"]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._entry],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, requests: Iterator[Any]) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, requests: Iterator[Any]) -> Any:
        return continuation(self._with_token(details), requests)

