"""Metadata keys both sides agree on."""

RETRY_PUSHBACK_MS = "grpc-retry-pushback-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED refusal that may succeed later (a
rate limit, or all stream slots taken): milliseconds to wait before retrying.
gRPC's own retry policy reads the same key (gRFC A6, "server pushback"). A
refusal without it (an update over max_update_bytes) cannot succeed on retry."""
