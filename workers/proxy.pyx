# cython: language_level=3
"""The proxy worker's request path (see proxy.pxd for the layout and the write contract).

ClientProtocol parses with httptools and queues pipelined requests; routing asks the
Cython router; an Exchange asks the balancer and the pool (decisions over state),
then writes; UpstreamConnection parses the answer and hands it back to the Exchange.

Retry rules follow nginx's `proxy_next_upstream error timeout` as Kong uses it, with
two fixes Kong users ask for: a retry never lands on a target that already failed for
this request while another remains, and a request that fails on a reused idle
connection before any response byte is sent once more on a fresh connection.
"""
import asyncio
import logging
import os
import ssl
import time
import uuid
from collections import deque

import httptools

from libc.stdint cimport uint64_t
from libc.stdio cimport snprintf
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from libc.string cimport memchr, strncasecmp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from shared_state import arena as arena_fields
from workers import http11
from workers.resolver import NameResolutionError
from workers.access_log import iso_time as access_log_time
from ringgate.plugins import chain as plugin_chain
from ringgate.plugins.base import Context as PluginContext

from fastpath.balancer cimport Balancer
from shared_state.health cimport (HealthTable, HealthPolicy, monotonic_ms, OUTCOME_SUCCESS,
                                  OUTCOME_HTTP_FAILURE, OUTCOME_TCP_FAILURE, OUTCOME_TIMEOUT, S_EJECTED, S_TRIAL)
from shared_state import health_rules
from shared_state.series cimport (SeriesTable, series_add, series_observe, KIND_ROUTE, KIND_CODE, KIND_TARGET,
                                  R_REQUESTS, R_STATUS_1XX, R_BYTES_IN, R_BYTES_OUT, R_REQUEST_LATENCY,
                                  R_UPSTREAM_LATENCY, R_KONG_LATENCY, T_REQUESTS, T_CONNECT_FAILURES, T_TIMEOUTS,
                                  T_STATUS_FAILURES, T_LATENCY_SUM_US, T_LATENCY_COUNT, C_REQUESTS)
from shared_state.series import code_key, route_key, target_key
from fastpath.router cimport RouteMatch, Router
from shared_state.arena cimport WorkerStats

log = logging.getLogger("ringgate.proxy")

# Reasons the client socket's reading is paused (a bit each; reading resumes when none is left).
cdef enum:
    PAUSE_PIPELINE = 1
    PAUSE_UPSTREAM = 2
    PAUSE_BUFFER = 4
    PAUSE_TUNNEL = 8   # llhttp stopped at an upgrade head: hold what follows until the handshake is answered

# The two ends of a WebSocket tunnel (bits).
cdef enum:
    SIDE_CLIENT = 1
    SIDE_UPSTREAM = 2

# Why an upstream connection stopped serving an exchange.
cdef enum:
    LOST_EOF = 0       # clean close
    LOST_ERROR = 1     # reset, or an answer llhttp could not parse
    LOST_TIMEOUT = 2

cdef int F_CONNECTIONS_ACTIVE = arena_fields.CONNECTIONS_ACTIVE
cdef int F_CONNECTIONS_ACCEPTED = arena_fields.CONNECTIONS_ACCEPTED
cdef int F_UPSTREAM_TIMEOUTS = arena_fields.UPSTREAM_TIMEOUTS
cdef int F_UPSTREAM_CONNECT_ERRORS = arena_fields.UPSTREAM_CONNECT_ERRORS
cdef int F_RETRIES = arena_fields.RETRIES

cdef bytes CRLF = b"\r\n"
cdef bytes COLON_SP = b": "
cdef bytes CHUNK_END = http11.CHUNK_END
cdef bytes VIA_TOKEN = http11.VIA_TOKEN
cdef bytes SERVER_TOKEN = http11.SERVER_TOKEN
cdef bytes VIA_LINE = b"Via: " + VIA_TOKEN + b"\r\n"
# Kong's upstream lines for a WebSocket handshake, in place of the usual Connection line.
cdef bytes KEEP_ALIVE_LINE = b"Connection: keep-alive\r\n"
cdef bytes WEBSOCKET_LINES = b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
cdef frozenset IDEMPOTENT = http11.IDEMPOTENT_METHODS
cdef dict STATUS_LINES = http11.STATUS_LINES
# What a backup keeps of the client's headers when preserve_original_headers is off.
cdef frozenset _BACKUP_KEPT_HEADERS = frozenset((b"content-type", b"accept", b"accept-encoding", b"user-agent",
                                                 b"transfer-encoding", b"content-length", b"host"))


