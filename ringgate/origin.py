"""A small real HTTP/1.1 origin server, for `ringgate demo` and for the integration tests.

Endpoints (any method):
  /status/<code>          answer with that status and a JSON body
  /sse?n=N&interval=S     N server-sent events, S seconds apart (chunked)
  /delay/<seconds>        wait, then answer
  /bytes/<n>              n bytes of body with Content-Length
  /chunked/<n>            n chunks of body
  /close-delimited        body ended by closing the connection (no length, no chunking)
  /drop                   close the connection without answering
  /truncate               announce 100 bytes, send 10, close
  anything else           JSON echo of the request (method, path, query, headers, body, server name)
`force_status` (attribute) answers every request with one status, whatever its path.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import parse_qs

import httptools
import orjson


class _OriginProtocol(asyncio.Protocol):
    def __init__(self, server: "OriginServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.queue: asyncio.Queue[tuple[str, bytes, list[tuple[str, str]], bytes, bool] | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.server.requests += 1
        self.server.log.append((method, self.url.decode("latin-1")))
        self.queue.put_nowait((method, self.url, self.headers, bytes(self.body), self.parser.should_keep_alive()))

    async def _serve(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None or self.transport is None or self.transport.is_closing():
                return
            method, url, headers, body, keep_alive = item
            try:
                keep = await self._answer(method, url.decode("latin-1"), headers, body, keep_alive)
            except ConnectionError:
                return
            if not keep:
                self.transport.close()
                return

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_reason(status)}", f"X-Origin: {self.server.name}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _answer(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                      keep_alive: bool) -> bool:
        t = self.transport
        assert t is not None
        path, _, query = url.partition("?")
        args = {k: v[0] for k, v in parse_qs(query).items()}
        parts = path.strip("/").split("/")
        conn = [] if keep_alive else [("Connection", "close")]
        forced = self.server.force_status
        if forced is not None or (parts[0] == "status" and len(parts) > 1):
            status = forced if forced is not None else int(parts[1])
            payload = orjson.dumps({"status": status, "server": self.server.name})
            t.write(self._head(status, [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(payload)))] + conn) + payload)
            return keep_alive
        if parts[0] == "sse":
            count = int(args.get("n", "5"))
            interval = float(args.get("interval", "0.2"))
            t.write(self._head(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                     ("Transfer-Encoding", "chunked")] + conn))
            for i in range(count):
                event = f"id: {i}\ndata: {{\"n\": {i}, \"server\": \"{self.server.name}\", \"t\": {time.time()}}}\n\n"
                data = event.encode()
                t.write(b"%x\r\n%s\r\n" % (len(data), data))
                if i + 1 < count:
                    await asyncio.sleep(interval)
            t.write(b"0\r\n\r\n")
            return keep_alive
        if parts[0] == "delay" and len(parts) > 1:
            await asyncio.sleep(float(parts[1]))
        if parts[0] == "bytes" and len(parts) > 1:
            payload = b"x" * int(parts[1])
            t.write(self._head(200, [("Content-Type", "application/octet-stream"),
                                     ("Content-Length", str(len(payload)))] + conn) + payload)
            return keep_alive
        if parts[0] == "chunked" and len(parts) > 1:
            t.write(self._head(200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")] + conn))
            for i in range(int(parts[1])):
                data = f"chunk {i}\n".encode()
                t.write(b"%x\r\n%s\r\n" % (len(data), data))
                await asyncio.sleep(0.01)
            t.write(b"0\r\n\r\n")
            return keep_alive
        if parts[0] == "close-delimited":
            t.write(self._head(200, [("Content-Type", "text/plain"), ("Connection", "close")]))
            for i in range(3):
                t.write(f"part {i}\n".encode())
                await asyncio.sleep(0.01)
            return False
        if parts[0] == "drop":
            return False
        if parts[0] == "truncate":
            t.write(self._head(200, [("Content-Type", "text/plain"), ("Content-Length", "100")]) + b"x" * 10)
            await asyncio.sleep(0.05)
            return False
        payload = orjson.dumps({
            "server": self.server.name,
            "method": method,
            "path": path,
            "query": query,
            "headers": headers,
            "body": body.decode("latin-1"),
        })
        t.write(self._head(200, [("Content-Type", "application/json"),
                                 ("Content-Length", str(len(payload)))] + conn) + payload)
        return keep_alive


def _reason(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class OriginServer:
    """Runs on its own loop in a background thread; `port` is an ephemeral loopback port."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # set: serve HTTPS with this server-side context
        self.requests = 0
        self.connections = 0
        self.log: list[tuple[str, str]] = []
        # Set: every request is answered with this status (a target that turns sick, then recovers).
        self.force_status: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._ready = threading.Event()

    def start(self) -> "OriginServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True, name=f"origin-{self.name}")
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._server = loop.run_until_complete(loop.create_server(lambda: _OriginProtocol(self), sock=sock,
                                                                  ssl=self.ssl_context))
        self._ready.set()
        loop.run_forever()
        self._server.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    def stop(self) -> None:
        """Stop serving (idempotent: a test may stop an origin to simulate its death, and its fixture again)."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass  # closed between the check and the call
        if self._thread is not None:
            self._thread.join(5)

    def reset_counts(self) -> None:
        self.requests = 0
        self.connections = 0
        self.log.clear()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
