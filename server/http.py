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
and a scraper make a few requests a second, which needs no framework. Bad
input never takes it down: each connection has its own thread, a read timeout
(REQUEST_TIMEOUT_S) and a place among MAX_CONNECTIONS (beyond them a new
connection gets 503 at once); every error, the parser's included, is a JSON
body {"error", "status"}; a failure inside a route is logged with its
traceback and answered 500.

Snapshots are cached: the encoded body of /api/jobs and of each
/api/jobs/JOB is shared by every request within `snapshot_max_age_s` of
its build (default 1 s, the page's poll period), and a stale one is rebuilt
by one request while the others that want it wait for that build
(SnapshotCache). Five tabs and a Grafana panel then cost one build a second,
not six, and a fast poller cannot make the server build faster than that.
/metrics is not cached: a scrape expects fresh values and is cheap.

HTTP/1.1 with keep-alive: a browser tab polls over one connection rather than
opening one (and a server thread) per request. A kept connection holds its
place among MAX_CONNECTIONS, so it is closed after KEEP_ALIVE_IDLE_S without
a next request, and a request that came with a body (never read: every route
is GET/HEAD) is answered with Connection: close.
"""

from __future__ import annotations

import http
import io
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Hashable
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
"""A connection whose next read (request line, a header, the TLS handshake) or
write stalls this long is closed."""
MAX_CONNECTIONS = 64
"""Connections served at once (one thread each); more are refused with 503
until one ends, so stalled clients cannot pile up threads."""
KEEP_ALIVE_IDLE_S = 5.0
"""A kept-alive connection with no next request for this long is closed (the
page polls every second; a browser keeps idle connections far longer)."""
SNAPSHOT_MAX_AGE_S = 1.0
"""How long an encoded snapshot is served to every request before one rebuilds it."""
MAX_SHOWN_PATH = 200
"""Characters of a request's path echoed back in an error message."""
BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    b'{"error": "the dashboard endpoint is serving its maximum number of connections; retry shortly", "status": 503}'
)


def _static(name: str) -> bytes:
    return resources.files("server").joinpath("static", name).read_bytes()