# Method names as str, looked up instead of decoded per request.
cdef dict _METHOD_NAMES = {m.encode(): m for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT")}


class ClientError(Exception):
    """A request refused before routing: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Header names, compared case-insensitively in C without building lowercase copies.

cdef inline double _now() noexcept nogil:
    # The loop's clock (libuv reads CLOCK_MONOTONIC too) without a Python call; deadlines given to
    # loop.call_at stay on the same base.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline bint _is(bytes name, const char* lower, Py_ssize_t n):
    return PyBytes_GET_SIZE(name) == n and strncasecmp(PyBytes_AS_STRING(name), lower, n) == 0


cdef enum RequestHeader:
    RQ_KEEP = 0
    RQ_DROP = 1                 # hop-by-hop or set by the gateway
    RQ_XFF = 2
    RQ_VIA = 3
    RQ_TE = 4
    RQ_FORWARDED = 5            # X-Forwarded-Proto/Host/Port/Path/Prefix: kept only from trusted peers


cdef inline RequestHeader _request_header(bytes name):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    cdef const char* s = PyBytes_AS_STRING(name)
    if n == 4:
        if strncasecmp(s, "host", 4) == 0:
            return RQ_DROP
    elif n == 2:
        if strncasecmp(s, "te", 2) == 0:
            return RQ_TE
    elif n == 3:
        if strncasecmp(s, "via", 3) == 0:
            return RQ_VIA
    elif n == 6:
        if strncasecmp(s, "expect", 6) == 0:
            return RQ_DROP
    elif n == 7:
        if strncasecmp(s, "trailer", 7) == 0 or strncasecmp(s, "upgrade", 7) == 0:
            return RQ_DROP
    elif n == 9:
        if strncasecmp(s, "x-real-ip", 9) == 0:
            return RQ_DROP
    elif n == 10:
        if strncasecmp(s, "connection", 10) == 0 or strncasecmp(s, "keep-alive", 10) == 0:
            return RQ_DROP
    elif n == 14:
        if strncasecmp(s, "content-length", 14) == 0:
            return RQ_DROP
    elif n == 15:
        if strncasecmp(s, "x-forwarded-for", 15) == 0:
            return RQ_XFF
    elif n == 16:
        if strncasecmp(s, "proxy-connection", 16) == 0:
            return RQ_DROP
        if (strncasecmp(s, "x-forwarded-host", 16) == 0 or strncasecmp(s, "x-forwarded-port", 16) == 0
                or strncasecmp(s, "x-forwarded-path", 16) == 0):
            return RQ_FORWARDED
    elif n == 17:
        if strncasecmp(s, "x-forwarded-proto", 17) == 0:
            return RQ_FORWARDED
        if strncasecmp(s, "transfer-encoding", 17) == 0:
            return RQ_DROP
    elif n == 18:
        if strncasecmp(s, "x-forwarded-prefix", 18) == 0:
            return RQ_FORWARDED
    return RQ_KEEP


cdef enum ResponseHeader:
    RS_KEEP = 0
    RS_DROP = 1
    RS_CONTENT_LENGTH = 2
    RS_TRANSFER_ENCODING = 3
    RS_CONNECTION = 4
    RS_VIA = 5
    RS_SERVER = 6


cdef inline ResponseHeader _response_header(const char* s, Py_ssize_t n) noexcept:
    if n == 14:
        if strncasecmp(s, "content-length", 14) == 0:
            return RS_CONTENT_LENGTH
    elif n == 17:
        if strncasecmp(s, "transfer-encoding", 17) == 0:
            return RS_TRANSFER_ENCODING
    elif n == 10:
        if strncasecmp(s, "connection", 10) == 0:
            return RS_CONNECTION
        if strncasecmp(s, "keep-alive", 10) == 0:
            return RS_DROP
    elif n == 3:
        if strncasecmp(s, "via", 3) == 0:
            return RS_VIA
    elif n == 6:
        if strncasecmp(s, "server", 6) == 0:
            return RS_SERVER
    elif n == 2:
        if strncasecmp(s, "te", 2) == 0:
            return RS_DROP
    elif n == 7:
        if strncasecmp(s, "trailer", 7) == 0 or strncasecmp(s, "upgrade", 7) == 0:
            return RS_DROP
    elif n == 16:
        if strncasecmp(s, "proxy-connection", 16) == 0:
            return RS_DROP
    elif n == 18:
        if strncasecmp(s, "proxy-authenticate", 18) == 0:
            return RS_DROP
    return RS_KEEP


cdef class _ResponseHead:
    """What the gateway needs from an upstream answer's header block, and the lines it passes on."""
    cdef list kept                # bytes slices of header lines to send on, verbatim
    cdef bytes content_length
    cdef bint chunked
    cdef bint has_server
    cdef bytes via
    cdef list connection_named    # lowercase names listed in Connection (besides close/keep-alive)


cdef void _connection_names(_ResponseHead head, bytes value) except *:
    for token in value.split(b","):
        token = token.strip().lower()
        if token and token != b"close" and token != b"keep-alive":
            if head.connection_named is None:
                head.connection_named = []
            head.connection_named.append(token)


cdef inline Py_ssize_t _line_end(const char* s, Py_ssize_t pos, Py_ssize_t limit) noexcept:
    cdef const char* nl = <const char*>memchr(s + pos, b'\n', limit - pos)
    return limit if nl == NULL else nl - s + 1


cdef _ResponseHead _scan_response_head(bytes buf, Py_ssize_t start, Py_ssize_t end, list drop):
    """Walk the header lines of buf[start:end] (status line first; llhttp has already validated them).

    Lines whose name is hop-by-hop, framing, Via, or listed in `drop` are left out; runs of kept lines
    are sliced once each. An obs-fold continuation line follows the fate of the line it continues.
    """
    cdef _ResponseHead head = _ResponseHead.__new__(_ResponseHead)
    cdef const char* s = PyBytes_AS_STRING(buf)
    cdef Py_ssize_t pos = _line_end(s, start, end)  # skip the status line
    cdef Py_ssize_t line_end, name_end, value_start, value_end, run_start = pos
    cdef const char* colon
    cdef ResponseHeader kind
    cdef bint keep = True
    cdef bytes value
    head.kept = []
    while pos < end:
        line_end = _line_end(s, pos, end)
        if s[pos] == b' ' or s[pos] == b'\t':
            pass  # continuation: same decision as the line above
        else:
            colon = <const char*>memchr(s + pos, b':', line_end - pos)
            if colon == NULL:
                break  # the blank line that ends the head
            name_end = colon - s
            kind = _response_header(s + pos, name_end - pos)
            keep = kind == RS_KEEP or kind == RS_SERVER
            if kind == RS_SERVER:
                head.has_server = True
            elif kind != RS_KEEP and kind != RS_DROP and kind != RS_TRANSFER_ENCODING:
                value_start = name_end + 1
                value_end = line_end
                while value_start < value_end and (s[value_start] == b' ' or s[value_start] == b'\t'):
                    value_start += 1
                while value_end > value_start and (s[value_end - 1] == b'\n' or s[value_end - 1] == b'\r'
                                                   or s[value_end - 1] == b' ' or s[value_end - 1] == b'\t'):
                    value_end -= 1
                value = PyBytes_FromStringAndSize(s + value_start, value_end - value_start)
                if kind == RS_CONTENT_LENGTH:
                    head.content_length = value
                elif kind == RS_CONNECTION:
                    # The usual values name no other header; anything else is split into names.
                    if not (_is(value, "keep-alive", 10) or _is(value, "close", 5)):
                        _connection_names(head, value)
                elif kind == RS_VIA:
                    head.via = value
            elif kind == RS_TRANSFER_ENCODING:
                head.chunked = True
            if keep and drop is not None:
                keep = PyBytes_FromStringAndSize(s + pos, name_end - pos).lower() not in drop
        if not keep:
            if run_start < pos:
                head.kept.append(buf[run_start:pos])
            run_start = line_end
        pos = line_end
    if run_start < pos:
        head.kept.append(buf[run_start:pos])
    return head


cdef inline bytes _status_line(int status):
    line = STATUS_LINES.get(status)
    if line is None:
        return http11.status_line(status)
    return <bytes>line


cdef inline bytes _latency_lines(double proxy_seconds, double upstream_seconds):
    """Kong's latency headers, then the request id's name (its value follows in the caller's parts)."""
    cdef char latency[96]
    cdef int n = snprintf(latency, sizeof(latency),
                          "X-Kong-Upstream-Latency: %lld\r\nX-Kong-Proxy-Latency: %lld\r\nX-Kong-Request-Id: ",
                          <long long>(upstream_seconds * 1000), <long long>(proxy_seconds * 1000))
    return PyBytes_FromStringAndSize(latency, n)


cdef inline void _append_chunk(list out, bytes data) except *:
    out.append(b"%x\r\n" % PyBytes_GET_SIZE(data))
    out.append(data)
    out.append(CRLF)


# Request ids: 16 hex digits random per worker, then a 16-digit counter (32 hex, like Kong's).
cdef char _id_buf[32]
cdef unsigned long long _id_counter = 0
cdef const char* _HEX = "0123456789abcdef"


def reset_request_ids() -> None:
    """Give this process its own id prefix (called once in each worker after fork)."""
    global _id_counter
    cdef bytes prefix = os.urandom(8).hex().encode()
    cdef int i
    for i in range(16):
        _id_buf[i] = PyBytes_AS_STRING(prefix)[i]
    _id_counter = 0


cdef bytes next_request_id():
    global _id_counter
    _id_counter += 1
    cdef unsigned long long value = _id_counter
    cdef int i
    for i in range(31, 15, -1):
        _id_buf[i] = _HEX[value & 15]
        value >>= 4
    return PyBytes_FromStringAndSize(_id_buf, 32)


reset_request_ids()


# ---------------------------------------------------------------------------
# Per request

cdef class Request:
    def __cinit__(self) -> None:
        self.method = "GET"
        self.path = "/"
        self.query = None
        self.host = ""
        self.keep_alive = True
        self.http_11 = True
        self.accept = None
        self.content_length = -1
        self.body_chunks = []
        self.replayable = True
        self.request_id = b""
        self.connection_tokens = None

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


# ---------------------------------------------------------------------------
# Upstream side

cdef class UpstreamPool:
    """Idle keep-alive connections per (ip, port, TLS name, TLS context), newest first."""

    def __init__(self, loop: object, settings: object) -> None:
        self.loop = loop
        self.max_idle = settings.upstream_keepalive_pool
        self.max_requests = settings.upstream_keepalive_requests
        self.idle_timeout = settings.upstream_keepalive_timeout
        self.idle = {}
        self.opened = 0

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self.idle.values())
        return f"<UpstreamPool addresses={len(self.idle)} idle={idle} opened={self.opened}>"

    cdef UpstreamConnection acquire(self, tuple key):
        cdef list stack = self.idle.get(key)
        cdef UpstreamConnection conn
        cdef double now
        while stack:
            conn = stack.pop()
            if conn.closed:
                continue
            now = _now()
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()  # its timer has not fired yet, but it is past its idle time
                continue
            return conn
        return None

    cdef void release(self, UpstreamConnection conn, bint reusable) except *:
        if not reusable or conn.closed or conn.requests_served >= self.max_requests:
            conn.close()
            return
        cdef list stack = self.idle.get(conn.key)
        if stack is None:
            stack = self.idle[conn.key] = []
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = _now()
        conn._arm(conn.idle_since + self.idle_timeout)
        stack.append(conn)

    cdef void forget(self, UpstreamConnection conn) except *:
        cdef list stack = self.idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)

    async def connect(self, tuple key, object ssl_context, double timeout):
        # key[3]: the TLS context, so a connection verified one way is never lent to a service
        # that verifies another way (or not at all).
        ip, port, server_name = key[0], key[1], key[2]
        transport, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConnection(self, key), ip, port,
                ssl=ssl_context, server_hostname=server_name if ssl_context is not None else None,
            ),
            timeout,
        )
        self.opened += 1
        return conn

    def close_all(self) -> None:
        for stack in self.idle.values():
            for conn in stack:
                (<UpstreamConnection>conn).close()
        self.idle.clear()


cdef class UpstreamConnection:
    def __init__(self, UpstreamPool pool, tuple key) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.exchange is not None else "idle")
        return f"<UpstreamConnection {self.key[0]}:{self.key[1]} {state} served={self.requests_served}>"

    cdef void attach(self, Exchange exchange, double read_timeout, double write_timeout) except *:
        self.exchange = exchange
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)
        self.head_buf = None
        self.head_start = 0
        self.informational = False
        self.head_done = False
        self.bytes_received = 0
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.last_read = _now()
        self._arm(self.last_read + read_timeout)

    cdef void detach(self):
        # llhttp resets itself after a complete message, so the parser is kept for the next exchange;
        # after an answer that ended early (HEAD) it is dropped and rebuilt.
        self.exchange = None
        self.requests_served += 1

    cdef void _arm(self, double deadline) except *:
        # Keep an earlier timer (it re-checks when it fires); replace a later one.
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self._schedule(deadline)

    cdef void _schedule(self, double deadline) except *:
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self._check_timeout)

    cdef void close(self) except *:
        if not self.closed:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.transport is not None:
                self.transport.close()

    cdef void abort(self) except *:
        if self.transport is not None:
            self.transport.abort()
        self.close()

    cdef object hand_over(self):
        """Give the socket to a WebSocket tunnel: this object stops serving it and never goes back to the pool."""
        transport = self.transport
        self.transport = None
        self.exchange = None
        self.closed = True
        self.head_buf = None
        self.parser = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return transport

    # Protocol interface

    def connection_made(self, transport: object) -> None:
        self.transport = transport

    def data_received(self, bytes data) -> None:
        cdef Exchange exchange = self.exchange
        if exchange is None:
            # An idle keep-alive connection must stay silent; anything else makes it unusable.
            self.close()
            return
        self.bytes_received += PyBytes_GET_SIZE(data)
        self.last_read = _now()
        if not self.head_done:
            self.head_buf = data if self.head_buf is None else self.head_buf + data
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.transport is None:
                return  # a 101 handed the socket to a tunnel; llhttp stops after that head
            if isinstance(exc, httptools.HttpParserUpgrade):
                log.warning("invalid answer from upstream %s:%s: 101 to a request that asked for no upgrade",
                            self.key[0], self.key[1])
            elif isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ is not None:
                log.error("error while reading an answer from %s:%s: %r", self.key[0], self.key[1],
                          exc.__context__, exc_info=exc.__context__)
            else:
                log.warning("invalid answer from upstream %s:%s: %s", self.key[0], self.key[1], exc)
            exchange = self.exchange
            self.exchange = None
            self.abort()
            if exchange is not None:
                exchange.on_upstream_lost(self, LOST_ERROR)
            return
        exchange = self.exchange
        if exchange is not None and exchange.out:
            exchange.on_upstream_flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: object) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.forget(self)
        cdef Exchange exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.on_upstream_lost(self, LOST_EOF if exc is None else LOST_ERROR)

    def pause_writing(self) -> None:
        self.write_paused_at = _now()
        self._arm(self.write_paused_at + self.write_timeout)
        if self.exchange is not None:
            self.exchange.client._pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused_at = 0.0
        if self.exchange is not None:
            self.exchange.client._resume(PAUSE_UPSTREAM)

    # Parser callbacks

    # No on_header: a Python call per header line costs more than reading the lines from the raw
    # head afterwards (_scan_response_head), once llhttp has accepted them.

    def on_headers_complete(self) -> None:
        parser = self.parser
        cdef int status = parser.get_status_code()
        cdef bytes buf = self.head_buf
        # llhttp (strict) has just accepted a head ending in CRLF CRLF inside buf.
        cdef Py_ssize_t end = buf.find(b"\r\n\r\n", self.head_start) + 4
        if 100 <= status < 200:
            # llhttp reports this head's message complete too: not the end of an answer.
            self.informational = True
            if status == 101:
                # Switching Protocols: llhttp stops after this head; the bytes after it belong to a tunnel.
                # To a request that asked for no upgrade, data_received treats the stop as an invalid answer.
                self.head_done = True
                self.head_buf = None
                if self.exchange.req.websocket:
                    self.exchange.on_upstream_switch(self, buf, self.head_start, end)
                return
            # Interim answers (100 Continue, 103 Early Hints) are consumed; the final one follows.
            self.head_start = end
            return
        self.head_done = True
        self.exchange.on_upstream_head(self, status, buf, self.head_start, end, parser.should_keep_alive())
        self.head_buf = None

    def on_body(self, bytes body) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.exchange is not None:
            self.exchange.on_upstream_complete(self)

    # Timeouts: one lazy timer per connection, re-armed only when it fires early.

    def _check_timeout(self) -> None:
        self.timer = None
        if self.closed:
            return
        cdef double now = _now()
        cdef double deadline
        cdef Exchange exchange
        if self.exchange is None:
            deadline = self.idle_since + self.pool.idle_timeout
            if now >= deadline:
                self.close()
                return
            self._schedule(deadline)
            return
        if self.write_paused_at:
            deadline = self.write_paused_at + self.write_timeout
        else:
            deadline = self.last_read + self.read_timeout
        if now >= deadline:
            exchange = self.exchange
            self.exchange = None
            self.abort()
            exchange.on_upstream_lost(self, LOST_TIMEOUT)
            return
        self._schedule(deadline)


