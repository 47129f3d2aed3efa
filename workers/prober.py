"""Active health checks (Kong's `healthchecks.active`): one prober per node, in the control process.

Kong runs its active checks in one worker per node; here they run in the control process's
loop, never on a proxy worker's request path. Every result goes into the node-wide health
table (shared_state.health), so all workers see a transition at once, and the state lives
there keyed by target identity: a reload keeps it.

Which targets are probed, and when (Kong's rules):
- only targets of upstreams with an active interval > 0 (health_policy(...).active);
- never weight-0 targets;
- a target in the balancer (HEALTHY) every `healthy.interval`, one out of it (UNHEALTHY,
  EJECTED, TRIAL) every `unhealthy.interval`; 0 means "not probed in that state";
- the first probe comes one interval after the target's loop starts (Kong's start());
- at most `concurrency` probes in flight per upstream.

One probe: connect (tcp stops here: success), TLS handshake for https, `GET <http_path>`,
read the status line. Every socket step gets `timeout` seconds, as Kong's sock:settimeout.
Verdicts, as lua-resty-healthcheck's run_single_check:
- status in healthy.http_statuses -> success (checked first);
- status in unhealthy.http_statuses, or a line that is not `HTTP/x.y NNN` -> http failure;
- any other status -> ignored, no counter changes;
- a timeout on connect, send or receive -> timeout;
- any other socket error, the peer closing before a status line, or a failed TLS
  handshake (a handshake timeout included, as Kong) -> tcp failure.

Each target has its own loop (a task). The loops sleep until their next probe is due; one
watcher task looks at the table's change counter and wakes a loop whose target changed
state (passive checks, the Admin API, another process), since its interval changes with it.
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any

from ringgate import __version__
from shared_state.health import HTTP_FAILURE, SUCCESS, TCP_FAILURE, TIMEOUT, HealthPolicy, HealthTable
from shared_state.health_rules import Event, State
from workers.resolver import NameResolutionError, Resolver
from workers.runtime import health_policy, host_header_value

if TYPE_CHECKING:
    from ringgate.config import Config
    from ringgate.settings import Settings

log = logging.getLogger("ringgate.prober")

PROBE_TYPES = ("http", "https", "tcp")
USER_AGENT = f"ringgate/{__version__}"
# How often the watcher looks at the table's change counter (one atomic load).
STATE_POLL_SECONDS = 0.05
# A status line or response head longer than this is cut here; only its start matters.
MAX_HEAD_BYTES = 65536
# timeout 0: nginx's lua_socket_*_timeout default applies in Kong (60 s).
DEFAULT_SOCKET_TIMEOUT = 60.0
# The pattern Kong matches the status line with (case-insensitive, anchored at the start).
_STATUS_LINE = re.compile(rb"HTTP/\d+\.\d+\s+(\d+)", re.IGNORECASE)
# Headers the probe always sends itself; a configured one of these is dropped (Host and
# User-Agent may be replaced, see _request_head).
_OWN_HEADERS = frozenset(("connection",))

_COUNTER_NAMES = {
    SUCCESS: ("success", "successes"),
    HTTP_FAILURE: ("http failure", "http failures"),
    TCP_FAILURE: ("tcp failure", "tcp failures"),
    TIMEOUT: ("timeout", "timeouts"),
}
_EVENT_STATES = {Event.SUCCESSES_REACHED: State.HEALTHY, Event.FAILURES_REACHED: State.UNHEALTHY}


class ProbeSpec:
    """How one upstream's targets are probed, built once per config generation (reused while unchanged)."""

    __slots__ = (
        "headers",
        "healthy_interval",
        "healthy_statuses",
        "host_header",
        "kind",
        "path",
        "policy",
        "slots",
        "sni",
        "source",
        "ssl_context",
        "timeout",
        "unhealthy_interval",
        "unhealthy_statuses",
        "upstream",
    )

    def __init__(self, upstream: Any, policy: HealthPolicy) -> None:
        checks = upstream.healthchecks
        active = checks.active
        self.upstream: str = upstream.name
        # What the spec was built from: an equal source on reload means nothing to change.
        self.source: tuple[Any, str | None] = (checks, upstream.host_header)
        self.kind: str = active.type
        self.timeout: float = active.timeout or DEFAULT_SOCKET_TIMEOUT
        self.path: str = active.http_path
        self.healthy_interval: float = active.healthy.interval
        self.unhealthy_interval: float = active.unhealthy.interval
        self.healthy_statuses: frozenset[int] = frozenset(active.healthy.http_statuses)
        self.unhealthy_statuses: frozenset[int] = frozenset(active.unhealthy.http_statuses)
        self.host_header: str | None = upstream.host_header
        self.sni: str | None = active.https_sni
        self.headers: tuple[tuple[str, str], ...] = _configured_headers(upstream.name, active.headers)
        self.ssl_context: ssl.SSLContext | None = (
            _probe_tls(active.https_verify_certificate) if self.kind == "https" else None)
        self.policy = policy
        self.slots = asyncio.Semaphore(active.concurrency)

    def interval_for(self, state: int) -> float:
        return self.healthy_interval if state == State.HEALTHY else self.unhealthy_interval

    def host_for(self, host: str, port: int) -> str:
        """The Host header: the upstream's host_header, else the target (with :port unless default)."""
        return self.host_header or host_header_value(host, port, "https" if self.kind == "https" else "http")

    def verdict(self, status: int) -> int | None:
        """Kong's report_http_status: the healthy list first; 0 is an unparseable answer."""
        if status in self.healthy_statuses:
            return SUCCESS
        if status in self.unhealthy_statuses or status == 0:
            return HTTP_FAILURE
        return None


