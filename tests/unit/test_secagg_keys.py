"""X25519 + HKDF-SHA256 key agreement: RFC known-answer tests for the building
blocks (RFC 7748 section 6.1, RFC 5869 test case 1) and the agreement's properties."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proto.secagg.keys import KeyPair, agree, agree_from_private_bytes, check_public_key

# RFC 7748, section 6.1
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

INFO = b"tributary.secagg.v1 test"

# Points of small order on Curve25519: the exchange yields all zeros.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
]


def hkdf32(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(shared)


def test_rfc7748_raw_exchange() -> None:
    alice = X25519PrivateKey.from_private_bytes(ALICE_PRIVATE)
    bob = X25519PrivateKey.from_private_bytes(BOB_PRIVATE)
    assert alice.public_key().public_bytes_raw() == ALICE_PUBLIC
    assert bob.public_key().public_bytes_raw() == BOB_PUBLIC
    assert alice.exchange(X25519PublicKey.from_public_bytes(BOB_PUBLIC)) == SHARED
    assert bob.exchange(X25519PublicKey.from_public_bytes(ALICE_PUBLIC)) == SHARED


def test_rfc5869_case_1_hkdf_sha256() -> None:
    okm = HKDF(
        algorithm=SHA256(),
        length=42,
        salt=bytes(range(0x0D)),
        info=bytes(range(0xF0, 0xFA)),
    ).derive(b"\x0b" * 22)
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_agree_is_hkdf_over_the_rfc7748_shared_secret() -> None:
    alice = KeyPair.from_private_bytes(ALICE_PRIVATE)
    bob = KeyPair.from_private_bytes(BOB_PRIVATE)
    assert alice.public == ALICE_PUBLIC
    assert bob.public == BOB_PUBLIC
    expected = hkdf32(SHARED, INFO)
    assert agree(alice.private, BOB_PUBLIC, info=INFO) == expected
    assert agree(bob.private, ALICE_PUBLIC, info=INFO) == expected
    assert agree_from_private_bytes(ALICE_PRIVATE, BOB_PUBLIC, info=INFO) == expected
    assert len(expected) == 32


def test_agreement_is_symmetric() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    assert agree(a.private, b.public, info=INFO) == agree(b.private, a.public, info=INFO)


def test_different_info_gives_a_different_key() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    assert agree(a.private, b.public, info=b"masks") != agree(a.private, b.public, info=b"shares")


def test_different_peers_give_different_keys() -> None:
    a, b, c = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    assert agree(a.private, b.public, info=INFO) != agree(a.private, c.public, info=INFO)


def test_generated_pairs_are_fresh_and_well_formed() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    assert len(a.public) == 32 and len(a.private_bytes()) == 32
    assert a.public != b.public
    assert a.public == a.private.public_key().public_bytes_raw()


def test_private_bytes_round_trip() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    restored = KeyPair.from_private_bytes(a.private_bytes())
    assert restored.public == a.public
    assert restored.private_bytes() == a.private_bytes()
    assert agree_from_private_bytes(a.private_bytes(), b.public, info=INFO) == agree(a.private, b.public, info=INFO)


def test_a_mismatched_pair_is_refused() -> None:
    with pytest.raises(ValueError, match="does not belong"):
        KeyPair(KeyPair.generate().private, KeyPair.generate().public)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_private_bytes_of_the_wrong_length_are_refused(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyPair.from_private_bytes(bytes(length))
    with pytest.raises(ValueError, match="32 bytes"):
        agree_from_private_bytes(bytes(length), BOB_PUBLIC, info=INFO)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_peer_key_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        agree(KeyPair.generate().private, bytes(length), info=INFO)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_peer_key_is_refused(point: bytes) -> None:
    with pytest.raises(ValueError, match="peer public key is invalid"):
        agree(KeyPair.generate().private, point, info=INFO)
    with pytest.raises(ValueError, match="peer public key is invalid"):
        agree_from_private_bytes(ALICE_PRIVATE, point, info=INFO)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_check_public_key_refuses_low_order_points(point: bytes) -> None:
    with pytest.raises(ValueError, match="low-order X25519 point"):
        check_public_key(point)


def test_check_public_key_takes_real_keys_and_refuses_wrong_lengths() -> None:
    check_public_key(ALICE_PUBLIC)
    check_public_key(KeyPair.generate().public)
    for length in (0, 31, 33):
        with pytest.raises(ValueError, match="32 bytes"):
            check_public_key(bytes(length))
