"""Compressed pushes and quantized secure-aggregation cohorts on a real server:
the model moves by what was sent, malformed encodings change nothing, top-k
never meets secure aggregation, and a quantized cohort's sum is right within
its quantization bound while its masked inputs travel at the ring's width."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_sdk import Client, Compression, UpdateRejected
from client_sdk._compression import Compressor
from proto import tributary_pb2 as pb
from proto import tributary_pb2_grpc as pb_grpc
from proto.compression import Encoding, encoded_size
from proto.secagg.quantize import FixedPoint
from proto.tensors import header_to_pb, iter_chunks, specs_of
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from tests.conftest import small_model
from tests.integration.test_secure_aggregation import MODEL, flat_model, run_members, secure_job, update_of

APPLY_EACH = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1))
"""Every update becomes a version at once: x <- x + delta (tau = 0, s = 1, K = 1)."""


def delta(seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (0.1 * rng.standard_normal(a.shape)).astype(np.float32) for name, a in small_model().items()}


def moved(running: RunningServer, job: str = "default") -> dict[str, np.ndarray]:
    tensors = running.core.job(job).snapshot().tensors
    return {name: tensors[name].astype(np.float64) - start.astype(np.float64) for name, start in small_model().items()}


@pytest.mark.parametrize(
    "compression", [Compression(quantize_bits=8, seed=1), Compression(quantize_bits=4, seed=1), Compression(top_k=0.25, seed=1), Compression(quantize_bits=8, top_k=0.5, seed=1)]
)
def test_compressed_push_moves_the_model_by_what_was_sent(serve: Callable[..., RunningServer], compression: Compression) -> None:
    running = serve(APPLY_EACH)
    update = delta()
    # the same seed draws the same rounding: this is what the client sends
    expected = Compressor(compression).encode(update)[0]
    with Client(running.address, insecure=True) as client:
        result = client.push(0, update, num_samples=3, compression=compression)
    assert result.version_after == 1
    assert result.payload_bytes == encoded_size(specs_of(update), compression.encoding)
    raw_bytes = sum(a.nbytes for a in update.values())
    assert result.payload_bytes < raw_bytes
    for name, change in moved(running).items():
        np.testing.assert_allclose(change, expected[name].decoded, atol=1e-6)
        if compression.top_k is None:  # dense quantization: within one step of the true delta
            step = (update[name].max() - update[name].min()) / (2 ** (compression.quantize_bits or 8) - 1)
            assert np.abs(change - update[name]).max() <= step * 1.001
        else:
            kept = np.count_nonzero(change)
            assert kept == int(np.ceil(compression.top_k * update[name].size))


def test_error_feedback_lives_in_the_client_across_pushes(serve: Callable[..., RunningServer]) -> None:
    running = serve(APPLY_EACH)
    compression = Compression(top_k=0.25, seed=1)
    with Client(running.address, insecure=True) as client:
        update = delta()
        client.push(0, update, compression=compression)
        owed = client.compression_residual(compression)
        assert all(np.count_nonzero(owed[name]) == update[name].size - np.ceil(0.25 * update[name].size) for name in update)
        zero = {name: np.zeros_like(a) for name, a in update.items()}
        for version in range(1, 12):  # nothing new to send: the residual drains into the model
            client.push(version, zero, compression=compression)
    for name, change in moved(running).items():
        np.testing.assert_allclose(change, update[name], atol=1e-6)


def _raw_push(running: RunningServer, header: pb.UpdateHeader, payload: bytes) -> grpc.RpcError | pb.PushAck:
    def requests() -> Iterator[pb.PushRequest]:
        yield pb.PushRequest(update=header)
        for data in iter_chunks([np.frombuffer(payload, np.uint8)]):
            yield pb.PushRequest(chunk=pb.Chunk(data=data))

    with grpc.insecure_channel(running.address) as channel:
        try:
            ack: pb.PushAck = pb_grpc.TributaryStub(channel).Push(requests(), timeout=10)
            return ack
        except grpc.RpcError as error:
            return error


def _header(encoding: pb.UpdateEncoding, payload_bytes: int | None = None, key: str = "k") -> pb.UpdateHeader:
    specs = specs_of(small_model())
    tensor_header = header_to_pb(specs)
    try:
        tensor_header.payload_bytes = payload_bytes if payload_bytes is not None else encoded_size(specs, Encoding.from_pb(encoding))
    except ValueError:
        tensor_header.payload_bytes = payload_bytes or 0
    return pb.UpdateHeader(job_id="default", client_id="c", idempotency_key=key, base_version=0, num_samples=1, header=tensor_header, encoding=encoding)


def _valid_payload(encoding: Encoding) -> bytearray:
    encoded = Compressor(Compression(quantize_bits=encoding.quantize_bits or None, top_k=encoding.top_k_fraction or None)).encode(delta())[0]
    return bytearray(b"".join(e.data for e in encoded.values()))


def _set(payload: bytearray, offset: int, value: np.ndarray) -> bytearray:
    payload[offset : offset + value.nbytes] = value.tobytes()
    return payload


Q8, TOPK = Encoding(8), Encoding(0, 0.5)
BAD_PUSHES = {
    "bits": (pb.UpdateEncoding(quantize_bits=5), bytes(20), r"quantize_bits must be 0 \(off\), 4 or 8"),
    "fraction": (pb.UpdateEncoding(top_k_fraction=1.5), bytes(20), r"top_k_fraction must be 0 \(dense\) or in \(0, 1\]"),
    "nan scale": (Q8.to_pb(), bytes(_set(_valid_payload(Q8), 0, np.array([np.nan], "<f4"))), "not finite"),
    "index out of range": (TOPK.to_pb(), bytes(_set(_valid_payload(TOPK), 0, np.array([0, 1, 2, 3, 4, 99], "<u4"))), "out of range"),
    "unsorted": (TOPK.to_pb(), bytes(_set(_valid_payload(TOPK), 0, np.array([3, 1], "<u4"))), "strictly increasing"),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_malformed_encoded_pushes_are_invalid_and_change_nothing(serve: Callable[..., RunningServer], case: str) -> None:
    running = serve(APPLY_EACH)
    encoding, payload, message = BAD_PUSHES[case]
    error = _raw_push(running, _header(encoding), payload)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert re.search(message, error.details() or ""), error.details()
    job = running.core.job("default")
    assert job.snapshot().version == 0 and job.stats.updates_accepted == 0
    # the server keeps serving: a good encoded push goes through
    good = _raw_push(running, _header(Q8.to_pb(), key="good"), bytes(_valid_payload(Q8)))
    assert isinstance(good, pb.PushAck) and good.version_after == 1


def test_wrong_encoded_size_is_refused_before_the_payload(serve: Callable[..., RunningServer]) -> None:
    running = serve(APPLY_EACH)
    size = encoded_size(specs_of(small_model()), Q8)
    for declared in (size - 1, sum(a.nbytes for a in small_model().values())):
        error = _raw_push(running, _header(Q8.to_pb(), payload_bytes=declared), bytes(declared))
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"header declares {declared} payload bytes but its tensors need {size} encoded" in (error.details() or "")
    # a stream shorter than the encoded size it declared is truncated
    error = _raw_push(running, _header(Q8.to_pb()), bytes(_valid_payload(Q8))[:-3])
    assert isinstance(error, grpc.RpcError) and "truncated" in (error.details() or "")
    assert running.core.job("default").stats.updates_accepted == 0


def test_size_limit_counts_encoded_bytes(serve: Callable[..., RunningServer]) -> None:
    model_bytes = sum(a.nbytes for a in small_model().values())
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1), max_update_bytes=model_bytes))
    with Client(running.address, insecure=True) as client:
        assert client.push(0, delta(), compression=Compression(quantize_bits=8)).payload_bytes < model_bytes


def test_a_job_refuses_encodings_it_does_not_accept(serve: Callable[..., RunningServer]) -> None:
    running = serve(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1), accept_compression=("quantize",)))
    with Client(running.address, insecure=True) as client:
        assert client.job_info().accepts_top_k is False and client.job_info().accepts_quantized is True
        with pytest.raises(UpdateRejected, match="does not take top_k compressed updates"):
            client.push(0, delta(), compression=Compression(top_k=0.5))
        client.push(0, delta(), compression=Compression(quantize_bits=4))
    assert running.core.job("default").stats.updates_accepted == 1


def test_a_compressed_update_survives_a_restart(tmp_path: Path) -> None:
    job = JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=2))
    config = ServerConfig(address="127.0.0.1:0", jobs=(job,), state_dir=tmp_path, insecure=True)
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with Client(running.address, insecure=True) as client:
            for index in range(3):  # two make version 1, the third waits in the buffer
                client.push(client.pull().version, delta(index), compression=Compression(quantize_bits=4, top_k=0.5, seed=index))
        model = {k: v.copy() for k, v in running.core.job("default").snapshot().tensors.items()}
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        resumed = running.core.job("default")
        assert resumed.snapshot().version == 1 and resumed.pending_updates == 1
        for name, array in model.items():
            np.testing.assert_array_equal(resumed.snapshot().tensors[name], array)


# -- secure aggregation --------------------------------------------------------------


def test_top_k_never_meets_secure_aggregation() -> None:
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(quantize_bits=8, value_bound=16.0),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running:
        with Client(running.address, insecure=True) as client:
            with pytest.raises(UpdateRejected, match="top-k sparsification cannot join"):
                client.push(0, {"w": MODEL["w"], "b": MODEL["b"]}, compression=Compression(top_k=0.1))
            with pytest.raises(ValueError, match="top-k sparsification does not compose"):
                client.fit(object(), lambda model, device: 1, updates=1, compression=Compression(top_k=0.1))
            with pytest.raises(ValueError, match="quantizes its cohorts to 8 bits"):
                client.fit(object(), lambda model, device: 1, updates=1, compression=Compression(quantize_bits=4))
            assert client.job_info().secure_quantize_bits == 8


def test_quantized_cohort_aggregates_within_its_bound_and_uploads_uint16() -> None:
    value_bound, weight_bound, members = 16.0, 16.0, 5
    recorded: list[tuple[str, np.ndarray]] = []
    config = ServerConfig(
        address="127.0.0.1:0", insecure=True, jobs=(secure_job(quantize_bits=8, value_bound=value_bound, clip_bound=weight_bound),)
    )
    with running_server(config, {"default": MODEL}, grace_s=0.5, secagg_observer=lambda label, v: recorded.append((label, v.copy()))) as running:
        results = run_members(running, members, lambda i, cohort: cohort.submit(0, update_of(i), 10 + i))
        assert all(not isinstance(r, Exception) for r in results.values()), results
        assert running.core.job("default").snapshot().version == 1
        weights = {i: 10.0 + i for i in range(members)}
        total_weight = sum(weights.values())
        expected = sum(weights[i] * update_of(i).astype(np.float64) for i in range(members)) / total_weight
        values = FixedPoint.for_values(value_bits=8, bound=value_bound, max_summands=members)
        weight = FixedPoint.for_values(value_bits=8, bound=weight_bound, max_summands=members)
        assert values.bits == 12  # 8 value bits + ceil(log2 5) = 3 + 1 headroom: the ring of this cohort
        # each member's value and weight are off by < one step: bound the decoded mean
        bound = (members / values.scale + np.abs(expected).max() * members / weight.scale) / (total_weight - members / weight.scale)
        error = np.abs(flat_model(running) - expected)
        assert error.max() <= bound
        assert error.mean() < bound / 4  # unbiased rounding: errors mostly cancel
    inputs = [vector for label, vector in recorded if label.startswith("input/")]
    assert len(inputs) == members and all(int(v.max()) < 1 << 12 for v in inputs)


def test_a_quantized_cohort_refuses_a_uint32_upload() -> None:
    config = ServerConfig(address="127.0.0.1:0", insecure=True, jobs=(secure_job(quantize_bits=8, value_bound=16.0, min_survivors=4),))
    with running_server(config, {"default": MODEL}, grace_s=0.5) as running:

        def behaviour(index: int, cohort: object) -> object:
            if index == 0:
                cohort._setup.join()  # type: ignore[attr-defined]
                ref = cohort._ref  # type: ignore[attr-defined]
                vector = np.zeros(MODEL["w"].size + MODEL["b"].size + 1, np.uint32)  # twice the bytes of the uint16 it needs

                def requests() -> Iterator[pb.MaskedInputRequest]:
                    yield pb.MaskedInputRequest(header=ref)
                    for data in iter_chunks([vector]):
                        yield pb.MaskedInputRequest(chunk=pb.Chunk(data=data))

                cohort._client._stub.GetUploadSlot(ref)  # type: ignore[attr-defined]
                try:
                    cohort._client._stub.UploadMasked(requests(), timeout=10)  # type: ignore[attr-defined]
                except grpc.RpcError as error:
                    return error
                return "accepted"
            return cohort.submit(0, update_of(index), 10)  # type: ignore[attr-defined]

        results = run_members(running, 5, behaviour)
        refused = results[0]
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert "uint16" in (refused.details() or "")
        assert all(not isinstance(results[i], Exception) for i in range(1, 5)), results
        assert running.core.job("default").stats.updates_accepted == 4