def _configured_headers(upstream: str, headers: dict[str, tuple[str, ...]] | None) -> tuple[tuple[str, str], ...]:
    """Kong's map name -> list of values, one header line per value."""
    lines: list[tuple[str, str]] = []
    for name, values in (headers or {}).items():
        if name.lower() in _OWN_HEADERS:
            log.warning("upstream %s: active check header %s is ignored (probes always close the connection)",
                        upstream, name)
            continue
        for value in values:
            if any(c in value for c in "\r\n\0"):
                log.warning("upstream %s: active check header %s has a value with a line break; not sent",
                            upstream, name)
                continue
            lines.append((name, value))
    return tuple(lines)


def _probe_tls(verify: bool) -> ssl.SSLContext:
    if verify:
        # The system's trust store (OpenSSL honours SSL_CERT_FILE / SSL_CERT_DIR), as the proxy's tls_verify.
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _name_of(host_header: str) -> str:
    """The host name of a Host header value (port and IPv6 brackets removed), for SNI."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    name, sep, port = host_header.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host_header


def _request_head(spec: ProbeSpec, host_header: str) -> bytes:
    configured = {name.lower() for name, _ in spec.headers}
    lines = [f"GET {spec.path} HTTP/1.1"]
    if "host" not in configured:
        lines.append(f"Host: {host_header}")
    if "user-agent" not in configured:
        lines.append(f"User-Agent: {USER_AGENT}")
    lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in spec.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def probe(spec: ProbeSpec, address: str, port: int, request: bytes, sni: str) -> tuple[int | None, str]:
    """One active check of `address:port`: (outcome or None when the status is ignored, what happened)."""
    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (a reload or close).
    timeout = spec.timeout
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_HEAD_BYTES)
    except TimeoutError:  # before OSError: TimeoutError is one
        return TIMEOUT, "connect timed out"
    except OSError as exc:
        return TCP_FAILURE, f"connect failed: {exc.strerror or exc}"
    try:
        if spec.kind == "tcp":
            return SUCCESS, "connected"
        if spec.ssl_context is not None:
            try:
                async with asyncio.timeout(timeout):
                    await writer.start_tls(spec.ssl_context, server_hostname=sni, ssl_handshake_timeout=timeout)
            except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors: Kong counts both as tcp failures
                return TCP_FAILURE, f"TLS handshake failed: {str(exc) or 'timeout'}"
        try:
            async with asyncio.timeout(timeout):
                writer.write(request)
                await writer.drain()
        except TimeoutError:
            return TIMEOUT, "send timed out"
        except OSError as exc:
            return TCP_FAILURE, f"send failed: {exc.strerror or exc}"
        try:
            async with asyncio.timeout(timeout):
                line = await _status_line(reader)
        except TimeoutError:
            return TIMEOUT, "no status line in time"
        except asyncio.IncompleteReadError:
            return TCP_FAILURE, "closed before a status line"
        except OSError as exc:
            return TCP_FAILURE, f"receive failed: {exc.strerror or exc}"
        match = _STATUS_LINE.match(line)
        status = int(match.group(1)) if match else 0
        await _discard_head(reader, timeout)
        what = f"HTTP {status}" if match else f"bad status line {line[:80]!r}"
        return spec.verdict(status), what
    finally:
        writer.close()


async def _status_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        # A very long first line: its start decides, as the pattern is anchored there.
        return await reader.read(MAX_HEAD_BYTES)


async def _discard_head(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read the rest of the head so the peer is not reset mid-head; the verdict is already known."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    return
    except (TimeoutError, OSError, ValueError):
        return


class TargetProbe:
    """The probe loop of one target identity (upstream, host, port)."""

    def __init__(self, prober: ActiveProber, spec: ProbeSpec, host: str, port: int, slot: int) -> None:
        self.prober = prober
        self.spec = spec
        self.host = host
        self.port = port
        self.slot = slot
        self.wake = asyncio.Event()
        self.seen_state: int = prober.table.state(slot)
        self.probes = 0
        self._last_error = ""
        self.task: asyncio.Task[None] = prober.loop.create_task(self._run(), name=f"probe {spec.upstream} "
                                                                                  f"{host}:{port}")

    def retarget(self, spec: ProbeSpec) -> None:
        """A reload changed the upstream's checks: the next wait uses the new intervals."""
        self.spec = spec
        self.wake.set()

    def stop(self) -> None:
        self.task.cancel()

    async def _run(self) -> None:
        loop = self.prober.loop
        table = self.prober.table
        last_start = loop.time()  # Kong: the first probe comes one interval after the start
        while True:
            self.wake.clear()  # before reading the state: a change after this read wakes the wait below
            state = table.state(self.slot)
            self.seen_state = state
            interval = self.spec.interval_for(state)
            delay: float | None = None
            if interval > 0:
                delay = last_start + interval - loop.time()
                if delay <= 0:
                    last_start = loop.time()  # intervals run start to start, as Kong's timer
                    await self._probe_once()
                    continue
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _probe_once(self) -> None:
        spec = self.spec
        async with spec.slots:
            try:
                async with asyncio.timeout(spec.timeout):
                    address = await self.prober.resolver.resolve(self.host)
            except (NameResolutionError, TimeoutError) as exc:
                # Kong does not probe a target without addresses (DNS_ERROR); nothing is counted.
                self._note_error(f"name resolution failed: {str(exc) or 'timeout'}")
                return
            host_header = spec.host_for(self.host, self.port)
            sni = spec.sni or _name_of(host_header)
            outcome, what = await probe(spec, address, self.port, _request_head(spec, host_header), sni)
        self.probes += 1
        if outcome is None:
            log.debug("upstream %s: target %s:%d: %s, not a listed status: ignored", spec.upstream,
                      self.host, self.port, what)
            return
        if outcome == SUCCESS:
            self._last_error = ""
        else:
            self._note_error(what, level=logging.DEBUG)
        event = self.prober.table.report_outcome(self.slot, outcome, True, spec.policy)
        if event >= 0:
            self._log_transition(event, outcome, what)

    def _log_transition(self, event: int, outcome: int, what: str) -> None:
        """Logged once: only the process that won the compare-and-swap gets an event back."""
        spec = self.spec
        threshold = spec.policy.threshold(True, outcome)
        singular, plural = _COUNTER_NAMES[outcome]
        counted = f"{threshold} {singular if threshold == 1 else plural}"
        state = _EVENT_STATES.get(Event(event), State(self.prober.table.state(self.slot))).name
        if outcome == SUCCESS:
            log.warning("upstream %s: target %s:%d is now %s (active checks: %s)", spec.upstream, self.host,
                        self.port, state, counted)
        else:
            log.warning("upstream %s: target %s:%d is now %s (active checks: %s, last: %s)", spec.upstream,
                        self.host, self.port, state, counted, what)

    def _note_error(self, what: str, level: int = logging.WARNING) -> None:
        # Each distinct problem is logged once at `level` until it changes, not on every probe.
        if what != self._last_error:
            self._last_error = what
            log.log(level, "upstream %s: target %s:%d: active check: %s", self.spec.upstream, self.host,
                    self.port, what)


