"""Kong's `proxy-cache` plugin with the `memory` strategy: whole answers kept in the node's shared cache.

The cache is `node.cache`, a SharedDict with large values that every worker of the node maps,
so an answer stored by one worker is a hit in all of them. A hit is answered in the access phase
(ctx.exit with the stored status, headers and body). A miss goes upstream; header_filter decides
whether the answer may be stored (status, Content-Type, and Cache-Control when `cache_control`
is on), and body_filter copies the chunks aside as they pass to the client, never holding them
back. The copy stops once it is larger than the cache's value limit (that answer is not stored);
at the end of the body the answer is stored under the request's key.

The key is Kong's (cache_key.lua): sha256 of "route id|method|path|query|headers", with the query
arguments (all of them sorted, or `vary_query_params` in their order) and the `vary_headers`.
The path is the request's raw path; Kong's nginx variable also carries the HTTP version when
there is no query, which is not part of the key here.
"""
from __future__ import annotations

import email.utils
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any, ClassVar
from urllib.parse import unquote_plus

import msgpack
from pydantic import AfterValidator, ConfigDict, Field, Strict

from ringgate.config.schema import Bool, Str, kong_error
from ringgate.plugins.base import Context, Plugin, PluginConfig
from ringgate.plugins.chain import apply_header_ops
from ringgate.plugins.validation import one_of

log = logging.getLogger("ringgate.plugins.proxy-cache")

CACHE_VERSION = 1
METHODS: tuple[str, ...] = ("HEAD", "GET", "POST", "PATCH", "PUT")
MAX_QUERY_ARGS = 100  # Kong's kong.request.get_query() default
# Kong's hop_by_hop_headers (content-length is set from the stored body instead).
HOP_BY_HOP: frozenset[str] = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length",
))
DIAGNOSTIC: frozenset[str] = frozenset(("age", "x-cache-status", "x-cache-key"))


# -- config -------------------------------------------------------------------------------------

def _status(value: int) -> int:
    if not 100 <= value <= 900:
        raise kong_error("value should be between 100 and 900")
    return value


def _not_empty(values: tuple[int, ...]) -> tuple[int, ...]:
    if not values:
        raise kong_error("length must be at least 1")
    return values


def _positive(value: int) -> int:
    if value <= 0:
        raise kong_error("value must be greater than 0")
    return value


