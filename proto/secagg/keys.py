"""X25519 key agreement followed by HKDF-SHA256, from `cryptography`.

Cohort members agree pairwise keys: one pair of keys seeds the pairwise masks,
another seals the Shamir shares members send each other through the server.
The raw X25519 output is not uniformly random and is the same for every use,
so it is always passed through HKDF with an `info` string naming the use.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KEY_BYTES", "KeyPair", "agree", "agree_from_private_bytes", "check_public_key"]

KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    """An X25519 private key with its raw 32-byte public key (what goes on the wire)."""

    private: X25519PrivateKey
    public: bytes

    def __post_init__(self) -> None:
        if self.public != self.private.public_key().public_bytes_raw():
            raise ValueError("public key does not belong to the private key")

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS random source."""
        private = X25519PrivateKey.generate()
        return cls(private, private.public_key().public_bytes_raw())

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key: a member Shamir-shares its mask-agreement key
        so that survivors can recompute a dropped member's pairwise masks."""
        return self.private.private_bytes_raw()

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        """Rebuild a key pair from `private_bytes()` output; ValueError unless 32 bytes."""
        if len(data) != KEY_BYTES:
            raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(data)}")
        private = X25519PrivateKey.from_private_bytes(data)
        return cls(private, private.public_key().public_bytes_raw())


def check_public_key(public: bytes) -> None:
    """ValueError unless `public` is a 32-byte X25519 public key that a key
    agreement can use. A low-order point (all zeros is one) makes every
    exchange with it give the all-zero secret, which `cryptography` refuses:
    a coordinator that forwarded such a key would have every neighbour of its
    sender fail, so it refuses it on arrival instead. The test is one exchange
    with a throwaway key: the scalar is a multiple of the cofactor after
    clamping, so any private key detects any low-order point."""
    if len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(public)}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise ValueError("it is a low-order X25519 point (such as 32 zero bytes), with which no key can be agreed") from None


def agree(private: X25519PrivateKey, peer_public: bytes, *, info: bytes) -> bytes:
    """A 32-byte key shared with the holder of `peer_public`, bound to `info`.

    Symmetric: agree(a, B, info=i) == agree(b, A, info=i). ValueError for a peer
    key that is not 32 bytes or is a low-order point (all-zero shared secret),
    which a malicious peer could send to force a known key.
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ValueError("peer public key is invalid") from None
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def agree_from_private_bytes(private: bytes, peer_public: bytes, *, info: bytes) -> bytes:
    """`agree` for a private key given as raw bytes, e.g. one reconstructed from shares."""
    return agree(KeyPair.from_private_bytes(private).private, peer_public, info=info)
