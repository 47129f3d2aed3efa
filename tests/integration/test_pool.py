"""The per-worker upstream keep-alive pool and the write timeout, through RINGGATE_* settings."""
from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def _config(address: str, **service: Any) -> dict[str, Any]:
    return {"_format_version": "3.0", "services": [
        {"name": "s", "url": f"http://{address}", **service, "routes": [{"name": "r", "paths": ["/"]}]}]}


def _gateway(gateway_factory: Callable[..., Gateway], config: dict[str, Any], **env: str) -> Gateway:
    return gateway_factory(config, workers=1, env={f"RINGGATE_{k.upper()}": v for k, v in env.items()})


def test_requests_per_connection_cap(gateway_factory: Callable[..., Gateway],
                                     origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("cap")
    gateway = _gateway(gateway_factory, _config(origin.address), upstream_keepalive_requests="3")
    conn = http.client.HTTPConnection("127.0.0.1", gateway.proxy_port, timeout=5)
    for _ in range(9):
        assert request(gateway.proxy_port, "GET", "/x", conn=conn).status == 200
    conn.close()
    assert origin.connections == 3  # each upstream connection served exactly 3 requests


def test_idle_timeout_closes_pooled_connections(gateway_factory: Callable[..., Gateway],
                                                origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("idle")
    gateway = _gateway(gateway_factory, _config(origin.address), upstream_keepalive_timeout="0.3")
    assert request(gateway.proxy_port, "GET", "/a").status == 200
    assert request(gateway.proxy_port, "GET", "/b").status == 200
    assert origin.connections == 1  # reused while fresh
    time.sleep(1.0)
    assert request(gateway.proxy_port, "GET", "/c").status == 200
    assert origin.connections == 2  # the idle one was closed, a new one opened


def test_idle_cap_keeps_at_most_that_many(gateway_factory: Callable[..., Gateway],
                                          origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("idlecap")
    gateway = _gateway(gateway_factory, _config(origin.address), upstream_keepalive_pool="1")

    def burst() -> None:
        threads = [threading.Thread(target=request, args=(gateway.proxy_port, "GET", "/delay/0.3"))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

    burst()
    assert origin.connections == 4  # four at once need four connections
    burst()
    # Only one of the first four stayed idle in the pool, so the second burst opened three more.
    assert origin.connections == 7


def test_upstream_that_stops_reading_hits_write_timeout(gateway_factory: Callable[..., Gateway],
                                                       tmp_path: Path) -> None:
    # A listener that accepts and never reads: the request body fills the socket buffers.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sink.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sink.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{sink.getsockname()[1]}"
        gateway = _gateway(gateway_factory, _config(address, write_timeout=500, read_timeout=60000, retries=0))
        body = b"x" * (64 << 20)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=20) as client:
            client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            sent = 0
            client.settimeout(0.5)
            answer = b""
            while sent < len(body) and time.monotonic() - started < 15:
                try:
                    sent += client.send(body[sent:sent + (1 << 20)])
                except socket.timeout:
                    pass
                try:
                    answer += client.recv(65536)
                except (socket.timeout, BlockingIOError):
                    pass
                if answer:
                    break
            client.settimeout(10)
            while b"\r\n\r\n" not in answer:
                data = client.recv(65536)
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
        assert time.monotonic() - started < 12
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        sink.close()
