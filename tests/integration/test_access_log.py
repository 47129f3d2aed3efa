"""The optional JSON access log: one line per request from every worker, the fields operators expect."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import orjson
import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

FIELDS = {"time", "client", "method", "path", "status", "route", "service", "target", "upstream_latency_ms",
          "latency_ms", "bytes_in", "bytes_out", "request_id", "fallback"}


def test_access_log_lines(origin_factory: Callable[[str], OriginServer], gateway_factory: Callable[..., Gateway],
                          tmp_path: Path) -> None:
    primary, backup = origin_factory("primary"), origin_factory("backup")
    config = {
        "_format_version": "3.0",
        "services": [
            {"name": "main", "url": f"http://{primary.address}", "routes": [{"name": "plain", "paths": ["/plain"]}]},
            {"name": "failing", "url": f"http://{primary.address}/status/503",
             "routes": [{"name": "guarded", "paths": ["/guarded"]}]},
        ],
        "plugins": [{"name": "status-based-fallback", "route": "guarded",
                     "config": {"backup_host": "127.0.0.1", "backup_port": backup.port, "backup_path": "/ok"}}],
    }
    log_path = tmp_path / "access.log"
    gateway = gateway_factory(config, workers=2, extra_args=["--access-log", str(log_path)])
    sent = 0
    for i in range(10):  # fresh connections: both workers write
        assert request(gateway.proxy_port, "POST", f"/plain/x?i={i}", body=b"abc").status == 200
        sent += 1
    assert request(gateway.proxy_port, "GET", "/nowhere").status == 404
    assert request(gateway.proxy_port, "GET", "/guarded").status == 200
    sent += 2
    assert gateway.stop() == 0  # a graceful stop flushes the buffers
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert len(lines) == sent
    assert all(set(line) == FIELDS for line in lines)
    plain = [line for line in lines if line["route"] == "plain"]
    assert len(plain) == 10
    first = plain[0]
    assert first["method"] == "POST" and first["path"].startswith("/plain/x?i=") and first["status"] == 200
    assert first["service"] == "main" and first["target"] == primary.address and first["client"] == "127.0.0.1"
    assert first["bytes_in"] == 3 and first["bytes_out"] > 0 and first["fallback"] is None
    assert first["latency_ms"] >= first["upstream_latency_ms"] >= 0
    assert first["time"].endswith("Z") and len(first["request_id"]) == 32
    missing = next(line for line in lines if line["status"] == 404)
    assert missing["route"] is None and missing["target"] is None
    guarded = next(line for line in lines if line["route"] == "guarded")
    assert guarded["status"] == 200 and guarded["fallback"] == "backup"
    assert guarded["target"] == backup.address and guarded["service"] == "failing"
    assert len({line["request_id"] for line in lines}) == sent


def test_access_log_is_off_by_default(origin_factory: Callable[[str], OriginServer],
                                      gateway_factory: Callable[..., Gateway]) -> None:
    origin = origin_factory("o")
    config = {"_format_version": "3.0",
              "services": [{"name": "s", "url": f"http://{origin.address}", "routes": [{"paths": ["/"]}]}]}
    gateway = gateway_factory(config, workers=1)
    assert request(gateway.proxy_port, "GET", "/").status == 200
    time.sleep(0.2)
    assert not any('"request_id"' in line for line in gateway.output)
    assert not list(gateway.prefix.glob("*.log"))
