"""Compile a validated config snapshot into a worker's tables: router, balancers, services.

Runs once per config generation, off the request path; the result is immutable apart
from the balancers' per-worker state (wheel pointer, connection counts, EWMA).
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
import ssl
from typing import TYPE_CHECKING, Any

from fastpath.balancer import Balancer
from fastpath.router import RouteSpec, Router
from ringgate.plugins.base import Node
from ringgate.plugins.chain import Chain, chain_for, instantiate
from shared_state import health_rules
from shared_state.health import HealthPolicy, HealthTable
from shared_state.health import policy_for as health_policy
from workers.resolver import Resolver

if TYPE_CHECKING:
    from ringgate.config import Config

log = logging.getLogger("ringgate.runtime")


class UpstreamRuntime:
    __slots__ = ("name", "balancer", "targets", "target_ips", "host_header", "hash_on", "hash_on_key",
                 "observe_latency", "hash_fallback", "hash_fallback_key", "hash_cookie_path",
                 "health_slots", "health_policy", "passive_status", "next_trial_ms", "health_mode",
                 "outlier", "threshold", "checker", "series_targets")

    def __init__(self, upstream: Any, health: HealthTable | None = None) -> None:
        self.name: str = upstream.name
        self.targets: tuple[tuple[str, int, int], ...] = tuple(
            (t.host, t.port, t.weight) for t in upstream.targets
        )
        self.balancer = Balancer(self.targets, upstream.algorithm, upstream.slots)
        # IP literals are known now; hostnames are resolved per connection (None here).
        self.target_ips: tuple[str | None, ...] = tuple(Resolver.literal(host) for host, _, _ in self.targets)
        self.observe_latency: bool = upstream.algorithm == "latency"
        self.host_header: str | None = upstream.host_header
        self.hash_on: str = upstream.hash_on
        self.hash_on_key: str | None = _hash_key(upstream, "hash_on", upstream.hash_on)
        self.hash_fallback: str = upstream.hash_fallback
        self.hash_fallback_key: str | None = _hash_key(upstream, "hash_fallback", upstream.hash_fallback)
        self.hash_cookie_path: str = upstream.hash_on_cookie_path or "/"
        # Health: the shared block of each target (by identity, so it survives reloads), the
        # thresholds, and for passive checks a status -> verdict table (0 ignore, 1 success, 2 failure).
        # Every upstream gets its blocks, checker or not: the Admin API can set a target unhealthy
        # by hand, as in Kong (`checker` says whether Kong would run health checks for it).
        checks = upstream.healthchecks
        policy = health_policy(checks)
        self.checker: bool = policy is not None
        self.health_policy: HealthPolicy = policy if policy is not None else HealthPolicy()
        self.outlier = checks.outlier
        self.threshold: float = checks.threshold
        self.health_slots: tuple[int, ...] = ()
        self.passive_status: bytes | None = None
        self.next_trial_ms: int = 0
        self.health_mode: str = "normal"
        self.series_targets: list[int] | None = None  # this worker's series vector per target (proxy.pyx)
        if health is not None:
            self.health_slots = tuple(health.slot_for(self.name, host, port) for host, port, _ in self.targets)
            for (host, port, _), slot in zip(self.targets, self.health_slots):
                if slot < 0:
                    log.error("upstream %s: the health table is full, target %s:%d is not health-checked "
                              "(raise --health-capacity)", self.name, host, port)
            if self.health_policy.passive:
                self.passive_status = _status_verdicts(checks.passive)
            self.sync_health(health)

    def sync_health(self, health: HealthTable) -> None:
        """Apply the node-wide target states to this worker's balancer (after any transition)."""
        if not self.health_slots:
            return
        states: list[int] = []
        changed: list[int] = []
        next_trial = 0
        for slot in self.health_slots:
            if slot < 0:
                states.append(health_rules.State.HEALTHY)
                changed.append(0)
                continue
            block = health.read(slot)
            state = block["state"]
            states.append(state)
            changed.append(block["changed_at_ms"])
            if state in (health_rules.State.EJECTED, health_rules.State.TRIAL):
                deadline = block["deadline_ms"]
                next_trial = deadline if not next_trial else min(next_trial, deadline)
        outlier = self.outlier
        available, mode = health_rules.balancer_view(
            states, [w for _, _, w in self.targets], changed,
            max_ejection_percent=outlier.max_ejection_percent, panic_threshold=outlier.panic_threshold,
            threshold=self.threshold)
        for index, flag in enumerate(available):
            self.balancer.set_available(index, flag)
        if mode != self.health_mode:
            log.warning("upstream %s: %s", self.name, _MODE_MESSAGES[mode])
            self.health_mode = mode
        self.next_trial_ms = next_trial

    def __repr__(self) -> str:
        return f"<UpstreamRuntime {self.name} {self.balancer!r}>"


