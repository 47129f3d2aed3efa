"""proxy-cache: Kong's key, Miss/Hit/Refresh/Bypass, what is stored and what is not, one cache for all processes."""
from __future__ import annotations

import calendar
import hashlib
import os
import time

import pytest
from pydantic import ValidationError
from shared_state.shdict import SharedDict

from ringgate.plugins.base import Context, Node
from ringgate.plugins.chain import Chain, run_access, run_body_filter, run_header_filter
from ringgate.plugins.proxy_cache import (
    Config,
    ProxyCachePlugin,
    build_cache_key,
    parse_directive_header,
    query_args,
    resource_ttl,
)

NOW = 1_700_000_000.0
JSON = [("Content-Type", "application/json"), ("Content-Length", "11"), ("X-Origin", "a")]


def make_ctx(method: str = "GET", path: str = "/items", query: bytes | None = None,
             headers: list[tuple[str, str]] | None = None) -> Context:
    ctx = Context()
    ctx.method = method
    ctx.path = path
    ctx.raw_path = path.encode()
    ctx.query = query
    ctx.host = "example.test"
    ctx.headers = headers or []
    ctx.client_ip = "10.0.0.1"
    ctx.route_id = "route-1"
    ctx.route_name = "r"
    ctx.service_id = "svc-1"
    ctx.service_name = "s"
    ctx.request_id = "req-1"
    return ctx


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache() -> SharedDict:
    return SharedDict(256, key_max=128, value_max=4096)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_plugin(cache: SharedDict | None, clock: Clock, **config: object) -> ProxyCachePlugin:
    plugin = ProxyCachePlugin(Config.model_validate({"strategy": "memory", **config}), entity_id="pc-1",
                              node=Node(cache=cache))
    plugin.clock = clock
    return plugin


class Result:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, sent: list[bytes]) -> None:
        self.status = status
        self.headers = dict(headers)
        self.body = body
        self.sent = sent  # what body_filter passed on, chunk by chunk


def call(plugin: ProxyCachePlugin, ctx: Context | None = None, status: int = 200,
         headers: list[tuple[str, str]] | None = None, chunks: tuple[bytes, ...] = (b'{"n": 1}', b"   ")) -> Result:
    """One request: a hit is answered in access; otherwise the 'upstream' answers with status/headers/chunks."""
    ctx = ctx or make_ctx()
    chain = Chain([plugin])
    if run_access(chain, ctx):
        exit_status, body, pairs = ctx.exit_answer  # type: ignore[misc]
        run_header_filter(chain, ctx, exit_status, list(pairs))
        pairs = [(k, v) for k, v in pairs] + [(n, v) for _, n, v in ctx.response_headers or [] if v is not None]
        return Result(exit_status, pairs, body, [])
    upstream = list(headers if headers is not None else JSON)
    run_header_filter(chain, ctx, status, upstream)
    sent = [run_body_filter(chain, ctx, chunk, False) for chunk in chunks]
    sent.append(run_body_filter(chain, ctx, b"", True))
    out = upstream + [(n, v) for _, n, v in ctx.response_headers or [] if v is not None]
    return Result(status, out, b"".join(sent), sent)


def test_miss_then_hit_in_access_with_the_stored_answer(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock)
    first = call(plugin, headers=JSON + [("Transfer-Encoding", "chunked"), ("X-RateLimit-Remaining-Minute", "4")])
    assert first.status == 200
    assert first.headers["X-Cache-Status"] == "Miss"
    key = first.headers["X-Cache-Key"]
    assert first.sent == [b'{"n": 1}', b"   ", b""]  # passed on unchanged, piece by piece
    clock.now += 7.6
    hit = call(plugin, chunks=(b"never sent upstream",))
    assert hit.status == 200
    assert hit.body == b'{"n": 1}   '
    assert hit.headers["X-Cache-Status"] == "Hit"
    assert hit.headers["X-Cache-Key"] == key
    assert hit.headers["Age"] == "7"
    assert hit.headers["X-Origin"] == "a"
    assert hit.headers["Content-Type"] == "application/json"
    # Framing is the answer's own; rate-limit counters of the past are not replayed.
    for gone in ("Content-Length", "Transfer-Encoding", "X-RateLimit-Remaining-Minute"):
        assert gone not in hit.headers


