"""Routing, fallback and Admin API changes together, against `ringgate demo` or any running gateway.

    python -m ringgate demo --proxy-listen 127.0.0.1:18000 --admin-listen 127.0.0.1:18001
    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s \\
        --host http://127.0.0.1:18000 --admin-url http://127.0.0.1:18001

At the start the scenario adds its own entities through the Admin API (all tagged `locust`, removed
again at the end), next to whatever the gateway already serves:

* service `locust-live` -> the live origin (`--live-target`, by default the first target of the
  gateway's first upstream: one of the demo's origins), with a prefix route, a regex route with a
  capture and a host route;
* service `locust-flaky` -> upstream `locust-flaky.upstream`, whose primary target (weight 100) is a
  port nothing listens on and whose other target (weight 1) is the live origin. Passive health
  ejects the dead target after one connection failure and lets it try again after 2 s, so it keeps
  failing now and then; every request must still succeed, retried on the live target;
* one `AdminOperator` adds a route, waits for the proxy to answer on it, deletes it, waits for the
  404, and moves the flaky upstream's weights, over and over: config changes under the load.

Every answer is checked, not only counted. A failure makes locust exit with status 1.
"""
from __future__ import annotations

import itertools
import socket
import time
import uuid
from typing import Any

import requests
from locust import HttpUser, between, events, task
from locust.env import Environment

NO_ROUTE_MESSAGE = "no Route matched with those values"
TAG = "locust"
FLAKY_UPSTREAM = "locust-flaky.upstream"
VISIBLE_WITHIN = 1.0  # seconds: an Admin API change must reach the proxy within this
STREAK = 5  # answers in a row on fresh connections that show a change arrived


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--admin-url", default="http://127.0.0.1:8001", help="the gateway's Admin API")
    parser.add_argument("--live-target", default="", help="host:port of an origin that answers every path "
                        "(default: the first target of the gateway's first upstream)")


class Scenario:
    """The entities the run adds, created at the start and removed at the end."""

    admin_url = ""
    live_target = ""
    dead_target = ""

    @classmethod
    def admin(cls, method: str, path: str, **json: Any) -> requests.Response:
        response = requests.request(method, cls.admin_url + path, json=json or None, timeout=10)
        if response.status_code >= 400 and not (method == "DELETE" and response.status_code == 404):
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response

    @classmethod
    def create(cls, admin_url: str, live_target: str) -> None:
        cls.admin_url = admin_url.rstrip("/")
        cls.live_target = live_target or cls._first_target()
        cls.dead_target = f"127.0.0.1:{_unused_port()}"
        cls.remove()  # what an interrupted run may have left
        cls.admin("PUT", "/services/locust-live", url=f"http://{cls.live_target}", tags=[TAG])
        cls.admin("PUT", "/routes/locust-prefix", service={"name": "locust-live"}, paths=["/locust/prefix"],
                  tags=[TAG])
        cls.admin("PUT", "/routes/locust-regex", service={"name": "locust-live"}, tags=[TAG],
                  paths=[r"~/locust/v(?<version>\d+)/items$"], strip_path=False)
        cls.admin("PUT", "/routes/locust-host", service={"name": "locust-live"}, hosts=["locust.example"],
                  tags=[TAG])
        cls.admin("PUT", f"/upstreams/{FLAKY_UPSTREAM}", tags=[TAG], healthchecks={
            "passive": {"unhealthy": {"tcp_failures": 1}},
            "outlier": {"base_ejection_time": 2, "max_ejection_time": 2}})
        cls.admin("POST", f"/upstreams/{FLAKY_UPSTREAM}/targets", target=cls.dead_target, weight=100, tags=[TAG])
        cls.admin("POST", f"/upstreams/{FLAKY_UPSTREAM}/targets", target=cls.live_target, weight=1, tags=[TAG])
        cls.admin("PUT", "/services/locust-flaky", host=FLAKY_UPSTREAM, retries=3, connect_timeout=1000,
                  tags=[TAG])
        cls.admin("PUT", "/routes/locust-flaky", service={"name": "locust-flaky"}, paths=["/locust/flaky"],
                  tags=[TAG])

    @classmethod
    def remove(cls) -> None:
        for collection in ("routes", "services", "upstreams"):  # routes first: a service with routes stays
            listed = cls.admin("GET", f"/{collection}?tags={TAG}&size=1000").json()["data"]
            for entity in listed:
                cls.admin("DELETE", f"/{collection}/{entity['id']}")

    @classmethod
    def _first_target(cls) -> str:
        upstreams = cls.admin("GET", "/upstreams").json()["data"]
        for upstream in upstreams:
            targets = cls.admin("GET", f"/upstreams/{upstream['id']}/targets").json()["data"]
            if targets:
                return str(targets[0]["target"])
        raise RuntimeError("no upstream target to use as the live origin: pass --live-target host:port")


