"""Active health checks: the prober in a real uvloop loop, real servers on loopback, a real health table."""
from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
import uvloop

from ringgate.config import Config, load_dict
from ringgate.origin import OriginServer
from shared_state.health import HealthTable
from shared_state.health_rules import Event, State
from workers.prober import USER_AGENT, ActiveProber
from workers.runtime import health_policy

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        try:
            await asyncio.wait_for(body(), 8.0)
        finally:
            for origin in RawOrigin.running:
                origin.close()
            RawOrigin.running.clear()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bounded())


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def upstream(name: str, targets: list[str | dict[str, Any]], active: dict[str, Any],
             **extra: Any) -> dict[str, Any]:
    checks = {"active": {"timeout": 0.5, **active}, **extra.pop("checks", {})}
    return {"name": name, "healthchecks": checks, **extra,
            "targets": [t if isinstance(t, dict) else {"target": t} for t in targets]}


def config(*upstreams: dict[str, Any]) -> Config:
    return load_dict({"_format_version": "3.0", "upstreams": list(upstreams)})


def state(table: HealthTable, slot: int) -> State:
    return table.read(slot)["state"]


def force(table: HealthTable, cfg: Config, name: str, slot: int, event: Event) -> None:
    policy = health_policy(cfg.upstream_by_name(name).healthchecks)  # type: ignore[union-attr]
    assert table.transition(slot, event, policy)