_MODE_MESSAGES = {
    "normal": "health back to normal",
    "panic": "panic mode: too few healthy targets, traffic is spread over all of them",
    "unhealthy": "unhealthy: available weight at or below healthchecks.threshold, requests get 503",
}


def _status_verdicts(passive: Any) -> bytes:
    table = bytearray(600)
    for status in passive.healthy.http_statuses:
        table[status] = 1
    for status in passive.unhealthy.http_statuses:
        if not table[status]:
            table[status] = 2  # listed in both: Kong checks the healthy list first
    return bytes(table)


def _hash_key(upstream: Any, prefix: str, mode: str) -> str | None:
    if mode == "header":
        value = getattr(upstream, f"{prefix}_header")
        return value.lower() if value else None
    if mode == "cookie":
        return upstream.hash_on_cookie
    if mode == "query_arg":
        return getattr(upstream, f"{prefix}_query_arg")
    if mode == "uri_capture":
        return getattr(upstream, f"{prefix}_uri_capture")
    return None


class ServiceRuntime:
    __slots__ = ("id", "name", "scheme", "host", "port", "path", "retries", "connect_timeout",
                 "write_timeout", "read_timeout", "upstream", "ssl_context", "default_host_header",
                 "ip", "host_line", "sni", "target_host_lines", "target_snis", "minimal_headers")

    def __init__(self, service: Any, upstream: UpstreamRuntime | None, trusted_cas: tuple[str, ...] = ()) -> None:
        self.id: str = service.id
        self.name: str | None = service.name
        self.scheme: str = service.protocol
        self.host: str = service.host
        self.port: int = service.port
        self.path: str | None = service.path
        self.retries: int = service.retries
        # Kong's timeouts are milliseconds; the loop works in seconds.
        self.connect_timeout: float = service.connect_timeout / 1000.0
        self.write_timeout: float = service.write_timeout / 1000.0
        self.read_timeout: float = service.read_timeout / 1000.0
        self.upstream = upstream
        self.minimal_headers: bool = False  # a fallback destination that drops the client's headers
        self.ssl_context: ssl.SSLContext | None = _client_tls(service, trusted_cas) if self.scheme == "https" else None
        self.default_host_header: str = host_header_value(self.host, self.port, self.scheme)
        # What each attempt needs, built once: the Host line and TLS name per target (Kong's rules:
        # upstream host_header, else the target host; :port unless it is the scheme's default).
        tls = self.ssl_context is not None
        self.ip: str | None = Resolver.literal(self.host)
        self.host_line: bytes = b"Host: " + self.default_host_header.encode("latin-1") + b"\r\n"
        self.sni: str | None = _sni(self.default_host_header) if tls else None
        lines: list[bytes] = []
        snis: list[str | None] = []
        for host, port, _ in (upstream.targets if upstream is not None else ()):
            header = upstream.host_header or host_header_value(host, port, self.scheme)  # type: ignore[union-attr]
            lines.append(b"Host: " + header.encode("latin-1") + b"\r\n")
            snis.append(_sni(header) if tls else None)
        self.target_host_lines: tuple[bytes, ...] = tuple(lines)
        self.target_snis: tuple[str | None, ...] = tuple(snis)

    def __repr__(self) -> str:
        return f"<ServiceRuntime {self.name or self.id} {self.scheme}://{self.host}:{self.port}>"


