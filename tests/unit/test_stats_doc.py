"""The stats document built from a real arena and series table filled with known numbers."""
from __future__ import annotations

from typing import Any

import msgpack
import orjson
from shared_state.arena import Arena
from shared_state.series import SeriesTable

from ringgate.stats import OVERFLOW_NAME, StatsSource, build_document
from shared_state import arena as arena_fields
from shared_state import series as s


def _route(table: SeriesTable, slot: int, service: str, route: str) -> int:
    return table.series_index(slot, s.route_key(service, route), s.KIND_ROUTE)


def _code(table: SeriesTable, slot: int, service: str, route: str, code: int, source: str, n: int) -> None:
    table.add(slot, table.series_index(slot, s.code_key(service, route, code, source), s.KIND_CODE), 0, n)


def filled_source(**providers: Any) -> StatsSource:
    """Two workers (slot 1 died once and was retired), one control slot, known traffic.

    svc/r1: worker 0 answered 4x200 (upstream) + 1x404 (gateway); the dead worker 1 answered
    2x503; its successor 1x200. Slot 1's successor also ran out of room (overflow).
    """
    arena = Arena(3)
    table = SeriesTable(3, series_per_slot=4)
    w0 = arena.worker_stats(0)
    w0.set(arena_fields.PID, 111)
    w0.set(arena_fields.HEARTBEAT_MS, 1)
    for status in (200, 200, 200, 200, 404):
        w0.record_response(status, 10, 100)
    w0.incr(arena_fields.CONNECTIONS_ACTIVE, 2)
    w0.incr(arena_fields.CONNECTIONS_ACCEPTED, 3)
    r1 = _route(table, 0, "svc", "r1")
    for field, amount in ((s.R_REQUESTS, 5), (s.R_STATUS_2XX, 4), (s.R_STATUS_4XX, 1), (s.R_BYTES_IN, 50),
                          (s.R_BYTES_OUT, 500)):
        table.add(0, r1, field, amount)
    for _ in range(4):
        table.observe(0, r1, s.R_REQUEST_LATENCY, 30_000)   # -> le 50
        table.observe(0, r1, s.R_UPSTREAM_LATENCY, 20_000)  # -> le 25
    for _ in range(5):
        table.observe(0, r1, s.R_KONG_LATENCY, 1_500)       # -> le 2
    table.observe(0, r1, s.R_REQUEST_LATENCY, 90_000_000)   # 25 h: +Inf
    _code(table, 0, "svc", "r1", 200, "service", 4)
    _code(table, 0, "svc", "r1", 404, "kong", 1)
    target = table.series_index(0, s.target_key("up", "10.0.0.1:80"), s.KIND_TARGET)
    for field, amount in ((s.T_REQUESTS, 5), (s.T_TIMEOUTS, 1), (s.T_LATENCY_SUM_US, 100_000),
                          (s.T_LATENCY_COUNT, 4)):
        table.add(0, target, field, amount)

    w1 = arena.worker_stats(1)
    w1.set(arena_fields.PID, 222)
    w1.record_response(503, 0, 0)
    w1.record_response(503, 0, 0)
    r1 = _route(table, 1, "svc", "r1")
    table.add(1, r1, s.R_REQUESTS, 2)
    table.add(1, r1, s.R_STATUS_5XX, 2)
    _code(table, 1, "svc", "r1", 503, "service", 2)
    arena.retire(1)
    table.retire(1)

    w1 = arena.worker_stats(1)
    w1.set(arena_fields.PID, 333)
    w1.set(arena_fields.HEARTBEAT_MS, 1)
    w1.record_response(200, 1, 1)
    r1 = _route(table, 1, "svc", "r1")
    table.add(1, r1, s.R_REQUESTS, 1)
    table.add(1, r1, s.R_STATUS_2XX, 1)
    _code(table, 1, "svc", "r1", 200, "service", 1)
    for name in ("a", "b"):  # slot 1 now holds its 4 series; the next is refused
        _route(table, 1, "other", name)
    refused = _route(table, 1, "other", "d")
    table.add(1, refused, s.R_REQUESTS, 7)
    return StatsSource(arena=arena, series=table, node_id="node-1", pid=42, started_at=1000.0,
                       config=lambda: ("abc123", 3), **providers)


