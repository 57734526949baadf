"""Logging for the `tributary` commands: human-readable lines or JSON lines on
stderr, each with the context of the event (job, client, version, cohort; see
proto/logcontext.py). Only the CLI configures logging; the packages only log.

The handler writes to whatever `sys.stderr` is when a record is emitted, not
the stream it was built with: while a rich progress bar is live it redirects
stderr, and log lines then print above the bar instead of through it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from proto.logcontext import CONTEXT_KEYS, ContextFilter

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
FORMAT_ENV = "TRIBUTARY_LOG_FORMAT"
LEVEL_ENV = "TRIBUTARY_LOG_LEVEL"
_HANDLER_NAME = "tributary-cli"
QUIET_LIBRARIES = ("grpc", "urllib3", "PIL", "matplotlib", "asyncio")
"""Kept at warnings: their debug chatter (matplotlib's font search...) is not ours."""


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler on the current sys.stderr (looked up per record)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass  # always the current sys.stderr


class TextFormatter(logging.Formatter):
    """`2025-01-02 10:11:12 INFO tributary.server: message [job=a version=3]`:
    the context fields that are set, at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{key}={value}" for key in CONTEXT_KEYS if (value := getattr(record, key, None)) is not None)
        if not context:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the context
        return f"{head} [{context}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: timestamp, level, logger, message, the context keys."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        ["levelname", "name", "message", *CONTEXT_KEYS],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
    )


def configure(log_format: str, level: str) -> None:
    """Send every log record to stderr in `log_format` from `level` up, and pass
    both on (environment) to the processes this command starts (the demo's
    clients, the simulator's workers). Configuring again replaces the handler."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    handler = _CurrentStderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    os.environ[FORMAT_ENV] = log_format
    os.environ[LEVEL_ENV] = level.lower()
