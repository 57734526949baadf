"""Compressed pushes for thin links: what the app asks for, and the sender's memory.

`Compression` is the app's choice; `Compressor` encodes updates with it (wire
layout: proto/compression.py) and keeps, per client, the error-feedback
residual of top-k sparsification: what an update did not send is added to the
next one (Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with Memory";
Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"), so every coordinate
is sent eventually and the sum of what was sent tracks the sum of the true
updates. Quantization is unbiased, so it needs no memory; with both, the
residual covers the quantization error of the kept values too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from proto.compression import QUANTIZE_BITS, EncodedTensor, Encoding, encode_update
from proto.tensors import MalformedPayload


@dataclass(frozen=True)
class Compression:
    """How a client compresses its pushes.

    `quantize_bits`: 8 or 4, unbiased stochastic rounding per tensor (4x or
    8x smaller than float32); under secure aggregation it must match the
    job's quantized cohorts. `top_k`: send only this fraction (0, 1] of each
    tensor's largest-magnitude elements, with their indices (plaintext jobs
    only). `error_feedback`: keep what top-k did not send and add it to the
    next update (recommended; without it top-k is biased). `seed`: seeds the
    stochastic rounding (None: fresh entropy)."""

    quantize_bits: int | None = None
    top_k: float | None = None
    error_feedback: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.quantize_bits is not None and (isinstance(self.quantize_bits, bool) or self.quantize_bits not in QUANTIZE_BITS):
            raise ValueError(f"quantize_bits must be 8 or 4 (or None: no quantization), got {self.quantize_bits!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)) or not 0 < self.top_k <= 1:
                raise ValueError(f"top_k must be a fraction in (0, 1] of each tensor's elements to send, got {self.top_k!r}")
        if self.quantize_bits is None and self.top_k is None:
            raise ValueError("Compression() compresses nothing: give quantize_bits=8 or 4, and/or top_k=a fraction in (0, 1]")

    @property
    def encoding(self) -> Encoding:
        try:
            return Encoding(quantize_bits=self.quantize_bits or 0, top_k_fraction=float(self.top_k or 0.0))
        except MalformedPayload as error:  # unreachable after __post_init__; kept as a ValueError for callers
            raise ValueError(str(error)) from None

    def check_secure(self, job_id: str, secure_quantize_bits: int) -> None:
        """Refuse settings a secure-aggregation job cannot honour."""
        if self.top_k is not None:
            raise ValueError(
                f"job {job_id!r} runs secure aggregation, and top-k sparsification does not compose with it: the masks "
                "make every coordinate non-zero and members keep different coordinates. Use Compression(quantize_bits=...) "
                "with a job whose cohorts quantize, or no compression"
            )
        if self.quantize_bits is not None and self.quantize_bits != secure_quantize_bits:
            have = f"quantizes its cohorts to {secure_quantize_bits} bits" if secure_quantize_bits else "does not quantize its cohorts"
            raise ValueError(
                f"job {job_id!r} {have} (a server setting every member shares); "
                f"Compression(quantize_bits={self.quantize_bits}) cannot apply: drop it or match the job"
            )


class Compressor:
    """Encodes updates with one `Compression`, keeping its error-feedback
    residual between updates. `encode` proposes; `commit` keeps the residual
    once the server took the update (a refused update's residual is not kept,
    so a lost push is not half-remembered)."""

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self.encoding = compression.encoding
        self._rng = np.random.default_rng(compression.seed)
        self.residual: dict[str, np.ndarray] = {}

    @property
    def keeps_residual(self) -> bool:
        return self.compression.error_feedback and self.encoding.sparse

    def encode(self, delta: Mapping[str, np.ndarray]) -> tuple[dict[str, EncodedTensor], dict[str, np.ndarray]]:
        """(the encoded tensors, the residual to keep if the server takes them)."""
        corrected = dict(delta)
        if self.keeps_residual:
            for name, array in delta.items():
                carried = self.residual.get(name)
                if carried is not None and carried.shape == array.shape:
                    corrected[name] = array + carried.astype(array.dtype, copy=False)
        encoded = encode_update(corrected, self.encoding, self._rng)
        residual = {name: corrected[name] - encoded[name].decoded for name in corrected} if self.keeps_residual else {}
        return encoded, residual

    def commit(self, residual: dict[str, np.ndarray]) -> None:
        if self.keeps_residual:
            self.residual = residual

    def reset(self) -> None:
        self.residual = {}
