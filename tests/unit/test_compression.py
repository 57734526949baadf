"""The update codec (proto/compression.py), the SDK's error feedback, and the
compression settings of jobs and secure-aggregation cohorts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from client_sdk import Compression
from client_sdk._compression import Compressor
from proto import tributary_pb2 as pb
from proto.compression import Encoding, decode_payload, encode_tensor, encode_update, encoded_size, kept_count
from proto.secagg.quantize import FixedPoint, masked_dtype, ring_bits_for
from proto.tensors import MalformedPayload, TensorSpec, specs_of
from server.config import ConfigError, JobConfig, SecAggConfig, StrategyConfig

F32 = np.dtype("<f4")
SETTINGS = [Encoding(8), Encoding(4), Encoding(0, 0.1), Encoding(8, 0.1), Encoding(4, 0.01), Encoding(0, 1.0)]


def roundtrip(tensors: dict[str, np.ndarray], encoding: Encoding, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    encoded = encode_update(tensors, encoding, np.random.default_rng(seed))
    payload = b"".join(e.data for e in encoded.values())
    decoded = decode_payload(specs_of(tensors), encoding, payload)
    return payload, decoded, {name: e.decoded for name, e in encoded.items()}


@pytest.mark.parametrize("encoding", SETTINGS, ids=lambda e: e.describe())
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (4, 3, 2)])
def test_round_trip_matches_what_the_sender_computed_and_the_size_formula(encoding: Encoding, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal(shape).astype(np.float32), "b": rng.standard_normal(3).astype(np.float64)}
    payload, decoded, sender_view = roundtrip(tensors, encoding)
    assert len(payload) == encoded_size(specs_of(tensors), encoding)
    for name, array in tensors.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], sender_view[name])


def test_size_formula_by_hand() -> None:
    spec = [TensorSpec("w", F32, (101,))]
    assert encoded_size(spec, Encoding(8)) == 8 + 101
    assert encoded_size(spec, Encoding(4)) == 8 + 51  # two per byte, odd count rounds up
    assert kept_count(101, Encoding(0, 0.1)) == 11  # ceil(10.1)
    assert encoded_size(spec, Encoding(0, 0.1)) == 11 * 4 + 11 * 4
    assert encoded_size(spec, Encoding(4, 0.1)) == 11 * 4 + 8 + 6
    assert kept_count(5, Encoding(0, 0.01)) == 1  # at least one element travels
    assert encoded_size([TensorSpec("e", F32, (0, 3))], Encoding(8, 0.5)) == 0


def test_values_without_quantization_travel_exactly_and_top_k_keeps_the_largest() -> None:
    values = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 1.0, 0.05, -2.0, 0.4], np.float32)
    _, decoded, _ = roundtrip({"v": values}, Encoding(0, 0.3))
    expected = np.zeros_like(values)
    expected[[1, 3, 8]] = values[[1, 3, 8]]
    np.testing.assert_array_equal(decoded["v"], expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_is_unbiased_and_within_one_step(bits: int) -> None:
    values = np.random.default_rng(2).uniform(-1, 1, 257).astype(np.float32)
    rng = np.random.default_rng(3)
    trials = 2000
    total = np.zeros(values.size)
    step = (values.max() - values.min()) / (2**bits - 1)
    for _ in range(trials):
        decoded = encode_tensor(values, Encoding(bits), rng).decoded.astype(np.float64)
        assert np.abs(decoded - values).max() <= step * 1.0001
        total += decoded
    mean_error = total / trials - values
    # each draw's error has std <= step / 2; the mean of `trials` draws: <= step / (2 sqrt(trials)); 5 sigma
    assert np.abs(mean_error).max() < 5 * step / (2 * math.sqrt(trials))
    # and it is not deterministic rounding (which has a fixed, biased error)
    assert np.abs(total / trials - values).mean() < 0.2 * np.abs(np.round((values - values.min()) / step) * step + values.min() - values).mean()


def test_four_bit_codes_pack_two_per_byte_low_nibble_first() -> None:
    values = np.array([0.0, 15.0, 5.0], np.float32)  # lo 0, hi 15: one level per unit, no rounding
    data = encode_tensor(values, Encoding(4), np.random.default_rng(0)).data
    assert data[8:] == bytes([0xF0, 0x05])


def test_constant_tensor_quantizes_to_itself() -> None:
    values = np.full(9, 0.25, np.float32)
    _, decoded, _ = roundtrip({"c": values}, Encoding(4))
    np.testing.assert_array_equal(decoded["c"], values)


def _payload(values: np.ndarray, encoding: Encoding) -> bytearray:
    return bytearray(encode_tensor(values, encoding, np.random.default_rng(0)).data)


@pytest.mark.parametrize(
    "doctor, encoding, message",
    [
        (lambda p: p.__setitem__(slice(0, 4), np.array([9], "<u4").tobytes()), Encoding(0, 0.5), "out of range"),
        (lambda p: p.__setitem__(slice(4, 8), np.array([0], "<u4").tobytes()), Encoding(0, 0.5), "strictly increasing"),
        (lambda p: p.__setitem__(slice(0, 4), np.array([np.nan], "<f4").tobytes()), Encoding(8), "not finite"),
        (lambda p: p.__setitem__(slice(4, 8), np.array([np.inf], "<f4").tobytes()), Encoding(8), "not finite"),
        (lambda p: p.__setitem__(slice(0, 8), np.array([1.0, -1.0], "<f4").tobytes()), Encoding(8), "hi -1.0 < lo 1.0"),
        (lambda p: p.__setitem__(-1, p[-1] | 0xF0), Encoding(4), "padding nibble"),
        (lambda p: p.append(0), Encoding(8), "takes"),
        (lambda p: p.pop(), Encoding(0, 0.5), "takes"),
    ],
)
def test_malformed_payloads_are_refused(doctor, encoding: Encoding, message: str) -> None:  # type: ignore[no-untyped-def]
    values = np.arange(1, 6, dtype=np.float32)  # 5 elements: top-k 0.5 keeps 3; 4-bit leaves a padding nibble
    payload = _payload(values, encoding)
    doctor(payload)
    with pytest.raises(MalformedPayload, match=message):
        decode_payload([TensorSpec("v", F32, (5,))], encoding, bytes(payload))


@pytest.mark.parametrize(
    "bits, fraction, message",
    [(3, 0.0, "quantize_bits"), (16, 0.0, "quantize_bits"), (0, 1.5, "top_k_fraction"), (0, -0.1, "top_k_fraction"), (0, math.nan, "top_k_fraction")],
)
def test_bad_encoding_settings_are_refused(bits: int, fraction: float, message: str) -> None:
    with pytest.raises(MalformedPayload, match=message):
        Encoding.from_pb(pb.UpdateEncoding(quantize_bits=bits, top_k_fraction=fraction))


def test_integer_tensors_cannot_be_compressed() -> None:
    with pytest.raises(MalformedPayload, match="only floating-point"):
        decode_payload([TensorSpec("i", np.dtype("<i8"), (3,))], Encoding(8), b"\0" * 11)
    with pytest.raises(MalformedPayload, match="only floating-point"):
        encode_tensor(np.arange(3), Encoding(0, 0.5), np.random.default_rng(0))


# -- error feedback ------------------------------------------------------------------


def test_error_feedback_carries_the_residual_and_the_sent_sum_tracks_the_true_sum() -> None:
    rng = np.random.default_rng(4)
    true_updates = [rng.standard_normal(200).astype(np.float32) for _ in range(60)]
    with_memory = Compressor(Compression(top_k=0.05, error_feedback=True, seed=1))
    without = Compressor(Compression(top_k=0.05, error_feedback=False, seed=1))
    sent = {"memory": np.zeros(200), "none": np.zeros(200)}
    for update in true_updates:
        for label, compressor in (("memory", with_memory), ("none", without)):
            encoded, residual = compressor.encode({"w": update})
            if label == "memory":
                # what was not sent is exactly what is carried over
                previous = compressor.residual.get("w", np.zeros(200, np.float32))
                np.testing.assert_allclose(residual["w"] + encoded["w"].decoded, update + previous, rtol=1e-6)
            compressor.commit(residual)
            sent[label] += encoded["w"].decoded
    truth = np.sum(true_updates, axis=0)
    memory_gap = np.linalg.norm(sent["memory"] - truth)
    assert np.allclose(sent["memory"] + with_memory.residual["w"], truth, atol=1e-3)  # sent + still owed = everything
    assert memory_gap < 0.5 * np.linalg.norm(sent["none"] - truth)
    assert without.residual == {}


def test_residual_is_kept_only_once_committed() -> None:
    compressor = Compressor(Compression(top_k=0.5))
    _, residual = compressor.encode({"w": np.array([1.0, 2.0], np.float32)})
    assert compressor.residual == {}
    compressor.commit(residual)
    np.testing.assert_array_equal(compressor.residual["w"], [1.0, 0.0])


@pytest.mark.parametrize(
    "settings, message",
    [({}, "compresses nothing"), ({"quantize_bits": 6}, "8 or 4"), ({"top_k": 0.0}, r"\(0, 1\]"), ({"top_k": 2}, r"\(0, 1\]")],
)
def test_compression_spec_validates(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Compression(**settings)  # type: ignore[arg-type]


def test_secure_jobs_refuse_top_k_and_other_bits_in_the_sdk() -> None:
    with pytest.raises(ValueError, match="top-k sparsification does not compose"):
        Compression(top_k=0.1).check_secure("j", 8)
    with pytest.raises(ValueError, match="quantizes its cohorts to 8 bits"):
        Compression(quantize_bits=4).check_secure("j", 8)
    Compression(quantize_bits=8).check_secure("j", 8)


# -- configuration and quantized cohorts ---------------------------------------------


def test_job_compression_settings() -> None:
    assert JobConfig().compression == {"quantize", "top_k"}
    assert JobConfig.from_mapping({"accept_compression": "quantize"}).compression == {"quantize"}
    assert JobConfig.from_mapping({"accept_compression": "none"}).compression == frozenset()
    assert JobConfig.from_mapping({"accept_compression": ["top_k"]}).compression == {"top_k"}
    with pytest.raises(ConfigError, match="accept_compression must list"):
        JobConfig.from_mapping({"accept_compression": "gzip"})
    with pytest.raises(ConfigError, match="'top_k' cannot work with secure aggregation"):
        JobConfig.from_mapping({"secure_aggregation": True, "accept_compression": "top_k"})
    secure = JobConfig.from_mapping({"secure_aggregation": True, "quantize_bits": 8, "value_bound": 4.0})
    assert secure.compression == frozenset()
    assert secure.secure_aggregation is not None and secure.secure_aggregation.quantize_bits == 8


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"quantize_bits": 6}, "quantize_bits must be one of 4, 8"),
        ({"quantize_bits": 8, "ring_bits": 16}, "drop ring_bits"),
        ({"value_bound": 2.0}, "only applies with quantize_bits"),
        ({"quantize_bits": 8, "value_bound": -1.0}, "value_bound"),
    ],
)
def test_bad_quantized_cohort_settings(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig(strategy=StrategyConfig(name="fedbuff"), secure_aggregation=SecAggConfig(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("value_bits, members, ring, word", [(8, 4, 11, "<u2"), (8, 16, 13, "<u2"), (4, 4, 8, "|u1"), (4, 100, 12, "<u2")])
def test_quantized_ring_is_as_wide_as_the_sum_needs(value_bits: int, members: int, ring: int, word: str) -> None:
    assert ring_bits_for(value_bits, members) == ring
    point = FixedPoint.for_values(value_bits=value_bits, bound=2.0, max_summands=members)
    assert point.bits == ring and masked_dtype(point.bits) == np.dtype(word)
    # the worst case (every member at the bound, rounded up) decodes without wrapping
    rng = np.random.default_rng(0)
    extreme = np.array([2.0, -2.0, 1.99, -1.99])
    total = np.zeros(4, np.uint32)
    for _ in range(members):
        total = (total + point.encode(extreme, rng)) & np.uint32((1 << ring) - 1)
    np.testing.assert_allclose(point.decode(total), members * extreme, atol=members / point.scale)
