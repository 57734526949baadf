"""AES-256-GCM sealing of Shamir shares, bound to cohort, sender and receiver.

Members send each other their shares through the server, which must neither
read them nor move them: the associated data names the cohort, the sender and
the receiver, so a share replayed into another cohort or redirected to another
member fails verification instead of being accepted.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_BYTES", "NONCE_BYTES", "TAG_BYTES", "VerificationFailed", "associated_data", "open_sealed", "seal"]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"tributary.secagg.v1"
_FAILED = "sealed message failed verification"


class VerificationFailed(Exception):
    """One opaque error for every failed verification (like cryptography's
    InvalidToken): it never says why, so a caller cannot become an oracle for
    which part of a forged message was wrong."""


def associated_data(cohort_id: str, sender: int, receiver: int) -> bytes:
    """Unambiguous encoding of (domain, cohort_id, sender, receiver).

    Every field is length-prefixed (4-byte big-endian length), so no two
    different tuples encode to the same bytes: cohort "a1" with sender 2
    differs from cohort "a" with sender 12. Members are non-negative integers
    below 2^64.
    """
    for name, member in (("sender", sender), ("receiver", receiver)):
        if not 0 <= member < 1 << 64:
            raise ValueError(f"{name} must be in [0, 2^64), got {member}")
    fields = (_DOMAIN, cohort_id.encode("utf-8"), sender.to_bytes(8, "big"), receiver.to_bytes(8, "big"))
    return b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def seal(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext) || tag, with a random 12-byte nonce.

    Random nonces are safe here: a key seals a handful of messages, far below
    the 2^32 messages per key at which random 96-bit nonces become a risk.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, *, associated: bytes) -> bytes:
    """The plaintext of a `seal` output; VerificationFailed on any tampering, a
    wrong key, wrong associated data or a truncated blob."""
    aead = _aead(key)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise VerificationFailed(_FAILED)
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag:
        raise VerificationFailed(_FAILED) from None


def _aead(key: bytes) -> AESGCM:
    """AES-256 only: ValueError for any key that is not 32 bytes (AESGCM would accept 16 or 24)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a sealing key is {KEY_BYTES} bytes, got {len(key)}")
    return AESGCM(key)