def transitions(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ringgate.prober" and text in r.getMessage()]


class Gauge:
    """Connections open at an origin right now, and the most at once."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0


class RawOrigin:
    """An in-loop server: records each request head, then sends `answer` (b"": closes without a byte)."""

    def __init__(self, answer: bytes = OK, delay: float = 0.0, gauge: Gauge | None = None) -> None:
        self.answer = answer
        self.delay = delay
        self.gauge = gauge or Gauge()
        self.heads: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    running: ClassVar[list[RawOrigin]] = []  # closed by run() when the test's loop ends

    async def start(self) -> RawOrigin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        RawOrigin.running.append(self)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._open:
            writer.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        gauge = self.gauge
        gauge.active += 1
        gauge.peak = max(gauge.peak, gauge.active)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            await asyncio.sleep(self.delay)
            gauge.active -= 1  # before answering: the prober cannot free its slot before this
            writer.write(self.answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            gauge.active -= 1  # a tcp probe: connect, then close
        finally:
            self._open.discard(writer)
            writer.close()


@pytest.fixture
def table() -> HealthTable:
    return HealthTable(256)


@pytest.fixture
def origins() -> Iterator[Callable[..., OriginServer]]:
    started: list[OriginServer] = []

    def make(name: str, **kwargs: Any) -> OriginServer:
        server = OriginServer(name, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts connections (the kernel does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def started(table: HealthTable, cfg: Config) -> ActiveProber:
    prober = ActiveProber(asyncio.get_running_loop(), table)
    prober.apply_config(cfg)
    return prober


def test_http_failures_flip_the_target_exactly_at_the_threshold(
        table: HealthTable, origins: Callable[..., OriginServer], caplog: pytest.LogCaptureFixture) -> None:
    sick = origins("sick")
    cfg = config(upstream("u", [sick.address], {"http_path": "/status/500", "healthy": {"interval": 0.1},
                                                "unhealthy": {"interval": 0, "http_failures": 3}}))
    slot = table.slot_for("u", "127.0.0.1", sick.port)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: table.read(slot)["http_failures"] == 2, "two counted failures")
            assert state(table, slot) == State.HEALTHY
            await wait_until(lambda: state(table, slot) == State.UNHEALTHY, "UNHEALTHY")
            await asyncio.sleep(0.3)  # unhealthy.interval 0: no probe while it is unhealthy
            assert sick.log == [("GET", "/status/500")] * 3
            assert table.read(slot)["http_failures"] == 0  # a transition starts counting afresh
        finally:
            await prober.close()

    run(body)
    assert transitions(caplog, "is now") == [
        f"upstream u: target 127.0.0.1:{sick.port} is now UNHEALTHY (active checks: 3 http failures, last: HTTP 500)"]


def test_successes_bring_an_unhealthy_target_back_and_healthy_interval_0_stops_probing(
        table: HealthTable, origins: Callable[..., OriginServer], caplog: pytest.LogCaptureFixture) -> None:
    good = origins("good")
    cfg = config(upstream("u", [good.address], {"http_path": "/status/200", "healthy": {"interval": 0, "successes": 2},
                                                "unhealthy": {"interval": 0.1, "http_failures": 1}}))
    slot = table.slot_for("u", "127.0.0.1", good.port)
    force(table, cfg, "u", slot, Event.MANUAL_UNHEALTHY)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: table.read(slot)["successes"] == 1, "one counted success")
            assert state(table, slot) == State.UNHEALTHY
            await wait_until(lambda: state(table, slot) == State.HEALTHY, "HEALTHY")
            await asyncio.sleep(0.3)
            assert good.requests == 2, "a healthy target was probed with healthy.interval 0"
        finally:
            await prober.close()

    run(body)
    assert transitions(caplog, "is now") == [
        f"upstream u: target 127.0.0.1:{good.port} is now HEALTHY (active checks: 2 successes)"]


def test_a_status_in_neither_list_changes_nothing(table: HealthTable, origins: Callable[..., OriginServer]) -> None:
    origin = origins("teapot")
    origin.force_status = 500
    cfg = config(upstream("u", [origin.address], {"healthy": {"interval": 0.05},
                                                  "unhealthy": {"interval": 0.05, "http_failures": 3}}))
    slot = table.slot_for("u", "127.0.0.1", origin.port)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: table.read(slot)["http_failures"] >= 1, "a counted failure")
            origin.force_status = 418  # neither healthy nor unhealthy: Kong ignores it
            seen = origin.requests
            await wait_until(lambda: origin.requests >= seen + 3, "three more probes")
            counted = table.read(slot)["http_failures"]
            seen = origin.requests
            await wait_until(lambda: origin.requests >= seen + 3, "three more probes")
            block = table.read(slot)
            # Not a success (it would reset the failures), not a failure (it would add one).
            assert block["http_failures"] == counted >= 1
            assert block["state"] == State.HEALTHY
        finally:
            await prober.close()

    run(body)


def test_tcp_probes_only_connect(table: HealthTable, origins: Callable[..., OriginServer], closed_port: int,
                                 caplog: pytest.LogCaptureFixture) -> None:
    live = origins("live")
    cfg = config(upstream("u", [live.address, f"127.0.0.1:{closed_port}"], {
        "type": "tcp", "healthy": {"interval": 0.05, "successes": 1},
        "unhealthy": {"interval": 0.05, "tcp_failures": 2}}))
    live_slot = table.slot_for("u", "127.0.0.1", live.port)
    dead_slot = table.slot_for("u", "127.0.0.1", closed_port)
    force(table, cfg, "u", live_slot, Event.MANUAL_UNHEALTHY)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: state(table, live_slot) == State.HEALTHY, "the live target HEALTHY")
            await wait_until(lambda: state(table, dead_slot) == State.UNHEALTHY, "the dead target UNHEALTHY")
        finally:
            await prober.close()

    run(body)
    assert live.connections >= 1 and live.requests == 0  # connected, never asked anything
    assert transitions(caplog, f"{closed_port} is now UNHEALTHY (active checks: 2 tcp failures, last: connect failed")


def test_an_origin_that_never_answers_counts_timeouts(table: HealthTable, silent_port: int,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(upstream("u", [f"127.0.0.1:{silent_port}"], {
        "timeout": 0.1, "healthy": {"interval": 0.05}, "unhealthy": {"interval": 0.05, "timeouts": 2,
                                                                      "tcp_failures": 1, "http_failures": 1}}))
    slot = table.slot_for("u", "127.0.0.1", silent_port)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: table.read(slot)["timeouts"] == 1, "one counted timeout")
            assert state(table, slot) == State.HEALTHY
            await wait_until(lambda: state(table, slot) == State.UNHEALTHY, "UNHEALTHY")
        finally:
            await prober.close()

    run(body)
    assert transitions(caplog, "is now UNHEALTHY (active checks: 2 timeouts, last: no status line in time)")


@pytest.mark.parametrize(("answer", "counter"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "successes"),
    (b"http/1.0 503 Busy\r\n\r\n", "http_failures"),         # the pattern is case-insensitive
    (b"SSH-2.0-OpenSSH_9.6\r\n", "http_failures"),            # not HTTP: Kong reports status 0
    (b"HTTP/1.1 2000 Odd\r\n\r\n", None),                     # a number in neither list: ignored
    (b"HTTP/1.1 500", "tcp_failures"),                        # closed before the status line ended
    (b"", "tcp_failures"),                                    # closed without a byte
])
def test_answer_verdicts(table: HealthTable, answer: bytes, counter: str | None) -> None:
    thresholds = {"http_failures": 50, "tcp_failures": 50, "timeouts": 50}

    async def body() -> None:
        origin = await RawOrigin(answer).start()
        cfg = config(upstream("u", [origin.address], {"healthy": {"interval": 0.05, "successes": 50},
                                                      "unhealthy": {"interval": 0.05, **thresholds}}))
        slot = table.slot_for("u", "127.0.0.1", origin.port)
        if counter == "successes":
            force(table, cfg, "u", slot, Event.MANUAL_UNHEALTHY)  # successes count only out of the balancer
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: len(origin.heads) >= 3, "three probes")
            await asyncio.sleep(0.02)  # the third probe's report
            block = table.read(slot)
            names = ("successes", "http_failures", "tcp_failures", "timeouts")
            assert {name: block[name] > 0 for name in names} == {name: name == counter for name in names}
        finally:
            await prober.close()

    run(body)


def test_the_probe_request(table: HealthTable) -> None:
    async def body() -> None:
        plain, named = await RawOrigin().start(), await RawOrigin().start()
        cfg = config(
            upstream("u", [plain.address], {"http_path": "/health/deep", "headers": {"X-Probe": ["a", "b"]},
                                            "healthy": {"interval": 0.05}}),
            upstream("v", [named.address], {"healthy": {"interval": 0.05}}, host_header="api.example"),
        )
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: bool(plain.heads and named.heads), "a probe at each origin")
        finally:
            await prober.close()
        assert plain.heads[0] == (f"GET /health/deep HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n"
                                  f"User-Agent: {USER_AGENT}\r\nConnection: close\r\n"
                                  "X-Probe: a\r\nX-Probe: b\r\n\r\n").encode()
        assert b"\r\nHost: api.example\r\n" in named.heads[0]

    run(body)


def test_concurrency_bounds_the_probes_in_flight_per_upstream(table: HealthTable) -> None:
    async def body() -> None:
        gauge = Gauge()
        slow = [await RawOrigin(delay=0.2, gauge=gauge).start() for _ in range(5)]
        cfg = config(upstream("u", [o.address for o in slow], {"concurrency": 2, "timeout": 1.0,
                                                               "healthy": {"interval": 0.05}}))
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: sum(len(o.heads) for o in slow) >= 6, "six probes", timeout=5.0)
        finally:
            await prober.close()
        assert gauge.peak == 2  # all five are due together; two at a time

    run(body)


def test_targets_that_must_not_be_probed(table: HealthTable, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        probed, weightless, healthy_idle, passive_only, grpc = [await RawOrigin().start() for _ in range(5)]
        cfg = config(
            upstream("u", [probed.address, {"target": weightless.address, "weight": 0}],
                     {"healthy": {"interval": 0.05}}),
            upstream("v", [healthy_idle.address], {"healthy": {"interval": 0}, "unhealthy": {"interval": 0.05}}),
            upstream("w", [passive_only.address], {}, checks={"passive": {"unhealthy": {"http_failures": 2}}}),
            upstream("g", [grpc.address], {"type": "grpc", "healthy": {"interval": 0.05}}),
        )
        prober = await started(table, cfg)
        try:
            assert set(prober.targets) == {("u", "127.0.0.1", probed.port), ("v", "127.0.0.1", healthy_idle.port)}
            await wait_until(lambda: len(probed.heads) >= 4, "four probes of the checked target")
        finally:
            await prober.close()
        assert [o.connections for o in (weightless, healthy_idle, passive_only, grpc)] == [0, 0, 0, 0]

    run(body)
    assert transitions(caplog, "active checks of type grpc are not supported")


def test_reload_stops_removed_targets_and_keeps_survivors(table: HealthTable) -> None:
    async def body() -> None:
        gone, kept, new = await RawOrigin().start(), await RawOrigin().start(), await RawOrigin().start()
        kept.answer = b"HTTP/1.1 500 Oops\r\n\r\n"
        active = {"healthy": {"interval": 0.05}, "unhealthy": {"interval": 0.05, "http_failures": 1}}
        prober = await started(table, config(upstream("u", [gone.address, kept.address], active)))
        kept_slot = table.slot_for("u", "127.0.0.1", kept.port)
        try:
            await wait_until(lambda: state(table, kept_slot) == State.UNHEALTHY, "the failing target UNHEALTHY")
            survivor = prober.targets[("u", "127.0.0.1", kept.port)]
            # The new generation drops `gone`, adds `new`, and stops probing unhealthy targets.
            changed = {**active, "unhealthy": {"interval": 0, "http_failures": 1}}
            prober.apply_config(config(upstream("u", [kept.address, new.address], changed)))
            assert set(prober.targets) == {("u", "127.0.0.1", kept.port), ("u", "127.0.0.1", new.port)}
            assert prober.targets[("u", "127.0.0.1", kept.port)] is survivor
            await asyncio.sleep(0.06)  # a probe already on the wire may still land
            gone_seen, kept_seen = len(gone.heads), len(kept.heads)
            await wait_until(lambda: len(new.heads) >= 4, "four probes of the new target")
            assert (len(gone.heads), len(kept.heads)) == (gone_seen, kept_seen)
            assert state(table, kept_slot) == State.UNHEALTHY
        finally:
            await prober.close()

    run(body)


def test_active_successes_bring_an_ejected_target_back(table: HealthTable, origins: Callable[..., OriginServer],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    origin = origins("back")
    cfg = config(upstream("u", [origin.address], {"healthy": {"interval": 0, "successes": 2},
                                                  "unhealthy": {"interval": 0.05}},
                          checks={"passive": {"unhealthy": {"http_failures": 3}}}))
    slot = table.slot_for("u", "127.0.0.1", origin.port)
    force(table, cfg, "u", slot, Event.EJECT)  # ejected for 30 s (the default base ejection time)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: state(table, slot) == State.HEALTHY, "HEALTHY")
        finally:
            await prober.close()
        assert origin.requests == 2

    run(body)
    assert transitions(caplog, "is now HEALTHY (active checks: 2 successes)")


def test_a_state_change_elsewhere_switches_the_interval(table: HealthTable, origins: Callable[..., OriginServer]) -> None:
    origin = origins("flip")
    cfg = config(upstream("u", [origin.address], {"healthy": {"interval": 0}, "unhealthy": {"interval": 0.05}}))
    slot = table.slot_for("u", "127.0.0.1", origin.port)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await asyncio.sleep(0.15)
            assert origin.requests == 0
            force(table, cfg, "u", slot, Event.MANUAL_UNHEALTHY)  # as the Admin API or a worker would
            await wait_until(lambda: origin.requests >= 2, "probes of the unhealthy target")
        finally:
            await prober.close()

    run(body)


@pytest.fixture(scope="module")
def tls_origin_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, list[str | None], Path]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", "probe.test").configure_cert(context)
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,func-returns-value]
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, names, ca_file


def test_https_probes_verify_only_when_asked(
        table: HealthTable, origins: Callable[..., OriginServer],
        tls_origin_parts: tuple[ssl.SSLContext, list[str | None], Path]) -> None:
    context, _, _ = tls_origin_parts
    origin = origins("tls", ssl_context=context)
    base = {"type": "https", "healthy": {"interval": 0.05, "successes": 1},
            "unhealthy": {"interval": 0.05, "tcp_failures": 1}}
    cfg = config(upstream("lax", [origin.address], {**base, "https_verify_certificate": False}),
                 upstream("strict", [origin.address], base))
    lax = table.slot_for("lax", "127.0.0.1", origin.port)
    strict = table.slot_for("strict", "127.0.0.1", origin.port)
    force(table, cfg, "lax", lax, Event.MANUAL_UNHEALTHY)

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: state(table, lax) == State.HEALTHY, "the unverified probe to succeed")
            # The test CA is in no system trust store: the handshake fails, a tcp failure.
            await wait_until(lambda: state(table, strict) == State.UNHEALTHY, "the verified probe to fail")
        finally:
            await prober.close()

    run(body)


def test_https_probes_send_sni_and_verify_against_the_trust_store(
        table: HealthTable, origins: Callable[..., OriginServer], monkeypatch: pytest.MonkeyPatch,
        tls_origin_parts: tuple[ssl.SSLContext, list[str | None], Path]) -> None:
    context, names, ca_file = tls_origin_parts
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # OpenSSL's default trust store for this process
    origin = origins("tls-sni", ssl_context=context)
    base = {"type": "https", "healthy": {"interval": 0.05, "successes": 1}, "unhealthy": {"interval": 0.05}}
    cfg = config(upstream("by-sni", [origin.address], {**base, "https_sni": "probe.test"}),
                 upstream("by-host", [origin.address], base, host_header=f"localhost:{origin.port}"))
    slots = [table.slot_for(name, "127.0.0.1", origin.port) for name in ("by-sni", "by-host")]
    for name, slot in zip(("by-sni", "by-host"), slots):
        force(table, cfg, name, slot, Event.MANUAL_UNHEALTHY)
    names.clear()

    async def body() -> None:
        prober = await started(table, cfg)
        try:
            await wait_until(lambda: all(state(table, slot) == State.HEALTHY for slot in slots), "both HEALTHY")
        finally:
            await prober.close()

    run(body)
    assert {"probe.test", "localhost"} <= set(names)
