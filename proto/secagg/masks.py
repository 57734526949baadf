"""Expanding a 32-byte seed into a mask vector over Z_2^bits.

Why a stream cipher and not numpy's RNG: a mask hides a client's update only
if it is unpredictable to whoever lacks the seed, and PCG64 / Mersenne Twister
are not cryptographic (their state can be recovered from outputs). Both ends
must also derive the *same* mask from the same seed (a pair of clients for a
pairwise mask; the server, after reconstructing a seed from Shamir shares, for
a self-mask or a dropped client's pairwise mask), on any machine and numpy
version, forever; numpy makes no such promise about its generator streams. And
it must be fast for models of many millions of parameters. AES-256-CTR from
`cryptography` (OpenSSL, hardware AES) gives all three: a standard PRG,
byte-for-byte reproducible, at GB/s.

Construction (the wire contract; changing any of it breaks interoperability):

    key            = seed                                    (32 bytes, AES-256)
    nonce          = SHA-256(MASK_DOMAIN || purpose)[:8]
    counter block  = nonce || uint64_be(i)                   for block i = 0, 1, ...
    keystream      = AES-256-CTR(key, initial counter block nonce || 0^8),
                     i.e. AES-256(key, counter block i) for i = 0, 1, ...
    mask[j]        = little-endian uint32 of keystream bytes [4j, 4j + 4),
                     & (2^bits - 1) when bits < 32

This is the NIST SP 800-38A (appendix B.2) split of the counter block into a
nonce and a block counter. The counter half cannot carry into the nonce before
2^64 blocks, so streams for different purposes under one seed (e.g. the
self-mask and a pairwise mask) use disjoint counter blocks unless their 64-bit
nonces collide: a 2^-64 chance for any pair of labels, and for the fixed
labels a protocol uses it can simply be checked (`mask_nonce`). A mask of
length L is a prefix of every longer mask for the same seed and purpose.

Taking the low bits of a uniform uint32 is uniform over Z_2^bits, since 2^bits
divides 2^32.
"""

from __future__ import annotations

import hashlib
import operator

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from proto.secagg.quantize import validate_bits

SEED_BYTES = 32
"""Seed length: an AES-256 key."""

MASK_DOMAIN = b"tributary/secagg/mask/v1\x00"
"""Prefix hashed with `purpose` so these nonces are not reused by any other
protocol step that might key AES with the same secret."""

_NONCE_BYTES = 8
_BLOCK_BYTES = 16
_CHUNK_BYTES = 1 << 26
"""Keystream generated per cipher call (64 MiB): bounds the zero-plaintext buffer."""


def mask_nonce(purpose: bytes = b"") -> bytes:
    """The 8-byte nonce half of the counter block for `purpose`."""
    return hashlib.sha256(MASK_DOMAIN + _purpose_bytes(purpose)).digest()[:_NONCE_BYTES]


def expand_mask(seed: bytes, length: int, bits: int = 32, *, purpose: bytes = b"") -> np.ndarray:
    """`length` pseudorandom elements of Z_2^bits as np.uint32, from `seed`.

    Deterministic in (seed, purpose, bits); different seeds or purposes give
    independent masks. The result is a fresh, writable array.
    """
    key = _seed_bytes(seed)
    count = _length(length)
    bits = validate_bits(bits)
    nonce = mask_nonce(purpose)
    mask = _keystream(key, nonce, 4 * count).view("<u4").astype(np.uint32, copy=False)
    if bits < 32:
        mask &= np.uint32((1 << bits) - 1)
    return mask


class MaskScratch:
    """A reusable keystream buffer: applying many masks of one length (a
    member's pairwise masks, the server's mask removal) then allocates and
    faults in no new memory per mask."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        needed = nbytes + _BLOCK_BYTES - 1
        if self._buffer.size < needed:
            self._buffer = np.empty(needed, dtype=np.uint8)
        return self._buffer[:needed]


def apply_mask(
    target: np.ndarray,
    seed: bytes,
    *,
    bits: int = 32,
    purpose: bytes = b"",
    subtract: bool = False,
    scratch: MaskScratch | None = None,
) -> None:
    """target <- target +- expand_mask(seed, target.size, bits, purpose=purpose)
    mod 2^bits, in place (target: flat, writable np.uint32). The same result as
    add_mod/sub_mod with expand_mask, without a new array per mask."""
    key = _seed_bytes(seed)
    bits = validate_bits(bits)
    if target.dtype != np.uint32 or target.ndim != 1 or not target.flags.writeable:
        raise ValueError("target must be a flat, writable np.uint32 array")
    nbytes = 4 * target.size
    stream = _keystream(key, mask_nonce(purpose), nbytes, (scratch or MaskScratch()).take(nbytes))
    words = stream.view("<u4")
    if subtract:
        np.subtract(target, words, out=target)
    else:
        np.add(target, words, out=target)
    if bits < 32:
        target &= np.uint32((1 << bits) - 1)


def _keystream(key: bytes, nonce: bytes, nbytes: int, buffer: np.ndarray | None = None) -> np.ndarray:
    """AES-256-CTR keystream bytes (the encryption of zeros), written straight
    into a numpy buffer (`buffer`, when given, of at least nbytes + 15 bytes)
    so the result needs no further copy."""
    initial_block = nonce + bytes(_BLOCK_BYTES - _NONCE_BYTES)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(initial_block)).encryptor()
    # update_into may need up to one block of slack beyond the data it writes
    if buffer is None:
        buffer = np.empty(nbytes + _BLOCK_BYTES - 1, dtype=np.uint8)
    zeros = _zeros(min(nbytes, _CHUNK_BYTES))
    written = 0
    while written < nbytes:
        take = min(_CHUNK_BYTES, nbytes - written)
        out = memoryview(buffer[written : written + take + _BLOCK_BYTES - 1])  # type: ignore[arg-type]  # ndarray is a buffer
        written += encryptor.update_into(memoryview(zeros)[:take], out)
    encryptor.finalize()
    return buffer[:nbytes]


_ZEROS = b""


def _zeros(nbytes: int) -> bytes:
    """A shared run of zero bytes (the CTR plaintext), grown when needed."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = bytes(nbytes)
    return _ZEROS


def _seed_bytes(seed: object) -> bytes:
    if not isinstance(seed, (bytes, bytearray)):
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {type(seed).__name__}")
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be exactly {SEED_BYTES} bytes (an AES-256 key), got {len(seed)}; derive it with HKDF or os.urandom({SEED_BYTES})")
    return bytes(seed)


def _length(length: object) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ValueError(f"length must be an int >= 0 (number of mask elements), got {length!r}")
    value = operator.index(length)
    if value < 0:
        raise ValueError(f"length must be >= 0 (number of mask elements), got {value}")
    return value


def _purpose_bytes(purpose: object) -> bytes:
    if not isinstance(purpose, (bytes, bytearray)):
        raise ValueError(f"purpose must be bytes (e.g. b\"self\" or b\"pair\"), got {type(purpose).__name__}")
    return bytes(purpose)
