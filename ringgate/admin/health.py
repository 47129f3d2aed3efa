"""Kong's health endpoints of the Admin API, over the node-wide health table.

GET /upstreams/{u}/health[?balancer_health=1]  every target with HEALTHY / UNHEALTHY /
    HEALTHCHECKS_OFF, its addresses and weights (Kong's shape);
PUT /upstreams/{u}/targets/{t}[/{address}]/healthy|unhealthy  set a target by hand -> 204,
    404 for an unknown upstream or target. The change is a transition in shared memory, so
    every worker follows it at its next request.
The decisions are pure functions of (config, table) returning (status, body); the handlers
below adapt them to the Admin API's contract.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ringgate.admin.api import AdminContext, Request, Response
from shared_state import health_rules
from shared_state.health import HealthPolicy, HealthTable
from shared_state.health import policy_for as health_policy

if TYPE_CHECKING:
    from ringgate.config import Config

log = logging.getLogger("ringgate.health")

NOT_FOUND: tuple[int, Any] = (404, {"message": "Not found"})


def find_upstream(config: "Config", key: str) -> Any | None:
    for upstream in config.upstreams:
        if key in (upstream.id, upstream.name):
            return upstream
    return None


def find_target(upstream: Any, key: str) -> Any | None:
    for target in upstream.targets:
        if key in (target.id, target.target) or key == f"{target.host}:{target.port}":
            return target
    return None


def _target_health(table: HealthTable, upstream: Any, target: Any, checker: bool) -> str:
    slot = table.slot_for(upstream.name, target.host, target.port)
    state = table.state(slot) if slot >= 0 else health_rules.State.HEALTHY
    if not checker and state == health_rules.State.HEALTHY:
        return "HEALTHCHECKS_OFF"
    return health_rules.KONG_NAMES[health_rules.State(state)]


def upstream_health(config: "Config", table: HealthTable, key: str, node_id: str,
                    balancer_health: bool = False) -> tuple[int, Any]:
    upstream = find_upstream(config, key)
    if upstream is None:
        return NOT_FOUND
    checker = health_policy(upstream.healthchecks) is not None
    rows: list[dict[str, Any]] = []
    total = available = 0
    for target in upstream.targets:
        health = _target_health(table, upstream, target, checker)
        up = health != "UNHEALTHY" and target.weight > 0
        total += target.weight
        available += target.weight if up else 0
        row = target.model_dump(mode="json")
        row["upstream"] = {"id": upstream.id}
        row["health"] = health
        row["data"] = {
            "addresses": [{"ip": target.host, "port": target.port, "weight": target.weight, "health": health}],
            "weight": {"total": target.weight, "available": target.weight if up else 0,
                       "unavailable": 0 if up else target.weight},
        }
        rows.append(row)
    if balancer_health:
        healthy = total > 0 and available * 100.0 / total > upstream.healthchecks.threshold
        state = "HEALTHCHECKS_OFF" if not checker else "HEALTHY" if healthy else "UNHEALTHY"
        return 200, {"data": {"health": state, "id": upstream.id, "details": {
            "healthy": healthy,
            "weight": {"total": total, "available": available, "unavailable": total - available},
        }}, "next": None, "node_id": node_id}
    return 200, {"data": rows, "next": None, "node_id": node_id}


def set_target_health(config: "Config", table: HealthTable, upstream_key: str, target_key: str,
                      healthy: bool, address: str | None = None) -> tuple[int, Any]:
    upstream = find_upstream(config, upstream_key)
    if upstream is None:
        return NOT_FOUND
    target = find_target(upstream, target_key)
    if target is None:
        return NOT_FOUND
    if address is not None and address not in (f"{target.host}:{target.port}", f"[{target.host}]:{target.port}"):
        return NOT_FOUND  # health is kept per target here, whose one address is host:port
    slot = table.slot_for(upstream.name, target.host, target.port)
    if slot < 0:
        return 503, {"message": "the health table is full (raise --health-capacity)"}
    policy = health_policy(upstream.healthchecks) or HealthPolicy()
    event = health_rules.Event.MANUAL_HEALTHY if healthy else health_rules.Event.MANUAL_UNHEALTHY
    table.transition(slot, event, policy)
    log.warning("upstream %s: target %s set %s through the Admin API", upstream.name, target.target,
                "healthy" if healthy else "unhealthy")
    return 204, None


def get_health(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
    status, body = upstream_health(context.state.snapshot.config, context.health, params["upstream"],
                                   context.node_id, balancer_health=request.flag("balancer_health"))
    return Response(status, body)


def _setter(healthy: bool):  # type: ignore[no-untyped-def]
    def handler(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        status, body = set_target_health(context.state.snapshot.config, context.health, params["upstream"],
                                         params["target"], healthy, params.get("address"))
        return Response(status, body)
    return handler


put_healthy = _setter(True)
put_unhealthy = _setter(False)
