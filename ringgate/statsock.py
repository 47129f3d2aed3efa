"""The stats socket: a unix socket under --prefix speaking msgpack, served by the control process.

Framing: every request and every reply is one msgpack map; msgpack is self-delimiting, so
a connection carries a stream of them back to back (read it with msgpack.Unpacker). A
client may send several requests on one connection; replies come in the same order.

Requests:
    {"op": "stats"}  ->  {"ok": true, "stats": <the stats document, ringgate.stats>}
    {"op": "ping"}   ->  {"ok": true, "pong": <unix time, float>}
Errors:
    unknown op            ->  {"error": "unknown op 'x'", "ops": ["ping", "stats"]}   (connection stays)
    not a map with an op  ->  {"error": "..."}, then the connection is closed
    undecodable bytes, or a request over MAX_REQUEST_BYTES  ->  {"error": "..."}, then closed
    the document failed   ->  {"error": "stats unavailable: ..."}                     (connection stays)

One client cannot hurt another: requests are bounded, a client that stops reading its
replies is disconnected once MAX_PENDING_REPLY_BYTES are queued for it, at most
MAX_CONNECTIONS are served at once, and an idle connection is closed after IDLE_TIMEOUT_S.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

import msgpack

STATS_SOCKET = "stats.sock"
OPS = ("ping", "stats")
MAX_REQUEST_BYTES = 64 * 1024
MAX_PENDING_REPLY_BYTES = 16 * 1024 * 1024
MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 60.0
# sun_path is 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107

log = logging.getLogger("ringgate.statsock")


class StatsSocketError(OSError):
    pass


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


class StatsProtocol(asyncio.Protocol):
    """One client connection: decode requests as they arrive, answer each in order."""

    def __init__(self, server: _ServerState) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_REQUEST_BYTES)
        self.idle: asyncio.TimerHandle | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= MAX_CONNECTIONS:
            self._fail("too many stats connections")
            return
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._close)

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, message: str) -> None:
        """Answer an error and drop the connection: its stream can no longer be trusted."""
        self._send({"error": message})
        self._close()

    def _send(self, reply: dict[str, Any]) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(_pack(reply))
        if self.transport.get_write_buffer_size() > MAX_PENDING_REPLY_BYTES:
            log.warning("stats client not reading its replies; disconnecting it")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._arm_idle()
        try:
            self.unpacker.feed(data)
        except msgpack.BufferFull:
            self._fail(f"request larger than {MAX_REQUEST_BYTES} bytes")
            return
        while not self.closing:
            try:
                request = self.unpacker.unpack()
            except msgpack.OutOfData:
                return
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
                self._fail(f"malformed request: {exc.__class__.__name__}")
                return
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                self._fail("a request is a msgpack map with a string 'op'")
                return
            self._send(self.server.answer(request))


class _ServerState:
    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self.build = build
        self.connections: set[StatsProtocol] = set()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "ping":
            return {"ok": True, "pong": time.time()}
        if op == "stats":
            try:
                return {"ok": True, "stats": self.build()}
            except Exception as exc:  # a broken document must not take the socket down
                log.exception("building the stats document failed")
                return {"error": f"stats unavailable: {exc.__class__.__name__}: {exc}"}
        return {"error": f"unknown op {op!r}", "ops": list(OPS)}


def _check_path(path: str) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StatsSocketError(f"stats socket path too long for a unix socket ({MAX_SOCKET_PATH} bytes max): {path}")


def _remove_stale(path: str) -> None:
    """A socket left by a previous run is replaced; anything else at that path is an error."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StatsSocketError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


async def serve_stats(path: str, build: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
    """Listen on `path` (owner-only permissions) and answer requests with `build()` for stats."""
    _check_path(path)
    _remove_stale(path)
    state = _ServerState(build)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # created 0600: the stats are for the operator
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(128)
        sock.setblocking(False)
        return await asyncio.get_running_loop().create_unix_server(lambda: StatsProtocol(state), sock=sock)
    except BaseException:
        sock.close()
        raise


def stop_stats(server: asyncio.AbstractServer, path: str) -> None:
    """Stop listening and remove the socket file (a server made from a socket leaves it behind)."""
    server.close()
    with contextlib.suppress(OSError):
        _remove_stale(path)


def query(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request, wait for its reply (blocking). Raises OSError (e.g. FileNotFoundError,
    ConnectionRefusedError), TimeoutError, or StatsSocketError when the reply is not a map."""
    _check_path(path)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(_pack(request))
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 30)
        while True:
            with contextlib.suppress(msgpack.OutOfData):
                reply = unpacker.unpack()
                if not isinstance(reply, dict):
                    raise StatsSocketError(f"unexpected reply from the stats socket: {type(reply).__name__}")
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from {path} within {timeout} s")
            sock.settimeout(remaining)
            data = sock.recv(1 << 16)
            if not data:
                raise StatsSocketError(f"{path} closed the connection without a reply")
            unpacker.feed(data)
