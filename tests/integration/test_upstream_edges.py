"""Upstream edge cases end to end: TLS upstreams, retry rules, stale keep-alive, least-connections,
client connection semantics, interim answers and hop-by-hop headers (one gateway, 1 worker)."""
from __future__ import annotations

import asyncio
import http.client
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trustme

from ringgate.origin import OriginServer
from tests.integration.client import raw_exchange, request, status_of
from tests.integration.conftest import Gateway, free_port, serving

pytestmark = pytest.mark.integration

Handler = Callable[["RawOrigin", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawOrigin:
    """A hand-written origin on its own loop: `handler(origin, reader, writer, n)` serves connection n (from 0)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.log: list[tuple[int, bytes]] = []  # (connection number, request line) per request read
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"raw-origin-{self.port}")

    def start(self) -> RawOrigin:
        self.thread.start()  # the socket already listens: connections wait in the backlog until the loop runs
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._serve, sock=self.sock))
        self.loop.run_forever()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        try:
            await self.handler(self, reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader, n: int) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
        self.log.append((n, head.split(b"\r\n", 1)[0]))
        return head

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


async def answer_then_close(origin: RawOrigin, reader: Any, writer: Any, n: int) -> None:
    """One answer per connection, framed by Content-Length, no `Connection: close`; the socket closes 50 ms later."""
    if await origin.read_request(reader, n) is not None:
        writer.write(_ok(b"conn %d" % n))
        await writer.drain()
        await asyncio.sleep(0.05)


async def answer_then_swallow(origin: RawOrigin, reader: Any, writer: Any, n: int) -> None:
    """Answers a connection's first request; reads its second and closes without answering (the idle race)."""
    if await origin.read_request(reader, n) is not None:
        writer.write(_ok(b"conn %d" % n))
        await writer.drain()
        await origin.read_request(reader, n)


async def early_hints(origin: RawOrigin, reader: Any, writer: Any, n: int) -> None:
    while await origin.read_request(reader, n) is not None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(_ok(b"final body"))


async def hop_headers(origin: RawOrigin, reader: Any, writer: Any, n: int) -> None:
    while (head := await origin.read_request(reader, n)) is not None:
        if b" /double" in head.split(b"\r\n", 1)[0]:
            extra = b"Connection: X-Up-A\r\nConnection: X-Up-B\r\nX-Up-A: 1\r\nX-Up-B: 1\r\nX-Visible: yes\r\n"
        else:
            extra = (b"Connection: keep-alive, X-Up-Secret\r\nX-Up-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
                     b"Proxy-Connection: keep-alive\r\nX-Visible: yes\r\n")
        writer.write(_ok(b"ok", extra))


class Env:
    def __init__(self, gateway: Gateway, origins: dict[str, Any], dead_port: int) -> None:
        self.gateway = gateway
        self.o = origins
        self.dead_port = dead_port
        self.port = gateway.proxy_port


def _config(o: dict[str, Any], dead_port: int) -> dict[str, Any]:
    def svc(name: str, url: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "url": url, **extra, "routes": [{"name": name, "paths": [f"/{name}"]}]}

    return {
        "_format_version": "3.0",
        "upstreams": [
            {"name": "dpost-up", "targets": [{"target": o["dpost"].address}]},
            {"name": "dget-up", "targets": [{"target": o["dget"].address}]},
            {"name": "failover-up", "targets": [{"target": f"127.0.0.1:{dead_port}"}, {"target": o["live"].address}]},
            {"name": "lc-up", "algorithm": "least-connections",
             "targets": [{"target": o["lc_a"].address, "weight": 11}, {"target": o["lc_b"].address, "weight": 2}]},
        ],
        "services": [
            svc("tls-default", f"https://{o['tls_ok'].address}"),
            svc("tls-verify", f"https://{o['tls_strict'].address}", tls_verify=True),
            svc("dpost", "http://dpost-up", retries=3),
            svc("dget", "http://dget-up", retries=2),
            svc("dwarm", f"http://{o['dwarm'].address}", retries=3),
            svc("failover", "http://failover-up", retries=2, connect_timeout=1000),
            svc("stale", f"http://{o['stale'].address}"),
            svc("race", f"http://{o['race'].address}", retries=0),
            svc("lc", "http://lc-up"),
            svc("plain", f"http://{o['plain'].address}"),
            svc("early", f"http://{o['early'].address}"),
            svc("hop", f"http://{o['hop'].address}"),
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)
    origins: dict[str, Any] = {
        "tls_ok": OriginServer("tls-ok", ssl_context=server_tls),
        "tls_strict": OriginServer("tls-strict", ssl_context=server_tls),
        **{name: OriginServer(name) for name in ("dpost", "dget", "dwarm", "live", "lc_a", "lc_b", "plain")},
        "stale": RawOrigin(answer_then_close), "race": RawOrigin(answer_then_swallow),
        "early": RawOrigin(early_hints), "hop": RawOrigin(hop_headers),
    }
    for origin in origins.values():
        origin.start()
    dead_port = free_port()
    with serving(_config(origins, dead_port), tmp_path_factory.mktemp("edges"), origins.values()) as gateway:
        yield Env(gateway, origins, dead_port)


def _sent_headers(resp: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.json()["headers"]}


def _roundtrip(sock: socket.socket, payload: bytes, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    sock.sendall(payload)
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    return resp, resp.read()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


# 1. https upstream

def test_https_upstream_without_verification_by_default(env: Env) -> None:
    resp = request(env.port, "GET", "/tls-default/hello")
    assert resp.status == 200, resp.body  # a plain-text attempt would fail the origin's TLS handshake
    assert resp.json()["server"] == "tls-ok" and resp.json()["path"] == "/hello"


def test_https_upstream_tls_verify_rejects_untrusted_ca(env: Env) -> None:
    resp = request(env.port, "GET", "/tls-verify/hello")
    assert resp.status == 502, resp.body
    assert resp.json()["message"] == "An invalid response was received from the upstream server"
    assert env.o["tls_strict"].requests == 0 and env.o["tls_strict"].log == []


# 2. non-idempotent requests are not replayed

def test_post_dropped_by_upstream_is_sent_once(env: Env) -> None:
    resp = request(env.port, "POST", "/dpost/drop", body=b"charge the card once")
    assert resp.status == 502, resp.body
    assert env.o["dpost"].log == [("POST", "/drop")]


def test_get_dropped_by_single_target_is_retried(env: Env) -> None:
    resp = request(env.port, "GET", "/dget/drop")
    assert resp.status == 502, resp.body
    assert env.o["dget"].log == [("GET", "/drop")] * 3  # 1 + retries 2, all on the only target


def test_post_on_reused_connection_is_not_replayed(env: Env) -> None:
    # Regression: the stale-connection resend used to apply to any method, so the origin got this POST twice.
    assert request(env.port, "GET", "/dwarm/warm").status == 200  # leaves an idle pooled connection
    resp = request(env.port, "POST", "/dwarm/drop", body=b"charge the card once")
    assert resp.status == 502, resp.body
    assert [entry for entry in env.o["dwarm"].log if entry[0] == "POST"] == [("POST", "/drop")]


# 3. connect failures are retried for any method, with the whole body

def test_post_fails_over_from_refusing_target_with_full_body(env: Env) -> None:
    for i in range(10):
        body = os.urandom(40_000 + i)
        if i % 2:
            resp = request(env.port, "POST", f"/failover/up{i}", body=iter([body[:1000], body[1000:]]))
        else:
            resp = request(env.port, "POST", f"/failover/up{i}", body=body)
        assert resp.status == 200, (i, resp.body)
        echo = resp.json()
        assert echo["server"] == "live" and echo["path"] == f"/up{i}"
        assert echo["body"].encode("latin-1") == body, i
    assert [m for m, _ in env.o["live"].log] == ["POST"] * 10
    # round-robin over two targets puts the refusing one first for at least every other request
    assert env.gateway.log().count(f"connect to 127.0.0.1:{env.dead_port} failed") >= 5, env.gateway.log()


# 4. stale keep-alive connections

def test_upstream_closing_idle_connection_is_not_an_error(env: Env) -> None:
    first = request(env.port, "GET", "/stale/one")
    time.sleep(0.3)  # the origin has closed the connection the gateway pooled
    second = request(env.port, "GET", "/stale/two")
    assert (first.status, first.body) == (200, b"conn 0")
    assert (second.status, second.body) == (200, b"conn 1")
    assert env.o["stale"].connections == 2


def test_request_lost_on_reused_connection_is_resent_once_without_counting_a_try(env: Env) -> None:
    # retries: 0, so only the stale-connection resend (which is not a try) can turn these into 200s
    bodies = [request(env.port, "GET", f"/race/r{i}") for i in range(3)]
    assert [(r.status, r.body) for r in bodies] == [(200, b"conn 0"), (200, b"conn 1"), (200, b"conn 2")]
    assert env.o["race"].log == [
        (0, b"GET /r0 HTTP/1.1"),
        (0, b"GET /r1 HTTP/1.1"), (1, b"GET /r1 HTTP/1.1"),  # reused connection swallowed it, fresh one answered
        (1, b"GET /r2 HTTP/1.1"), (2, b"GET /r2 HTTP/1.1"),
    ]


# 5. least-connections follows in-flight requests

def test_least_connections_steers_away_from_busy_target(env: Env) -> None:
    # Weights 11:2: with B idle, A scores (c+1)/11 < 1/2 until it holds 5 requests; weighted round-robin
    # (ignoring in-flight counts) would send ~85% of the quick requests to A.
    a, b = env.o["lc_a"], env.o["lc_b"]
    slow: list[Any] = []
    threads = [threading.Thread(target=lambda: slow.append(request(env.port, "GET", "/lc/delay/1.0")))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 3
    while len(a.log) + len(b.log) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.log == [("GET", "/delay/1.0")] * 5 and b.log == []
    quick = [request(env.port, "GET", "/lc/quick").header("x-origin") for _ in range(6)]
    assert quick == ["lc_b"] * 6
    for thread in threads:
        thread.join(5)
    assert [(r.status, r.header("x-origin")) for r in slow] == [(200, "lc_a")] * 5
    assert request(env.port, "GET", "/lc/after").header("x-origin") == "lc_a"  # A's slots were released


# 6. client connection semantics

def test_connection_close_is_answered_and_honoured(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        resp, _ = _roundtrip(sock, b"GET /plain/a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert resp.status == 200 and resp.getheader("Connection") is None
        resp, body = _roundtrip(sock, b"GET /plain/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert resp.status == 200 and b'"path":"/b"' in body
        assert resp.getheader("Connection") == "close"
        assert _closed_by_peer(sock)


def test_http10_keep_alive_keeps_connection_open(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        for path in (b"/plain/one", b"/plain/two"):
            resp, body = _roundtrip(sock, b"GET %s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % path)
            assert resp.status == 200 and b'"path":"/' + path.rsplit(b"/", 1)[1] in body
            assert resp.getheader("Connection") == "keep-alive"
        # a chunked upstream answer cannot be re-chunked for HTTP/1.0: close-delimited, and said so
        resp, body = _roundtrip(sock, b"GET /plain/chunked/2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert resp.status == 200 and body == b"chunk 0\nchunk 1\n"
        assert resp.getheader("Connection") == "close" and resp.getheader("Transfer-Encoding") is None
        assert _closed_by_peer(sock)


# 7. interim answers

def test_interim_1xx_answers_are_not_forwarded(env: Env) -> None:
    data = raw_exchange(env.port, b"GET /early/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(data) == 200, data
    assert data.count(b"HTTP/1.1 ") == 1 and b"103" not in data and b"Link" not in data, data
    assert data.endswith(b"\r\n\r\nfinal body")
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    for _ in range(3):  # the upstream connection stays usable after interim answers
        resp = request(env.port, "GET", "/early/again", conn=conn)
        assert (resp.status, resp.body) == (200, b"final body")
    conn.close()
    assert env.o["early"].connections == 1


# 8. hop-by-hop headers

def test_hop_by_hop_request_headers_are_not_forwarded(env: Env) -> None:
    resp = request(env.port, "GET", "/plain/h", headers={
        "Connection": "keep-alive, X-Secret", "X-Secret": "1", "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive", "X-Kept": "yes"})
    sent = _sent_headers(resp)
    assert "x-secret" not in sent and "keep-alive" not in sent and "proxy-connection" not in sent, sent
    assert sent["x-kept"] == "yes" and sent["connection"] == "keep-alive"


def test_hop_by_hop_response_headers_are_not_returned(env: Env) -> None:
    resp = request(env.port, "GET", "/hop/x")
    assert resp.status == 200 and resp.body == b"ok"
    names = {k.lower() for k, _ in resp.raw_headers}
    assert {"x-up-secret", "keep-alive", "proxy-connection", "connection"}.isdisjoint(names), resp.raw_headers
    assert resp.header("x-visible") == "yes"


def test_every_connection_field_of_a_request_counts(env: Env) -> None:
    # Regression: only the last Connection field's tokens used to be honoured.
    data = raw_exchange(env.port, b"GET /plain/h2 HTTP/1.1\r\nHost: x\r\nConnection: X-A\r\n"
                                  b"Connection: X-B, close\r\nX-A: 1\r\nX-B: 1\r\nX-Kept: yes\r\n\r\n")
    assert status_of(data) == 200 and b'["X-Kept","yes"]' in data, data
    assert b'["X-B","1"]' not in data  # named by the last Connection field: dropped
    assert b'["X-A","1"]' not in data, data  # named by the first one


def test_every_connection_field_of_a_response_counts(env: Env) -> None:
    # Regression: only the last Connection field's tokens used to be honoured.
    resp = request(env.port, "GET", "/hop/double")
    assert resp.status == 200 and resp.header("x-visible") == "yes"
    assert resp.header("x-up-b") is None and resp.header("x-up-a") is None, resp.raw_headers
