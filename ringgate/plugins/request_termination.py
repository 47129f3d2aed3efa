"""Kong's `request-termination` plugin: answer every request of its scope with a fixed response.

Shapes are Kong's (handler.lua): `{"message": ...}` JSON by default (the status's default message
when none is configured, no body for a status without one), the raw `body` with its
`content_type`, or, with `echo`, a JSON copy of the request. With `trigger`, only requests that
carry a header or a query argument of that name are terminated.
"""
from __future__ import annotations

import os
import socket
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qs

import orjson
from pydantic import AfterValidator, Strict, model_validator

from ringgate.config.schema import Bool, HeaderName, Str, kong_error
from ringgate.plugins.base import Context, Plugin, PluginConfig
from ringgate.plugins.proxy_cache import query_args, request_headers

DEFAULT_RESPONSE: dict[int, str] = {
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    500: "An unexpected error occurred",
    502: "Bad Gateway",
    503: "Service unavailable",
}
# Kong documents this as the content type of a `body` given without one.
DEFAULT_BODY_TYPE = "application/json; charset=utf-8"


def _status_code(value: int) -> int:
    if not 100 <= value <= 599:
        raise kong_error("value should be between 100 and 599")
    return value


def _present(value: str | None) -> bool:
    return value is not None and len(value) > 0


class Config(PluginConfig):
    status_code: Annotated[int, Strict(), AfterValidator(_status_code)] = 503
    message: Str | None = None
    content_type: Str | None = None
    body: Str | None = None
    echo: Bool = False
    trigger: HeaderName | None = None

    @model_validator(mode="after")
    def _kong_checks(self) -> Config:
        if _present(self.message) and (_present(self.content_type) or _present(self.body)):
            raise kong_error("message cannot be used with content_type or body")
        if _present(self.content_type) and not _present(self.body):
            raise kong_error("content_type requires a body")
        if self.echo and (_present(self.content_type) or _present(self.body)):
            raise kong_error("echo cannot be used with content_type and body")
        return self


def _parsed_body(ctx: Context) -> Any:
    """kong.request.get_body() for the types it knows: JSON and form; None otherwise."""
    if ctx.body is None:
        return None
    content_type = (ctx.header("content-type") or "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            return orjson.loads(ctx.body)
        if content_type == "application/x-www-form-urlencoded":
            return {k: v[0] if len(v) == 1 else v
                    for k, v in parse_qs(ctx.body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    except (orjson.JSONDecodeError, ValueError):
        return None
    return None


def _without_none(value: dict[str, Any]) -> dict[str, Any]:
    """Lua tables have no nil members: drop them, as cjson's output would not show them."""
    return {k: (_without_none(v) if isinstance(v, dict) else v) for k, v in value.items() if v is not None}


class RequestTerminationPlugin(Plugin):
    NAME: ClassVar[str] = "request-termination"
    PRIORITY: ClassVar[int] = 2
    VERSION: ClassVar[str] = "3.9.0"
    Config: ClassVar[type[PluginConfig]] = Config

    def access(self, ctx: Context) -> None:
        conf: Config = self.config  # type: ignore[assignment]
        status = conf.status_code
        if conf.trigger is not None and ctx.header(conf.trigger) is None \
                and conf.trigger not in query_args(ctx.query):
            return  # a trigger is set and this request does not carry it
        if conf.echo:
            ctx.exit(status, self.echo(ctx, conf.message if conf.message is not None else DEFAULT_RESPONSE.get(status)))
        if conf.body is not None:
            ctx.exit(status, conf.body, [("Content-Type", conf.content_type or DEFAULT_BODY_TYPE)])
        message = conf.message if conf.message is not None else DEFAULT_RESPONSE.get(status)
        ctx.exit(status, {"message": message} if message is not None else None)

    def echo(self, ctx: Context, message: str | None) -> dict[str, Any]:
        """The request as Kong's echo shows it (the parts Ringgate knows)."""
        host = ctx.host or ""
        name, sep, port = host.rpartition(":")
        if not (sep and port.isdigit()) or name.endswith(":"):
            name, port = host, ""
        raw_body = ctx.body.decode("utf-8", "replace") if ctx.body is not None else None
        return _without_none({
            "message": message,
            "kong": {
                "node_id": getattr(self.node, "node_id", None),
                "worker_pid": os.getpid(),
                "hostname": socket.gethostname(),
            },
            "request": {
                "scheme": "https" if getattr(ctx, "tls", False) else "http",
                "host": name.strip("[]").lower(),
                "port": int(port) if port else getattr(ctx, "server_port", None),
                "headers": request_headers(ctx.headers),
                "query": query_args(ctx.query),
                "body": _parsed_body(ctx),
                "raw_body": raw_body,
                "method": ctx.method,
                "path": ctx.path,
            },
            "matched_route": {"id": ctx.route_id, "name": ctx.route_name} if ctx.route_id else None,
            "matched_service": {"id": ctx.service_id, "name": ctx.service_name} if ctx.service_id else None,
        })