class ResponseHeaders(PluginConfig):
    """Which diagnostic headers go out (a request with a Kong-Debug header gets all of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    age: Bool = True
    x_cache_status: Bool = Field(True, alias="X-Cache-Status")
    x_cache_key: Bool = Field(True, alias="X-Cache-Key")


class Memory(PluginConfig):
    # Kong names an nginx shared dict; every proxy-cache here uses the node's one cache.
    dictionary_name: Str = "kong_db_cache"


class Config(PluginConfig):
    response_code: Annotated[tuple[Annotated[int, Strict(), AfterValidator(_status)], ...],
                             AfterValidator(_not_empty)] = (200, 301, 404)
    request_method: tuple[Annotated[str, Strict(), one_of(*METHODS)], ...] = ("GET", "HEAD")
    content_type: tuple[Str, ...] = ("text/plain", "application/json")
    cache_ttl: Annotated[int, Strict(), AfterValidator(_positive)] = 300
    strategy: Annotated[str, Strict(), one_of("memory")]
    cache_control: Bool = False
    ignore_uri_case: Bool = False
    storage_ttl: Annotated[int, Strict()] | None = None
    memory: Memory = Field(default_factory=Memory)
    vary_query_params: tuple[Str, ...] | None = None
    vary_headers: tuple[Str, ...] | None = None
    response_headers: ResponseHeaders = Field(default_factory=lambda: ResponseHeaders.model_validate({}))


# -- request and response helpers (Kong's PDK and kong.tools.http) -----------------------------

QueryValue = str | bool | list[str | bool]


def query_args(query: bytes | str | None, limit: int = MAX_QUERY_ARGS) -> dict[str, QueryValue]:
    """kong.request.get_query(): decoded arguments; a bare `flag` is True, a repeated name a list."""
    if not query:
        return {}
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    args: dict[str, QueryValue] = {}
    for count, part in enumerate(text.split("&")):
        if count >= limit:
            break
        if not part:
            continue
        name, sep, value = part.partition("=")
        key = unquote_plus(name)
        if not key:
            continue
        decoded: str | bool = unquote_plus(value) if sep else True
        current = args.get(key)
        if current is None:
            args[key] = decoded
        elif isinstance(current, list):
            current.append(decoded)
        else:
            args[key] = [current, decoded]
    return args


def request_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    """kong.request.get_headers(): lower-case names; a repeated header is a list."""
    headers: dict[str, str | list[str]] = {}
    for name, value in pairs:
        key = name.lower()
        current = headers.get(key)
        if current is None:
            headers[key] = value
        elif isinstance(current, list):
            current.append(value)
        else:
            headers[key] = [current, value]
    return headers


_DIRECTIVE_RE = re.compile(r"\s*([^=]+)(?:=(.+))?")


def parse_directive_header(values: Iterable[str]) -> dict[str, Any]:
    """Kong's parse_directive_header: Cache-Control directives; numbers as numbers, bare ones True."""
    directives: dict[str, Any] = {}
    for item in ", ".join(values).split(","):
        if not item:
            continue
        match = _DIRECTIVE_RE.match(item)
        if match is None or match.group(1) is None:
            continue
        raw = match.group(2)
        value: Any = True
        if raw is not None:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        directives[match.group(1).lower()] = value
    return directives


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def resource_ttl(cc: dict[str, Any], expires: str | None, now: float) -> float:
    """Kong's calculate_resource_ttl: s-maxage, else max-age, else Expires minus now; never below 0."""
    max_age = _number(cc.get("s-maxage"))
    if max_age is None:
        max_age = _number(cc.get("max-age"))
    if max_age is None and expires:
        parsed = email.utils.parsedate_tz(expires)
        if parsed is not None:
            max_age = email.utils.mktime_tz(parsed) - math.floor(now)
    return max(max_age, 0) if max_age is not None else 0


def parse_mime_type(text: str) -> tuple[str, str, str] | None:
    """type, subtype and the parameters as one canonical, sorted "k=v;k=v" string, all in lower case
    (so a charset matches whatever its case)."""
    media, *params = text.split(";")
    kind, slash, subtype = media.strip().lower().partition("/")
    if not (kind and slash and subtype):
        return None
    pairs = []
    for param in params:
        name, sep, value = param.strip().partition("=")
        if sep and name.strip():
            pairs.append(f"{name.strip().lower()}={value.strip().strip(chr(34)).lower()}")
    return kind, subtype, ";".join(sorted(pairs))


class ContentTypes:
    """The configured content types, matched as Kong does: exact type/subtype, `type/*` or `*/*`,
    with the same parameters ("application/json" does not match "application/json; charset=utf-8")."""

    def __init__(self, configured: Iterable[str]) -> None:
        self.patterns: set[tuple[str, str, str]] = set()
        for text in configured:
            parsed = parse_mime_type(text)
            if parsed is not None:
                self.patterns.add(parsed)

    def match(self, content_type: str) -> bool:
        parsed = parse_mime_type(content_type)
        if parsed is None:
            return False
        kind, subtype, params = parsed
        return ((kind, subtype, params) in self.patterns or (kind, "*", params) in self.patterns
                or ("*", "*", params) in self.patterns)


def _generate_key_from(args: dict[str, Any], fields: Iterable[str], lookup: Callable[[str], str]) -> str:
    parts = []
    for field in fields:
        arg = args.get(lookup(field))
        if arg is None:
            continue
        if isinstance(arg, list):
            values = sorted("" if value is True else value for value in arg)
            parts.append(f"{field}={','.join(values)}")
        elif arg is True:
            parts.append(field)
        else:
            parts.append(f"{field}={arg}")
    return ":".join(parts)


