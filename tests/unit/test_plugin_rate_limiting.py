"""rate-limiting: Kong's headers and numbers, calendar windows, limit_by, and one limit for all processes."""
from __future__ import annotations

import calendar
import os
import time

import orjson
import pytest
from pydantic import ValidationError
from shared_state.shdict import SharedDict

from ringgate.plugins.base import Context, Node
from ringgate.plugins.chain import Chain, run_access, run_header_filter
from ringgate.plugins.rate_limiting import Config, RateLimitingPlugin, period_starts

# 2024-02-29 13:45:30 UTC: 30 s into its minute, 45 min 30 s into its hour.
NOW = calendar.timegm((2024, 2, 29, 13, 45, 30))


def make_ctx(path: str = "/api", client_ip: str = "10.0.0.1", headers: list[tuple[str, str]] | None = None,
             service_id: str | None = "svc-1") -> Context:
    ctx = Context()
    ctx.method = "GET"
    ctx.path = path
    ctx.raw_path = path.encode()
    ctx.query = None
    ctx.host = "example.test"
    ctx.headers = headers or []
    ctx.client_ip = client_ip
    ctx.route_id = "route-1"
    ctx.route_name = "r"
    ctx.service_id = service_id
    ctx.service_name = "s"
    ctx.request_id = "req-1"
    return ctx


def make_plugin(shdict: SharedDict | None, now: float = NOW, **config: object) -> RateLimitingPlugin:
    plugin = RateLimitingPlugin(Config.model_validate(config), entity_id="plugin-1", node=Node(shdict=shdict))
    plugin.clock = lambda: now
    return plugin


