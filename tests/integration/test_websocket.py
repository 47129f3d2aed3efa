"""WebSocket through the real gateway: the handshake forwarded on a fresh upstream connection, frames
both ways (with back-pressure), a close from each side, idle timeout, a refused handshake, plugins.

The origin is a small RFC 6455 server written here (asyncio, its own thread); the client speaks frames
over a raw socket, so every byte the gateway passes on is visible.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway, free_port

pytestmark = pytest.mark.integration

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8
IDLE_TIMEOUT_MS = 800


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; clients mask (RFC 6455 5.3), servers do not."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, (0x80 if mask else 0) | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, (0x80 if mask else 0) | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, (0x80 if mask else 0) | 127, length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(key, payload)


def _unmask(key: bytes, payload: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def parse_frame(buf: bytes) -> tuple[int, bool, bytes, int] | None:
    """(opcode, masked, payload, bytes used) of the first whole frame in buf, or None if incomplete."""
    if len(buf) < 2:
        return None
    opcode, second = buf[0] & 0x0F, buf[1]
    masked, length, pos = bool(second & 0x80), second & 0x7F, 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, pos = struct.unpack("!Q", buf[2:10])[0], 10
    key = b""
    if masked:
        key, pos = buf[pos:pos + 4], pos + 4
    if len(buf) < pos + length:
        return None
    payload = buf[pos:pos + length]
    return opcode, masked, _unmask(key, payload) if masked else payload, pos + length


def head_fields(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line of an HTTP head, and its headers by lowercase name."""
    lines = head.decode("latin-1").strip("\r\n").split("\r\n")
    pairs = (line.partition(":") for line in lines[1:])
    return lines[0], {name.strip().lower(): value.strip() for name, _, value in pairs}


# ---------------------------------------------------------------------------
# The origin


