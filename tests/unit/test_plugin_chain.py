"""Per-route chains: Kong's precedence, PRIORITY order, and what a lazy chain asks of the worker."""
from __future__ import annotations

from ringgate.config import load_dict
from ringgate.plugins.chain import Chain, chain_for, instantiate
from ringgate.plugins.fallback import FallbackPlugin
from ringgate.plugins.registry import enable_list

enable_list("bundled")


def _config(*plugins: dict) -> object:
    return load_dict({
        "_format_version": "3.0",
        "services": [{"name": "s", "url": "http://127.0.0.1:9", "routes": [{"name": "r", "paths": ["/r"]},
                                                                        {"name": "q", "paths": ["/q"]}]}],
        "plugins": list(plugins),
    })


def _chain(config: object, route_name: str) -> Chain | None:
    route = next(r for r in config.routes if r.name == route_name)  # type: ignore[attr-defined]
    return chain_for(config, instantiate(config), route.id, route.service)  # type: ignore[arg-type]


def test_route_beats_service_beats_global_and_priority_orders() -> None:
    config = _config(
        {"name": "request-termination", "config": {"status_code": 503}},
        {"name": "request-termination", "service": "s", "config": {"status_code": 502}},
        {"name": "request-termination", "route": "r", "config": {"status_code": 418}},
        {"name": "correlation-id"},
    )
    chain = _chain(config, "r")
    assert chain is not None
    assert [type(p).NAME for p in chain.plugins] == ["correlation-id", "request-termination"]
    assert chain.plugins[1].config.status_code == 418
    assert _chain(config, "q").plugins[1].config.status_code == 502  # type: ignore[union-attr]


def test_a_route_without_plugins_has_no_chain() -> None:
    assert _chain(_config({"name": "correlation-id", "route": "r"}), "q") is None


def test_a_plain_fallback_is_lazy_and_gated_by_its_statuses() -> None:
    chain = _chain(_config({"name": "status-based-fallback", "config": {
        "backup_host": "b", "backup_port": 80, "fail_status_codes": [502, 503], "primary_timeout": 1500}}), "r")
    assert chain is not None and chain.lazy
    assert [s for s in range(600) if chain.response_gate[s]] == [502, 503]
    assert chain.primary_timeout == 1.5 and chain.no_timeout_retry
    assert not chain.reads_response_headers
    assert "body_filter" not in chain.plugins[0].active_phases()


def test_a_breaker_or_cache_step_makes_the_fallback_eager() -> None:
    breaker = _chain(_config({"name": "status-based-fallback", "config": {
        "backup_host": "b", "backup_port": 80, "circuit_breaker": {"threshold": 2, "timeout": 5}}}), "r")
    cache = _chain(_config({"name": "status-based-fallback", "config": {
        "fallback_chain": [{"type": "cache", "ttl": 5}]}}), "r")
    for chain in (breaker, cache):
        assert chain is not None and not chain.lazy
        assert all(chain.response_gate[s] for s in range(600))
    assert isinstance(cache.plugins[0], FallbackPlugin) and cache.reads_response_headers  # type: ignore[union-attr]
    assert "body_filter" in cache.plugins[0].active_phases()  # type: ignore[union-attr]


def test_chains_with_eager_plugins_are_not_lazy() -> None:
    chain = _chain(_config({"name": "status-based-fallback", "config": {"backup_host": "b", "backup_port": 80}},
                           {"name": "correlation-id"}), "r")
    assert chain is not None and not chain.lazy
