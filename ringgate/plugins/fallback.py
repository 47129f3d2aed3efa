"""status-based-fallback: when the primary fails, answer from a chain of fallbacks; a stream stays a stream.

Decisions happen in the response phase, when the primary's answer head has arrived and nothing
has been written to the client, so a streamed (SSE, chunked) answer fails over cleanly and the
backup's answer is streamed through event by event. A primary that breaks after its answer
started cannot fail over: the client sees a truncated answer, and it is counted.

Triggers: a status in fail_status_codes, a connection failure, a timeout (primary_timeout
bounds the wait for the primary's answer head; timeouts then skip the service's retries).

The chain: the legacy backup_* fields (one step, if backup_host is set), then fallback_chain:
    {host, port, path?, scheme?}   another server
    {upstream: NAME}               a configured upstream (balanced, health-checked)
    {type: cache, ttl}             the last good answer to this request, kept in shared memory
    {type: static, status, body, content_type?, headers?}
A step that fails too moves on to the next; the last step's failure is passed through.

Replay: the request body is replayed from the worker's buffer; a body over max_replay_body (or
the node's replay buffer) cannot be replayed, so the client gets the primary's answer (logged).
After a timeout or reset with the request already sent, only idempotent methods are replayed,
unless replay_non_idempotent.

Circuit breaker (shared by all workers; a health block in shared memory, see
shared_state/health_rules.py): CLOSED = HEALTHY, OPEN = EJECTED, HALF_OPEN = TRIAL. `threshold`
consecutive primary failures open it; after `timeout` seconds one request tries the primary;
its outcome closes or reopens it. While open, the primary receives nothing.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Any, Literal

import msgpack
import orjson
from pydantic import Field, model_validator
from shared_state.health import HTTP_FAILURE, SUCCESS, HealthPolicy

from ringgate.plugins.base import Context, Plugin, PluginConfig
from shared_state import health_rules

log = logging.getLogger("ringgate.fallback")
event_log = logging.getLogger("ringgate.fallback.events")

IDEMPOTENT = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"))
DURATION_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
CACHE_VALUE_LIMIT = 60 * 1024


class ChainStep(PluginConfig):
    type: Literal["backup", "upstream", "cache", "static"] | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str | None = None
    scheme: Literal["http", "https"] = "http"
    ssl_verify: bool = True
    sni: str | None = None
    upstream: str | None = None
    ttl: int = Field(default=300, ge=1)
    status: int = Field(default=200, ge=100, le=599)
    body: str = ""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind(self) -> ChainStep:
        kind = self.type or ("upstream" if self.upstream else "backup" if self.host else None)
        if kind is None:
            raise ValueError("a fallback_chain step needs 'host' and 'port', 'upstream', or 'type' cache/static")
        if kind == "backup" and (not self.host or not self.port):
            raise ValueError("a server step needs both 'host' and 'port'")
        if kind == "upstream" and not self.upstream:
            raise ValueError("an upstream step needs 'upstream'")
        object.__setattr__(self, "type", kind)
        return self


class Breaker(PluginConfig):
    threshold: int = Field(default=5, ge=1, le=255)
    timeout: float = Field(default=30.0, gt=0, le=86400)


class FallbackConfig(PluginConfig):
    fail_status_codes: list[int] = Field(default_factory=lambda: [500, 502, 503, 504])
    primary_timeout: int = Field(default=30000, ge=1, le=300000)
    backup_host: str | None = None
    backup_port: int | None = Field(default=None, ge=1, le=65535)
    backup_path: str | None = None
    backup_scheme: Literal["http", "https"] = "http"
    backup_ssl_verify: bool = True
    backup_sni: str | None = None
    max_retries: int = Field(default=1, ge=0, le=5)
    retry_on_backup: bool = False
    preserve_original_headers: bool = True
    add_fallback_headers: bool = True
    process_response_body: bool = False
    fallback_chain: list[ChainStep] = Field(default_factory=list)
    circuit_breaker: Breaker | None = None
    replay_non_idempotent: bool = False
    max_replay_body: int = Field(default=1 << 20, ge=0)

    @model_validator(mode="after")
    def _needs_somewhere_to_go(self) -> FallbackConfig:
        if self.backup_host and self.backup_port is None:
            raise ValueError("backup_port is required with backup_host")
        if not self.backup_host and not self.fallback_chain:
            raise ValueError("set backup_host and backup_port, or fallback_chain")
        return self


class Step:
    """A resolved network step: the destination the worker sends to, and the path to ask for."""

    __slots__ = ("label", "path", "service")

    def __init__(self, service: Any, path: str | None, label: str) -> None:
        self.service = service
        self.path = path
        self.label = label


class FallbackPlugin(Plugin):
    NAME = "status-based-fallback"
    PRIORITY = 750
    Config = FallbackConfig
    WANTS_REQUEST_BODY = True

    def __init__(self, config: FallbackConfig, **kwargs: Any) -> None:  # type: ignore[override]
        super().__init__(config, **kwargs)
        self.steps: list[ChainStep] = []
        if config.backup_host:
            self.steps.append(ChainStep(type="backup", host=config.backup_host, port=config.backup_port,
                                        path=config.backup_path, scheme=config.backup_scheme,
                                        ssl_verify=config.backup_ssl_verify, sni=config.backup_sni))
        self.steps.extend(config.fallback_chain)
        self.fail_codes = frozenset(config.fail_status_codes)
        self.wants_cache = any(step.type == "cache" for step in self.steps)
        self.cache_ttl = min((s.ttl for s in self.steps if s.type == "cache"), default=0)
        breaker = config.circuit_breaker
        self.breaker_policy = None if breaker is None else HealthPolicy(
            passive=(0, breaker.threshold, 0, 0), base_ejection_ms=int(breaker.timeout * 1000),
            max_ejection_ms=int(breaker.timeout * 1000))
        self._destinations: dict[tuple[int, int], Step] = {}
        self._breaker_slots: dict[str, int] = {}

    def active_phases(self) -> tuple[str, ...]:
        # The success path pays only for what this config uses: answers are copied aside only for
        # a cache step, and headers are added only when asked for.
        phases = super().active_phases()
        if not self.wants_cache:
            phases = tuple(p for p in phases if p != "body_filter")
        if not self.config.add_fallback_headers:
            phases = tuple(p for p in phases if p != "header_filter")
        return phases

    def reads_response_headers(self) -> bool:
        return self.wants_cache  # the headers are kept only with a cached answer

    def lazy(self) -> bool:
        # Without a breaker (access) or a cache step (every good answer is copied), a request whose
        # primary answers well never needs this plugin.
        return self.breaker_policy is None and not self.wants_cache

    def response_statuses(self) -> frozenset[int] | None:
        return None if self.wants_cache or self.breaker_policy is not None else self.fail_codes

    def request_settings(self) -> tuple[float, bool]:
        return self.config.primary_timeout / 1000.0, True

    # -- shared memory ----------------------------------------------------------------------

    def _breaker_slot(self, ctx: Context) -> int:
        health = self.node.health
        if self.breaker_policy is None or health is None:
            return -1
        route = ctx.route_id or ""
        slot = self._breaker_slots.get(route)
        if slot is None:  # claimed once per route: the identity hash is not worth paying per request
            slot = self._breaker_slots[route] = health.slot_for(f"breaker:{self.entity_id}", route, 0)
        return slot

    def _count(self, key: str, amount: int = 1) -> None:
        shdict = self.node.shdict
        if shdict is not None:
            try:
                shdict.incr(key, amount, 0)
            except Exception:  # a full dict must not fail the request
                log.debug("fallback counter %s not stored", key, exc_info=True)

    # -- phases -----------------------------------------------------------------------------

    def access(self, ctx: Context) -> None:
        state = ctx.plugin
        state["t0"] = time.monotonic()
        ctx.primary_timeout = self.config.primary_timeout / 1000.0
        ctx.no_timeout_retry = True
        slot = self._breaker_slot(ctx)
        state["breaker"] = slot
        if slot < 0:
            return
        health = self.node.health
        block_state = health.state(slot)
        if block_state == health_rules.State.HEALTHY:
            return
        if block_state in (health_rules.State.EJECTED, health_rules.State.TRIAL) and \
                health.transition(slot, health_rules.Event.TRIAL_DUE, self.breaker_policy):
            log.info("circuit breaker of route %s half-open: one request tries the primary", ctx.route_name)
            state["trial"] = True
            return
        # Open: the primary gets nothing; the chain answers.
        self._start(ctx, state, "breaker_open", 0)
        self._next_step(ctx, state)

    def response(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        state = ctx.plugin
        failed = ctx.failure is not None or status in self.fail_codes
        if not ctx.in_fallback:
            self._report_primary(ctx, state, failed)
            if not failed:
                if self.wants_cache and ctx.method == "GET" and 200 <= status < 300:
                    state["capture"] = [status, headers, [], 0]
                return
            trigger = ctx.failure or f"status_{status}"
            if ctx.failure == "timeout" and ctx.request_sent and ctx.method not in IDEMPOTENT \
                    and not self.config.replay_non_idempotent:
                log.warning("fallback skipped for %s %s: timeout after the request was sent, %s is not replayed "
                            "(replay_non_idempotent is off)", ctx.method, ctx.path, ctx.method)
                self._count(f"fallback|{ctx.route_name or ctx.route_id}|not_replayed|none")
                return
            if not ctx.replayable or ctx.body_bytes > self.config.max_replay_body:
                log.warning("fallback skipped for %s %s: the request body was over the replay buffer, the client "
                            "gets the primary's answer", ctx.method, ctx.path)
                self._count(f"fallback|{ctx.route_name or ctx.route_id}|body_too_large|none")
                return
            self._start(ctx, state, trigger, status)
        elif not failed:
            return  # the step answered: its answer goes to the client as a stream
        self._next_step(ctx, state)

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        state = ctx.plugin
        served = state.get("served_by")
        if served and self.config.add_fallback_headers:
            ctx.set_response_header("X-Fallback", served)
            if state.get("original_status"):  # none when an open breaker kept the primary out
                ctx.set_response_header("X-Original-Status", str(state["original_status"]))

    def body_filter(self, ctx: Context, chunk: bytes, eof: bool) -> bytes | None:
        capture = ctx.plugin.get("capture")
        if capture is None:
            return None
        if chunk:
            capture[3] += len(chunk)
            if capture[3] > CACHE_VALUE_LIMIT:
                ctx.plugin["capture"] = None  # too big to keep: this answer is not cached
                return None
            capture[2].append(chunk)
        if eof and not ctx.aborted:
            self._store(ctx, capture)
        return None

    def log(self, ctx: Context) -> None:
        state = ctx.plugin
        if "trigger" not in state:
            if ctx.aborted and not ctx.in_fallback:
                self._count(f"fallback|{ctx.route_name or ctx.route_id}|stream_broken|none")
            return
        elapsed_ms = (time.monotonic() - state.get("t0", ctx.started_at)) * 1000.0
        final = ctx.status
        route = ctx.route_name or ctx.route_id
        self._count(f"fallback|{route}|{state['trigger']}|{final}")
        self._count(f"fallback_ms|{route}|le_{_bucket(elapsed_ms)}")
        self._count(f"fallback_ms|{route}|sum_us", int(elapsed_ms * 1000))
        event_log.info(orjson.dumps({
            "event": "fallback", "trigger_reason": state["trigger"], "retry_count": state.get("tried", 0),
            "final_status": final, "elapsed_ms": round(elapsed_ms, 1), "backup_target": state.get("target"),
            "served_by": state.get("served_by"), "route": route, "service": ctx.service_name or ctx.service_id,
            "request_id": ctx.request_id, "aborted": ctx.aborted,
        }).decode())

    # -- the chain --------------------------------------------------------------------------

    def _start(self, ctx: Context, state: dict[str, Any], trigger: str, status: int) -> None:
        state["trigger"] = trigger
        state["original_status"] = status
        state["next"] = 0
        state["tried"] = 0

    def _next_step(self, ctx: Context, state: dict[str, Any]) -> None:
        """Serve the next step that can answer; nothing left: the current answer stays."""
        while state["next"] < len(self.steps):
            step = self.steps[state["next"]]
            state["next"] += 1
            if step.type == "static":
                state["served_by"] = ctx.shared["fallback"] = "static"
                headers = dict(step.headers)
                headers.setdefault("Content-Type", step.content_type)
                ctx.exit(step.status, step.body.encode(), headers)
            if step.type == "cache":
                cached = self._lookup(ctx)
                if cached is None:
                    continue
                state["served_by"] = ctx.shared["fallback"] = "cache"
                status, headers, body = cached
                ctx.exit(status, body, headers)
            destination = self._destination(step)
            if destination is None:
                log.error("fallback step %s: upstream %r does not exist in the running config", state["next"],
                          step.upstream)
                continue
            state["tried"] = state.get("tried", 0) + 1
            state["served_by"] = ctx.shared["fallback"] = "backup"
            state["target"] = destination.label
            ctx.fallback(destination)
            return
        if state.get("trigger") == "breaker_open":
            # Open breaker and nothing in the chain could answer: the primary stays protected.
            ctx.exit(503, {"message": "Service unavailable (circuit breaker open)"})

    def _destination(self, step: ChainStep) -> Step | None:
        runtime = self.node.runtime
        key = (id(runtime), id(step))
        cached = self._destinations.get(key)
        if cached is not None:
            return cached
        make = getattr(self.node, "destination", None)
        if make is None:
            return None
        retries = self.config.max_retries if self.config.retry_on_backup else 0
        if step.type == "upstream":
            service = make(scheme=step.scheme, host=step.upstream, port=step.port or (443 if step.scheme == "https"
                                                                                      else 80),
                           tls_verify=step.ssl_verify, sni=step.sni, upstream=step.upstream, retries=retries)
            label = f"upstream:{step.upstream}"
        else:
            service = make(scheme=step.scheme, host=step.host, port=step.port, tls_verify=step.ssl_verify,
                           sni=step.sni, upstream=None, retries=retries)
            label = f"{step.host}:{step.port}"
        if service is None:
            return None
        # Read by the worker's switch_to: the backup gets only the body's and the gateway's headers.
        service.minimal_headers = not self.config.preserve_original_headers
        destination = Step(service, step.path, label)
        if len(self._destinations) > 64:
            self._destinations.clear()
        self._destinations[key] = destination
        return destination

    # -- breaker and cache -----------------------------------------------------------------

    def _report_primary(self, ctx: Context, state: dict[str, Any], failed: bool) -> None:
        slot = state.get("breaker", -1)
        if slot < 0:
            return
        event = self.node.health.report_outcome(slot, HTTP_FAILURE if failed else SUCCESS, False,
                                                self.breaker_policy)
        if event == health_rules.Event.EJECT or event == health_rules.Event.TRIAL_FAILED:
            log.warning("circuit breaker of route %s open for %.0fs after %s", ctx.route_name,
                        self.config.circuit_breaker.timeout,  # type: ignore[union-attr]
                        "a failed trial" if event == health_rules.Event.TRIAL_FAILED else
                        f"{self.config.circuit_breaker.threshold} consecutive failures")  # type: ignore[union-attr]
        elif event == health_rules.Event.TRIAL_SUCCEEDED:
            log.warning("circuit breaker of route %s closed: the trial request succeeded", ctx.route_name)

    def _cache_key(self, ctx: Context) -> str:
        query = ctx.query.decode("latin-1") if ctx.query else ""
        return f"fbc|{self.entity_id}|{ctx.method}|{ctx.raw_path.decode('latin-1')}?{query}"

    def _store(self, ctx: Context, capture: list[Any]) -> None:
        cache = getattr(self.node, "cache", None)
        if cache is None:
            return
        status, headers, chunks, _ = capture
        kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                                                  "keep-alive", "date")]
        try:
            cache.set(self._cache_key(ctx), msgpack.packb([status, kept, b"".join(chunks)]), self.cache_ttl)
        except Exception:
            log.debug("fallback cache entry not stored", exc_info=True)

    def _lookup(self, ctx: Context) -> tuple[int, list[tuple[str, str]], bytes] | None:
        cache = getattr(self.node, "cache", None)
        if cache is None or ctx.method != "GET":
            return None
        raw = cache.get(self._cache_key(ctx))
        if raw is None:
            return None
        status, headers, body = msgpack.unpackb(raw)
        return status, [tuple(h) for h in headers], body


def _bucket(value: float) -> str:
    index = bisect.bisect_left(DURATION_BUCKETS_MS, value)
    return str(DURATION_BUCKETS_MS[index]) if index < len(DURATION_BUCKETS_MS) else "inf"
