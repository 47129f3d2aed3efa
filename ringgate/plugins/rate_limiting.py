"""Kong's `rate-limiting` plugin with the `local` policy: fixed calendar windows counted in shared memory.

Counters live in the node's SharedDict (`node.shdict`), which every worker of the node maps, so
a limit holds for the node as a whole, not per worker. Kong reads the counters, decides, and
increments them later from a timer; two workers can then both let the last allowed request
through. Here each request increments first (an atomic add) and decides on the value it got, so
exactly `limit` requests pass per window; a refused request takes its increments back, so, as in
Kong, refused requests do not count.

Headers and numbers are Kong's (handler.lua): X-RateLimit-Limit-<Period> and
X-RateLimit-Remaining-<Period> for each configured period, RateLimit-Limit/-Remaining/-Reset for
the most constrained one, and Retry-After on the refusal.
"""
from __future__ import annotations

import calendar
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import AfterValidator, Strict, model_validator

from ringgate.config.schema import Bool, FieldPath, HeaderName, Number, Path, Str, entity_errors, kong_error
from ringgate.negotiation import prefers_text
from ringgate.plugins.base import Context, Plugin, PluginConfig
from ringgate.plugins.validation import one_of

log = logging.getLogger("ringgate.plugins.rate-limiting")

PERIODS: tuple[str, ...] = ("second", "minute", "hour", "day", "month", "year")
# Kong's window lengths (kong/plugins/rate-limiting/expiration.lua): a "month" is 30 days for
# RateLimit-Reset and for the counter's TTL, whatever the calendar says.
EXPIRATION: dict[str, int] = {
    "second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 2592000, "year": 31536000,
}
X_LIMIT: dict[str, str] = {p: f"X-RateLimit-Limit-{p.capitalize()}" for p in PERIODS}
X_REMAINING: dict[str, str] = {p: f"X-RateLimit-Remaining-{p.capitalize()}" for p in PERIODS}
POLICIES: tuple[str, ...] = ("local", "cluster", "redis")
LIMIT_BY: tuple[str, ...] = ("consumer", "credential", "ip", "service", "header", "path")
SYNC_RATE_REALTIME = -1.0


def _positive(value: float) -> float:
    if value <= 0:
        raise kong_error("value must be greater than 0")
    return value


Positive = Annotated[float, Strict(), AfterValidator(_positive)]


class Config(PluginConfig):
    second: Positive | None = None
    minute: Positive | None = None
    hour: Positive | None = None
    day: Positive | None = None
    month: Positive | None = None
    year: Positive | None = None
    limit_by: Annotated[str, Strict(), one_of(*LIMIT_BY)] = "consumer"
    header_name: HeaderName | None = None
    path: Path | None = None
    policy: Annotated[str, Strict(), one_of(*POLICIES)] = "local"
    fault_tolerant: Bool = True
    hide_client_headers: Bool = False
    error_code: Positive = 429
    error_message: Str = "API rate limit exceeded"
    sync_rate: Number = SYNC_RATE_REALTIME
    # Kong's redis settings (and their deprecated flat forms) are accepted so that a Kong export
    # loads, and ignored: only the local policy runs here.
    redis: dict[Str, Any] | None = None
    redis_host: Any = None
    redis_port: Any = None
    redis_password: Any = None
    redis_username: Any = None
    redis_ssl: Any = None
    redis_ssl_verify: Any = None
    redis_server_name: Any = None
    redis_timeout: Any = None
    redis_database: Any = None

    @model_validator(mode="after")
    def _kong_checks(self) -> Config:
        # Kong's custom_validator first (an error on `config`), then its entity checks.
        limits = [(period, getattr(self, period)) for period in PERIODS]
        for i, (lower, low_value) in enumerate(limits):
            if low_value is None:
                continue
            for upper, up_value in limits[i + 1:]:
                if up_value is not None and up_value < low_value:
                    raise kong_error(f"The limit for {upper}({up_value:.1f}) cannot be lower than the limit for "
                                     f"{lower}({low_value:.1f})")
        if self.policy != "redis" and self.sync_rate != SYNC_RATE_REALTIME:
            raise kong_error("sync_rate can only be used with the redis policy")
        problems: list[tuple[FieldPath, str]] = []
        if all(value is None for _, value in limits):
            fields = ", ".join(f"'config.{period}'" for period in PERIODS)
            problems.append(((), f"at least one of these fields must be non-empty: {fields}"))
        if self.limit_by == "header" and self.header_name is None:
            problems.append((("header_name",), "required field missing"))
        if self.limit_by == "path" and self.path is None:
            problems.append((("path",), "required field missing"))
        if self.policy != "local":
            problems.append((("policy",), (f"policy '{self.policy}' is not supported by Ringgate: use 'local' "
                                           "(counters in the node's shared memory, shared by all its workers)")))
        if problems:
            raise entity_errors(problems)
        return self


def period_starts(now: int) -> dict[str, int]:
    """Start (epoch seconds, UTC) of the calendar second, minute, hour, day, month and year holding `now`."""
    t = time.gmtime(now)
    minute = now - t.tm_sec
    hour = minute - t.tm_min * 60
    day = hour - t.tm_hour * 3600
    return {
        "second": now,
        "minute": minute,
        "hour": hour,
        "day": day,
        "month": calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)),
        "year": calendar.timegm((t.tm_year, 1, 1, 0, 0, 0)),
    }


def header_number(value: float) -> str:
    """Numbers as Lua prints them in headers: integral values without a fraction."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def error_answer(ctx: Context, status: int, message: str) -> tuple[bytes, str]:
    """Kong's kong.response.error body: JSON by default, text/plain when Accept prefers text."""
    if prefers_text(ctx.header("accept")):
        return f"{message}\nrequest_id: {ctx.request_id}\n".encode(), "text/plain; charset=utf-8"
    body = b'{\n  "message":' + orjson.dumps(message) + b',\n  "request_id":' + orjson.dumps(ctx.request_id) + b"\n}"
    return body, "application/json; charset=utf-8"