# ---------------------------------------------------------------------------
# Client side

cdef class ClientProtocol:
    def __init__(self, ctx: object, listener: object = None) -> None:
        self.ctx = ctx
        self.listener = listener if listener is not None else ctx.listeners[0]
        self.listen_port = self.listener.port
        self.tls = self.listener.tls
        self.loop = ctx.loop
        self.pool = ctx.pool
        self.stats = ctx.stats
        self.health = ctx.health
        self.series = ctx.series
        self.access_log = ctx.access_log
        settings = ctx.settings
        self.max_request_line = settings.max_request_line
        self.max_header_bytes = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.replay_limit = settings.replay_buffer_bytes
        self.header_timeout = settings.client_header_timeout
        self.keepalive_timeout = settings.client_keepalive_timeout
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.pending = deque()
        self.url = b""
        self.headers = []

    # Protocol interface

    def connection_made(self, transport: object) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        self.trusted = self.ctx.is_trusted(self.peer_ip)
        self.ip_bytes = self.peer_ip.encode("ascii")
        self.conn_block = b"X-Real-IP: " + self.ip_bytes + CRLF + self.listener.constant_upstream_headers
        if self.tls:
            # The handshake is over: the SNI callback has left the client's server name on the SSL object
            # (imported here: a worker without TLS listeners never loads ringgate.tls).
            from ringgate.tls import selected_sni
            self.sni = selected_sni(transport.get_extra_info("ssl_object")) or ""
        self.ctx.connections.add(self)
        self.stats.add(F_CONNECTIONS_ACCEPTED, 1)
        self.stats.add(F_CONNECTIONS_ACTIVE, 1)
        self.last_activity = _now()
        self.timer = self.loop.call_at(self.last_activity + self.header_timeout, self._on_timer)

    def connection_lost(self, exc: object) -> None:
        if self.closed:
            return
        self.closed = True
        self.ctx.connections.discard(self)
        self.stats.decr(F_CONNECTIONS_ACTIVE, 1)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        cdef Request active = self.active
        if active is not None and active.exchange is not None:
            active.exchange.on_client_lost()
        self.pending.clear()

    def data_received(self, bytes data) -> None:
        self.last_activity = _now()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0]:])
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientError):
                self._refuse(cause)
            elif cause is not None and isinstance(exc, httptools.HttpParserCallbackError):
                log.error("unexpected error while handling a request: %r", cause, exc_info=cause)
                self._refuse(ClientError(500, http11.MSG_UNEXPECTED))
            else:
                self._refuse(ClientError(400, http11.MSG_BAD_REQUEST))

    def eof_received(self) -> object:
        # The client finished sending; answers still in flight are written, then we close.
        if self.active is None and not self.pending:
            return False
        if self.parsing is not None and not self.parsing.body_done:
            return False
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        cdef Request active = self.active
        if active is not None and active.exchange is not None and active.exchange.conn is not None:
            active.exchange.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        cdef Request active = self.active
        if active is not None and active.exchange is not None and active.exchange.conn is not None:
            conn = active.exchange.conn
            if not conn.closed:
                conn.transport.resume_reading()

    # Parser callbacks

    def on_url(self, bytes url) -> None:
        if not self.in_headers:
            # First callback of a request (llhttp's message begin costs a Python call we can skip).
            self.in_headers = True
            self.headers = []
            self.header_bytes = 0
            self.header_started = self.last_activity
            self.url = url
        else:
            self.url += url
        if PyBytes_GET_SIZE(self.url) > self.max_request_line:
            raise ClientError(414, "Request-URI Too Large")

    def on_header(self, bytes name, bytes value) -> None:
        self.header_bytes += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
        self.headers.append((name, value))
        if self.header_bytes > self.max_header_bytes or len(self.headers) > self.max_headers:
            raise ClientError(431, "Request Header Fields Too Large")

    def on_headers_complete(self) -> None:
        self.in_headers = False
        cdef Request req = self._build_request()
        self.parsing = req
        if self.active is None and not self.pending:
            self._begin(req)
        else:
            self.pending.append(req)
            self._pause(PAUSE_PIPELINE)
            self._start_next()

    def on_body(self, bytes body) -> None:
        cdef Request req = self.parsing
        if req is None:
            return
        req.body_bytes += PyBytes_GET_SIZE(body)
        cdef Exchange exchange = req.exchange
        if exchange is not None and exchange.streaming:
            exchange.forward_body(body)
            return
        req.body_chunks.append(body)
        if req.body_bytes > self.replay_limit:
            # Nobody is reading this body yet: stop taking more until an upstream connection is ready.
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        cdef Request req = self.parsing
        if req is None:
            return
        self.parsing = None
        req.body_done = True
        if req.exchange is not None:
            req.exchange.on_client_body_done()

    # Request assembly and dispatch

    cdef Request _build_request(self):
        cdef Request req = Request()
        cdef bytes name, value, url
        cdef object host = None
        cdef bytes upgrade = None
        req.t_start = self.last_activity
        req.request_id = next_request_id()
        parser = self.parser
        method = parser.get_method()
        method_name = _METHOD_NAMES.get(method)
        req.method = method_name if method_name is not None else method.decode("ascii")
        req.keep_alive = parser.should_keep_alive()
        cdef bint connection_header = False
        url = self.url
        if PyBytes_GET_SIZE(url) == 0 or PyBytes_AS_STRING(url)[0] != b'/':
            url = _origin_form(url)
        path, sep, query = url.partition(b"?")
        req.raw_path = path
        req.path = path.decode("utf-8", "surrogateescape")
        if sep:
            req.query = query
        req.headers = self.headers
        for name, value in self.headers:
            if PyBytes_GET_SIZE(name) > 17:
                continue
            if _is(name, "host", 4):
                if host is not None:
                    raise ClientError(400, "Bad request: duplicate Host header")
                host = value
            elif _is(name, "content-length", 14):
                req.content_length = int(value)
            elif _is(name, "transfer-encoding", 17):
                req.chunked = True
            elif _is(name, "accept", 6):
                req.accept = value
            elif _is(name, "proxy-connection", 16):
                connection_header = True  # llhttp reads it like Connection for keep-alive
            elif _is(name, "expect", 6):
                req.expect_continue = value.lower() == b"100-continue"
            elif _is(name, "upgrade", 7):
                upgrade = value
            elif _is(name, "connection", 10):
                connection_header = True
                if _is(value, "keep-alive", 10) or _is(value, "close", 5):
                    continue  # the usual values name no other header
                tokens = frozenset(t.strip().lower() for t in value.split(b","))
                req.connection_tokens = tokens if req.connection_tokens is None else req.connection_tokens | tokens
        # Without a Connection header llhttp keeps HTTP/1.1 alive and closes HTTP/1.0, so the version
        # is known without asking the parser to format it.
        req.http_11 = req.keep_alive if not connection_header else parser.get_http_version() == "1.1"
        if host is None:
            if req.http_11:
                raise ClientError(400, "Bad request: missing Host header")
            host = b""
        req.host = (<bytes>host).decode("latin-1")
        if upgrade is not None and req.connection_tokens is not None and b"upgrade" in req.connection_tokens:
            # llhttp stops after this request: nothing after it on the connection is HTTP. A WebSocket
            # handshake becomes a tunnel on a 101; anything else is served once, then the connection closes.
            req.keep_alive = False
            req.websocket = (req.method == "GET" and not req.chunked and req.content_length <= 0
                             and upgrade.strip().lower() == b"websocket")
        if self.ctx.draining:
            req.keep_alive = False
        return req

    cdef void _begin(self, Request req) except *:
        self.active = req
        cdef Exchange exchange
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
                    self.send_error(req, 500, http11.MSG_UNEXPECTED, True)

    cdef void _dispatch(self, Request req) except *:
        ctx = self.ctx
        runtime = ctx.runtime
        cdef Router router = runtime.router
        cdef dict header_values = None
        cdef frozenset wanted = runtime.header_names
        cdef RouteMatch match
        if wanted:
            header_values = {}
            for name, value in req.headers:
                lname = name.decode("latin-1").lower()
                if lname in wanted and lname not in header_values:
                    header_values[lname] = value.decode("latin-1")
        try:
            match = router.match(req.method, req.host, req.path, header_values, self.listen_port, self.sni)
        except ValueError:
            self.send_error(req, 400, http11.MSG_BAD_REQUEST)
            return
        if match is None:
            self.send_error(req, 404, http11.MSG_NO_ROUTE)
            return
        route = match.payload
        if route.https_only and not _forwarded_https(self, req):
            _require_https(self, req, route)
            return
        service = route.service
        if service is None:
            self.send_error(req, 503, http11.MSG_NO_SERVICE)
            return
        chain = route.plugins
        pctx = None
        if chain is not None and not chain.lazy:
            pctx = _plugin_context(self, req, match, route, service)
            req.plugin_ctx = pctx
            req.plugin_chain = chain
            if plugin_chain.run_access(chain, pctx):
                self.plugin_exit(req)
                return
        cdef Exchange exchange = Exchange.__new__(Exchange)
        exchange.init(self, req, match, route, service)
        req.exchange = exchange
        if chain is not None:
            exchange.chain = chain
            exchange.primary_timeout = chain.primary_timeout
            exchange.no_timeout_retry = chain.no_timeout_retry
        if pctx is not None:
            exchange.pctx = pctx
            if pctx.primary_timeout:
                exchange.primary_timeout = pctx.primary_timeout
            exchange.no_timeout_retry = exchange.no_timeout_retry or pctx.no_timeout_retry
            if pctx.fallback_step is not None:
                # A plugin sent the request past the primary (e.g. an open circuit breaker).
                step, pctx.fallback_step = pctx.fallback_step, None
                exchange._build_head()
                exchange.switch_to(step.service, step.path)
                return
        exchange.start()

    cdef void _start_next(self) except *:
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

    cdef void request_done(self, Request req, int status, long long bytes_out, bint keep_alive) except *:
        """Called once per request, by the exchange or the error path, when its answer is fully written."""
        self.stats.record_response(status, req.body_bytes, bytes_out)
        self.requests_served += 1
        if self.series is not None:
            self.series.record(req, status, bytes_out)
        if self.access_log is not None:
            _access_log(self, req, status, bytes_out)
        if req.plugin_ctx is not None:
            _plugin_log(req, status, bytes_out)
        # Break the request <-> exchange cycle so both are freed by reference counting, not the GC.
        req.exchange = None
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
        if self.parsing is req and not req.body_done and req.has_body:
            # The answer went out before the request body was read (an early error): the rest of the
            # body cannot be told apart from a next request without reading it, so close.
            self._close()
            return
        self._resume(PAUSE_BUFFER)

    cdef void send_error(self, Request req, int status, str message, bint close=False) except *:
        cdef bint keep = (req.keep_alive and not close and not self.ctx.draining
                          and (req.body_done or not req.has_body))
        data = http11.error_response(status, message, req.request_id.decode("ascii"), req.accept, not keep)
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        self.request_done(req, status, len(data), keep)

    cdef void plugin_exit(self, Request req) except *:
        """Send the answer a plugin gave with ctx.exit() (after its header_filter phase)."""
        pctx = req.plugin_ctx
        status, body, headers = pctx.exit_answer
        plugin_chain.run_header_filter(req.plugin_chain, pctx, status, headers)
        headers = plugin_chain.apply_header_ops(headers, pctx.response_headers)
        cdef bint keep = (req.keep_alive and not self.ctx.draining and (req.body_done or not req.has_body))
        data = http11.plugin_response(status, body, headers, req.request_id, req.method == "HEAD", not keep)
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        self.request_done(req, status, len(data), keep)

    cdef void _refuse(self, object error) except *:
        """A protocol-level refusal: answer after the requests already read, then close."""
        if self.closed:
            return
        cdef Request broken = self.parsing
        cdef Exchange exchange
        self.parsing = None
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
        data = http11.error_response(error.status, error.message, next_request_id().decode("ascii"), None, True)
        if self.transport is not None:
            self.transport.write(data)
        self.stats.record_response(error.status, 0, len(data))
        self._close()

    cdef void _upgraded(self, bytes rest) except *:
        """llhttp stopped after an upgrade head: from here on the client sends no HTTP.

        A stand-in parser keeps the bytes for a WebSocket tunnel (frames the client sent right after its
        head); reading pauses until the handshake is answered. Without a tunnel they are dropped when the
        connection closes after the answer.
        """
        buffer = _UpgradeBuffer()
        if rest:
            buffer.chunks.append(rest)
        self.parser = buffer
        self.upgraded = buffer
        self._pause(PAUSE_TUNNEL)
        cdef Request req = self.pending[len(self.pending) - 1] if self.pending else self.active
        if req is not None:
            req.keep_alive = False
        else:
            self._close()  # already answered: the connection cannot carry another request

    # Flow control

    cdef void _pause(self, int reason) except *:
        if not self.read_pause and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_pause |= reason

    cdef void _resume(self, int reason) except *:
        if not self.read_pause & reason:
            return
        self.read_pause &= ~reason
        if not self.read_pause and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # Writing and closing

    cdef void write(self, bytes data) except *:
        if not self.closed:
            self.transport.write(data)

    cdef void writelines(self, list parts) except *:
        if not self.closed:
            self.transport.writelines(parts)

    cdef void abort(self) except *:
        """Cut the connection so the client sees an incomplete answer (no clean end of body)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    cdef void _close(self) except *:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def close_if_idle(self) -> bool:
        if self.active is None and not self.pending and not self.in_headers:
            self._close()
            return True
        return False

    def abort_connection(self) -> None:
        self.abort()

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        cdef double now = _now()
        cdef double deadline
        if self.active is not None:
            deadline = now + self.keepalive_timeout  # upstream timeouts govern this request
        elif self.in_headers:
            deadline = self.header_started + self.header_timeout
        elif self.requests_served == 0:
            deadline = self.last_activity + self.header_timeout
        else:
            deadline = self.last_activity + self.keepalive_timeout
        if now >= deadline:
            self._close()
            return
        self.timer = self.loop.call_at(deadline, self._on_timer)


cdef str _strip_port(str host):
    cdef Py_ssize_t colon = host.rfind(":")
    if colon >= 0 and host[colon + 1:].isdigit():
        host = host[:colon]
    return host.strip("[]")


cdef bint _forwarded_https(ClientProtocol client, Request req) except -1:
    """Kong's forwarded scheme is https: X-Forwarded-Proto from a trusted peer, else the connection's."""
    cdef bytes name, value
    if client.trusted:
        for name, value in req.headers:
            if _is(name, "x-forwarded-proto", 17):
                return value.strip().lower() == b"https"
    return client.tls


cdef bytes _forwarded_host(ClientProtocol client, Request req):
    """Kong's forwarded host: X-Forwarded-Host from a trusted peer, else nginx's $host (no port, lowercased)."""
    cdef bytes name, value
    if client.trusted:
        for name, value in req.headers:
            if _is(name, "x-forwarded-host", 16):
                return value.strip()
    cdef str host = req.host
    cdef Py_ssize_t colon = host.rfind(":")
    if colon >= 0 and host[colon + 1:].isdigit() and host.find("]") < colon:
        host = host[:colon]
    return host.lower().encode("latin-1")


cdef tuple _UPGRADE_TO_TLS = ((b"Connection", b"Upgrade"), (b"Upgrade", b"TLS/1.2, HTTP/1.1"))


cdef void _require_https(ClientProtocol client, Request req, object route) except *:
    """Kong's answer to a plain-http request on an https-only route: 426, or a redirect to https."""
    cdef int status = route.https_redirect_status_code
    cdef bint keep = (req.keep_alive and not client.ctx.draining and (req.body_done or not req.has_body))
    cdef bytes data, uri
    if status == 426:
        data = http11.error_response(426, "Please use HTTPS protocol", req.request_id.decode("ascii"), req.accept,
                                     not keep, _UPGRADE_TO_TLS)
    else:
        uri = req.raw_path if req.query is None else req.raw_path + b"?" + req.query
        data = b"".join([
            _status_line(status),
            b"Location: https://", _forwarded_host(client, req), uri, CRLF,
            b"Content-Length: 0\r\nServer: ", SERVER_TOKEN, CRLF,
            b"X-Kong-Request-Id: ", req.request_id, CRLF,
            b"" if keep else b"Connection: close\r\n",
            CRLF,
        ])
    if client.transport is not None and not client.closed:
        client.transport.write(data)
    client.request_done(req, status, len(data), keep)