class _CacheEntry:
    __slots__ = ("body", "built_at", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        """Held by the one request that builds this entry; the others wait on it."""
        self.body: bytes | None = None
        self.built_at = 0.0


class SnapshotCache:
    """Encoded bodies by key, each served until `max_age_s` after its build.
    A stale or missing entry is built by one caller at a time: the others
    that want it wait, then get what it built. A build that raises caches
    nothing (the next caller tries again). `max_age_s <= 0` builds every time."""

    def __init__(self, max_age_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(max_age_s) and max_age_s >= 0):
            raise ValueError(f"snapshot_max_age_s must be a finite number >= 0, got {max_age_s!r}")
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: dict[Hashable, _CacheEntry] = {}
        self._entries_lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], bytes]) -> bytes:
        if self.max_age_s <= 0:
            return build()
        with self._entries_lock:
            entry = self._entries.setdefault(key, _CacheEntry())
        with entry.lock:
            if entry.body is not None and self._clock() - entry.built_at < self.max_age_s:
                return entry.body
            try:
                body = build()
            except BaseException:
                if entry.body is None:  # nothing worth keeping: unknown keys (a 404's job id) must not pile up
                    with self._entries_lock:
                        if self._entries.get(key) is entry:
                            del self._entries[key]
                raise
            entry.body, entry.built_at = body, self._clock()
            return body

    def __len__(self) -> int:
        with self._entries_lock:
            return len(self._entries)


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
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        keep_alive_idle_s: float = KEEP_ALIVE_IDLE_S,
        snapshot_max_age_s: float = SNAPSHOT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = address
        self._metrics = metrics
        self._jobs = jobs
        self._job = job
        self._admin = admin
        self._tls_files = tls_files
        self._max_connections = max_connections
        self._request_timeout_s = request_timeout_s
        self._keep_alive_idle_s = keep_alive_idle_s
        self.snapshots = SnapshotCache(snapshot_max_age_s, clock=clock)
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
            server = server_class((host, int(port)), self._handler_class(), max_connections=self._max_connections)
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
            timeout = endpoint._request_timeout_s
            keep_alive_idle_s = endpoint._keep_alive_idle_s

        return Handler

    # -- what the handler asks of the endpoint ----------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self._admin is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self._admin.matches(token.strip() or None)

    def jobs_body(self) -> bytes:
        return self.snapshots.get("jobs", lambda: _encode(self._jobs()))

    def job_body(self, job_id: str) -> bytes:
        """Raises JobNotFound for an unknown job (not cached)."""
        return self.snapshots.get(("job", job_id), lambda: _encode(self._job(job_id)))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    """close() does not wait for connections still open (a stalled one would
    hold the server's shutdown for REQUEST_TIMEOUT_S)."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, max_connections: int) -> None:
        self._connection_slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._refused = 0
        """Connections refused since one was last served (warned about once per run of refusals)."""
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # runs on the accept loop: it must never block
        if not self._connection_slots.acquire(blocking=False):
            self._refuse_busy(request, client_address)
            return
        if self._refused:
            logger.warning("HTTP endpoint serving again after refusing %d connection(s) at its limit", self._refused)
            self._refused = 0
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._connection_slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def _refuse_busy(self, request: socket.socket, client_address: Any) -> None:
        if not self._refused:  # once per run of refusals: a flood must not flood the log too
            logger.warning(
                "HTTP endpoint at its limit of %d connections: refusing new ones (503) until one ends; first from %s",
                self._max_connections,
                client_address,
            )
        self._refused += 1
        try:
            if not isinstance(request, ssl.SSLSocket):  # a TLS reply would need a handshake, which may block
                request.setblocking(False)
                request.send(BUSY_RESPONSE)  # a few hundred bytes fit a fresh socket's buffer
        except OSError:
            pass  # best effort: the client gets the close
        finally:
            self.shutdown_request(request)

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
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    keep_alive_idle_s = KEEP_ALIVE_IDLE_S
    _served = 0
    """Requests answered on this connection so far."""
    _responded = False
    """Whether this request's status line went out (a failure after it cannot become a 500)."""

    def handle_one_request(self) -> None:
        if self._served:
            # between requests on a kept connection: wait at most keep_alive_idle_s
            # for the next one to begin, then the usual timeout for the rest of it
            self.connection.settimeout(self.keep_alive_idle_s)
            try:
                if not isinstance(self.rfile, io.BufferedReader) or not self.rfile.peek(1):
                    self.close_connection = True  # the client closed it
                    return
            except OSError:  # TimeoutError included: idle too long
                self.close_connection = True
                return
            finally:
                self.connection.settimeout(self.timeout)
        self._responded = False
        super().handle_one_request()
        self._served += 1

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The parser's errors (overlong request line or header, bad request
        line, unknown method) in the same JSON shape as ours."""
        status = http.HTTPStatus(code)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            # the parser's default while it could not read a version: HTTP/0.9
            # answers have no status line, and the client would get a bare body
            self.request_version = "HTTP/1.0"
        text = message or status.phrase
        if explain and explain != text:
            text = f"{text}: {explain}"
        self._error(status, text, head=self.command == "HEAD", extra={"Connection": "close"})

    def _refuse_method(self) -> None:
        path = _request_path(self.path)
        if not _known(path):
            self._error(http.HTTPStatus.NOT_FOUND, f"no such path {_shown(path)}; see / for the dashboard, /metrics, /api/jobs")
            return
        self._error(http.HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported on {path}; use GET", allow=ALLOWED_METHODS)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _serve(self, *, head: bool) -> None:
        path = _request_path(self.path)
        try:
            self._route(path, head=head)
        except Exception as error:
            if isinstance(error, OSError) and self._responded:
                logger.debug("HTTP client %s left while %s was sent", self.address_string(), _shown(path), exc_info=True)
                return
            logger.exception("HTTP %s %s failed", self.command, _shown(path))
            if self._responded:  # too late for a status: the client sees the connection close
                self.close_connection = True
                return
            detail = f"{type(error).__name__}: {error}"[:MAX_SHOWN_PATH]
            self._error(
                http.HTTPStatus.INTERNAL_SERVER_ERROR,
                f"internal error while serving {_shown(path)} ({detail}); the server logged the traceback",
                head=head,
            )

    def _route(self, path: str, *, head: bool) -> None:
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
            self._send(http.HTTPStatus.OK, self.owner.jobs_body(), "application/json", head=head)
        elif path.startswith("/api/jobs/") and path.count("/") == 3:
            try:
                body = self.owner.job_body(path.removeprefix("/api/jobs/"))
            except JobNotFound as error:
                self._error(http.HTTPStatus.NOT_FOUND, str(error), head=head)
                return
            self._send(http.HTTPStatus.OK, body, "application/json", head=head)
        elif path in ("/", "/index.html"):
            self._asset("index.html", head=head)
        elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC_TYPES:
            self._asset(path.removeprefix("/static/"), head=head)
        elif path == "/healthz":
            self._json({"status": "ok"}, head=head)
        else:
            self._error(http.HTTPStatus.NOT_FOUND, f"no such path {_shown(path)}; see / for the dashboard, /metrics, /api/jobs", head=head)

    def _asset(self, name: str, *, head: bool) -> None:
        self._send(http.HTTPStatus.OK, self.owner._assets[name], STATIC_TYPES[name], head=head)

    def _json(self, value: object, *, head: bool) -> None:
        self._send(http.HTTPStatus.OK, _encode(value), "application/json", head=head)

    def _error(
        self, status: http.HTTPStatus, message: str, *, head: bool = False, allow: str | None = None, extra: dict[str, str] | None = None
    ) -> None:
        headers = dict(extra or {})
        if allow is not None:
            headers["Allow"] = allow
        body = json.dumps({"error": message, "status": int(status)}).encode()
        self._send(status, body, "application/json", head=head, headers=headers)

    def _send(self, status: http.HTTPStatus, body: bytes, content_type: str, *, head: bool, headers: dict[str, str] | None = None) -> None:
        self._responded = True
        request_headers = getattr(self, "headers", None)  # none yet when the parser failed on the request line
        if request_headers is not None and (request_headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in request_headers):
            # a body no route reads: on a kept connection it would be taken for the next request
            self.close_connection = True
            headers = {**(headers or {}), "Connection": "close"}
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


def _encode(value: object) -> bytes:
    """`value` as a JSON body."""
    try:
        return json.dumps(value, allow_nan=False).encode()
    except ValueError:  # a NaN or infinity (a diverged model's loss): JSON has no such number
        return json.dumps(_finite(value), allow_nan=False).encode()


def _request_path(target: str) -> str:
    """The request target's path, percent-decoded (bytes that are not UTF-8
    become U+FFFD); the query string is ignored."""
    return unquote(urlsplit(target).path, errors="replace")


def _shown(path: str) -> str:
    """`path` as an error message quotes it: repr'd and cut to MAX_SHOWN_PATH."""
    return repr(path) if len(path) <= MAX_SHOWN_PATH else f"{path[:MAX_SHOWN_PATH]!r}... ({len(path)} characters)"


def _finite(value: object) -> object:
    """`value` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _known(path: str) -> bool:
    return (
        path in ("/", "/index.html", "/metrics", "/healthz", "/api/jobs")
        or (path.startswith("/api/jobs/") and path.count("/") == 3)
        or (path.startswith("/static/") and path.removeprefix("/static/") in STATIC_TYPES)
    )
