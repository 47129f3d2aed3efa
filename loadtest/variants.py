"""Ringgate variants for bench.py: the same gateway with one feature switched on, measured next to
plain Ringgate in the same rounds so that the feature's cost is a ratio between neighbouring runs.

Each variant changes the generated kong.yml (and maybe the command line), and says what a correct
answer looks like, so the pre-flight check fails loudly when the feature is not really on (a
health-checked upstream that reports HEALTHCHECKS_OFF, a fallback that never served, an open
breaker that still lets requests through to the primary).

    control       plain Ringgate, restarted around its measurement like a variant (the noise floor)
    upstream      the benchmark service behind an upstream entity (one target), no health checks
    health        that upstream with passive and 1 s active health checks (issue #3: cost <= 5%)
    fallback      status-based-fallback on the benchmarked route, success path (issue #4: cost <= 10%)
    breaker-open  the primary answers 503, the breaker (threshold 1) is open: the backup answers all
    access-log    --access-log to a file in the run's temp dir
"""
from __future__ import annotations

import copy
import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gen_config

UPSTREAM_NAME = "origin-pool"
FAILING_SERVICE_NAME = "primary-503"
PLUGIN_NAME = "status-based-fallback"
# Passive thresholds from issue #3; the active checks probe a path the origin answers with 200.
PASSIVE_UNHEALTHY = {"http_failures": 5, "tcp_failures": 5, "timeouts": 5}


@dataclass(frozen=True)
class OriginPorts:
    """The origin nginx's listeners: the main one, an identical backup, and one that answers 503."""

    main: int
    backup: int
    failing: int


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


def get(port: int, path: str, timeout: float = 3.0) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, headers, response.read())
    finally:
        connection.close()


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    summary: str
    # Adds this variant's entities to a copy of the plain benchmark config.
    configure: Callable[[dict[str, Any], OriginPorts, str], None]
    # Extra `ringgate start` arguments, given the variant's own directory.
    cli_args: Callable[[Path], list[str]] = lambda _directory: []
    # Problems with one pre-flight answer (already checked: 200 and the exact body); empty when fine.
    check_answer: Callable[[Answer], list[str]] = lambda _answer: []
    # Problems seen through the Admin API once the gateway serves; empty when fine.
    check_admin: Callable[[int], list[str]] = lambda _admin_port: []
    # The issue's budget: at most this share fewer req/s than plain Ringgate.
    max_cost: float | None = None
    issue: str | None = None
    needs: frozenset[str] = field(default_factory=frozenset)  # extra origin listeners: "backup", "failing"


def _behind_upstream(config: dict[str, Any], ports: OriginPorts, healthchecks: dict[str, Any] | None) -> None:
    """Point the benchmark service at an upstream entity whose only target is the origin."""
    upstream: dict[str, Any] = {"name": UPSTREAM_NAME, "targets": [{"target": f"127.0.0.1:{ports.main}"}]}
    if healthchecks is not None:
        upstream["healthchecks"] = healthchecks
    config["upstreams"] = [upstream]
    service = next(s for s in config["services"] if s["name"] == gen_config.SERVICE_NAME)
    del service["url"]
    service.update({"protocol": "http", "host": UPSTREAM_NAME, "port": 80})


def _configure_upstream(config: dict[str, Any], ports: OriginPorts, _route: str) -> None:
    _behind_upstream(config, ports, None)


def health_checks(http_path: str) -> dict[str, Any]:
    return {
        "active": {
            "type": "http", "http_path": http_path, "timeout": 1,
            "healthy": {"interval": 1, "successes": 2},
            "unhealthy": {"interval": 1, **PASSIVE_UNHEALTHY},
        },
        "passive": {"unhealthy": dict(PASSIVE_UNHEALTHY)},
    }


def _configure_health(config: dict[str, Any], ports: OriginPorts, _route: str) -> None:
    _behind_upstream(config, ports, health_checks("/small"))


