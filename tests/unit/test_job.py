"""server.core.Job driven directly: admission, idempotency, versions and snapshots."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from proto.tensors import TensorSpec
from server.config import JobConfig, StalenessConfig, StrategyConfig
from server.core import Job, ModelSnapshot, PushOutcome, Update, UpdateHeader
from server.errors import (
    IdempotencyConflict,
    InvalidUpdate,
    LimitExceeded,
    PreconditionFailed,
    RoundClosed,
    StaleUpdate,
    UnknownVersion,
)

F32 = np.dtype("<f4")


def initial_model() -> dict[str, np.ndarray]:
    return {
        "w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
        "b": np.array([0.5], dtype=np.float32),
    }


def make_job(strategy: str = "fedasync", *, staleness: str = "constant", initial: dict[str, np.ndarray] | None = None, **job: Any) -> Job:
    strategy_kwargs = {k: job.pop(k) for k in ("alpha", "buffer_size", "server_lr", "clients_per_round", "normalizer", "weight_by_samples") if k in job}
    if strategy == "fedasync":
        strategy_kwargs.setdefault("alpha", 0.5)
    config = JobConfig(
        job_id="test",
        strategy=StrategyConfig(name=strategy, **strategy_kwargs),
        staleness=StalenessConfig(kind=staleness),
        **job,
    )
    return Job(config, initial if initial is not None else initial_model())


def header(job: Job, key: str, *, client: str = "c1", base: int = 0, samples: int = 1, specs: tuple[TensorSpec, ...] | None = None) -> UpdateHeader:
    return UpdateHeader(
        job_id=job.job_id,
        client_id=client,
        idempotency_key=key,
        base_version=base,
        num_samples=samples,
        specs=job.specs if specs is None else specs,
    )


def delta(w: list[list[float]], b: list[float]) -> dict[str, np.ndarray]:
    return {"w": np.array(w, dtype=np.float32), "b": np.array(b, dtype=np.float32)}


ONES = delta([[1.0, 1.0], [1.0, 1.0]], [1.0])


def push(job: Job, key: str, values: dict[str, np.ndarray] = ONES, **kwargs: Any) -> PushOutcome:
    h = header(job, key, **kwargs)
    stored = job.admit(h)
    if stored is not None:
        return stored
    return job.submit(Update(h, values))


# -- admit / submit -----------------------------------------------------------


def test_fresh_header_is_admitted() -> None:
    job = make_job()
    assert job.admit(header(job, "k1")) is None


def test_submit_applies_fedasync_and_publishes_a_version() -> None:
    job = make_job(alpha=0.5)
    outcome = push(job, "k1", delta([[2.0, -4.0], [0.0, 1.0]], [1.0]))
    assert outcome == PushOutcome(version_at_arrival=0, staleness=0, staleness_weight=1.0, version_after=1, duplicate=False)
    snap = job.snapshot()
    assert snap.version == 1
    # x + 0.5 * delta
    assert_array_equal(snap.tensors["w"], [[2.0, 0.0], [3.0, 4.5]])
    assert_array_equal(snap.tensors["b"], [1.0])
    assert job.stats.updates_accepted == 1
    assert [v for v, _ in job.stats.versions] == [0, 1]


def test_staleness_weight_comes_from_the_configured_function() -> None:
    job = make_job(alpha=1.0, staleness="polynomial")  # a = 0.5
    for i in range(3):
        push(job, f"k{i}", delta([[0.0, 0.0], [0.0, 0.0]], [0.0]), base=i)
    assert job.snapshot().version == 3
    outcome = push(job, "stale", delta([[2.0, 2.0], [2.0, 2.0]], [4.0]), base=0)
    # tau = 3, s = 1/sqrt(4) = 0.5; x + 1 * 0.5 * delta
    assert (outcome.version_at_arrival, outcome.staleness, outcome.staleness_weight, outcome.version_after) == (3, 3, 0.5, 4)
    assert_array_equal(job.snapshot().tensors["w"], [[2.0, 3.0], [4.0, 5.0]])
    assert_array_equal(job.snapshot().tensors["b"], [2.5])
    assert job.stats.staleness[3] == 1 and job.stats.staleness[0] == 3


def test_fedbuff_job_publishes_on_the_kth_update() -> None:
    job = make_job("fedbuff", buffer_size=2, server_lr=1.0)
    first = push(job, "a", delta([[2.0, 0.0], [0.0, 0.0]], [0.0]), client="a")
    assert first.version_after == 0
    assert job.pending_updates == 1
    second = push(job, "b", delta([[0.0, 0.0], [0.0, 4.0]], [2.0]), client="b")
    assert second.version_after == 1
    assert job.pending_updates == 0
    # x + ([2,0,0,0] + [0,0,0,4]) / 2
    assert_array_equal(job.snapshot().tensors["w"], [[2.0, 2.0], [3.0, 6.0]])
    assert_array_equal(job.snapshot().tensors["b"], [1.5])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client": ""}, "client_id is empty"),
        ({"samples": 0}, "num_samples must be between 1 and"),
        ({"samples": -3}, "num_samples must be between 1 and"),
    ],
)
def test_admit_refuses_bad_header_fields(kwargs: dict[str, Any], message: str) -> None:
    job = make_job()
    with pytest.raises(InvalidUpdate, match=message):
        job.admit(header(job, "k", **kwargs))


def test_admit_refuses_an_empty_idempotency_key() -> None:
    job = make_job()
    with pytest.raises(InvalidUpdate, match="idempotency_key is empty"):
        job.admit(header(job, ""))


W = TensorSpec("w", F32, (2, 2))
B = TensorSpec("b", F32, (1,))


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ((W, B, TensorSpec("extra", F32, (1,))), r"unknown tensor name\(s\) \['extra'\]"),
        ((W,), r"lacks tensor\(s\) \['b'\]"),
        ((B, W), "out of order"),
        ((TensorSpec("w", F32, (4,)), B), r"'w' has shape \[4\], the model's is \[2, 2\]"),
        ((W, TensorSpec("b", np.dtype("<f8"), (1,))), "'b' has dtype float64, the model's is float32"),
    ],
    ids=["unknown", "missing", "order", "shape", "dtype"],
)
def test_admit_refuses_a_layout_that_does_not_match_the_model(specs: tuple[TensorSpec, ...], message: str) -> None:
    job = make_job()
    with pytest.raises(InvalidUpdate, match=message):
        job.admit(header(job, "k", specs=specs))


def test_updates_over_max_update_bytes_are_refused() -> None:
    # The model is 16 + 4 = 20 bytes, so every well-formed update is 20 bytes. A job whose
    # limit is below that is refused either when it is built or at the first admit.
    with pytest.raises((ValueError, LimitExceeded), match="max_update_bytes"):
        job = make_job(max_update_bytes=19)
        job.admit(header(job, "k"))
    job = make_job(max_update_bytes=20)
    assert job.admit(header(job, "k")) is None


# -- idempotency --------------------------------------------------------------


def test_same_key_returns_the_stored_outcome_and_counts_once() -> None:
    job = make_job("fedbuff", buffer_size=2, server_lr=1.0)
    first = push(job, "key-1", delta([[2.0, 2.0], [2.0, 2.0]], [2.0]))
    h = header(job, "key-1")
    # a retry is answered at admit, before its payload is read ...
    again = job.admit(h)
    assert again == PushOutcome(first.version_at_arrival, first.staleness, first.staleness_weight, first.version_after, duplicate=True)
    # ... and at submit, if it raced past admit
    again = job.submit(Update(h, delta([[2.0, 2.0], [2.0, 2.0]], [2.0])))
    assert again.duplicate is True
    assert again.version_after == 0
    assert job.pending_updates == 1  # a second count would have flushed the buffer of 2
    assert job.snapshot().version == 0
    assert job.stats.updates_accepted == 1
    assert job.stats.duplicates == 2
    # the next distinct update flushes a buffer holding the first update once:
    # x + ([2,2,2,2] + [0,0,0,0]) / 2
    push(job, "key-2", delta([[0.0, 0.0], [0.0, 0.0]], [0.0]), client="c2")
    assert job.snapshot().version == 1
    assert_array_equal(job.snapshot().tensors["w"], [[2.0, 3.0], [4.0, 5.0]])


def test_duplicate_is_answered_after_newer_versions_with_the_first_outcome() -> None:
    job = make_job()
    first = push(job, "k1")
    push(job, "k2", base=1)
    push(job, "k3", base=2)
    again = push(job, "k1")
    assert again.duplicate is True
    assert (again.version_at_arrival, again.staleness, again.version_after) == (0, 0, 1) == (first.version_at_arrival, first.staleness, first.version_after)
    assert job.snapshot().version == 3


def test_same_key_from_a_different_client_is_a_conflict() -> None:
    job = make_job()
    push(job, "shared", client="alice")
    with pytest.raises(IdempotencyConflict, match="'shared' was already used"):
        job.admit(header(job, "shared", client="bob"))
    with pytest.raises(IdempotencyConflict):
        job.submit(Update(header(job, "shared", client="bob"), ONES))
    assert job.snapshot().version == 1
    assert job.stats.updates_accepted == 1


def test_same_key_with_a_different_base_version_is_a_conflict() -> None:
    job = make_job()
    push(job, "k", base=0)
    with pytest.raises(IdempotencyConflict):
        job.admit(header(job, "k", base=1))


def test_conflict_is_an_invalid_update() -> None:
    assert issubclass(IdempotencyConflict, InvalidUpdate)


def test_keys_beyond_the_idempotency_window_are_forgotten() -> None:
    job = make_job(idempotency_window=2)
    push(job, "a", base=0)
    push(job, "b", base=1)
    push(job, "c", base=2)  # evicts "a", the oldest
    assert job.admit(header(job, "b", base=1)) is not None  # still remembered
    assert job.admit(header(job, "a", base=0)) is None  # forgotten: would be read and counted again
    outcome = push(job, "a", base=0)
    assert outcome.duplicate is False
    assert outcome.version_after == 4
    assert job.stats.updates_accepted == 4


def test_recalling_a_key_keeps_it_in_the_window() -> None:
    job = make_job(idempotency_window=2)
    push(job, "a", base=0)
    push(job, "b", base=1)
    assert push(job, "a", base=0).duplicate is True  # "a" becomes the most recently used
    push(job, "c", base=2)  # evicts "b", not "a"
    assert job.admit(header(job, "a", base=0)) is not None
    assert job.admit(header(job, "b", base=1)) is None


# -- versions and staleness ---------------------------------------------------


def test_base_version_never_published_is_unknown() -> None:
    job = make_job()
    with pytest.raises(UnknownVersion, match="base version 1 was never published .*latest is 0"):
        job.admit(header(job, "k", base=1))
    with pytest.raises(UnknownVersion):
        job.submit(Update(header(job, "k", base=5), ONES))
    assert job.snapshot().version == 0
    assert issubclass(UnknownVersion, PreconditionFailed)


def test_update_beyond_max_staleness_is_refused_with_its_staleness() -> None:
    job = make_job(max_staleness=1)
    push(job, "k0", base=0)
    push(job, "k1", base=1)
    before = job.snapshot()
    with pytest.raises(StaleUpdate, match="2 versions stale, above max_staleness=1") as info:
        job.admit(header(job, "old", base=0))
    assert info.value.staleness == 2
    with pytest.raises(StaleUpdate, match="2 versions stale"):
        job.submit(Update(header(job, "old", base=0), ONES))
    assert job.snapshot() is before
    ok = push(job, "fine", base=1)  # tau = 1 == max_staleness is allowed
    assert ok.staleness == 1 and ok.version_after == 3


def test_stale_update_key_is_not_remembered() -> None:
    job = make_job(max_staleness=0)
    push(job, "k0", base=0)
    with pytest.raises(StaleUpdate):
        push(job, "late", base=0)
    # the refused key is free: the same client may use it for its retrained update
    assert push(job, "late", base=1).duplicate is False


def test_fedavg_job_refuses_closed_round_and_second_push() -> None:
    job = make_job("fedavg", clients_per_round=2)
    push(job, "a1", client="a")
    with pytest.raises(PreconditionFailed, match="'a' already pushed"):
        push(job, "a2", client="a")
    push(job, "b1", client="b")
    assert job.snapshot().version == 1
    with pytest.raises(RoundClosed):
        push(job, "c1", client="c", base=0)


# -- NaN / Inf ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_update_is_refused_and_changes_nothing(bad: float) -> None:
    job = make_job("fedbuff", buffer_size=2, server_lr=1.0)
    push(job, "good", client="a")
    before = job.snapshot()
    w_before = before.tensors["w"].copy()
    values = delta([[0.0, 0.0], [0.0, bad]], [0.0])
    with pytest.raises(InvalidUpdate, match="'w' of the update holds NaN or Inf"):
        job.submit(Update(header(job, "bad", client="b"), values))
    assert job.snapshot() is before
    assert job.snapshot().version == 0
    assert_array_equal(job.snapshot().tensors["w"], w_before)
    assert job.pending_updates == 1
    assert job.stats.updates_accepted == 1
    # the refused key was not remembered, and the buffer still holds only "good":
    # x + ([1,1,1,1] + [2,2,2,2]) / 2
    outcome = push(job, "bad", delta([[2.0, 2.0], [2.0, 2.0]], [2.0]), client="b")
    assert outcome.duplicate is False and outcome.version_after == 1
    assert_array_equal(job.snapshot().tensors["w"], [[2.5, 3.5], [4.5, 5.5]])


def test_nan_in_the_last_tensor_is_refused_too() -> None:
    job = make_job()
    with pytest.raises(InvalidUpdate, match="'b'"):
        job.submit(Update(header(job, "k"), delta([[0.0, 0.0], [0.0, 0.0]], [np.nan])))
    assert job.snapshot().version == 0


def test_finite_update_that_overflows_the_model_is_refused() -> None:
    """BUG (server/core.py, Job.submit): only the incoming delta is checked for
    NaN/Inf. A finite delta whose aggregate overflows the model's dtype (here
    float32: 3e38 + 0.5 * 3e38 = inf) is accepted and published, and the global
    model holds Inf from then on: every later delta trained from it is NaN/Inf
    and refused, so the job is dead. (Under pytest's warnings-as-errors the numpy
    overflow RuntimeWarning aborts submit instead; in a server, where warnings
    are not errors, the Inf model is published, which is what this test runs.)"""
    job = make_job(alpha=0.5, initial={"w": np.array([3e38], dtype=np.float32)})
    before = job.snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(InvalidUpdate):
            job.submit(Update(header(job, "k"), {"w": np.array([3e38], dtype=np.float32)}))
    assert job.snapshot() is before
    assert np.isfinite(job.snapshot().tensors["w"]).all()


# -- snapshots ----------------------------------------------------------------


def test_snapshot_tensors_are_read_only() -> None:
    snap = make_job().snapshot()
    for name in ("w", "b"):
        array = snap.tensors[name]
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0.0
        with pytest.raises(ValueError):
            array.flags.writeable = True


def test_old_snapshot_keeps_its_values_after_new_versions() -> None:
    job = make_job(alpha=1.0)
    old = job.snapshot()
    old_bytes = b"".join(old.chunks())
    push(job, "k1", delta([[10.0, 10.0], [10.0, 10.0]], [10.0]))
    push(job, "k2", delta([[10.0, 10.0], [10.0, 10.0]], [10.0]), base=1)
    assert job.snapshot().version == 2
    assert old.version == 0
    assert_array_equal(old.tensors["w"], [[1.0, 2.0], [3.0, 4.0]])
    assert_array_equal(old.tensors["b"], [0.5])
    assert b"".join(old.chunks()) == old_bytes
    assert_array_equal(job.snapshot().tensors["w"], [[21.0, 22.0], [23.0, 24.0]])


def test_snapshot_copies_the_initial_model() -> None:
    initial = initial_model()
    job = make_job(initial=initial)
    initial["w"][0, 0] = 99.0
    assert job.snapshot().tensors["w"][0, 0] == 1.0


def test_snapshot_payload_is_the_little_endian_tensors_in_order() -> None:
    job = make_job(initial={"w": np.array([1.0, 2.0], dtype=">f4"), "b": np.array([3.0], dtype=np.float64)})
    snap = job.snapshot()
    expected = np.array([1.0, 2.0], dtype="<f4").tobytes() + np.array([3.0], dtype="<f8").tobytes()
    assert snap.payload_bytes == 16
    assert b"".join(snap.chunks()) == expected
    assert [len(c) for c in snap.chunks(chunk_bytes=6)] == [6, 6, 4]
    assert [s.dtype for s in snap.specs] == [np.dtype("<f4"), np.dtype("<f8")]


def test_model_snapshot_built_directly() -> None:
    specs = (TensorSpec("a", F32, (2,)), TensorSpec("s", np.dtype("<f8"), ()))
    snap = ModelSnapshot(7, specs, {"s": np.float64(2.5), "a": np.array([1.0, -1.0], dtype=np.float32)})
    assert snap.version == 7
    assert list(snap.tensors) == ["a", "s"]  # spec order, not mapping order
    assert float(snap.tensors["s"]) == 2.5
    assert snap.payload_bytes == 16


# -- waiting for versions -----------------------------------------------------


def test_wait_for_version_returns_when_another_thread_publishes() -> None:
    job = make_job()
    returned = threading.Event()
    errors: list[BaseException] = []

    def publisher() -> None:
        try:
            # Give the waiter time to start waiting, so that version 1 has to wake it.
            time.sleep(0.2)
            push(job, "k1")  # version 1
            # If the waiter is not woken by version 1, it only returns at its timeout and
            # by then sees version 2, which fails the assertion below.
            if not returned.wait(timeout=5.0):
                push(job, "k2", base=1)
        except BaseException as error:  # pragma: no cover - surfaced below
            errors.append(error)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        snap = job.wait_for_version(1, timeout_s=15.0)
    finally:
        returned.set()
        thread.join()
    assert not errors
    assert snap.version == 1
    assert_array_equal(snap.tensors["b"], [1.0])  # 0.5 + 0.5 * 1


def test_wait_for_version_returns_the_current_snapshot_on_timeout() -> None:
    job = make_job()
    snap = job.wait_for_version(1, timeout_s=0.05)
    assert snap.version == 0
    assert snap is job.snapshot()


def test_wait_for_a_version_already_published_returns_at_once() -> None:
    job = make_job()
    push(job, "k1")
    push(job, "k2", base=1)
    assert job.wait_for_version(1, timeout_s=30.0).version == 2
    assert job.wait_for_version(0, timeout_s=30.0).version == 2


# -- the initial model --------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_job_refuses_non_float_initial_tensors(dtype: type) -> None:
    initial = {"w": np.zeros(2, dtype=np.float32), "steps": np.zeros(1, dtype=dtype)}
    with pytest.raises(ValueError, match="'steps' is .*only floating-point tensors"):
        make_job(initial=initial)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_job_refuses_nan_or_inf_in_the_initial_model(bad: float) -> None:
    initial = {"w": np.array([1.0, bad], dtype=np.float32)}
    with pytest.raises(ValueError, match="'w' holds NaN or Inf"):
        make_job(initial=initial)


def test_job_refuses_an_empty_initial_model() -> None:
    with pytest.raises(ValueError, match="no tensors"):
        make_job(initial={})


def test_job_accepts_float16_and_float64() -> None:
    job = make_job(initial={"h": np.array([1.0], dtype=np.float16), "d": np.array([2.0], dtype=np.float64)})
    assert [s.dtype for s in job.specs] == [np.dtype("<f2"), np.dtype("<f8")]
    assert job.synchronous is False
    assert make_job("fedavg").synchronous is True


def test_published_versions_are_each_a_debug_event_and_an_info_line_at_most_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    job = make_job("fedasync")
    with caplog.at_level(logging.DEBUG, logger="tributary.server"):
        for i in range(5):  # fedasync: one version per update, well inside one interval
            push(job, f"k{i}", base=i)
    published = [r for r in caplog.records if r.getMessage().startswith("published version")]
    assert [r.version for r in published] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    assert [r.levelno for r in published] == [logging.INFO] + [logging.DEBUG] * 4


def test_a_refused_push_keeps_at_most_an_ids_length_of_its_client_id() -> None:
    job = make_job("fedasync")
    job.note_rejection("InvalidUpdate", "c" * 10_000, "client_id is 10000 characters long; at most 128 are accepted")
    (_, client_id, reason), = job.read_stats(lambda stats: list(stats.recent_rejections))
    assert client_id == "c" * 128 and reason.startswith("InvalidUpdate: client_id is 10000 characters long")