def test_cache_key_is_kongs(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock, vary_headers=["Accept-Language"])
    ctx = make_ctx(query=b"b=3&a=1&b=2&flag&e=", headers=[("accept-language", "fr"), ("X-Other", "x")])
    result = call(plugin, ctx)
    expected = hashlib.sha256(b"route-1|GET|/items|a=1:b=2,3:e=:flag|Accept-Language=fr").hexdigest()
    assert result.headers["X-Cache-Key"] == expected


def test_query_order_does_not_matter_and_values_do(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock)
    call(plugin, make_ctx(query=b"a=1&b=2"))
    assert call(plugin, make_ctx(query=b"b=2&a=1")).headers["X-Cache-Status"] == "Hit"
    assert call(plugin, make_ctx(query=b"b=2&a=9")).headers["X-Cache-Status"] == "Miss"


def test_vary_query_params_keep_only_those(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock, vary_query_params=["page"])
    call(plugin, make_ctx(query=b"page=1&utm=x"))
    assert call(plugin, make_ctx(query=b"utm=y&page=1")).headers["X-Cache-Status"] == "Hit"
    assert call(plugin, make_ctx(query=b"page=2")).headers["X-Cache-Status"] == "Miss"


def test_vary_headers_and_uri_case(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock, vary_headers=["Accept-Encoding"], ignore_uri_case=True)
    call(plugin, make_ctx(path="/Items", headers=[("Accept-Encoding", "gzip")]))
    assert call(plugin, make_ctx(path="/ITEMS", headers=[("accept-encoding", "gzip")])).headers[
        "X-Cache-Status"] == "Hit"
    assert call(plugin, make_ctx(path="/items", headers=[("Accept-Encoding", "br")])).headers[
        "X-Cache-Status"] == "Miss"
    case_sensitive = make_plugin(cache, clock)
    call(case_sensitive, make_ctx(path="/Other"))
    assert call(case_sensitive, make_ctx(path="/other")).headers["X-Cache-Status"] == "Miss"


def test_methods_not_listed_bypass(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock)
    result = call(plugin, make_ctx(method="POST"))
    assert result.headers["X-Cache-Status"] == "Bypass"
    assert "X-Cache-Key" not in result.headers
    assert call(plugin, make_ctx(method="POST")).headers["X-Cache-Status"] == "Bypass"


@pytest.mark.parametrize("status, headers", [
    (500, JSON),
    (200, [("Content-Type", "application/json; charset=utf-8")]),  # exact match: parameters count
    (200, [("Content-Type", "text/html")]),
    (200, []),
    (200, [("Content-Type", "text/plain"), ("Content-Type", "application/json")]),
])
def test_answers_kong_would_not_store_are_bypassed(cache: SharedDict, clock: Clock, status: int,
                                                    headers: list[tuple[str, str]]) -> None:
    plugin = make_plugin(cache, clock)
    first = call(plugin, status=status, headers=headers)
    assert first.headers["X-Cache-Status"] == "Bypass"
    assert call(plugin, status=status, headers=headers).headers["X-Cache-Status"] == "Bypass"


def test_content_type_patterns(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock, content_type=["text/*", "application/json; charset=utf-8"])
    assert call(plugin, make_ctx(path="/a"), headers=[("Content-Type", "TEXT/CSV")]).headers[
        "X-Cache-Status"] == "Miss"
    assert call(plugin, make_ctx(path="/a")).headers["X-Cache-Status"] == "Hit"
    assert call(plugin, make_ctx(path="/b"), headers=[("Content-Type", 'application/json;charset="UTF-8"')]
                ).headers["X-Cache-Status"] == "Miss"
    assert call(plugin, make_ctx(path="/b")).headers["X-Cache-Status"] == "Hit"
    assert call(plugin, make_ctx(path="/c"), headers=[("Content-Type", "application/json")]).headers[
        "X-Cache-Status"] == "Bypass"