class WebSocketOrigin:
    """Every path but /refuse: 101, a text frame "hello" in the same write as the head, then each data
    frame echoed; the text "stall" makes it stop reading for 0.3 s (then echo it), the text
    "server-close" makes it send Close 1000 and hang up; a client Close is
    answered with a Close, then the server closes the TCP connection (RFC 6455 7.1.1).
    /refuse: 403 with a body, on a keep-alive connection."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        def shutdown() -> None:
            self.server.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(shutdown)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                first, headers = head_fields(await reader.readuntil(b"\r\n\r\n"))
                path = first.split(" ")[1]
                self.handshakes.append({"path": path, "headers": headers, "peer": writer.get_extra_info("peername")})
                if path == "/refuse":
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\n"
                                 b"forbidden")
                    await writer.drain()
                    continue
                accept = accept_key(headers["sec-websocket-key"].encode())
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + frame(OP_TEXT, b"hello", False))
                await self._echo(reader, writer)
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while True:
            parsed = parse_frame(buf)
            if parsed is None:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
                continue
            opcode, masked, payload, used = parsed
            buf = buf[used:]
            if not masked:
                writer.write(frame(OP_CLOSE, struct.pack("!H", 1002), False))  # protocol error
                return
            if opcode == OP_CLOSE:
                writer.write(frame(OP_CLOSE, payload, False))
                await writer.drain()
                return
            if opcode == OP_TEXT and payload == b"stall":
                await asyncio.sleep(0.3)  # read nothing for a while: the gateway's writes here back up
            if opcode == OP_TEXT and payload == b"server-close":
                writer.write(frame(OP_CLOSE, struct.pack("!H", 1000), False))
                await writer.drain()
                return
            writer.write(frame(opcode, payload, False))
            await writer.drain()


# ---------------------------------------------------------------------------
# The client


class WSClient:
    """A WebSocket client over a raw socket; `first_frame` goes in the same send as the handshake."""

    def __init__(self, port: int, path: str, first_frame: bytes = b"", receive_buffer: int | None = None,
                 tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock = tls.wrap_socket(sock, server_hostname="ws.example.test") if tls is not None else sock
        self.key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: ws.example.test\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: " + self.key + b"\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n" + first_frame)
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, f"closed before an answer head: {self.buf!r}"
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        first, self.headers = head_fields(head)
        self.status = int(first.split(" ")[1])

    def send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(frame(opcode, payload, True))

    def receive(self) -> tuple[int, bytes]:
        while True:
            parsed = parse_frame(self.buf)
            if parsed is not None:
                opcode, masked, payload, used = parsed
                assert not masked, "server frames are not masked"
                self.buf = self.buf[used:]
                return opcode, payload
            data = self.sock.recv(262144)
            assert data, "connection closed in the middle of a frame"
            self.buf += data

    def read_rest(self) -> bytes:
        """Everything until the gateway closes the connection (if it never does, the socket timeout fails the test)."""
        chunks = [self.buf]
        self.buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------
# The gateway


class Env:
    def __init__(self, gateway: Gateway, origin: WebSocketOrigin, tls_port: int) -> None:
        self.gateway = gateway
        self.origin = origin
        self.port = gateway.proxy_port
        self.tls_port = tls_port

    def status(self) -> dict[str, int]:
        return request(self.gateway.admin_port, "GET", "/status").json()["server"]

    def wait_status(self, **expected: int) -> dict[str, int]:
        deadline = time.monotonic() + 5
        while True:
            server = self.status()
            if all(server[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
                return server
            time.sleep(0.02)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    ws = WebSocketOrigin()
    plain = OriginServer("plain").start()
    url = f"http://127.0.0.1:{ws.port}"
    config = {
        "_format_version": "3.0",
        "services": [
            {"name": "ws", "url": url, "routes": [{"name": "ws", "paths": ["/echo", "/refuse"], "strip_path": False}]},
            {"name": "ws-idle", "url": url, "read_timeout": IDLE_TIMEOUT_MS,
             "routes": [{"name": "ws-idle", "paths": ["/idle"], "strip_path": False}]},
            {"name": "ws-plugins", "url": url,
             "routes": [{"name": "correlated", "paths": ["/correlated"], "strip_path": False}]},
            {"name": "plain", "url": f"http://{plain.address}", "routes": [{"name": "plain", "paths": ["/plain"]}]},
        ],
        "plugins": [{"name": "correlation-id", "route": "correlated", "config": {"echo_downstream": True}}],
    }
    tmp: Path = tmp_path_factory.mktemp("websocket")
    gateway = Gateway(config, tmp)
    tls_port = free_port()  # plain and TLS listeners (the generated default certificate)
    gateway.args += ["--proxy-listen", f"127.0.0.1:{gateway.proxy_port}, 127.0.0.1:{tls_port} ssl"]
    try:
        gateway.start()
        yield Env(gateway, ws, tls_port)
    finally:
        gateway.stop()
        ws.stop()
        plain.stop()
    assert "Traceback" not in gateway.log(), gateway.log()


def test_echo_both_ways_then_client_close(env: Env) -> None:
    before = env.wait_status(connections_active=0)
    seen = len(env.origin.handshakes)
    client = WSClient(env.port, "/echo", first_frame=frame(OP_TEXT, b"sent with the handshake", True),
                      receive_buffer=4096)
    try:
        assert client.status == 101
        assert client.headers["upgrade"].lower() == "websocket"
        assert client.headers["connection"].lower() == "upgrade"
        assert client.headers["sec-websocket-accept"] == accept_key(client.key).decode()
        assert "x-kong-request-id" in client.headers
        forwarded = env.origin.handshakes[seen]["headers"]
        assert forwarded["upgrade"] == "websocket"
        assert "upgrade" in forwarded["connection"].lower()
        assert forwarded["sec-websocket-key"] == client.key.decode()
        assert forwarded["sec-websocket-version"] == "13"
        assert forwarded["x-forwarded-for"] == "127.0.0.1"

        # The origin's frame that came with its 101, then the echo of the frame pipelined after the head.
        assert client.receive() == (OP_TEXT, b"hello")
        assert client.receive() == (OP_TEXT, b"sent with the handshake")

        # Back-pressure both ways: 200 KiB frames, 6 MiB in all, more than the sockets hold, while the
        # origin reads nothing for 0.3 s ("stall"), then the client nothing for 0.3 s more (small receive
        # buffer). The gateway's writes to each stall in turn, it stops reading the other side, and once
        # both read again every byte arrives, in order.
        payloads = [os.urandom(200 * 1024) for _ in range(30)]

        def send_all() -> None:
            client.send(OP_TEXT, b"stall")
            for payload in payloads:
                client.send(OP_BINARY, payload)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        time.sleep(0.6)
        assert client.receive() == (OP_TEXT, b"stall")
        for payload in payloads:
            assert client.receive() == (OP_BINARY, payload)
        sender.join(5)
        assert not sender.is_alive()

        # The tunnel counts as an open connection, and ordinary requests go on beside it.
        assert request(env.port, "GET", "/plain").status == 200
        during = env.wait_status(connections_active=before["connections_active"] + 1)
        assert during["connections_active"] == before["connections_active"] + 1

        client.send(OP_CLOSE, struct.pack("!H", 1000))
        assert client.receive() == (OP_CLOSE, struct.pack("!H", 1000))
        assert client.read_rest() == b""  # then the connection ends
    finally:
        client.close()
    # The WebSocket request is recorded once, when the tunnel ends (plus the /plain request).
    after = env.wait_status(connections_active=before["connections_active"],
                            total_requests=before["total_requests"] + 2)
    assert after["connections_active"] == before["connections_active"]
    assert after["total_requests"] == before["total_requests"] + 2


def test_server_close_reaches_the_client(env: Env) -> None:
    client = WSClient(env.port, "/echo")
    try:
        assert client.status == 101
        assert client.receive() == (OP_TEXT, b"hello")
        client.send(OP_TEXT, b"server-close")
        assert client.receive() == (OP_CLOSE, struct.pack("!H", 1000))
        assert client.read_rest() == b""
    finally:
        client.close()


def test_idle_tunnel_closes_after_read_timeout(env: Env) -> None:
    client = WSClient(env.port, "/idle")
    try:
        assert client.status == 101
        assert client.receive() == (OP_TEXT, b"hello")
        # Traffic keeps it open past one read_timeout (800 ms) in total...
        for i in range(4):
            time.sleep(0.3)
            client.send(OP_TEXT, b"tick %d" % i)
            assert client.receive() == (OP_TEXT, b"tick %d" % i)
        # ...silence closes it.
        quiet_since = time.monotonic()
        assert client.read_rest() == b""
        assert time.monotonic() - quiet_since >= 0.5
    finally:
        client.close()


def test_refused_handshake_returned_as_is(env: Env) -> None:
    seen = len(env.origin.handshakes)
    client = WSClient(env.port, "/refuse", first_frame=frame(OP_TEXT, b"never forwarded", True))
    try:
        assert client.status == 403
        assert client.headers["content-length"] == "9"
        assert client.headers["connection"] == "close"
        assert "upgrade" not in client.headers
        assert client.read_rest() == b"forbidden"
    finally:
        client.close()
    # The upstream kept its connection alive after the 403; the next handshake still gets a fresh one.
    client = WSClient(env.port, "/echo")
    try:
        assert client.status == 101
    finally:
        client.close()
    refused, accepted = env.origin.handshakes[seen], env.origin.handshakes[seen + 1]
    assert refused["path"] == "/refuse" and accepted["path"] == "/echo"
    assert refused["peer"] != accepted["peer"]


def test_plugins_run_on_the_handshake(env: Env) -> None:
    seen = len(env.origin.handshakes)
    client = WSClient(env.port, "/correlated")
    try:
        assert client.status == 101
        correlation = client.headers["kong-request-id"]  # header_filter ran on the 101
        assert env.origin.handshakes[seen]["headers"]["kong-request-id"] == correlation  # access ran
        assert client.receive() == (OP_TEXT, b"hello")
        client.send(OP_BINARY, b"\x00\x01 untouched")
        assert client.receive() == (OP_BINARY, b"\x00\x01 untouched")
    finally:
        client.close()


def test_websocket_over_tls(env: Env) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    seen = len(env.origin.handshakes)
    client = WSClient(env.tls_port, "/echo", first_frame=frame(OP_TEXT, b"early", True), tls=context)
    try:
        assert client.status == 101
        assert env.origin.handshakes[seen]["headers"]["x-forwarded-proto"] == "https"
        assert client.receive() == (OP_TEXT, b"hello")
        assert client.receive() == (OP_TEXT, b"early")
        payload = os.urandom(200 * 1024)
        client.send(OP_BINARY, payload)
        assert client.receive() == (OP_BINARY, payload)
        client.send(OP_CLOSE, struct.pack("!H", 1000))
        assert client.receive() == (OP_CLOSE, struct.pack("!H", 1000))
        assert client.read_rest() == b""
    finally:
        client.close()


def test_other_upgrades_stay_plain_http(env: Env) -> None:
    # Without `Connection: upgrade` it is an ordinary request: no Upgrade header reaches the origin.
    resp = request(env.port, "GET", "/plain", headers={"Upgrade": "websocket"})
    assert resp.status == 200
    assert "upgrade" not in {name.lower() for name, _ in resp.json()["headers"]}
    # An upgrade to something else is answered as plain HTTP, then the connection closes (llhttp does
    # not read HTTP after an upgrade request).
    resp = request(env.port, "GET", "/plain", headers={"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings",
                                                      "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})
    assert resp.status == 200
    assert resp.header("connection") == "close"
    sent = {name.lower() for name, _ in resp.json()["headers"]}
    assert "upgrade" not in sent and "http2-settings" not in sent
