"""Hot reload through SIGHUP / `ringgate reload`: new tables within a second, nothing dropped, bad files refused."""
from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import ROOT, Gateway

pytestmark = pytest.mark.integration


def _config(origin: OriginServer, extra_path: str | None = None, retries: int = 5) -> dict[str, Any]:
    routes = [{"name": "steady", "paths": ["/steady"]}]
    if extra_path:
        routes.append({"name": "extra", "paths": [extra_path]})
    return {"_format_version": "3.0",
            "services": [{"name": "s", "url": f"http://{origin.address}", "retries": retries, "routes": routes}]}


def _write(gateway: Gateway, config: dict[str, Any] | str) -> None:
    path = Path(gateway.args[gateway.args.index("-c") + 1])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    tmp.replace(path)


def _wait_everywhere(port: int, path: str, status: int, since: float, timeout: float = 3.0) -> float:
    """Seconds from `since` until 20 requests in a row, each on a fresh connection (so on any worker),
    answer `status`."""
    streak = 0
    while time.monotonic() - since < timeout:
        streak = streak + 1 if request(port, "GET", path).status == status else 0
        if streak == 20:
            return time.monotonic() - since
    raise AssertionError(f"{path} did not answer {status} everywhere")


def test_sighup_and_reload_command_apply_a_new_config(gateway_factory: Callable[..., Gateway],
                                                      origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("r")
    gateway = gateway_factory(_config(origin, "/old"), workers=2)
    assert request(gateway.proxy_port, "GET", "/old").status == 200
    hash_before = request(gateway.admin_port, "GET", "/status").json()["configuration_hash"]
    _write(gateway, _config(origin, "/new"))
    assert gateway.proc is not None
    sent = time.monotonic()
    gateway.proc.send_signal(signal.SIGHUP)
    assert _wait_everywhere(gateway.proxy_port, "/new", 200, sent) < 1.0
    # Fresh connections may all land on one worker, so check every worker by its own word, then
    # the answers once a second has passed since the signal.
    while gateway.log().count("config generation 1 in service") < 2 and time.monotonic() - sent < 1.0:
        time.sleep(0.01)
    assert gateway.log().count("config generation 1 in service") == 2, gateway.log()
    time.sleep(max(0.0, sent + 1.0 - time.monotonic()))
    assert all(request(gateway.proxy_port, "GET", "/new").status == 200 for _ in range(10))
    assert all(request(gateway.proxy_port, "GET", "/old").status == 404 for _ in range(10))
    status = request(gateway.admin_port, "GET", "/status").json()
    assert status["configuration_hash"] != hash_before and status["configuration_generation"] == 1
    _write(gateway, _config(origin, "/newer"))
    done = subprocess.run([sys.executable, "-m", "ringgate", "reload", "--prefix", str(gateway.prefix)],
                          cwd=ROOT, capture_output=True, text=True)
    sent = time.monotonic()  # the CLI has sent its signal when it returns
    assert done.returncode == 0, done.stderr
    assert _wait_everywhere(gateway.proxy_port, "/newer", 200, sent) < 1.0
    assert (gateway.prefix / "config.json").exists()


def test_invalid_reload_is_refused_and_the_running_config_stays(
        gateway_factory: Callable[..., Gateway], origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("bad")
    gateway = gateway_factory(_config(origin, "/kept"), workers=1)
    _write(gateway, '_format_version: "3.0"\nservices:\n- name: s\n  host: 127.0.0.1\n  port: 99999\n')
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for("reload refused", 5)
    assert "port" in gateway.log()
    time.sleep(0.3)
    assert request(gateway.proxy_port, "GET", "/kept").status == 200
    assert request(gateway.admin_port, "GET", "/status").json()["configuration_generation"] == 0


def test_twenty_reloads_under_load_drop_nothing(gateway_factory: Callable[..., Gateway],
                                                origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("load")
    gateway = gateway_factory(_config(origin, "/a"), workers=2)
    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []

    def client(keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.proxy_port, timeout=10) if keep_alive else None
        while not stop.is_set():
            try:
                results.append(request(gateway.proxy_port, "GET", "/steady/x", conn=conn).status)
            except Exception as exc:  # any connection error is a failure of the reload
                errors.append(repr(exc))
                if conn is not None:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", gateway.proxy_port, timeout=10)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    assert gateway.proc is not None
    try:
        for i in range(20):
            _write(gateway, _config(origin, f"/extra-{i}"))
            gateway.proc.send_signal(signal.SIGHUP)
            # One reload at a time: signals sent while the master is busy would merge into one.
            deadline = time.monotonic() + 10
            while gateway.log().count("reloaded ") < i + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert errors == []
    assert len(results) > 200
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}
    assert gateway.log().count("reloaded ") == 20
    assert request(gateway.proxy_port, "GET", "/extra-19").status == 200
