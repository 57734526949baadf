"""The tensor codec: header specs, chunking and reassembly, and refusal of bad streams."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from proto import tributary_pb2 as pb
from proto.tensors import (
    CHUNK_BYTES,
    MalformedPayload,
    PayloadAssembler,
    TensorSpec,
    header_to_pb,
    iter_chunks,
    specs_from_pb,
    specs_of,
    wire_dtype,
)

CHUNK = 16


def mixed_tensors() -> dict[str, np.ndarray]:
    """Every wire dtype, a 0-d and an empty tensor; 177 payload bytes in all."""
    return {
        "f32": np.arange(15, dtype=np.float32).reshape(3, 5) / 7,  # 60 bytes
        "f64_scalar": np.array(-2.5, dtype=np.float64),  # 8 bytes, shape ()
        "f16_empty": np.zeros((0,), dtype=np.float16),  # 0 bytes
        "i64": np.array([-(2**40), -1, 0, 1, 2**40, 7, 9], dtype=np.int64),  # 56 bytes
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(2, 3, 2),  # 48 bytes
        "u8": np.array([0, 1, 127, 128, 255], dtype=np.uint8),  # 5 bytes
    }


def wire_header(tensors: dict[str, np.ndarray]) -> pb.TensorHeader:
    """The header as a receiver sees it: serialized and parsed again."""
    return pb.TensorHeader.FromString(header_to_pb(specs_of(tensors)).SerializeToString())


def round_trip(tensors: dict[str, np.ndarray], chunk_bytes: int) -> tuple[dict[str, np.ndarray], list[bytes]]:
    specs = specs_from_pb(wire_header(tensors))
    chunks = list(iter_chunks(tensors.values(), chunk_bytes=chunk_bytes))
    assembler = PayloadAssembler(specs, max_chunk_bytes=chunk_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish(), chunks


def test_round_trip_of_every_dtype_and_shape_across_chunks() -> None:
    tensors = mixed_tensors()
    received, chunks = round_trip(tensors, CHUNK)
    assert list(received) == list(tensors)  # header order is kept
    for name, sent in tensors.items():
        got = received[name]
        assert got.dtype == sent.dtype, name
        assert got.shape == sent.shape, name
        assert_array_equal(got, sent)
    assert received["f64_scalar"].shape == ()
    assert float(received["f64_scalar"]) == -2.5
    assert received["f16_empty"].shape == (0,)
    # 177 bytes in 16-byte chunks: 11 full chunks and one of 1 byte
    assert len(chunks) == 12


def test_chunks_are_exactly_chunk_size_except_the_last() -> None:
    tensors = mixed_tensors()
    chunks = list(iter_chunks(tensors.values(), chunk_bytes=CHUNK))
    assert [len(c) for c in chunks] == [16] * 11 + [1]
    expected = b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for a in tensors.values())
    assert b"".join(chunks) == expected


def test_a_tensor_larger_than_a_chunk_between_small_ones() -> None:
    # 3 bytes, then 40 bytes (spans three chunks and must not start a new one), then 2 bytes
    tensors = {
        "a": np.array([1, 2, 3], dtype=np.uint8),
        "big": np.arange(10, dtype=np.float32),
        "c": np.array([9, 8], dtype=np.uint8),
    }
    received, chunks = round_trip(tensors, CHUNK)
    assert [len(c) for c in chunks] == [16, 16, 13]
    assert chunks[0][:3] == bytes([1, 2, 3])
    for name in tensors:
        assert_array_equal(received[name], tensors[name])


def test_payload_that_is_a_multiple_of_the_chunk_size_has_no_short_or_empty_tail() -> None:
    tensors = {"a": np.arange(4, dtype=np.float32), "b": np.arange(2, dtype=np.float64), "c": np.arange(8, dtype=np.int32)}
    chunks = list(iter_chunks(tensors.values(), chunk_bytes=CHUNK))  # 16 + 16 + 32 bytes
    assert [len(c) for c in chunks] == [16, 16, 16, 16]


def test_default_chunk_size_is_one_mebibyte() -> None:
    assert CHUNK_BYTES == 1 << 20
    big = np.zeros(300_000, dtype=np.float64)  # 2.4 MB
    lengths = [len(c) for c in iter_chunks([big])]
    assert lengths == [1 << 20, 1 << 20, 2_400_000 - 2 * (1 << 20)]


def test_only_empty_tensors_make_no_chunks_and_still_assemble() -> None:
    tensors = {"e": np.zeros((0,), dtype=np.float32), "f": np.zeros((0,), dtype=np.int64)}
    received, chunks = round_trip(tensors, CHUNK)
    assert chunks == []
    assert received["e"].shape == (0,)
    assert received["f"].shape == (0,)
    assert received["f"].dtype == np.int64


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 3), (3, 0)])
def test_multidimensional_empty_tensors_round_trip(shape: tuple[int, ...]) -> None:
    """BUG: iter_chunks does memoryview(array).cast("B"), and CPython refuses to
    cast a memoryview with a zero in its shape ("cannot cast view with zeros in
    shape or strides"), so any empty tensor with two or more dimensions makes
    iter_chunks raise TypeError instead of contributing zero bytes."""
    tensors = {"before": np.array([1.0, 2.0], dtype=np.float32), "empty": np.zeros(shape, dtype=np.float32), "after": np.array([3], dtype=np.int32)}
    received, chunks = round_trip(tensors, CHUNK)
    assert [len(c) for c in chunks] == [12]
    assert received["empty"].shape == shape
    assert_array_equal(received["before"], [1.0, 2.0])
    assert_array_equal(received["after"], [3])


def test_header_carries_specs_and_payload_bytes() -> None:
    header = header_to_pb(specs_of(mixed_tensors()))
    assert header.payload_bytes == 177
    assert [s.name for s in header.tensors] == list(mixed_tensors())
    assert header.tensors[0].dtype == pb.DTYPE_FLOAT32
    assert list(header.tensors[0].shape) == [3, 5]
    assert list(header.tensors[1].shape) == []
    assert header.tensors[5].dtype == pb.DTYPE_UINT8


def test_spec_nbytes_and_describe() -> None:
    spec = TensorSpec("w", np.dtype("<f4"), (3, 5))
    assert spec.nbytes == 60
    assert TensorSpec("s", np.dtype("<f8"), ()).nbytes == 8
    assert TensorSpec("e", np.dtype("<f8"), (4, 0)).nbytes == 0
    assert spec.describe() == "w: float32[3, 5]"


def test_non_contiguous_input_travels_in_c_order() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": base.T, "s": base[:, ::2]}
    received, _ = round_trip(tensors, CHUNK)
    assert_array_equal(received["t"], base.T)
    assert_array_equal(received["s"], base[:, ::2])


# -- byte order ---------------------------------------------------------------


def test_big_endian_arrays_are_sent_little_endian() -> None:
    be = np.array([1.5, -2.0, 1e30], dtype=">f4")
    chunks = list(iter_chunks([be], chunk_bytes=CHUNK))
    assert b"".join(chunks) == np.array([1.5, -2.0, 1e30], dtype="<f4").tobytes()
    assert b"".join(chunks) != be.tobytes()
    assert specs_of({"x": be})[0].dtype == np.dtype("<f4")


def test_big_endian_round_trip_keeps_values() -> None:
    tensors = {"f": np.array([1.5, -2.0], dtype=">f8"), "i": np.array([1, -(2**33)], dtype=">i8"), "j": np.array([7], dtype=">i4")}
    received, _ = round_trip(tensors, CHUNK)
    assert received["f"].dtype == np.dtype("<f8")
    assert received["i"].dtype == np.dtype("<i8")
    assert_array_equal(received["f"], [1.5, -2.0])
    assert_array_equal(received["i"], [1, -(2**33)])
    assert_array_equal(received["j"], [7])


def test_wire_dtype() -> None:
    assert wire_dtype(np.dtype(">f2")) == np.dtype("<f2")
    assert wire_dtype(np.dtype("<i4")) == np.dtype("<i4")
    assert wire_dtype(np.dtype("u1")) == np.dtype("u1")


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, np.int8, np.uint16, np.int16, np.uint64])
def test_unsupported_numpy_dtypes_cannot_travel(dtype: type) -> None:
    with pytest.raises(MalformedPayload, match="cannot travel"):
        specs_of({"x": np.zeros(2, dtype=dtype)})


# -- refusing bad streams -----------------------------------------------------


def assembler_for(tensors: dict[str, np.ndarray], max_chunk_bytes: int = CHUNK) -> PayloadAssembler:
    return PayloadAssembler(specs_from_pb(wire_header(tensors)), max_chunk_bytes=max_chunk_bytes)


def test_truncated_stream_is_refused() -> None:
    tensors = mixed_tensors()
    chunks = list(iter_chunks(tensors.values(), chunk_bytes=CHUNK))
    assembler = assembler_for(tensors)
    for chunk in chunks[:-1]:
        assembler.add(chunk)
    assert assembler.received_bytes == 176
    with pytest.raises(MalformedPayload, match="after 176 of 177 payload bytes"):
        assembler.finish()


def test_stream_with_no_chunks_for_a_nonempty_header_is_truncated() -> None:
    with pytest.raises(MalformedPayload, match="truncated"):
        assembler_for({"a": np.zeros(3, dtype=np.float32)}).finish()


def test_stream_longer_than_declared_is_refused() -> None:
    tensors = mixed_tensors()
    assembler = assembler_for(tensors)
    for chunk in iter_chunks(tensors.values(), chunk_bytes=CHUNK):
        assembler.add(chunk)
    with pytest.raises(MalformedPayload, match="more than the 177 payload bytes"):
        assembler.add(b"\x00")


def test_overlong_last_chunk_is_refused_before_it_is_copied() -> None:
    tensors = {"a": np.arange(5, dtype=np.uint8)}
    assembler = assembler_for(tensors)
    with pytest.raises(MalformedPayload, match="more than the 5 payload bytes"):
        assembler.add(bytes(6))
    assert assembler.received_bytes == 0


def test_chunk_larger_than_the_limit_is_refused_even_if_it_fits_the_payload() -> None:
    tensors = {"a": np.zeros(32, dtype=np.uint8)}
    assembler = assembler_for(tensors, max_chunk_bytes=16)
    with pytest.raises(MalformedPayload, match="chunk of 17 bytes exceeds the 16-byte chunk limit"):
        assembler.add(bytes(17))
    assembler.add(bytes(16))  # a chunk at the limit is fine


@pytest.mark.parametrize("wrong", [0, 176, 178, 10**12])
def test_header_declaring_wrong_payload_bytes_is_refused(wrong: int) -> None:
    header = wire_header(mixed_tensors())
    header.payload_bytes = wrong
    with pytest.raises(MalformedPayload, match=f"declares {wrong} payload bytes but its tensors need 177"):
        specs_from_pb(header)


def header_of(*specs: pb.TensorSpec, payload_bytes: int) -> pb.TensorHeader:
    return pb.TensorHeader(tensors=list(specs), payload_bytes=payload_bytes)


def test_duplicate_tensor_names_are_refused() -> None:
    header = header_of(
        pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2]),
        pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2]),
        payload_bytes=16,
    )
    with pytest.raises(MalformedPayload, match="'w' appears twice"):
        specs_from_pb(header)


def test_empty_tensor_name_is_refused() -> None:
    header = header_of(pb.TensorSpec(name="", dtype=pb.DTYPE_FLOAT32, shape=[1]), payload_bytes=4)
    with pytest.raises(MalformedPayload, match="#0 has an empty name"):
        specs_from_pb(header)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-2, -2]])
def test_negative_dimensions_are_refused(shape: list[int]) -> None:
    # [-2, -2] multiplies out to a positive size: the sign of each dim is checked, not the product
    header = header_of(pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=shape), payload_bytes=16)
    with pytest.raises(MalformedPayload, match="negative dimension"):
        specs_from_pb(header)


@pytest.mark.parametrize("code", [pb.DTYPE_UNSPECIFIED, 8, 99])
def test_unsupported_dtype_codes_are_refused(code: int) -> None:
    header = header_of(pb.TensorSpec(name="w", dtype=code, shape=[1]), payload_bytes=4)  # type: ignore[arg-type]
    with pytest.raises(MalformedPayload, match=f"unsupported dtype code {code}"):
        specs_from_pb(header)


@pytest.mark.parametrize(
    ("shape", "payload_bytes"),
    [
        # 2^32 * 2^32 = 2^64 elements; an int64 product wraps to 0
        ([2**32, 2**32], 0),
        # 3 * 6148914691236517206 = 2^64 + 2 elements; an int64 product wraps to 2 (8 bytes)
        ([3, 6148914691236517206], 8),
    ],
)
def test_shapes_whose_size_overflows_are_refused(shape: list[int], payload_bytes: int) -> None:
    """BUG: TensorSpec.nbytes multiplies the shape with np.prod(dtype=int64), which
    wraps silently. A header whose element count overflows 2^63 then "matches" a
    tiny payload_bytes, passes specs_from_pb, and PayloadAssembler.finish() later
    fails with numpy's plain ValueError from reshape instead of MalformedPayload."""
    header = header_of(pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=shape), payload_bytes=payload_bytes)
    with pytest.raises(MalformedPayload):
        specs_from_pb(header)


def test_chunks_from_an_offset_are_the_tail_of_the_whole_stream() -> None:
    arrays = [np.arange(1000, dtype=np.float32), np.ones(7, dtype=np.float64), np.zeros((0, 3), dtype=np.float32), np.arange(300, dtype=np.float32)]
    whole = list(iter_chunks(arrays, 512))
    for index in range(len(whole) + 1):
        assert list(iter_chunks(arrays, 512, start=512 * index)) == whole[index:]
    assert b"".join(iter_chunks(arrays, 512, start=4000)) == b"".join(whole)[4000:]
    with pytest.raises(ValueError, match="start must be >= 0"):
        list(iter_chunks(arrays, 512, start=-1))


def test_an_assembler_rewinds_to_resume() -> None:
    specs = specs_of({"w": np.zeros(8, dtype=np.float32)})
    assembler = PayloadAssembler(specs)
    assembler.add(bytes(range(24)))
    assembler.rewind(16)
    assembler.add(bytes(range(16, 32)))
    assert assembler.finish()["w"].tobytes() == bytes(range(32))
    with pytest.raises(MalformedPayload, match="only 32 bytes"):
        assembler.rewind(33)
