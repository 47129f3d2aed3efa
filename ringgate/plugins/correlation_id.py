"""Kong's `correlation-id` plugin: give each request an id in a header, sent upstream and optionally back.

A request that already carries a non-empty `header_name` keeps its value. Otherwise one is made
by the configured generator (Kong's):
  uuid          a random UUID per request
  uuid#counter  a UUID per worker process and a counter: "<uuid>#<n>" (cheap, unique per node)
  tracker       "<server addr>-<server port>-<worker pid>-<connection>-<requests on it>-<time>"
With `echo_downstream`, the id is also set on the answer to the client.
"""
from __future__ import annotations

import itertools
import os
import time
import uuid
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Strict

from ringgate.config.schema import Bool, Str, kong_error
from ringgate.plugins.base import Context, Plugin, PluginConfig

GENERATORS: tuple[str, ...] = ("uuid", "uuid#counter", "tracker")


def _generator(value: str) -> str:
    if value not in GENERATORS:
        raise kong_error(f"expected one of: {', '.join(GENERATORS)}")
    return value


class Config(PluginConfig):
    header_name: Str | None = "Kong-Request-ID"
    generator: Annotated[str, Strict(), AfterValidator(_generator)] = "uuid#counter"
    echo_downstream: Bool = False


class _WorkerIds:
    """Kong makes these in init_worker: one UUID per worker process and its request counter."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.uuid = str(uuid.uuid4())
        self.counter = itertools.count(1)
        self.pid = os.getpid()

    def next_counted(self) -> str:
        return f"{self.uuid}#{next(self.counter)}"


_WORKER = _WorkerIds()
# A forked worker must not repeat its parent's ids.
os.register_at_fork(after_in_child=_WORKER.reset)


def tracker_id(ctx: Context) -> str:
    """Kong's tracker: server address and port, worker pid, connection serial, its request count, time.
    The context fields that Ringgate does not fill read as "-"."""
    def field(name: str) -> str:
        value = getattr(ctx, name, None)
        return "-" if value is None else str(value)

    return (f"{field('server_addr')}-{field('server_port')}-{_WORKER.pid}-{field('connection_id')}-"
            f"{field('connection_requests')}-{time.time():.3f}")


class CorrelationIdPlugin(Plugin):
    NAME: ClassVar[str] = "correlation-id"
    PRIORITY: ClassVar[int] = 100001
    VERSION: ClassVar[str] = "3.9.0"
    Config: ClassVar[type[PluginConfig]] = Config

    def generate(self, ctx: Context) -> str:
        generator = self.config.generator  # type: ignore[attr-defined]
        if generator == "uuid":
            return str(uuid.uuid4())
        if generator == "uuid#counter":
            return _WORKER.next_counted()
        return tracker_id(ctx)

    def access(self, ctx: Context) -> None:
        conf: Config = self.config  # type: ignore[assignment]
        if conf.header_name is None:
            return
        correlation_id = ctx.header(conf.header_name)
        if not correlation_id:
            correlation_id = self.generate(ctx)
            ctx.set_upstream_header(conf.header_name, correlation_id)
        ctx.shared["correlation_id"] = correlation_id  # for logging plugins, as Kong's serializer has it
        if conf.echo_downstream:
            ctx.plugin["id"] = correlation_id

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        correlation_id = ctx.plugin.get("id")
        if correlation_id is not None:
            ctx.set_response_header(self.config.header_name, correlation_id)  # type: ignore[attr-defined]
