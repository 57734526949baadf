"""Tributary's client SDK: what an app embeds to join a federation.

High level (PyTorch)::

    from client_sdk import Client

    with Client("127.0.0.1:50051", job="default") as client:
        summary = client.fit(model, train_one_round, updates=20)

Low level (numpy or torch tensors, for apps with their own loop)::

    model = client.pull()                       # PulledModel(version, tensors)
    client.push(model.version, delta, num_samples=n)
    client.heartbeat("training")                # presence; fit() sends these itself

Everything not listed in `__all__` is private and may change.
"""

from client_sdk._client import Client, ClientState, HeartbeatReply, JobDescription, PulledModel, PushResult, RetryPolicy
from client_sdk._errors import (
    CohortAborted,
    JobNotFound,
    LimitExceeded,
    ModelMismatch,
    NotAcceptedNow,
    ProtocolError,
    ServerUnavailable,
    TributaryError,
    UpdateRejected,
)
from client_sdk._training import FitSummary, TrainFn, fit, load_into, model_arrays, pick_device

__all__ = [
    "Client",
    "ClientState",
    "CohortAborted",
    "FitSummary",
    "HeartbeatReply",
    "JobDescription",
    "JobNotFound",
    "LimitExceeded",
    "ModelMismatch",
    "NotAcceptedNow",
    "ProtocolError",
    "PulledModel",
    "PushResult",
    "RetryPolicy",
    "ServerUnavailable",
    "TrainFn",
    "TributaryError",
    "UpdateRejected",
    "fit",
    "load_into",
    "model_arrays",
    "pick_device",
]
