"""One request's trip to the upstream: pick a target, send, stream the answer, retry or fail.

Decisions first, I/O after: `_attempt` asks the balancer and the pool (plain code over
state) and only then writes or opens a connection. Retry rules follow nginx's
`proxy_next_upstream error timeout` as Kong uses it, with two fixes Kong users ask for:
a retry never lands on a target that already failed for this request while another
remains, and a request that fails on a reused idle connection before any response byte
is sent again once on a fresh connection.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from typing import TYPE_CHECKING, Any

from shared_state import arena as arena_fields
from workers import http11
from workers.runtime import host_header_value
from workers.upstream import NameResolutionError, Resolver, UpstreamConnection

if TYPE_CHECKING:
    from workers.proxy import ClientProtocol, Request
    from workers.runtime import RouteRuntime, ServiceRuntime, UpstreamRuntime

log = logging.getLogger("ringgate.proxy")

# Request headers the gateway drops or sets itself (lowercase).
_DROP_REQUEST = frozenset((
    b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"content-length", b"expect", b"via", b"x-forwarded-for", b"x-real-ip",
    b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-path", b"x-forwarded-prefix",
))
_FORWARDED_KEEP_IF_TRUSTED = (
    b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-path", b"x-forwarded-prefix",
)
_NO_BODY_STATUSES = frozenset((204, 304))


def _chunk(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, b"\r\n"]


class Exchange:
    __slots__ = (
        "client", "req", "match", "route", "service", "upstream", "ctx", "loop",
        "tries_left", "excluded", "target", "target_host", "target_port", "conn", "reused",
        "stale_retry_done", "head_line", "head_rest", "host_line", "streaming", "done",
        "response_started", "chunked_out", "close_delimited", "client_keep_alive", "status",
        "bytes_out", "out", "t_sent", "t_head", "hash_value", "set_cookie", "upstream_keep_alive",
        "no_body", "connect_task", "sni", "picked",
    )

    def __init__(self, client: "ClientProtocol", req: "Request", match: Any, route: "RouteRuntime",
                 service: "ServiceRuntime") -> None:
        self.client = client
        self.req = req
        self.match = match
        self.route = route
        self.service = service
        self.upstream: "UpstreamRuntime | None" = service.upstream
        self.ctx = client.ctx
        self.loop = client.loop
        # Attempts
        self.tries_left = service.retries
        self.excluded: set[int] | None = None
        self.target = -1
        self.picked = False
        self.target_host = ""
        self.target_port = 0
        self.conn: UpstreamConnection | None = None
        self.reused = False
        self.stale_retry_done = False
        self.connect_task: asyncio.Task[None] | None = None
        self.sni: str | None = None
        # Request head, built once; the Host line is per attempt
        self.head_line = b""
        self.head_rest = b""
        self.host_line = b""
        self.streaming = False
        self.hash_value: str | None = None
        self.set_cookie: bytes | None = None
        # Response
        self.done = False
        self.response_started = False
        self.chunked_out = False
        self.close_delimited = False
        self.no_body = False
        self.client_keep_alive = req.keep_alive
        self.upstream_keep_alive = False
        self.status = 0
        self.bytes_out = 0
        self.out: list[bytes] = []
        self.t_sent = 0.0
        self.t_head = 0.0

    def __repr__(self) -> str:
        return (f"<Exchange {self.req.method} {self.req.path} target={self.target_host}:{self.target_port} "
                f"tries_left={self.tries_left} started={self.response_started} done={self.done}>")

    # Start

    def start(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.hash_on != "none":
            self.hash_value = self._hash_input(upstream)
        self._build_head()
        req = self.req
        if req.expect_continue and not req.body_done:
            self.client.write(http11.CONTINUE_100)
        self._attempt()

    def _build_head(self) -> None:
        req = self.req
        client = self.client
        match = self.match
        path = match.upstream_path.encode("latin-1") if match.upstream_path.isascii() \
            else match.upstream_path.encode("utf-8", "surrogateescape")
        if req.query is not None:
            path += b"?" + req.query
        self.head_line = req.method.encode() + b" " + path + b" HTTP/1.1\r\n"
        trusted = self.ctx.is_trusted(client.peer_ip)
        drop_named = req.connection_tokens
        parts: list[bytes] = []
        xff: bytes | None = None
        via: bytes | None = None
        forwarded: dict[bytes, bytes] = {}
        for name, value in req.headers:
            lname = name.lower()
            if lname in _DROP_REQUEST:
                if lname == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif lname == b"via":
                    via = value
                elif lname == b"te" and b"trailers" in value.lower():
                    parts += [b"TE: trailers\r\n"]
                elif trusted and lname in _FORWARDED_KEEP_IF_TRUSTED:
                    forwarded[lname] = value
                continue
            if drop_named and lname in drop_named:
                continue
            parts += [name, b": ", value, b"\r\n"]
        ip = client.peer_ip.encode()
        parts += [b"X-Forwarded-For: ", (xff + b", " + ip) if xff else ip, b"\r\n"]
        host_only = req.host.rpartition(":")[0] if req.host.rpartition(":")[2].isdigit() else req.host
        parts += [
            b"X-Forwarded-Proto: ", forwarded.get(b"x-forwarded-proto", b"http"), b"\r\n",
            b"X-Forwarded-Host: ", forwarded.get(b"x-forwarded-host", host_only.lower().encode("latin-1")), b"\r\n",
            b"X-Forwarded-Port: ", forwarded.get(b"x-forwarded-port", self.ctx.listen_port_bytes), b"\r\n",
            b"X-Forwarded-Path: ", forwarded.get(b"x-forwarded-path", req.path.encode("utf-8", "surrogateescape")), b"\r\n",
        ]
        prefix = forwarded.get(b"x-forwarded-prefix")
        if prefix is None and match.stripped_prefix:
            prefix = match.stripped_prefix.encode("utf-8", "surrogateescape")
        if prefix:
            parts += [b"X-Forwarded-Prefix: ", prefix, b"\r\n"]
        parts += [
            b"X-Real-IP: ", ip, b"\r\n",
            b"Via: ", (via + b", " + http11.VIA_TOKEN) if via else http11.VIA_TOKEN, b"\r\n",
            b"X-Kong-Request-Id: ", req.request_id.encode(), b"\r\n",
            b"Connection: keep-alive\r\n",
        ]
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        parts.append(b"\r\n")
        self.head_rest = b"".join(parts)

    def _host_header(self) -> str:
        req = self.req
        if self.route.preserve_host and req.host:
            return req.host
        upstream = self.upstream
        if upstream is not None:
            if upstream.host_header:
                return upstream.host_header
            return host_header_value(self.target_host, self.target_port, self.service.scheme)
        return self.service.default_host_header

    # Attempts

    def _attempt(self) -> None:
        service = self.service
        upstream = self.upstream
        if upstream is not None:
            index = upstream.balancer.pick(self.excluded, self.hash_value)
            if index < 0:
                self._fail(503, http11.MSG_NO_PEER)
                return
            self.target = index
            self.picked = True
            self.target_host, self.target_port, _ = upstream.targets[index]
        else:
            self.target_host, self.target_port = service.host, service.port
        host_header = self._host_header()
        self.host_line = b"Host: " + host_header.encode("latin-1") + b"\r\n"
        if service.ssl_context is not None:
            self.sni = host_header.rpartition(":")[0] if host_header.rpartition(":")[2].isdigit() else host_header
            self.sni = self.sni.strip("[]")
        ip = Resolver.literal(self.target_host)
        if ip is not None:
            conn = self.ctx.pool.acquire((ip, self.target_port, self.sni))
            if conn is not None:
                self._send(conn, reused=True)
                return
        self.connect_task = self.loop.create_task(self._connect(fresh=ip is not None))

    async def _connect(self, fresh: bool) -> None:
        ctx = self.ctx
        try:
            ip = await ctx.resolver.resolve(self.target_host)
        except NameResolutionError as exc:
            log.error("name resolution failed for %s: %s", self.target_host, exc)
            if not self.done:
                self._fail(503, http11.MSG_NAME_RESOLUTION)
            return
        key = (ip, self.target_port, self.sni)
        if not fresh and not self.done:
            conn = ctx.pool.acquire(key)
            if conn is not None:
                self._send(conn, reused=True)
                return
        try:
            conn = await ctx.pool.connect(key, self.service.ssl_context, self.service.connect_timeout)
        except asyncio.TimeoutError:
            if not self.done:
                log.warning("connect to %s:%d timed out", ip, self.target_port)
                self._attempt_failed("timeout", sent=False)
            return
        except (OSError, ssl.SSLError) as exc:
            if not self.done:
                log.warning("connect to %s:%d failed: %s", ip, self.target_port, exc)
                self._attempt_failed("error", sent=False)
            return
        if self.done:
            ctx.pool.release(conn, reusable=True)
            return
        self._send(conn, reused=False)

    def _send(self, conn: UpstreamConnection, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        service = self.service
        conn.attach(self, service.read_timeout, service.write_timeout)
        req = self.req
        parts = [self.head_line, self.host_line, self.head_rest]
        if req.body_chunks:
            if req.chunked:
                for chunk in req.body_chunks:
                    parts += _chunk(chunk)
            else:
                parts += req.body_chunks
            if not req.replayable:
                req.body_chunks = []
        if req.body_done and req.chunked:
            parts.append(http11.CHUNK_END)
        self.t_sent = self.loop.time()
        conn.writelines(parts)
        self.streaming = True
        if req.body_bytes > self.ctx.settings.replay_buffer_bytes:
            req.replayable = False
        self.client.resume_buffered()
        if self.client.write_paused:
            conn.pause_reading()

    def forward_body(self, data: bytes) -> None:
        """A request body chunk arrived while an upstream connection is taking the body."""
        req = self.req
        conn = self.conn
        if req.replayable:
            if req.body_bytes <= self.ctx.settings.replay_buffer_bytes:
                req.body_chunks.append(data)
            else:
                req.replayable = False
                req.body_chunks = []
        if conn is None or self.done:
            return
        if req.chunked:
            conn.writelines(_chunk(data))
        else:
            conn.write(data)

    def on_client_body_done(self) -> None:
        if self.streaming and self.conn is not None and self.req.chunked and not self.done:
            self.conn.write(http11.CHUNK_END)

    def _attempt_failed(self, kind: str, sent: bool) -> None:
        """One try failed before any byte of the answer reached the client: retry or answer with an error."""
        stats = self.ctx.stats
        stats.incr(arena_fields.UPSTREAM_TIMEOUTS if kind == "timeout" else arena_fields.UPSTREAM_CONNECT_ERRORS)
        self._end_target()
        req = self.req
        retryable = self.tries_left > 0 and (
            not sent or (req.method in http11.IDEMPOTENT_METHODS and req.replayable)
        )
        if retryable:
            self.tries_left -= 1
            stats.incr(arena_fields.RETRIES)
            if self.target >= 0:
                if self.excluded is None:
                    self.excluded = set()
                self.excluded.add(self.target)
            self.streaming = False
            self._attempt()
            return
        if kind == "timeout":
            self._fail(504, http11.MSG_TIMEOUT)
        else:
            self._fail(502, http11.MSG_BAD_GATEWAY)

    def _release_target(self) -> None:
        # Exactly one release per pick (least-connections counts in-flight requests).
        if self.picked:
            self.picked = False
            self.upstream.balancer.release(self.target)  # type: ignore[union-attr]

    def _end_target(self) -> None:
        self._release_target()
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.detach()
            conn.close()

    # Upstream callbacks (ExchangeSink)

    def on_upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]],
                         keep_alive: bool) -> None:
        if self.done:
            return
        self.t_head = self.loop.time()
        self.status = status
        self.upstream_keep_alive = keep_alive
        req = self.req
        parts = [http11.status_line(status)]
        content_length: bytes | None = None
        chunked_up = False
        drop_named: list[bytes] | None = None
        via: bytes | None = None
        has_server = False
        for name, value in headers:
            lname = name.lower()
            if lname in http11.HOP_BY_HOP:
                if lname == b"content-length":
                    content_length = value
                elif lname == b"transfer-encoding":
                    chunked_up = True
                elif lname == b"connection":
                    tokens = [t.strip().lower() for t in value.split(b",")]
                    drop_named = [t for t in tokens if t not in (b"close", b"keep-alive")] or None
                continue
            if lname == b"via":
                via = value
                continue
            if lname == b"server":
                has_server = True
            parts += [name, b": ", value, b"\r\n"]
        if drop_named:
            parts = self._drop_connection_named(parts, drop_named)
        self.no_body = req.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
        if content_length is not None and not chunked_up:
            parts += [b"Content-Length: ", content_length, b"\r\n"]
        elif self.no_body:
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
        parts += [b"Via: ", (via + b", " + http11.VIA_TOKEN) if via else http11.VIA_TOKEN, b"\r\n"]
        if not has_server:
            parts += [b"Server: ", http11.SERVER_TOKEN, b"\r\n"]
        parts += [
            b"X-Kong-Upstream-Latency: %d\r\n" % int((self.t_head - self.t_sent) * 1000),
            b"X-Kong-Proxy-Latency: %d\r\n" % int((self.t_sent - req.t_start) * 1000),
            b"X-Kong-Request-Id: ", req.request_id.encode(), b"\r\n",
        ]
        if self.set_cookie is not None:
            parts += [b"Set-Cookie: ", self.set_cookie, b"\r\n"]
        if not self.client_keep_alive or not req.keep_alive or self.ctx.draining:
            self.client_keep_alive = False
            parts.append(b"Connection: close\r\n")
        elif not req.http_11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.out = parts
        self.response_started = True
        if req.method == "HEAD":
            # llhttp would wait for the body a HEAD answer announces; the answer is complete here.
            self.on_upstream_complete(conn)

    @staticmethod
    def _drop_connection_named(parts: list[bytes], names: list[bytes]) -> list[bytes]:
        kept = [parts[0]]
        for i in range(1, len(parts), 4):
            if parts[i].lower() not in names:
                kept += parts[i:i + 4]
        return kept

    def on_upstream_body(self, data: bytes) -> None:
        if self.done:
            return
        self.bytes_out += len(data)
        if self.chunked_out:
            self.out += _chunk(data)
        else:
            self.out.append(data)

    def on_upstream_flush(self) -> None:
        if self.out:
            out, self.out = self.out, []
            self.client.writelines(out)

    def on_upstream_complete(self, conn: UpstreamConnection) -> None:
        if self.done:
            return
        if self.chunked_out:
            self.out.append(http11.CHUNK_END)
        self.on_upstream_flush()
        upstream = self.upstream
        if upstream is not None and self.picked and upstream.observe_latency:
            upstream.balancer.observe(self.target, self.t_head - self.t_sent, self.t_head)
        self._release_target()
        self.conn = None
        reusable = self.upstream_keep_alive and self.req.body_done
        conn.detach()
        self.ctx.pool.release(conn, reusable)
        self._finish(self.client_keep_alive)

    def on_upstream_lost(self, conn: UpstreamConnection, reason: str) -> None:
        if self.done or conn is not self.conn:
            return
        if not self.response_started:
            if (reason != "timeout" and self.reused and conn.bytes_received == 0
                    and not self.stale_retry_done):
                # The idle connection was closed under us: send again once on a fresh one, not a new try.
                self.stale_retry_done = True
                self.conn = None
                conn.detach()
                self.streaming = False
                self.connect_task = self.loop.create_task(self._connect(fresh=True))
                return
            self._attempt_failed("timeout" if reason == "timeout" else "error", sent=True)
            return
        if reason == "eof" and self.close_delimited:
            if self.chunked_out:
                self.out.append(http11.CHUNK_END)
            self.on_upstream_flush()
            self.conn = None
            conn.detach()
            self._release_target()
            self._finish(self.client_keep_alive)
            return
        # The stream broke after it started: the client must see an incomplete answer.
        log.warning("upstream %s:%d %s in the middle of an answer to %s %s", self.target_host, self.target_port,
                    "timed out" if reason == "timeout" else "closed", self.req.method, self.req.path)
        self.on_upstream_flush()
        self._end_target()
        self.client.abort()
        self._finish(False)

    def on_upstream_pause_writing(self) -> None:
        self.client.pause_for_upstream()

    def on_upstream_resume_writing(self) -> None:
        self.client.resume_for_upstream()

    # Client callbacks

    def on_client_pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def on_client_resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    def on_client_lost(self) -> None:
        if self.done:
            return
        self.done = True
        self._end_target()

    def abandon(self) -> None:
        """Stop after an internal error: nothing more is written for this exchange."""
        self.done = True
        self._end_target()

    # Ending

    def _fail(self, status: int, message: str) -> None:
        if self.done:
            return
        self.done = True
        if self.response_started:
            self.client.abort()
            self.client.request_done(self.req, status, self.bytes_out, False)
            return
        self.client.send_error(self.req, status, message)

    def _finish(self, keep_alive: bool) -> None:
        self.done = True
        self.client.request_done(self.req, self.status, self.bytes_out, keep_alive)

    # Hash input (Kong's hash_on / hash_fallback)

    def _hash_input(self, upstream: "UpstreamRuntime") -> str | None:
        value = self._hash_value(upstream.hash_on, upstream.hash_on_key, upstream)
        if not value and upstream.hash_fallback != "none":
            value = self._hash_value(upstream.hash_fallback, upstream.hash_fallback_key, upstream)
        return value

    def _hash_value(self, mode: str, key: str | None, upstream: "UpstreamRuntime") -> str | None:
        req = self.req
        if mode == "ip":
            return self.client.peer_ip
        if mode == "header" and key:
            wanted = key.encode("latin-1")
            values = [v.decode("latin-1") for n, v in req.headers if n.lower() == wanted]
            return ",".join(values) if values else None
        if mode == "cookie" and key:
            value = self._cookie(key)
            if value is None:
                value = str(uuid.uuid4())
                self.set_cookie = (f"{key}={value}; Path={upstream.hash_cookie_path}; SameSite=Lax; HttpOnly"
                                   .encode("latin-1"))
            return value
        if mode == "path":
            return self.match.normalized_path
        if mode == "query_arg" and key and req.query:
            from urllib.parse import parse_qsl
            values = sorted(v for k, v in parse_qsl(req.query.decode("latin-1"), keep_blank_values=True) if k == key)
            return ",".join(values) if values else None
        if mode == "uri_capture" and key:
            captures = self.match.captures
            if captures:
                value = captures.get(key)
                if value is None and key.isdigit():
                    value = captures.get(int(key))
                return value
        return None

    def _cookie(self, name: str) -> str | None:
        for header, value in self.req.headers:
            if header.lower() != b"cookie":
                continue
            for part in value.decode("latin-1").split(";"):
                key, _, val = part.strip().partition("=")
                if key == name:
                    return val
        return None