def call(plugin: RateLimitingPlugin, ctx: Context | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request through access and header_filter: (status, headers, body); 200 when it went on."""
    ctx = ctx or make_ctx()
    chain = Chain([plugin])
    if run_access(chain, ctx):
        status, body, pairs = ctx.exit_answer  # type: ignore[misc]
        return status, dict(pairs), body
    run_header_filter(chain, ctx, 200, [])
    return 200, {name: value for op, name, value in ctx.response_headers or [] if value is not None}, b""


@pytest.fixture
def shdict() -> SharedDict:
    return SharedDict(1024, key_max=64, value_max=64)


def test_period_starts_are_calendar_aligned_in_utc() -> None:
    starts = period_starts(NOW)
    assert starts == {
        "second": NOW,
        "minute": calendar.timegm((2024, 2, 29, 13, 45, 0)),
        "hour": calendar.timegm((2024, 2, 29, 13, 0, 0)),
        "day": calendar.timegm((2024, 2, 29, 0, 0, 0)),
        "month": calendar.timegm((2024, 2, 1, 0, 0, 0)),
        "year": calendar.timegm((2024, 1, 1, 0, 0, 0)),
    }


def test_headers_are_kongs_for_every_period_and_the_tightest(shdict: SharedDict) -> None:
    plugin = make_plugin(shdict, minute=3, hour=10)
    status, headers, _ = call(plugin)
    assert status == 200
    assert headers == {
        "X-RateLimit-Limit-Minute": "3", "X-RateLimit-Remaining-Minute": "2",
        "X-RateLimit-Limit-Hour": "10", "X-RateLimit-Remaining-Hour": "9",
        # The minute has the least left; it resets at the next minute boundary, 30 s away.
        "RateLimit-Limit": "3", "RateLimit-Remaining": "2", "RateLimit-Reset": "30",
    }


def test_equal_remaining_picks_the_longer_window_for_ratelimit_reset(shdict: SharedDict) -> None:
    status, headers, _ = call(make_plugin(shdict, second=5, minute=5))
    assert status == 200
    assert headers["RateLimit-Remaining"] == "4"
    assert headers["RateLimit-Reset"] == "30"  # the minute's, not the second's 1


def test_over_the_limit_is_429_with_retry_after_and_is_not_counted(shdict: SharedDict) -> None:
    plugin = make_plugin(shdict, minute=3, hour=10)
    for remaining in ("2", "1", "0"):
        status, headers, _ = call(plugin)
        assert (status, headers["X-RateLimit-Remaining-Minute"]) == (200, remaining)
    status, headers, body = call(plugin)
    assert status == 429
    assert orjson.loads(body) == {"message": "API rate limit exceeded", "request_id": "req-1"}
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Retry-After"] == headers["RateLimit-Reset"] == "30"
    assert headers["X-RateLimit-Remaining-Minute"] == "0"
    # The hour that did not refuse shows what is left without this request: 10 - 3.
    assert headers["X-RateLimit-Remaining-Hour"] == "7"
    # A new minute: the refused requests did not count against the hour.
    status, headers, _ = call(make_plugin(shdict, now=NOW + 30, minute=3, hour=10))
    assert status == 200
    assert headers["X-RateLimit-Remaining-Minute"] == "2"
    assert headers["X-RateLimit-Remaining-Hour"] == "6"


def test_a_new_window_starts_at_the_calendar_boundary(shdict: SharedDict) -> None:
    for _ in range(2):
        assert call(make_plugin(shdict, now=NOW + 29, minute=2))[0] == 200  # 13:45:59
    assert call(make_plugin(shdict, now=NOW + 29, minute=2))[0] == 429
    status, headers, _ = call(make_plugin(shdict, now=NOW + 30, minute=2))  # 13:46:00
    assert status == 200
    assert headers["RateLimit-Reset"] == "60"


def test_error_code_message_and_text_answer(shdict: SharedDict) -> None:
    plugin = make_plugin(shdict, second=1, error_code=503, error_message="slow down")
    call(plugin)
    status, headers, body = call(plugin, make_ctx(headers=[("Accept", "text/plain")]))
    assert status == 503
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == b"slow down\nrequest_id: req-1\n"


def test_hide_client_headers(shdict: SharedDict) -> None:
    plugin = make_plugin(shdict, minute=1, hide_client_headers=True)
    assert call(plugin) == (200, {}, b"")
    status, headers, _ = call(plugin)
    assert status == 429
    assert set(headers) == {"Content-Type"}  # no Retry-After either, as in Kong


@pytest.mark.parametrize("limit_by, extra, first, second, same", [
    ("ip", {}, make_ctx(client_ip="10.0.0.1"), make_ctx(client_ip="10.0.0.2"), False),
    ("consumer", {}, make_ctx(client_ip="10.0.0.1"), make_ctx(client_ip="10.0.0.2"), False),  # no auth: by IP
    ("service", {}, make_ctx(client_ip="10.0.0.1"), make_ctx(client_ip="10.0.0.2"), True),
    ("header", {"header_name": "X-Key"}, make_ctx(headers=[("x-key", "a")]), make_ctx(headers=[("X-Key", "b")]),
     False),
    ("header", {"header_name": "X-Key"}, make_ctx(headers=[("X-Key", "a")], client_ip="10.0.0.9"),
     make_ctx(headers=[("X-Key", "a")], client_ip="10.0.0.8"), True),
    ("path", {"path": "/api"}, make_ctx(path="/api", client_ip="10.0.0.1"),
     make_ctx(path="/api", client_ip="10.0.0.2"), True),
    # Another path is counted by client address.
    ("path", {"path": "/api"}, make_ctx(path="/other", client_ip="10.0.0.1"),
     make_ctx(path="/other", client_ip="10.0.0.2"), False),
])
def test_limit_by(shdict: SharedDict, limit_by: str, extra: dict[str, str], first: Context, second: Context,
                  same: bool) -> None:
    plugin = make_plugin(shdict, minute=1, limit_by=limit_by, **extra)
    assert call(plugin, first)[0] == 200
    assert call(plugin, second)[0] == (429 if same else 200)


def test_a_header_limit_without_the_header_counts_by_address(shdict: SharedDict) -> None:
    plugin = make_plugin(shdict, minute=1, limit_by="header", header_name="X-Key")
    assert call(plugin, make_ctx(client_ip="10.0.0.1"))[0] == 200
    assert call(plugin, make_ctx(client_ip="10.0.0.1", headers=[("X-Key", "10.0.0.1x")]))[0] == 200
    assert call(plugin, make_ctx(client_ip="10.0.0.1"))[0] == 429


def test_instances_count_apart(shdict: SharedDict) -> None:
    one = make_plugin(shdict, minute=1)
    other = RateLimitingPlugin(Config.model_validate({"minute": 1}), entity_id="plugin-2", node=Node(shdict=shdict))
    other.clock = lambda: NOW
    assert call(one)[0] == 200
    assert call(other)[0] == 200
    assert call(one)[0] == 429


def test_fault_tolerant_lets_requests_through_without_headers() -> None:
    plugin = make_plugin(None, minute=1)
    assert call(plugin) == (200, {}, b"")
    assert call(plugin) == (200, {}, b"")


def test_not_fault_tolerant_is_a_500() -> None:
    status, _, body = call(make_plugin(None, minute=1, fault_tolerant=False))
    assert status == 500
    assert orjson.loads(body) == {"message": "An unexpected error occurred"}


def test_limits_hold_across_processes(shdict: SharedDict) -> None:
    """Four forked workers share one dict: exactly `minute` requests pass in total, none more."""
    plugin = make_plugin(shdict, minute=60)
    readers = []
    for _ in range(4):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: 40 requests, report how many passed
            code = 1
            try:
                os.close(read_end)
                passed = sum(call(plugin)[0] == 200 for _ in range(40))
                os.write(write_end, str(passed).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        readers.append((pid, read_end))
    total = 0
    deadline = time.monotonic() + 30
    for pid, read_end in readers:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "a child did not finish"
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        total += int(os.read(read_end, 32) or b"0")
        os.close(read_end)
    assert total == 60
    # The parent sees the same full window.
    status, headers, _ = call(plugin)
    assert (status, headers["X-RateLimit-Remaining-Minute"]) == (429, "0")


def test_fractional_limits_print_as_kong_does(shdict: SharedDict) -> None:
    status, headers, _ = call(make_plugin(shdict, minute=2.5))
    assert status == 200
    assert headers["X-RateLimit-Limit-Minute"] == "2.5"
    assert headers["X-RateLimit-Remaining-Minute"] == "1.5"


def kong_errors(error: ValidationError) -> list[tuple[tuple[object, ...], str]]:
    """(field path, message) pairs as the config loader reports them."""
    found = []
    for detail in error.errors():
        if detail["type"] == "entity_checks":
            found += [(detail["loc"] + tuple(path), text) for path, text in detail["ctx"]["problems"]]
        else:
            found.append((detail["loc"], detail["ctx"]["reason"] if detail["type"] == "kong" else detail["type"]))
    return found


@pytest.mark.parametrize("config, loc, message", [
    ({}, (), ("at least one of these fields must be non-empty: 'config.second', 'config.minute', 'config.hour', "
              "'config.day', 'config.month', 'config.year'")),
    ({"minute": 10, "hour": 5}, (), "The limit for hour(5.0) cannot be lower than the limit for minute(10.0)"),
    ({"minute": 0}, ("minute",), "value must be greater than 0"),
    ({"minute": 1, "limit_by": "header"}, ("header_name",), "required field missing"),
    ({"minute": 1, "limit_by": "path"}, ("path",), "required field missing"),
    ({"minute": 1, "limit_by": "nobody"}, ("limit_by",),
     "expected one of: consumer, credential, ip, service, header, path"),
    *[({"minute": 1, "policy": policy}, ("policy",),
        (f"policy '{policy}' is not supported by Ringgate: use 'local' (counters in the node's shared memory, "
         "shared by all its workers)")) for policy in ("redis", "cluster")],
    ({"minute": 1, "sync_rate": 1}, (), "sync_rate can only be used with the redis policy"),
    ({"minute": 1, "header_name": "bad name"}, ("header_name",),
     "bad header name 'bad name', allowed characters are A-Z, a-z, 0-9, '_', and '-'"),
])
def test_config_errors_use_kongs_words(config: dict[str, object], loc: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Config.model_validate(config)
    assert (loc, message) in kong_errors(caught.value)


def test_defaults_are_kongs() -> None:
    config = Config.model_validate({"minute": 5})
    assert (config.limit_by, config.policy, config.fault_tolerant, config.hide_client_headers, config.error_code,
            config.error_message, config.sync_rate) == ("consumer", "local", True, False, 429,
                                                        "API rate limit exceeded", -1)
    assert RateLimitingPlugin.PRIORITY == 910
    # A Kong export with the redis block present (and unused) loads.
    Config.model_validate({"minute": 5, "redis": {"host": None, "port": 6379}, "redis_timeout": 2000})
