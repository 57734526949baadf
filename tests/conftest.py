"""Shared fixtures: real servers on loopback port 0, small deterministic models."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from server import JobConfig, ServerConfig, TLSConfig
from server.app import RunningServer, running_server
from tributary._logging import QUIET_LIBRARIES


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands invoked in-process (click's CliRunner) configure logging (the
    root handler and level, TRIBUTARY_LOG_* for child processes): undo it, so
    no test sees another's logging setup."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    environ = {key: os.environ.get(key) for key in ("TRIBUTARY_LOG_FORMAT", "TRIBUTARY_LOG_LEVEL")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def small_model(seed: int = 0) -> dict[str, np.ndarray]:
    """Two float32 tensors in a fixed order, values from a seeded generator."""
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "layer.bias": rng.standard_normal(4).astype(np.float32),
    }


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """serve(*job_configs, models={job_id: tensors}, tls=None, **server_settings) -> RunningServer on 127.0.0.1:0.

    Jobs default to one fedbuff job named "default" serving `small_model()`;
    server_settings are further ServerConfig fields (max_workers, limits).
    Without `tls` the server talks plaintext (insecure=True): clients of it
    pass insecure=True too. Servers are stopped when the test ends.
    """
    stack = contextlib.ExitStack()

    def start(
        *jobs: JobConfig,
        models: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        tls: TLSConfig | None = None,
        **server_settings: Any,
    ) -> RunningServer:
        jobs = jobs or (JobConfig(),)
        config = ServerConfig(address="127.0.0.1:0", jobs=tuple(jobs), tls=tls, insecure=tls is None, **server_settings)
        models = models or {job.job_id: small_model() for job in jobs}
        return stack.enter_context(running_server(config, models, grace_s=0.5))

    with stack:
        yield start