cdef bytes _origin_form(bytes url):
    # absolute-form (RFC 9112 3.2.2): keep the path; the Host header stays authoritative.
    if url == b"*":
        raise ClientError(400, "Bad request: asterisk-form is only for OPTIONS on a server")
    cdef Py_ssize_t scheme_end = url.find(b"://")
    if scheme_end < 0:
        raise ClientError(400, "Bad request: invalid request target")
    cdef Py_ssize_t slash = url.find(b"/", scheme_end + 3)
    return url[slash:] if slash >= 0 else b"/"


# ---------------------------------------------------------------------------
# Labelled counters in shared memory (the stats socket and /metrics read them)

cdef class RouteSeries:
    """One route's series in this worker's region, resolved once: the vector address and the
    (status, source) count addresses, so recording a request is a few adds, not lookups."""


cdef class SeriesRecorder:
    def __init__(self, SeriesTable table, int slot) -> None:
        self.table = table
        self.slot = slot
        self.routes = {}
        self.codes = {}
        self.targets = {}
        self.unrouted = None

    cdef RouteSeries _route_series(self, str service_label, str route_label):
        cdef RouteSeries series = RouteSeries.__new__(RouteSeries)
        index = self.table.series_index(self.slot, route_key(service_label, route_label), KIND_ROUTE)
        series.vec = self.table.vector(self.slot, index)
        series.codes = {}
        series.service_label = service_label
        series.route_label = route_label
        return series

    cdef void record(self, Request req, int status, long long bytes_out) except *:
        cdef Exchange exchange = req.exchange
        cdef double total = _now() - req.t_start
        cdef double upstream_time = 0.0
        cdef bint answered = False
        cdef RouteSeries series
        if exchange is not None:
            route = exchange.route
            cached = route.series
            if cached is None:
                owner = route.service  # the route's own service, even when a fallback step answered
                cached = self._route_series(owner.name or owner.host, route.name or route.id)
                route.series = cached
            series = <RouteSeries>cached
            if exchange.t_head > 0:
                upstream_time = exchange.t_head - exchange.t_sent
                answered = exchange.status == status
        else:
            if self.unrouted is None:
                self.unrouted = self._route_series("", "")
            series = <RouteSeries>self.unrouted
        cdef uint64_t* vec = series.vec
        cdef int klass = status // 100
        series_add(vec, R_REQUESTS, 1)
        if 1 <= klass <= 5:
            series_add(vec, R_STATUS_1XX + klass - 1, 1)
        series_add(vec, R_BYTES_IN, <uint64_t>req.body_bytes)
        series_add(vec, R_BYTES_OUT, <uint64_t>bytes_out)
        series_observe(vec, R_REQUEST_LATENCY, <uint64_t>(total * 1e6))
        if answered:
            series_observe(vec, R_UPSTREAM_LATENCY, <uint64_t>(upstream_time * 1e6))
        series_observe(vec, R_KONG_LATENCY, <uint64_t>(max(0.0, total - upstream_time) * 1e6))
        code = status * 2 + answered
        address = series.codes.get(code)
        if address is None:
            index = self.table.series_index(self.slot, code_key(series.service_label, series.route_label, status,
                                                                "service" if answered else "kong"), KIND_CODE)
            address = <size_t>self.table.vector(self.slot, index)
            series.codes[code] = address
        series_add(<uint64_t*><size_t>address, C_REQUESTS, 1)
        if exchange is not None and exchange.upstream is not None and exchange.target >= 0:
            vec = self._target_vector(exchange.upstream, exchange.target)
            series_add(vec, T_REQUESTS, 1)
            if answered:
                series_add(vec, T_LATENCY_SUM_US, <uint64_t>(upstream_time * 1e6))
                series_add(vec, T_LATENCY_COUNT, 1)
                if exchange.passive_status is not None and 0 <= status < 600 and \
                        (<const unsigned char*>PyBytes_AS_STRING(exchange.passive_status))[status] == 2:
                    series_add(vec, T_STATUS_FAILURES, 1)

    cdef void target_failure(self, object upstream, int index, bint timeout) except *:
        series_add(self._target_vector(upstream, index), T_TIMEOUTS if timeout else T_CONNECT_FAILURES, 1)

    cdef uint64_t* _target_vector(self, object upstream, int target) except NULL:
        cdef list addresses = upstream.series_targets
        if addresses is None:
            # Resolved once per upstream and generation: one vector address per target.
            addresses = []
            for host, port, _ in upstream.targets:
                index = self.table.series_index(self.slot, target_key(upstream.name, f"{host}:{port}"), KIND_TARGET)
                addresses.append(<size_t>self.table.vector(self.slot, index))
            upstream.series_targets = addresses
        return <uint64_t*><size_t>addresses[target]


