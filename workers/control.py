"""The control process: the admin listener (a minimal read-only Admin API for now).

It runs in its own process so that admin work never shares a loop with proxied
traffic. Routes served: GET / (node info) and GET /status (Kong's shape, DB-less).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

import httptools
import orjson
import uvloop

from ringgate import __version__
from ringgate.config.store import load_snapshot
from workers import http11
from workers.child import prepare_child, report_ready

if TYPE_CHECKING:
    from ringgate.config import Config
    from ringgate.settings import Settings
    from shared_state.arena import Arena

NODE_ID_FILE = "node_id"


def _json(status: int, body: Any) -> bytes:
    payload = orjson.dumps(body)
    return b"".join((
        http11.status_line(status),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(payload),
        b"Server: ", http11.SERVER_TOKEN, b"\r\n",
        b"Access-Control-Allow-Origin: *\r\n\r\n",
        payload,
    ))


class AdminProtocol(asyncio.Protocol):
    def __init__(self, handler: Callable[[str, str], bytes]) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(_json(400, {"message": "Bad request"}))  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        self.transport.write(self.handler(method, path))  # type: ignore[union-attr]
        if not self.parser.should_keep_alive():
            self.transport.close()  # type: ignore[union-attr]


class AdminApp:
    def __init__(self, settings: "Settings", config: "Config", arena: "Arena") -> None:
        self.settings = settings
        self.config = config
        self.arena = arena
        self.node_id = _node_id(settings.prefix)
        self.started = time.time()
        self.generation = arena.generation

    def _follow_reloads(self) -> None:
        generation = self.arena.generation
        if generation != self.generation:
            self.generation = generation
            self.config = load_snapshot(self.settings.prefix)

    def __call__(self, method: str, path: str) -> bytes:
        self._follow_reloads()
        path = path.rstrip("/") or "/"
        if method not in ("GET", "HEAD"):
            return _json(405, {"message": "Method not allowed"})
        if path == "/":
            return _json(200, {
                "tagline": "Welcome to ringgate",
                "version": __version__,
                "node_id": self.node_id,
                "hostname": socket.gethostname(),
                "configuration": {
                    "proxy_listen": [str(self.settings.proxy_listen)],
                    "admin_listen": [str(self.settings.admin_listen)],
                    "database": "off",
                    "prefix": os.path.abspath(self.settings.prefix),
                    "nginx_worker_processes": self.settings.worker_count,
                },
            })
        if path == "/status":
            totals = self.arena.totals()
            return _json(200, {
                "server": {
                    "connections_active": totals["connections_active"],
                    "connections_accepted": totals["connections_accepted"],
                    "total_requests": totals["requests"],
                },
                "configuration_hash": self.config.config_hash,
                "configuration_generation": self.generation,
                "memory": {"workers_lua_vms": []},
            })
        return _json(404, {"message": "Not found"})


def _node_id(prefix: str) -> str:
    import uuid
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


def run_control(settings: "Settings", config: "Config", listen: socket.socket, arena: "Arena",
                ready_fd: int) -> int:
    prepare_child()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app = AdminApp(settings, config, arena)
    server = loop.run_until_complete(loop.create_server(lambda: AdminProtocol(app), sock=listen))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    report_ready(ready_fd, b"c")
    try:
        loop.run_until_complete(stop.wait())
        server.close()
    finally:
        loop.close()
    return 0