def _unused_port() -> int:
    """A loopback port that refuses connections (bound once to pick it, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@events.test_start.add_listener
def _create(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    assert options is not None, "run through the locust command line (it defines --admin-url)"
    Scenario.create(options.admin_url, options.live_target)
    time.sleep(VISIBLE_WITHIN)  # every worker has the scenario's routes before the first request


@events.test_stop.add_listener
def _remove(environment: Environment, **_: Any) -> None:
    Scenario.remove()


class Visitor(HttpUser):
    """Proxied traffic: prefix, regex and host routes, the flaky upstream, and a path nothing matches."""

    wait_time = between(0.01, 0.1)

    def _expect(self, path: str, upstream_path: str | None, name: str, **kwargs: Any) -> None:
        with self.client.get(path, name=name, catch_response=True, **kwargs) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif upstream_path is not None and _echoed_path(response) not in (None, upstream_path):
                response.failure(f"reached the origin as {_echoed_path(response)}, expected {upstream_path}")

    @task(4)
    def prefix_route(self) -> None:
        self._expect("/locust/prefix/a?x=1", "/a", "prefix route (strip_path)")

    @task(2)
    def regex_route(self) -> None:
        version = int(time.monotonic() * 1000) % 10
        self._expect(f"/locust/v{version}/items", f"/locust/v{version}/items", "regex route")

    @task(2)
    def host_route(self) -> None:
        self._expect("/by-host", "/by-host", "host route", headers={"Host": "locust.example"})

    @task(4)
    def flaky_upstream(self) -> None:
        self._expect("/locust/flaky/x", "/x", "dead primary, retried on the live target")

    @task(1)
    def no_route(self) -> None:
        with self.client.get("/locust/nowhere", name="no route (404)", catch_response=True) as response:
            if response.status_code == 404 and NO_ROUTE_MESSAGE in response.text:
                response.success()  # locust would count any 404 as a failure otherwise
            else:
                response.failure(f"expected Kong's 404 '{NO_ROUTE_MESSAGE}', got {response.status_code}")


def _echoed_path(response: Any) -> str | None:
    """The path the origin saw, when the origin is Ringgate's echo origin (the demo's)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("path") if isinstance(body, dict) else None


class AdminOperator(HttpUser):
    """One operator changing the config while the visitors run: every change must reach the proxy."""

    fixed_count = 1
    wait_time = between(0.2, 0.5)
    _numbers = itertools.count(1)

    @task
    def route_appears_and_disappears(self) -> None:
        name = f"locust-admin-{next(self._numbers)}-{uuid.uuid4().hex[:6]}"
        path = f"/locust/{name}"
        self._admin_call("POST", "/services/locust-live/routes", "add a route", name=name, paths=[path],
                         tags=[TAG])
        self._visible(path, 200, "route added: proxied within 1 s")
        self._admin_call("DELETE", f"/routes/{name}", "delete the route")
        self._visible(path, 404, "route deleted: 404 within 1 s")

    @task
    def move_the_weights(self) -> None:
        weight = 1 + next(self._numbers) % 5
        self._admin_call("PATCH", f"/upstreams/{FLAKY_UPSTREAM}/targets/{Scenario.live_target}",
                         "set a target's weight", weight=weight)

    def _admin_call(self, method: str, path: str, label: str, **json: Any) -> None:
        with self.client.request(method, Scenario.admin_url + path, json=json or None, name=f"admin: {label}",
                                 catch_response=True) as response:
            if response.status_code not in (200, 201, 204):
                response.failure(f"status {response.status_code}: {response.text[:200]}")

    def _visible(self, path: str, status: int, name: str) -> None:
        """Until `STREAK` answers in a row, each on a fresh connection (so from any worker), are `status`;
        reported as one event whose time is the wait."""
        started = time.perf_counter()
        assert self.host is not None, "give the proxy with --host"
        url = self.host.rstrip("/") + path
        seen, streak = None, 0
        while streak < STREAK and time.perf_counter() - started < VISIBLE_WITHIN:
            seen = requests.get(url, headers={"Connection": "close"}, timeout=5).status_code
            streak = streak + 1 if seen == status else 0
        elapsed = time.perf_counter() - started
        failure = None if streak == STREAK else AssertionError(f"{path}: {seen}, not {status}, after "
                                                               f"{VISIBLE_WITHIN}s")
        events.request.fire(request_type="CHANGE", name=name, response_time=elapsed * 1000, response_length=0,
                            exception=failure, context={})
