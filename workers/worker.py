"""A proxy worker process: its uvloop loop, its tables, its pool, its share of the arena."""
from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import uvloop

from ringgate.config.store import load_snapshot
from shared_state import arena as arena_fields
from workers.child import prepare_child, report_ready
from shared_state.health import HealthTable
from workers.proxy import ClientProtocol, HealthSync, UpstreamPool, reset_request_ids
from workers.resolver import Resolver
from workers.runtime import Runtime

if TYPE_CHECKING:
    from ringgate.config import Config
    from ringgate.settings import Settings
    from shared_state.arena import Arena, WorkerStats

log = logging.getLogger("ringgate.worker")

# How often a worker looks at the arena's config generation (a reload reaches it within this).
GENERATION_POLL = 0.1

class WorkerContext:
    """State shared by every connection of one worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: "Settings", runtime: Runtime,
                 stats: "WorkerStats", listen_port: int, generation: int = 0,
                 health: HealthTable | None = None) -> None:
        self.loop = loop
        self.generation = generation
        self.settings = settings
        self.runtime = runtime
        self.stats = stats
        self.health_table = health if health is not None else HealthTable(1)
        self.health = HealthSync(self.health_table, self)
        self.listen_port = listen_port
        self.listen_port_bytes = str(listen_port).encode()
        # Upstream request headers that are the same for every request of this worker.
        self.forwarded_port_line = b"X-Forwarded-Port: " + self.listen_port_bytes + b"\r\n"
        self.constant_upstream_headers = self.forwarded_port_line + b"Connection: keep-alive\r\n"
        self.pool = UpstreamPool(loop, settings)
        self.resolver = Resolver(loop)
        self.connections: set[ClientProtocol] = set()
        self.draining = False
        reset_request_ids()
        self._trusted = settings.trusted_ips
        self._trust_cache: dict[str, bool] = {}

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        known = self._trust_cache.get(ip)
        if known is None:
            try:
                address = ipaddress.ip_address(ip)
                known = any(address in net for net in self._trusted)
            except ValueError:
                known = False
            if len(self._trust_cache) > 10000:
                self._trust_cache.clear()
            self._trust_cache[ip] = known
        return known


def run_worker(slot: int, settings: "Settings", config: "Config", listen: socket.socket, arena: "Arena",
               ready_fd: int, health: HealthTable | None = None) -> int:
    """Serve until told to stop; returns the process exit status."""
    prepare_child()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stats = arena.worker_stats(slot)
    stats.set(arena_fields.PID, os.getpid())
    stats.set(arena_fields.STARTED_AT_MS, int(time.time() * 1000))
    ctx = WorkerContext(loop, settings, Runtime(config, health), stats, listen.getsockname()[1], arena.generation,
                        health)
    server = loop.run_until_complete(
        loop.create_server(lambda: ClientProtocol(ctx), sock=listen, backlog=4096)
    )
    stopped = asyncio.Event()

    def begin_drain() -> None:
        if ctx.draining:
            return
        ctx.draining = True
        server.close()
        for conn in list(ctx.connections):
            conn.close_if_idle()
        deadline = loop.time() + settings.drain_timeout

        def check() -> None:
            if not ctx.connections or loop.time() >= deadline:
                for conn in list(ctx.connections):
                    conn.abort_connection()
                stopped.set()
                return
            loop.call_later(0.05, check)

        check()

    def watch_generation() -> None:
        # A reload is the arena's generation changing; requests already under way keep the tables
        # they started with (they hold references to them), new ones get the new tables.
        generation = arena.generation
        if generation != ctx.generation:
            ctx.generation = generation
            try:
                ctx.runtime = Runtime(load_snapshot(settings.prefix), ctx.health_table)
                log.info("config generation %d in service (%s)", generation, ctx.runtime.config_hash)
            except Exception:
                log.exception("could not load config generation %d; the previous tables stay", generation)
        loop.call_later(GENERATION_POLL, watch_generation)

    def heartbeat() -> None:
        stats.set(arena_fields.HEARTBEAT_MS, int(time.time() * 1000))
        loop.call_later(1.0, heartbeat)

    loop.add_signal_handler(signal.SIGTERM, begin_drain)
    heartbeat()
    watch_generation()
    # Everything built so far (config, tables, modules) lives as long as the worker: keep the cyclic
    # GC from rescanning it, so its pauses stay short on the request path.
    gc.collect()
    gc.freeze()
    report_ready(ready_fd, b"w")
    try:
        loop.run_until_complete(stopped.wait())
        ctx.pool.close_all()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    return 0

