"""The plugin contract end to end: Kong's scoping and PRIORITY, errors that cost one request, streams
that stay streams with a body_filter, user plugins loaded by module path."""
from __future__ import annotations

import re
import socket
import time
from typing import Callable

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

PLUGINS = ("bundled,tests.integration.contract_plugins:TagPlugin,tests.integration.contract_plugins:LaterPlugin,"
           "tests.integration.contract_plugins:BoomPlugin,tests.integration.contract_plugins:ChunkCounterPlugin")


@pytest.fixture
def gateway(origin_factory: Callable[[str], OriginServer], gateway_factory: Callable[..., Gateway]) -> Gateway:
    origin = origin_factory("o")
    config = {
        "_format_version": "3.0",
        "services": [
            {"name": "plain", "url": f"http://{origin.address}", "routes": [{"name": "r-global", "paths": ["/g"]}]},
            {"name": "svc", "url": f"http://{origin.address}",
             "plugins": [{"name": "tag", "config": {"tag": "service"}}],
             "routes": [{"name": "r-service", "paths": ["/s"]},
                        {"name": "r-route", "paths": ["/r"], "plugins": [{"name": "tag", "config": {"tag": "route"}}]}]},
        ],
        "plugins": [{"name": "tag"}, {"name": "later"}, {"name": "boom"}, {"name": "chunk-counter"}],
    }
    return gateway_factory(config, workers=1, extra_args=["--plugins", PLUGINS])


def test_most_specific_instance_wins_and_priority_orders(gateway: Gateway) -> None:
    for path, tag in (("/g", "global"), ("/s", "service"), ("/r", "route")):
        response = request(gateway.proxy_port, "GET", path)
        assert response.status == 200
        assert response.header("X-Tag") == tag
        sent = dict(response.json()["headers"])
        assert sent["X-Tag"] == tag  # the upstream got the access phase's header
        # One instance of each name per request; higher PRIORITY first.
        assert response.header("X-Trail") == f"tag:{tag},later"


def test_a_raising_plugin_costs_one_request_not_the_worker(gateway: Gateway) -> None:
    pids = set(gateway.worker_pids())
    response = request(gateway.proxy_port, "GET", "/g", headers={"X-Boom": "access"})
    assert response.status == 500 and response.json()["message"] == "An unexpected error occurred"
    gateway.wait_for("plugin boom failed in the access phase")
    # After the answer started: logged, the answer goes on.
    response = request(gateway.proxy_port, "GET", "/g", headers={"X-Boom": "header_filter"})
    assert response.status == 200
    gateway.wait_for("plugin boom failed in the header_filter phase")
    assert request(gateway.proxy_port, "GET", "/g").status == 200
    assert set(gateway.worker_pids()) == pids  # nobody died


def test_body_filter_sees_pieces_without_buffering_the_stream(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=10) as sock:
        sock.sendall(b"GET /g/sse?n=3&interval=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        arrivals: list[float] = []
        buffer = b""
        while b"\r\n0\r\n\r\n" not in buffer.partition(b"\r\n\r\n")[2]:
            data = sock.recv(65536)
            assert data
            buffer += data
            if data.count(b"data: "):
                arrivals.append(time.monotonic() - started)
    assert buffer.count(b"data: ") == 3
    assert arrivals[-1] - arrivals[0] > 0.7  # events came as they were sent, not all at the end
    line = gateway.wait_for("chunk-counter /g/sse saw")
    assert int(re.search(r"saw (\d+) pieces", line).group(1)) >= 3  # type: ignore[union-attr]
