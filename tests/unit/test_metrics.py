"""Prometheus text rendered from a real stats document, parsed back with prometheus_client's parser."""
from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringgate.metrics import escape_label, format_value, render
from ringgate.stats import build_document
from shared_state import series as s
from tests.unit.test_stats_doc import filled_source

HEALTH = [
    {"upstream": "up", "target": "10.0.0.1:80", "address": "10.0.0.1:80", "state": "healthy"},
    {"upstream": "up", "target": "db.internal:5432", "address": "", "state": "dns_error"},
]
BREAKERS = [{"route": "r1", "state": "open"}, {"route": "r2", "state": "closed"}]


def _duration(buckets: list[tuple[int, int]], total: float) -> dict[str, Any]:
    cumulative, running = [], 0
    for le, count in buckets:
        running += count
        cumulative.append([le, running])
    cumulative.append(["+Inf", running])
    return {"buckets": cumulative, "sum": total, "count": running}


FALLBACKS = [
    {"route": "r1", "trigger": "status", "final_status": 200, "count": 3,
     "duration_ms": _duration([(10, 2), (100, 1)], 60.0)},
    {"route": "r1", "trigger": "connect", "final_status": 503, "count": 1,
     "duration_ms": _duration([(10, 0), (100, 1)], 40.0)},
]


