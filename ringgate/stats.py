"""The stats document: node-wide numbers merged from shared memory, as one plain dict.

The stats socket sends it as msgpack, `ringgate stats --json` prints it, and
`ringgate.metrics` renders it as Prometheus text. Counters include the workers that
died (their counts were folded into the retired totals by the master).

Shape (version 1; every number an int unless marked float):

    {"version": 1,
     "time": float unix seconds,
     "node": {"pid", "node_id", "hostname", "version", "started_at": float, "uptime_s": float},
     "config": {"hash": str | None, "generation": int},
     "workers": [{"slot", "pid", "started_at_ms", "heartbeat_ms", "heartbeat_age_ms", **COUNTERS}],
     "retired": {**COUNTERS},                 # workers that died, folded in
     "totals": {**COUNTERS},                  # live workers + retired (gauges: live only)
     "routes": [{"service", "route", "requests", "status": {"1xx".."5xx"},
                 "codes": {"200": n, ...},                    # summed over sources
                 "codes_by_source": {"service": {"200": n}, "kong": {"404": n}},
                 "bytes_in", "bytes_out",
                 "latency_ms": {"request" | "upstream" | "kong":
                                {"buckets": [[le, cumulative count], ..., ["+Inf", count]],
                                 "sum": float ms, "count"}},
                 "overflow": bool}],           # true for the series refused for lack of room
     "targets": [{"upstream", "target", "requests", "failures": {"connect", "timeout", "status"},
                  "latency_ms": {"sum": float, "count", "mean": float | None}, "overflow": bool}],
     "health": [...], "breakers": [...], "fallbacks": [...],   # from the providers, see below
     "series": {"slots", "per_slot", "overflowed"},
     "memory": {"arena_bytes", "series_bytes"},
     "errors": [str]}                          # a provider that failed, named; the rest is served

    COUNTERS = {"requests", "status": {"1xx".."5xx"}, "connections": {"active", "accepted"},
                "bytes": {"in", "out"}, "upstream": {"connect_errors", "timeouts"}, "retries"}

Providers are callables returning lists of dicts (empty until their feature exists):
    health:    {"upstream", "target", "address", "state"}, state one of Kong's
               "healthy" | "unhealthy" | "healthchecks_off" | "dns_error" (more keys allowed)
    breakers:  {"route", "state"}, state "closed" | "open" | "half_open"
    fallbacks: {"route", "trigger", "final_status", "count",
                "duration_ms": {"buckets": [[le, cumulative count], ...], "sum", "count"}}
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ringgate import __version__
from shared_state import series as fields

if TYPE_CHECKING:
    from shared_state.arena import Arena
    from shared_state.series import SeriesTable

DOC_VERSION = 1
# The service and route names shown for the series refused for lack of room.
OVERFLOW_NAME = "(overflow)"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

Provider = Callable[[], list[dict[str, Any]]]

log = logging.getLogger("ringgate.stats")


def _no_items() -> list[dict[str, Any]]:
    return []


def _no_config() -> tuple[str | None, int]:
    return None, 0


@dataclass
class StatsSource:
    """What the document is built from; `build` is what the stats socket calls per request."""

    arena: Arena
    series: SeriesTable | None = None
    node_id: str = ""
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    config: Callable[[], tuple[str | None, int]] = _no_config  # -> (hash, generation)
    health: Provider = _no_items
    breakers: Provider = _no_items
    fallbacks: Provider = _no_items

    def build(self) -> dict[str, Any]:
        return build_document(self)


def counters(block: dict[str, int]) -> dict[str, Any]:
    """An arena block (read_block / totals) in the document's nested shape."""
    return {
        "requests": block["requests"],
        "status": {klass: block[f"status_{klass}"] for klass in STATUS_CLASSES},
        "connections": {"active": block["connections_active"], "accepted": block["connections_accepted"]},
        "bytes": {"in": block["bytes_in"], "out": block["bytes_out"]},
        "upstream": {"connect_errors": block["upstream_connect_errors"], "timeouts": block["upstream_timeouts"]},
        "retries": block["retries"],
    }


def workers(arena: Arena, now_ms: int) -> list[dict[str, Any]]:
    """Slots whose worker has announced its pid (a retired slot is zeroed until its successor starts)."""
    out = []
    for slot in range(arena.slots):
        block = arena.read_block(slot)
        if not block["pid"]:
            continue
        heartbeat = block["heartbeat_ms"]
        out.append({
            "slot": slot,
            "pid": block["pid"],
            "started_at_ms": block["started_at_ms"],
            "heartbeat_ms": heartbeat,
            "heartbeat_age_ms": max(0, now_ms - heartbeat) if heartbeat else None,
            **counters(block),
        })
    return out


def histogram(vec: list[int], base: int, bounds: tuple[int, ...]) -> dict[str, Any]:
    """Per-bucket words + sum in µs -> Prometheus-style cumulative buckets, sum in ms."""
    running = 0
    buckets: list[list[Any]] = []
    for i, bound in enumerate(bounds):
        running += vec[base + i]
        buckets.append([bound, running])
    running += vec[base + len(bounds)]
    buckets.append(["+Inf", running])
    return {"buckets": buckets, "sum": vec[base + len(bounds) + 1] / 1000.0, "count": running}


