"""The control process: the admin listener, serving the Admin API (ringgate.admin).

It runs in its own process so that admin work never shares a loop with proxied traffic. This
module is only the HTTP/1.1 side: read requests (query string, headers, body up to a cap,
keep-alive, pipelining in order), hand each to the AdminApp, write its answer.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import uuid
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import httptools
import orjson
import uvloop

from ringgate.admin.api import AdminContext, Request, Response
from ringgate.admin.app import AdminApp
from ringgate.admin.state import ConfigState
from ringgate.providers import breaker_provider, fallback_provider, health_provider
from ringgate.stats import StatsSource
from workers.prober import ActiveProber
from ringgate.statsock import STATS_SOCKET, serve_stats, stop_stats
from shared_state.health import HealthTable
from workers import http11
from workers.child import prepare_child, report_ready

if TYPE_CHECKING:
    from shared_state.arena import Arena
    from workers.shm import NodeMemory

    from ringgate.config import Config
    from ringgate.settings import Settings

log = logging.getLogger("ringgate.control")

NODE_ID_FILE = "node_id"
# Kong's admin listener refuses bodies over nginx_admin_client_max_body_size, 10m by default.
MAX_BODY_BYTES = 10 * 1024 * 1024
_NO_BODY_STATUSES = frozenset((204, 304))


def encode_response(response: Response, head_only: bool, close: bool) -> bytes:
    body = response.body
    if response.status in _NO_BODY_STATUSES or body is None:
        payload = b""
    elif isinstance(body, (bytes, bytearray)):
        payload = bytes(body)
    else:
        payload = orjson.dumps(body)
    lines = [http11.status_line(response.status)]
    if response.status not in _NO_BODY_STATUSES:
        if payload:
            lines.append(b"Content-Type: %s\r\n" % response.content_type.encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n" % len(payload))
    lines += [b"Server: ", http11.SERVER_TOKEN, b"\r\n", b"Access-Control-Allow-Origin: *\r\n"]
    for name, value in response.headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(payload)
    return b"".join(lines)


def _error(status: int, message: str) -> bytes:
    return encode_response(Response(status, {"message": message}), head_only=False, close=True)


class AdminProtocol(asyncio.Protocol):
    """One admin connection. Requests are answered in order, one at a time (handlers are synchronous)."""

    def __init__(self, app: AdminApp) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.refused = False  # an answer that ends the connection was sent; ignore what follows

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request itself was answered; the admin API speaks nothing after an Upgrade.
            self.refused = True
            assert self.transport is not None
            self.transport.close()
        except httptools.HttpParserError:
            if not self.refused:
                self._refuse(400, "Bad request")

    def _refuse(self, status: int, message: str) -> None:
        self.refused = True
        assert self.transport is not None
        self.transport.write(_error(status, message))
        self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            self._refuse(413, "Payload too large")
            return
        if self.headers.get("expect", "").lower() == "100-continue":
            # curl waits for this before sending a body over 1 KiB (a kong.yml to POST /config).
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.body += body
        if len(self.body) > MAX_BODY_BYTES:
            self._refuse(413, "Payload too large")

    def on_message_complete(self) -> None:
        if self.refused or self.transport is None:
            return
        method = self.parser.get_method().decode("latin-1")
        target, _, query_text = self.url.decode("latin-1").partition("?")
        query: dict[str, str] = {}
        for name, value in parse_qsl(query_text, keep_blank_values=True):
            query.setdefault(name, value)
        request = Request(method, target, query, self.headers, bytes(self.body))
        response = self.app(request)
        close = not self.parser.should_keep_alive()
        self.transport.write(encode_response(response, head_only=method == "HEAD", close=close))
        if close:
            self.transport.close()


def _node_id(prefix: str) -> str:
    path = os.path.join(prefix, NODE_ID_FILE)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        node = str(uuid.uuid4())
        try:
            with open(path, "w") as f:
                f.write(node)
        except OSError:
            pass
        return node


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_control(settings: Settings, config: Config, listen: socket.socket, arena: Arena,
                ready_fd: int, health: HealthTable | None = None, memory: "NodeMemory | None" = None) -> int:
    prepare_child()
    if not settings.admin_token and not _is_loopback(settings.admin_listen.host):
        log.warning("the Admin API listens on %s without a token: anyone who can reach it can change the "
                    "config (set RINGGATE_ADMIN_TOKEN, or listen on 127.0.0.1)", settings.admin_listen)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    state = ConfigState(settings.prefix, arena, fallback=config)
    health = health if health is not None else HealthTable(1)
    node_id = _node_id(settings.prefix)

    def running_config() -> Config:
        return state.snapshot.config

    def config_id() -> tuple[str | None, int]:
        snapshot = state.snapshot
        return snapshot.config.config_hash, snapshot.generation

    source = StatsSource(
        arena=arena, series=memory.series if memory is not None else None, node_id=node_id, pid=os.getppid(),
        config=config_id, health=health_provider(running_config, health),
        breakers=breaker_provider(running_config, health),
        fallbacks=fallback_provider(memory.shdict if memory is not None else None),
    )
    app = AdminApp(AdminContext(settings, state, arena, node_id, health=health, stats=source))
    server = loop.run_until_complete(loop.create_server(lambda: AdminProtocol(app), sock=listen))
    stats_path = os.path.join(settings.prefix, STATS_SOCKET)
    stats_server = loop.run_until_complete(serve_stats(stats_path, source.build))
    # Active health checks run here, once per node, never on a worker's request path.
    prober = ActiveProber(loop, health, settings)
    probed = [state.snapshot.config.config_hash]
    prober.apply_config(state.snapshot.config)

    def follow_config() -> None:
        current = state.snapshot.config  # reloads the snapshot when the generation moved
        if current.config_hash != probed[0]:
            probed[0] = current.config_hash
            prober.apply_config(current)
        loop.call_later(0.2, follow_config)

    loop.call_later(0.2, follow_config)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    report_ready(ready_fd, b"c")
    try:
        loop.run_until_complete(stop.wait())
        server.close()
        stop_stats(stats_server, stats_path)
        loop.run_until_complete(prober.close())
    finally:
        loop.close()
    return 0
