"""AES-256-GCM sealing bound to cohort, sender and receiver: a GCM known-answer
test for the building block (McGrew & Viega, "The Galois/Counter Mode of
Operation", test cases 13, 14 and 16) and the sealing's properties."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proto.secagg.sealing import NONCE_BYTES, TAG_BYTES, VerificationFailed, associated_data, open_sealed, seal

# McGrew & Viega test case 16: 256-bit key, 96-bit IV, 60-byte plaintext, 20-byte AAD.
TC16_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
TC16_PLAINTEXT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
TC16_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
TC16_IV = bytes.fromhex("cafebabefacedbaddecaf888")
TC16_CIPHERTEXT = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)
TC16_TAG = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")

KEY = bytes(range(32))
PLAINTEXT = b"a 68-byte Shamir share would go here, padded out to some length...."
AD = associated_data("cohort-7", 3, 5)


def test_gcm_spec_test_case_16() -> None:
    sealed = AESGCM(TC16_KEY).encrypt(TC16_IV, TC16_PLAINTEXT, TC16_AAD)
    assert sealed == TC16_CIPHERTEXT + TC16_TAG
    assert AESGCM(TC16_KEY).decrypt(TC16_IV, sealed, TC16_AAD) == TC16_PLAINTEXT


def test_gcm_spec_test_cases_13_and_14_zero_key() -> None:
    aead = AESGCM(bytes(32))
    assert aead.encrypt(bytes(12), b"", None) == bytes.fromhex("530f8afbc74536b9a963b4f1c4cb738b")
    assert aead.encrypt(bytes(12), bytes(16), None) == bytes.fromhex(
        "cea7403d4d606b6e074ec5d3baf39d18" "d0d1c8a799996bf0265b98b5d48ab919"
    )


def test_open_sealed_accepts_the_spec_vector_in_our_layout() -> None:
    """Our blob is nonce || ciphertext || tag: the known-answer vector opens through it."""
    blob = TC16_IV + TC16_CIPHERTEXT + TC16_TAG
    assert open_sealed(TC16_KEY, blob, associated=TC16_AAD) == TC16_PLAINTEXT


@pytest.mark.parametrize("plaintext", [b"", b"x", PLAINTEXT, os.urandom(4096)])
def test_round_trip(plaintext: bytes) -> None:
    blob = seal(KEY, plaintext, associated=AD)
    assert len(blob) == NONCE_BYTES + len(plaintext) + TAG_BYTES
    assert open_sealed(KEY, blob, associated=AD) == plaintext


def test_nonces_are_random() -> None:
    first, second = seal(KEY, PLAINTEXT, associated=AD), seal(KEY, PLAINTEXT, associated=AD)
    assert first[:NONCE_BYTES] != second[:NONCE_BYTES]
    assert first != second


def test_a_flipped_bit_anywhere_fails_verification() -> None:
    """Every byte position (nonce, ciphertext, tag), low and high bit."""
    blob = seal(KEY, PLAINTEXT, associated=AD)
    for position in range(len(blob)):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[position] ^= bit
            with pytest.raises(VerificationFailed):
                open_sealed(KEY, bytes(tampered), associated=AD)


@pytest.mark.parametrize("region", ["nonce", "ciphertext", "tag"])
def test_each_region_is_covered(region: str) -> None:
    blob = bytearray(seal(KEY, PLAINTEXT, associated=AD))
    position = {"nonce": 0, "ciphertext": NONCE_BYTES + 3, "tag": len(blob) - 1}[region]
    blob[position] ^= 0x10
    with pytest.raises(VerificationFailed):
        open_sealed(KEY, bytes(blob), associated=AD)


@pytest.mark.parametrize(
    "other",
    [
        associated_data("cohort-8", 3, 5),  # replayed into another cohort
        associated_data("cohort-7", 3, 6),  # redirected to another receiver
        associated_data("cohort-7", 4, 5),  # claimed by another sender
        associated_data("cohort-7", 5, 3),  # sender and receiver swapped
        b"",
    ],
)
def test_other_associated_data_fails_verification(other: bytes) -> None:
    blob = seal(KEY, PLAINTEXT, associated=AD)
    with pytest.raises(VerificationFailed):
        open_sealed(KEY, blob, associated=other)


def test_wrong_key_fails_verification() -> None:
    blob = seal(KEY, PLAINTEXT, associated=AD)
    with pytest.raises(VerificationFailed):
        open_sealed(bytes(32), blob, associated=AD)


@pytest.mark.parametrize("length", [0, 1, NONCE_BYTES, NONCE_BYTES + TAG_BYTES - 1])
def test_a_truncated_blob_fails_verification(length: int) -> None:
    blob = seal(KEY, PLAINTEXT, associated=AD)
    with pytest.raises(VerificationFailed):
        open_sealed(KEY, blob[:length], associated=AD)


def test_a_truncated_tag_fails_verification() -> None:
    blob = seal(KEY, b"", associated=AD)
    with pytest.raises(VerificationFailed):
        open_sealed(KEY, blob[:-1], associated=AD)
    blob = seal(KEY, PLAINTEXT, associated=AD)
    with pytest.raises(VerificationFailed):
        open_sealed(KEY, blob[:-1], associated=AD)


def test_every_failure_says_the_same_thing() -> None:
    blob = seal(KEY, PLAINTEXT, associated=AD)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    failures: list[Callable[[], bytes]] = [
        lambda: open_sealed(bytes(32), blob, associated=AD),
        lambda: open_sealed(KEY, bytes(flipped), associated=AD),
        lambda: open_sealed(KEY, blob, associated=associated_data("other", 3, 5)),
        lambda: open_sealed(KEY, blob[:5], associated=AD),
    ]
    errors = []
    for failure in failures:
        with pytest.raises(VerificationFailed) as info:
            failure()
        errors.append(info.value)
    assert len({(type(e), str(e), e.args) for e in errors}) == 1
    # nothing chained either: a traceback must not reveal the cause
    assert all(e.__cause__ is None and (e.__context__ is None or e.__suppress_context__) for e in errors)


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33])
def test_keys_that_are_not_32_bytes_are_a_value_error(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        seal(bytes(length), PLAINTEXT, associated=AD)
    with pytest.raises(ValueError, match="32 bytes"):
        open_sealed(bytes(length), bytes(64), associated=AD)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a1", 2, 3), ("a", 12, 3)),
        (("a", 1, 23), ("a", 12, 3)),
        (("", 1, 2), ("\x00", 1, 2)),
        (("a", 1, 2), ("a", 2, 1)),
        (("a", 0, 0), ("a\x00\x00\x00\x00", 0, 0)),
        (("cohort", 256, 1), ("cohort", 1, 256)),
    ],
)
def test_associated_data_is_injective_on_tricky_inputs(
    left: tuple[str, int, int], right: tuple[str, int, int]
) -> None:
    assert associated_data(*left) != associated_data(*right)


def test_associated_data_layout() -> None:
    expected = (
        b"\x00\x00\x00\x13tributary.secagg.v1"
        + b"\x00\x00\x00\x02c1"
        + b"\x00\x00\x00\x08" + (2).to_bytes(8, "big")
        + b"\x00\x00\x00\x08" + (12).to_bytes(8, "big")
    )
    assert associated_data("c1", 2, 12) == expected
    assert associated_data("é", 0, 0)[23:29] == b"\x00\x00\x00\x02\xc3\xa9"


@pytest.mark.parametrize(("sender", "receiver"), [(-1, 0), (0, -1), (2**64, 0), (0, 2**64)])
def test_associated_data_refuses_members_out_of_range(sender: int, receiver: int) -> None:
    with pytest.raises(ValueError):
        associated_data("c", sender, receiver)
