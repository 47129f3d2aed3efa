"""Upstream side of a worker: keep-alive pool per address, the response parser protocol, DNS cache.

Decisions (which connection, whether it may be reused) are plain code over the pool's
state; the only awaitable is opening a new connection.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Protocol

import httptools

if TYPE_CHECKING:
    from ringgate.settings import Settings

PoolKey = tuple[str, int, str | None]  # (ip, port, TLS server name or None for plain)


class ExchangeSink(Protocol):
    """What an upstream connection reports to the request it is serving."""

    def on_upstream_head(self, conn: "UpstreamConnection", status: int, headers: list[tuple[bytes, bytes]],
                         keep_alive: bool) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_complete(self, conn: "UpstreamConnection") -> None: ...
    def on_upstream_lost(self, conn: "UpstreamConnection", reason: str) -> None: ...
        # reason: "eof" (clean close), "error" (reset or unparseable answer), "timeout"
    def on_upstream_flush(self) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool", "key", "loop", "transport", "closed", "requests_served", "idle_since",
        "exchange", "parser", "headers", "informational", "bytes_received", "last_read",
        "read_timeout", "timer", "head_done", "write_paused_at", "write_timeout",
    )

    def __init__(self, pool: "UpstreamPool", key: PoolKey) -> None:
        # Per connection
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests_served = 0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        # Per exchange
        self.exchange: ExchangeSink | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational = False
        self.head_done = False
        self.bytes_received = 0
        self.last_read = 0.0
        self.read_timeout = 60.0
        self.write_timeout = 60.0
        self.write_paused_at = 0.0

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.exchange is not None else "idle")
        return f"<UpstreamConnection {self.key[0]}:{self.key[1]} {state} served={self.requests_served}>"

    # Exchange interface

    def attach(self, exchange: ExchangeSink, read_timeout: float, write_timeout: float) -> None:
        self.exchange = exchange
        self.parser = httptools.HttpResponseParser(self)
        self.headers = []
        self.informational = False
        self.head_done = False
        self.bytes_received = 0
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.last_read = self.loop.time()
        self._arm(self.last_read + read_timeout)

    def detach(self) -> None:
        self.exchange = None
        self.parser = None
        self.requests_served += 1

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: list[bytes]) -> None:
        self.transport.writelines(parts)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.close()

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # An idle keep-alive connection must stay silent; anything else makes it unusable.
            self.close()
            return
        self.bytes_received += len(data)
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserError:
            exchange = self.exchange
            self.exchange = None
            self.abort()
            if exchange is not None:
                exchange.on_upstream_lost(self, "error")
            return
        if self.exchange is not None:
            self.exchange.on_upstream_flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.on_upstream_lost(self, "eof" if exc is None else "error")

    def _arm(self, deadline: float) -> None:
        # Keep an earlier timer (it re-checks when it fires); replace a later one.
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self._check_timeout)

    def pause_writing(self) -> None:
        self.write_paused_at = self.loop.time()
        self._arm(self.write_paused_at + self.write_timeout)
        if self.exchange is not None:
            self.exchange.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused_at = 0.0
        if self.exchange is not None:
            self.exchange.on_upstream_resume_writing()

    # Parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()  # type: ignore[union-attr]
        if 100 <= status < 200 and status != 101:
            # Interim answers (100 Continue, 103 Early Hints) are consumed here; the final one follows.
            self.informational = True
            self.headers = []
            return
        self.head_done = True
        self.exchange.on_upstream_head(self, status, self.headers, parser.should_keep_alive())  # type: ignore

    def on_body(self, body: bytes) -> None:
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
        now = self.loop.time()
        if self.exchange is None:
            if self.idle_since and now - self.idle_since >= self.pool.idle_timeout:
                self.close()
                return
            self.timer = self.loop.call_at(self.idle_since + self.pool.idle_timeout, self._check_timeout)
            return
        if self.write_paused_at:
            deadline = self.write_paused_at + self.write_timeout
        else:
            deadline = self.last_read + self.read_timeout
        if now >= deadline:
            exchange = self.exchange
            self.exchange = None
            self.abort()
            exchange.on_upstream_lost(self, "timeout")
            return
        self.timer = self.loop.call_at(deadline, self._check_timeout)


class UpstreamPool:
    """Idle keep-alive connections per (address, port, TLS name), newest first (LIFO)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: "Settings") -> None:
        self.loop = loop
        self.max_idle = settings.upstream_keepalive_pool
        self.max_requests = settings.upstream_keepalive_requests
        self.idle_timeout = settings.upstream_keepalive_timeout
        self.idle: dict[PoolKey, list[UpstreamConnection]] = defaultdict(list)
        self.opened = 0

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self.idle.values())
        return f"<UpstreamPool addresses={len(self.idle)} idle={idle} opened={self.opened}>"

    def acquire(self, key: PoolKey) -> UpstreamConnection | None:
        stack = self.idle.get(key)
        while stack:
            conn = stack.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if (not reusable or conn.closed or conn.requests_served >= self.max_requests):
            conn.close()
            return
        stack = self.idle[conn.key]
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        if conn.timer is None:
            conn.timer = self.loop.call_at(conn.idle_since + self.idle_timeout, conn._check_timeout)
        stack.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        stack = self.idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)

    async def connect(self, key: PoolKey, ssl_context: ssl.SSLContext | None, timeout: float) -> UpstreamConnection:
        ip, port, server_name = key
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
                conn.close()
        self.idle.clear()


class NameResolutionError(OSError):
    pass


class Resolver:
    """Asynchronous getaddrinfo with a small TTL cache and round-robin over the records."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float = 30.0) -> None:
        self.loop = loop
        self.ttl = ttl
        self.cache: dict[str, tuple[float, list[str], int]] = {}

    _literals: dict[str, str | None] = {}

    @classmethod
    def literal(cls, host: str) -> str | None:
        """The host as a normalized IP if it is an IP literal, else None (cached: hosts come from config)."""
        try:
            return cls._literals[host]
        except KeyError:
            pass
        try:
            value: str | None = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            value = None
        if len(cls._literals) > 4096:
            cls._literals.clear()
        cls._literals[host] = value
        return value

    async def resolve(self, host: str) -> str:
        ip = self.literal(host)
        if ip is not None:
            return ip
        now = self.loop.time()
        entry = self.cache.get(host)
        if entry is None or entry[0] < now:
            try:
                infos: list[Any] = await self.loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise NameResolutionError(f"{host}: {exc}") from exc
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            if not addresses:
                raise NameResolutionError(f"{host}: no addresses")
            entry = (now + self.ttl, addresses, 0)
        expires, addresses, turn = entry
        self.cache[host] = (expires, addresses, turn + 1)
        return addresses[turn % len(addresses)]