# ---------------------------------------------------------------------------
# Node-wide target health, seen from one worker

cdef class HealthSync:
    def __init__(self, HealthTable table, ctx: object) -> None:
        self.table = table
        self.ctx = ctx
        self.seen = table.change_count()

    cdef void check(self) except *:
        cdef unsigned long long changes = self.table.change_count()
        if changes == self.seen:
            return
        # Some target changed state somewhere on the node: re-read the states for this worker's balancers.
        self.seen = changes
        for upstream in self.ctx.runtime.checked:
            upstream.sync_health(self.table)

    cdef int try_trial(self, object upstream, object excluded) except -2:
        """Take the single trial of an ejected target whose time is up; its index, or -1."""
        cdef unsigned long long now = monotonic_ms()
        if now < <unsigned long long>upstream.next_trial_ms:
            return -1
        cdef HealthPolicy policy = upstream.health_policy
        cdef int index = 0, slot, state
        cdef unsigned long long nearest = 0, deadline
        for slot in upstream.health_slots:
            if slot >= 0 and (excluded is None or index not in excluded) and upstream.targets[index][2] > 0:
                state = self.table.state_of(slot)
                if state == S_EJECTED or state == S_TRIAL:
                    deadline = self.table.deadline(slot)
                    if deadline <= now:
                        if self.table.apply(slot, health_rules.Event.TRIAL_DUE, policy, now) >= 0:
                            _log_transition(upstream, index, health_rules.Event.TRIAL_DUE, self.table)
                            return index
                    elif nearest == 0 or deadline < nearest:
                        nearest = deadline
            index += 1
        upstream.next_trial_ms = nearest
        return -1

    cdef void report(self, object upstream, int index, int outcome) except *:
        """One passive result for a target (outcome -1: a status neither list names)."""
        cdef int slot = upstream.health_slots[index]
        if slot < 0:
            return
        if outcome < 0:
            if self.table.state_of(slot) != S_TRIAL:
                return
            outcome = OUTCOME_SUCCESS  # the trial request got an answer that is not a failure
        cdef int event = self.table.report(slot, outcome, False, upstream.health_policy, monotonic_ms())
        if event >= 0:
            _log_transition(upstream, index, event, self.table, _OUTCOME_NAMES[outcome])


_OUTCOME_NAMES = ("success", "http failure", "tcp failure", "timeout")


def _log_transition(upstream: object, index: int, event: int, table: HealthTable, cause: str = "") -> None:
    """Logged by the one process that won the transition."""
    host, port, _ = upstream.targets[index]
    block = table.read(upstream.health_slots[index])
    state = block["state"].name
    if event == health_rules.Event.TRIAL_DUE:
        log.info("upstream %s: target %s:%d: ejection over, sending one trial request", upstream.name, host, port)
    elif block["state"] == health_rules.State.EJECTED:
        hold = max(0, block["deadline_ms"] - monotonic_ms()) / 1000
        log.warning("upstream %s: target %s:%d ejected for %.1fs after a passive %s (ejection %d in a row)",
                    upstream.name, host, port, hold, cause, block["ejections"])
    else:
        log.warning("upstream %s: target %s:%d is now %s (passive checks: %s, after a %s)", upstream.name, host,
                    port, state, health_rules.Event(event).name.lower().replace("_", " "), cause)


# ---------------------------------------------------------------------------
# One request's trip to the upstream

