"""What the stats document and /metrics report from shared memory besides the counters:
target health, circuit breakers, fallback counts. Read-only; run in the control process."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared_state.health import policy_for

from ringgate.plugins.fallback import DURATION_BUCKETS_MS
from shared_state import health_rules

if TYPE_CHECKING:
    from ringgate.config import Config

_KONG_STATE = {"HEALTHY": "healthy", "UNHEALTHY": "unhealthy", "HEALTHCHECKS_OFF": "healthchecks_off"}
_BREAKER_STATE = {health_rules.State.HEALTHY: "closed", health_rules.State.EJECTED: "open",
                  health_rules.State.TRIAL: "half_open", health_rules.State.UNHEALTHY: "open"}


def health_provider(config: Callable[[], Config], table: Any) -> Callable[[], list[dict[str, Any]]]:
    def provide() -> list[dict[str, Any]]:
        rows = []
        for upstream in config().upstreams:
            checker = policy_for(upstream.healthchecks) is not None
            for target in upstream.targets:
                slot = table.slot_for(upstream.name, target.host, target.port)
                state = health_rules.State(table.state(slot)) if slot >= 0 else health_rules.State.HEALTHY
                name = health_rules.KONG_NAMES[state]
                if not checker and state == health_rules.State.HEALTHY:
                    name = "HEALTHCHECKS_OFF"
                rows.append({"upstream": upstream.name, "target": target.target,
                             "address": f"{target.host}:{target.port}", "state": _KONG_STATE[name],
                             "detail": state.name.lower(), "weight": target.weight})
        return rows
    return provide


def breaker_provider(config: Callable[[], Config], table: Any) -> Callable[[], list[dict[str, Any]]]:
    def provide() -> list[dict[str, Any]]:
        current = config()
        routes = {route.id: route for route in current.routes}
        rows = []
        for plugin in current.plugins:
            if plugin.name != "status-based-fallback" or not plugin.config.get("circuit_breaker"):
                continue
            scoped = [routes[plugin.route]] if plugin.route in routes else [
                r for r in current.routes if plugin.service is None or r.service == plugin.service]
            for route in scoped:
                slot = table.slot_for(f"breaker:{plugin.id}", route.id, 0)
                state = health_rules.State(table.state(slot)) if slot >= 0 else health_rules.State.HEALTHY
                rows.append({"route": route.name or route.id, "state": _BREAKER_STATE[state]})
        return rows
    return provide


def fallback_provider(shdict: Any) -> Callable[[], list[dict[str, Any]]]:
    """Counts the fallback plugin keeps in the shared dict: fallback|route|trigger|final_status and
    fallback_ms|route|le_<bucket> / sum_us. Requests that wanted a fallback but could not have one
    (stream_broken, not_replayed, body_too_large) have final_status "none"."""
    def provide() -> list[dict[str, Any]]:
        if shdict is None:
            return []
        counts: dict[tuple[str, str, str], int] = {}
        durations: dict[str, dict[str, int]] = {}
        for raw in shdict.keys(100000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            parts = key.split("|")
            if parts[0] == "fallback" and len(parts) == 4:
                value = shdict.get(key)
                if isinstance(value, int):
                    counts[(parts[1], parts[2], parts[3])] = value
            elif parts[0] == "fallback_ms" and len(parts) == 3:
                value = shdict.get(key)
                if isinstance(value, int):
                    durations.setdefault(parts[1], {})[parts[2]] = value
        rows = []
        described: set[str] = set()
        for (route, trigger, final), count in sorted(counts.items()):
            # The duration histogram belongs to the route: it rides on the route's first row only, so
            # summing rows never counts a fallback twice.
            spread = durations.get(route, {}) if route not in described else {}
            described.add(route)
            cumulative, buckets = 0, []
            for le in DURATION_BUCKETS_MS:
                cumulative += spread.get(f"le_{le}", 0)
                buckets.append([le, cumulative])
            total = cumulative + spread.get("le_inf", 0)
            rows.append({"route": route, "trigger": trigger, "final_status": final, "count": count,
                         "duration_ms": {"buckets": buckets, "sum": spread.get("sum_us", 0) / 1000.0,
                                         "count": total}})
        return rows
    return provide
