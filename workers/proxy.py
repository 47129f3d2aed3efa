"""The proxy worker's client side: one protocol object per client connection.

Fields are grouped by lifetime (worker, connection, request) as in uvicorn's
httptools protocol. Parsing fills a `Request`; routing picks the route; an
`Exchange` (workers/exchange.py) carries the request to an upstream and streams the
answer back. Pipelined requests are queued and served strictly in order.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import TYPE_CHECKING

import httptools

from shared_state import arena as arena_fields
from workers import http11
from workers.exchange import Exchange

if TYPE_CHECKING:
    from workers.worker import WorkerContext

log = logging.getLogger("ringgate.proxy")

# Reasons the client socket's reading is paused (a bit each, reading resumes when none is left).
PAUSE_PIPELINE = 1
PAUSE_UPSTREAM = 2
PAUSE_BUFFER = 4


class ClientError(Exception):
    """A request the gateway refuses before routing: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    __slots__ = (
        "method", "path", "query", "headers", "host", "keep_alive", "http_11", "accept",
        "content_length", "chunked", "body_chunks", "body_bytes", "body_done", "replayable",
        "expect_continue", "t_start", "exchange", "request_id", "connection_tokens",
    )

    def __init__(self) -> None:
        self.method = "GET"
        self.path = "/"
        self.query: bytes | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = ""
        self.keep_alive = True
        self.http_11 = True
        self.accept: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.body_chunks: list[bytes] = []
        self.body_bytes = 0
        self.body_done = False
        self.replayable = True
        self.expect_continue = False
        self.t_start = 0.0
        self.exchange: Exchange | None = None
        self.request_id = ""
        self.connection_tokens: frozenset[bytes] = frozenset()

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ClientProtocol(asyncio.Protocol):
    def __init__(self, ctx: "WorkerContext") -> None:
        # Worker state
        self.ctx = ctx
        self.loop = ctx.loop
        self.settings = ctx.settings
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.closed = False
        self.pending: deque[Request] = deque()
        self.active: Request | None = None
        self.read_pause = 0
        self.write_paused = False
        self.requests_served = 0
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.starting = False
        self.error_after: ClientError | None = None
        # Per-request parse state
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.in_headers = False
        self.header_started = 0.0
        self.parsing: Request | None = None

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        self.ctx.connections.add(self)
        self.ctx.stats.incr(arena_fields.CONNECTIONS_ACCEPTED)
        self.ctx.stats.incr(arena_fields.CONNECTIONS_ACTIVE)
        self.last_activity = self.loop.time()
        self.timer = self.loop.call_at(self.last_activity + self.settings.client_header_timeout, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.ctx.connections.discard(self)
        self.ctx.stats.decr(arena_fields.CONNECTIONS_ACTIVE)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        active = self.active
        if active is not None and active.exchange is not None:
            active.exchange.on_client_lost()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # WebSocket and other upgrades are not proxied yet: the request was served as plain HTTP
            # without its Upgrade headers, and the connection closes after the answer.
            if self.parsing is not None:
                self.parsing.keep_alive = False
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientError):
                self._refuse(cause)
            elif cause is not None and not isinstance(exc, (httptools.HttpParserInvalidMethodError,
                                                             httptools.HttpParserInvalidURLError)):
                if isinstance(exc, httptools.HttpParserCallbackError):
                    log.error("unexpected error while handling a request: %r", cause, exc_info=cause)
                    self._refuse(ClientError(500, http11.MSG_UNEXPECTED))
                else:
                    self._refuse(ClientError(400, http11.MSG_BAD_REQUEST))
            else:
                self._refuse(ClientError(400, http11.MSG_BAD_REQUEST))

    def eof_received(self) -> bool | None:
        # The client finished sending; answers still in flight are written, then we close.
        if self.active is None and not self.pending:
            return False
        if self.parsing is not None and not self.parsing.body_done:
            return False
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        active = self.active
        if active is not None and active.exchange is not None:
            active.exchange.on_client_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        active = self.active
        if active is not None and active.exchange is not None:
            active.exchange.on_client_resume_writing()

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.in_headers = True
        self.header_started = self.last_activity

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.settings.max_request_line:
            raise ClientError(414, "Request-URI Too Large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        headers = self.headers
        headers.append((name, value))
        if self.header_bytes > self.settings.max_header_bytes or len(headers) > self.settings.max_headers:
            raise ClientError(431, "Request Header Fields Too Large")

    def on_headers_complete(self) -> None:
        self.in_headers = False
        req = self._build_request()
        self.parsing = req
        if self.active is None and not self.pending:
            self._begin(req)
        else:
            self.pending.append(req)
            self._pause(PAUSE_PIPELINE)
            self._start_next()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None:
            return
        req.body_bytes += len(body)
        exchange = req.exchange
        if exchange is not None and exchange.streaming:
            exchange.forward_body(body)
            return
        req.body_chunks.append(body)
        if req.body_bytes > self.settings.replay_buffer_bytes:
            # Nobody is reading this body yet: stop taking more until an upstream connection is ready.
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        req = self.parsing
        if req is None:
            return
        self.parsing = None
        req.body_done = True
        exchange = req.exchange
        if exchange is not None:
            exchange.on_client_body_done()

    # Request assembly and dispatch

    def _build_request(self) -> Request:
        ctx = self.ctx
        req = Request()
        req.t_start = self.loop.time()
        req.request_id = ctx.next_request_id()
        parser = self.parser
        req.method = parser.get_method().decode("ascii")
        req.http_11 = parser.get_http_version() == "1.1"
        req.keep_alive = parser.should_keep_alive()
        url = self.url
        if url[:1] != b"/":
            url = self._origin_form(url)
        path, sep, query = url.partition(b"?")
        req.path = path.decode("utf-8", "surrogateescape")
        req.query = query if sep else None
        req.headers = self.headers
        host: bytes | None = None
        content_lengths = 0
        for name, value in self.headers:
            if len(name) > 17:
                continue
            lname = name.lower()
            if lname == b"host":
                if host is not None:
                    raise ClientError(400, "Bad request: duplicate Host header")
                host = value
            elif lname == b"content-length":
                content_lengths += 1
                req.content_length = int(value)
            elif lname == b"transfer-encoding":
                req.chunked = True
            elif lname == b"accept":
                req.accept = value
            elif lname == b"expect":
                req.expect_continue = value.lower() == b"100-continue"
            elif lname == b"connection":
                req.connection_tokens = frozenset(t.strip().lower() for t in value.split(b","))
        if host is None:
            if req.http_11:
                raise ClientError(400, "Bad request: missing Host header")
            host = b""
        req.host = host.decode("latin-1")
        if self.ctx.draining:
            req.keep_alive = False
        return req

    def _origin_form(self, url: bytes) -> bytes:
        # absolute-form (RFC 9112 3.2.2): keep the path, the Host header stays authoritative.
        if url == b"*":
            raise ClientError(400, "Bad request: asterisk-form is only for OPTIONS on a server")
        scheme_end = url.find(b"://")
        if scheme_end < 0:
            raise ClientError(400, "Bad request: invalid request target")
        slash = url.find(b"/", scheme_end + 3)
        return url[slash:] if slash >= 0 else b"/"

    def _begin(self, req: Request) -> None:
        self.active = req
        try:
            self._dispatch(req)
        except Exception:
            # A bug must cost one request, never the worker.
            log.exception("unexpected error while handling %s %s", req.method, req.path)
            if self.active is req:
                exchange = req.exchange
                if exchange is not None and exchange.response_started:
                    exchange.abandon()
                    self.abort()
                else:
                    if exchange is not None:
                        exchange.abandon()
                    self.send_error(req, 500, http11.MSG_UNEXPECTED, close=True)

    def _dispatch(self, req: Request) -> None:
        ctx = self.ctx
        runtime = ctx.runtime
        header_values: dict[str, str] | None = None
        if runtime.header_names:
            header_values = {}
            wanted = runtime.header_names
            for name, value in req.headers:
                lname = name.decode("latin-1").lower()
                if lname in wanted and lname not in header_values:
                    header_values[lname] = value.decode("latin-1")
        try:
            match = runtime.router.match(req.method, req.host, req.path, header_values, ctx.listen_port)
        except ValueError:
            self.send_error(req, 400, http11.MSG_BAD_REQUEST)
            return
        if match is None:
            self.send_error(req, 404, http11.MSG_NO_ROUTE)
            return
        route = match.payload
        if route.service is None:
            self.send_error(req, 503, http11.MSG_NO_SERVICE)
            return
        exchange = Exchange(self, req, match, route, route.service)
        req.exchange = exchange
        exchange.start()

    def _start_next(self) -> None:
        if self.starting:
            return
        self.starting = True
        try:
            while self.active is None and self.pending and not self.closed:
                self._begin(self.pending.popleft())
            if not self.pending:
                self._resume(PAUSE_PIPELINE)
        finally:
            self.starting = False

    def request_done(self, req: Request, status: int, bytes_out: int, keep_alive: bool) -> None:
        """Called once per request, by the exchange or the error path, when its answer is fully written."""
        self.ctx.stats.record_response(status, req.body_bytes, bytes_out)
        self.requests_served += 1
        if self.active is req:
            self.active = None
        if self.closed:
            return
        if not (keep_alive and req.keep_alive) or self.ctx.draining:
            self._close()
            return
        if self.pending:
            self._start_next()
            return
        if self.error_after is not None:
            error, self.error_after = self.error_after, None
            self._refuse(error)
            return
        if self.parsing is req and not req.body_done:
            # The answer went out before the request body was read (an early error): the rest of the
            # body cannot be told apart from a next request without reading it, so close.
            self._close()
            return
        self._resume(PAUSE_BUFFER)

    def send_error(self, req: Request, status: int, message: str, close: bool = False,
                   extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        keep = req.keep_alive and not close and not self.ctx.draining and (req.body_done or not req.has_body)
        data = http11.error_response(status, message, req.request_id, req.accept, not keep, extra_headers)
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        self.request_done(req, status, len(data), keep)

    def _refuse(self, error: ClientError) -> None:
        """A protocol-level refusal: answer after the requests already read, then close."""
        if self.closed:
            return
        broken, self.parsing = self.parsing, None
        if broken is not None and not broken.body_done:
            # The bad bytes belong to a request already under way: it cannot be completed.
            if broken is self.active:
                exchange = broken.exchange
                if exchange is not None:
                    exchange.abandon()
                    if exchange.response_started:
                        self.abort()
                        return
                self.active = None
            elif broken in self.pending:
                self.pending.remove(broken)
        if self.active is not None or self.pending:
            self.error_after = error
            self._pause(PAUSE_PIPELINE)
            return
        request_id = self.ctx.next_request_id()
        data = http11.error_response(error.status, error.message, request_id, None, True)
        if self.transport is not None:
            self.transport.write(data)
        self.ctx.stats.record_response(error.status, 0, len(data))
        self._close()

    # Flow control

    def _pause(self, reason: int) -> None:
        if not self.read_pause and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_pause |= reason

    def _resume(self, reason: int) -> None:
        if not self.read_pause & reason:
            return
        self.read_pause &= ~reason
        if not self.read_pause and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_for_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM)

    def resume_buffered(self) -> None:
        self._resume(PAUSE_BUFFER)

    # Writing and closing

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: list[bytes]) -> None:
        if not self.closed:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def abort(self) -> None:
        """Cut the connection so the client sees an incomplete answer (no clean end of body)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def close_if_idle(self) -> bool:
        if self.active is None and not self.pending and not self.in_headers:
            self._close()
            return True
        return False

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        if self.active is not None:
            deadline = now + self.settings.client_keepalive_timeout  # upstream timeouts govern this request
        elif self.in_headers or self.requests_served == 0:
            deadline = (self.header_started if self.in_headers else self.last_activity) \
                + self.settings.client_header_timeout
        else:
            deadline = self.last_activity + self.settings.client_keepalive_timeout
        if now >= deadline:
            self._close()
            return
        self.timer = self.loop.call_at(deadline, self._on_timer)


def worker_request_id_prefix() -> str:
    return os.urandom(8).hex()
