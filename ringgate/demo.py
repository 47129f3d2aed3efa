"""`ringgate demo`: the gateway in front of two built-in origin servers, to see it work in one command."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any

from ringgate.settings import Settings


def demo_config(ports: list[int]) -> dict[str, Any]:
    return {
        "_format_version": "3.0",
        "_comment": "ringgate demo: two local origins behind one upstream",
        "upstreams": [{
            "name": "demo-upstream",
            "algorithm": "round-robin",
            "targets": [{"target": f"127.0.0.1:{port}", "weight": 100} for port in ports],
        }],
        "services": [{
            "name": "demo",
            "url": "http://demo-upstream",
            "retries": 2,
            "connect_timeout": 2000,
            "read_timeout": 10000,
            "routes": [
                {"name": "demo", "paths": ["/demo"], "strip_path": True},
                {"name": "echo", "paths": ["/echo"], "strip_path": False},
                {"name": "sse", "paths": ["/sse"], "strip_path": False},
                {"name": "versioned", "paths": [r"~/v(?<version>\d+)/items"], "strip_path": False},
            ],
        }],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_origins(ports: list[int]) -> None:
    from ringgate.origin import OriginServer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    servers = [OriginServer(f"origin-{i + 1}", port=port).start() for i, port in enumerate(ports)]
    try:
        signal.sigwait({signal.SIGTERM})
    finally:
        for server in servers:
            server.stop()


def run_demo(settings: Settings) -> int:
    from ringgate.cli import cmd_start_config
    ports = [_free_port(), _free_port()]
    pid = os.fork()
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            _run_origins(ports)
        finally:
            os._exit(0)
    time.sleep(0.3)
    first = settings.proxy_listen[0]
    proxy = f"{'https' if first.ssl else 'http'}://127.0.0.1:{first.port}"
    # A TLS listener serves the self-signed default certificate (the demo config has none): -k.
    curl = "curl -k" if first.ssl else "curl"
    print("ringgate demo: origins on " + ", ".join(f"127.0.0.1:{p}" for p in ports) + "; try:", flush=True)
    tls = [spec for spec in settings.proxy_listen if spec.ssl and spec is not first]
    for line in (
        f"{curl} -i {proxy}/demo",
        *(f"curl -k -i https://127.0.0.1:{spec.port}/demo" for spec in tls[:1]),
        f"{curl} -i {proxy}/echo/hello?x=1",
        f"{curl} -N {proxy}/sse",
        f"{curl} -i {proxy}/v2/items",
        f"{curl} -i {proxy}/nowhere",
        f"curl -s http://{settings.admin_listen.host}:{settings.admin_listen.port}/status",
    ):
        print("  " + line, flush=True)
    try:
        return cmd_start_config(settings, demo_config(ports), "<demo>")
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        sys.stdout.flush()
