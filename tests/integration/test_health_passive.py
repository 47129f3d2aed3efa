"""Passive health end to end: real origins that fail, refuse, hang and come back; several workers
sharing one node-wide health table."""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway, free_port

pytestmark = pytest.mark.integration


def _config(targets: list[str], unhealthy: dict[str, Any], outlier: dict[str, Any] | None = None,
            service: dict[str, Any] | None = None) -> dict[str, Any]:
    checks: dict[str, Any] = {"passive": {"unhealthy": unhealthy}}
    if outlier is not None:
        checks["outlier"] = outlier
    return {
        "_format_version": "3.0",
        "upstreams": [{"name": "pool", "healthchecks": checks,
                       "targets": [{"target": t} for t in targets]}],
        "services": [{"name": "svc", "host": "pool", "port": 80, **(service or {}),
                      "routes": [{"name": "r", "paths": ["/"]}]}],
    }


def _fresh_get(gateway: Gateway, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    # A new connection per request, so the kernel spreads them over every worker.
    response = request(gateway.proxy_port, "GET", path, timeout=timeout)
    return response.status, response.body


def test_failing_target_is_ejected_node_wide_after_exactly_the_threshold_then_recovers(
        origin_factory: Callable[[str], OriginServer], gateway_factory: Callable[..., Gateway]) -> None:
    good, sick = origin_factory("good"), origin_factory("sick")
    sick.force_status = 500
    gateway = gateway_factory(_config([good.address, sick.address], {"http_failures": 3},
                                      {"base_ejection_time": 2.0}), workers=2)
    statuses = [_fresh_get(gateway)[0] for _ in range(30)]
    # The counter is shared by both workers: the 3rd failure anywhere ejects the target.
    assert statuses.count(500) == 3, statuses
    gateway.wait_for(f"target {sick.address} ejected for 2.0s after a passive http failure")
    sick_hits = sick.requests
    assert all(_fresh_get(gateway)[0] == 200 for _ in range(20))
    assert sick.requests == sick_hits, "a worker kept sending to an ejected target"

    sick.force_status = None  # it recovers; after the ejection time one trial request brings it back
    deadline = time.monotonic() + 10
    while sick.requests == sick_hits and time.monotonic() < deadline:
        assert _fresh_get(gateway)[0] == 200
        time.sleep(0.05)
    assert sick.requests > sick_hits, "the recovered target never got its trial"
    gateway.wait_for(f"target {sick.address}: ejection over, sending one trial request")
    before = sick.requests
    for _ in range(20):
        assert _fresh_get(gateway)[0] == 200
    assert sick.requests >= before + 5  # back in the rotation for every worker


def test_refused_connections_are_retried_elsewhere_and_eject(
        origin_factory: Callable[[str], OriginServer], gateway_factory: Callable[..., Gateway]) -> None:
    good = origin_factory("good")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    gateway = gateway_factory(_config([good.address, dead], {"tcp_failures": 2}), workers=2)
    for _ in range(20):
        assert _fresh_get(gateway)[0] == 200  # the retry lands on the other target
    gateway.wait_for(f"target {dead} ejected for 30.0s after a passive tcp failure")
    assert gateway.log().count("ejected for") == 1  # exactly one process won the transition and logged it


def test_hanging_target_times_out_and_is_ejected(gateway_factory: Callable[..., Gateway],
                                                 origin_factory: Callable[[str], OriginServer]) -> None:
    good = origin_factory("good")
    import socket
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)  # accepts (the kernel does), never answers
    try:
        address = f"127.0.0.1:{hang.getsockname()[1]}"
        gateway = gateway_factory(_config([good.address, address], {"timeouts": 2},
                                          service={"read_timeout": 300}), workers=1)
        for _ in range(8):
            assert _fresh_get(gateway)[0] == 200  # GET is idempotent: retried on the good target
        gateway.wait_for(f"target {address} ejected for 30.0s after a passive timeout")
        started = time.monotonic()
        for _ in range(10):
            assert _fresh_get(gateway)[0] == 200
        assert time.monotonic() - started < 2.5  # no request waits for the hanging target any more
    finally:
        hang.close()


def test_all_targets_down_answers_kongs_503(origin_factory: Callable[[str], OriginServer],
                                           gateway_factory: Callable[..., Gateway]) -> None:
    a, b = origin_factory("a"), origin_factory("b")
    a.force_status = b.force_status = 503
    gateway = gateway_factory(_config([a.address, b.address], {"http_failures": 1}), workers=1)
    seen = [_fresh_get(gateway) for _ in range(4)]
    assert [s for s, _ in seen[:2]] == [503, 503]  # the upstream's own answers
    status, body = seen[-1]
    assert status == 503 and b"failure to get a peer from the ring-balancer" in body
    hits = a.requests + b.requests
    assert _fresh_get(gateway)[0] == 503 and a.requests + b.requests == hits


def test_panic_mode_spreads_over_every_target(origin_factory: Callable[[str], OriginServer],
                                              gateway_factory: Callable[..., Gateway]) -> None:
    origins = [origin_factory(f"o{i}") for i in range(3)]
    origins[1].force_status = origins[2].force_status = 500
    gateway = gateway_factory(_config([o.address for o in origins], {"http_failures": 1},
                                      {"panic_threshold": 50}), workers=1)
    for _ in range(6):
        _fresh_get(gateway)
    gateway.wait_for("panic mode: too few healthy targets")
    for origin in origins:
        origin.reset_counts()
    for _ in range(12):
        _fresh_get(gateway)
    assert all(o.requests > 0 for o in origins), [o.requests for o in origins]


def test_ejection_cap_keeps_a_share_of_targets_in_service(origin_factory: Callable[[str], OriginServer],
                                                          gateway_factory: Callable[..., Gateway]) -> None:
    origins = [origin_factory(f"o{i}") for i in range(4)]
    for origin in origins[1:]:
        origin.force_status = 500
    gateway = gateway_factory(_config([o.address for o in origins], {"http_failures": 1},
                                      {"max_ejection_percent": 50}), workers=1)
    for _ in range(16):
        _fresh_get(gateway)
    for origin in origins:
        origin.reset_counts()
    for _ in range(16):
        _fresh_get(gateway)
    # 3 failing targets were ejected as they failed, but only 2 of 4 may be out at once.
    serving = [o for o in origins if o.requests > 0]
    assert len(serving) == 2 and origins[0] in serving, [o.requests for o in origins]


def test_health_survives_a_reload(origin_factory: Callable[[str], OriginServer], tmp_path: Path,
                                  gateway_factory: Callable[..., Gateway]) -> None:
    good, sick = origin_factory("good"), origin_factory("sick")
    sick.force_status = 500
    config = _config([good.address, sick.address], {"http_failures": 2})
    gateway = gateway_factory(config, workers=2)
    for _ in range(10):
        _fresh_get(gateway)
    gateway.wait_for(f"target {sick.address} ejected")
    # A new generation with another route: the target keeps its identity, so it stays ejected.
    config["services"][0]["routes"].append({"name": "extra", "paths": ["/extra"]})
    config_path = Path(gateway.args[gateway.args.index("-c") + 1])
    config_path.write_text(yaml.safe_dump(config))
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for("config generation 1 in service")
    hits = sick.requests
    for _ in range(10):
        assert _fresh_get(gateway, "/extra")[0] == 200
    assert sick.requests == hits
