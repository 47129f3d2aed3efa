"""The data plane end to end: the real gateway (CLI, 2 workers) in front of real origin servers."""
from __future__ import annotations

import http.client
import socket
import time
from typing import Any, Iterator

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import raw_exchange, request, status_of
from tests.integration.conftest import Gateway, free_port, serving

pytestmark = pytest.mark.integration


class Env:
    def __init__(self, gateway: Gateway, origins: dict[str, OriginServer], dead_port: int) -> None:
        self.gateway = gateway
        self.origins = origins
        self.dead_port = dead_port

    @property
    def port(self) -> int:
        return self.gateway.proxy_port


def _config(o: dict[str, OriginServer], dead_port: int) -> dict[str, Any]:
    a, b, c = o["a"], o["b"], o["c"]
    return {
        "_format_version": "3.0",
        "upstreams": [
            {"name": "pair", "targets": [{"target": a.address, "weight": 100}, {"target": b.address, "weight": 100}]},
            {"name": "weighted", "targets": [{"target": a.address, "weight": 300}, {"target": b.address, "weight": 100}]},
            {"name": "half-dead", "targets": [{"target": f"127.0.0.1:{dead_port}"}, {"target": c.address}]},
            {"name": "all-dead", "targets": [{"target": f"127.0.0.1:{dead_port}"}]},
            {"name": "hashed", "hash_on": "header", "hash_on_header": "X-User",
             "targets": [{"target": a.address}, {"target": b.address}, {"target": c.address}]},
            {"name": "sticky", "hash_on": "cookie", "hash_on_cookie": "rg-session", "hash_on_cookie_path": "/app",
             "targets": [{"target": a.address}, {"target": b.address}]},
            {"name": "zero", "targets": [{"target": a.address, "weight": 0}]},
            {"name": "named-host", "host_header": "api.internal", "targets": [{"target": a.address}]},
        ],
        "services": [
            {"name": "pair", "url": "http://pair", "routes": [
                {"name": "pair", "paths": ["/pair"]},
                {"name": "by-host", "hosts": ["api.example.com"]},
                {"name": "wild", "hosts": ["*.wild.test"], "paths": ["/w"], "strip_path": False},
            ]},
            {"name": "weighted", "url": "http://weighted", "routes": [{"name": "weighted", "paths": ["/weighted"]}]},
            {"name": "pathed", "url": f"http://{a.address}/base", "routes": [
                {"name": "strip", "paths": ["/strip"], "strip_path": True},
                {"name": "nostrip", "paths": ["/nostrip"], "strip_path": False},
                {"name": "regex", "paths": [r"~/items/(?<id>\d+)$"], "strip_path": False},
                {"name": "preserve", "paths": ["/preserve"], "preserve_host": True},
                {"name": "methods", "paths": ["/m"], "methods": ["POST"]},
                {"name": "hdr", "paths": ["/h"], "headers": {"x-version": ["2"]}},
            ]},
            {"name": "direct", "url": f"http://{b.address}", "routes": [
                {"name": "direct", "paths": ["/direct"], "strip_path": False},
            ]},
            {"name": "localhost-name", "url": f"http://localhost:{b.port}", "routes": [
                {"name": "dns", "paths": ["/dns"]},
            ]},
            {"name": "half-dead", "url": "http://half-dead", "retries": 3, "connect_timeout": 1000,
             "routes": [{"name": "half-dead", "paths": ["/half-dead"]}]},
            {"name": "all-dead", "url": "http://all-dead", "retries": 2, "connect_timeout": 1000,
             "routes": [{"name": "all-dead", "paths": ["/all-dead"]}]},
            {"name": "slow", "url": f"http://{c.address}", "read_timeout": 300, "retries": 0,
             "routes": [{"name": "slow", "paths": ["/slow"]}]},
            {"name": "hashed", "url": "http://hashed", "routes": [{"name": "hashed", "paths": ["/hashed"]}]},
            {"name": "sticky", "url": "http://sticky", "routes": [{"name": "sticky", "paths": ["/app"],
                                                                   "strip_path": False}]},
            {"name": "zero", "url": "http://zero", "routes": [{"name": "zero", "paths": ["/zero"]}]},
            {"name": "named-host", "url": "http://named-host", "routes": [{"name": "named-host", "paths": ["/nh"]}]},
            {"name": "disabled", "url": f"http://{a.address}", "enabled": False,
             "routes": [{"name": "disabled", "paths": ["/disabled"]}]},
            {"name": "stream", "url": f"http://{c.address}", "routes": [
                {"name": "stream", "paths": ["/sse", "/chunked", "/close-delimited", "/truncate", "/bytes", "/drop",
                                             "/status"], "strip_path": False},
            ]},
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    origins = {name: OriginServer(name).start() for name in ("a", "b", "c")}
    dead_port = free_port()
    with serving(_config(origins, dead_port), tmp_path_factory.mktemp("proxy"), origins.values(), 2) as gateway:
        yield Env(gateway, origins, dead_port)


def test_proxies_to_upstream_with_kong_headers(env: Env) -> None:
    resp = request(env.port, "GET", "/direct/hello?x=1&y=2", headers={"Host": "Example.COM:8080"})
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert echo["server"] == "b"
    assert echo["path"] == "/direct/hello" and echo["query"] == "x=1&y=2"
    sent = {k.lower(): v for k, v in echo["headers"]}
    assert sent["host"] == env.origins["b"].address  # service host, port appended since not 80
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-real-ip"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == "example.com"
    assert sent["x-forwarded-port"] == str(env.port)
    assert sent["x-forwarded-path"] == "/direct/hello"
    assert sent["via"].startswith("1.1 ringgate/")
    assert "connection" in sent and sent["connection"] == "keep-alive"
    assert resp.header("x-kong-upstream-latency").isdigit()
    assert resp.header("x-kong-proxy-latency").isdigit()
    assert resp.header("via").endswith("ringgate/0.1.0")
    assert resp.header("x-origin") == "b"


def test_client_forwarded_headers_are_not_trusted_by_default(env: Env) -> None:
    resp = request(env.port, "GET", "/direct/x", headers={
        "X-Forwarded-For": "10.1.1.1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.test",
        "X-Real-IP": "10.2.2.2"})
    sent = {k.lower(): v for k, v in resp.json()["headers"]}
    assert sent["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"  # appended, as Kong does for everyone
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == "127.0.0.1"
    assert sent["x-real-ip"] == "127.0.0.1"


def test_no_route_is_kong_404_json_and_text(env: Env) -> None:
    resp = request(env.port, "GET", "/nowhere")
    assert resp.status == 404
    assert resp.header("content-type") == "application/json; charset=utf-8"
    body = resp.json()
    assert body["message"] == "no Route matched with those values"
    assert len(body["request_id"]) == 32
    text = request(env.port, "GET", "/nowhere", headers={"Accept": "text/plain"})
    assert text.status == 404
    assert text.header("content-type").startswith("text/plain")
    assert text.body.decode().startswith("no Route matched with those values\nrequest_id: ")


@pytest.mark.parametrize("path, upstream_path", [
    ("/strip", "/base"),
    ("/strip/x/y", "/base/x/y"),
    ("/stripx", "/base/x"),
    ("/nostrip/a", "/base/nostrip/a"),
    ("/items/42", "/base/items/42"),
    ("/strip/a/../b//c", "/base/b/c"),
    ("/strip/%7Euser/%2F", "/base/~user/%2F"),
])
def test_path_joining_and_normalization(env: Env, path: str, upstream_path: str) -> None:
    resp = request(env.port, "GET", path)
    assert resp.status == 200, resp.body
    assert resp.json()["path"] == upstream_path


def test_strip_sets_forwarded_prefix(env: Env) -> None:
    sent = {k.lower(): v for k, v in request(env.port, "GET", "/strip/x").json()["headers"]}
    assert sent["x-forwarded-prefix"] == "/strip"


def test_host_routing_wildcard_methods_headers(env: Env) -> None:
    assert request(env.port, "GET", "/any", headers={"Host": "api.example.com"}).status == 200
    assert request(env.port, "GET", "/any", headers={"Host": "other.example.com"}).status == 404
    assert request(env.port, "GET", "/w/1", headers={"Host": "a.b.wild.test"}).status == 200
    assert request(env.port, "GET", "/w/1", headers={"Host": "wild.test"}).status == 404
    assert request(env.port, "POST", "/m", body=b"x").status == 200
    assert request(env.port, "GET", "/m").status == 404
    assert request(env.port, "GET", "/h", headers={"X-Version": "2"}).status == 200
    assert request(env.port, "GET", "/h", headers={"X-Version": "3"}).status == 404


def test_preserve_host_and_upstream_host_header(env: Env) -> None:
    sent = {k.lower(): v for k, v in request(env.port, "GET", "/preserve", headers={"Host": "Keep.Me:81"})
            .json()["headers"]}
    assert sent["host"] == "Keep.Me:81"
    sent = {k.lower(): v for k, v in request(env.port, "GET", "/nh").json()["headers"]}
    assert sent["host"] == "api.internal"


def test_round_robin_spreads_by_weight(env: Env) -> None:
    seen = {"a": 0, "b": 0}
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    for _ in range(200):
        seen[request(env.port, "GET", "/weighted", conn=conn).json()["server"]] += 1
    conn.close()
    # 2 workers each walk their own 3:1 wheel; over 200 requests the split stays close to 150/50.
    assert 135 <= seen["a"] <= 165, seen


def test_hostname_service_is_resolved(env: Env) -> None:
    resp = request(env.port, "GET", "/dns")
    assert resp.status == 200 and resp.json()["server"] == "b"


def test_consistent_hashing_on_header_is_sticky(env: Env) -> None:
    for user in ("alice", "bob", "carol", "dave"):
        servers = {request(env.port, "GET", "/hashed", headers={"X-User": user}).json()["server"] for _ in range(6)}
        assert len(servers) == 1, (user, servers)
    spread = {request(env.port, "GET", "/hashed", headers={"X-User": f"user-{i}"}).json()["server"]
              for i in range(40)}
    assert len(spread) >= 2


def test_hash_cookie_is_generated_then_honoured(env: Env) -> None:
    first = request(env.port, "GET", "/app/x")
    cookie = first.header("set-cookie")
    assert cookie is not None and cookie.startswith("rg-session=") and "Path=/app" in cookie
    value = cookie.split(";")[0]
    servers = {request(env.port, "GET", "/app/x", headers={"Cookie": value}).json()["server"] for _ in range(6)}
    assert len(servers) == 1
    again = request(env.port, "GET", "/app/x", headers={"Cookie": value})
    assert again.header("set-cookie") is None


def test_retry_avoids_failed_target(env: Env) -> None:
    for _ in range(20):
        resp = request(env.port, "GET", "/half-dead")
        assert resp.status == 200 and resp.json()["server"] == "c"


def test_all_targets_down_is_502(env: Env) -> None:
    resp = request(env.port, "GET", "/all-dead")
    assert resp.status == 502
    assert resp.json()["message"] == "An invalid response was received from the upstream server"


def test_weight_zero_and_disabled_service(env: Env) -> None:
    resp = request(env.port, "GET", "/zero")
    assert resp.status == 503
    assert resp.json()["message"] == "failure to get a peer from the ring-balancer"
    assert request(env.port, "GET", "/disabled").status == 404


def test_read_timeout_is_504(env: Env) -> None:
    started = time.monotonic()
    resp = request(env.port, "GET", "/slow/delay/3")
    assert resp.status == 504
    assert resp.json()["message"] == "The upstream server is timing out"
    assert time.monotonic() - started < 2.5


def test_keep_alive_reuses_upstream_connection(env: Env) -> None:
    origin = env.origins["b"]
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    request(env.port, "GET", "/direct/warm", conn=conn)
    before = origin.connections
    for _ in range(30):
        assert request(env.port, "GET", "/direct/again", conn=conn).status == 200
    conn.close()
    # One client connection lands on one worker, whose pool keeps reusing its upstream connection.
    assert origin.connections - before <= 1


def test_pipelined_requests_answered_in_order(env: Env) -> None:
    payload = b"".join(
        b"GET /direct/p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)
    ) + b"GET /direct/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = raw_exchange(env.port, payload)
    order = [part.split(b'"path":"')[1].split(b'"')[0] for part in data.split(b"HTTP/1.1 200")[1:]]
    assert order == [b"/direct/p0", b"/direct/p1", b"/direct/p2", b"/direct/p3", b"/direct/p4", b"/direct/last"]


def test_post_bodies_content_length_and_chunked(env: Env) -> None:
    body = b"a" * 300_000
    resp = request(env.port, "POST", "/direct/upload", body=body, headers={"Content-Type": "text/plain"})
    assert resp.status == 200 and len(resp.json()["body"]) == len(body)
    raw = (b"POST /direct/chunky HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    data = raw_exchange(env.port, raw)
    assert status_of(data) == 200
    assert b'"body":"hello world"' in data


def test_expect_100_continue(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(b"POST /direct/e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"body")
        final = sock.recv(65536)
        assert final.startswith(b"HTTP/1.1 200") and b'"body":"body"' in final


def test_sse_streams_event_by_event(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
        sock.sendall(b"GET /sse?n=4&interval=0.6 HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        arrivals = []
        buffer = b""
        # The end of the chunked body (searched after the head: a request id may end in "0" too).
        while b"\r\n0\r\n\r\n" not in buffer.partition(b"\r\n\r\n")[2]:
            data = sock.recv(65536)
            assert data, "connection closed before the stream ended"
            buffer += data
            arrivals.append((time.monotonic() - started, buffer.count(b"data: ")))
    assert b"Transfer-Encoding: chunked" in buffer and b"text/event-stream" in buffer
    first_event_at = next((t for t, n in arrivals if n >= 1), None)
    last_event_at = next((t for t, n in arrivals if n >= 4), None)
    assert first_event_at is not None and last_event_at is not None, (arrivals, buffer)
    # The origin spends 1.8 s between its first and last event; a buffered stream would deliver them together.
    assert last_event_at - first_event_at > 1.2, arrivals
    assert [n for _, n in arrivals][-1] == 4


def test_chunked_and_close_delimited_answers(env: Env) -> None:
    resp = request(env.port, "GET", "/chunked/5")
    assert resp.status == 200 and resp.body == b"".join(b"chunk %d\n" % i for i in range(5))
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    resp = request(env.port, "GET", "/close-delimited", conn=conn)
    assert resp.body == b"part 0\npart 1\npart 2\n"
    assert resp.header("transfer-encoding") == "chunked"  # re-framed so the client connection stays open
    assert request(env.port, "GET", "/direct/after", conn=conn).status == 200
    conn.close()


def test_head_and_large_bodies(env: Env) -> None:
    head = request(env.port, "HEAD", "/bytes/5000")
    assert head.status == 200 and head.body == b"" and head.header("content-length") == "5000"
    big = request(env.port, "GET", "/bytes/3000000")
    assert len(big.body) == 3_000_000


def test_truncated_upstream_answer_reaches_client_incomplete(env: Env) -> None:
    with pytest.raises(http.client.IncompleteRead):
        request(env.port, "GET", "/truncate")


def test_upstream_that_drops_is_502(env: Env) -> None:
    resp = request(env.port, "GET", "/drop")
    assert resp.status == 502


def test_upstream_status_passes_through(env: Env) -> None:
    resp = request(env.port, "GET", "/status/503")
    assert resp.status == 503 and resp.json()["server"] == "c"


def test_http_10_client(env: Env) -> None:
    data = raw_exchange(env.port, b"GET /chunked/2 HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding" not in head
    assert body == b"chunk 0\nchunk 1\n"


def test_http_10_keep_alive_spellings_get_no_chunking(env: Env) -> None:
    for header in (b"Connection: keep-alive", b"Proxy-Connection: keep-alive"):
        with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
            sock.sendall(b"GET /chunked/2 HTTP/1.0\r\n" + header + b"\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), header
        assert b"Transfer-Encoding" not in head, header  # an HTTP/1.0 client cannot read chunks
        assert body == b"chunk 0\nchunk 1\n", header

