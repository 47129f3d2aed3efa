"""Kong's health endpoints on the admin listener, against real origins and two workers."""
from __future__ import annotations

from typing import Callable

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def _config(checked: list[str], unchecked: list[str]) -> dict:
    return {
        "_format_version": "3.0",
        "upstreams": [
            {"name": "checked", "healthchecks": {"passive": {"unhealthy": {"http_failures": 5}}},
             "targets": [{"target": t} for t in checked]},
            {"name": "plain", "targets": [{"target": t} for t in unchecked]},
        ],
        "services": [
            {"name": "a", "host": "checked", "routes": [{"name": "ra", "paths": ["/a"]}]},
            {"name": "b", "host": "plain", "routes": [{"name": "rb", "paths": ["/b"]}]},
        ],
    }


def _health(gateway: Gateway, upstream: str, query: str = "") -> tuple[int, dict]:
    response = request(gateway.admin_port, "GET", f"/upstreams/{upstream}/health{query}")
    return response.status, response.json()


def test_health_listing_and_manual_set(origin_factory: Callable[[str], OriginServer],
                                       gateway_factory: Callable[..., Gateway]) -> None:
    one, two, three = origin_factory("one"), origin_factory("two"), origin_factory("three")
    gateway = gateway_factory(_config([one.address, two.address], [three.address]), workers=2)

    status, body = _health(gateway, "checked")
    assert status == 200 and body["next"] is None and body["node_id"]
    rows = {row["target"]: row for row in body["data"]}
    assert {rows[t]["health"] for t in (one.address, two.address)} == {"HEALTHY"}
    address = rows[two.address]["data"]["addresses"][0]
    assert (address["ip"], address["port"], address["weight"]) == ("127.0.0.1", two.port, 100)
    assert _health(gateway, "plain")[1]["data"][0]["health"] == "HEALTHCHECKS_OFF"
    assert _health(gateway, "checked", "?balancer_health=1")[1]["data"]["health"] == "HEALTHY"

    put = request(gateway.admin_port, "PUT", f"/upstreams/checked/targets/{two.address}/unhealthy")
    assert put.status == 204 and put.body == b""
    rows = {row["target"]: row for row in _health(gateway, "checked")[1]["data"]}
    assert rows[two.address]["health"] == "UNHEALTHY"
    assert rows[two.address]["data"]["weight"]["available"] == 0
    two.reset_counts()
    for _ in range(20):  # fresh connections: both workers serve, neither may send to `two`
        assert request(gateway.proxy_port, "GET", "/a").status == 200
    assert two.requests == 0

    # By target id works as well as by host:port; back to healthy, traffic returns.
    target_id = rows[two.address]["id"]
    assert request(gateway.admin_port, "PUT", f"/upstreams/checked/targets/{target_id}/healthy").status == 204
    for _ in range(20):
        request(gateway.proxy_port, "GET", "/a")
    assert two.requests > 0

    # An upstream without health checks can still be set by hand (Kong does too).
    assert request(gateway.admin_port, "PUT", f"/upstreams/plain/targets/{three.address}/unhealthy").status == 204
    assert _health(gateway, "plain")[1]["data"][0]["health"] == "UNHEALTHY"
    assert request(gateway.proxy_port, "GET", "/b").status == 503

    # Address form of the endpoint.
    path = f"/upstreams/checked/targets/{one.address}/{one.address}/unhealthy"
    assert request(gateway.admin_port, "PUT", path).status == 204


def test_unknown_upstream_or_target_is_404(origin_factory: Callable[[str], OriginServer],
                                           gateway_factory: Callable[..., Gateway]) -> None:
    one = origin_factory("one")
    gateway = gateway_factory(_config([one.address], [one.address]), workers=1)
    for method, path in (("GET", "/upstreams/nope/health"),
                         ("PUT", "/upstreams/nope/targets/1.2.3.4:80/healthy"),
                         ("PUT", "/upstreams/checked/targets/10.9.9.9:80/unhealthy"),
                         ("PUT", f"/upstreams/checked/targets/{one.address}/10.9.9.9:1/unhealthy")):
        response = request(gateway.admin_port, method, path)
        assert response.status == 404 and response.json() == {"message": "Not found"}, path
