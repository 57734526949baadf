"""Tributary's client SDK: what an app embeds to join a federation.

High level (PyTorch)::

    from client_sdk import Client, ClientTLS

    tls = ClientTLS(ca_file="ca.pem", cert_file="me.pem", key_file="me.key")
    with Client("server.example:50051", job="default", tls=tls) as client:
        summary = client.fit(model, train_one_round, updates=20)

Low level (numpy or torch tensors, for apps with their own loop)::

    model = client.pull()                       # PulledModel(version, tensors)
    client.push(model.version, delta, num_samples=n)
    client.push(model.version, delta, num_samples=n, compression=Compression(quantize_bits=8))
    client.heartbeat("training")                # presence; fit() sends these itself
    client.report_evaluation(model.version, {"accuracy": 0.9}, num_examples=200)  # federated evaluation
    client.acquire_training_slot(DeviceState(...))  # jobs with training slots

Devices: `fit(..., device_state=read_state, policy=EligibilityPolicy(require_charging=True))`
trains only while the policy allows, and asks the server for a training slot
where the job has them.

One update through a secure-aggregation cohort, for apps with their own loop::

    cohort = SecureRound(client); cohort.start()      # joins a cohort while the app trains
    cohort.submit(model.version, flat_delta, n, energy_joules=e)   # CohortReceipt

Operators administer a server run with --auth through `AdminClient`
(enrol and revoke clients, status).

Everything not listed in `__all__` is private and may change.
"""

from client_sdk._admin import AdminClient, EnrolledClient, Enrolment, JobStatus
from client_sdk._compression import Compression
from client_sdk._client import Client, ClientState, EvaluationReceipt, HeartbeatReply, JobDescription, PulledModel, PushResult, RetryPolicy, VersionRecord
from client_sdk._device import DeviceState, Eligibility, EligibilityPolicy, Eligible, Ineligible, SlotGrant
from client_sdk._errors import (
    CohortAborted,
    JobNotFound,
    LimitExceeded,
    ModelMismatch,
    NotAcceptedNow,
    NotAuthenticated,
    PermissionDenied,
    ProtocolError,
    ServerUnavailable,
    TLSError,
    TributaryError,
    UpdateRejected,
)
from client_sdk._secure import CohortReceipt, SecureRound
from client_sdk._tls import ClientTLS
from client_sdk._training import EnergyEstimate, EvaluateFn, FitProgress, FitSummary, TrainFn, TrainResult, fit, load_into, model_arrays, pick_device

__all__ = [
    "AdminClient",
    "Client",
    "ClientState",
    "ClientTLS",
    "CohortAborted",
    "CohortReceipt",
    "Compression",
    "DeviceState",
    "Eligibility",
    "EligibilityPolicy",
    "Eligible",
    "EnergyEstimate",
    "EvaluationReceipt",
    "EvaluateFn",
    "EnrolledClient",
    "Enrolment",
    "FitProgress",
    "FitSummary",
    "HeartbeatReply",
    "Ineligible",
    "JobDescription",
    "JobNotFound",
    "JobStatus",
    "LimitExceeded",
    "ModelMismatch",
    "NotAcceptedNow",
    "NotAuthenticated",
    "PermissionDenied",
    "ProtocolError",
    "PulledModel",
    "PushResult",
    "RetryPolicy",
    "SecureRound",
    "ServerUnavailable",
    "SlotGrant",
    "TLSError",
    "TrainFn",
    "TrainResult",
    "TributaryError",
    "UpdateRejected",
    "VersionRecord",
    "fit",
    "load_into",
    "model_arrays",
    "pick_device",
]