def test_document_numbers_are_exact_and_include_the_dead_worker() -> None:
    doc = build_document(filled_source())
    assert doc["version"] == 1
    assert doc["node"]["pid"] == 42 and doc["node"]["node_id"] == "node-1" and doc["node"]["uptime_s"] > 0
    assert doc["config"] == {"hash": "abc123", "generation": 3}
    assert [(w["slot"], w["pid"], w["requests"]) for w in doc["workers"]] == [(0, 111, 5), (1, 333, 1)]
    assert doc["workers"][0]["status"] == {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 1, "5xx": 0}
    assert doc["workers"][0]["connections"] == {"active": 2, "accepted": 3}
    assert doc["workers"][0]["heartbeat_age_ms"] > 0
    assert doc["retired"]["requests"] == 2 and doc["retired"]["status"]["5xx"] == 2
    assert doc["totals"]["requests"] == 8
    assert doc["totals"]["status"] == {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 1, "5xx": 2}
    assert doc["totals"]["bytes"] == {"in": 51, "out": 501}

    routes = {(r["service"], r["route"]): r for r in doc["routes"]}
    r1 = routes[("svc", "r1")]
    assert r1["requests"] == 8 and r1["overflow"] is False
    assert r1["status"] == {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 1, "5xx": 2}
    assert r1["codes"] == {"200": 5, "404": 1, "503": 2}
    assert r1["codes_by_source"] == {"service": {"200": 5, "503": 2}, "kong": {"404": 1}}
    assert (r1["bytes_in"], r1["bytes_out"]) == (50, 500)
    request = r1["latency_ms"]["request"]
    assert request["buckets"][:3] == [[25, 0], [50, 4], [80, 4]]
    assert request["buckets"][-2:] == [[60000, 4], ["+Inf", 5]]
    assert request["count"] == 5 and request["sum"] == 4 * 30.0 + 90_000_000 / 1000
    assert r1["latency_ms"]["upstream"]["buckets"][0] == [25, 4]
    kong = r1["latency_ms"]["kong"]
    assert [b for b in kong["buckets"] if b[0] in (1, 2, "+Inf")] == [[1, 0], [2, 5], ["+Inf", 5]]
    assert kong["sum"] == 7.5
    assert len(kong["buckets"]) == len(s.KONG_BOUNDS_MS) + 1

    overflow = routes[(OVERFLOW_NAME, OVERFLOW_NAME)]
    assert overflow["overflow"] is True and overflow["requests"] == 7
    assert doc["routes"][-1] is overflow, "the overflow entry comes last"
    assert routes[("other", "a")]["requests"] == 0
    assert doc["series"] == {"slots": 3, "per_slot": 4, "overflowed": 1}

    assert doc["targets"] == [{
        "upstream": "up", "target": "10.0.0.1:80", "requests": 5,
        "failures": {"connect": 0, "timeout": 1, "status": 0},
        "latency_ms": {"sum": 100.0, "count": 4, "mean": 25.0}, "overflow": False,
    }]
    assert doc["health"] == [] and doc["breakers"] == [] and doc["fallbacks"] == [] and doc["errors"] == []
    assert doc["memory"]["arena_bytes"] > 0 and doc["memory"]["series_bytes"] > 0


def test_document_travels_as_msgpack_and_json() -> None:
    doc = build_document(filled_source())
    assert msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False) == doc
    assert orjson.loads(orjson.dumps(doc))["routes"] == doc["routes"]


def test_providers_fill_their_lists_and_a_failing_one_is_reported_not_fatal() -> None:
    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("breaker table unavailable")

    health = [{"upstream": "up", "target": "10.0.0.1:80", "address": "10.0.0.1:80", "state": "healthy"}]
    doc = build_document(filled_source(health=lambda: health, breakers=broken))
    assert doc["health"] == health
    assert doc["breakers"] == []
    assert doc["errors"] == ["breakers: RuntimeError: breaker table unavailable"]
    assert doc["totals"]["requests"] == 8


def test_document_without_a_series_table() -> None:
    arena = Arena(1)
    arena.worker_stats(0).record_response(200, 0, 0)
    doc = StatsSource(arena=arena).build()
    assert doc["routes"] == [] and doc["targets"] == [] and doc["totals"]["requests"] == 1
    assert doc["config"] == {"hash": None, "generation": 0}
    assert doc["workers"] == [], "a slot whose worker never announced a pid is not listed"
