"""The master process: bind, map the arena, fork, supervise, stop.

The master never runs an event loop, so nothing loop-shaped crosses a fork. It waits
for signals with sigtimedwait: SIGCHLD (a child died: fold its counters, respawn with
back-off), SIGTERM/SIGINT (graceful stop), SIGHUP (reload the -c file).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ringgate.config import ConfigError, load_file
from ringgate.settings import PID_FILE
from ringgate.config.store import config_lock, load_snapshot, save_snapshot, snapshot_hash
from shared_state.arena import Arena
from shared_state.health import HealthTable
from workers.shm import NodeMemory, create_node_memory

if TYPE_CHECKING:
    from ringgate.config import Config
    from ringgate.settings import ListenAddress, ListenSpec, Settings
    from ringgate.tls import CertificateStore

log = logging.getLogger("ringgate.master")

HANDLED_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
READY_TIMEOUT = 30.0
# A child that dies sooner than this after starting counts as crashing: its restart waits longer.
CRASH_WINDOW = 5.0
MAX_BACKOFF = 30.0


class StartupError(Exception):
    pass


def bind(address: "ListenAddress", what: str, backlog: int = 4096, reuseport: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        # One socket shared by every worker already spreads connections; the flag lets another
        # process bind the same address too (a second node during an upgrade), as with nginx.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(f"cannot listen on {address} ({what}): {reason}") from None
    sock.setblocking(False)
    return sock


def bind_all(specs: "tuple[ListenSpec, ...]", what: str) -> "list[tuple[ListenSpec, socket.socket]]":
    """Bind every entry of a listen setting, or none: on a failure the ones already bound are closed."""
    bound: list[tuple[ListenSpec, socket.socket]] = []
    try:
        for spec in specs:
            backlog = spec.backlog if spec.backlog is not None else 4096
            bound.append((spec, bind(spec.address, what, backlog, spec.reuseport)))
    except StartupError:
        for _, sock in bound:
            sock.close()
        raise
    return bound


def listening_on(listeners: "list[tuple[ListenSpec, socket.socket]]") -> str:
    """The bound addresses as Kong writes them, with the real port when 0 was asked for."""
    return ", ".join(f"{spec.host}:{sock.getsockname()[1]}" + (" ssl" if spec.ssl else "") for spec, sock in listeners)


def certificates_for(settings: "Settings", config: "Config") -> "CertificateStore | None":
    """The TLS listeners' certificates, loaded before anything listens (nginx loads them in its master
    too: the workers inherit them); None when no listener serves TLS."""
    if not any(spec.ssl for spec in settings.proxy_listen):
        return None
    from ringgate.tls import node_store
    try:
        return node_store(config, settings.prefix)
    except ConfigError as exc:
        raise StartupError(f"cannot serve TLS: {exc}") from None


@dataclass
class Child:
    kind: str  # "worker" or "control"
    slot: int
    pid: int = 0
    started: float = 0.0
    crashes: int = 0
    respawn_at: float = 0.0


@dataclass
class Master:
    settings: "Settings"
    config: "Config"
    proxy_listeners: "list[tuple[ListenSpec, socket.socket]]"
    admin_sock: socket.socket
    arena: Arena
    health: HealthTable
    # Built from `config` before the fork; a child started after a reload builds its own.
    certificates: "CertificateStore | None" = None
    memory: "NodeMemory | None" = None  # shdict, answer cache, series (workers/shm.py)
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def spawn(self, child: Child, ready_fd: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                code = self._child_main(child, ready_fd)
            except BaseException:
                logging.getLogger("ringgate").exception("%s %d crashed", child.kind, child.slot)
            finally:
                os._exit(code)
        child.pid = pid
        child.started = time.monotonic()

    def _current_config(self) -> "Config":
        # Admin API writes publish a snapshot without telling the master: a child (re)started after
        # any reload begins with the snapshot, which is always the newest validated config.
        if self.arena.generation == 0:
            return self.config
        try:
            return load_snapshot(self.settings.prefix)
        except Exception:
            logging.getLogger("ringgate").exception("cannot read the config snapshot; starting with the last known")
            return self.config

    def _child_main(self, child: Child, ready_fd: int) -> int:
        config = self._current_config()
        if child.kind == "control":
            for _, sock in self.proxy_listeners:
                sock.close()
            from workers.control import run_control
            return run_control(self.settings, config, self.admin_sock, self.arena, ready_fd, health=self.health,
                               memory=self.memory)
        self.admin_sock.close()
        from workers.worker import run_worker
        certificates = self.certificates if config is self.config else None
        return run_worker(child.slot, self.settings, config, self.proxy_listeners, self.arena, ready_fd,
                          health=self.health, certificates=certificates, memory=self.memory)

    def start_all(self, announce: Callable[[], None]) -> None:
        read_fd, write_fd = os.pipe()
        workers = self.settings.worker_count
        self.children = [Child("worker", slot) for slot in range(workers)] + [Child("control", workers)]
        for child in self.children:
            self.spawn(child, write_fd)
        os.close(write_fd)
        deadline = time.monotonic() + READY_TIMEOUT
        ready = 0
        os.set_blocking(read_fd, False)
        while ready < len(self.children):
            if time.monotonic() > deadline:
                raise StartupError("workers did not become ready in time")
            try:
                chunk = os.read(read_fd, 64)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                ready += len(chunk)
                continue
            info = signal.sigtimedwait(HANDLED_SIGNALS, 0.05)
            if info is not None and info.si_signo == signal.SIGCHLD:
                self._reap(during_start=True)
            elif info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.stop()
                raise SystemExit(0)
        os.close(read_fd)
        if ready < len(self.children):
            raise StartupError("a worker exited during startup (see the log above)")
        announce()

    def supervise(self) -> int:
        while True:
            timeout = self._next_respawn_delay()
            info = signal.sigtimedwait(HANDLED_SIGNALS, timeout)
            if info is None:
                self._respawn_due()
                continue
            signo = info.si_signo
            if signo == signal.SIGCHLD:
                self._reap()
                self._respawn_due()
            elif signo in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s, stopping gracefully (drain timeout %.0fs)",
                         signal.Signals(signo).name, self.settings.drain_timeout)
                self.stop()
                return 0
            elif signo == signal.SIGHUP:
                self.reload()

    def reload(self) -> None:
        """Re-read the -c file; if it is valid, persist it and bump the generation every process watches."""
        path = self.settings.config_file
        if not path:
            log.warning("SIGHUP: the gateway was started without -c, there is no file to re-read")
            return
        try:
            config = load_file(path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        # The snapshot is the truth (Admin API writes change it too); the lock orders this
        # write against theirs. As in Kong, the -c file replaces whatever the Admin API did.
        with config_lock(self.settings.prefix):
            if config.config_hash == snapshot_hash(self.settings.prefix):
                log.info("reload: %s is unchanged (%s)", path, config.config_hash)
                return
            save_snapshot(self.settings.prefix, config)
            generation = self.arena.bump_generation()
        self.config = config  # children started from now on begin with it
        self.certificates = None  # and load its certificates themselves
        log.info("reloaded %s (%s), generation %d", path, config.config_hash, generation)

    def _next_respawn_delay(self) -> float:
        pending = [c.respawn_at for c in self.children if c.pid == 0]
        if not pending:
            return 1.0
        return max(0.01, min(pending) - time.monotonic())

    def _reap(self, during_start: bool = False) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self.children:
                if child.pid != pid:
                    continue
                child.pid = 0
                if child.kind == "worker":
                    self.arena.retire(child.slot)
                    if self.memory is not None:
                        self.memory.series.retire(child.slot)
                if self.stopping:
                    break
                lived = time.monotonic() - child.started
                child.crashes = child.crashes + 1 if lived < CRASH_WINDOW else 0
                delay = 0.0 if child.crashes == 0 else min(MAX_BACKOFF, 0.1 * 2 ** child.crashes)
                child.respawn_at = time.monotonic() + delay
                log.error("%s %d (pid %d) exited with %s; restarting in %.1fs", child.kind, child.slot, pid,
                          _describe(status), delay)
                break

    def _respawn_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for child in self.children:
            if child.pid == 0 and child.respawn_at <= now:
                read_fd, write_fd = os.pipe()
                self.spawn(child, write_fd)
                os.close(write_fd)
                os.close(read_fd)
                log.info("%s %d restarted as pid %d", child.kind, child.slot, child.pid)

    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.settings.drain_timeout + 2.0
        while any(c.pid for c in self.children) and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
            self._reap()
        for child in self.children:
            if child.pid:
                log.error("%s %d (pid %d) did not stop in time; killing it", child.kind, child.slot, child.pid)
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                child.pid = 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"code {os.WEXITSTATUS(status)}"


def run(settings: "Settings", config: "Config", config_label: str) -> int:
    """Run the gateway in the foreground until SIGTERM/SIGINT. Raises StartupError before listening on failure."""
    os.makedirs(settings.prefix, exist_ok=True)
    certificates = certificates_for(settings, config)
    proxy_listeners = bind_all(settings.proxy_listen, "proxy_listen")
    try:
        admin_sock = bind(settings.admin_listen, "admin_listen", backlog=128)
    except StartupError:
        for _, sock in proxy_listeners:
            sock.close()
        raise
    arena = Arena(settings.worker_count + 1)
    health = HealthTable(settings.health_capacity)
    memory = create_node_memory(settings)
    save_snapshot(settings.prefix, config)
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    master = Master(settings, config, proxy_listeners, admin_sock, arena, health, certificates=certificates,
                    memory=memory)
    pid_path = os.path.join(settings.prefix, PID_FILE)

    def announce() -> None:
        with open(pid_path + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(pid_path + ".tmp", pid_path)
        proxy = listening_on(proxy_listeners)
        admin = f"{settings.admin_listen.host}:{admin_sock.getsockname()[1]}"
        print(f"ringgate: ready, proxy on {proxy}, admin on {admin}, {settings.worker_count} workers, "
              f"pid {os.getpid()}, config {config_label} ({config.config_hash})", flush=True)

    try:
        master.start_all(announce)
        return master.supervise()
    except StartupError:
        master.stop()
        raise
    finally:
        try:
            os.unlink(pid_path)
        except OSError:
            pass
        for _, sock in proxy_listeners:
            sock.close()
        admin_sock.close()
        sys.stdout.flush()