cdef class Exchange:
    cdef init(self, ClientProtocol client, Request req, RouteMatch match, object route, object service):
        self.client = client
        self.req = req
        self.match = match
        self.route = route
        self.service = service
        self.upstream = service.upstream
        upstream = self.upstream
        if upstream is not None:
            self.balancer = upstream.balancer
            self.health_checked = len(upstream.health_slots) > 0
            self.passive_status = upstream.passive_status
        self.ctx = client.ctx
        self.loop = client.loop
        self.tries_left = service.retries
        self.target = -1
        self.client_keep_alive = req.keep_alive
        self.out = []

    def __repr__(self) -> str:
        return (f"<Exchange {self.req.method} {self.req.path} target={self.target_host}:{self.target_port} "
                f"tries_left={self.tries_left} started={self.response_started} done={self.done}>")

    cdef void start(self) except *:
        upstream = self.upstream
        if upstream is not None and upstream.hash_on != "none":
            self.hash_value = _hash_input(self, upstream)
        self._build_head()
        cdef Request req = self.req
        if req.expect_continue and not req.body_done:
            self.client.write(http11.CONTINUE_100)
        self._attempt()

    cdef void _build_head(self) except *:
        cdef Request req = self.req
        cdef ClientProtocol client = self.client
        cdef RouteMatch match = self.match
        cdef str upstream_path = match.upstream_path
        cdef bytes path, name, value
        cdef bytes xff = None, via = None
        cdef dict forwarded = None
        cdef list parts = []
        cdef frozenset drop_named = req.connection_tokens
        cdef RequestHeader kind
        cdef bint trusted = client.trusted
        if upstream_path.isascii():
            path = upstream_path.encode("ascii")
        else:
            path = upstream_path.encode("utf-8", "surrogateescape")
        if req.query is not None:
            path += b"?" + req.query
        self.head_line = req.method.encode("ascii") + b" " + path + b" HTTP/1.1\r\n"
        cdef set replaced = None
        cdef list added = None
        pctx = self.pctx
        if pctx is not None and pctx.upstream_headers:
            replaced, added = _upstream_header_ops(pctx.upstream_headers)
        for name, value in req.headers:
            if replaced is not None and name.lower() in replaced:
                continue
            kind = _request_header(name)
            if kind != RQ_KEEP:
                if kind == RQ_XFF:
                    xff = value if xff is None else xff + b", " + value
                elif kind == RQ_VIA:
                    via = value
                elif kind == RQ_TE:
                    if b"trailers" in value.lower():
                        parts.append(b"TE: trailers\r\n")
                elif kind == RQ_FORWARDED and trusted:
                    if forwarded is None:
                        forwarded = {}
                    forwarded[name.lower()] = value
                continue
            if drop_named is not None and name.lower() in drop_named:
                continue
            parts.append(name)
            parts.append(COLON_SP)
            parts.append(value)
            parts.append(CRLF)
        parts.append(b"X-Forwarded-For: ")
        if xff is not None:
            parts.append(xff)
            parts.append(b", ")
        parts.append(client.ip_bytes)
        parts.append(CRLF)
        cdef str host = req.host
        cdef Py_ssize_t colon
        if host != client.last_host:
            # Keep-alive clients send the same Host every time: its header block is built once.
            client.last_host = host
            colon = host.rfind(":")
            if colon >= 0 and host[colon + 1:].isdigit():
                host = host[:colon]
            client.last_host_bytes = host.lower().encode("latin-1")
            client.forwarded_block = ((b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: " if client.tls
                                       else b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: ")
                                      + client.last_host_bytes + b"\r\nX-Forwarded-Path: ")
        prefix = None
        if forwarded is None:
            parts += [client.forwarded_block, req.raw_path, CRLF]
        else:
            parts += [
                b"X-Forwarded-Proto: ", forwarded.get(b"x-forwarded-proto", b"https" if client.tls else b"http"), CRLF,
                b"X-Forwarded-Host: ", forwarded.get(b"x-forwarded-host", client.last_host_bytes), CRLF,
                b"X-Forwarded-Path: ", forwarded.get(b"x-forwarded-path", req.raw_path), CRLF,
            ]
            if b"x-forwarded-port" in forwarded:
                parts += [b"X-Forwarded-Port: ", forwarded[b"x-forwarded-port"], CRLF]
            prefix = forwarded.get(b"x-forwarded-prefix")
        if prefix is None and match.stripped_prefix:
            prefix = match.stripped_prefix.encode("utf-8", "surrogateescape")
        if prefix:
            parts += [b"X-Forwarded-Prefix: ", prefix, CRLF]
        if via is None:
            parts.append(VIA_LINE)
        else:
            parts += [b"Via: ", via, b", ", VIA_TOKEN, CRLF]
        parts += [b"X-Kong-Request-Id: ", req.request_id, CRLF]
        cdef bytes conn_block = client.conn_block
        if forwarded is not None and b"x-forwarded-port" in forwarded:
            conn_block = conn_block.replace(client.listener.forwarded_port_line, b"")
        if req.websocket:
            conn_block = conn_block.replace(KEEP_ALIVE_LINE, WEBSOCKET_LINES)
        parts.append(conn_block)
        if added:
            parts.extend(added)
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length >= 0:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        parts.append(CRLF)
        self.head_rest = b"".join(parts)

    cdef void _attempt(self) except *:
        service = self.service
        cdef Request req = self.req
        cdef int index
        cdef UpstreamConnection conn
        if self.balancer is not None:
            index = -1
            if self.health_checked:
                self.client.health.check()
                if self.upstream.next_trial_ms:
                    index = self.client.health.try_trial(self.upstream, self.excluded)
            if index >= 0:
                self.picked = False  # the trial target is outside the balancer: nothing to release
            else:
                index = self.balancer.pick(self.excluded, self.hash_value)
                if index < 0:
                    self._fail(503, http11.MSG_NO_PEER)
                    return
                self.picked = True
            self.target = index
            target = self.upstream.targets[index]
            self.target_host = target[0]
            self.target_port = target[1]
            ip = self.upstream.target_ips[index]
            self.host_line = service.target_host_lines[index]
            self.sni = service.target_snis[index]
        else:
            self.target_host = service.host
            self.target_port = service.port
            ip = service.ip
            self.host_line = service.host_line
            self.sni = service.sni
        if self.route.preserve_host and req.host and not self.in_fallback:
            self.host_line = b"Host: " + req.host.encode("latin-1") + CRLF
            if self.sni is not None:
                self.sni = _strip_port(req.host)
        if ip is not None and not req.websocket:
            conn = self.client.pool.acquire(
                (ip, self.target_port, self.sni, None if self.sni is None else service.ssl_context))
            if conn is not None:
                self._send(conn, True)
                return
        # A WebSocket handshake always goes on a fresh connection (it may become a tunnel).
        self.loop.create_task(_connect(self, ip is not None or req.websocket))

    cdef void _send(self, UpstreamConnection conn, bint reused) except *:
        self.conn = conn
        self.reused = reused
        service = self.service
        cdef double read_timeout = service.read_timeout
        if self.primary_timeout > 0 and not self.in_fallback:
            read_timeout = min(read_timeout, self.primary_timeout)
        conn.attach(self, read_timeout, service.write_timeout)
        cdef Request req = self.req
        cdef list parts = [self.head_line, self.host_line, self.head_rest]
        cdef bytes chunk
        if req.body_chunks:
            if req.chunked:
                for chunk in req.body_chunks:
                    _append_chunk(parts, chunk)
            else:
                parts.extend(req.body_chunks)
            if not req.replayable:
                req.body_chunks = []
        if req.body_done and req.chunked:
            parts.append(CHUNK_END)
        self.t_sent = _now()
        conn.transport.write(b"".join(parts))
        self.streaming = True
        if req.body_bytes > self.client.replay_limit:
            req.replayable = False
        self.client._resume(PAUSE_BUFFER)
        if self.client.write_paused:
            conn.transport.pause_reading()

    cdef void forward_body(self, bytes data) except *:
        """A request body chunk arrived while an upstream connection is taking the body."""
        cdef Request req = self.req
        cdef UpstreamConnection conn = self.conn
        if req.replayable:
            if req.body_bytes <= self.client.replay_limit:
                req.body_chunks.append(data)
            else:
                req.replayable = False
                req.body_chunks = []
        if conn is None or self.done:
            return
        if req.chunked:
            parts = []
            _append_chunk(parts, data)
            conn.transport.writelines(parts)
        else:
            conn.transport.write(data)

    cdef void on_client_body_done(self) except *:
        if self.streaming and self.conn is not None and self.req.chunked and not self.done:
            self.conn.transport.write(CHUNK_END)

    cdef void _attempt_failed(self, bint timeout, bint sent) except *:
        """One try failed before any byte of the answer reached the client: retry or answer with an error."""
        self.client.stats.add(F_UPSTREAM_TIMEOUTS if timeout else F_UPSTREAM_CONNECT_ERRORS, 1)
        if self.passive_status is not None and self.target >= 0:
            self.client.health.report(self.upstream, self.target, OUTCOME_TIMEOUT if timeout else OUTCOME_TCP_FAILURE)
        if self.client.series is not None and self.upstream is not None and self.target >= 0:
            self.client.series.target_failure(self.upstream, self.target, timeout)
        self._end_target()
        cdef Request req = self.req
        cdef bint retryable = self.tries_left > 0 and (
            not sent or (req.method in IDEMPOTENT and req.replayable)
        )
        if timeout and self.no_timeout_retry and not self.in_fallback:
            retryable = False
        if retryable:
            self.tries_left -= 1
            self.client.stats.add(F_RETRIES, 1)
            if self.target >= 0:
                if self.excluded is None:
                    self.excluded = set()
                self.excluded.add(self.target)
            self.streaming = False
            self._attempt()
            return
        if self.chain is not None and self.chain.response:
            pctx = self._context()
            pctx.failure = "timeout" if timeout else "connect"
            pctx.request_sent = sent
            if self._plugins_take_over(504 if timeout else 502, []):
                return
        if timeout:
            self._fail(504, http11.MSG_TIMEOUT)
        else:
            self._fail(502, http11.MSG_BAD_GATEWAY)

    cdef bint _plugins_take_over(self, int status, list headers) except -1:
        """Response phase: True when a plugin replaced the answer (its own, or a fallback step's)."""
        pctx = self.pctx
        cdef Request req = self.req
        pctx.upstream_status = status if pctx.failure is None else 0
        pctx.replayable = req.replayable and (req.body_done or not req.has_body)
        pctx.body_bytes = req.body_bytes
        if not plugin_chain.run_response(self.chain, pctx, status, headers):
            return False
        self._replace_answer()
        return True

    cdef object _context(self):
        """The plugins' Context, made now if the chain is lazy and this is the first time it is needed."""
        pctx = self.pctx
        if pctx is None:
            pctx = _plugin_context(self.client, self.req, self.match, self.route, self.route.service)
            self.pctx = pctx
            self.req.plugin_ctx = pctx
            self.req.plugin_chain = self.chain
        return pctx

    cdef void _replace_answer(self) except *:
        self._end_target()
        pctx = self.pctx
        pctx.failure = None
        if pctx.fallback_step is not None:
            step, pctx.fallback_step = pctx.fallback_step, None
            self.switch_to(step.service, step.path)
            return
        self.done = True
        self.client.plugin_exit(self.req)

    cdef void switch_to(self, object dest, object path) except *:
        """Send the request to another destination (a fallback step): a fresh set of tries there."""
        cdef Request req = self.req
        self.in_fallback = True
        self.pctx.in_fallback = True
        self.service = dest
        upstream = dest.upstream
        self.upstream = upstream
        self.balancer = upstream.balancer if upstream is not None else None
        self.health_checked = upstream is not None and len(upstream.health_slots) > 0
        self.passive_status = upstream.passive_status if upstream is not None else None
        self.hash_value = None
        self.tries_left = dest.retries
        self.excluded = None
        self.target = -1
        self.picked = False
        self.stale_retry_done = False
        self.streaming = False
        self.status = 0
        self.chunked_out = False
        self.close_delimited = False
        self.upstream_keep_alive = False
        self.out = []
        self.bytes_out = 0
        if getattr(dest, "minimal_headers", False):
            # preserve_original_headers off: the backup gets the body's headers and the gateway's own.
            saved = req.headers
            req.headers = [(n, v) for n, v in saved if n.lower() in _BACKUP_KEPT_HEADERS]
            self._build_head()
            req.headers = saved
        if path is not None:
            raw = path.encode("utf-8", "surrogateescape")
            if req.query is not None:
                raw += b"?" + req.query
            self.head_line = req.method.encode("ascii") + b" " + raw + b" HTTP/1.1\r\n"
        self._attempt()

    cdef void _release_target(self) except *:
        # Exactly one release per pick (least-connections counts in-flight requests).
        if self.picked:
            self.picked = False
            self.balancer.release(self.target)

    cdef void _end_target(self) except *:
        self._release_target()
        cdef UpstreamConnection conn = self.conn
        if conn is not None:
            self.conn = None
            conn.detach()
            conn.close()

    # Upstream callbacks

    cdef void on_upstream_head(self, UpstreamConnection conn, int status, bytes buf, Py_ssize_t start,
                               Py_ssize_t end, bint keep_alive) except *:
        if self.done:
            return
        self.t_head = _now()
        self.status = status
        cdef int verdict
        if self.passive_status is not None and self.target >= 0 and 0 <= status < 600:
            verdict = (<const unsigned char*>PyBytes_AS_STRING(self.passive_status))[status]
            self.client.health.report(self.upstream, self.target,
                                      -1 if verdict == 0 else OUTCOME_SUCCESS if verdict == 1 else OUTCOME_HTTP_FAILURE)
        self.upstream_keep_alive = keep_alive
        cdef Request req = self.req
        cdef list parts = self.out
        cdef list plugin_headers = None
        chain = self.chain
        if chain is not None and (self.pctx is not None or (
                0 <= status < 600 and (<const unsigned char*>PyBytes_AS_STRING(chain.response_gate))[status])):
            # A lazy chain acts only on the statuses its plugins named: other answers skip all of this.
            plugin_headers = _head_pairs(buf, start, end) if chain.reads_response_headers else []
            if chain.response:
                pctx = self._context()
                pctx.failure = None
                pctx.request_sent = True
                if self._plugins_take_over(status, plugin_headers):
                    return
        cdef _ResponseHead head = _scan_response_head(buf, start, end, None)
        if head.connection_named is not None:
            head = _scan_response_head(buf, start, end, head.connection_named)
        if chain is not None and chain.header_filter and self.pctx is not None:
            self.pctx.upstream_status = status
            plugin_chain.run_header_filter(chain, self.pctx, status, plugin_headers)
            if self.pctx.response_headers:
                head.kept = _apply_response_ops(head.kept, self.pctx.response_headers)
        cdef bytes content_length = head.content_length
        cdef bint chunked_up = head.chunked
        cdef bytes via = head.via
        parts.append(_status_line(status))
        parts.extend(head.kept)
        cdef bint no_body = req.method == "HEAD" or status == 204 or status == 304 or status < 200
        if content_length is not None and not chunked_up:
            parts += [b"Content-Length: ", content_length, CRLF]
        elif no_body:
            pass
        elif req.http_11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked_out = True
            self.close_delimited = not chunked_up
        else:
            self.client_keep_alive = False
            self.close_delimited = not chunked_up
        if self.close_delimited:
            self.upstream_keep_alive = False
        parts += [b"Via: ", (via + b", " + VIA_TOKEN) if via is not None else VIA_TOKEN, CRLF]
        if not head.has_server:
            parts += [b"Server: ", SERVER_TOKEN, CRLF]
        parts.append(_latency_lines(self.t_sent - req.t_start, self.t_head - self.t_sent))
        parts.append(req.request_id)
        parts.append(CRLF)
        if self.set_cookie is not None:
            parts += [b"Set-Cookie: ", self.set_cookie, CRLF]
        if not self.client_keep_alive or not req.keep_alive or self.ctx.draining:
            self.client_keep_alive = False
            parts.append(b"Connection: close\r\n")
        elif not req.http_11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(CRLF)
        joined = b"".join(parts)
        parts.clear()
        parts.append(joined)
        self.response_started = True
        if req.method == "HEAD":
            # llhttp would wait for the body a HEAD answer announces; the answer is complete here,
            # and the parser, mid-message, cannot serve the next exchange.
            conn.parser = None
            self.on_upstream_complete(conn)

    cdef void on_upstream_switch(self, UpstreamConnection conn, bytes buf, Py_ssize_t start,
                                 Py_ssize_t end) except *:
        """The upstream accepted the WebSocket handshake (101): its head goes to the client, then both
        connections become a byte tunnel. Plugins saw the request (access) and see this head
        (header_filter); the tunnel's bytes go past them, and their log phase runs when it closes."""
        if self.done:
            return
        cdef Request req = self.req
        cdef ClientProtocol client = self.client
        self.t_head = _now()
        self.status = 101
        cdef int verdict
        if self.passive_status is not None and self.target >= 0:
            verdict = (<const unsigned char*>PyBytes_AS_STRING(self.passive_status))[101]
            client.health.report(self.upstream, self.target,
                                 -1 if verdict == 0 else OUTCOME_SUCCESS if verdict == 1 else OUTCOME_HTTP_FAILURE)
        if self.picked and self.upstream.observe_latency:
            self.balancer.observe(self.target, self.t_head - self.t_sent, self.t_head)
        cdef list pairs = _head_pairs(buf, start, end)
        cdef bytes upgrade = b"websocket"
        for name, value in pairs:
            if name.lower() == "upgrade":
                upgrade = value.encode("latin-1")
        cdef _ResponseHead head = _scan_response_head(buf, start, end, None)
        if head.connection_named is not None:
            head = _scan_response_head(buf, start, end, head.connection_named)
        chain = self.chain
        if chain is not None and chain.header_filter and self.pctx is not None:
            self.pctx.upstream_status = 101
            plugin_chain.run_header_filter(chain, self.pctx, 101, pairs)
            if self.pctx.response_headers:
                head.kept = _apply_response_ops(head.kept, self.pctx.response_headers)
        cdef list parts = [_status_line(101)]
        parts.extend(head.kept)
        parts += [b"Upgrade: ", upgrade, b"\r\nConnection: upgrade\r\n",
                  b"Via: ", (head.via + b", " + VIA_TOKEN) if head.via is not None else VIA_TOKEN, CRLF]
        if not head.has_server:
            parts += [b"Server: ", SERVER_TOKEN, CRLF]
        parts += [_latency_lines(self.t_sent - req.t_start, self.t_head - self.t_sent), req.request_id, CRLF, CRLF]
        # From here the tunnel owns both sockets; this exchange only keeps its target until the tunnel ends.
        self.response_started = True
        self.done = True
        self.conn = None
        cdef bint upstream_paused = conn.write_paused_at != 0.0
        cdef Tunnel tunnel = Tunnel.__new__(Tunnel)
        tunnel.client = client
        tunnel.exchange = self
        tunnel.loop = self.loop
        tunnel.client_transport = client.transport
        tunnel.upstream_transport = conn.hand_over()
        tunnel.idle_timeout = self.service.read_timeout
        tunnel.stall_timeout = self.service.write_timeout
        if upstream_paused:
            tunnel.stalled = SIDE_UPSTREAM
        if client.write_paused:
            tunnel.stalled |= SIDE_CLIENT
        early = client.upgraded
        tunnel.start(b"".join(parts), buf[end:], (<_UpgradeBuffer>early).chunks if early is not None else [])

    cdef void on_upstream_body(self, bytes data) except *:
        if self.done:
            return
        if self.chain is not None and self.chain.body_filter and self.pctx is not None:
            data = plugin_chain.run_body_filter(self.chain, self.pctx, data, False)
            if not data:
                return
        self.bytes_out += PyBytes_GET_SIZE(data)
        if PyBytes_GET_SIZE(data) > 4096:
            self.out_large = True
        if self.chunked_out:
            _append_chunk(self.out, data)
        else:
            self.out.append(data)

    cdef void on_upstream_flush(self) except *:
        # One write per upstream read: small pieces are joined (cheaper than a writev entry each),
        # large bodies go out as they are (writev, no copy).
        cdef list out = self.out
        if not out:
            return
        self.out = []
        if len(out) == 1:
            self.client.write(out[0])
        elif self.out_large:
            self.out_large = False
            self.client.writelines(out)
        else:
            self.client.write(b"".join(out))

    cdef void on_upstream_complete(self, UpstreamConnection conn) except *:
        if self.done:
            return
        if self.chain is not None and self.chain.body_filter and self.pctx is not None:
            tail = plugin_chain.run_body_filter(self.chain, self.pctx, b"", True)
            if tail:
                self.bytes_out += len(tail)
                if self.chunked_out:
                    _append_chunk(self.out, tail)
                else:
                    self.out.append(tail)
        if self.chunked_out:
            self.out.append(CHUNK_END)
        self.on_upstream_flush()
        upstream = self.upstream
        if self.picked and upstream.observe_latency:
            self.balancer.observe(self.target, self.t_head - self.t_sent, self.t_head)
        self._release_target()
        self.conn = None
        cdef bint reusable = self.upstream_keep_alive and self.req.body_done and not self.req.websocket
        conn.detach()
        self.client.pool.release(conn, reusable)
        self._finish(self.client_keep_alive)

    cdef void on_upstream_lost(self, UpstreamConnection conn, int reason) except *:
        if self.done or conn is not self.conn:
            return
        if not self.response_started:
            if (reason != LOST_TIMEOUT and self.reused and conn.bytes_received == 0
                    and not self.stale_retry_done and self.req.method in IDEMPOTENT and self.req.replayable):
                # The idle connection was closed under us: send again once on a fresh one, not a new try.
                # Like nginx, never for POST/PATCH/LOCK: the upstream may have acted on it.
                self.stale_retry_done = True
                self.conn = None
                conn.detach()
                self.streaming = False
                self.loop.create_task(_connect(self, True))
                return
            self._attempt_failed(reason == LOST_TIMEOUT, True)
            return
        if reason == LOST_EOF and self.close_delimited:
            if self.chunked_out:
                self.out.append(CHUNK_END)
            self.on_upstream_flush()
            self.conn = None
            conn.detach()
            self._release_target()
            self._finish(self.client_keep_alive)
            return
        # The stream broke after it started: the client must see an incomplete answer.
        if self.pctx is not None:
            self.pctx.aborted = True
        log.warning("upstream %s:%d %s in the middle of an answer to %s %s", self.target_host, self.target_port,
                    "timed out" if reason == LOST_TIMEOUT else "closed", self.req.method, self.req.path)
        self.on_upstream_flush()
        self._end_target()
        self.client.abort()
        self._finish(False)

    # Client callbacks

    cdef void on_client_lost(self) except *:
        if self.done:
            return
        self.done = True
        self._end_target()

    cdef void abandon(self) except *:
        """Stop after an internal error: nothing more is written for this exchange."""
        self.done = True
        self._end_target()

    # Ending

    cdef void _fail(self, int status, str message) except *:
        if self.done:
            return
        self.done = True
        if self.response_started:
            self.client.abort()
            self.client.request_done(self.req, status, self.bytes_out, False)
            return
        self.client.send_error(self.req, status, message)

    cdef void _finish(self, bint keep_alive) except *:
        self.done = True
        self.client.request_done(self.req, self.status, self.bytes_out, keep_alive)


async def _connect(Exchange ex, bint fresh):
    """Resolve and open a connection for the exchange's current target (the one awaited step)."""
    ctx = ex.ctx
    cdef UpstreamConnection conn
    try:
        ip = await ctx.resolver.resolve(ex.target_host)
    except NameResolutionError as exc:
        log.error("name resolution failed for %s: %s", ex.target_host, exc)
        if not ex.done:
            ex._fail(503, http11.MSG_NAME_RESOLUTION)
        return
    key = (ip, ex.target_port, ex.sni, None if ex.sni is None else ex.service.ssl_context)
    if not fresh and not ex.done:
        conn = ex.client.pool.acquire(key)
        if conn is not None:
            ex._send(conn, True)
            return
    try:
        conn = await ex.client.pool.connect(key, ex.service.ssl_context, ex.service.connect_timeout)
    except asyncio.TimeoutError:
        if not ex.done:
            log.warning("connect to %s:%d timed out", ip, ex.target_port)
            ex._attempt_failed(True, False)
        return
    except ssl.SSLCertVerificationError as exc:
        if not ex.done:
            log.error("upstream TLS: the certificate of %s (%s:%d) failed verification: %s", ex.sni, ip,
                      ex.target_port, exc.verify_message or exc)
            ex._attempt_failed(False, False)
        return
    except (OSError, ssl.SSLError) as exc:
        if not ex.done:
            log.warning("connect to %s:%d failed: %s", ip, ex.target_port, exc)
            ex._attempt_failed(False, False)
        return
    if ex.done:
        ex.client.pool.release(conn, True)
        return
    ex._send(conn, False)


# ---------------------------------------------------------------------------
# WebSocket: after a 101, bytes both ways until either side closes

cdef class _UpgradeBuffer:
    """Stands in for the request parser once llhttp has stopped at an upgrade head: the client's next
    bytes are not HTTP; they wait here for the tunnel."""
    cdef list chunks

    def __cinit__(self) -> None:
        self.chunks = []

    def feed_data(self, bytes data) -> None:
        self.chunks.append(data)


cdef class Tunnel:
    """Both sockets of an upgraded connection (built by Exchange.on_upstream_switch).

    Each transport gets a _TunnelEnd protocol. Back-pressure: a destination whose transport pauses
    writing pauses reading on the other side until it resumes. When either side closes or ends its
    stream, both close (a reset on one side aborts the other). Timeouts are idle timeouts: the
    service's read_timeout without a byte either way, or its write_timeout with a destination paused,
    closes both. The request ends (request_done, status 101) when the tunnel does.
    """

    def __repr__(self) -> str:
        return (f"<Tunnel to_client={self.to_client} to_upstream={self.to_upstream} "
                f"stalled={self.stalled} ended={self.ended}>")

    cdef void start(self, bytes head, bytes from_upstream, list from_client) except *:
        self.last_traffic = _now()
        if self.stalled:
            self.stalled_since = self.last_traffic
        cdef ClientProtocol client = self.client
        if client.timer is not None:
            client.timer.cancel()  # the tunnel's own timer governs the connection from now on
            client.timer = None
        client.read_pause = 0
        self.client_transport.set_protocol(_TunnelEnd(self, SIDE_CLIENT))
        self.upstream_transport.set_protocol(_TunnelEnd(self, SIDE_UPSTREAM))
        # Bytes that came with the heads: frames the upstream sent right after its 101, and the client's
        # right after its handshake request.
        self.to_client = PyBytes_GET_SIZE(from_upstream)
        self.client_transport.write(head + from_upstream if from_upstream else head)
        if from_client:
            data = b"".join(from_client)
            from_client.clear()
            self.to_upstream = PyBytes_GET_SIZE(data)
            self.upstream_transport.write(data)
        if self.stalled & SIDE_UPSTREAM:
            self.client_transport.pause_reading()
        else:
            self.client_transport.resume_reading()
        if self.stalled & SIDE_CLIENT:
            self.upstream_transport.pause_reading()
        else:
            self.upstream_transport.resume_reading()
        self._schedule(self.last_traffic + (self.stall_timeout if self.stalled else self.idle_timeout))

    cdef void forward(self, int side, bytes data) except *:
        if self.ended:
            return
        self.last_traffic = _now()
        if side == SIDE_CLIENT:
            self.to_upstream += PyBytes_GET_SIZE(data)
            self.upstream_transport.write(data)
        else:
            self.to_client += PyBytes_GET_SIZE(data)
            self.client_transport.write(data)

    cdef bint on_eof(self) except -1:
        # One side finished sending: both close, each after what is already written to it (as nginx
        # ends an upgraded connection; WebSocket's own closing handshake has happened in frames by then).
        self._end(False)
        return False

    cdef void on_lost(self, int side, object exc) except *:
        if not self.ended:
            # A reset cuts the other side too; a clean close lets what is written go out first.
            self._end(exc is not None)
        if side == SIDE_CLIENT:
            self.client.connection_lost(exc)  # the client connection's own accounting (stats, drain set)

    cdef void on_pause(self, int side) except *:
        # `side`'s transport has too much to write: stop reading from the other side.
        if self.ended:
            return
        cdef double now = _now()
        if not self.stalled:
            self.stalled_since = now
        self.stalled |= side
        (self.client_transport if side == SIDE_UPSTREAM else self.upstream_transport).pause_reading()
        if self.timer_at > self.stalled_since + self.stall_timeout:
            self.timer.cancel()
            self._schedule(self.stalled_since + self.stall_timeout)

    cdef void on_resume(self, int side) except *:
        if self.ended:
            return
        self.stalled &= ~side
        self.last_traffic = _now()
        (self.client_transport if side == SIDE_UPSTREAM else self.upstream_transport).resume_reading()

    cdef void _schedule(self, double deadline) except *:
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        # Lazy: traffic only moves last_traffic; the timer re-arms itself when it fires early.
        self.timer = None
        if self.ended:
            return
        cdef double now = _now()
        cdef double deadline = (self.stalled_since + self.stall_timeout if self.stalled
                                else self.last_traffic + self.idle_timeout)
        if now < deadline:
            self._schedule(deadline)
            return
        cdef Request req = self.exchange.req
        if self.stalled:
            log.info("WebSocket %s: a peer took no bytes for %.3gs, closed", req.path, self.stall_timeout)
        else:
            log.info("WebSocket %s: idle for %.3gs, closed", req.path, self.idle_timeout)
        self._end(self.stalled != 0)

    cdef void _end(self, bint abort) except *:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if abort:
            self.client_transport.abort()
            self.upstream_transport.abort()
        else:
            self.client_transport.close()
            self.upstream_transport.close()
        cdef Exchange exchange = self.exchange
        exchange._release_target()
        cdef Request req = exchange.req
        req.body_bytes += self.to_upstream  # bytes_in counts what the client sent through the tunnel
        self.client.request_done(req, 101, self.to_client, False)


cdef class _TunnelEnd:
    """The protocol of one tunnel socket after the switch; everything goes to the Tunnel."""
    cdef Tunnel tunnel
    cdef int side

    def __cinit__(self, Tunnel tunnel, int side) -> None:
        self.tunnel = tunnel
        self.side = side

    def data_received(self, bytes data) -> None:
        self.tunnel.forward(self.side, data)

    def eof_received(self) -> bool:
        return self.tunnel.on_eof()

    def connection_lost(self, exc: object) -> None:
        cdef Tunnel tunnel = self.tunnel
        self.tunnel = None  # the transport keeps its protocol: break the cycle
        if tunnel is not None:
            tunnel.on_lost(self.side, exc)

    def pause_writing(self) -> None:
        self.tunnel.on_pause(self.side)

    def resume_writing(self) -> None:
        self.tunnel.on_resume(self.side)


# Hash input (Kong's hash_on / hash_fallback): only for consistent-hashing upstreams.

def _hash_input(Exchange ex, upstream: object) -> object:
    value = _hash_value(ex, upstream.hash_on, upstream.hash_on_key, upstream)
    if not value and upstream.hash_fallback != "none":
        value = _hash_value(ex, upstream.hash_fallback, upstream.hash_fallback_key, upstream)
    return value


def _hash_value(Exchange ex, str mode, key: object, upstream: object) -> object:
    cdef Request req = ex.req
    if mode == "ip":
        return ex.client.peer_ip
    if mode == "header" and key:
        wanted = key.encode("latin-1")
        values = [v.decode("latin-1") for n, v in req.headers if n.lower() == wanted]
        return ",".join(values) if values else None
    if mode == "cookie" and key:
        value = _cookie(req, key)
        if value is None:
            value = str(uuid.uuid4())
            ex.set_cookie = f"{key}={value}; Path={upstream.hash_cookie_path}; SameSite=Lax; HttpOnly".encode("latin-1")
        return value
    if mode == "path":
        return ex.match.normalized_path
    if mode == "query_arg" and key and req.query:
        from urllib.parse import parse_qsl
        values = sorted(v for k, v in parse_qsl(req.query.decode("latin-1"), keep_blank_values=True) if k == key)
        return ",".join(values) if values else None
    if mode == "uri_capture" and key:
        captures = ex.match.captures
        if captures:
            value = captures.get(key)
            if value is None and key.isdigit():
                value = captures.get(int(key))
            return value
    return None


def _cookie(Request req, str name) -> object:
    for header, value in req.headers:
        if header.lower() != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
    return None


# ---------------------------------------------------------------------------
# Plugin glue (only requests on routes with plugins come here)

def _plugin_context(ClientProtocol client, Request req, RouteMatch match, route: object, service: object) -> object:
    pctx = PluginContext()
    pctx.method = req.method
    pctx.path = req.path
    pctx.raw_path = req.raw_path
    pctx.query = req.query
    pctx.host = req.host
    pctx.raw_headers = req.headers  # decoded only if a plugin reads them
    pctx.client_ip = client.peer_ip
    pctx.route_id = route.id
    pctx.route_name = route.name
    pctx.service_id = service.id
    pctx.service_name = service.name
    pctx.request_id = req.request_id.decode("ascii")
    pctx.started_at = req.t_start
    pctx.original_path = match.upstream_path
    return pctx


def _plugin_log(Request req, int status, long long bytes_out) -> None:
    pctx = req.plugin_ctx
    req.plugin_ctx = None
    pctx.status = status
    pctx.bytes_out = bytes_out
    pctx.latency_ms = (_now() - req.t_start) * 1000.0
    plugin_chain.run_log(req.plugin_chain, pctx)


def _upstream_header_ops(list ops) -> tuple:
    """Plugins' set/clear of upstream request headers: names to drop from the client's, lines to add."""
    replaced = set()
    added = {}
    for name, value in ops:
        key = name.lower().encode("latin-1")
        replaced.add(key)
        if value is None:
            added.pop(key, None)
        else:
            added[key] = name.encode("latin-1") + b": " + value.encode("latin-1") + CRLF
    return replaced, list(added.values())


def _head_pairs(bytes buf, Py_ssize_t start, Py_ssize_t end) -> list:
    """The upstream answer's headers as (name, value) strings, for plugins."""
    lines = buf[start:end].decode("latin-1").split("\r\n")[1:]
    pairs = []
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            pairs.append((name.strip(), value.strip()))
    return pairs


def _apply_response_ops(list kept, list ops) -> list:
    """Apply header_filter's set/add/clear to the header lines about to be sent."""
    lines = [line for line in b"".join(kept).split(CRLF) if line]
    for op, name, value in ops:
        lower = name.lower().encode("latin-1")
        if op in ("set", "clear"):
            lines = [line for line in lines if line.split(b":", 1)[0].strip().lower() != lower]
        if op in ("set", "add") and value is not None:
            lines.append(name.encode("latin-1") + b": " + value.encode("latin-1"))
    return [line + CRLF for line in lines]


def _access_log(ClientProtocol client, Request req, int status, long long bytes_out) -> None:
    """One JSON line per request (only when the access log is on)."""
    cdef Exchange exchange = req.exchange
    cdef double now = _now()
    route = service = target = None
    upstream_ms = None
    if exchange is not None:
        route = exchange.route.name or exchange.route.id
        owner = exchange.route.service
        service = owner.name or owner.id if owner is not None else None
        if exchange.target_host is not None:
            target = f"{exchange.target_host}:{exchange.target_port}"
        if exchange.t_head > 0:
            upstream_ms = round((exchange.t_head - exchange.t_sent) * 1000.0, 3)
    pctx = req.plugin_ctx
    raw = req.raw_path if req.raw_path is not None else b""
    if req.query is not None:
        raw += b"?" + req.query
    client.access_log.record({
        "time": access_log_time(time.time()),
        "client": client.peer_ip,
        "method": req.method,
        "path": raw.decode("latin-1"),
        "status": status,
        "route": route,
        "service": service,
        "target": target,
        "upstream_latency_ms": upstream_ms,
        "latency_ms": round((now - req.t_start) * 1000.0, 3),
        "bytes_in": req.body_bytes,
        "bytes_out": bytes_out,
        "request_id": req.request_id.decode("ascii") if req.request_id is not None else None,
        "fallback": pctx.shared.get("fallback") if pctx is not None else None,
    })
