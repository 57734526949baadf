"""The HTTP endpoint (server/http.py) over real sockets: the dashboard's page,
assets and JSON API, /metrics, auth with the admin token, HTTPS with the gRPC
TLS files, and the errors: unknown paths, wrong methods, bad addresses."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client_sdk import AdminClient, Client, DeviceState, TributaryError
from client_sdk._secure import SecureRound
from server import ConfigError, JobConfig, ServerConfig, StrategyConfig, TLSConfig
from server.app import RunningServer, running_server
from server.certs import Layout, write_layout
from server.config import SecAggConfig
from server.dashboard import job_snapshot, overview
from server.http import HttpEndpoint
from tests.conftest import small_model

ADMIN_TOKEN = "trb_admin_" + "w" * 40
FEDBUFF_1 = StrategyConfig(name="fedbuff", buffer_size=1)


def delta(scale: float = 0.01) -> dict[str, np.ndarray]:
    return {name: np.full(t.shape, scale, dtype=t.dtype) for name, t in small_model().items()}


def get(url: str, *, token: str | None = None, method: str = "GET", context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:  # an unclosed one warns when collected (and warnings fail tests)
            return error.code, dict(error.headers), error.read()


def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    status, headers, body = get(url, **kwargs)
    assert headers["Content-Type"] == "application/json", (status, body)
    return status, json.loads(body)


def base(running: RunningServer, scheme: str = "http") -> str:
    assert running.http_address is not None
    return f"{scheme}://{running.http_address}"


def test_routes_serve_the_page_assets_api_and_metrics(serve: Callable[..., RunningServer]) -> None:
    running = serve(JobConfig(job_id="digits", strategy=FEDBUFF_1, max_staleness=0), JobConfig(job_id="other"), http_address="127.0.0.1:0")
    assert running.http_port and running.http_address == f"127.0.0.1:{running.http_port}"
    with Client(running.address, job="digits", client_id="phone-1", insecure=True) as client:
        client.heartbeat("training", base_version=0, device=DeviceState(battery_level=0.42, charging=True, idle=True, unmetered=False, profile="pixel"))
        for _ in range(3):
            client.push(client.pull().version, delta())
        with pytest.raises(TributaryError):
            client.push(0, delta())  # 3 versions stale, above max_staleness=0
    url = base(running)

    status, headers, page = get(url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="model-version"' in page and b"/static/dashboard.js" in page
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, body = get(f"{url}/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 500
    status, headers, body = get(url + "/static/dashboard.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 500

    status, jobs = get_json(url + "/api/jobs")
    assert status == 200 and [(j["job_id"], j["version"]) for j in jobs["jobs"]] == [("digits", 3), ("other", 0)]

    status, job = get_json(url + "/api/jobs/digits")
    assert status == 200
    assert job["version"] == 3 and [v for v, _ in job["versions"]] == [0, 1, 2, 3]
    assert job["staleness"] == [[0, 3]]
    assert job["counters"]["updates_accepted"] == 3 and job["counters"]["rejected"] == 1
    assert job["update_rate"]["per_second"]["10"] == pytest.approx(3 / 10)
    assert job["evaluations"] == [] and job["cohorts"] is None and job["slots"] is None
    (client_row,) = job["roster"]["clients"]
    assert client_row["client_id"] == "phone-1" and client_row["state"] == "training" and client_row["updates_accepted"] == 3
    assert client_row["device"] == {"profile": "pixel", "battery_level": 0.42, "charging": True, "idle": True, "unmetered": False}
    (rejection,) = job["rejections"]["recent"]
    assert rejection["client_id"] == "phone-1" and rejection["reason"].startswith("StaleUpdate: ") and "stale" in rejection["reason"]
    assert job["rejections"]["by_reason"] == {"StaleUpdate": 1}

    status, headers, body = get(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    status, health = get_json(url + "/healthz")
    assert status == 200 and health == {"status": "ok"}


def test_unknown_paths_and_jobs_are_404_and_other_methods_405(serve: Callable[..., RunningServer]) -> None:
    running = serve(http_address="127.0.0.1:0")
    url = base(running)
    status, error = get_json(url + "/api/jobs/nope")
    assert status == 404 and "no job 'nope'" in error["error"] and "default" in error["error"]
    for path in ("/nope", "/static/../server/auth.py", "/static/secret.txt", "/api/jobs/a/b", "/api"):
        status, error = get_json(url + path)
        assert status == 404 and "no such path" in error["error"], path
    for method in ("POST", "PUT", "DELETE"):
        status, headers, body = get(url + "/api/jobs", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD" and f"{method} is not supported" in json.loads(body)["error"]
    status, _, _ = get(url + "/nope", method="POST")
    assert status == 404
    # the server still serves
    assert get_json(url + "/api/jobs")[0] == 200


@pytest.fixture
def auth_running(tmp_path: Path) -> Any:
    token_file = tmp_path / "admin.secret"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    config = ServerConfig(
        address="127.0.0.1:0", state_dir=tmp_path / "state", auth=True, admin_token_file=token_file, insecure=True, http_address="127.0.0.1:0"
    )
    with running_server(config, {"default": small_model()}, grace_s=0.5) as running:
        yield running


def test_with_auth_every_data_route_needs_the_admin_token(auth_running: RunningServer) -> None:
    url = base(auth_running)
    with AdminClient(auth_running.address, ADMIN_TOKEN, insecure=True) as admin:
        client_token = admin.enrol("c1", ["default"]).token
    for path in ("/api/jobs", "/api/jobs/default", "/api/jobs/unknown-job", "/metrics"):
        for token in (None, "wrong-" + "x" * 40, client_token, ADMIN_TOKEN + "x"):
            status, headers, body = get(url + path, token=token)
            assert status == 401, (path, token)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert json.loads(body)["error"].startswith("the admin token is required")
            assert b"default" not in body and b"version" not in body
    request = urllib.request.Request(url + "/api/jobs", headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    with caught.value:
        assert caught.value.code == 401
    # the page itself loads: it asks for the token in a form
    status, _, page = get(url + "/")
    assert status == 200 and b'id="login-form"' in page
    status, jobs = get_json(url + "/api/jobs", token=ADMIN_TOKEN)
    assert status == 200 and jobs["jobs"] == [{"job_id": "default", "version": 0, "strategy": "fedbuff"}]
    assert get_json(url + "/api/jobs/unknown-job", token=ADMIN_TOKEN)[0] == 404
    assert get(url + "/metrics", token=ADMIN_TOKEN)[0] == 200


def test_https_with_the_grpc_tls_files(serve: Callable[..., RunningServer], tmp_path: Path) -> None:
    layout = Layout(tmp_path / "certs")
    write_layout(layout.root)
    running = serve(tls=TLSConfig(layout.server_cert, layout.server_key), http_address="127.0.0.1:0")
    context = ssl.create_default_context(cafile=str(layout.ca_cert))
    status, job = get_json(base(running, "https") + "/api/jobs/default", context=context)
    assert status == 200 and job["version"] == 0
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext is not answered
        get(base(running) + "/api/jobs")


@pytest.mark.parametrize("address", ["nope", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:http", ":80", 8080])
def test_a_bad_http_address_is_a_config_error_naming_it(address: object) -> None:
    with pytest.raises(ConfigError, match="http_address"):
        ServerConfig(insecure=True, http_address=address)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="http_address"):
        ServerConfig.from_mapping({"insecure": True, "http_address": address})


def test_an_http_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(address="127.0.0.1:0", insecure=True, state_dir=tmp_path / "state", http_address=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=f"cannot listen on http_address 127.0.0.1:{port}"):
            with running_server(config, {"default": small_model()}):
                pytest.fail("the server started with its HTTP port taken")
    # nothing was left half-open: the state directory opens again at once
    config = ServerConfig(address="127.0.0.1:0", insecure=True, state_dir=tmp_path / "state", http_address="127.0.0.1:0")
    with running_server(config, {"default": small_model()}, grace_s=0.1) as running:
        assert get_json(base(running) + "/healthz")[0] == 200


def test_without_http_address_there_is_no_endpoint(serve: Callable[..., RunningServer]) -> None:
    running = serve()
    assert running.http is None and running.http_port is None and running.http_address is None


SECURE_MODEL = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}


def poll_job(url: str, until: Callable[[Any], bool], *, what: str, wait_s: float = 60.0) -> Any:
    """GET the job snapshot until `until(snapshot)` holds (no timing asserted:
    the wait is only a bound on a hang)."""
    for _ in range(int(wait_s / 0.05)):
        status, job = get_json(url)
        assert status == 200, job
        if until(job):
            return job
        time.sleep(0.05)
    pytest.fail(f"the snapshot never showed {what}; last: {job['cohorts']}")


def test_a_secure_cohort_shows_its_phase_and_members_then_counts_as_applied(serve: Callable[..., RunningServer]) -> None:
    """Real SDK members (client_sdk's SecureRound): two wait for a cohort of
    three (the forming timeout is far off), the third forms it; after key
    setup it sits in masked_input while two of three uploaded; the last upload
    completes it and the snapshot shows the version it went into."""
    secagg = SecAggConfig(cohort_size=3, forming_timeout_s=600.0, phase_timeout_s=300.0, upload_timeout_s=300.0, clip_bound=64.0)
    running = serve(JobConfig(secure_aggregation=secagg), models={"default": SECURE_MODEL}, http_address="127.0.0.1:0")
    url = base(running) + "/api/jobs/default"
    clients = [Client(running.address, insecure=True, client_id=f"m{i}") for i in range(3)]
    rounds = [SecureRound(client) for client in clients]
    receipts: dict[int, Any] = {}
    uploads: list[threading.Thread] = []

    def submit(index: int) -> None:
        try:
            receipts[index] = rounds[index].submit(0, np.full(8, 0.1 * (index + 1), np.float32), 10)
        except Exception as error:  # kept for the test to report
            receipts[index] = error

    try:
        job = get_json(url)[1]
        assert job["secure_aggregation"] is True
        assert job["cohorts"] == {"waiting": 0, "cohort_size": 3, "aborted_by_reason": {}, "live": []}
        rounds[0].start()
        rounds[1].start()
        job = poll_job(url, lambda j: j["cohorts"]["waiting"] == 2, what="two clients waiting")
        assert job["cohorts"]["live"] == []

        rounds[2].start()  # the third arrival forms the cohort
        for secure_round in rounds:
            assert secure_round._setup is not None
            secure_round._setup.join(60)
            assert not secure_round._setup.is_alive() and secure_round._setup_error is None, secure_round._setup_error
        job = poll_job(url, lambda j: [c["phase"] for c in j["cohorts"]["live"]] == ["masked_input"], what="the cohort in masked_input")  # snapshots are cached up to 1 s
        (cohort,) = job["cohorts"]["live"]
        assert job["cohorts"]["waiting"] == 0 and job["version"] == 0
        assert cohort["phase"] == "masked_input"  # keys advertised and shared by all three: members train now
        assert (cohort["members"], cohort["expected"], cohort["answered"], cohort["uploaded"]) == (3, 3, 0, 0)
        assert cohort["needed"] == secagg.survivors_needed_for(3)
        assert cohort["deadline"] > job["server_time"] and cohort["applied_version"] is None and cohort["abort_reason"] is None

        uploads = [threading.Thread(target=submit, args=(i,)) for i in (0, 1)]
        for thread in uploads:
            thread.start()
        job = poll_job(url, lambda j: j["cohorts"]["live"][0]["uploaded"] == 2, what="two masked inputs")
        (cohort,) = job["cohorts"]["live"]
        assert (cohort["phase"], cohort["expected"], cohort["answered"]) == ("masked_input", 3, 2)
        assert job["version"] == 0 and job["counters"]["cohorts_applied"] == 0

        submit(2)
        for thread in uploads:
            thread.join(60)
        assert all(not isinstance(receipts[i], Exception) and receipts[i].version == 1 for i in range(3)), receipts
        job = poll_job(url, lambda j: j["version"] == 1, what="version 1")
        (cohort,) = job["cohorts"]["live"]  # an ended cohort stays listed until it is pruned
        assert job["version"] == 1 and [v for v, _ in job["versions"]] == [0, 1]
        assert job["counters"]["cohorts_applied"] == 1 and job["counters"]["cohorts_aborted"] == 0
        assert job["counters"]["updates_accepted"] == 3
        assert cohort["phase"] == "completed" and cohort["applied_version"] == 1
        # the masked inputs were freed once summed: the count survives, nothing is awaited
        assert (cohort["uploaded"], cohort["expected"], cohort["deadline"]) == (3, 0, None)
        assert job["cohorts"]["aborted_by_reason"] == {}
    finally:
        for thread in uploads:
            thread.join(60)
        for client in clients:
            client.close()


# -- bad input: the endpoint answers every odd request in JSON and keeps serving ---------


def raw(address: str, data: bytes, *, timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as is on a fresh connection; (status, headers, body) of the
    answer, read until the server closes (it closes after an HTTP/1.0 request)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def endpoint_for(running: RunningServer, **settings: Any) -> HttpEndpoint:
    """A second endpoint over the running server's real views, with `settings`
    (timeouts, limits, views) a test needs; closed by the caller."""
    views: dict[str, Any] = {
        "metrics": running.metrics.exposition,
        "jobs": lambda: overview(running.core),
        "job": lambda job_id: job_snapshot(running.core.job(job_id)),
        "admin": None,
    }
    views.update(settings)
    endpoint = HttpEndpoint("127.0.0.1:0", **views)
    endpoint.start()
    return endpoint


def test_odd_requests_get_json_errors_and_the_endpoint_keeps_serving(serve: Callable[..., RunningServer]) -> None:
    running = serve(http_address="127.0.0.1:0")
    address = running.http_address
    assert address is not None
    url = base(running)

    def expect_error(request: bytes, status: int, fragment: str) -> None:
        code, headers, body = raw(address, request)
        assert (code, headers["Content-Type"]) == (status, "application/json"), (request[:80], code, body[:200])
        error = json.loads(body)
        assert error["status"] == status and fragment in error["error"], error
        assert len(body) < 1000, "the message echoes at most a bounded part of the request"

    expect_error(b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", 414, "Request-URI Too Long")
    expect_error(b"GET /" + b"a" * 10_000 + b" HTTP/1.0\r\n\r\n", 404, "(10001 characters)")
    expect_error(b"GET / HTTP/1.0\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431, "Line too long")
    expect_error(b"GET / HTTX/1.0\r\n\r\n", 400, "Bad request version")
    expect_error(b"BREW /api/jobs HTTP/1.0\r\n\r\n", 501, "Unsupported method ('BREW')")
    # bytes that are not UTF-8, raw or percent-encoded: an unknown job, not a crash
    expect_error(b"GET /api/jobs/\xff\xfe HTTP/1.0\r\n\r\n", 404, "no job")
    expect_error(b"GET /api/jobs/%ff%fe HTTP/1.0\r\n\r\n", 404, "no job '\ufffd\ufffd'")
    expect_error(b"GET /%ff HTTP/1.0\r\n\r\n", 404, "no such path '/\ufffd'")
    # query strings are ignored
    assert get_json(url + "/api/jobs?since=3&x")[0] == 200
    assert get_json(url + "/api/jobs/default?x=%ff")[1]["job_id"] == "default"
    assert get(url + "/?token=abc")[0] == 200
    # HEAD: the GET's status and headers, no body, errors included
    status, headers, body = get(url + "/api/jobs/default", method="HEAD")
    assert (status, body, headers["Content-Type"]) == (200, b"", "application/json") and int(headers["Content-Length"]) > 100
    status, headers, body = get(url + "/nope", method="HEAD")
    assert (status, body) == (404, b"") and int(headers["Content-Length"]) > 0
    code, _, body = raw(address, b"HEAD /\xff HTTP/1.0\r\n\r\n")
    assert (code, body) == (404, b"")
    assert get_json(url + "/healthz") == (200, {"status": "ok"})


def test_a_stalled_request_is_timed_out_and_holds_up_neither_others_nor_the_shutdown(serve: Callable[..., RunningServer]) -> None:
    running = serve()
    endpoint = endpoint_for(running, request_timeout_s=0.5)
    patient = endpoint_for(running, request_timeout_s=600.0)
    try:
        host, port = endpoint.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as stalled:
            stalled.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: x\r\n")  # headers never end
            assert get_json(f"http://{endpoint.address}/api/jobs")[0] == 200  # others are served meanwhile
            assert stalled.recv(1024) == b""  # the server hung up on it (the read timeout; 30 s would fail here)
        assert get_json(f"http://{endpoint.address}/healthz")[0] == 200
        # closing waits for no stalled connection (even one with a long timeout)
        host, port = patient.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as stalled:
            stalled.sendall(b"GET / HTTP/1.1\r\n")
            assert get(f"http://{patient.address}/healthz")[0] == 200
            closing = threading.Thread(target=patient.close)
            closing.start()
            closing.join(30)
            assert not closing.is_alive(), "close() waited on a stalled connection"
    finally:
        endpoint.close()
        patient.close()


def test_connections_beyond_the_limit_get_503_at_once_and_their_slots_come_back(serve: Callable[..., RunningServer]) -> None:
    running = serve()
    endpoint = endpoint_for(running, max_connections=3, request_timeout_s=600.0)
    host, port = endpoint.address.rsplit(":", 1)
    holders = [socket.create_connection((host, int(port)), timeout=30) for _ in range(3)]
    try:
        # accepted in order after the three holders, which each hold a slot (sending nothing)
        with socket.create_connection((host, int(port)), timeout=30) as extra:
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503 ") and b"Retry-After: 1" in head
        assert json.loads(body) == {"error": "the dashboard endpoint is serving its maximum number of connections; retry shortly", "status": 503}
    finally:
        for holder in holders:
            holder.close()
    # their threads see the close and give the slots back (polled: how soon is not the point)
    served = False
    for _ in range(600):
        try:
            served = get(f"http://{endpoint.address}/healthz")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            served = False
        if served:
            break
        time.sleep(0.05)
    assert served, "the slots never came back"
    # many concurrent requests within the limit all succeed
    endpoint.close()
    endpoint = endpoint_for(running, max_connections=64)
    try:
        answers: list[int] = []
        threads = [threading.Thread(target=lambda: answers.append(get(f"http://{endpoint.address}/api/jobs/default")[0])) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert answers == [200] * 32
    finally:
        endpoint.close()


def test_a_failing_view_is_a_logged_500_and_the_endpoint_keeps_serving(serve: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture) -> None:
    running = serve()

    def broken_snapshot(job_id: str) -> dict[str, Any]:
        raise RuntimeError(f"snapshot of {job_id} broke")

    def broken_metrics() -> tuple[bytes, str]:
        raise KeyError("gauge")

    endpoint = endpoint_for(running, job=broken_snapshot, metrics=broken_metrics)
    url = f"http://{endpoint.address}"
    try:
        with caplog.at_level(logging.ERROR, logger="tributary.server.http"):
            status, error = get_json(url + "/api/jobs/default")
            assert status == 500 and error["status"] == 500
            assert error["error"] == (
                "internal error while serving '/api/jobs/default' (RuntimeError: snapshot of default broke); the server logged the traceback"
            )
            status, _, body = get(url + "/metrics", method="HEAD")
            assert (status, body) == (500, b"")
        failures = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in failures] == ["HTTP GET '/api/jobs/default' failed", "HTTP HEAD '/metrics' failed"]
        assert all(r.exc_info is not None for r in failures)
        assert get_json(url + "/api/jobs")[0] == 200 and get_json(url + "/healthz")[0] == 200
    finally:
        endpoint.close()


def test_a_nan_metric_is_sent_as_null(serve: Callable[..., RunningServer]) -> None:
    running = serve(http_address="127.0.0.1:0")
    # a diverged model's loss, as the evaluator records it
    running.core.job("default").read_stats(lambda stats: stats.evaluations.append((0, time.time(), {"accuracy": 0.1, "loss": float("nan")})))
    status, job = get_json(base(running) + "/api/jobs/default")
    assert status == 200 and job["evaluations"][0]["metrics"] == {"accuracy": 0.1, "loss": None}


# -- the snapshot cache and keep-alive ------------------------------------------------


class SteppedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_snapshots_are_shared_for_their_max_age_then_rebuilt(serve: Callable[..., RunningServer]) -> None:
    running = serve(JobConfig(job_id="digits", strategy=FEDBUFF_1))
    clock = SteppedClock()
    endpoint = endpoint_for(running, clock=clock)  # the default snapshot_max_age_s, 1 s
    fresh = endpoint_for(running, snapshot_max_age_s=0)
    try:
        url = f"http://{endpoint.address}"
        first = get(url + "/api/jobs/digits")[2]
        assert get(url + "/api/jobs/digits")[2] == first, "within max age: the same bytes"
        with Client(running.address, job="digits", client_id="phone-1", insecure=True) as client:
            client.push(client.pull().version, delta())
        assert json.loads(get(url + "/api/jobs/digits")[2])["version"] == 0  # still the cached one
        assert json.loads(get(url + "/api/jobs")[2])["jobs"][0]["version"] == 1  # not built before: fresh
        assert get_json(f"http://{fresh.address}/api/jobs/digits")[1]["version"] == 1  # max age 0: never cached
        clock.now += 1.0
        assert get_json(url + "/api/jobs/digits")[1]["version"] == 1
        # /metrics is never cached; an unknown job is a 404 each time and leaves nothing cached
        assert b"tributary" in get(url + "/metrics")[2]
        for _ in range(3):
            assert get_json(url + "/api/jobs/nope")[0] == 404
        assert len(endpoint.snapshots) == 2  # /api/jobs and digits
    finally:
        endpoint.close()
        fresh.close()


def test_a_connection_is_kept_alive_across_requests_and_closed_when_idle(serve: Callable[..., RunningServer]) -> None:
    running = serve()
    endpoint = endpoint_for(running, keep_alive_idle_s=0.3)
    try:
        host, port = endpoint.address.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            paths = ["/api/jobs/default", "/healthz", "/metrics", "/api/jobs/nope", "/static/dashboard.js"]
            statuses = []
            for path in paths:
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
                assert response.getheader("Connection") is None and not response.will_close, path
                if path == paths[0]:
                    sock = connection.sock
                assert connection.sock is sock, "the same connection served every request"
            assert statuses == [200, 200, 200, 404, 200]
            # a request with a body (no route reads one) closes the connection after its answer
            connection.request("POST", "/api/jobs", body=b"GET /healthz HTTP/1.1\r\n\r\n")
            response = connection.getresponse()
            assert (response.status, response.getheader("Connection")) == (405, "close") and response.will_close
            response.read()
        finally:
            connection.close()
        # an idle kept connection is closed by the server (after keep_alive_idle_s, not 30 s)
        with socket.create_connection((host, int(port)), timeout=30) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := idle.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status": "ok"}')
        # HTTP/1.0 clients still get one answer and a close
        status, headers, body = raw(endpoint.address, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    finally:
        endpoint.close()


def test_a_start_refused_after_the_state_directory_opened_releases_it(tmp_path: Path) -> None:
    """The admin token file is read after the state directory is opened (and the
    evaluator's trial run written there): refusing it must release the directory."""
    state = tmp_path / "state"
    missing = tmp_path / "no-such.token"
    config = ServerConfig(address="127.0.0.1:0", insecure=True, state_dir=state, auth=True, admin_token_file=missing)
    with pytest.raises(ConfigError, match=f"admin_token_file {missing} does not exist"):
        with running_server(config, {"default": small_model()}):
            pytest.fail("the server started without its admin token")
    # the lock on the state directory was let go: it opens again at once
    config = ServerConfig(address="127.0.0.1:0", insecure=True, state_dir=state, http_address="127.0.0.1:0")
    with running_server(config, {"default": small_model()}, grace_s=0.1) as running:
        assert get_json(base(running) + "/healthz")[0] == 200