class ActiveProber:
    """All active checks of the node. Runs in the control process's loop; apply_config after each reload."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: HealthTable, settings: Settings | None = None) -> None:
        self.loop = loop
        self.table = table
        # Node settings; the prober has no knob of its own yet (the trust store is the system's).
        self.settings = settings
        self.resolver = Resolver(loop)
        self.specs: dict[str, ProbeSpec] = {}
        self.targets: dict[tuple[str, str, int], TargetProbe] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._seen_changes = table.changes
        self._closed = False

    def apply_config(self, config: Config) -> None:
        """Start, stop and adjust the probe loops for a config generation (call it in the loop's thread)."""
        if self._closed:
            raise RuntimeError("the active prober is closed")
        specs: dict[str, ProbeSpec] = {}
        wanted: dict[tuple[str, str, int], tuple[ProbeSpec, int]] = {}
        for upstream in config.upstreams:
            spec = self._spec_for(upstream)
            if spec is None:
                continue
            specs[upstream.name] = spec
            for target in upstream.targets:
                if target.weight == 0:
                    continue  # Kong: a weight-0 target is not health-checked
                slot = self.table.slot_for(upstream.name, target.host, target.port)
                if slot < 0:
                    log.error("upstream %s: the health table is full, target %s:%d is not actively checked "
                              "(raise --health-capacity)", upstream.name, target.host, target.port)
                    continue
                wanted[(upstream.name, target.host, target.port)] = (spec, slot)
        for key in [key for key in self.targets if key not in wanted]:
            self.targets.pop(key).stop()
        for key, (spec, slot) in wanted.items():
            running = self.targets.get(key)
            if running is None:
                self.targets[key] = TargetProbe(self, spec, key[1], key[2], slot)
            elif running.spec is not spec:
                running.retarget(spec)
        self.specs = specs
        if self.targets and self._watcher is None:
            self._watcher = self.loop.create_task(self._watch(), name="probe state watcher")
        log.info("active health checks: %d target(s) in %d upstream(s)", len(self.targets), len(specs))

    def _spec_for(self, upstream: Any) -> ProbeSpec | None:
        checks = upstream.healthchecks
        policy = health_policy(checks)
        if policy is None or not policy.active:
            return None
        if checks.active.type not in PROBE_TYPES:
            log.warning("upstream %s: active checks of type %s are not supported (Ringgate probes over "
                        "HTTP/1.1: use http, https or tcp); its targets are not actively checked",
                        upstream.name, checks.active.type)
            return None
        previous = self.specs.get(upstream.name)
        if previous is not None and previous.source == (checks, upstream.host_header):
            return previous  # unchanged: keep its concurrency slots and TLS context
        return ProbeSpec(upstream, policy)

    async def _watch(self) -> None:
        """Wake the loop of every target whose state changed, so it switches to the other interval."""
        table = self.table
        while True:
            await asyncio.sleep(STATE_POLL_SECONDS)
            changes = table.changes
            if changes == self._seen_changes:
                continue
            self._seen_changes = changes
            for target in self.targets.values():
                if table.state(target.slot) != target.seen_state:
                    target.wake.set()

    async def close(self) -> None:
        """Stop every probe (in-flight connections are closed) and the watcher."""
        self._closed = True
        tasks = [target.task for target in self.targets.values()]
        if self._watcher is not None:
            tasks.append(self._watcher)
        self.targets.clear()
        self._watcher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
