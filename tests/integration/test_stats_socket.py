"""The stats socket, `ringgate stats` and /metrics against a running node with several workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringgate.origin import OriginServer
from ringgate.statsock import STATS_SOCKET, query
from tests.integration.client import request
from tests.integration.conftest import ROOT, Gateway

pytestmark = pytest.mark.integration


def _stats(gateway: Gateway) -> dict:
    reply = query(os.path.join(gateway.prefix, STATS_SOCKET), {"op": "stats"}, timeout=5)
    assert reply.get("ok"), reply
    return reply["stats"]


def _route(doc: dict, name: str) -> dict:
    return next(r for r in doc["routes"] if r["route"] == name)


def test_counts_merged_across_workers_and_kept_when_one_dies(
        origin_factory: Callable[[str], OriginServer], gateway_factory: Callable[..., Gateway]) -> None:
    origin = origin_factory("o")
    config = {
        "_format_version": "3.0",
        "upstreams": [{"name": "pool", "targets": [{"target": origin.address}]}],
        "services": [{"name": "svc", "host": "pool", "routes": [{"name": "ok", "paths": ["/ok"]},
                                                              {"name": "err", "paths": ["/err"]}]}],
    }
    gateway = gateway_factory(config, workers=2)
    ok_count = 0
    while ok_count < 30 or (len([w for w in _stats(gateway)["workers"] if w["requests"]]) < 2 and ok_count < 300):
        # Fresh connections: the kernel spreads them over both workers (go on until both served).
        assert request(gateway.proxy_port, "GET", "/ok").status == 200
        ok_count += 1
    for _ in range(7):
        assert request(gateway.proxy_port, "GET", "/err/status/503").status == 503
    assert request(gateway.proxy_port, "GET", "/nowhere").status == 404

    doc = _stats(gateway)
    total = ok_count + 8
    assert doc["totals"]["requests"] == total
    assert doc["totals"]["status"]["2xx"] == ok_count and doc["totals"]["status"]["5xx"] == 7
    ok, err = _route(doc, "ok"), _route(doc, "err")
    assert ok["requests"] == ok_count and ok["service"] == "svc" and ok["codes"]["200"] == ok_count
    assert err["requests"] == 7 and err["status"]["5xx"] == 7
    assert sum(w["requests"] for w in doc["workers"]) == total
    serving = [w for w in doc["workers"] if w["requests"] > 0]
    assert len(serving) == 2, doc["workers"]  # both workers served and both are counted
    target = next(t for t in doc["targets"] if t["target"] == origin.address)
    assert target["upstream"] == "pool" and target["requests"] == ok_count + 7

    # A worker killed with SIGKILL: its counts are folded into the retired block, never lost.
    victim = serving[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = _stats(gateway)
        if doc["retired"]["requests"] > 0:
            break
        time.sleep(0.05)
    assert doc["retired"]["requests"] == serving[0]["requests"]
    assert doc["totals"]["requests"] == total and _route(doc, "ok")["requests"] == ok_count

    # The CLI: a readable table, and the same document as JSON.
    args = [sys.executable, "-m", "ringgate", "stats", "--prefix", str(gateway.prefix)]
    table = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and "ok" in table.stdout and "Routes" in table.stdout, table.stderr
    as_json = subprocess.run(args + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert json.loads(as_json.stdout)["totals"]["requests"] == total

    # /metrics in Prometheus text: Kong's names with our prefix.
    metrics = request(gateway.admin_port, "GET", "/metrics")
    assert metrics.status == 200 and metrics.header("content-type").startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
    samples = {(s.labels.get("route"), s.labels.get("code")): s.value
               for s in families["ringgate_http_requests"].samples}
    assert samples[("ok", "200")] == ok_count and samples[("err", "503")] == 7
    assert "ringgate_request_latency_ms" in families and "ringgate_bandwidth_bytes" in families


def test_stats_cli_without_a_gateway_says_so(tmp_path: object) -> None:
    result = subprocess.run([sys.executable, "-m", "ringgate", "stats", "--prefix", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "is the gateway running" in result.stderr
