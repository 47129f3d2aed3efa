"""The stats document as Prometheus text exposition (format 0.0.4), for GET /metrics.

Names and labels are those of Kong's prometheus plugin (Kong 3.x exporter.lua) with the
`ringgate_` prefix in place of `kong_`, so Kong's dashboards work after a prefix change:

    ringgate_http_requests_total{service,route,code,source,workspace,consumer}     counter
    ringgate_request_latency_ms / ringgate_upstream_latency_ms /
    ringgate_kong_latency_ms{service,route,workspace}                              histogram
    ringgate_bandwidth_bytes{service,route,direction,workspace,consumer}           counter
    ringgate_upstream_target_health{upstream,target,address,state,subsystem}       gauge, one
        series per state (healthchecks_off, healthy, unhealthy, dns_error), 1 for the current
    ringgate_nginx_connections_total{node_id,subsystem,state}, ringgate_nginx_requests_total,
    ringgate_node_info, ringgate_datastore_reachable (always 1: DB-less),
    ringgate_memory_lua_shared_dict_total_bytes{node_id,shared_dict,kong_subsystem}

and ours: ringgate_fallback_total{route,trigger,final_status}, ringgate_fallback_duration_ms
{route} (histogram), ringgate_breaker_state{route,state} (one series per state, 1 for the
current), ringgate_upstream_target_requests_total / _failures_total{upstream,target[,reason]},
ringgate_stats_series_overflow_total. There are no workspaces or consumers yet: workspace is
"default" and consumer "" (Kong's value when no consumer was identified).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

PREFIX = "ringgate_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKSPACE = "default"
SUBSYSTEM = "http"
TARGET_STATES = ("healthchecks_off", "healthy", "unhealthy", "dns_error")
BREAKER_STATES = ("closed", "open", "half_open")

Labels = Sequence[tuple[str, Any]]
Sample = tuple[str, Labels, float | int]  # (name suffix, labels, value)


def escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _le(bound: Any) -> str:
    return "+Inf" if bound == "+Inf" else format_value(float(bound))


class Exposition:
    """Collects metric families in order and writes them as text."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {full} {kind}")
        for suffix, labels, value in samples:
            if labels:
                rendered = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels)
                self.lines.append(f"{full}{suffix}{{{rendered}}} {format_value(value)}")
            else:
                self.lines.append(f"{full}{suffix} {format_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def histogram_samples(labels: Labels, hist: dict[str, Any]) -> list[Sample]:
    """A document histogram ({"buckets": [[le, cumulative]...], "sum", "count"}) as samples."""
    samples: list[Sample] = [("_bucket", (*labels, ("le", _le(le))), count) for le, count in hist["buckets"]]
    samples.append(("_sum", labels, float(hist["sum"])))
    samples.append(("_count", labels, hist["count"]))
    return samples


def _merge_histograms(hists: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum histograms with the same bounds (cumulative counts add up bucket by bucket)."""
    counts: dict[Any, int] = {}
    for hist in hists:
        for le, count in hist["buckets"]:
            counts[le] = counts.get(le, 0) + count
    return {"buckets": [[le, counts[le]] for le in counts], "sum": sum(h["sum"] for h in hists),
            "count": sum(h["count"] for h in hists)}


def _route_metrics(out: Exposition, routes: list[dict[str, Any]]) -> None:
    requests: list[Sample] = []
    bandwidth: list[Sample] = []
    latency: dict[str, list[Sample]] = {"request": [], "upstream": [], "kong": []}
    for route in routes:
        service, name = route["service"], route["route"]
        for source, codes in sorted(route["codes_by_source"].items()):
            for code, count in codes.items():
                requests.append(("", (("service", service), ("route", name), ("code", code), ("source", source),
                                      ("workspace", WORKSPACE), ("consumer", "")), count))
        for direction, key in (("ingress", "bytes_in"), ("egress", "bytes_out")):
            bandwidth.append(("", (("service", service), ("route", name), ("direction", direction),
                                   ("workspace", WORKSPACE), ("consumer", "")), route[key]))
        labels = (("service", service), ("route", name), ("workspace", WORKSPACE))
        for kind, samples in latency.items():
            samples.extend(histogram_samples(labels, route["latency_ms"][kind]))
    out.family("http_requests_total", "counter", "HTTP status codes per consumer/service/route in Ringgate",
               requests)
    out.family("kong_latency_ms", "histogram",
               "Latency added by Ringgate and enabled plugins for each service/route", latency["kong"])
    out.family("upstream_latency_ms", "histogram",
               "Latency added by upstream response for each service/route", latency["upstream"])
    out.family("request_latency_ms", "histogram",
               "Total latency incurred during requests for each service/route", latency["request"])
    out.family("bandwidth_bytes", "counter", "Total bandwidth (ingress/egress) throughput in bytes", bandwidth)


def _target_metrics(out: Exposition, doc: dict[str, Any]) -> None:
    health: list[Sample] = []
    for item in doc.get("health", []):
        current = str(item.get("state", "")).lower()
        for state in TARGET_STATES:
            health.append(("", (("upstream", item.get("upstream", "")), ("target", item.get("target", "")),
                                ("address", item.get("address", "")), ("state", state),
                                ("subsystem", SUBSYSTEM)), 1 if state == current else 0))
    out.family("upstream_target_health", "gauge",
               "Health status of targets of upstream. States = healthchecks_off|healthy|unhealthy|dns_error, "
               "value is 1 when state is populated.", health)
    requests: list[Sample] = []
    failures: list[Sample] = []
    for target in doc.get("targets", []):
        labels = (("upstream", target["upstream"]), ("target", target["target"]))
        requests.append(("", labels, target["requests"]))
        for reason, count in target["failures"].items():
            failures.append(("", (*labels, ("reason", reason)), count))
    out.family("upstream_target_requests_total", "counter", "Requests sent to each upstream target", requests)
    out.family("upstream_target_failures_total", "counter",
               "Failed attempts per upstream target, by reason (connect, timeout, status)", failures)


def _node_metrics(out: Exposition, doc: dict[str, Any]) -> None:
    node_id = doc["node"]["node_id"]
    totals = doc["totals"]
    base = (("node_id", node_id), ("subsystem", SUBSYSTEM))
    connections = totals["connections"]
    out.family("nginx_connections_total", "gauge", "Number of connections by subsystem", [
        ("", (*base, ("state", "accepted")), connections["accepted"]),
        ("", (*base, ("state", "handled")), connections["accepted"]),
        ("", (*base, ("state", "total")), totals["requests"]),  # as Kong: total = requests
        ("", (*base, ("state", "active")), connections["active"]),
    ])
    out.family("nginx_requests_total", "gauge", "Number of requests total", [("", base, totals["requests"])])
    out.family("node_info", "gauge", "Ringgate node metadata information",
               [("", (("node_id", node_id), ("version", doc["node"]["version"])), 1)])
    out.family("datastore_reachable", "gauge", "Datastore reachable from Ringgate, 0 is unreachable (DB-less: 1)",
               [("", (), 1)])
    memory = doc.get("memory", {})
    out.family("memory_lua_shared_dict_total_bytes", "gauge", "Total capacity in bytes of a shared memory zone", [
        ("", (("node_id", node_id), ("shared_dict", zone), ("kong_subsystem", SUBSYSTEM)), memory.get(key, 0))
        for zone, key in (("arena", "arena_bytes"), ("series", "series_bytes"))
    ])
    out.family("stats_series_overflow_total", "counter",
               "Labelled series refused because a worker's stats region was full",
               [("", (), doc.get("series", {}).get("overflowed", 0))])


def _resilience_metrics(out: Exposition, doc: dict[str, Any]) -> None:
    fallbacks = doc.get("fallbacks", [])
    out.family("fallback_total", "counter", "Requests answered through a fallback chain, by trigger and final status", [
        ("", (("route", item.get("route", "")), ("trigger", item.get("trigger", "")),
              ("final_status", item.get("final_status", ""))), item.get("count", 0))
        for item in fallbacks
    ])
    by_route: dict[str, list[dict[str, Any]]] = {}
    for item in fallbacks:
        if item.get("duration_ms"):
            by_route.setdefault(str(item.get("route", "")), []).append(item["duration_ms"])
    durations: list[Sample] = []
    for route in sorted(by_route):
        durations.extend(histogram_samples((("route", route),), _merge_histograms(by_route[route])))
    out.family("fallback_duration_ms", "histogram", "Time spent walking a fallback chain, per route", durations)
    breakers: list[Sample] = []
    for item in doc.get("breakers", []):
        current = str(item.get("state", "")).lower()
        for state in BREAKER_STATES:
            breakers.append(("", (("route", item.get("route", "")), ("state", state)), 1 if state == current else 0))
    out.family("breaker_state", "gauge", "Circuit breaker state per route, value is 1 for the current state",
               breakers)


def render(doc: dict[str, Any]) -> str:
    """Prometheus text for a stats document (ringgate.stats.build_document)."""
    out = Exposition()
    _route_metrics(out, doc.get("routes", []))
    _target_metrics(out, doc)
    _node_metrics(out, doc)
    _resilience_metrics(out, doc)
    return out.text()
