"""Mask expansion: the AES-256-CTR construction byte for byte, determinism,
independence across seeds and purposes, uniformity, and cancellation."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from proto.secagg.masks import MASK_DOMAIN, SEED_BYTES, expand_mask, mask_nonce
from proto.secagg.quantize import add_mod, sub_mod

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))


def reference_keystream(seed: bytes, purpose: bytes, nbytes: int) -> bytes:
    """The documented construction, computed independently of masks.py: AES-256
    (ECB, one block at a time) of nonce || uint64_be(i) for i = 0, 1, ..."""
    nonce = hashlib.sha256(b"tributary/secagg/mask/v1\x00" + purpose).digest()[:8]
    blocks = b"".join(nonce + i.to_bytes(8, "big") for i in range(-(-nbytes // 16)))
    encryptor = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    return (encryptor.update(blocks) + encryptor.finalize())[:nbytes]


def test_seed_bytes_is_an_aes256_key_length() -> None:
    assert SEED_BYTES == 32


@pytest.mark.parametrize("purpose", [b"", b"self", b"pair", bytes(range(256))])
@pytest.mark.parametrize("length", [1, 3, 4, 5, 37, 1000])
def test_matches_aes_ecb_of_the_counter_blocks(purpose: bytes, length: int) -> None:
    mask = expand_mask(SEED, length, purpose=purpose)
    expected = reference_keystream(SEED, purpose, 4 * length)
    assert mask.astype("<u4").tobytes() == expected
    assert int(mask[0]) == int.from_bytes(expected[:4], "little")  # little-endian words


def test_known_answer_pinned_across_versions() -> None:
    # also produced by: openssl enc -aes-256-ctr -K 000102..1f -iv <SHA-256(domain||b"self")[:8]> || 0^8
    assert MASK_DOMAIN == b"tributary/secagg/mask/v1\x00"
    assert mask_nonce(b"self").hex() == "30ffdb247f326471"
    assert mask_nonce(b"").hex() == "eb7de145ed6ca8cb"
    assert expand_mask(SEED, 8, purpose=b"self").tolist() == [
        701589420, 3442392913, 2988600778, 1718333960, 1771839514, 3017454979, 1456738032, 2896206046,
    ]
    assert expand_mask(SEED, 8, 16, purpose=b"pair").tolist() == [
        3797, 27898, 54557, 22456, 19269, 55368, 36468, 24534,
    ]


def test_deterministic_and_a_prefix_of_longer_masks() -> None:
    long = expand_mask(SEED, 10_000, purpose=b"self")
    np.testing.assert_array_equal(long, expand_mask(SEED, 10_000, purpose=b"self"))
    for length in (0, 1, 5, 4097):
        np.testing.assert_array_equal(expand_mask(SEED, length, purpose=b"self"), long[:length])


def test_bytearray_seed_and_purpose_match_bytes() -> None:
    seed: Any = bytearray(SEED)
    purpose: Any = bytearray(b"pair")
    np.testing.assert_array_equal(expand_mask(seed, 64, purpose=purpose), expand_mask(SEED, 64, purpose=b"pair"))


def test_different_seed_or_purpose_gives_an_unrelated_mask() -> None:
    n = 100_000
    base = expand_mask(SEED, n, purpose=b"self")
    for other in (expand_mask(OTHER_SEED, n, purpose=b"self"), expand_mask(SEED, n, purpose=b"pair"), expand_mask(SEED, n)):
        assert np.count_nonzero(base == other) < 5  # ~n / 2^32 expected by chance
        # not a shifted copy either: no 4-word window of `other` appears in `base`
        windows = {base[i : i + 4].tobytes() for i in range(0, n - 3)}
        assert not any(other[j : j + 4].tobytes() in windows for j in range(0, n - 3, 997))


def test_purposes_use_distinct_nonces() -> None:
    labels = [b"", b"self", b"pair", b"self-mask", b"pairwise-mask", b"pair\x00", b"Self"]
    assert len({mask_nonce(label) for label in labels}) == len(labels)


def test_uniform_over_the_full_range_and_balanced_bits() -> None:
    n = 1_000_000
    mask = expand_mask(SEED, n, purpose=b"uniformity")
    # mean of U{0..2^32-1}: 2^31 - 0.5, standard deviation 2^32 / sqrt(12)
    standard_error = 2**32 / np.sqrt(12) / np.sqrt(n)
    assert abs(mask.astype(np.float64).mean() - (2**31 - 0.5)) < 6 * standard_error
    bits = (mask[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    ones = bits.mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 6 * 0.5 / np.sqrt(n))
    counts = np.bincount((mask >> np.uint32(28)).astype(np.int64), minlength=16)  # top nibble: 16 buckets
    chi2 = float((((counts - n / 16) ** 2) / (n / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above this


@pytest.mark.parametrize("bits", [8, 13, 16, 31])
def test_fewer_bits_are_the_low_bits_and_stay_below_2_to_the_bits(bits: int) -> None:
    full = expand_mask(SEED, 50_000, purpose=b"low")
    narrow = expand_mask(SEED, 50_000, bits, purpose=b"low")
    assert narrow.dtype == np.uint32
    np.testing.assert_array_equal(narrow, full & np.uint32(2**bits - 1))
    assert int(narrow.max()) < 2**bits
    assert int(narrow.max()) > 2**bits * 0.99  # uses the whole ring, not a corner of it


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_masks_cancel_mod_2_to_the_bits(bits: int) -> None:
    x = np.random.default_rng(bits).integers(0, 2**bits, size=10_000, dtype=np.uint64).astype(np.uint32)
    m = expand_mask(SEED, x.size, bits, purpose=b"self")
    masked = add_mod(x, m, bits)
    assert not np.array_equal(masked, x)
    np.testing.assert_array_equal(sub_mod(masked, m, bits), x)


def test_pairwise_masks_cancel_in_a_sum() -> None:
    # client a adds +m_ab, client b adds -m_ab: the server's sum has no mask left
    bits = 32
    xa = np.arange(1000, dtype=np.uint32)
    xb = np.arange(1000, dtype=np.uint32) * np.uint32(3)
    m_ab = expand_mask(SEED, 1000, bits, purpose=b"pair")
    total = add_mod(add_mod(xa, m_ab, bits), sub_mod(xb, m_ab, bits), bits)
    np.testing.assert_array_equal(total, xa + xb)


def test_zero_length_gives_an_empty_uint32_array() -> None:
    mask = expand_mask(SEED, 0)
    assert mask.shape == (0,) and mask.dtype == np.uint32


def test_one_million_elements_in_one_call_writable() -> None:
    mask = expand_mask(SEED, 1_000_000, purpose=b"big")
    assert mask.shape == (1_000_000,) and mask.dtype == np.uint32
    assert mask.flags.writeable and mask.flags.c_contiguous
    mask[0] ^= np.uint32(1)  # callers may mask in place


@pytest.mark.parametrize("seed", [bytes(31), bytes(33), b"", "x" * 32, None, list(range(32))])
def test_seed_must_be_exactly_32_bytes(seed: Any) -> None:
    with pytest.raises(ValueError, match="seed must be"):
        expand_mask(seed, 4)


@pytest.mark.parametrize("length", [-1, 1.0, "4", True, None])
def test_length_must_be_a_non_negative_int(length: Any) -> None:
    with pytest.raises(ValueError, match="length"):
        expand_mask(SEED, length)


def test_numpy_integer_length_accepted() -> None:
    length: Any = np.int64(3)
    assert expand_mask(SEED, length).shape == (3,)


@pytest.mark.parametrize("bits", [7, 33, 0, True, 32.0])
def test_bits_outside_8_to_32_refused(bits: Any) -> None:
    with pytest.raises(ValueError, match="bits"):
        expand_mask(SEED, 4, bits)


@pytest.mark.parametrize("purpose", ["self", None, 1])
def test_purpose_must_be_bytes(purpose: Any) -> None:
    with pytest.raises(ValueError, match="purpose"):
        expand_mask(SEED, 4, purpose=purpose)


@pytest.mark.parametrize("chunk", [16, 48, 4096])
def test_keystream_generated_in_chunks_is_one_continuous_stream(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    # masks above 64 MiB are produced chunk by chunk; shrink the chunk to check the seams
    import proto.secagg.masks as masks

    monkeypatch.setattr(masks, "_CHUNK_BYTES", chunk)
    for length in (1, 4, 12, 13, 1001):
        mask = expand_mask(SEED, length, purpose=b"chunks")
        assert mask.astype("<u4").tobytes() == reference_keystream(SEED, b"chunks", 4 * length)


@pytest.mark.parametrize("bits", [8, 20, 32])
@pytest.mark.parametrize("subtract", [False, True])
def test_apply_mask_in_place_equals_expand_then_add(bits: int, subtract: bool) -> None:
    from proto.secagg.masks import MaskScratch, apply_mask
    from proto.secagg.quantize import add_mod, sub_mod

    rng = np.random.default_rng(bits)
    target = rng.integers(0, 1 << bits, 10_007, dtype=np.uint64).astype(np.uint32)
    seed = bytes(range(32))
    expected = (sub_mod if subtract else add_mod)(target, expand_mask(seed, target.size, bits, purpose=b"pair"), bits)
    scratch = MaskScratch()
    apply_mask(target, seed, bits=bits, purpose=b"pair", subtract=subtract, scratch=scratch)
    np.testing.assert_array_equal(target, expected)
    # the scratch buffer is reused, and a second mask with it is still right
    other = bytes(32)
    expected_again = add_mod(expected, expand_mask(other, target.size, bits, purpose=b"self"), bits)
    apply_mask(target, other, bits=bits, purpose=b"self", scratch=scratch)
    np.testing.assert_array_equal(target, expected_again)


def test_apply_mask_refuses_a_target_it_cannot_update_in_place() -> None:
    from proto.secagg.masks import apply_mask

    with pytest.raises(ValueError, match="flat, writable np.uint32"):
        apply_mask(np.zeros(4, np.int64), bytes(32))
    frozen = np.zeros(4, np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="flat, writable np.uint32"):
        apply_mask(frozen, bytes(32))
