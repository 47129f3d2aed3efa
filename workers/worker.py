"""A proxy worker process: its uvloop loop, its tables, its pool, its share of the arena."""
from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvloop

from ringgate.config.store import load_snapshot
from shared_state import arena as arena_fields
from workers.child import prepare_child, report_ready
from shared_state.health import HealthTable
from workers.access_log import AccessLog
from workers.proxy import ClientProtocol, HealthSync, SeriesRecorder, UpstreamPool, reset_request_ids
from workers.resolver import Resolver
from ringgate.plugins.base import Node
from workers.runtime import Runtime, make_destination

if TYPE_CHECKING:
    from ringgate.config import Config
    from ringgate.settings import ListenSpec, Settings
    from ringgate.tls import CertificateStore, CurrentStore
    from shared_state.arena import Arena, WorkerStats
    from workers.shm import NodeMemory

log = logging.getLogger("ringgate.worker")

# How often a worker looks at the arena's config generation (a reload reaches it within this).
GENERATION_POLL = 0.1

def worker_node(slot: int, settings: "Settings", health: HealthTable | None,
                memory: "NodeMemory | None") -> Node:
    """What this worker's plugins may use: shared memory and a way to address fallback destinations."""
    node = Node(health=health, worker=slot, prefix=settings.prefix)
    if memory is not None:
        node.shdict = memory.shdict
        node.cache = memory.cache
    node.destination = lambda **kwargs: make_destination(node.runtime, **kwargs)
    return node


class Listener:
    """One proxy listening socket as its connections see it: the port routes and X-Forwarded-Port
    use, whether it serves TLS, and the upstream header lines that follow from it, built once."""

    __slots__ = ("port", "tls", "forwarded_port_line", "constant_upstream_headers")

    def __init__(self, port: int, tls: bool = False) -> None:
        self.port = port
        self.tls = tls
        self.forwarded_port_line = b"X-Forwarded-Port: %d\r\n" % port
        self.constant_upstream_headers = self.forwarded_port_line + b"Connection: keep-alive\r\n"

    def __repr__(self) -> str:
        return f"<Listener {self.port}{' ssl' if self.tls else ''}>"


class WorkerContext:
    """State shared by every connection of one worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: "Settings", runtime: Runtime,
                 stats: "WorkerStats", listeners: "list[Listener] | int", generation: int = 0,
                 health: HealthTable | None = None) -> None:
        self.loop = loop
        self.generation = generation
        self.settings = settings
        self.runtime = runtime
        self.stats = stats
        self.health_table = health if health is not None else HealthTable(1)
        self.series: SeriesRecorder | None = None  # set by run_worker when the node maps the series table
        self.access_log: AccessLog | None = (AccessLog(settings.access_log, loop)
                                             if settings.access_log not in ("", "off") else None)
        self.health = HealthSync(self.health_table, self)
        self.listeners: list[Listener] = [Listener(listeners)] if isinstance(listeners, int) else listeners
        # The first listener's values, for connections made without one (ClientProtocol(ctx)).
        first = self.listeners[0]
        self.listen_port = first.port
        self.listen_port_bytes = str(first.port).encode()
        self.forwarded_port_line = first.forwarded_port_line
        self.constant_upstream_headers = first.constant_upstream_headers
        # TLS listeners: the certificates their SNI callback reads (swapped on reload), and what they were built from.
        self.certificates: CurrentStore | None = None
        self.certificates_source: tuple[object, ...] = ()
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


def _tls_context(ctx: WorkerContext, config: "Config", certificates: "CertificateStore | None") -> ssl.SSLContext:
    """The TLS listeners' context: its SNI callback reads `ctx.certificates`, which reloads replace."""
    from ringgate.tls import CurrentStore, certificates_fingerprint, node_store, server_context
    ctx.certificates = CurrentStore(certificates if certificates is not None else node_store(config, ctx.settings.prefix))
    ctx.certificates_source = certificates_fingerprint(config)
    return server_context(ctx.certificates)


def _reload_certificates(ctx: WorkerContext, config: "Config") -> None:
    """New handshakes get the new certificates; connections already open keep theirs."""
    if ctx.certificates is None:  # no TLS listener: nothing to reload, and no `cryptography` to import
        return
    from ringgate.tls import certificates_fingerprint, node_store
    source = certificates_fingerprint(config)
    if source == ctx.certificates_source:
        return
    try:
        store = node_store(config, ctx.settings.prefix)
    except Exception:
        log.exception("could not load the certificates of the new config; the previous ones stay")
        return
    ctx.certificates.replace(store)
    ctx.certificates_source = source
    log.info("TLS certificates reloaded (%d configured)", len(store.certificates))


def run_worker(slot: int, settings: "Settings", config: "Config",
               listen: "list[tuple[ListenSpec, socket.socket]] | socket.socket", arena: "Arena",
               ready_fd: int, health: HealthTable | None = None,
               certificates: "CertificateStore | None" = None, memory: "NodeMemory | None" = None) -> int:
    """Serve until told to stop; returns the process exit status.

    `listen`: the proxy sockets the master bound, each with its listen entry (a bare socket is one
    plain listener). `certificates`: the store the master built for this config, if it did.
    """
    prepare_child()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stats = arena.worker_stats(slot)
    stats.set(arena_fields.PID, os.getpid())
    stats.set(arena_fields.STARTED_AT_MS, int(time.time() * 1000))
    sockets = [(None, listen)] if isinstance(listen, socket.socket) else listen
    listeners = [Listener(sock.getsockname()[1], spec is not None and spec.ssl) for spec, sock in sockets]
    node = worker_node(slot, settings, health, memory)
    ctx = WorkerContext(loop, settings, Runtime(config, health, node), stats, listeners, arena.generation, health)
    ctx.series = SeriesRecorder(memory.series, slot) if memory is not None else None
    tls_context = _tls_context(ctx, config, certificates) if any(lst.tls for lst in listeners) else None

    def protocol_factory(listener: Listener) -> Callable[[], ClientProtocol]:
        return lambda: ClientProtocol(ctx, listener)

    servers = []
    for (spec, sock), listener in zip(sockets, listeners):
        backlog = spec.backlog if spec is not None and spec.backlog is not None else 4096
        tls = tls_context if listener.tls else None
        servers.append(loop.run_until_complete(loop.create_server(
            protocol_factory(listener), sock=sock, backlog=backlog, ssl=tls,
            # nginx bounds the handshake by client_header_timeout (its ssl_handshake_timeout default, 60 s).
            ssl_handshake_timeout=settings.client_header_timeout if tls is not None else None,
        )))
    stopped = asyncio.Event()

    def begin_drain() -> None:
        if ctx.draining:
            return
        ctx.draining = True
        for server in servers:
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
                config = load_snapshot(settings.prefix)
                ctx.runtime = Runtime(config, ctx.health_table, node)
                log.info("config generation %d in service (%s)", generation, ctx.runtime.config_hash)
            except Exception:
                log.exception("could not load config generation %d; the previous tables stay", generation)
            else:
                _reload_certificates(ctx, config)
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
        if ctx.access_log is not None:
            ctx.access_log.close()
        loop.close()
    return 0