class NoSharedDict(RuntimeError):
    pass


def _take_back(shdict: Any, key: str) -> None:
    try:
        shdict.incr(key, -1)
    except KeyError:
        pass  # evicted or expired meanwhile: nothing to take back (never create a negative count)


class RateLimitingPlugin(Plugin):
    NAME: ClassVar[str] = "rate-limiting"
    PRIORITY: ClassVar[int] = 910
    VERSION: ClassVar[str] = "3.9.0"
    Config: ClassVar[type[PluginConfig]] = Config

    def __init__(self, config: PluginConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        conf: Config = config  # type: ignore[assignment]
        self.limits: tuple[tuple[str, float], ...] = tuple(
            (period, getattr(conf, period)) for period in PERIODS if getattr(conf, period) is not None)
        self.clock: Callable[[], float] = time.time  # replaced in tests
        self._missing_dict_logged = False

    # -- phases -----------------------------------------------------------------------------

    def access(self, ctx: Context) -> None:
        conf: Config = self.config  # type: ignore[assignment]
        now = int(self.clock())
        identifier = self.identifier(ctx)
        try:
            usage = self.count(identifier, now)
        except Exception as exc:
            if not conf.fault_tolerant:
                raise
            # Kong's fault_tolerant: log and let the request through without headers. A node
            # without a shared dict is said once, not on every request.
            if not isinstance(exc, NoSharedDict) or not self._missing_dict_logged:
                log.error("rate-limiting %s: failed to get usage: %s", self.entity_id, exc)
                self._missing_dict_logged |= isinstance(exc, NoSharedDict)
            return
        stop = None
        for period, limit in self.limits:
            if limit - usage[period] <= 0:
                stop = period
        if stop is not None:
            self.release(identifier, now)
        headers = [] if conf.hide_client_headers else self.headers(usage, stop, now)
        if stop is not None:
            if not conf.hide_client_headers:
                # Kong sends RateLimit-Reset's value as Retry-After (absent when headers are hidden).
                headers.append(("Retry-After", next(v for k, v in headers if k == "RateLimit-Reset")))
            body, content_type = error_answer(ctx, int(conf.error_code), conf.error_message)
            ctx.exit(int(conf.error_code), body, [("Content-Type", content_type), *headers])
        if headers:
            ctx.plugin["headers"] = headers

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        for name, value in ctx.plugin.get("headers", ()):
            ctx.set_response_header(name, value)

    # -- counting ---------------------------------------------------------------------------

    def identifier(self, ctx: Context) -> str:
        """Kong's get_identifier: consumer and credential fall back to the client address (no auth here)."""
        conf: Config = self.config  # type: ignore[assignment]
        found: str | None = None
        if conf.limit_by == "service":
            found = ctx.service_id
        elif conf.limit_by == "header" and conf.header_name is not None:
            found = ctx.header(conf.header_name)
        elif conf.limit_by == "path" and ctx.path == conf.path:
            found = ctx.path
        return found if found is not None else ctx.client_ip

    def counter_key(self, identifier: str, period: str, start: int) -> str:
        """Kong keys a counter by scope, identifier, period and window start; hashed to fit any key_max."""
        raw = f"{self.entity_id}\0{identifier}\0{period}\0{start}".encode("utf-8", "surrogateescape")
        return "rl:" + hashlib.blake2b(raw, digest_size=16).hexdigest()

    def _shdict(self) -> Any:
        shdict = self.node.shdict
        if shdict is None:
            raise NoSharedDict("this node has no shared dict for counters")
        return shdict

    def count(self, identifier: str, now: int) -> dict[str, int]:
        """Count this request in every configured window; usage per period *before* it."""
        shdict = self._shdict()
        starts = period_starts(now)
        usage: dict[str, int] = {}
        done: list[str] = []
        try:
            for period, _ in self.limits:
                key = self.counter_key(identifier, period, starts[period])
                usage[period] = int(shdict.incr(key, 1, init=0, init_ttl=EXPIRATION[period])) - 1
                done.append(key)
        except Exception:
            for key in done:
                _take_back(shdict, key)
            raise
        return usage

    def release(self, identifier: str, now: int) -> None:
        """A refused request does not count: take back what count() added."""
        shdict = self._shdict()
        starts = period_starts(now)
        for period, _ in self.limits:
            _take_back(shdict, self.counter_key(identifier, period, starts[period]))

    def headers(self, usage: dict[str, int], stop: str | None, now: int) -> list[tuple[str, str]]:
        """Kong's headers: per period, then RateLimit-* for the least remaining (ties: the longer window)."""
        out: list[tuple[str, str]] = []
        best: tuple[float, float, int] | None = None  # (limit, remaining, reset)
        best_window = 0
        starts = period_starts(now)
        for period, limit in self.limits:
            remaining = limit - usage[period]
            if stop is None or stop == period:
                remaining -= 1  # this request, when it is let through (or the period that refused it)
            remaining = max(0.0, remaining)
            window = EXPIRATION[period]
            if best is None or remaining < best[1] or (remaining == best[1] and window > best_window):
                reset = max(1, window - (now - starts[period]))
                best, best_window = (limit, remaining, reset), window
            out.append((X_LIMIT[period], header_number(limit)))
            out.append((X_REMAINING[period], header_number(remaining)))
        if best is not None:
            out += [("RateLimit-Limit", header_number(best[0])), ("RateLimit-Remaining", header_number(best[1])),
                    ("RateLimit-Reset", str(best[2]))]
        return out
