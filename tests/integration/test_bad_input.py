"""Malformed and hostile requests: a clear 4xx, the connection closed, nothing forwarded, no worker lost."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import raw_exchange, request, status_of
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, OriginServer]]:
    origin = OriginServer("bad").start()
    config = {"_format_version": "3.0", "services": [
        {"name": "s", "url": f"http://{origin.address}", "routes": [{"name": "r", "paths": ["/"]}]}]}
    tmp: Path = tmp_path_factory.mktemp("bad")
    gateway = Gateway(config, tmp, workers=1, env={"RINGGATE_CLIENT_HEADER_TIMEOUT": "1"}).start()
    try:
        yield gateway, origin
    finally:
        gateway.stop()
        origin.stop()


CASES = {
    "content-length with transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "differing duplicate content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "invalid chunk size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n", 400),
    "garbage request line": (b"HELLO\r\n\r\n", 400),
    "space in header name": (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    "missing host on 1.1": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "duplicate host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "request line too long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "headers too large": (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
    "too many headers": (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150))
                         + b"\r\n", 431),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_and_closed(gw: tuple[Gateway, OriginServer], name: str) -> None:
    gateway, origin = gw
    payload, status = CASES[name]
    before = origin.requests
    data = raw_exchange(gateway.proxy_port, payload)
    assert data, f"{name}: no answer"
    assert status_of(data) == status, data[:200]
    assert b"Connection: close" in data.split(b"\r\n\r\n")[0]
    assert origin.requests == before, f"{name}: something reached the upstream"
    # The worker is still serving.
    assert request(gateway.proxy_port, "GET", "/ok").status == 200


def test_smuggling_attempt_forwards_nothing_ambiguous(gw: tuple[Gateway, OriginServer]) -> None:
    gateway, origin = gw
    before = len(origin.log)
    payload = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    data = raw_exchange(gateway.proxy_port, payload)
    assert status_of(data) == 400
    assert all(path != "/smuggled" for _, path in origin.log[before:])


def test_client_that_never_finishes_headers_is_dropped(gw: tuple[Gateway, OriginServer]) -> None:
    gateway, _ = gw
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the gateway
        assert time.monotonic() - started < 4


def test_idle_connection_without_request_is_dropped(gw: tuple[Gateway, OriginServer]) -> None:
    gateway, _ = gw
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - started < 4


def test_bad_percent_encoding_is_400(gw: tuple[Gateway, OriginServer]) -> None:
    gateway, _ = gw
    data = raw_exchange(gateway.proxy_port, b"GET /a%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(data) == 400
