"""Process lifecycle through the CLI: readiness, bad config, port in use, env mirror, drain, respawn, demo."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import ROOT, Gateway, free_port

pytestmark = pytest.mark.integration


def _simple(origin: OriginServer, **service: Any) -> dict[str, Any]:
    return {"_format_version": "3.0", "services": [
        {"name": "s", "url": f"http://{origin.address}", **service, "routes": [{"name": "r", "paths": ["/"]}]}]}


def test_bad_config_names_file_entity_and_field(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    config = {"_format_version": "3.0", "services": [
        {"name": "billing", "url": "http://127.0.0.1:9", "routes": [{"name": "r", "paths": ["/x"]}]},
        {"name": "broken", "host": "127.0.0.1", "port": 70000},
    ]}
    gateway = gateway_factory(config, start=False)
    gateway.start(expect_ready=False)
    assert gateway.proc is not None
    assert gateway.proc.wait(20) != 0
    time.sleep(0.2)
    text = gateway.log()
    assert "kong.yml" in text and "broken" in text and "port" in text
    assert "ready" not in text
    with socket.socket() as s:  # nothing was left listening
        assert s.connect_ex(("127.0.0.1", gateway.proxy_port)) != 0


def test_port_in_use_fails_before_listening(gateway_factory: Callable[..., Gateway],
                                            origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("o")
    gateway = gateway_factory(_simple(origin), start=False)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", gateway.admin_port))
    blocker.listen(1)
    try:
        gateway.start(expect_ready=False)
        assert gateway.proc is not None and gateway.proc.wait(20) != 0
        time.sleep(0.2)
        assert "address already in use" in gateway.log() and "admin_listen" in gateway.log()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", gateway.proxy_port)) != 0
    finally:
        blocker.close()


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text('_format_version: "3.0"\nservices:\n- name: a\n  url: http://127.0.0.1:9\n'
                    '  routes:\n  - name: r\n    paths: ["/"]\n')
    bad = tmp_path / "bad.yml"
    bad.write_text('_format_version: "3.0"\nroutes:\n- name: r\n  paths: ["/"]\n  service: nope\n')
    ok = subprocess.run([sys.executable, "-m", "ringgate", "check", str(good)], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    ko = subprocess.run([sys.executable, "-m", "ringgate", "check", str(bad)], cwd=ROOT, capture_output=True,
                        text=True)
    assert ko.returncode == 1
    assert "invalid reference 'service: nope' (no such entry in 'services')" in ko.stderr
    assert "bad.yml" in ko.stderr


def test_environment_mirrors_flags(tmp_path: Path, origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("env")
    port = free_port()
    gateway = Gateway(_simple(origin), tmp_path, workers=1)
    gateway.args = [a for a in gateway.args]
    i = gateway.args.index("--proxy-listen")
    del gateway.args[i:i + 2]
    gateway.env["RINGGATE_PROXY_LISTEN"] = f"127.0.0.1:{port}"
    gateway.proxy_port = port
    gateway.start()
    try:
        assert request(port, "GET", "/").status == 200
    finally:
        gateway.stop()


def test_graceful_stop_finishes_in_flight_requests(gateway_factory: Callable[..., Gateway],
                                                   origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("slow")
    gateway = gateway_factory(_simple(origin), workers=1)
    results: list[int] = []

    def slow_call() -> None:
        results.append(request(gateway.proxy_port, "GET", "/delay/1.5", timeout=10).status)

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.4)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    thread.join(10)
    assert results == [200]
    assert gateway.proc.wait(10) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gateway.proxy_port)) != 0


def test_killed_worker_is_replaced(gateway_factory: Callable[..., Gateway],
                                   origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("k")
    gateway = gateway_factory(_simple(origin), workers=2)
    pids = gateway.worker_pids()
    assert len(pids) == 3  # 2 workers + control
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = gateway.worker_pids()
        if victim not in now and len(now) == 3:
            break
        time.sleep(0.05)
    now = gateway.worker_pids()
    assert victim not in now and len(now) == 3, gateway.log()
    for _ in range(20):
        assert request(gateway.proxy_port, "GET", "/").status == 200


def test_admin_status_counts_requests(gateway_factory: Callable[..., Gateway],
                                      origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("st")
    gateway = gateway_factory(_simple(origin), workers=2)
    for _ in range(25):
        request(gateway.proxy_port, "GET", "/")
    status = request(gateway.admin_port, "GET", "/status").json()
    assert status["server"]["total_requests"] == 25
    assert len(status["configuration_hash"]) == 32
    assert request(gateway.admin_port, "GET", "/").json()["version"] == "0.1.0"


def test_demo_command_serves(tmp_path: Path) -> None:
    proxy, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringgate", "demo", "--proxy-listen", f"127.0.0.1:{proxy}",
         "--admin-listen", f"127.0.0.1:{admin}", "--workers", "1", "--prefix", str(tmp_path / "p")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        reader = threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30  # bounded: a demo that never gets ready fails, it does not hang
        while not any("ringgate: ready" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            time.sleep(0.05)
        assert any(f"curl -i http://127.0.0.1:{proxy}/demo" in line for line in lines), lines
        servers = {request(proxy, "GET", "/demo").json()["server"] for _ in range(4)}
        assert servers == {"origin-1", "origin-2"}
        assert request(proxy, "GET", "/v2/items").status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
