"""Active health checks end to end: the control process probes, every worker follows."""
from __future__ import annotations

import time
from typing import Callable

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def test_a_dead_target_is_taken_out_and_brought_back_by_probes(
        origin_factory: Callable[[str], OriginServer], gateway_factory: Callable[..., Gateway]) -> None:
    good, flaky = origin_factory("good"), origin_factory("flaky")
    checks = {"active": {"http_path": "/status/200", "timeout": 0.5,
                         "healthy": {"interval": 0.2, "successes": 2},
                         "unhealthy": {"interval": 0.2, "tcp_failures": 2, "http_failures": 2, "timeouts": 2}}}
    config = {
        "_format_version": "3.0",
        "upstreams": [{"name": "pool", "healthchecks": checks,
                       "targets": [{"target": good.address}, {"target": flaky.address}]}],
        "services": [{"name": "s", "host": "pool", "retries": 0, "routes": [{"name": "r", "paths": ["/"]}]}],
    }
    gateway = gateway_factory(config, workers=2)
    port = flaky.port
    flaky.stop()  # it dies: probes see refused connections
    gateway.wait_for(f"target {flaky.address} is now UNHEALTHY", timeout=10)
    statuses = [request(gateway.proxy_port, "GET", "/x").status for _ in range(20)]
    assert statuses == [200] * 20  # no worker sends to it any more (retries 0: a miss would be a 502)

    back = OriginServer("flaky", port=port).start()  # it comes back on the same address
    try:
        gateway.wait_for(f"target {back.address} is now HEALTHY", timeout=10)
        deadline = time.monotonic() + 5
        while back.log.count(("GET", "/x")) == 0 and time.monotonic() < deadline:
            assert request(gateway.proxy_port, "GET", "/x").status == 200
        assert back.log.count(("GET", "/x")) > 0
        assert request(gateway.admin_port, "GET", "/upstreams/pool/health").json()["data"][1]["health"] == "HEALTHY"
    finally:
        back.stop()
