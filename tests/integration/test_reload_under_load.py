"""Twenty config changes under load, by SIGHUP and by the Admin API: no failed request, every worker
on the new config within a second, and invalid reloads refused while the running config stays.

The load hits /live, whose upstream has one target; every change moves that target to the other of
two live origins (and adds or removes a route the load never hits). Keep-alive connections are
pinned to workers (the owner of each is read from /proc), so each answer says which origin that
worker's tables pointed at when it routed the request.
"""
from __future__ import annotations

import http.client
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway
from tests.integration.worker_sockets import owner, pinned_connections, proxy_workers

pytestmark = pytest.mark.integration

CHANGES = 20
REACH_LIMIT = 1.0  # seconds from a change to every worker answering from the new origin
UPSTREAM = "live.upstream"


def declarative(live: OriginServer, change: int) -> dict[str, Any]:
    """The config of change `change`: /live through the upstream to `live`, plus a route nobody calls."""
    return {"_format_version": "3.0",
            "upstreams": [{"name": UPSTREAM, "targets": [{"target": live.address}]}],
            "services": [{"name": "live", "host": UPSTREAM, "routes": [
                {"name": "live", "paths": ["/live"]},
                {"name": f"extra-{change}", "paths": [f"/extra-{change}"]}]}]}


@dataclass(frozen=True, slots=True)
class Answer:
    worker: int | None  # None: a fresh connection, owner not looked up
    sent: float
    received: float
    origin: str


