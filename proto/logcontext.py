"""The context every log event carries: which job, client, model version and
secure-aggregation cohort it is about.

Library code (server, client SDK, edge) passes it as `extra=log_context(...)`;
the keys are always the same four, None where they do not apply, so a JSON log
line has them on every event. `ContextFilter` fills them in with None on
records that came without (third-party loggers, a call that gave no extra);
the CLI's logging setup (tributary/_logging.py) attaches it to its handler.
Library code never configures handlers.
"""

from __future__ import annotations

import logging

CONTEXT_KEYS = ("job", "client", "version", "cohort")


def log_context(
    *, job: str | None = None, client: str | None = None, version: int | None = None, cohort: str | None = None
) -> dict[str, object]:
    """The `extra` of a logging call: every context key, None where unknown."""
    return {"job": job, "client": client, "version": version, "cohort": cohort}


class ContextFilter(logging.Filter):
    """Gives every record the context keys (None where the call gave none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in CONTEXT_KEYS:
            if not hasattr(record, key):
                setattr(record, key, None)
        return True
