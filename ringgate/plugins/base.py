"""The plugin contract: a Python class per plugin, Kong's phases, and the per-request context.

A plugin is a subclass of `Plugin` with a NAME, a PRIORITY (higher runs first, as in Kong),
a pydantic `Config` model (its `config` fields with defaults, validated at config load), and
any of the phase methods below. A worker builds one instance per configured plugin entity per
config generation (`__init__(config)`), so per-request state belongs in `ctx.shared`/`ctx.plugin`,
never on `self`.

Phases, in order, each called only if the class overrides it:

    rewrite(ctx)                         before anything else (request headers can be changed)
    access(ctx)                          decide: pass, or answer with ctx.exit(...) and skip the upstream
    response(ctx, status, headers)       ours: the upstream's answer head arrived and NOTHING has been
                                         sent to the client; a plugin may call ctx.exit(...) or
                                         ctx.fallback(...) to replace the answer (streams stay streams)
    header_filter(ctx, status, headers)  the answer head about to go out: ctx.set_response_header(...)
    body_filter(ctx, chunk, eof)         each body piece as it passes; return the piece to send (or None
                                         to send it unchanged); never buffer unless BUFFERS_BODY
    log(ctx)                             after the last byte was written (or the client went away)

A phase that raises: before the answer started, the client gets a 500 and the error is logged;
after, the error is logged and the answer goes on. A worker never dies for a plugin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

PHASES: tuple[str, ...] = ("rewrite", "access", "response", "header_filter", "body_filter", "log")


@dataclass
class Node:
    """What a plugin may use of its node: shared memory made by the master before fork.

    shdict: shared_state.shdict.SharedDict (ngx.shared-like, all workers; None in unit tests
    that do not need it); health: the HealthTable; worker: this worker's slot number.
    """

    shdict: Any = None
    health: Any = None
    worker: int = 0
    prefix: str = ""
    runtime: Any = None  # the worker's current Runtime (upstreams by name) for plugins that balance
    cache: Any = None    # SharedDict with large values: cached answers (proxy-cache, fallback cache step)
    # destination(scheme=, host=, port=, tls_verify=, sni=, upstream=, retries=) -> a service-like object
    # the worker can send a request to (None when it cannot be built); set by the worker.
    destination: Any = None


class PluginConfig(BaseModel):
    """Base for plugin config models: unknown fields are errors, as in Kong's schemas."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    NAME: ClassVar[str] = ""
    PRIORITY: ClassVar[int] = 0
    VERSION: ClassVar[str] = "0.1.0"
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    # Set by plugins that need the whole answer body in body_filter (nobody else makes a stream wait).
    BUFFERS_BODY: ClassVar[bool] = False

    def __init__(self, config: PluginConfig, *, entity_id: str = "", route: str | None = None,
                 service: str | None = None, node: Node | None = None) -> None:
        self.config = config
        self.entity_id = entity_id  # the plugin entity's id (stable across reloads)
        self.route = route          # scope: route id / service id, None for global
        self.service = service
        self.node = node if node is not None else Node()

    # Whether response/header_filter read the upstream's header list: False lets the worker skip
    # turning the head into Python pairs for this plugin.
    READS_RESPONSE_HEADERS: ClassVar[bool] = True

    @classmethod
    def phases(cls) -> tuple[str, ...]:
        """The phases this class implements (compared with the base class's no-op methods)."""
        return tuple(p for p in PHASES if getattr(cls, p) is not getattr(Plugin, p))

    def active_phases(self) -> tuple[str, ...]:
        """The phases this instance needs; an instance whose config makes a phase a no-op drops it,
        so requests do not pay for it (e.g. a body_filter that only matters when caching)."""
        return type(self).phases()

    def reads_response_headers(self) -> bool:
        return self.READS_RESPONSE_HEADERS

    def response_statuses(self) -> frozenset[int] | None:
        """The upstream statuses for which this instance's response phase can act (None: any).
        With a set, and no other phase needed on a request's normal path (lazy()), the worker
        creates no Context and calls nothing for answers outside it."""
        return None

    def lazy(self) -> bool:
        """True when this instance needs no phase at all unless its response phase acts (a status
        in response_statuses(), or no answer): then the Context is made only in that case."""
        return False

    def request_settings(self) -> tuple[float, bool]:
        """(primary timeout in seconds or 0, skip the service's retries on timeouts): what a lazy
        instance asks of every request without running any Python on it."""
        return 0.0, False

    # Phase methods: no-ops here; the chain skips the ones a class does not override.
    def rewrite(self, ctx: Context) -> None:
        pass

    def access(self, ctx: Context) -> None:
        pass

    def response(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        pass

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        pass

    def body_filter(self, ctx: Context, chunk: bytes, eof: bool) -> bytes | None:
        return None

    def log(self, ctx: Context) -> None:
        pass


class Exit(Exception):
    """Raised by ctx.exit(): the plugin answers the request itself."""


class Context:
    """One request as plugins see it (Kong's PDK, the parts Ringgate has).

    Request (read-only): method, path (normalized), raw_path, query (bytes or None), host,
    headers (list of (name, value) str pairs as received), client_ip, route_id/route_name,
    service_id/service_name, request_id, body (bytes if buffered for replay, else None).
    Shared: `shared` (dict, all plugins of this request), `plugin` (dict per plugin instance).
    Actions:
      set_upstream_header(name, value) / clear_upstream_header(name)  (rewrite/access only)
      exit(status, body=b"", headers=None)  answer now (access, response phases)
      fallback(step)                         response phase: replace the upstream's answer with the
                                             answer of `step` (see ringgate.plugins.fallback)
      set_response_header(name, value), add_response_header(name, value),
      clear_response_header(name)            header_filter (and exit answers)
    After the answer: status, upstream_status, bytes_out, latencies (ms), upstream target.
    """

    __slots__ = (
        "_headers",
        "_plugin_state",
        "aborted",
        "body",
        "body_bytes",
        "bytes_out",
        "client_ip",
        "current_plugin",
        "exit_answer",
        "failure",
        "fallback_step",
        "host",
        "in_fallback",
        "latency_ms",
        "method",
        "no_timeout_retry",
        "original_path",
        "path",
        "primary_timeout",
        "query",
        "raw_path",
        "replayable",
        "request_id",
        "request_sent",
        "response_headers",
        "route_id",
        "route_name",
        "service_id",
        "service_name",
        "shared",
        "started_at",
        "status",
        "target",
        "tls",
        "upstream_headers",
        "upstream_latency_ms",
        "upstream_status",
        "raw_headers",
    )

    def __init__(self) -> None:
        self.shared: dict[str, Any] = {}
        self._plugin_state: dict[str, dict[str, Any]] = {}
        self.upstream_headers: list[tuple[str, str | None]] | None = None
        self.response_headers: list[tuple[str, str, str | None]] | None = None  # (op, name, value)
        self.exit_answer: tuple[int, bytes, list[tuple[str, str]]] | None = None
        self.fallback_step: Any = None
        self.status = 0
        self.upstream_status = 0
        self.bytes_out = 0
        self.latency_ms = 0.0
        self.upstream_latency_ms = 0.0
        self.target: str | None = None
        self.current_plugin = ""
        self.body: bytes | None = None
        # Set by the worker before the response phase: "connect" or "timeout" when the upstream gave no
        # answer (status is then 502/504), whether the request went out, whether its body can be sent again.
        self.failure: str | None = None
        self.request_sent = False
        self.replayable = True
        self.in_fallback = False      # the answer now comes from a fallback step
        self.aborted = False          # the answer broke off mid-stream (the client saw it truncated)
        # Set by plugins in access: bound the wait for the primary's answer head (seconds, 0 = the
        # service's read_timeout), and do not spend service retries on timeouts (go to the fallback).
        self.primary_timeout = 0.0
        self.no_timeout_retry = False
        self.tls = False
        self.body_bytes = 0  # request body bytes received so far
        self._headers: list[tuple[str, str]] | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []

    @property
    def plugin(self) -> dict[str, Any]:
        """State private to the plugin instance that is running now."""
        return self._plugin_state.setdefault(self.current_plugin, {})

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The request headers as received, decoded on first use (most plugins never look)."""
        if self._headers is None:
            self._headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]
        return self._headers

    @headers.setter
    def headers(self, value: list[tuple[str, str]]) -> None:
        self._headers = value

    def header(self, name: str) -> str | None:
        """The first request header with this name (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    # Requests to the upstream
    def set_upstream_header(self, name: str, value: str) -> None:
        if self.upstream_headers is None:
            self.upstream_headers = []
        self.upstream_headers.append((name, value))

    def clear_upstream_header(self, name: str) -> None:
        if self.upstream_headers is None:
            self.upstream_headers = []
        self.upstream_headers.append((name, None))

    # Answers
    def exit(self, status: int, body: bytes | str | dict | None = b"",
             headers: dict[str, str] | list[tuple[str, str]] | None = None) -> None:
        """Answer the request now (Kong's kong.response.exit). Raises Exit: nothing after it runs."""
        import orjson
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if isinstance(body, dict):
            payload = orjson.dumps(body)
            if not any(k.lower() == "content-type" for k, _ in pairs):
                pairs.append(("Content-Type", "application/json; charset=utf-8"))
        elif isinstance(body, str):
            payload = body.encode()
        else:
            payload = body or b""
        self.exit_answer = (status, payload, pairs)
        raise Exit()

    def fallback(self, step: Any) -> None:
        """Response phase: drop the upstream's answer and serve `step`'s instead."""
        self.fallback_step = step

    def set_response_header(self, name: str, value: str) -> None:
        self._response_op("set", name, value)

    def add_response_header(self, name: str, value: str) -> None:
        self._response_op("add", name, value)

    def clear_response_header(self, name: str) -> None:
        self._response_op("clear", name, None)

    def _response_op(self, op: str, name: str, value: str | None) -> None:
        if self.response_headers is None:
            self.response_headers = []
        self.response_headers.append((op, name, value))