def host_header_value(host: str, port: int, scheme: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if (scheme == "http" and port == 80) or (scheme == "https" and port == 443):
        return host
    return f"{host}:{port}"


def _sni(host_header: str) -> str:
    host, _, port = host_header.rpartition(":")
    if not (host and port.isdigit()):
        host = host_header
    return host.strip("[]")


# Client contexts by (verify, trusted CA PEMs), shared by services and config generations: the system
# store is read once per worker, and pooled upstream connections (keyed by context) survive reloads.
_CLIENT_CONTEXTS: dict[tuple[bool, tuple[str, ...]], ssl.SSLContext] = {}


def _client_tls(service: Any, trusted_cas: tuple[str, ...] = ()) -> ssl.SSLContext:
    # tls_verify null/false = nginx's proxy_ssl_verify off, Kong's default. When on, the service's
    # ca_certificates are the whole trust store (Kong's rule); without any, the system store.
    verify = bool(service.tls_verify)
    key = (verify, trusted_cas if verify else ())
    ctx = _CLIENT_CONTEXTS.get(key)
    if ctx is not None:
        return ctx
    if verify:
        if service.ca_certificates and not trusted_cas:
            # Every listed CA is missing: trust nothing rather than fall back to the system store.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        else:
            ctx = ssl.create_default_context(cadata="\n".join(trusted_cas) if trusted_cas else None)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    if len(_CLIENT_CONTEXTS) >= 64:
        _CLIENT_CONTEXTS.clear()
    _CLIENT_CONTEXTS[key] = ctx
    return ctx


def _trusted_cas(config: "Config", service: Any) -> tuple[str, ...]:
    """The PEMs of the service's ca_certificates (an id the config lacks is logged and left out)."""
    if not service.ca_certificates:
        return ()
    by_id = {ca.id: ca.cert for ca in config.ca_certificates}
    missing = [ca_id for ca_id in service.ca_certificates if ca_id not in by_id]
    if missing:
        log.error("service %s: ca_certificates %s not found; upstream certificates signed by them will fail "
                  "verification", service.name or service.id, ", ".join(missing))
    return tuple(by_id[ca_id] for ca_id in service.ca_certificates if ca_id in by_id)


class RouteRuntime:
    __slots__ = ("id", "name", "service", "preserve_host", "protocols", "plugins", "https_only",
                 "https_redirect_status_code", "series")

    def __init__(self, route: Any, service: ServiceRuntime | None, plugins: Chain | None = None) -> None:
        self.id: str = route.id
        self.name: str | None = route.name
        self.service = service
        self.plugins = plugins  # None: no plugin applies, the request path skips every phase
        self.series = None  # this worker's counters for the route, resolved at its first request (proxy.pyx)
        self.preserve_host: bool = route.preserve_host
        self.protocols: tuple[str, ...] = tuple(route.protocols)
        # Kong: a route with https but not http answers plain-http requests with 426 or a redirect.
        self.https_only: bool = "https" in self.protocols and "http" not in self.protocols
        self.https_redirect_status_code: int = route.https_redirect_status_code


class Runtime:
    """Everything a worker needs to serve one config generation."""

    __slots__ = ("router", "services", "upstreams", "config_hash", "header_names", "checked", "node")

    def __init__(self, config: "Config", health: HealthTable | None = None, node: Node | None = None) -> None:
        self.node = node if node is not None else Node(health=health)
        self.node.runtime = self
        self.upstreams: dict[str, UpstreamRuntime] = {u.name: UpstreamRuntime(u, health) for u in config.upstreams}
        self.checked: tuple[UpstreamRuntime, ...] = tuple(u for u in self.upstreams.values() if u.health_slots)
        self.services: dict[str, ServiceRuntime] = {}
        for service in config.services:
            self.services[service.id] = ServiceRuntime(service, self.upstreams.get(service.host),
                                                       _trusted_cas(config, service))
        instances = instantiate(config, self.node) if config.plugins else {}
        specs = []
        for route in config.routes:
            service = self.services.get(route.service) if route.service else None
            if service is not None and not _service_enabled(config, route.service):
                continue  # Kong drops a disabled service's routes from the router
            if route.path_handling == "v1":
                log.warning("route %s: path_handling v1 is ignored, paths are joined the v0 way (as Kong's "
                            "traditional_compatible router does)", route.name or route.id)
            specs.append(RouteSpec(
                id=route.id, name=route.name, hosts=route.hosts, paths=route.paths, methods=route.methods,
                headers=route.headers, regex_priority=route.regex_priority, strip_path=route.strip_path,
                # Kong's traditional_compatible router joins paths the v0 way whatever path_handling says.
                preserve_host=route.preserve_host, path_handling="v0",
                service_path=service.path if service is not None else None,
                protocols=tuple(route.protocols), snis=route.snis,
                payload=RouteRuntime(route, service, chain_for(config, instances, route.id, route.service)
                                     if instances else None),
            ))
        self.router = Router(specs)
        self.header_names: frozenset[str] = self.router.header_names
        self.config_hash: str = config.config_hash


def _service_enabled(config: "Config", service_id: str) -> bool:
    return bool(config.service(service_id).enabled)


def make_destination(runtime: "Runtime | None", *, scheme: str, host: str, port: int, tls_verify: bool,
                     sni: str | None, upstream: str | None, retries: int) -> ServiceRuntime | None:
    """A place a plugin sends a request to (a fallback step): a server, or a configured upstream."""
    upstream_runtime = None
    if upstream is not None:
        upstream_runtime = runtime.upstreams.get(upstream) if runtime is not None else None
        if upstream_runtime is None:
            return None
    service = SimpleNamespace(
        id=f"fallback:{upstream or host}:{port}", name=f"fallback {upstream or host}:{port}", protocol=scheme,
        host=upstream or host, port=port, path=None, retries=retries,
        # Kong's service defaults; a backup is bounded like any service.
        connect_timeout=60000, write_timeout=60000, read_timeout=60000, tls_verify=tls_verify,
        ca_certificates=None, client_certificate=None,
    )
    destination = ServiceRuntime(service, upstream_runtime)
    if sni and destination.ssl_context is not None:
        destination.sni = sni
    return destination
