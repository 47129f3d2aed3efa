"""The Admin API: the route table and the dispatch of one request to one handler.

Adding an endpoint is one line in `ROUTES` (`route("/metrics", GET=metrics.render)`), with the
handler in its own module. Dispatch order: OPTIONS preflight, token, route, method, handler.
A handler's AdminError becomes Kong's error answer; any other exception is logged with its
traceback and answered 500, so a bug never takes the control process down.
"""
from __future__ import annotations

import hmac
import logging

from ringgate.admin import crud, declarative, health, node
from ringgate.admin.api import AdminContext, Request, Response, Route, route, split_path
from ringgate.admin.errors import AdminError, method_not_allowed, not_found, unauthorized

log = logging.getLogger("ringgate.admin")

_PREFLIGHT_HEADERS = "Content-Type, Authorization, Kong-Admin-Token"

ROUTES: list[Route] = [
    route("/", GET=node.info),
    route("/status", GET=node.status),
    route("/metrics", GET=node.metrics),
    route("/config", GET=declarative.export, POST=declarative.replace),
    route("/upstreams/{upstream}/health", GET=health.get_health),
    route("/upstreams/{upstream}/targets/{target}/healthy", PUT=health.put_healthy),
    route("/upstreams/{upstream}/targets/{target}/unhealthy", PUT=health.put_unhealthy),
    route("/upstreams/{upstream}/targets/{target}/{address}/healthy", PUT=health.put_healthy),
    route("/upstreams/{upstream}/targets/{target}/{address}/unhealthy", PUT=health.put_unhealthy),
    *crud.routes(),
]


class AdminApp:
    def __init__(self, context: AdminContext, routes: list[Route] | None = None) -> None:
        self.context = context
        self.routes = ROUTES if routes is None else routes
        token = context.settings.admin_token
        self._token = token.encode() if token else None

    def __call__(self, request: Request) -> Response:
        try:
            return self._dispatch(request)
        except AdminError as exc:
            return Response(exc.status, exc.body)
        except Exception:
            log.exception("admin: %s %s failed", request.method, request.path)
            return Response(500, {"message": "An unexpected error occurred"})

    def _dispatch(self, request: Request) -> Response:
        segments = split_path(request.path)
        matched = next(((entry, params) for entry in self.routes
                        if (params := entry.match(segments)) is not None), None)
        if request.method == "OPTIONS" and matched is not None:
            # CORS preflight carries no credentials; it reveals only which methods exist.
            allowed = ", ".join(sorted({*matched[0].handlers, "OPTIONS"}))
            return Response(204, headers=(("Allow", allowed), ("Access-Control-Allow-Methods", allowed),
                                          ("Access-Control-Allow-Headers", _PREFLIGHT_HEADERS)))
        if not self._authorized(request):
            raise unauthorized()
        if matched is None:
            raise not_found()
        entry, params = matched
        method = "GET" if request.method == "HEAD" else request.method
        handler = entry.handlers.get(method)
        if handler is None:
            raise method_not_allowed()
        return handler(self.context, request, params)

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        given = request.header("kong-admin-token")
        if given is None:
            scheme, _, credentials = (request.header("authorization") or "").partition(" ")
            given = credentials.strip() if scheme.lower() == "bearer" else None
        # Constant time: how much of a guess was right must not show in the answer time.
        return given is not None and hmac.compare_digest(given.encode(), self._token)
