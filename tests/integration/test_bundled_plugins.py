"""The bundled plugins end to end: one real gateway (CLI, 2 workers, kong.yml), each plugin on its own route."""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import ROOT, Gateway, serving

pytestmark = pytest.mark.integration

HOUR_LIMIT = 5


class Env:
    def __init__(self, gateway: Gateway, origin: OriginServer) -> None:
        self.gateway = gateway
        self.origin = origin

    @property
    def port(self) -> int:
        return self.gateway.proxy_port


def _config(origin: OriginServer) -> dict[str, Any]:
    def route(name: str, *paths: str) -> dict[str, Any]:
        return {"name": name, "paths": list(paths), "strip_path": False}

    return {
        "_format_version": "3.0",
        "services": [{"name": "origin", "url": f"http://{origin.address}", "routes": [
            route("terminated", "/terminated"),
            route("triggered", "/triggered"),
            route("limited", "/limited"),
            route("cached", "/cached", "/chunked", "/sse"),
            route("correlated", "/correlated"),
            route("plain", "/plain"),
        ]}],
        "plugins": [
            {"name": "request-termination", "route": "terminated",
             "config": {"status_code": 403, "message": "closed for maintenance"}},
            {"name": "request-termination", "route": "triggered",
             "config": {"status_code": 200, "body": "debug stop", "content_type": "text/plain", "trigger": "X-Stop"}},
            {"name": "rate-limiting", "route": "limited", "config": {"hour": HOUR_LIMIT, "limit_by": "ip"}},
            {"name": "proxy-cache", "route": "cached",
             "config": {"strategy": "memory", "content_type": ["application/json", "text/plain"]}},
            {"name": "correlation-id", "route": "correlated", "config": {"echo_downstream": True}},
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    origin = OriginServer("origin").start()
    with serving(_config(origin), tmp_path_factory.mktemp("plugins"), [origin], workers=2) as gateway:
        yield Env(gateway, origin)


def test_request_termination_answers_without_the_upstream(env: Env) -> None:
    before = env.origin.requests
    resp = request(env.port, "GET", "/terminated/x")
    assert resp.status == 403
    assert resp.json() == {"message": "closed for maintenance"}
    assert resp.header("content-type") == "application/json; charset=utf-8"
    assert resp.header("x-kong-request-id")
    assert env.origin.requests == before


def test_request_termination_trigger(env: Env) -> None:
    passed = request(env.port, "GET", "/triggered")
    assert passed.status == 200 and passed.json()["server"] == "origin"
    stopped = request(env.port, "GET", "/triggered", headers={"X-Stop": "1"})
    assert (stopped.status, stopped.body, stopped.header("content-type")) == (200, b"debug stop", "text/plain")
    assert request(env.port, "GET", "/triggered?X-Stop").body == b"debug stop"


def test_rate_limiting_holds_for_the_whole_node(env: Env) -> None:
    if time.time() % 3600 > 3595:  # keep the test inside one calendar hour
        time.sleep(3600 - time.time() % 3600 + 0.1)
    answers = [request(env.port, "GET", "/limited") for _ in range(HOUR_LIMIT + 3)]  # new connection each
    statuses = [resp.status for resp in answers]
    assert statuses == [200] * HOUR_LIMIT + [429] * 3
    assert [resp.header("x-ratelimit-remaining-hour") for resp in answers[:HOUR_LIMIT]] == \
        [str(n) for n in range(HOUR_LIMIT - 1, -1, -1)]
    first, refused = answers[0], answers[-1]
    assert first.header("x-ratelimit-limit-hour") == str(HOUR_LIMIT)
    assert first.header("ratelimit-limit") == str(HOUR_LIMIT)
    assert 1 <= int(first.header("ratelimit-reset") or 0) <= 3600
    assert refused.json()["message"] == "API rate limit exceeded"
    assert refused.header("retry-after") == refused.header("ratelimit-reset")
    assert refused.header("x-ratelimit-remaining-hour") == "0"


def test_proxy_cache_miss_then_hit_from_shared_memory(env: Env) -> None:
    before = env.origin.requests
    miss = request(env.port, "GET", "/cached/item?b=2&a=1")
    assert miss.status == 200
    assert miss.header("x-cache-status") == "Miss"
    assert env.origin.requests == before + 1
    hits = [request(env.port, "GET", "/cached/item?a=1&b=2") for _ in range(4)]  # any worker
    assert env.origin.requests == before + 1
    for hit in hits:
        assert hit.header("x-cache-status") == "Hit"
        assert hit.header("x-cache-key") == miss.header("x-cache-key")
        assert hit.body == miss.body
        assert hit.header("x-origin") == "origin"
        assert hit.header("age") is not None
    bypass = request(env.port, "POST", "/cached/item", body=b"{}")
    assert bypass.header("x-cache-status") == "Bypass"
    assert env.origin.requests == before + 2


def test_proxy_cache_stores_a_chunked_answer_as_it_streams(env: Env) -> None:
    before = env.origin.requests
    miss = request(env.port, "GET", "/chunked/5")
    assert miss.header("x-cache-status") == "Miss"
    assert miss.body == b"".join(f"chunk {i}\n".encode() for i in range(5))
    hit = request(env.port, "GET", "/chunked/5")
    assert (hit.header("x-cache-status"), hit.body) == ("Hit", miss.body)
    assert hit.header("content-length") == str(len(miss.body))
    assert env.origin.requests == before + 1


def test_proxy_cache_leaves_event_streams_alone(env: Env) -> None:
    # text/event-stream is not a cached type: Bypass, and every request reaches the origin.
    before = env.origin.requests
    for _ in range(2):
        resp = request(env.port, "GET", "/sse?n=2&interval=0.01")
        assert resp.header("x-cache-status") == "Bypass"
        assert resp.body.count(b"data: ") == 2
    assert env.origin.requests == before + 2


def test_correlation_id_goes_upstream_and_back(env: Env) -> None:
    resp = request(env.port, "GET", "/correlated")
    echoed = resp.header("kong-request-id")
    assert echoed is not None and "#" in echoed
    sent = {k.lower(): v for k, v in resp.json()["headers"]}
    assert sent["kong-request-id"] == echoed
    kept = request(env.port, "GET", "/correlated", headers={"Kong-Request-ID": "mine-1"})
    assert kept.header("kong-request-id") == "mine-1"
    assert {k.lower(): v for k, v in kept.json()["headers"]}["kong-request-id"] == "mine-1"


def test_a_route_without_plugins_is_untouched(env: Env) -> None:
    resp = request(env.port, "GET", "/plain")
    assert resp.status == 200
    for name in ("x-cache-status", "ratelimit-limit", "kong-request-id"):
        assert resp.header(name) is None


def test_the_documented_example_plugin_loads_by_module_path(tmp_path: Path, origin_factory: Any,
                                                             gateway_factory: Any) -> None:
    """docs/plugins.md's example, as written there, enabled by RINGGATE_PLUGINS next to the bundled ones."""
    doc = (ROOT / "docs" / "plugins.md").read_text()
    example = re.search(r"```python\n(.*?)```", doc, re.DOTALL)
    assert example is not None
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "hello.py").write_text(example.group(1))
    origin = origin_factory("user-plugin")
    config = {
        "_format_version": "3.0",
        "services": [{"name": "s", "url": f"http://{origin.address}", "routes": [{"name": "greeted", "paths": ["/"]}]}],
        "plugins": [{"name": "hello", "route": "greeted", "config": {"header": "X-Greeting"}},
                    {"name": "correlation-id", "route": "greeted"}],
    }
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    gateway = gateway_factory(config, env={"PYTHONPATH": path, "RINGGATE_PLUGINS": "bundled,mypkg.hello:HelloPlugin"})
    resp = request(gateway.proxy_port, "GET", "/x")
    assert resp.status == 200
    assert resp.header("x-greeting") == "route greeted"
    sent = {k.lower(): v for k, v in resp.json()["headers"]}
    assert sent["x-seen-by"] == "hello"
    assert "kong-request-id" in sent  # the bundled ones are still there
    refused = request(gateway.proxy_port, "GET", "/x", headers={"User-Agent": "BadBot/1.0"})
    assert (refused.status, refused.json()) == (403, {"message": "go away"})
    assert refused.header("x-greeting") == "route greeted"  # header_filter runs for exit answers too
