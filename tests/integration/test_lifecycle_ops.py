"""Operations on a running gateway: a worker killed under load is replaced while the other worker's
connections go on untouched, and `ringgate stop` finds the master by its pid file (`ringgate reload`
through the pid file is in test_reload.py).
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import ROOT, Gateway
from tests.integration.worker_sockets import accepting, owner, pinned_connections, proxy_workers

pytestmark = pytest.mark.integration

REPLACE_LIMIT = 1.0  # seconds from SIGKILL until a new worker accepts connections


def _simple(origin: OriginServer) -> dict[str, Any]:
    return {"_format_version": "3.0", "services": [
        {"name": "s", "url": f"http://{origin.address}", "routes": [{"name": "r", "paths": ["/"]}]}]}


@dataclass
class PinnedLoad:
    """One thread per keep-alive connection; a connection that fails is not reopened (it belonged to a worker)."""

    proxy_port: int
    done: dict[int, list[float]] = field(default_factory=dict)  # worker -> completion times
    failed: dict[int, list[tuple[float, str]]] = field(default_factory=dict)  # worker -> (time, error)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, pinned: dict[int, list[http.client.HTTPConnection]]) -> None:
        for worker, conns in pinned.items():
            self.done[worker], self.failed[worker] = [], []
            for conn in conns:
                self.threads.append(threading.Thread(target=self._run, args=(worker, conn), daemon=True))
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    def _run(self, worker: int, conn: http.client.HTTPConnection) -> None:
        try:
            while not self.stop.is_set():
                try:
                    status = request(self.proxy_port, "GET", "/", conn=conn).status
                except (OSError, http.client.HTTPException) as exc:
                    self.failed[worker].append((time.monotonic(), repr(exc)))
                    return
                if status != 200:
                    self.failed[worker].append((time.monotonic(), f"status {status}"))
                self.done[worker].append(time.monotonic())
        finally:
            conn.close()


def _answer_from(gateway: Gateway, worker: int, deadline: float) -> bool:
    """Open fresh connections until one is accepted by `worker` and answered 200 (False at `deadline`)."""
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.proxy_port, timeout=2)
        try:
            conn.connect()
            assert conn.sock is not None
            served_by = owner(conn.sock, gateway.proxy_port, [worker], timeout=0.05)
            if served_by == worker and request(gateway.proxy_port, "GET", "/", conn=conn).status == 200:
                return True
        except OSError:
            pass
        finally:
            conn.close()
    return False


def test_killed_worker_is_replaced_within_a_second_and_the_other_worker_is_untouched(
        gateway_factory: Callable[..., Gateway], origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("lifecycle")
    gateway = gateway_factory(_simple(origin), workers=2)
    victim, survivor = workers = proxy_workers(gateway.worker_pids(), gateway.proxy_port)
    load = PinnedLoad(gateway.proxy_port)
    load.start(pinned_connections(gateway.proxy_port, workers, per_worker=2))
    try:
        time.sleep(0.3)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = None
        while time.monotonic() < killed + REPLACE_LIMIT:
            current = proxy_workers(gateway.worker_pids(), gateway.proxy_port)
            replacement = next((pid for pid in current if pid not in workers), None)
            if replacement is not None and accepting(replacement, gateway.proxy_port):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"no new worker accepting within {REPLACE_LIMIT}s (pid {replacement}):\n"
                                 + gateway.log())
        # Which worker accepts a fresh connection is the kernel's choice: try until the new one does.
        assert _answer_from(gateway, replacement, time.monotonic() + 5), gateway.log()
        time.sleep(0.3)
    finally:
        load.finish()

    assert load.failed[survivor] == []
    assert sum(t > killed for t in load.done[survivor]) > 20  # it kept serving through the kill
    # The victim's connections died with it, and only then: they really were the victim's.
    assert len(load.failed[victim]) == 2 and all(t > killed for t, _ in load.failed[victim])
    # Killed seconds after the start, it counts as a crash: the restart waits 0.2 s, still inside the limit.
    assert f"(pid {victim}) exited with signal SIGKILL" in gateway.log()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringgate", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=20)


def test_stop_command_drains_through_the_pid_file(gateway_factory: Callable[..., Gateway],
                                                  origin_factory: Callable[[str], OriginServer]) -> None:
    origin = origin_factory("stop")
    gateway = gateway_factory(_simple(origin), workers=2)
    assert gateway.proc is not None
    pid_file = gateway.prefix / "ringgate.pid"
    assert pid_file.read_text().strip() == str(gateway.proc.pid)
    results: list[int] = []
    in_flight = threading.Thread(target=lambda: results.append(
        request(gateway.proxy_port, "GET", "/delay/1", timeout=10).status))
    in_flight.start()
    time.sleep(0.3)
    stopped = _cli("stop", "--prefix", str(gateway.prefix))
    assert stopped.returncode == 0 and f"sent SIGTERM to {gateway.proc.pid}" in stopped.stdout, stopped
    in_flight.join(10)
    assert results == [200]  # drained, not cut
    assert gateway.proc.wait(10) == 0
    assert not pid_file.exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gateway.proxy_port)) != 0
    again = _cli("stop", "--prefix", str(gateway.prefix))  # nothing runs under that prefix any more
    assert again.returncode == 1 and f"cannot stop the gateway under {gateway.prefix}" in again.stderr