def _parse(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    name = sample_name
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            name = name[: -len(suffix)]
            break
    matches = [sample.value for sample in families[name].samples
               if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{sample_name}{labels}: {len(matches)} samples"
    return matches[0]


@pytest.fixture(scope="module")
def families() -> dict[str, Any]:
    doc = build_document(filled_source(health=lambda: HEALTH, breakers=lambda: BREAKERS,
                                       fallbacks=lambda: FALLBACKS))
    return _parse(render(doc))


def test_requests_by_code_use_kongs_names_and_labels(families: dict[str, Any]) -> None:
    family = families["ringgate_http_requests"]
    assert family.type == "counter"
    route = {"service": "svc", "route": "r1", "workspace": "default", "consumer": ""}
    assert _value(families, "ringgate_http_requests_total", code="200", source="service", **route) == 5
    assert _value(families, "ringgate_http_requests_total", code="404", source="kong", **route) == 1
    assert _value(families, "ringgate_http_requests_total", code="503", source="service", **route) == 2
    assert {sample.labels["code"] for sample in family.samples} == {"200", "404", "503"}


def test_latency_histograms_have_kongs_buckets_and_are_consistent(families: dict[str, Any]) -> None:
    labels = {"service": "svc", "route": "r1", "workspace": "default"}
    assert families["ringgate_request_latency_ms"].type == "histogram"
    assert _value(families, "ringgate_request_latency_ms_bucket", le="25.0", **labels) == 0
    assert _value(families, "ringgate_request_latency_ms_bucket", le="50.0", **labels) == 4
    assert _value(families, "ringgate_request_latency_ms_bucket", le="+Inf", **labels) == 5
    assert _value(families, "ringgate_request_latency_ms_count", **labels) == 5
    assert _value(families, "ringgate_request_latency_ms_sum", **labels) == 90_000 + 120.0
    assert _value(families, "ringgate_upstream_latency_ms_bucket", le="25.0", **labels) == 4
    assert _value(families, "ringgate_kong_latency_ms_bucket", le="2.0", **labels) == 5
    assert _value(families, "ringgate_kong_latency_ms_sum", **labels) == 7.5
    for name, bounds in (("ringgate_kong_latency_ms", s.KONG_BOUNDS_MS),
                         ("ringgate_upstream_latency_ms", s.LONG_BOUNDS_MS),
                         ("ringgate_request_latency_ms", s.LONG_BOUNDS_MS)):
        for route in ("r1", "a", "b", "(overflow)"):
            buckets = [(sample.labels["le"], sample.value) for sample in families[name].samples
                       if sample.name == name + "_bucket" and sample.labels["route"] == route]
            assert [le for le, _ in buckets] == [f"{float(b)}" for b in bounds] + ["+Inf"]
            counts = [value for _, value in buckets]
            assert counts == sorted(counts), f"{name} {route}: buckets are not cumulative"
            count = [sample.value for sample in families[name].samples
                     if sample.name == name + "_count" and sample.labels["route"] == route]
            assert count == [counts[-1]]


def test_bandwidth_and_node_gauges(families: dict[str, Any]) -> None:
    labels = {"service": "svc", "route": "r1", "workspace": "default", "consumer": ""}
    assert _value(families, "ringgate_bandwidth_bytes_total", direction="ingress", **labels) == 50
    assert _value(families, "ringgate_bandwidth_bytes_total", direction="egress", **labels) == 500
    node = {"node_id": "node-1", "subsystem": "http"}
    assert _value(families, "ringgate_nginx_requests_total", **node) == 8
    assert _value(families, "ringgate_nginx_connections_total", state="active", **node) == 2
    assert _value(families, "ringgate_nginx_connections_total", state="accepted", **node) == 3
    assert _value(families, "ringgate_node_info", node_id="node-1") == 1
    assert _value(families, "ringgate_datastore_reachable") == 1
    assert _value(families, "ringgate_stats_series_overflow_total") == 1
    assert _value(families, "ringgate_memory_lua_shared_dict_total_bytes", shared_dict="series") > 0


def test_target_health_has_one_series_per_state(families: dict[str, Any]) -> None:
    samples = families["ringgate_upstream_target_health"].samples
    assert len(samples) == 8
    current = {(x.labels["target"], x.labels["state"]) for x in samples if x.value == 1}
    assert current == {("10.0.0.1:80", "healthy"), ("db.internal:5432", "dns_error")}
    assert all(x.labels["subsystem"] == "http" and x.labels["upstream"] == "up" for x in samples)
    assert _value(families, "ringgate_upstream_target_requests_total", target="10.0.0.1:80") == 5
    assert _value(families, "ringgate_upstream_target_failures_total", target="10.0.0.1:80", reason="timeout") == 1


def test_fallback_and_breaker_metrics(families: dict[str, Any]) -> None:
    assert _value(families, "ringgate_fallback_total", route="r1", trigger="status", final_status="200") == 3
    assert _value(families, "ringgate_fallback_total", route="r1", trigger="connect", final_status="503") == 1
    assert _value(families, "ringgate_fallback_duration_ms_bucket", route="r1", le="10.0") == 2
    assert _value(families, "ringgate_fallback_duration_ms_bucket", route="r1", le="+Inf") == 4
    assert _value(families, "ringgate_fallback_duration_ms_sum", route="r1") == 100.0
    assert _value(families, "ringgate_breaker_state", route="r1", state="open") == 1
    assert _value(families, "ringgate_breaker_state", route="r1", state="closed") == 0
    assert _value(families, "ringgate_breaker_state", route="r2", state="closed") == 1
    assert len(families["ringgate_breaker_state"].samples) == 6


def test_every_family_has_help_and_type_lines() -> None:
    text = render(build_document(filled_source()))
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    helps = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    assert names == helps and len(names) >= 17
    assert all(name.startswith("ringgate_") for name in names)
    assert text.endswith("\n")


def test_label_values_are_escaped() -> None:
    source = filled_source()
    assert source.series is not None
    odd_service, odd_route = 'say "hi"\\now', "line\nbreak"
    index = source.series.series_index(2, s.code_key(odd_service, odd_route, 418, "kong"), s.KIND_CODE)
    source.series.add(2, index, s.C_REQUESTS, 9)
    text = render(build_document(source))
    assert 'service="say \\"hi\\"\\\\now",route="line\\nbreak"' in text
    families = _parse(text)
    assert _value(families, "ringgate_http_requests_total", service=odd_service, route=odd_route, code="418") == 9
    assert escape_label('a"b') == 'a\\"b'


def test_value_formatting() -> None:
    assert format_value(3) == "3"
    assert format_value(2.5) == "2.5"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("nan")) == "NaN"
    assert format_value(True) == "1"
    assert format_value(1 << 63) == str(1 << 63)
