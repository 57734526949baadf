"""Runs secure-aggregation cohorts for a job: forms them from the clients that
check in, drives each `CohortCoordinator` through its phases with deadlines,
and applies completed cohorts to the job. No gRPC: the servicer calls these
blocking methods from its RPC threads.

Each phase closes as soon as every expected member has answered, or when a
caller waiting on it sees the deadline pass; either way exactly one caller
closes it, under the cohort's lock, and every waiter then reads the result.

Lock order: CohortManager._lock, then _Cohort.lock, then Job._lock.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from proto.secagg.protocol import (
    CohortPlan,
    KeyAdvert,
    MaskedInput,
    Phase,
    ProtocolViolation,
    SealedShares,
    UnmaskRequest,
    UnmaskResponse,
    default_neighbour_count,
)
from proto.logcontext import log_context
from proto.secagg.quantize import masked_dtype
from server import faults
from server.config import SecAggConfig
from server.core import Job
from server.errors import ServerError, ShuttingDown
from server.secagg import CohortAborted, CohortCoordinator

T = TypeVar("T")
logger = logging.getLogger("tributary.server")
Observer = Callable[[str, np.ndarray], None]

REJOIN_GRACE_S = 5.0
"""A client whose join timed out and that asks again within this long keeps
its place in line (its first arrival time): clients long-poll in rounds (the
SDK's last 10 s), often shorter than forming_timeout_s, and each new round
must not restart the wait that lets a smaller cohort form."""


@dataclass
class _Cohort:
    coordinator: CohortCoordinator
    tokens: dict[int, bytes]
    deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    neighbour_keys: dict[int, dict[int, KeyAdvert]] = field(default_factory=dict)
    shares_for: dict[int, dict[int, bytes]] = field(default_factory=dict)
    unmask_request: UnmaskRequest | None = None
    applied_version: int | None = None
    client_ids: dict[int, str] = field(default_factory=dict)
    """Member -> the client id it joined as (whose training slot its upload releases)."""
    energy: dict[int, float] = field(default_factory=dict)
    """Member -> the energy it reported with its masked input."""

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


@dataclass(frozen=True)
class CohortProgress:
    cohort_id: str
    phase: str
    members: int
    expected: int
    """Members the current phase waits for: those still in the cohort (every
    member while keys are advertised; then only those that answered the phase
    before); 0 once the cohort ended."""
    answered: int
    """Of those, the ones that answered it (adverts, shares, masked inputs, unmask responses)."""
    uploaded: int
    """Members whose masked input arrived (kept after the inputs are summed and freed)."""
    needed: int
    """Survivors the cohort needs to complete (min_survivors)."""
    deadline_unix: float | None
    """When the current phase closes without the members still missing; None once the cohort ended."""
    applied_version: int | None
    abort_reason: str | None


@dataclass(frozen=True)
class CohortsProgress:
    waiting: int
    """Clients waiting for a cohort to form."""
    cohort_size: int
    cohorts: tuple[CohortProgress, ...]


@dataclass(frozen=True)
class JoinedCohort:
    plan: CohortPlan
    token: bytes


class CohortManager:
    def __init__(self, job: Job, config: SecAggConfig, observe: Observer | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.job = job
        self._clock = clock
        self.config = config
        self._observe = observe
        self._lock = threading.Lock()
        self._formed = threading.Condition(self._lock)
        self._waiting: dict[str, float] = {}
        """Client id -> when it started waiting (monotonic): forming_timeout_s
        counts from the oldest waiter still here, never from one that left."""
        self._left: dict[str, tuple[float, float]] = {}
        """Client id -> (arrival, when its join timed out), for REJOIN_GRACE_S."""
        self._placed: dict[str, JoinedCohort] = {}
        self._cohorts: dict[str, _Cohort] = {}
        self._serial = itertools.count(1)
        self._closing = False

    # -- forming -------------------------------------------------------------------

    def join(self, client_id: str, wait_s: float) -> JoinedCohort | None:
        """The cohort `client_id` is placed in, or None if none formed in time."""
        deadline = self._clock() + wait_s
        # a job with training slots: members join holding one (cohorts count as trainers)
        self.job.require_slot(client_id)
        with self._formed:
            self._raise_if_closing()
            self._prune()
            if client_id not in self._waiting and client_id not in self._placed:
                self._waiting[client_id] = self._arrival(client_id)
            while client_id not in self._placed:
                self._maybe_form()
                if client_id in self._placed:
                    break
                remaining = deadline - self._clock()
                if remaining <= 0:
                    # it asks again; a stale entry would join a cohort without it
                    arrival = self._waiting.pop(client_id, None)
                    if arrival is not None:
                        self._left[client_id] = (arrival, self._clock())
                    return None
                self._formed.wait(min(remaining, 0.25))
                self._raise_if_closing()
            joined = self._placed.pop(client_id)
        faults.point("secagg.joined")
        return joined

    def _arrival(self, client_id: str) -> float:
        """When `client_id` started waiting: now, or its first arrival if its
        previous join timed out within REJOIN_GRACE_S. Call with the lock held."""
        now = self._clock()
        while self._left:  # oldest departures first: forget those past the grace
            oldest = next(iter(self._left))
            if now - self._left[oldest][1] <= REJOIN_GRACE_S:
                break
            del self._left[oldest]
        arrival, _ = self._left.pop(client_id, (now, now))
        return arrival

    def _raise_if_closing(self) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down; join a cohort again once it is back")

    def shut_down(self) -> None:
        """Abort every cohort in progress and refuse new joins: members waiting
        in a phase are released with ABORTED at once, instead of holding the
        server's shutdown until their deadlines."""
        with self._formed:
            self._closing = True
            self._formed.notify_all()
            cohorts = list(self._cohorts.values())
        for cohort in cohorts:
            with cohort.changed:
                if cohort.coordinator.phase not in (Phase.COMPLETED, Phase.ABORTED):
                    cohort.coordinator.abort("the server is shutting down")
                    self._note_abort(cohort)
                    cohort.changed.notify_all()

    def _maybe_form(self) -> None:
        size = self.config.cohort_size
        if not self._waiting:
            return
        waited = self._clock() - min(self._waiting.values())
        enough = len(self._waiting) >= size or (
            len(self._waiting) >= self.config.survivors_needed and waited >= self.config.forming_timeout_s
        )
        if not enough:
            return
        chosen = sorted(self._waiting, key=self._waiting.__getitem__)[:size]  # the longest waiting first
        for client_id in chosen:
            del self._waiting[client_id]
        self._prune()
        cohort_id = f"{self.job.job_id}-{next(self._serial)}-{secrets.token_hex(4)}"
        members = list(range(1, len(chosen) + 1))
        values_point, weight_point = self.config.fixed_points(len(members))
        coordinator = CohortCoordinator(
            cohort_id,
            members,
            neighbours=self.config.neighbours or default_neighbour_count(len(members)),
            min_survivors=self.config.survivors_needed_for(len(members)),
            fixed_point=values_point,
            weight_point=weight_point,
            vector_length=self.job.vector_length + 1,
            observe=self._observe,
        )
        plans = coordinator.plans()
        cohort = _Cohort(coordinator, {m: secrets.token_bytes(16) for m in members}, self._clock() + self.config.phase_timeout_s)
        cohort.client_ids = dict(zip(members, chosen))
        self._cohorts[cohort_id] = cohort
        for client_id, member in zip(chosen, members):
            self._placed[client_id] = JoinedCohort(plans[member], cohort.tokens[member])
        self._formed.notify_all()
        logger.info(
            "cohort formed: %d members (%d must finish), after %.1f s of waiting; clients %s",
            len(members), coordinator.min_survivors, waited, ", ".join(chosen),
            extra=log_context(job=self.job.job_id, version=self.job.snapshot().version, cohort=cohort_id),
        )  # fmt: skip

    # -- phases ----------------------------------------------------------------------

    def advertise(self, cohort_id: str, member: int, token: bytes, advert: KeyAdvert) -> dict[int, KeyAdvert]:
        cohort = self._cohort(cohort_id, member, token)
        faults.point("secagg.advertise")
        return self._step(
            cohort,
            lambda: cohort.coordinator.receive_advert(advert),
            Phase.ADVERTISE_KEYS,
            expected=lambda: set(cohort.coordinator.members),
            received=lambda: set(cohort.coordinator._adverts),
            close=lambda: self._close_advertising(cohort),
            result=lambda: cohort.neighbour_keys.get(member, {}),
        )

    def share(self, cohort_id: str, member: int, token: bytes, shares: SealedShares) -> dict[int, bytes]:
        cohort = self._cohort(cohort_id, member, token)
        faults.point("secagg.share")
        return self._step(
            cohort,
            lambda: cohort.coordinator.receive_shares(shares),
            Phase.SHARE_KEYS,
            expected=lambda: set(cohort.coordinator.advertised),
            received=lambda: set(cohort.coordinator._sealed),
            close=lambda: self._close_sharing(cohort),
            result=lambda: cohort.shares_for.get(member, {}),
        )

    def upload_slot(self, cohort_id: str, member: int, token: bytes) -> int:
        cohort = self._cohort(cohort_id, member, token)
        with cohort.lock:
            self._raise_if_aborted(cohort)
            if cohort.coordinator.phase is not Phase.MASKED_INPUT:
                raise ProtocolViolation(f"uploads are not open in cohort {cohort_id!r} (phase {cohort.coordinator.phase.value})")
        return self.job.snapshot().version

    def upload(self, cohort_id: str, member: int, token: bytes, vector: np.ndarray, energy_joules: float = 0.0) -> UnmaskRequest:
        cohort = self._cohort(cohort_id, member, token)
        faults.point("secagg.upload")

        def receive() -> None:
            cohort.coordinator.receive_input(MaskedInput(cohort_id, member, vector))
            cohort.energy[member] = energy_joules
            client_id = cohort.client_ids.get(member)
            if client_id is not None:  # its update is in: its training slot is free again
                self.job.release_slot(client_id, pushed=True)

        request = self._step(
            cohort,
            receive,
            Phase.MASKED_INPUT,
            expected=lambda: set(cohort.coordinator.shared),
            received=lambda: set(cohort.coordinator._inputs),
            close=lambda: self._close_input(cohort),
            result=lambda: cohort.unmask_request,
        )
        assert request is not None
        return request

    def unmask(self, cohort_id: str, member: int, token: bytes, response: UnmaskResponse) -> int:
        with self._lock:
            known = cohort_id in self._cohorts
        if not known:
            # A retry whose first answer was lost in a restart: the cohort is
            # gone from memory, but if its aggregate was logged it was applied
            # (recovery replays it), and the member should hear so, not retrain.
            logged = self.job.logged_cohort_version(cohort_id)
            if logged is not None:
                return logged
        cohort = self._cohort(cohort_id, member, token)
        with cohort.lock:
            if cohort.coordinator.phase is Phase.COMPLETED and member in cohort.coordinator._responses:
                assert cohort.applied_version is not None
                return cohort.applied_version  # a retry whose first answer was lost
        faults.point("secagg.unmask")
        version = self._step(
            cohort,
            lambda: cohort.coordinator.receive_unmask(response),
            Phase.UNMASKING,
            expected=lambda: set(cohort.coordinator.uploaded),
            received=lambda: set(cohort.coordinator._responses),
            close=lambda: self._finish(cohort),
            result=lambda: cohort.applied_version,
        )
        assert version is not None
        return version

    # -- closing -------------------------------------------------------------------

    def _close_advertising(self, cohort: _Cohort) -> None:
        cohort.neighbour_keys = cohort.coordinator.close_advertising()
        cohort.deadline = self._clock() + self.config.phase_timeout_s
        self._log_phase(cohort, f"{len(cohort.neighbour_keys)} members advertised keys")

    def _close_sharing(self, cohort: _Cohort) -> None:
        cohort.shares_for = cohort.coordinator.close_sharing()
        cohort.deadline = self._clock() + self.config.upload_timeout_s  # members train now
        self._log_phase(cohort, f"{len(cohort.shares_for)} members shared keys; waiting for masked inputs")

    def _close_input(self, cohort: _Cohort) -> None:
        cohort.unmask_request = cohort.coordinator.close_input()
        cohort.deadline = self._clock() + self.config.phase_timeout_s
        self._log_phase(cohort, f"{len(cohort.unmask_request.survivors)} masked inputs in; unmasking")

    def _log_phase(self, cohort: _Cohort, what: str) -> None:
        logger.info(
            "cohort phase %s: %s", cohort.coordinator.phase.value, what,
            extra=log_context(job=self.job.job_id, cohort=cohort.coordinator.cohort_id),
        )  # fmt: skip

    def _finish(self, cohort: _Cohort) -> None:
        result = cohort.coordinator.finish()
        try:
            energy = sum(cohort.energy.get(member, 0.0) for member in result.survivors)
            cohort.applied_version = self.job.apply_cohort(
                result.weighted_sum, result.weight_sum, len(result.survivors), cohort.coordinator.cohort_id, energy
            )
        except ServerError as error:  # e.g. an aggregate that would overflow the model
            cohort.coordinator.abort(str(error))
            raise CohortAborted(f"cohort {cohort.coordinator.cohort_id!r} aborted: {error}") from error
        cohort.coordinator.complete()

    # -- machinery -----------------------------------------------------------------

    def _step(
        self,
        cohort: _Cohort,
        receive: Callable[[], None],
        phase: Phase,
        *,
        expected: Callable[[], set[int]],
        received: Callable[[], set[int]],
        close: Callable[[], None],
        result: Callable[[], T],
    ) -> T:
        with cohort.changed:
            self._raise_if_aborted(cohort)
            receive()
            while cohort.coordinator.phase is phase:
                if received() >= expected() or self._clock() >= cohort.deadline:
                    try:
                        close()
                    except CohortAborted:
                        self._note_abort(cohort)
                        cohort.changed.notify_all()
                        raise
                    except Exception as error:  # our bug or a library error: end the cohort, do not wedge it
                        cohort.coordinator.abort(f"internal error while closing {phase.value}: {error}")
                        self._note_abort(cohort)
                        cohort.changed.notify_all()
                        raise CohortAborted(f"cohort {cohort.coordinator.cohort_id!r} aborted: {cohort.coordinator.abort_reason}") from error
                    cohort.changed.notify_all()
                    break
                cohort.changed.wait(max(0.01, min(0.25, cohort.deadline - self._clock())))
            self._raise_if_aborted(cohort)
            return result()

    def _note_abort(self, cohort: _Cohort) -> None:
        reason = cohort.coordinator.abort_reason or "unknown"
        self.job.note_cohort_abort(reason)
        logger.info("cohort aborted: %s", reason, extra=log_context(job=self.job.job_id, cohort=cohort.coordinator.cohort_id))

    def _raise_if_aborted(self, cohort: _Cohort) -> None:
        if cohort.coordinator.phase is Phase.ABORTED:
            raise CohortAborted(f"cohort {cohort.coordinator.cohort_id!r} aborted: {cohort.coordinator.abort_reason}")

    def _cohort(self, cohort_id: str, member: int, token: bytes) -> _Cohort:
        with self._lock:
            cohort = self._cohorts.get(cohort_id)
        if cohort is None:
            # Finished long ago, never formed, or formed before the server
            # restarted (cohorts live in memory; their members start over).
            raise CohortAborted(f"no cohort {cohort_id!r} in job {self.job.job_id!r} (it ended, or the server restarted); join a new cohort")
        expected = cohort.tokens.get(member)
        if expected is None or not secrets.compare_digest(expected, token):
            raise ProtocolViolation(f"member {member} of cohort {cohort_id!r} did not present its token")
        return cohort

    def _prune(self) -> None:
        """Abort cohorts whose phase deadline passed long ago with nobody left
        to close it (every member vanished), and forget ended cohorts, so their
        masked inputs do not stay in memory. Runs whenever a client joins."""
        now = self._clock()
        grace = 2 * self.config.phase_timeout_s
        for cohort_id, cohort in list(self._cohorts.items()):
            with cohort.lock:
                ended = cohort.coordinator.phase in (Phase.COMPLETED, Phase.ABORTED)
                if not ended and cohort.deadline + grace < now:
                    cohort.coordinator.abort("every member vanished before the phase could close")
                    self._note_abort(cohort)
                    cohort.changed.notify_all()
                    ended = True
                if ended and cohort.deadline + grace < now:
                    del self._cohorts[cohort_id]

    def masked_dtype(self, cohort_id: str) -> np.dtype:
        """The word a cohort's masked inputs travel in (its ring's width); a
        cohort that is not there gets uint32, and its upload is refused later."""
        with self._lock:
            cohort = self._cohorts.get(cohort_id)
        return masked_dtype(cohort.coordinator.fixed_point.bits if cohort is not None else 32)

    def waiting_clients(self) -> int:
        """Clients waiting for a cohort to form."""
        with self._lock:
            return len(self._waiting)

    def progress(self) -> CohortsProgress:
        """What the cohorts in memory are doing (the dashboard): each one's
        phase, its members and how many answered the phase, its deadline."""
        now_mono, now_unix = self._clock(), time.time()
        with self._lock:
            waiting = len(self._waiting)
            cohorts = list(self._cohorts.items())
        rows = []
        for cohort_id, cohort in cohorts:
            with cohort.lock:  # taken after the manager's lock is let go: a busy cohort never stalls joins
                rows.append(self._progress_of(cohort_id, cohort, now_mono, now_unix))
        return CohortsProgress(waiting=waiting, cohort_size=self.config.cohort_size, cohorts=tuple(rows))

    @staticmethod
    def _progress_of(cohort_id: str, cohort: _Cohort, now_mono: float, now_unix: float) -> CohortProgress:
        """One cohort's row; call with its lock held."""
        coordinator = cohort.coordinator
        phase = coordinator.phase
        # (who the phase waits for, who answered it): the same sets `_step` closes the phase on
        waits_on: dict[Phase, tuple[Collection[int], Collection[int]]] = {
            Phase.ADVERTISE_KEYS: (coordinator.members, coordinator._adverts),
            Phase.SHARE_KEYS: (coordinator.advertised, coordinator._sealed),
            Phase.MASKED_INPUT: (coordinator.shared, coordinator._inputs),
            Phase.UNMASKING: (coordinator.uploaded, coordinator._responses),
        }
        expected, answered = waits_on.get(phase, ((), ()))
        ended = phase in (Phase.COMPLETED, Phase.ABORTED)
        return CohortProgress(
            cohort_id=cohort_id,
            phase=phase.value,
            members=len(coordinator.members),
            expected=len(expected),
            answered=len(answered),
            # the inputs are freed once summed (or on abort): count the closed phase's survivors then
            uploaded=len(coordinator._inputs) if phase is Phase.MASKED_INPUT else len(coordinator.uploaded),
            needed=coordinator.min_survivors,
            deadline_unix=None if ended else now_unix + (cohort.deadline - now_mono),
            applied_version=cohort.applied_version,
            abort_reason=coordinator.abort_reason,
        )

    def cohort_phases(self) -> dict[str, str]:
        with self._lock:
            return {cohort_id: c.coordinator.phase.value for cohort_id, c in self._cohorts.items()}