def test_an_answer_over_the_value_limit_streams_and_is_not_stored(clock: Clock) -> None:
    small = SharedDict(16, key_max=128, value_max=512)
    plugin = make_plugin(small, clock)
    chunks = (b"a" * 300, b"b" * 300, b"c" * 10)
    first = call(plugin, chunks=chunks)
    assert first.sent == [*chunks, b""]  # every piece went on as it came
    assert small.keys() == []
    assert call(plugin).headers["X-Cache-Status"] == "Miss"


def test_cache_ttl_expiry_refreshes_and_stores_again(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock, cache_ttl=10, storage_ttl=100)
    call(plugin)
    clock.now += 11
    refresh = call(plugin, chunks=(b"new",))
    assert refresh.headers["X-Cache-Status"] == "Refresh"
    hit = call(plugin)
    assert (hit.headers["X-Cache-Status"], hit.body, hit.headers["Age"]) == ("Hit", b"new", "0")


def test_response_headers_switches_and_kong_debug(cache: SharedDict, clock: Clock) -> None:
    quiet = {"age": False, "X-Cache-Status": False, "X-Cache-Key": False}
    plugin = make_plugin(cache, clock, response_headers=quiet)
    miss = call(plugin)
    assert not {"X-Cache-Status", "X-Cache-Key"} & set(miss.headers)
    hit = call(plugin)
    assert hit.body == b'{"n": 1}   '
    assert not {"Age", "X-Cache-Status", "X-Cache-Key"} & set(hit.headers)
    debug = call(plugin, make_ctx(headers=[("Kong-Debug", "1")]))
    assert {"Age", "X-Cache-Status", "X-Cache-Key"} <= set(debug.headers)


class TestCacheControl:
    def test_request_no_cache_and_authorization_bypass(self, cache: SharedDict, clock: Clock) -> None:
        plugin = make_plugin(cache, clock, cache_control=True)
        public = JSON + [("Cache-Control", "public, max-age=60")]
        assert call(plugin, make_ctx(headers=[("Cache-Control", "no-cache")]), headers=public).headers[
            "X-Cache-Status"] == "Bypass"
        assert call(plugin, make_ctx(headers=[("Authorization", "Basic x")]), headers=public).headers[
            "X-Cache-Status"] == "Bypass"

    @pytest.mark.parametrize("directives", ["private, max-age=60", "no-store", "max-age=0", "public"])
    def test_answers_that_forbid_or_expire_are_not_stored(self, cache: SharedDict, clock: Clock,
                                                          directives: str) -> None:
        plugin = make_plugin(cache, clock, cache_control=True)
        headers = JSON + [("Cache-Control", directives)]
        assert call(plugin, headers=headers).headers["X-Cache-Status"] == "Bypass"

    def test_s_maxage_sets_the_lifetime_and_client_max_age_refreshes(self, cache: SharedDict,
                                                                     clock: Clock) -> None:
        plugin = make_plugin(cache, clock, cache_control=True)
        call(plugin, headers=JSON + [("Cache-Control", "max-age=5, s-maxage=120")])
        clock.now += 30
        assert call(plugin).headers["X-Cache-Status"] == "Hit"  # past cache_ttl rules: cache_control wins
        assert call(plugin, make_ctx(headers=[("Cache-Control", "max-age=10")]),
                    headers=JSON + [("Cache-Control", "s-maxage=120")]).headers["X-Cache-Status"] == "Refresh"
        # Refreshed: the new copy is 0 s old, and its answer's lifetime (120 s) is its TTL.
        clock.now += 100
        assert call(plugin).headers["X-Cache-Status"] == "Hit"
        # min-fresh: the entry has 90 s of life left.
        assert call(plugin, make_ctx(headers=[("Cache-Control", "min-fresh=100")]),
                    headers=JSON + [("Cache-Control", "s-maxage=120")]).headers["X-Cache-Status"] == "Refresh"

    def test_expires_header_gives_the_lifetime(self, cache: SharedDict, clock: Clock) -> None:
        plugin = make_plugin(cache, clock, cache_control=True)
        expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(NOW + 50))
        assert call(plugin, headers=JSON + [("Expires", expires)]).headers["X-Cache-Status"] == "Miss"
        assert call(plugin).headers["X-Cache-Status"] == "Hit"
        past = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(NOW - 50))
        assert call(plugin, make_ctx(path="/old"), headers=JSON + [("Expires", past)]).headers[
            "X-Cache-Status"] == "Bypass"

    def test_only_if_cached_miss_is_504(self, cache: SharedDict, clock: Clock) -> None:
        plugin = make_plugin(cache, clock, cache_control=True)
        result = call(plugin, make_ctx(headers=[("Cache-Control", "only-if-cached")]))
        assert (result.status, result.body) == (504, b"")


