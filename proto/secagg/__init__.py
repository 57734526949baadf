"""Secure-aggregation primitives both sides must agree on byte for byte.

Composed from `cryptography` (X25519, HKDF-SHA256, AES-256-CTR, AES-256-GCM)
and plain integer arithmetic (fixed-point quantization, Shamir sharing over a
prime field); no cryptographic primitive is implemented here.

    quantize   fixed-point encoding into Z_2^bits with clipping and stochastic rounding
    masks      expanding a 32-byte seed into a uint32 mask vector (AES-256-CTR keystream)
    shamir     t-of-n sharing of 32-byte secrets over the prime field GF(2^521 - 1)
    keys       X25519 key agreement + HKDF-SHA256
    sealing    AES-256-GCM encryption of shares, bound to cohort, sender and receiver
"""
