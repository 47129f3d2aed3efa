#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: the precise cost of a feature on this path.

Wall-clock numbers on a shared 2-core VM move by 20% between runs; instruction counts do not. For each
configuration this starts an nginx origin on loopback, runs one Ringgate worker under
`valgrind --tool=callgrind`, sends N keep-alive requests, and does it again with 3N: the difference of
the two program totals over 2N requests removes start-up and warm-up.

    python3 loadtest/icount.py [--requests 1000] [--configs plain,health,fallback]

Needs valgrind and nginx (apt-get install valgrind nginx). Loopback only; stops what it starts, by PID.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BODY = "0123456789" * 10

CONFIGS: dict[str, dict] = {
    "plain": {},
    "health": {"healthchecks": {"passive": {"unhealthy": {"http_failures": 5, "tcp_failures": 5, "timeouts": 5}}}},
    "fallback": {},
}

HARNESS = """
import os, sys
sys.path.insert(0, {root!r}); os.chdir({root!r})
from ringgate.config import load_file
from ringgate.plugins.registry import enable_list
from ringgate.settings import Settings, parse_listen_list
from shared_state.arena import Arena
from shared_state.health import HealthTable
from workers.master import bind_all
from workers.shm import create_node_memory
from workers.worker import run_worker
enable_list("bundled")
settings = Settings(proxy_listen=parse_listen_list("127.0.0.1:{port}", "x"), workers=1, prefix={prefix!r})
listeners = bind_all(settings.proxy_listen, "proxy")
r, w = os.pipe()
run_worker(0, settings, load_file({config!r}), listeners, Arena(2), w, health=HealthTable(64),
           memory=create_node_memory(settings))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kong_yml(name: str, origin_port: int) -> dict:
    document: dict = {
        "_format_version": "3.0",
        "upstreams": [{"name": "origin", "targets": [{"target": f"127.0.0.1:{origin_port}"}], **CONFIGS[name]}],
        "services": [{"name": "origin", "host": "origin", "routes": [{"name": "r", "paths": ["/"]}]}],
    }
    if name == "fallback":
        document["plugins"] = [{"name": "status-based-fallback", "route": "r",
                                "config": {"backup_host": "127.0.0.1", "backup_port": origin_port}}]
    return document


def program_total(path: Path) -> int:
    out = subprocess.run(["callgrind_annotate", str(path)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "PROGRAM TOTALS" in line:
            return int(line.split()[0].replace(",", ""))
    raise RuntimeError(f"no total in {path}")


def count(workdir: Path, config: Path, requests: int) -> int:
    port = free_port()
    harness = workdir / "harness.py"
    harness.write_text(HARNESS.format(root=str(REPO_ROOT), port=port, prefix=str(workdir / "prefix"),
                                      config=str(config)))
    out = workdir / f"callgrind.{requests}.out"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                             str(harness)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the worker under callgrind did not start") from None
                time.sleep(0.2)
        request = b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n"
        with sock:
            for _ in range(requests):
                sock.sendall(request)
                data = b""
                while not data.endswith(BODY[-4:].encode()):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError("the worker closed the connection")
                    data += chunk
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return program_total(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--configs", default="plain,health,fallback")
    args = parser.parse_args()
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="ringgate-icount-") as tmp:
        workdir = Path(tmp)
        origin_port = free_port()
        conf = workdir / "origin.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {workdir}/nginx.pid; error_log {workdir}/error.log;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; keepalive_requests 100000; server {{ listen 127.0.0.1:{origin_port}; "
            f'location / {{ return 200 "{BODY}"; }} }} }}\n')
        origin = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)])
        try:
            time.sleep(0.5)
            per_request: dict[str, float] = {}
            for name in names:
                config = workdir / f"{name}.yml"
                config.write_text(yaml.safe_dump(kong_yml(name, origin_port)))
                low = count(workdir, config, args.requests)
                high = count(workdir, config, 3 * args.requests)
                per_request[name] = (high - low) / (2 * args.requests)
                print(f"{name}: {per_request[name] / 1000:.1f}k instructions per request", flush=True)
        finally:
            origin.send_signal(signal.SIGQUIT)
            origin.wait(10)
    base = per_request.get("plain")
    print("\n| configuration | instructions per request | over plain |\n|---|---:|---:|")
    for name, value in per_request.items():
        over = f"{value / base - 1:+.1%}" if base else "n/a"
        print(f"| {name} | {value / 1000:.1f}k | {over} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
