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


def test_connect_timeout_is_504_and_retried_elsewhere(gateway_factory: Callable[..., Gateway],
                                                      origin_factory: Callable[[str], OriginServer]) -> None:
    # A loopback listener whose accept queue is full: further SYNs are dropped, so connecting hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(full.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    live = origin_factory("live")
    hung = f"127.0.0.1:{full.getsockname()[1]}"
    config = {"_format_version": "3.0",
              "upstreams": [{"name": "mixed", "targets": [{"target": hung}, {"target": live.address}]},
                            {"name": "hung", "targets": [{"target": hung}]}],
              "services": [
                  {"name": "mixed", "url": "http://mixed", "connect_timeout": 300, "retries": 1,
                   "routes": [{"name": "mixed", "paths": ["/mixed"]}]},
                  {"name": "hung", "url": "http://hung", "connect_timeout": 300, "retries": 0,
                   "routes": [{"name": "hung", "paths": ["/hung"]}]}]}
    try:
        gateway = _gateway(gateway_factory, config)
        started = time.monotonic()
        resp = request(gateway.proxy_port, "GET", "/hung")
        assert resp.status == 504 and resp.json()["message"] == "The upstream server is timing out"
        assert 0.25 <= time.monotonic() - started < 3
        for _ in range(4):
            assert request(gateway.proxy_port, "GET", "/mixed").status == 200
    finally:
        for s in fillers:
            s.close()
        full.close()


def test_trusted_peer_keeps_its_forwarded_headers(gateway_factory: Callable[..., Gateway],
                                                  origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("trust")
    gateway = gateway_factory(_config(origin.address), workers=1, extra_args=["--trusted-ips", "127.0.0.0/8"])
    resp = request(gateway.proxy_port, "GET", "/t", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.example", "X-Forwarded-Port": "443",
        "X-Forwarded-Prefix": "/shop", "X-Forwarded-For": "203.0.113.9"})
    sent = {k.lower(): v for k, v in resp.json()["headers"]}
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-forwarded-host"] == "shop.example"
    assert sent["x-forwarded-port"] == "443"
    assert sent["x-forwarded-prefix"] == "/shop"
    assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert [k for k, _ in resp.json()["headers"]].count("X-Forwarded-Port") == 1