def test_an_entry_of_another_format_is_purged(cache: SharedDict, clock: Clock) -> None:
    plugin = make_plugin(cache, clock)
    key = call(plugin).headers["X-Cache-Key"]
    cache.set(key, b"\x93\x00\x01\x02")  # msgpack [0, 1, 2]: not this version's layout
    assert call(plugin).headers["X-Cache-Status"] == "Bypass"
    assert call(plugin).headers["X-Cache-Status"] == "Hit"  # the Bypass stored a fresh copy


def test_without_a_node_cache_requests_pass(clock: Clock) -> None:
    plugin = make_plugin(None, clock)
    assert call(plugin).headers["X-Cache-Status"] == "Bypass"


def test_one_cache_for_all_processes(cache: SharedDict, clock: Clock) -> None:
    """A child process stores the answer; the parent, another process, serves it as a hit."""
    plugin = make_plugin(cache, clock)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if call(plugin, chunks=(b"from the child",)).headers["X-Cache-Status"] == "Miss" else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    hit = call(plugin)
    assert (hit.headers["X-Cache-Status"], hit.body) == ("Hit", b"from the child")


def test_helpers_follow_kong() -> None:
    assert query_args(b"a=1&a=2&b&c=%20x+y") == {"a": ["1", "2"], "b": True, "c": " x y"}
    assert parse_directive_header(["public, max-age=60", "No-Cache"]) == {
        "public": True, "max-age": 60, "no-cache": True}
    assert resource_ttl({"s-maxage": 10, "max-age": 99}, None, NOW) == 10
    assert resource_ttl({}, None, NOW) == 0
    when = calendar.timegm((2030, 1, 1, 0, 0, 0))
    assert resource_ttl({}, "Tue, 01 Jan 2030 00:00:00 GMT", when - 42) == 42
    assert build_cache_key(None, "GET", "/", {}, {}, None, None) == hashlib.sha256(b"default|GET|/||").hexdigest()


@pytest.mark.parametrize("config, loc, message", [
    ({}, ("strategy",), "missing"),
    ({"strategy": "redis"}, ("strategy",), "expected one of: memory"),
    ({"strategy": "memory", "response_code": []}, ("response_code",), "length must be at least 1"),
    ({"strategy": "memory", "response_code": [99]}, ("response_code", 0), "value should be between 100 and 900"),
    ({"strategy": "memory", "request_method": ["DELETE"]}, ("request_method", 0),
     "expected one of: HEAD, GET, POST, PATCH, PUT"),
    ({"strategy": "memory", "cache_ttl": 0}, ("cache_ttl",), "value must be greater than 0"),
    ({"strategy": "memory", "response_headers": {"Age": True}}, ("response_headers", "Age"), "extra_forbidden"),
])
def test_config_errors(config: dict[str, object], loc: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Config.model_validate(config)
    found = [(d["loc"], d["ctx"]["reason"] if d["type"] == "kong" else d["type"]) for d in caught.value.errors()]
    assert (loc, message) in found


def test_defaults_are_kongs() -> None:
    config = Config.model_validate({"strategy": "memory"})
    assert config.response_code == (200, 301, 404)
    assert config.request_method == ("GET", "HEAD")
    assert config.content_type == ("text/plain", "application/json")
    assert (config.cache_ttl, config.cache_control, config.storage_ttl, config.vary_headers) == (300, False, None, None)
    assert config.model_dump(mode="json")["response_headers"] == {"age": True, "X-Cache-Status": True,
                                                                  "X-Cache-Key": True}
    assert ProxyCachePlugin.PRIORITY == 100