def build_cache_key(route_id: str | None, method: str, uri: str, query: dict[str, QueryValue],
                    headers: dict[str, str | list[str]], vary_query_params: tuple[str, ...] | None,
                    vary_headers: tuple[str, ...] | None) -> str:
    """Kong's build_cache_key (no consumers here, so the prefix is the route id or "default")."""
    prefix = route_id or "default"
    params = _generate_key_from(query, vary_query_params or sorted(query), lambda name: name)
    # Header lookups are case-insensitive and treat "_" as "-", as ngx's header table does.
    header_part = _generate_key_from(headers, vary_headers or (), lambda name: name.lower().replace("_", "-"))
    return hashlib.sha256(f"{prefix}|{method}|{uri}|{params}|{header_part}".encode("utf-8", "surrogateescape")
                          ).hexdigest()


def _values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("latin-1") if isinstance(value, bytes) else value


# -- the plugin ---------------------------------------------------------------------------------

class ProxyCachePlugin(Plugin):
    NAME: ClassVar[str] = "proxy-cache"
    PRIORITY: ClassVar[int] = 100
    VERSION: ClassVar[str] = "3.9.0"
    Config: ClassVar[type[PluginConfig]] = Config

    def __init__(self, config: PluginConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        conf: Config = config  # type: ignore[assignment]
        self.methods = frozenset(conf.request_method)
        self.statuses = frozenset(conf.response_code)
        self.content_types = ContentTypes(conf.content_type)
        self.shown = {"age": conf.response_headers.age, "x-cache-status": conf.response_headers.x_cache_status,
                      "x-cache-key": conf.response_headers.x_cache_key}
        self.clock: Callable[[], float] = time.time  # replaced in tests
        self._missing_cache_logged = False

    def _cache(self) -> Any:
        cache = getattr(self.node, "cache", None)
        if cache is None and not self._missing_cache_logged:
            self._missing_cache_logged = True
            log.error("proxy-cache %s: this node has no shared cache; answers are not cached", self.entity_id)
        return cache

    def _show(self, ctx: Context, name: str) -> bool:
        return self.shown[name.lower()] or ctx.header("kong-debug") is not None

    def _signal(self, ctx: Context, state: dict[str, Any], key: str, status: str) -> None:
        """Store this answer later (header_filter, body_filter) and say Miss, Refresh or Bypass."""
        state["store"] = {"key": key}
        if self._show(ctx, "X-Cache-Status"):
            state["headers"].append(("X-Cache-Status", status))

    # -- phases -----------------------------------------------------------------------------

    def access(self, ctx: Context) -> None:
        conf: Config = self.config  # type: ignore[assignment]
        state = ctx.plugin
        state["headers"] = []
        cc = parse_directive_header(_values(ctx.headers, "cache-control"))
        cache = self._cache()
        if cache is None or not self.cacheable_request(ctx, cc):
            if self._show(ctx, "X-Cache-Status"):
                state["headers"].append(("X-Cache-Status", "Bypass"))
            return
        uri = _text(ctx.raw_path) or ctx.path
        if conf.ignore_uri_case:
            uri = uri.lower()
        key = build_cache_key(ctx.route_id, ctx.method, uri, query_args(ctx.query), request_headers(ctx.headers),
                              conf.vary_query_params, conf.vary_headers)
        if self._show(ctx, "X-Cache-Key"):
            state["headers"].append(("X-Cache-Key", key))
        stored = cache.get(key)
        if stored is None:
            if conf.cache_control and cc.get("only-if-cached"):
                # RFC 7234 5.2.1.7: the client wanted a cached answer only.
                ctx.exit(504)
            self._signal(ctx, state, key, "Miss")
            return
        try:
            version, status, headers, body, timestamp, ttl = msgpack.unpackb(stored)
        except (ValueError, TypeError, msgpack.UnpackException):
            version = None
        if version != CACHE_VERSION:
            log.info("proxy-cache %s: cache format mismatch, purging %s", self.entity_id, key)
            cache.delete(key)
            self._signal(ctx, state, key, "Bypass")
            return
        now = self.clock()
        age = now - timestamp
        if conf.cache_control:
            max_age, max_stale, min_fresh = (_number(cc.get(d)) for d in ("max-age", "max-stale", "min-fresh"))
            if ((max_age is not None and age > max_age) or (max_stale is not None and age - ttl > max_stale)
                    or (min_fresh is not None and ttl - age < min_fresh)):
                self._signal(ctx, state, key, "Refresh")
                return
        elif age > conf.cache_ttl:
            # Stored for up to storage_ttl, served for cache_ttl only.
            self._signal(ctx, state, key, "Refresh")
            return
        state["headers"] = []  # the exit answer carries its own
        answer = [(name, value) for name, value in headers
                  if name.lower() not in HOP_BY_HOP and name.lower() not in DIAGNOSTIC
                  and "ratelimit-remaining" not in name.lower()]
        if self._show(ctx, "age"):
            answer.append(("Age", str(math.floor(age))))
        if self._show(ctx, "X-Cache-Status"):
            answer.append(("X-Cache-Status", "Hit"))
        if self._show(ctx, "X-Cache-Key"):
            answer.append(("X-Cache-Key", key))
        ctx.shared["proxy_cache_hit"] = {"status": status, "key": key}
        ctx.exit(status, body, answer)

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        state = ctx.plugin
        store = state.get("store")
        if store is not None:
            conf: Config = self.config  # type: ignore[assignment]
            cc = parse_directive_header(_values(headers, "cache-control"))
            if self.cacheable_response(status, headers, cc):
                # What the client gets, as far as the plugins before this one made it.
                sent = apply_header_ops(headers, ctx.response_headers)
                store["status"] = status
                store["headers"] = [(k, v) for k, v in sent if k.lower() not in HOP_BY_HOP
                                    and k.lower() not in DIAGNOSTIC]
                store["ttl"] = (resource_ttl(cc, _last(headers, "expires"), self.clock()) if conf.cache_control
                                else conf.cache_ttl)
                store["chunks"] = []
                store["size"] = 0
            else:
                state["store"] = None
                state["headers"] = [(k, v) for k, v in state["headers"] if k != "X-Cache-Status"]
                if self._show(ctx, "X-Cache-Status"):
                    state["headers"].append(("X-Cache-Status", "Bypass"))
        for name, value in state.get("headers", ()):
            ctx.set_response_header(name, value)

    def body_filter(self, ctx: Context, chunk: bytes, eof: bool) -> bytes | None:
        state = ctx.plugin
        store = state.get("store")
        if store is None or "chunks" not in store:
            return None
        cache = self._cache()
        if chunk:
            store["size"] += len(chunk)
            if cache is None or store["size"] > cache.value_max:
                state["store"] = None  # too big for the cache: the client still gets all of it
                return None
            store["chunks"].append(bytes(chunk))
        if eof:
            state["store"] = None
            self.store(cache, store)
        return None

    # -- decisions --------------------------------------------------------------------------

    def cacheable_request(self, ctx: Context, cc: dict[str, Any]) -> bool:
        conf: Config = self.config  # type: ignore[assignment]
        if ctx.method not in self.methods:
            return False
        refused = cc.get("no-store") or cc.get("no-cache") or ctx.header("authorization") is not None
        return not (conf.cache_control and refused)

    def cacheable_response(self, status: int, headers: list[tuple[str, str]], cc: dict[str, Any]) -> bool:
        conf: Config = self.config  # type: ignore[assignment]
        if status not in self.statuses:
            return False
        content_types = _values(headers, "content-type")
        if len(content_types) != 1 or not content_types[0] or not self.content_types.match(content_types[0]):
            return False
        if conf.cache_control:
            if cc.get("private") or cc.get("no-store") or cc.get("no-cache"):
                return False
            if resource_ttl(cc, _last(headers, "expires"), self.clock()) <= 0:
                return False
        return True

    def store(self, cache: Any, store: dict[str, Any]) -> None:
        conf: Config = self.config  # type: ignore[assignment]
        body = b"".join(store["chunks"])
        value = msgpack.packb([CACHE_VERSION, store["status"], store["headers"], body, math.floor(self.clock()),
                               store["ttl"]])
        ttl = conf.storage_ttl or (store["ttl"] if conf.cache_control else conf.cache_ttl)
        try:
            cache.set(store["key"], value, ttl=ttl)
        except ValueError:
            log.debug("proxy-cache %s: answer of %d bytes is over the cache's value limit; not stored",
                      self.entity_id, len(value))
        except Exception:
            log.exception("proxy-cache %s: could not store %s", self.entity_id, store["key"])


def _last(headers: list[tuple[str, str]], name: str) -> str | None:
    values = _values(headers, name)
    return values[-1] if values else None
