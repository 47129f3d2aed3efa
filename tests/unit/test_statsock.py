"""The msgpack stats socket served by a real uvloop loop, real clients, and `ringgate stats`."""
from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import orjson
import pytest
import uvloop

from ringgate import stats_cli, statsock
from ringgate.stats import build_document
from ringgate.statsock import STATS_SOCKET, StatsSocketError, query, serve_stats, stop_stats
from tests.unit.test_stats_doc import filled_source


class Served:
    """serve_stats running on its own uvloop loop in a thread, as in the control process."""

    def __init__(self, path: str, build: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(serve_stats(path, build), self.loop).result(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(stop_stats, self.server, self.path)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    # A short directory: a unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    path = tempfile.mkdtemp(prefix="rg-stats-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def doc() -> dict[str, Any]:
    return build_document(filled_source())


@pytest.fixture
def served(prefix: str, doc: dict[str, Any]) -> Iterator[Served]:
    server = Served(os.path.join(prefix, STATS_SOCKET), lambda: doc)
    yield server
    server.stop()


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def _replies(sock: socket.socket, count: int) -> list[Any]:
    """Read `count` msgpack replies from a stream, or fewer if the server closes it."""
    unpacker = msgpack.Unpacker(raw=False)
    replies: list[Any] = []
    while len(replies) < count:
        data = sock.recv(65536)
        if not data:
            break
        unpacker.feed(data)
        replies.extend(unpacker)
    return replies


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_stats_and_ping_round_trip(served: Served, doc: dict[str, Any]) -> None:
    reply = query(served.path, {"op": "stats"}, timeout=5)
    assert reply["ok"] is True and reply["stats"] == doc
    pong = query(served.path, {"op": "ping"}, timeout=5)
    assert pong["ok"] is True and abs(pong["pong"] - time.time()) < 60
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600


def test_a_stream_of_requests_on_one_connection_is_answered_in_order(served: Served) -> None:
    with _connect(served.path) as sock:
        frames = [msgpack.packb({"op": op}) for op in ("ping", "stats", "nope", "ping")]
        # Split across writes at awkward places: framing comes from msgpack, not from reads.
        blob = b"".join(frames)
        for i in range(0, len(blob), 3):
            sock.sendall(blob[i:i + 3])
        replies = _replies(sock, 4)
        assert "pong" in replies[0] and "stats" in replies[1] and "pong" in replies[3]
        assert replies[2] == {"error": "unknown op 'nope'", "ops": ["ping", "stats"]}
        # The connection is still usable after an unknown op.
        sock.sendall(msgpack.packb({"op": "ping"}))
        assert "pong" in _replies(sock, 1)[0]


@pytest.mark.parametrize("frame, error", [
    (b"\xc1", "malformed request"),                            # a byte msgpack never uses
    (msgpack.packb([1, 2, 3]), "a request is a msgpack map"),
    (msgpack.packb({"op": 5}), "a request is a msgpack map"),
    (msgpack.packb({1: "int keys"}), "malformed request"),
])
def test_a_bad_frame_gets_an_error_and_the_connection_closes(served: Served, frame: bytes, error: str) -> None:
    with _connect(served.path) as sock:
        sock.sendall(msgpack.packb({"op": "ping"}) + frame + msgpack.packb({"op": "ping"}))
        replies = _replies(sock, 3)
        assert "pong" in replies[0]
        assert len(replies) == 2 and replies[1]["error"].startswith(error), replies
        assert _closed_by_server(sock)
    assert query(served.path, {"op": "ping"}, timeout=5)["ok"] is True


def test_an_oversized_request_is_refused(served: Served) -> None:
    with _connect(served.path) as sock:
        big = msgpack.packb({"op": "ping", "pad": "x" * (statsock.MAX_REQUEST_BYTES * 2)})
        try:
            sock.sendall(big)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before it has read everything
        replies = _replies(sock, 1)
        assert replies and replies[0]["error"] == f"request larger than {statsock.MAX_REQUEST_BYTES} bytes"


def test_several_clients_at_once_while_a_bad_one_is_connected(served: Served, doc: dict[str, Any]) -> None:
    # A client that sent half a frame and stalls, and one that sends garbage, hold their connections.
    stalled = _connect(served.path)
    stalled.sendall(msgpack.packb({"op": "stats"})[:2])
    results: list[bool] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(5):
                results.append(query(served.path, {"op": "stats"}, timeout=5)["stats"] == doc)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    with _connect(served.path) as garbage:
        garbage.sendall(b"\xc1\xc1\xc1")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    stalled.close()
    assert not errors and results == [True] * 30


def test_a_client_that_never_reads_is_dropped(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statsock, "MAX_PENDING_REPLY_BYTES", 4096)
    with _connect(served.path) as lazy:
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        dropped = False
        deadline = time.monotonic() + 10
        while not dropped and time.monotonic() < deadline:
            try:
                lazy.sendall(msgpack.packb({"op": "stats"}) * 20)
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
            # The others are served meanwhile.
            assert query(served.path, {"op": "ping"}, timeout=5)["ok"] is True
        assert dropped, "the server kept queueing replies for a client that does not read"


def test_connection_limit_and_idle_timeout(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statsock, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(statsock, "IDLE_TIMEOUT_S", 0.3)
    first, second = _connect(served.path), _connect(served.path)
    first.sendall(msgpack.packb({"op": "ping"}))
    second.sendall(msgpack.packb({"op": "ping"}))
    assert "pong" in _replies(first, 1)[0] and "pong" in _replies(second, 1)[0]
    with _connect(served.path) as third:
        assert _replies(third, 1) == [{"error": "too many stats connections"}]
        assert _closed_by_server(third)
    # Idle connections are closed, which frees room for new clients.
    assert _closed_by_server(first) and _closed_by_server(second)
    first.close()
    second.close()
    assert query(served.path, {"op": "ping"}, timeout=5)["ok"] is True


def test_a_failing_build_is_an_error_reply_not_a_dead_server(prefix: str) -> None:
    calls = []

    def build() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("arena gone")
        return {"version": 1}

    server = Served(os.path.join(prefix, STATS_SOCKET), build)
    try:
        assert query(server.path, {"op": "stats"}, 5) == {"error": "stats unavailable: RuntimeError: arena gone"}
        assert query(server.path, {"op": "stats"}, 5) == {"ok": True, "stats": {"version": 1}}
    finally:
        server.stop()
    assert not os.path.exists(server.path), "stop_stats removes the socket file"


def test_socket_path_rules(prefix: str) -> None:
    path = os.path.join(prefix, STATS_SOCKET)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # left behind by a previous run: replaced
    stale.close()
    Served(path, dict).stop()
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(StatsSocketError, match="not a socket"):
        Served(path, dict)
    with pytest.raises(StatsSocketError, match="too long"):
        query(os.path.join(prefix, "x" * 120), {"op": "ping"}, 1)
    with pytest.raises(FileNotFoundError):
        query(os.path.join(prefix, "absent.sock"), {"op": "ping"}, 1)


def test_query_times_out_on_a_silent_server(prefix: str) -> None:
    path = os.path.join(prefix, "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        silent.listen(1)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            query(path, {"op": "ping"}, timeout=0.2)
        assert time.monotonic() - started < 5


def test_cli_prints_json_and_tables(served: Served, prefix: str, doc: dict[str, Any]) -> None:
    out = io.StringIO()
    assert stats_cli.run(prefix, True, out) == 0
    assert orjson.loads(out.getvalue()) == orjson.loads(orjson.dumps(doc))
    out = io.StringIO()
    assert stats_cli.run(prefix, False, out) == 0
    text = out.getvalue()
    for heading in ("Totals", "Workers", "Routes", "Targets"):
        assert heading in text
    route_line = next(line for line in text.splitlines() if line.split()[:2] == ["svc", "r1"])
    assert route_line.split()[2:7] == ["8", "5", "0", "1", "2"]  # requests, 2xx, 3xx, 4xx, 5xx
    assert route_line.split()[8:10] == ["<=50", ">60000"]  # p50, p95 (one request took 25 h)
    assert "200:5 503:2 404:1" in route_line
    worker_lines = [line.split() for line in text.splitlines() if line.split()[:2] in (["0", "111"], ["1", "333"])]
    assert [words[2] for words in worker_lines] == ["5", "1"]
    assert any(line.split()[:3] == ["retired", "-", "2"] for line in text.splitlines())
    assert "(overflow)" in text and "1 series were refused" in text


def test_cli_without_a_running_gateway(prefix: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert stats_cli.run(prefix, False, out, err) == 1
    assert f"is the gateway running with --prefix {prefix}?" in err.getvalue() and out.getvalue() == ""
    # A socket file left by a dead gateway: nobody listening.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(prefix, STATS_SOCKET))
    stale.close()
    err = io.StringIO()
    assert stats_cli.run(prefix, True, io.StringIO(), err) == 1
    assert "is the gateway running" in err.getvalue()