def _check_health(admin_port: int) -> list[str]:
    answer = get(admin_port, f"/upstreams/{UPSTREAM_NAME}/health")
    if answer.status != 200:
        return [f"GET /upstreams/{UPSTREAM_NAME}/health answered {answer.status}"]
    states = [target.get("health") for target in json.loads(answer.body).get("data", [])]
    if states != ["HEALTHY"]:
        return [f"the upstream's target health is {states}, expected ['HEALTHY'] (checks on, target up)"]
    return []


def _configure_fallback(config: dict[str, Any], ports: OriginPorts, route: str) -> None:
    config["plugins"] = [{"name": PLUGIN_NAME, "route": route,
                          "config": {"backup_host": "127.0.0.1", "backup_port": ports.backup}}]


def _check_fallback(answer: Answer) -> list[str]:
    if "x-fallback" in answer.headers:
        return [f"the primary should answer (success path), but X-Fallback is {answer.headers['x-fallback']!r}"]
    return []


def _configure_breaker_open(config: dict[str, Any], ports: OriginPorts, route_name: str) -> None:
    """Move the benchmarked route to a service whose every answer is 503; the backup is the origin,
    asked for the same path. The first failure opens the breaker for an hour."""
    for service in config["services"]:
        route = next((r for r in service["routes"] if r["name"] == route_name), None)
        if route is not None:
            service["routes"].remove(route)
            break
    else:
        raise KeyError(f"route {route_name} is not in the benchmark config")
    config["services"].append({"name": FAILING_SERVICE_NAME, "url": f"http://127.0.0.1:{ports.failing}",
                               "routes": [route]})
    config["plugins"] = [{"name": PLUGIN_NAME, "route": route_name, "config": {
        "backup_host": "127.0.0.1", "backup_port": ports.main,
        "circuit_breaker": {"threshold": 1, "timeout": 3600},
    }}]


def _check_breaker_open(answer: Answer) -> list[str]:
    problems = []
    if answer.headers.get("x-fallback") != "backup":
        problems.append(f"X-Fallback is {answer.headers.get('x-fallback')!r}, expected 'backup'")
    # Set only when the primary was asked: its absence shows the open breaker kept the primary out.
    if "x-original-status" in answer.headers:
        problems.append(f"X-Original-Status {answer.headers['x-original-status']} is set: the primary was "
                        "still tried, so the breaker is not open")
    return problems


def access_log_path(directory: Path) -> Path:
    return directory / "access.log"


VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    Variant("control", "ringgate, restarted",
            "plain ringgate unchanged, but started and stopped around its measurement like every variant: "
            "its ratio shows the noise and the cost of a fresh process, the floor for the others",
            lambda _config, _ports, _route: None),
    Variant("upstream", "ringgate + upstream",
            "the benchmark service behind an upstream entity with the origin as its one target, no health checks",
            _configure_upstream),
    Variant("health", "ringgate + health checks",
            "that upstream with passive checks (unhealthy at 5 http failures, 5 tcp failures, 5 timeouts) "
            "and active checks every 1 s (healthy and unhealthy interval 1, GET /small)",
            _configure_health, check_admin=_check_health, max_cost=0.05, issue="#3"),
    Variant("fallback", "ringgate + fallback",
            "status-based-fallback on the benchmarked route with a backup (a second origin port); "
            "the primary answers 200, so the backup is never asked",
            _configure_fallback, check_answer=_check_fallback, max_cost=0.10, issue="#4",
            needs=frozenset({"backup"})),
    Variant("breaker-open", "ringgate, breaker open",
            "the route's service answers 503 to everything; status-based-fallback with circuit_breaker "
            "{threshold: 1, timeout: 3600}: the breaker is open and the backup (the origin) answers every request",
            _configure_breaker_open, check_answer=_check_breaker_open, needs=frozenset({"failing"})),
    Variant("access-log", "ringgate + access log",
            "--access-log to a file in the run's temp dir (one JSON line per request)",
            lambda _config, _ports, _route: None,
            cli_args=lambda directory: ["--access-log", str(access_log_path(directory))]),
)}  # fmt: skip


def variant_config(base: dict[str, Any], variant: Variant, ports: OriginPorts, route_name: str) -> dict[str, Any]:
    config = copy.deepcopy(base)
    variant.configure(config, ports, route_name)
    return config


def parse_variant_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))
