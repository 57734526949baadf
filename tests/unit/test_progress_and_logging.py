"""The CLI's progress bars (rich) and log formatting, without a server."""

from __future__ import annotations

import io
import json
import logging

from rich.console import Console

from client_sdk import FitProgress
from proto.logcontext import log_context
from tributary._logging import configure
from tributary._progress import FitBar, SimulationBar


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=140), out


def test_the_simulation_bar_shows_emulated_time_version_accuracy_and_eta() -> None:
    console, out = _terminal()
    with SimulationBar(console, duration_s=300.0, time_scale=0.01) as bar:
        bar.point(0.0, 0, 0.1)
        bar.point(150.0, 7, 0.625)
    text = out.getvalue()
    assert "150/300 emulated s" in text
    assert "version 7" in text and "accuracy 62.5%" in text
    assert "ETA" in text


def test_the_fit_bar_shows_updates_version_loss_and_eta() -> None:
    console, out = _terminal()
    bar = FitBar(console, updates=4, duration_s=None)
    with bar.shown():
        bar(FitProgress(0, 0, 4, 0.0, None, 3, "starting"))
        bar(FitProgress(2, 1, 4, 5.0, None, 9, "idle", {"loss": 0.3125}))
    text = out.getvalue()
    assert "2/4 updates" in text and "version 9" in text and "loss 0.3125" in text and "ETA" in text


def test_bars_are_silent_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out)  # a StringIO is no terminal
    with SimulationBar(console, duration_s=10.0, time_scale=0.01) as bar:
        bar.point(5.0, 2, 0.5)
    fit_bar = FitBar(console, updates=None, duration_s=10.0)
    with fit_bar.shown():
        fit_bar(FitProgress(1, 0, None, 5.0, 10.0, 2, "idle"))
    assert out.getvalue() == ""


def test_fit_progress_fraction_is_the_nearer_stop() -> None:
    assert FitProgress(1, 0, 4, 9.0, 10.0, 0, "idle").fraction == 0.9
    assert FitProgress(3, 0, 4, 1.0, None, 0, "idle").fraction == 0.75
    assert FitProgress(0, 0, None, 0.0, None, 0, "idle").fraction is None


def test_json_lines_have_every_context_key(capsys) -> None:  # type: ignore[no-untyped-def]
    configure("json", "debug")
    logging.getLogger("tributary.server").info("published version %d", 4, extra=log_context(job="a", version=4))
    logging.getLogger("somebody.else").warning("no context here")
    lines = capsys.readouterr().err.splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "published version 4" and first["level"] == "INFO" and first["logger"] == "tributary.server"
    assert (first["job"], first["client"], first["version"], first["cohort"]) == ("a", None, 4, None)
    assert first["timestamp"].startswith("20")
    assert {key: second[key] for key in ("job", "client", "version", "cohort")} == dict.fromkeys(("job", "client", "version", "cohort"))


def test_text_lines_end_with_the_context_that_is_set(capsys) -> None:  # type: ignore[no-untyped-def]
    configure("text", "info")
    logging.getLogger("tributary.client").info("joined", extra=log_context(job="j", client="c1", cohort="j-1-ab"))
    logging.getLogger("tributary.client").debug("not shown at info")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("INFO    tributary.client: joined [job=j client=c1 cohort=j-1-ab]")
