"""status-based-fallback end to end (issue #4 §4): the real gateway through its CLI, two workers,
real origins on loopback. Each case has its own route, service, primary and backup, so the cases
share one gateway and stay independent of their order.

Primaries fail the way real ones do: a forced status (OriginServer.force_status), a closed port, a
hang (/delay/5), a body cut short (/truncate). The origins count what reaches them, which is how a
test tells "no fallback happened" and "the primary got nothing" apart from a lucky status code.
"""
from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from ringgate.origin import OriginServer
from tests.integration.client import Response, raw_exchange, request
from tests.integration.conftest import Gateway, free_port

pytestmark = pytest.mark.integration

PLUGIN = "status-based-fallback"
HANG = "/delay/5"  # the origin answers after 5 s; every timeout below is far shorter
PRIMARY_TIMEOUT_MS = 300
BREAKER_TIMEOUT_S = 1.0
BREAKER_THRESHOLD = 3
STATIC_BODY = '{"degraded": true}'
MAX_REPLAY_BODY = 1024


@dataclass
class Rig:
    gateway: Gateway
    origins: dict[str, OriginServer] = field(default_factory=dict)

    def get(self, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> Response:
        # A fresh connection per request, so the kernel spreads requests over both workers.
        return request(self.gateway.proxy_port, method, path, headers=headers, body=body, timeout=timeout)

    def events(self, route: str, timeout: float = 5.0, count: int = 1) -> list[dict[str, Any]]:
        """The fallback log events of one route, once `count` of them were printed."""
        deadline = time.monotonic() + timeout
        while True:
            found = [event for event in _fallback_events(self.gateway.output) if event.get("route") == route]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def _fallback_events(lines: list[str]) -> list[dict[str, Any]]:
    marker = "ringgate.fallback.events: "
    return [orjson.loads(line.split(marker, 1)[1]) for line in list(lines) if marker in line]


def _service(name: str, url: str, path: str, plugin: dict[str, Any] | None) -> tuple[dict[str, Any], dict | None]:
    service = {"name": name, "url": url, "routes": [{"name": name, "paths": [path]}]}
    return service, None if plugin is None else {"name": PLUGIN, "route": name, "config": plugin}


def _build(tmp: Path) -> Rig:
    origins: dict[str, OriginServer] = {}

    def origin(name: str, **kwargs: Any) -> OriginServer:
        server = OriginServer(name, **kwargs).start()
        origins[name] = server
        return server

    def url(server: OriginServer, path: str = "") -> str:
        return f"http://{server.address}{path}"

    # The issue's legacy config needs an HTTPS backup whose certificate verifies against the system
    # store: a test CA made the system store of the gateway through SSL_CERT_FILE.
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    legacy_backup = origin("legacy-backup", ssl_context=tls)

    def backup_of(server: OriginServer, path: str | None = None, **extra: Any) -> dict[str, Any]:
        config: dict[str, Any] = {"backup_host": "127.0.0.1", "backup_port": server.port, **extra}
        if path is not None:
            config["backup_path"] = path
        return config

    legacy = {
        "fail_status_codes": [500, 502, 503, 504],
        "backup_host": "localhost",  # the issue's fallback.internal; localhost is what resolves here
        "backup_port": legacy_backup.port,
        "backup_path": "/api/v1/degraded",
        "backup_scheme": "https",
        "backup_ssl_verify": True,
        "max_retries": 2,
        "process_response_body": False,
        "add_fallback_headers": True,
    }
    sick = {name: origin(name) for name in (
        "critical-primary", "quiet-primary", "sse-primary", "post-primary", "breaker-primary", "chain-primary",
        "pool-primary", "big-primary", "observed-primary", "bare-primary")}
    for server in sick.values():
        server.force_status = 503
    slow = {name: origin(name) for name in ("hang-primary", "post-timeout-primary", "post-replay-timeout-primary")}
    backups = {name: origin(name) for name in (
        "refused-backup", "hang-backup", "sse-backup", "truncate-backup", "post-backup", "post-timeout-backup",
        "post-replay-timeout-backup", "breaker-backup", "chain-backup", "pool-a", "pool-b", "big-backup",
        "observed-backup", "bare-backup")}
    backups["chain-backup"].force_status = 503  # the backup fails too: the chain moves on
    truncating = origin("truncate-primary")
    cache_primary = origin("cache-primary")
    closed_port = free_port()  # bound then released: nothing listens there

    timeout = {"primary_timeout": PRIMARY_TIMEOUT_MS}
    pieces = [
        _service("critical-api", url(sick["critical-primary"]), "/critical", legacy),
        _service("critical-quiet", url(sick["quiet-primary"]), "/critical-quiet",
                 {**legacy, "add_fallback_headers": False}),
        _service("refused", f"http://127.0.0.1:{closed_port}", "/refused",
                 backup_of(backups["refused-backup"], "/fallback")),
        _service("hang", url(slow["hang-primary"], HANG), "/hang",
                 backup_of(backups["hang-backup"], "/fallback", **timeout)),
        _service("sse", url(sick["sse-primary"]), "/feed", backup_of(backups["sse-backup"], "/sse")),
        _service("truncate", url(truncating, "/truncate"), "/truncate",
                 backup_of(backups["truncate-backup"], "/fallback")),
        _service("post-replay", url(sick["post-primary"]), "/post", backup_of(backups["post-backup"], "/fallback")),
        _service("post-timeout", url(slow["post-timeout-primary"], HANG), "/post-timeout",
                 backup_of(backups["post-timeout-backup"], "/fallback", **timeout)),
        _service("post-timeout-replay", url(slow["post-replay-timeout-primary"], HANG), "/post-timeout-replay",
                 backup_of(backups["post-replay-timeout-backup"], "/fallback", replay_non_idempotent=True,
                           **timeout)),
        _service("breaker", url(sick["breaker-primary"]), "/breaker",
                 backup_of(backups["breaker-backup"], "/fallback",
                           circuit_breaker={"threshold": BREAKER_THRESHOLD, "timeout": BREAKER_TIMEOUT_S})),
        _service("chain", url(sick["chain-primary"]), "/chain", {"fallback_chain": [
            {"host": "127.0.0.1", "port": backups["chain-backup"].port},
            {"type": "static", "status": 200, "body": STATIC_BODY}]}),
        _service("cache", url(cache_primary), "/cached", {"fallback_chain": [{"type": "cache", "ttl": 60}]}),
        _service("pool", url(sick["pool-primary"]), "/pool", {"fallback_chain": [{"upstream": "fallback-pool"}]}),
        _service("big-body", url(sick["big-primary"]), "/big",
                 backup_of(backups["big-backup"], "/fallback", max_replay_body=MAX_REPLAY_BODY)),
        _service("observed", url(sick["observed-primary"]), "/observed",
                 backup_of(backups["observed-backup"], "/fallback")),
        _service("bare", url(sick["bare-primary"]), "/bare",
                 backup_of(backups["bare-backup"], "/fallback", preserve_original_headers=False)),
    ]
    config = {
        "_format_version": "3.0",
        "services": [service for service, _ in pieces],
        "plugins": [plugin for _, plugin in pieces if plugin is not None],
        "upstreams": [{"name": "fallback-pool", "targets": [{"target": backups["pool-a"].address},
                                                            {"target": backups["pool-b"].address}]}],
    }
    gateway = Gateway(config, tmp, workers=2, env={"SSL_CERT_FILE": str(ca_file)})
    rig = Rig(gateway, origins)
    try:
        gateway.start()
    except BaseException:
        gateway.stop()
        for server in origins.values():
            server.stop()
        raise
    return rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    built = _build(tmp_path_factory.mktemp("fallback"))
    try:
        yield built
    finally:
        built.gateway.stop()
        for server in built.origins.values():
            server.stop()


# 1 -----------------------------------------------------------------------------------------------

def test_primary_503_is_answered_by_the_backup_with_the_issues_legacy_config(rig: Rig) -> None:
    response = rig.get("/critical?x=1")
    assert response.status == 200, response.body
    echo = response.json()
    assert echo["server"] == "legacy-backup"
    assert echo["path"] == "/api/v1/degraded" and echo["query"] == "x=1"
    assert response.header("X-Fallback") == "backup"
    assert response.header("X-Original-Status") == "503"
    assert rig.origins["critical-primary"].requests == 1


def test_add_fallback_headers_false_leaves_the_answer_without_them(rig: Rig) -> None:
    response = rig.get("/critical-quiet")
    assert response.status == 200, response.body
    assert response.json()["server"] == "legacy-backup"
    assert response.header("X-Fallback") is None
    assert response.header("X-Original-Status") is None


# 2 -----------------------------------------------------------------------------------------------

def test_primary_refusing_connections_falls_back_to_the_backup(rig: Rig) -> None:
    response = rig.get("/refused")
    assert response.status == 200, response.body
    assert response.json()["server"] == "refused-backup"
    assert response.header("X-Fallback") == "backup"


# 3 -----------------------------------------------------------------------------------------------

def test_hanging_primary_falls_back_after_primary_timeout(rig: Rig) -> None:
    started = time.monotonic()
    response = rig.get("/hang")
    elapsed = time.monotonic() - started
    assert response.status == 200, response.body
    assert response.json()["server"] == "hang-backup"
    assert response.header("X-Fallback") == "backup"
    assert rig.origins["hang-primary"].requests == 1  # it was asked, and waited for only primary_timeout
    assert PRIMARY_TIMEOUT_MS / 1000 <= elapsed < 2.5, elapsed


# 4 -----------------------------------------------------------------------------------------------

def test_sse_request_failing_over_streams_the_backups_events_one_by_one(rig: Rig) -> None:
    events, interval = 5, 0.3
    conn = http.client.HTTPConnection("127.0.0.1", rig.gateway.proxy_port, timeout=10)
    try:
        conn.request("GET", f"/feed?n={events}&interval={interval}", headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("X-Fallback") == "backup"
        assert response.getheader("Content-Type") == "text/event-stream"
        arrived: list[float] = []
        sent: list[float] = []
        while len(arrived) < events:
            line = response.readline()
            assert line, f"the stream ended after {len(arrived)} events"
            if line.startswith(b"data: "):
                arrived.append(time.time())
                event = orjson.loads(line[len(b"data: "):])
                assert event["server"] == "sse-backup" and event["n"] == len(sent)
                sent.append(event["t"])
        assert response.read() == b"\n"  # the last event's blank line, then a clean end of the chunked body
    finally:
        conn.close()
    # Each event reached the client before the backup had even sent the next one: a stream, not a buffer.
    for n in range(events - 1):
        assert arrived[n] < sent[n + 1], (n, arrived, sent)
    assert sent[-1] - arrived[0] > interval * (events - 2)
    assert rig.origins["sse-primary"].requests == 1


# 5 -----------------------------------------------------------------------------------------------

def test_primary_dying_mid_stream_gives_a_truncated_answer_and_no_fallback(rig: Rig) -> None:
    raw = raw_exchange(rig.gateway.proxy_port, b"GET /truncate HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert b"\r\ncontent-length: 100" in head.lower()
    assert body == b"x" * 10  # announced 100, got 10, then the connection closed
    assert rig.origins["truncate-primary"].requests == 1
    assert rig.origins["truncate-backup"].requests == 0


# 6 -----------------------------------------------------------------------------------------------

def test_post_body_is_replayed_to_the_backup_on_503(rig: Rig) -> None:
    body = b'{"order": 42, "items": ["a", "b"]}'
    response = rig.get("/post", method="POST", body=body, headers={"Content-Type": "application/json"})
    assert response.status == 200, response.body
    echo = response.json()
    assert echo["server"] == "post-backup" and echo["method"] == "POST"
    assert echo["body"] == body.decode()
    assert response.header("X-Fallback") == "backup"
    assert rig.origins["post-primary"].requests == 1


# 7 -----------------------------------------------------------------------------------------------

def test_post_is_not_replayed_after_a_read_timeout(rig: Rig) -> None:
    response = rig.get("/post-timeout", method="POST", body=b"charge-once")
    assert response.status == 504, response.body
    assert response.header("X-Fallback") is None
    assert rig.origins["post-timeout-primary"].requests == 1
    assert rig.origins["post-timeout-backup"].requests == 0
    rig.gateway.wait_for("fallback skipped for POST /post-timeout", timeout=5)


def test_post_is_replayed_after_a_read_timeout_with_replay_non_idempotent(rig: Rig) -> None:
    response = rig.get("/post-timeout-replay", method="POST", body=b"replay-me")
    assert response.status == 200, response.body
    echo = response.json()
    assert echo["server"] == "post-replay-timeout-backup" and echo["body"] == "replay-me"
    assert response.header("X-Fallback") == "backup"
    assert rig.origins["post-replay-timeout-primary"].requests == 1


# 8 -----------------------------------------------------------------------------------------------

def _metric_samples(rig: Rig, family_name: str) -> list[Any]:
    text = request(rig.gateway.admin_port, "GET", "/metrics").body.decode()
    return [sample for family in text_string_to_metric_families(text) if family.name == family_name
            for sample in family.samples]


def _worker_of(response: Response) -> str:
    request_id = response.header("X-Kong-Request-Id") or ""
    assert len(request_id) == 32, response.headers
    return request_id[:16]  # each worker's ids share a random 16-digit prefix


def _breaker_state(rig: Rig, route: str) -> str:
    current = [s.labels["state"] for s in _metric_samples(rig, "ringgate_breaker_state")
               if s.labels.get("route") == route and s.value == 1]
    assert len(current) == 1, current
    return current[0]


def test_circuit_breaker_opens_for_all_workers_half_opens_and_closes(rig: Rig) -> None:
    primary, backup = rig.origins["breaker-primary"], rig.origins["breaker-backup"]
    for _ in range(BREAKER_THRESHOLD):
        response = rig.get("/breaker")
        assert response.status == 200 and response.header("X-Fallback") == "backup"
    opened = time.monotonic()
    assert primary.requests == BREAKER_THRESHOLD

    # Open: every worker sends straight to the chain; the primary's count stops growing.
    workers: set[str] = set()
    sent = 0
    while (len(workers) < 2 or sent < 6) and sent < 60 and time.monotonic() - opened < BREAKER_TIMEOUT_S * 0.7:
        response = rig.get("/breaker")
        sent += 1
        assert response.status == 200 and response.header("X-Fallback") == "backup"
        assert response.json()["server"] == "breaker-backup"
        workers.add(_worker_of(response))
    assert len(workers) == 2, f"only one worker served the {sent} requests sent while the breaker was open"
    assert primary.requests == BREAKER_THRESHOLD, "the primary got traffic while the breaker was open"
    assert backup.requests == BREAKER_THRESHOLD + sent
    rig.gateway.wait_for("circuit breaker of route breaker open", timeout=2)
    assert _breaker_state(rig, "breaker") == "open"

    # Half-open after the timeout: one trial reaches the primary; it is healthy now, so the breaker closes.
    primary.force_status = None
    deadline = opened + BREAKER_TIMEOUT_S + 5
    while primary.requests == BREAKER_THRESHOLD:
        assert time.monotonic() < deadline, "no trial request reached the primary"
        response = rig.get("/breaker")
        assert response.status == 200
        time.sleep(0.05)
    assert time.monotonic() - opened >= BREAKER_TIMEOUT_S * 0.9
    assert primary.requests == BREAKER_THRESHOLD + 1  # exactly one trial
    assert response.header("X-Fallback") is None and response.json()["server"] == "breaker-primary"
    rig.gateway.wait_for("circuit breaker of route breaker closed", timeout=2)
    assert _breaker_state(rig, "breaker") == "closed"

    # Closed: traffic is back on the primary, on every worker.
    backup_before = backup.requests
    for n in range(6):
        response = rig.get("/breaker")
        assert response.status == 200 and response.header("X-Fallback") is None
        assert response.json()["server"] == "breaker-primary"
    assert primary.requests == BREAKER_THRESHOLD + 1 + 6
    assert backup.requests == backup_before


# 9 -----------------------------------------------------------------------------------------------

def test_backup_failing_too_moves_on_to_the_static_step(rig: Rig) -> None:
    response = rig.get("/chain")
    assert response.status == 200, response.body
    assert response.body == STATIC_BODY.encode()
    assert response.header("Content-Type") == "application/json; charset=utf-8"
    assert response.header("X-Fallback") == "static"
    assert response.header("X-Original-Status") == "503"
    assert rig.origins["chain-primary"].requests == 1
    assert rig.origins["chain-backup"].requests == 1  # it was tried, and failed


# 10 ----------------------------------------------------------------------------------------------

def test_cache_step_serves_the_last_good_answer_when_the_primary_fails(rig: Rig) -> None:
    primary = rig.origins["cache-primary"]
    good = rig.get("/cached/item?id=7")
    assert good.status == 200 and good.header("X-Fallback") is None
    assert good.json()["server"] == "cache-primary"

    primary.force_status = 503
    # Several fresh connections: the cache is node-wide shared memory, so both workers have the answer.
    for _ in range(4):
        cached = rig.get("/cached/item?id=7")
        assert cached.status == 200, cached.body
        assert cached.header("X-Fallback") == "cache"
        assert cached.header("X-Original-Status") == "503"
        assert cached.body == good.body
    # A request never answered well has nothing cached: the primary's failure goes through.
    missing = rig.get("/cached/other")
    assert missing.status == 503 and missing.header("X-Fallback") is None
    assert primary.requests == 1 + 4 + 1


# 11 ----------------------------------------------------------------------------------------------

def test_upstream_step_balances_the_fallback_over_the_upstreams_targets(rig: Rig) -> None:
    servers = []
    for _ in range(6):
        response = rig.get("/pool")
        assert response.status == 200, response.body
        assert response.header("X-Fallback") == "backup"
        servers.append(response.json()["server"])
    assert set(servers) == {"pool-a", "pool-b"}, servers
    assert rig.origins["pool-primary"].requests == 6


# 12 ----------------------------------------------------------------------------------------------

def test_body_over_max_replay_body_is_not_replayed(rig: Rig) -> None:
    body = b"b" * (MAX_REPLAY_BODY * 4)
    response = rig.get("/big", method="POST", body=body)
    assert response.status == 503, (response.status, response.body[:200])
    assert response.json()["server"] == "big-primary"  # the primary's own answer
    assert response.header("X-Fallback") is None
    assert rig.origins["big-backup"].requests == 0
    rig.gateway.wait_for("fallback skipped for POST /big", timeout=5)


# 13 ----------------------------------------------------------------------------------------------

def test_each_fallback_logs_one_json_event_and_counts_in_metrics(rig: Rig) -> None:
    backup = rig.origins["observed-backup"]
    assert rig.get("/observed").status == 200
    backup.force_status = 502  # the chain's only step fails too: the client gets its answer
    assert rig.get("/observed").status == 502

    events = rig.events("observed", count=2)
    assert len(events) == 2, events
    served, exhausted = events
    for event in events:
        assert set(event) >= {"event", "trigger_reason", "retry_count", "final_status", "elapsed_ms",
                              "backup_target", "route", "service"}
        assert event["event"] == "fallback" and event["trigger_reason"] == "status_503"
        assert event["backup_target"] == backup.address and event["retry_count"] == 1
        assert event["route"] == "observed" and event["service"] == "observed"
        assert 0 <= event["elapsed_ms"] < 5000
    assert served["final_status"] == 200 and exhausted["final_status"] == 502

    deadline = time.monotonic() + 5
    while True:
        totals = {(s.labels["trigger"], s.labels["final_status"]): s.value
                  for s in _metric_samples(rig, "ringgate_fallback") if s.name == "ringgate_fallback_total"
                  and s.labels.get("route") == "observed"}
        if sum(totals.values()) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert totals == {("status_503", "200"): 1, ("status_503", "502"): 1}, totals

    # The duration histogram counts each fallback once, whatever its trigger and final status.
    durations = {s.name: s.value for s in _metric_samples(rig, "ringgate_fallback_duration_ms")
                 if s.labels.get("route") == "observed" and s.name.endswith(("_count", "_sum"))}
    assert durations.get("ringgate_fallback_duration_ms_count") == 2, durations


def test_preserve_original_headers_false_sends_the_backup_only_the_bodys_headers(rig: Rig) -> None:
    response = rig.get("/bare", method="POST", body=b'{"a": 1}',
                       headers={"Content-Type": "application/json", "X-Secret": "s3cret", "Cookie": "c=1"})
    assert response.status == 200 and response.header("X-Fallback") == "backup"
    echo = response.json()
    names = {name.lower() for name, _ in echo["headers"]}
    assert echo["server"] == "bare-backup" and echo["body"] == '{"a": 1}'
    assert "content-type" in names and "x-forwarded-for" in names
    assert "x-secret" not in names and "cookie" not in names
    primary_seen = rig.origins["bare-primary"].log
    assert primary_seen  # the primary itself got the request with every header (the default path)
