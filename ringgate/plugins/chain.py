"""Per-route plugin chains, compiled once per config generation, and the phase runners.

Scoping is Kong's: for each plugin name, the most specific configured instance applies to a
request: route+service, then route, then service, then global. Instances run in PRIORITY
order (higher first; ties by name, so the order is stable). A route whose chain is empty gets
None and its requests never touch this module.

The runners keep the rule that a plugin never kills a worker: Exit is the plugin's own answer;
any other exception is logged with the plugin's name and becomes a 500 before the answer has
started, or is logged and skipped after.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ringgate.plugins.base import Context, Exit, Plugin
from ringgate.plugins.registry import plugin_class

if TYPE_CHECKING:
    from ringgate.config import Config

log = logging.getLogger("ringgate.plugins")

INTERNAL_ERROR = (500, b'{"message":"An unexpected error occurred"}',
                  [("Content-Type", "application/json; charset=utf-8")])


class Chain:
    """The plugins of one route, split by phase (only the phases a plugin implements)."""

    __slots__ = (
        "access",
        "body_filter",
        "buffers_body",
        "header_filter",
        "log",
        "lazy",
        "no_timeout_retry",
        "plugins",
        "primary_timeout",
        "reads_response_headers",
        "response_gate",
        "response",
        "rewrite",
        "wants_body",
    )

    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = tuple(plugins)
        by_phase: dict[str, list[Plugin]] = {}
        for plugin in self.plugins:
            for phase in plugin.active_phases():
                by_phase.setdefault(phase, []).append(plugin)
        self.rewrite = tuple(by_phase.get("rewrite", ()))
        self.access = tuple(by_phase.get("access", ()))
        self.response = tuple(by_phase.get("response", ()))
        self.header_filter = tuple(by_phase.get("header_filter", ()))
        self.body_filter = tuple(by_phase.get("body_filter", ()))
        self.log = tuple(by_phase.get("log", ()))
        self.buffers_body = any(type(p).BUFFERS_BODY for p in self.plugins)
        # The worker builds the upstream's header pairs only when a plugin in these phases reads them.
        self.reads_response_headers = any(p.reads_response_headers() for p in self.response + self.header_filter)
        # Lazy chain: every plugin acts only on some statuses (or no answer); the worker makes no
        # Context for other requests, so a healthy primary costs a byte lookup, not Python calls.
        self.lazy = all(p.lazy() for p in self.plugins)
        gate = bytearray(600)
        for plugin in self.response:
            statuses = plugin.response_statuses()
            for status in (range(600) if statuses is None else statuses):
                if 0 <= status < 600:
                    gate[status] = 1
        self.response_gate = bytes(gate)
        settings = [p.request_settings() for p in self.plugins]
        self.primary_timeout = max((t for t, _ in settings if t), default=0.0)
        self.no_timeout_retry = any(flag for _, flag in settings)
        # The request body is kept for plugins (replay to a backup) when one asks for it.
        self.wants_body = any(getattr(p, "WANTS_REQUEST_BODY", False) for p in self.plugins)

    def __repr__(self) -> str:
        return f"<Chain {[type(p).NAME for p in self.plugins]}>"


def instantiate(config: Config, node: Any = None) -> dict[str, Plugin]:
    """One instance per enabled plugin entity, keyed by entity id."""
    instances: dict[str, Plugin] = {}
    for entity in config.plugins:
        if not entity.enabled:
            continue
        cls = plugin_class(entity.name)
        if cls is None:
            log.error("plugin %s (%s) is in the config but not enabled on this node; ignored", entity.name,
                      entity.id)
            continue
        plugin_config = cls.Config.model_validate(entity.config)
        instances[entity.id] = cls(plugin_config, entity_id=entity.id, route=entity.route, service=entity.service,
                                   node=node)
    return instances


def chain_for(config: Config, instances: dict[str, Plugin], route_id: str, service_id: str | None) -> Chain | None:
    """Kong's precedence for one route: per plugin name, the most specific instance wins."""
    best: dict[str, tuple[int, Plugin]] = {}
    for entity in config.plugins:
        plugin = instances.get(entity.id)
        if plugin is None:
            continue
        if entity.route is not None and entity.route != route_id:
            continue
        if entity.service is not None and entity.service != service_id:
            continue
        rank = (2 if entity.route is not None else 0) + (1 if entity.service is not None else 0)
        current = best.get(entity.name)
        if current is None or rank > current[0]:
            best[entity.name] = (rank, plugin)
    if not best:
        return None
    ordered = sorted((p for _, p in best.values()), key=lambda p: (-type(p).PRIORITY, type(p).NAME))
    return Chain(ordered)


# Phase runners (called by the worker's request path)

def run_access(chain: Chain, ctx: Context) -> bool:
    """rewrite + access; True when a plugin answered (ctx.exit_answer is set)."""
    for phase, plugins in (("rewrite", chain.rewrite), ("access", chain.access)):
        for plugin in plugins:
            ctx.current_plugin = plugin.entity_id
            try:
                getattr(plugin, phase)(ctx)
            except Exit:
                return True
            except Exception:
                log.exception("plugin %s failed in the %s phase of request %s", type(plugin).NAME, phase,
                              ctx.request_id)
                ctx.exit_answer = INTERNAL_ERROR
                return True
    return False


def run_response(chain: Chain, ctx: Context, status: int, headers: list[tuple[str, str]]) -> bool:
    """The upstream answer's head arrived; True when a plugin replaced the answer (exit or fallback)."""
    for plugin in chain.response:
        ctx.current_plugin = plugin.entity_id
        try:
            plugin.response(ctx, status, headers)
        except Exit:
            return True
        except Exception:
            log.exception("plugin %s failed in the response phase of request %s", type(plugin).NAME,
                          ctx.request_id)
            ctx.exit_answer = INTERNAL_ERROR
            return True
        if ctx.fallback_step is not None:
            return True
    return False


def run_header_filter(chain: Chain, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
    for plugin in chain.header_filter:
        ctx.current_plugin = plugin.entity_id
        try:
            plugin.header_filter(ctx, status, headers)
        except Exception:
            log.exception("plugin %s failed in the header_filter phase of request %s", type(plugin).NAME,
                          ctx.request_id)


def run_body_filter(chain: Chain, ctx: Context, chunk: bytes, eof: bool) -> bytes:
    for plugin in chain.body_filter:
        ctx.current_plugin = plugin.entity_id
        try:
            replaced = plugin.body_filter(ctx, chunk, eof)
        except Exception:
            log.exception("plugin %s failed in the body_filter phase of request %s", type(plugin).NAME,
                          ctx.request_id)
            continue
        if replaced is not None:
            chunk = replaced
    return chunk


def run_log(chain: Chain, ctx: Context) -> None:
    for plugin in chain.log:
        ctx.current_plugin = plugin.entity_id
        try:
            plugin.log(ctx)
        except Exception:
            log.exception("plugin %s failed in the log phase of request %s", type(plugin).NAME, ctx.request_id)


def apply_header_ops(headers: list[tuple[str, str]], ops: list[tuple[str, str, str | None]] | None) -> list[tuple[str, str]]:
    """Apply set/add/clear operations to a header list (case-insensitive names)."""
    if not ops:
        return headers
    result = list(headers)
    for op, name, value in ops:
        lower = name.lower()
        if op in ("set", "clear"):
            result = [(k, v) for k, v in result if k.lower() != lower]
        if op in ("set", "add") and value is not None:
            result.append((name, value))
    return result