@dataclass
class Load:
    """Client threads against /live: keep-alive connections pinned to workers, and fresh connections."""

    gateway: Gateway
    workers: list[int]
    answers: list[Answer] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, pinned: dict[int, list[http.client.HTTPConnection]], fresh_threads: int) -> None:
        for pid, conns in pinned.items():
            for conn in conns:
                self.threads.append(threading.Thread(target=self._keep_alive, args=(conn, pid), daemon=True))
        for _ in range(fresh_threads):
            self.threads.append(threading.Thread(target=self._fresh, daemon=True))
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    def _record(self, worker: int | None, sent: float, status: int, body: bytes) -> None:
        received = time.monotonic()
        self.statuses[status] += 1
        if status == 200:
            self.answers.append(Answer(worker, sent, received, orjson.loads(body)["server"]))

    def _keep_alive(self, conn: http.client.HTTPConnection, worker: int | None) -> None:
        port = self.gateway.proxy_port
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                response = request(port, "GET", "/live", conn=conn)
            except (OSError, http.client.HTTPException) as exc:  # a failure of the reload
                self.errors.append(f"keep-alive on worker {worker}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.connect()
                assert conn.sock is not None
                worker = owner(conn.sock, port, self.workers)
                continue
            self._record(worker, sent, response.status, response.body)
            if response.header("connection") == "close":  # the server's per-connection request cap
                conn.close()
                conn.connect()
                assert conn.sock is not None
                worker = owner(conn.sock, port, self.workers)
        conn.close()

    def _fresh(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                response = request(self.gateway.proxy_port, "GET", "/live")
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(f"fresh connection: {exc!r}")
                continue
            self._record(None, sent, response.status, response.body)


def _admin(gateway: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    answer = request(gateway.admin_port, method, path, headers=headers,
                     body=orjson.dumps(body) if body is not None else None)
    return answer.status, (answer.json() if answer.body else None)


@dataclass
class Changes:
    """The three ways a change reaches the gateway. Each returns the moment the switch was asked for."""

    gateway: Gateway
    config_file: Path

    def write_file(self, text: str) -> None:
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_file)

    def sighup(self, config: dict[str, Any]) -> float:
        self.write_file(yaml.safe_dump(config))
        asked = time.monotonic()
        assert self.gateway.proc is not None
        self.gateway.proc.send_signal(signal.SIGHUP)
        return asked

    def post_config(self, config: dict[str, Any]) -> float:
        asked = time.monotonic()
        status, body = _admin(self.gateway, "POST", "/config", config)
        assert status == 201, body
        return asked

    def entity_writes(self, change: int, old: OriginServer, new: OriginServer) -> float:
        """Add this change's route, delete the previous one, then move the target in one PATCH."""
        status, body = _admin(self.gateway, "POST", "/services/live/routes",
                              {"name": f"extra-{change}", "paths": [f"/extra-{change}"]})
        assert status == 201, body
        assert _admin(self.gateway, "DELETE", f"/routes/extra-{change - 1}")[0] == 204
        asked = time.monotonic()
        status, body = _admin(self.gateway, "PATCH", f"/upstreams/{UPSTREAM}/targets/{old.address}",
                              {"target": new.address})
        assert status == 200 and body["target"] == new.address, body
        return asked


def reached_every_worker(load: Load, origin: str, asked: float, start: int) -> dict[int, float]:
    """Per worker: seconds from `asked` until it answered a request sent after `asked` from `origin`.
    Waits up to twice the limit, so that a late arrival is measured rather than only refused."""
    arrived: dict[int, float] = {}
    index = start
    while len(arrived) < len(load.workers) and time.monotonic() < asked + 2 * REACH_LIMIT:
        answers = load.answers
        while index < len(answers):
            answer = answers[index]
            index += 1
            if (answer.worker is not None and answer.worker not in arrived and answer.sent >= asked
                    and answer.origin == origin):
                arrived[answer.worker] = answer.received - asked
        time.sleep(0.005)
    return arrived


@dataclass(frozen=True, slots=True)
class Applied:
    change: int
    way: str
    origin: str
    asked: float
    arrived: dict[int, float]  # worker -> delay


def went_back(answers: list[Answer], applied: list[Applied]) -> list[str]:
    """Answers from a stale origin on a worker after that worker had shown the new one (a worker must
    never flip back), within each change's window."""
    problems = []
    for current, following in zip(applied, applied[1:] + [None]):
        end = following.asked if following is not None else float("inf")
        for worker, delay in current.arrived.items():
            switched = current.asked + delay  # the first new answer had arrived by then
            stale = [a for a in answers if a.worker == worker and switched <= a.sent < end
                     and a.origin != current.origin]
            if stale:
                problems.append(f"change {current.change} ({current.way}): worker {worker} answered from "
                                f"{stale[0].origin} {stale[0].sent - switched:.3f}s after switching")
    return problems


@pytest.fixture
def origins() -> Iterator[tuple[OriginServer, OriginServer]]:
    pair = (OriginServer("alpha").start(), OriginServer("beta").start())
    yield pair
    for origin in pair:
        origin.stop()


def test_twenty_changes_under_load_fail_nothing_and_reach_every_worker_within_a_second(
        gateway_factory: Callable[..., Gateway], origins: tuple[OriginServer, OriginServer]) -> None:
    alpha, beta = origins
    gateway = gateway_factory(declarative(alpha, 0), workers=2)
    changes = Changes(gateway, Path(gateway.args[gateway.args.index("-c") + 1]))
    workers = proxy_workers(gateway.worker_pids(), gateway.proxy_port)
    assert len(workers) == 2
    load = Load(gateway, workers)
    load.start(pinned_connections(gateway.proxy_port, workers, per_worker=2, path="/live"), fresh_threads=2)
    applied: list[Applied] = []
    refusals: dict[str, Any] = {}
    try:
        for change in range(1, CHANGES + 1):
            old, new = (alpha, beta) if change % 2 else (beta, alpha)
            start = len(load.answers)
            if change % 2:
                way, asked = "SIGHUP", changes.sighup(declarative(new, change))
            elif change % 4 == 2:
                way, asked = "POST /config", changes.post_config(declarative(new, change))
            else:
                way, asked = "Admin API entities", changes.entity_writes(change, old, new)
            applied.append(Applied(change, way, new.name, asked, reached_every_worker(load, new.name, asked, start)))
            if change == 10:
                refusals["sighup"] = _refused_sighup(gateway, changes)
            elif change == 11:
                refusals["post"] = _refused_post(gateway)
    finally:
        load.finish()

    assert load.errors == []
    assert set(load.statuses) == {200}, load.statuses
    by_worker = Counter(answer.worker for answer in load.answers)
    assert all(by_worker[pid] > 50 for pid in workers) and by_worker[None] > 50, by_worker  # real load everywhere
    late = [(a.change, a.way, a.arrived) for a in applied
            if set(a.arrived) != set(workers) or max(a.arrived.values()) >= REACH_LIMIT]
    assert late == [], f"changes that did not reach every worker within {REACH_LIMIT}s: {late}"
    assert went_back(load.answers, applied) == []
    # Each way of changing counted once per write: 10 SIGHUPs, 5 POST /config, 5 x 3 entity writes.
    status = request(gateway.admin_port, "GET", "/status").json()
    assert status["configuration_generation"] == 10 + 5 + 15
    assert gateway.log().count("reloaded ") == 10
    assert refusals["sighup"] == refusals["post"] == "unchanged"
    assert request(gateway.proxy_port, "GET", f"/extra-{CHANGES}").status == 200
    assert request(gateway.proxy_port, "GET", f"/extra-{CHANGES - 1}").status == 404


def _generation(gateway: Gateway) -> int:
    return request(gateway.admin_port, "GET", "/status").json()["configuration_generation"]


def _refused_sighup(gateway: Gateway, changes: Changes) -> str:
    """A file that does not validate: refused with the entity and field named, nothing changes."""
    before = _generation(gateway)
    changes.write_file('_format_version: "3.0"\nservices:\n- name: broken\n  host: 127.0.0.1\n  port: 99999\n')
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for("reload refused", 5)
    time.sleep(0.25)  # more than two generation polls: a change would have reached the workers
    message = gateway.log()[gateway.log().index("reload refused"):]  # the problems follow, one a line
    assert "the running config stays" in message and "'broken'" in message and "port" in message, message
    return "unchanged" if _generation(gateway) == before else "changed"


def _refused_post(gateway: Gateway) -> str:
    before = _generation(gateway)
    status, body = _admin(gateway, "POST", "/config?flatten_errors=1",
                          {"_format_version": "3.0", "services": [{"name": "broken", "host": "127.0.0.1",
                                                                   "port": 99999}]})
    assert status == 400 and body["code"] == 14, body
    assert body["fields"] == {"services": [{"port": "value should be between 0 and 65535"}]}
    assert body["flattened_errors"][0]["entity_name"] == "broken"
    time.sleep(0.25)
    return "unchanged" if _generation(gateway) == before else "changed"
