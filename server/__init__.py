"""The aggregation service.

Layers, outermost first (imports point inward only):
  app        builds a gRPC server from a ServerConfig and runs it (TLS, mTLS or
             plaintext when asked for)
  certs      makes a CA and certificates; reads and checks the server's PEM files
  servicer   thin gRPC layer: messages in, core calls, status codes out
             (admin: the Admin service; interceptors: token checks)
  auth       enrolled clients, tokens, admin credential, checks (no grpc)
             (limits_interceptor applies the stream limits around it)
  limits     concurrent streams, per-client rates, stream deadlines (no grpc)
  core       jobs, immutable model snapshots, idempotency, admission (no grpc)
  strategies fedasync / fedbuff / fedavg math on numpy arrays (no grpc)
  staleness  the staleness functions s(tau)
"""

from server.config import JobConfig, ServerConfig, StalenessConfig, StrategyConfig, TLSConfig
from server.core import AggregationCore, Job, ModelSnapshot, PushOutcome, Update, UpdateHeader
from server.errors import (
    ConfigError,
    InvalidUpdate,
    JobNotFound,
    LimitExceeded,
    PreconditionFailed,
    ServerError,
)

__all__ = [
    "AggregationCore",
    "ConfigError",
    "InvalidUpdate",
    "Job",
    "JobConfig",
    "JobNotFound",
    "LimitExceeded",
    "ModelSnapshot",
    "PreconditionFailed",
    "PushOutcome",
    "ServerConfig",
    "ServerError",
    "StalenessConfig",
    "StrategyConfig",
    "TLSConfig",
    "Update",
    "UpdateHeader",
]
