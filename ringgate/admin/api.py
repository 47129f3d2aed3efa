"""The contract between the admin listener and its handlers.

A handler is `handler(context, request, params) -> Response`: `params` holds the `{name}`
segments of its route's pattern (percent-decoded). It may raise `AdminError` for a Kong error
answer. It does no I/O on the socket: the control process encodes the Response.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from ringgate.admin.state import ConfigState
    from ringgate.settings import Settings

JSON_TYPE = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string, still percent-encoded
    query: dict[str, str] = field(default_factory=dict)  # first value of each argument
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def flag(self, name: str) -> bool:
        """A boolean query argument: ?x=1, ?x=true (Kong's check_hash=1, flatten_errors=1)."""
        return self.query.get(name, "").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any = None  # a JSON value, raw bytes (sent with content_type), or None for no body
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class AdminContext:
    """What handlers may use: node settings, the config state, the shared arena, identity."""

    settings: Settings
    state: ConfigState
    arena: Any  # shared_state.arena.Arena (totals, worker stats, generation)
    node_id: str
    started: float = field(default_factory=time.time)
    clock: Callable[[], float] = time.time
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    health: Any = None  # shared_state.health.HealthTable: node-wide target health
    stats: Any = None   # ringgate.stats.StatsSource: the stats document (/metrics, the stats socket)

    def now(self) -> int:
        return int(self.clock())


Handler = Callable[[AdminContext, Request, dict[str, str]], Response]


@dataclass(frozen=True, slots=True)
class Route:
    """A path pattern ("/services/{service}/routes") and its handler per method."""

    pattern: str
    handlers: dict[str, Handler]
    segments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", _split(self.pattern))

    def match(self, segments: tuple[str, ...]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for wanted, given in zip(self.segments, segments):
            if wanted.startswith("{") and wanted.endswith("}"):
                if not given:
                    return None
                params[wanted[1:-1]] = given
            elif wanted != given:
                return None
        return params


def route(pattern: str, **handlers: Handler) -> Route:
    """`route("/metrics", GET=metrics.render)`: one line of the route table."""
    return Route(pattern, {method.upper(): handler for method, handler in handlers.items()})


def _split(path: str) -> tuple[str, ...]:
    stripped = path.strip("/")
    return tuple(stripped.split("/")) if stripped else ()


def split_path(path: str) -> tuple[str, ...]:
    """A request path's segments, each percent-decoded after splitting (so %2F stays inside one)."""
    return tuple(unquote(segment) for segment in _split(path))
