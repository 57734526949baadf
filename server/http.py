"""The server's HTTP endpoint (`http_address`): Prometheus /metrics, the live
dashboard and its JSON API. No gRPC here.

Routes (GET and HEAD; any other method on them is 405):
  /                  the dashboard page (server/static/index.html)
  /static/NAME       its script and style sheet
  /api/jobs          the jobs, with their versions (server/dashboard.py overview)
  /api/jobs/JOB      one job's snapshot (server/dashboard.py job_snapshot)
  /metrics           the Prometheus exposition (an injected callable)
  /healthz           {"status": "ok"} while the server runs

Auth: with the server's auth on, /api/ and /metrics need the admin token as
`Authorization: Bearer TOKEN` (401 otherwise, before anything else is looked
at, so an unknown job is not told apart from a known one). The page and its
static assets load without it: they hold no data, and the page asks for the
token in a login form, keeps it in the tab's sessionStorage and sends it on
every fetch; a browser cannot add a header to the page's own navigation.
/healthz is open too, for load balancers: it tells only that the server runs.

With TLS configured for gRPC the endpoint serves HTTPS with the same
certificate and key; client certificates are not asked for (browsers seldom
have one; the admin token is the credential here).

The standard library's ThreadingHTTPServer, in a daemon thread: a dashboard
and a scraper make a few requests a second, which needs no framework.
"""

from __future__ import annotations

import http
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from server.auth import AdminCredential
from server.errors import ConfigError, JobNotFound

logger = logging.getLogger("tributary.server.http")

Exposition = Callable[[], tuple[bytes, str]]
"""() -> (body, content type) of the Prometheus exposition."""
JobsView = Callable[[], dict[str, Any]]
JobView = Callable[[str], dict[str, Any]]
"""job id -> its snapshot; raises JobNotFound for an unknown job."""

STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The assets served from server/static/, by name: nothing else is read from disk."""
ALLOWED_METHODS = "GET, HEAD"
REQUEST_TIMEOUT_S = 30.0
"""A connection that sends nothing (or stalls the TLS handshake) this long is closed."""


def _static(name: str) -> bytes:
    return resources.files("server").joinpath("static", name).read_bytes()


class HttpEndpoint:
    """Serves the routes above on `address` from a daemon thread; `start`
    binds (ConfigError when it cannot), `close` stops and waits."""

    def __init__(
        self,
        address: str,
        *,
        metrics: Exposition,
        jobs: JobsView,
        job: JobView,
        admin: AdminCredential | None,
        tls_files: tuple[str, str] | None = None,
    ) -> None:
        self._address = address
        self._metrics = metrics
        self._jobs = jobs
        self._job = job
        self._admin = admin
        self._tls_files = tls_files
        self._assets = {name: _static(name) for name in STATIC_TYPES}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"{self._address.rpartition(':')[0]}:{self.port}"

    @property
    def tls(self) -> bool:
        return self._tls_files is not None

    def start(self) -> None:
        host, _, port = self._address.rpartition(":")
        host = host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        try:
            server = server_class((host, int(port)), self._handler_class())
        except OSError as error:
            raise ConfigError(f"cannot listen on http_address {self._address} (--http-address): {error.strerror or error}") from error
        if self._tls_files is not None:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(*self._tls_files)
            except (OSError, ssl.SSLError) as error:
                server.server_close()
                raise ConfigError(f"cannot serve HTTPS on http_address {self._address} with the TLS files: {error}") from error
            # the handshake runs in the request's thread (on its first read), so a
            # client that stalls it holds up only its own connection
            server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="tributary-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(_Handler):
            owner = endpoint

        return Handler

    # -- what the handler asks of the endpoint ----------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self._admin is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self._admin.matches(token.strip() or None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that hung up, spoke plaintext to HTTPS or failed its handshake:
        # its own business, not a traceback on the server's stderr
        logger.debug("HTTP request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    owner: HttpEndpoint
    server_version = "tributary"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _refuse_method(self) -> None:
        path = urlsplit(self.path).path
        if not _known(path):
            self._error(http.HTTPStatus.NOT_FOUND, f"no such path {path!r}; see / for the dashboard, /metrics, /api/jobs")
            return
        self._error(http.HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported on {path}; use GET", allow=ALLOWED_METHODS)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _serve(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith("/api/") or path == "/api" or path == "/metrics":
            if not self.owner.authorized(self.headers.get("Authorization")):
                self._error(
                    http.HTTPStatus.UNAUTHORIZED,
                    "the admin token is required: send it as 'Authorization: Bearer TOKEN' (the server's admin.token)",
                    head=head,
                    extra={"WWW-Authenticate": 'Bearer realm="tributary"'},
                )
                return
        if path == "/metrics":
            body, content_type = self.owner._metrics()
            self._send(http.HTTPStatus.OK, body, content_type, head=head)
        elif path == "/api/jobs":
            self._json(self.owner._jobs(), head=head)
        elif path.startswith("/api/jobs/") and path.count("/") == 3:
            try:
                snapshot = self.owner._job(path.removeprefix("/api/jobs/"))
            except JobNotFound as error:
                self._error(http.HTTPStatus.NOT_FOUND, str(error), head=head)
                return
            self._json(snapshot, head=head)
        elif path in ("/", "/index.html"):
            self._asset("index.html", head=head)
        elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC_TYPES:
            self._asset(path.removeprefix("/static/"), head=head)
        elif path == "/healthz":
            self._json({"status": "ok"}, head=head)
        else:
            self._error(http.HTTPStatus.NOT_FOUND, f"no such path {path!r}; see / for the dashboard, /metrics, /api/jobs", head=head)

    def _asset(self, name: str, *, head: bool) -> None:
        self._send(http.HTTPStatus.OK, self.owner._assets[name], STATIC_TYPES[name], head=head)

    def _json(self, value: object, *, head: bool) -> None:
        self._send(http.HTTPStatus.OK, json.dumps(value, allow_nan=False).encode(), "application/json", head=head)

    def _error(
        self, status: http.HTTPStatus, message: str, *, head: bool = False, allow: str | None = None, extra: dict[str, str] | None = None
    ) -> None:
        headers = dict(extra or {})
        if allow is not None:
            headers["Allow"] = allow
        body = json.dumps({"error": message, "status": int(status)}).encode()
        self._send(status, body, "application/json", head=head, headers=headers)

    def _send(self, status: http.HTTPStatus, body: bytes, content_type: str, *, head: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)


def _known(path: str) -> bool:
    return (
        path in ("/", "/index.html", "/metrics", "/healthz", "/api/jobs")
        or (path.startswith("/api/jobs/") and path.count("/") == 3)
        or (path.startswith("/static/") and path.removeprefix("/static/") in STATIC_TYPES)
    )
