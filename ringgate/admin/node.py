"""GET / (node information) and GET /status (counters and the running config's hash), Kong's shapes."""
from __future__ import annotations

import os
import socket

from ringgate import __version__
from ringgate.admin.api import AdminContext, Request, Response


def info(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
    settings = context.settings
    return Response(200, {
        "tagline": "Welcome to ringgate",
        "version": __version__,
        "node_id": context.node_id,
        "hostname": socket.gethostname(),
        "configuration": {
            "proxy_listen": [str(spec) for spec in settings.proxy_listen],
            "admin_listen": [str(settings.admin_listen)],
            "database": "off",
            "prefix": os.path.abspath(settings.prefix),
            "nginx_worker_processes": settings.worker_count,
        },
    })


def status(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
    snapshot = context.state.snapshot
    totals = context.arena.totals()
    return Response(200, {
        "server": {
            "connections_active": totals["connections_active"],
            "connections_accepted": totals["connections_accepted"],
            "total_requests": totals["requests"],
        },
        "configuration_hash": snapshot.config.config_hash,
        "configuration_generation": snapshot.generation,
        "memory": {"workers_lua_vms": []},
    })


def metrics(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
    """Prometheus text exposition: Kong's prometheus plugin metrics, `ringgate_` prefix."""
    from ringgate.metrics import CONTENT_TYPE, render
    if context.stats is None:
        return Response(503, {"message": "metrics are not available in this process"})
    return Response(200, render(context.stats.build()).encode(), content_type=CONTENT_TYPE)