def _empty_route(service: str, route: str, overflow: bool) -> dict[str, Any]:
    zero = [0] * fields.R_WORDS
    return {
        "service": service,
        "route": route,
        "requests": 0,
        "status": {klass: 0 for klass in STATUS_CLASSES},
        "codes": {},
        "codes_by_source": {},
        "bytes_in": 0,
        "bytes_out": 0,
        "latency_ms": {name: histogram(zero, base, bounds) for name, (base, bounds) in fields.HISTOGRAMS.items()},
        "overflow": overflow,
    }


def routes_and_targets(merged: dict[bytes, list[int]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Group merged series into the document's routes and targets lists (sorted by name)."""
    routes: dict[tuple[str, str], dict[str, Any]] = {}
    targets: list[dict[str, Any]] = []

    def route_entry(names: tuple[str, ...]) -> dict[str, Any]:
        overflow = not names
        service, route = (OVERFLOW_NAME, OVERFLOW_NAME) if overflow else names[:2]
        entry = routes.get((service, route))
        if entry is None:
            entry = routes[(service, route)] = _empty_route(service, route, overflow)
        return entry

    for key, vec in merged.items():
        kind, names = fields.decode_key(key)
        if kind == fields.KIND_ROUTE:
            entry = route_entry(names)
            entry["requests"] = vec[fields.R_REQUESTS]
            entry["status"] = {klass: vec[fields.R_STATUS_1XX + i] for i, klass in enumerate(STATUS_CLASSES)}
            entry["bytes_in"] = vec[fields.R_BYTES_IN]
            entry["bytes_out"] = vec[fields.R_BYTES_OUT]
            entry["latency_ms"] = {name: histogram(vec, base, bounds)
                                   for name, (base, bounds) in fields.HISTOGRAMS.items()}
        elif kind == fields.KIND_CODE:
            entry = route_entry(names)
            code, source = (names[2], names[3]) if names else ("other", "unknown")
            count = vec[fields.C_REQUESTS]
            entry["codes"][code] = entry["codes"].get(code, 0) + count
            by_source = entry["codes_by_source"].setdefault(source, {})
            by_source[code] = by_source.get(code, 0) + count
        elif kind == fields.KIND_TARGET:
            upstream, target = names if names else (OVERFLOW_NAME, OVERFLOW_NAME)
            answered = vec[fields.T_LATENCY_COUNT]
            latency_sum = vec[fields.T_LATENCY_SUM_US] / 1000.0
            targets.append({
                "upstream": upstream,
                "target": target,
                "requests": vec[fields.T_REQUESTS],
                "failures": {
                    "connect": vec[fields.T_CONNECT_FAILURES],
                    "timeout": vec[fields.T_TIMEOUTS],
                    "status": vec[fields.T_STATUS_FAILURES],
                },
                "latency_ms": {"sum": latency_sum, "count": answered,
                               "mean": latency_sum / answered if answered else None},
                "overflow": not names,
            })
    for entry in routes.values():
        entry["codes"] = dict(sorted(entry["codes"].items()))
    ordered_routes = [routes[k] for k in sorted(routes, key=lambda k: (routes[k]["overflow"], k))]
    targets.sort(key=lambda t: (t["overflow"], t["upstream"], t["target"]))
    return ordered_routes, targets


def _provided(name: str, provider: Provider, errors: list[str]) -> list[dict[str, Any]]:
    """A provider's items; one that fails is reported in `errors`, never fails the document."""
    try:
        return list(provider())
    except Exception as exc:  # the stats must stay readable when one feature is broken
        log.exception("stats provider %s failed", name)
        errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
        return []


def build_document(source: StatsSource) -> dict[str, Any]:
    now = time.time()
    arena = source.arena
    config_hash, generation = source.config()
    errors: list[str] = []
    if source.series is not None:
        routes, targets = routes_and_targets(source.series.merged())
        series_info = {"slots": source.series.slots, "per_slot": source.series.series_per_slot,
                       "overflowed": source.series.overflowed()}
        series_bytes = source.series.size
    else:
        routes, targets = [], []
        series_info = {"slots": 0, "per_slot": 0, "overflowed": 0}
        series_bytes = 0
    return {
        "version": DOC_VERSION,
        "time": now,
        "node": {
            "pid": source.pid,
            "node_id": source.node_id,
            "hostname": socket.gethostname(),
            "version": __version__,
            "started_at": source.started_at,
            "uptime_s": max(0.0, now - source.started_at),
        },
        "config": {"hash": config_hash, "generation": generation},
        "workers": workers(arena, int(now * 1000)),
        "retired": counters(arena.read_block(arena.slots)),
        "totals": counters(arena.totals()),
        "routes": routes,
        "targets": targets,
        "health": _provided("health", source.health, errors),
        "breakers": _provided("breakers", source.breakers, errors),
        "fallbacks": _provided("fallbacks", source.fallbacks, errors),
        "series": series_info,
        "memory": {"arena_bytes": arena.size, "series_bytes": series_bytes},
        "errors": errors,
    }
