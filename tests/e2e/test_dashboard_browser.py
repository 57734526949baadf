"""The live dashboard in a real headless browser: Debian's chromium driven by
Selenium through /usr/bin/chromedriver (never selenium-manager, which would
download one). A real server with auth on, real SDK clients pushing from a
thread; the page asks for the admin token, then shows the current version and
follows it as the federation advances. A screenshot is kept outside the repo
(TRIBUTARY_ARTIFACTS_DIR, default /tmp/tributary-artifacts/dashboard.png).

Without chromium the tests skip, unless TRIBUTARY_REQUIRE_BROWSER=1 (the
Makefile's test target, hence CI): then they fail."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client_sdk import AdminClient, Client, DeviceState, TributaryError
from server import JobConfig, ServerConfig, StrategyConfig
from server.app import RunningServer, running_server
from tests.conftest import small_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN_TOKEN = "trb_admin_" + "d" * 40
WAIT_S = 60.0


def _require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; `make test` does it)"
    if os.environ.get("TRIBUTARY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TRIBUTARY_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tributary-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1300", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[RunningServer]:
    """A server with auth on and three enrolled clients pushing (buffer of 1:
    every push publishes a version) until the test ends."""
    token_file = tmp_path / "admin.secret"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    config = ServerConfig(
        address="127.0.0.1:0", jobs=(JobConfig(strategy=StrategyConfig(name="fedbuff", buffer_size=1)),),
        state_dir=tmp_path / "state", auth=True, admin_token_file=token_file, insecure=True, http_address="127.0.0.1:0",
    )  # fmt: skip
    stop = threading.Event()
    errors: list[BaseException] = []
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        with AdminClient(running.address, ADMIN_TOKEN, insecure=True) as admin:
            tokens = {f"phone-{i}": admin.enrol(f"phone-{i}", ["default"]).token for i in range(3)}

        def push_until_stopped() -> None:
            delta = {name: np.full(t.shape, 0.001, dtype=t.dtype) for name, t in small_model().items()}
            clients = [Client(running.address, client_id=cid, token=token, insecure=True) for cid, token in tokens.items()]
            try:
                while not stop.is_set():
                    for i, client in enumerate(clients):
                        device = DeviceState(battery_level=0.3 + 0.2 * i, charging=i == 0, idle=True, unmetered=i != 2, profile=f"phone-{i}")
                        version = client.pull().version
                        client.heartbeat("training", base_version=version, device=device)
                        client.push(version, delta)
                        client.heartbeat("idle", device=device)
                        if stop.wait(0.15):
                            break
            except (TributaryError, ValueError) as error:  # pragma: no cover - reported by the test
                if not stop.is_set():
                    errors.append(error)
            finally:
                for client in clients:
                    client.close()

        pusher = threading.Thread(target=push_until_stopped, name="test-pushers")
        pusher.start()
        try:
            yield running
        finally:
            stop.set()
            pusher.join(timeout=30)
    assert not errors, errors


def _artifacts_dir() -> Path:
    path = Path(os.environ.get("TRIBUTARY_ARTIFACTS_DIR", "/tmp/tributary-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _table(browser: Any, body_id: str) -> list[list[str]]:
    """The cells of a table body, read in one script call: the page redraws
    its tables every poll, and rows fetched one by one could go stale midway."""
    rows: list[list[str]] = browser.execute_script(
        "return [...document.getElementById(arguments[0]).rows].map((r) => [...r.cells].map((c) => c.textContent))", body_id
    )
    return rows


def _shown_version(browser: Any) -> int | None:
    text = browser.find_element("id", "model-version").text.strip()
    return int(text) if text.isdigit() else None


def test_the_dashboard_logs_in_and_follows_the_version_as_it_advances(browser: Any, federation: RunningServer) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
    browser.get(f"http://{federation.http_address}/")
    wait.until(lambda b: b.find_element("id", "login-form").is_displayed())
    assert not browser.find_element("id", "dashboard").is_displayed()
    browser.find_element("id", "token").send_keys("not-the-token-" + "x" * 30)
    browser.find_element("css selector", "#login-form button").click()
    wait.until(lambda b: "not accepted" in b.find_element("id", "login-error").text)

    browser.find_element("id", "token").send_keys(ADMIN_TOKEN)
    browser.find_element("css selector", "#login-form button").click()
    wait.until(lambda b: b.find_element("id", "dashboard").is_displayed() and _shown_version(b) is not None)
    first = _shown_version(browser)
    assert first is not None and first <= federation.core.job("default").snapshot().version
    wait.until(lambda b: (_shown_version(b) or 0) >= first + 3)
    assert (_shown_version(browser) or 0) <= federation.core.job("default").snapshot().version
    # the rest of the page is filled in from the same snapshots
    wait.until(lambda b: len(b.find_elements("css selector", "#roster tr")) == 3)
    roster = browser.find_element("id", "roster").text
    assert "phone-0" in roster and "phone-2" in roster and "%" in roster
    assert browser.find_elements("css selector", "#chart-version path.line")
    assert browser.find_elements("css selector", "#chart-staleness rect.bar")
    screenshot = _artifacts_dir() / "dashboard.png"
    assert browser.save_screenshot(str(screenshot)), f"could not write {screenshot}"
    assert screenshot.stat().st_size > 10_000


def test_without_the_token_the_page_asks_for_it_and_the_data_routes_refuse(browser: Any, federation: RunningServer) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"http://{federation.http_address}"
    for path in ("/api/jobs", "/api/jobs/default", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(base + path, timeout=10)
        with caught.value as error:
            assert error.code == 401 and json.loads(error.read())["error"].startswith("the admin token is required")
    browser.get(base + "/")  # the tab may hold the token of the other test: forget it
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element("id", "login-form").is_displayed())
    assert not browser.find_element("id", "dashboard").is_displayed()
    assert browser.find_element("id", "model-version").text in ("", "–")


def test_the_page_shows_a_rejection_and_a_secure_cohort_in_its_phase(browser: Any, tmp_path: Path) -> None:
    """Two jobs on a server without auth: a stale push to "default" shows in
    the rejections table with its client and reason; in "secure", three SDK
    members (client_sdk's SecureRound) set up a cohort's keys, and the cohort
    panel shows it waiting for their masked inputs."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from client_sdk._secure import SecureRound
    from server.config import SecAggConfig

    secure_model = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}
    secagg = SecAggConfig(cohort_size=3, forming_timeout_s=600.0, phase_timeout_s=300.0, upload_timeout_s=300.0, clip_bound=64.0)
    config = ServerConfig(
        address="127.0.0.1:0", state_dir=tmp_path / "state", insecure=True, http_address="127.0.0.1:0",
        jobs=(
            JobConfig(job_id="default", strategy=StrategyConfig(name="fedbuff", buffer_size=1), max_staleness=0),
            JobConfig(job_id="secure", secure_aggregation=secagg),
        ),
    )  # fmt: skip
    with running_server(config, {"default": small_model(), "secure": secure_model}, grace_s=0.5) as running:
        delta = {name: np.full(t.shape, 0.001, dtype=t.dtype) for name, t in small_model().items()}
        with Client(running.address, job="default", client_id="late-phone", insecure=True) as client:
            client.push(client.pull().version, delta)
            with pytest.raises(TributaryError, match="stale"):
                client.push(0, delta)  # one version behind, above max_staleness=0
        members = [Client(running.address, job="secure", client_id=f"member-{i}", insecure=True) for i in range(3)]
        try:
            rounds = [SecureRound(member) for member in members]
            for secure_round in rounds:
                secure_round.start()
            for secure_round in rounds:
                assert secure_round._setup is not None
                secure_round._setup.join(WAIT_S)
                assert secure_round._setup_error is None, secure_round._setup_error

            wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
            browser.get(f"http://{running.http_address}/#default")
            wait.until(lambda b: "late-phone" in b.find_element("id", "rejections").text)
            (cells,) = _table(browser, "rejections")
            assert cells[1] == "late-phone" and cells[2].startswith("StaleUpdate: ") and "stale" in cells[2], cells
            assert "StaleUpdate: 1" in browser.find_element("id", "rejection-counts").text
            assert not browser.find_element("id", "cohorts-section").is_displayed()

            Select(browser.find_element("id", "job-select")).select_by_value("secure")
            wait.until(lambda b: b.find_element("id", "cohorts-section").is_displayed() and b.find_elements("css selector", "#cohorts tr"))
            (cells,) = _table(browser, "cohorts")
            assert cells[1] == "masked input" and cells[2] == "0 / 3" and cells[5] == "3", cells
            assert browser.find_element("id", "cohort-waiting").text == "0 waiting to form a cohort of 3"
            assert browser.find_element("id", "rejections").text == ""  # the secure job refused nothing
            screenshot = _artifacts_dir() / "dashboard-cohort.png"
            assert browser.save_screenshot(str(screenshot)), f"could not write {screenshot}"
        finally:
            for member in members:
                member.close()
