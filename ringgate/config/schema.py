"""Kong's entity schemas as frozen pydantic models: every field, default and rule in one place.

Field names, defaults, ranges and error texts follow Kong 3.x (kong-spec §1). Where Ringgate
narrows Kong (only http/https for now), the rejection says so explicitly.

Validation errors are raised as `PydanticCustomError` of type "kong" (one message) or
"entity_checks" (several field/entity messages at once, ctx["problems"]); errors.py turns
them, and pydantic's own error types, into Kong's wording.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, Strict, model_validator
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------------------------
# Constants shared with the loader
# --------------------------------------------------------------------------------------------

FORMAT_VERSIONS: Final = ("1.1", "2.1", "3.0")
# Versions whose regex paths had no "~" marker; the loader migrates them (kong-spec §7).
LEGACY_FORMAT_VERSIONS: Final = ("1.1", "2.1")
CANONICAL_FORMAT_VERSION: Final = "3.0"

KONG_PROTOCOLS: Final = ("http", "https", "grpc", "grpcs", "tcp", "tls", "tls_passthrough", "udp")
# Ringgate proxies HTTP/1.1 only; the other Kong protocols are rejected by name.
SUPPORTED_PROTOCOLS: Final = ("http", "https")
# Kong's default plugin protocols: every protocol of the http subsystem.
PLUGIN_DEFAULT_PROTOCOLS: Final = ("grpc", "grpcs", "http", "https")

ALGORITHMS: Final = ("round-robin", "consistent-hashing", "least-connections", "latency")
HASH_INPUTS: Final = ("none", "consumer", "ip", "header", "cookie", "path", "query_arg", "uri_capture")
HEALTHCHECK_TYPES: Final = ("tcp", "http", "https", "grpc", "grpcs")
HTTPS_REDIRECT_CODES: Final = (426, 301, 302, 307, 308)

DEFAULT_TARGET_PORT: Final = 8000  # Kong's default for a target written without a port
MAX_TIMEOUT_MS: Final = 2**31 - 2  # Kong's nonzero_timeout upper bound (fits nginx's msec type)

# Plugin registry: name -> config model (None: accepted without a config schema).
# Empty until plugins are written; ringgate.plugins registers itself here.
KNOWN_PLUGINS: dict[str, type[BaseModel] | None] = {}


# --------------------------------------------------------------------------------------------
# Error helpers and reusable field types
# --------------------------------------------------------------------------------------------

FieldPath = tuple[str | int, ...]


def kong_error(reason: str) -> PydanticCustomError:
    """One validation failure, with `reason` as the exact message shown to the user."""
    return PydanticCustomError("kong", "{reason}", {"reason": reason})


def entity_errors(problems: list[tuple[FieldPath, str]]) -> PydanticCustomError:
    """Several failures found by an entity-level check; an empty path means the whole entity."""
    return PydanticCustomError("entity_checks", "entity checks failed", {"problems": problems})


def _between(low: int | float, high: int | float) -> AfterValidator:
    def check(value: int | float) -> int | float:
        if not low <= value <= high:
            raise kong_error(f"value should be between {low} and {high}")
        return value

    return AfterValidator(check)


def _one_of(*choices: object) -> AfterValidator:
    listed = ", ".join(str(choice) for choice in choices)

    def check(value: object) -> object:
        if value not in choices:
            raise kong_error(f"expected one of: {listed}")
        return value

    return AfterValidator(check)


def _checked(check: Callable[[str], str | None]) -> AfterValidator:
    """Wrap a `str -> error text | None` check as a validator."""

    def run(value: str) -> str:
        reason = check(value)
        if reason is not None:
            raise kong_error(reason)
        return value

    return AfterValidator(run)


Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict()]  # strict float still takes ints (YAML `timeout: 1`)

Port = Annotated[int, Strict(), _between(0, 65535)]
Timeout = Annotated[int, Strict(), _between(1, MAX_TIMEOUT_MS)]
Seconds = Annotated[float, Strict(), _between(0, 65535)]
Counter = Annotated[int, Strict(), _between(0, 255)]
HttpStatus = Annotated[int, Strict(), _between(100, 999)]


# --------------------------------------------------------------------------------------------
# Text checks (Kong's typedefs)
# --------------------------------------------------------------------------------------------

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")
_IPV4_RE = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_COOKIE_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_ASCII_NAME_CHARS_RE = re.compile(r"[A-Za-z0-9.\-_~\u0080-\U0010ffff]+")
_PATH_CHARS_RE = re.compile(r"/[A-Za-z0-9.\-_~/%:@!$&'()*+,;=]*")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2}).{0,2}", re.DOTALL)
_METHOD_RE = re.compile(r"[A-Z]+")
# A 1.1/2.1 path made only of these characters is a prefix; anything else was a regex.
_PLAIN_PATH_RE = re.compile(r"[A-Za-z0-9.\-_~/%]*")


def is_uuid(text: str) -> bool:
    return _UUID_RE.fullmatch(text) is not None


def _check_uuid(text: str) -> str | None:
    return None if is_uuid(text) else "expected a valid UUID"


def _check_utf8_name(name: str) -> str | None:
    if _ASCII_NAME_CHARS_RE.fullmatch(name) is None:
        return f"invalid value '{name}': the only accepted ascii characters are alphanumerics or ., -, _, and ~"
    return None


def _check_tag(tag: str) -> str | None:
    if tag and all((" " <= ch <= "~" and ch not in ",/") or ch >= "\u0080" for ch in tag):
        return None
    return f"invalid tag '{tag}': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"


def _check_header_name(name: str) -> str | None:
    if _HEADER_NAME_RE.fullmatch(name) is None:
        return f"bad header name '{name}', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
    return None


def _check_cookie_name(name: str) -> str | None:
    if _COOKIE_NAME_RE.fullmatch(name) is None:
        return f"bad cookie name '{name}', allowed characters are letters, digits and !#$%&'*+-.^_`|~"
    return None


def _check_not_empty(text: str) -> str | None:
    return "length must be at least 1" if not text else None


def _check_method(method: str) -> str | None:
    return None if _METHOD_RE.fullmatch(method) else f"invalid value: {method}"


def _bad_percent_encoding(path: str) -> str | None:
    bad = _BAD_PERCENT_RE.search(path)
    return None if bad is None else f"invalid url-encoded value: '{bad.group(0)}'"


def _check_path(path: str) -> str | None:
    """Kong's typedefs.path: service paths, cookie paths, health probe paths."""
    if not path.startswith("/"):
        return "should start with: /"
    if "//" in path:
        return "must not have empty segments"
    if _PATH_CHARS_RE.fullmatch(path) is None:
        return f"invalid path: '{path}' (characters outside of the reserved list of RFC 3986 found)"
    return _bad_percent_encoding(path)


class HostPort:
    """A parsed `host[:port]`: kind is "ipv4", "ipv6" or "name"; ipv6 hosts are kept without brackets."""

    __slots__ = ("kind", "host", "port")

    def __init__(self, kind: str, host: str, port: int | None) -> None:
        self.kind = kind
        self.host = host
        self.port = port

    def format(self, default_port: int) -> str:
        host = f"[{self.host}]" if self.kind == "ipv6" else self.host
        return f"{host}:{self.port if self.port is not None else default_port}"


def _parse_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError("invalid port number")
    return int(text)


def parse_host_port(text: str) -> HostPort:
    """Parse like Kong's normalize_ip: IPv4, [IPv6], bare IPv6 or hostname, each with optional port.

    Raises ValueError with "invalid port number" or "invalid value: <text>".
    """
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid value: {text}")
        port = _parse_port(rest[1:]) if rest else None
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"invalid value: {text}") from None
        return HostPort("ipv6", address, port)
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"invalid value: {text}") from None
        return HostPort("ipv6", text, None)
    host, colon, port_text = text.partition(":")
    port = _parse_port(port_text) if colon else None
    ipv4 = _IPV4_RE.fullmatch(host)
    if ipv4 is not None:
        if any(int(octet) > 255 for octet in ipv4.groups()):
            raise ValueError(f"invalid value: {text}")
        return HostPort("ipv4", host, port)
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(len(label) <= 63 and _HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"invalid value: {text}")
    return HostPort("name", host, port)


def _check_host(host: str) -> str | None:
    """typedefs.host: hostname or IP, no port."""
    try:
        parsed = parse_host_port(host)
    except ValueError as exc:
        return "must not have a port" if str(exc) == "invalid port number" else f"invalid value: {host}"
    return "must not have a port" if parsed.port is not None else None


def _check_host_with_optional_port(host: str) -> str | None:
    try:
        parse_host_port(host)
    except ValueError as exc:
        return str(exc)
    return None


def _check_sni(host: str) -> str | None:
    try:
        parsed = parse_host_port(host)
    except ValueError as exc:
        return "must not have a port" if str(exc) == "invalid port number" else f"invalid value: {host}"
    if parsed.kind != "name":
        return "must not be an IP"
    return "must not have a port" if parsed.port is not None else None


def _check_wildcard_host(host: str) -> str | None:
    """typedefs.wildcard_host: an SNI name, optionally with one leading or trailing "*" (not an IP, no port)."""
    star = host.find("*")
    if star != -1:
        if star not in (0, len(host) - 1):
            return "wildcard must be leftmost or rightmost character"
        if host.count("*") > 1:
            return "only one wildcard must be specified"
    try:
        parsed = parse_host_port(host.replace("*", "wildcard"))
    except ValueError as exc:
        return "must not have a port" if str(exc) == "invalid port number" else f"invalid value: {host}"
    if parsed.kind != "name":
        return "must not be an IP"
    return "must not have a port" if parsed.port is not None else None


def _check_route_host(host: str) -> str | None:
    if host.count("*") > 1:
        return "invalid wildcard: must have at most one wildcard"
    if "*" in host and not (host.startswith("*.") or host.endswith(".*")):
        return "invalid wildcard: must be placed at leftmost or rightmost label"
    try:
        parse_host_port(host.replace("*", "wildcard"))
    except ValueError as exc:
        return "invalid port number" if str(exc) == "invalid port number" else f"invalid value: {host}"
    return None


def _check_upstream_name(name: str) -> str | None:
    try:
        parsed = parse_host_port(name)
    except ValueError:
        return f"Invalid name ('{name}'); must be a valid hostname"
    if parsed.kind != "name":
        return f"Invalid name ('{name}'); no ip addresses allowed"
    if parsed.port is not None:
        return f"Invalid name ('{name}'); no port allowed"
    return None


def normalize_target(target: str) -> str:
    """`host[:port]` -> "host:port" with Kong's default port 8000; IPv6 as "[::1]:80"."""
    try:
        parsed = parse_host_port(target)
    except ValueError:
        raise kong_error(f"Invalid target ('{target}'); not a valid hostname or ip address") from None
    return parsed.format(DEFAULT_TARGET_PORT)


def _check_protocol(protocol: str) -> str | None:
    if protocol not in KONG_PROTOCOLS:
        return "expected one of: " + ", ".join(KONG_PROTOCOLS)
    if protocol not in SUPPORTED_PROTOCOLS:
        return f"protocol '{protocol}' is not supported by Ringgate (supported: http, https)"
    return None


def _check_plugin_protocol(protocol: str) -> str | None:
    return None if protocol in KONG_PROTOCOLS else "expected one of: " + ", ".join(KONG_PROTOCOLS)


def _check_plugin_name(name: str) -> str | None:
    if name not in KNOWN_PLUGINS:
        return f"plugin '{name}' not enabled; add it to the 'plugins' configuration property"
    return None


@functools.cache
def _router_checks() -> tuple[Callable[[str], str], Callable[[str], Any]]:
    # Imported lazily: the compiled router may be rebuilt while the config package is imported,
    # and config loading is the only place that needs it.
    from fastpath.router import compile_route_regex, normalize_path

    return normalize_path, compile_route_regex


def _check_route_path(path: str) -> str | None:
    """typedefs.router_path of Kong 3.x: "/prefix" (normalized) or "~/regex" (must compile)."""
    if not (path.startswith("/") or path.startswith("~/")):
        return "should start with: / (fixed path) or ~/ (regex path)"
    if "//" in path:
        return "must not have empty segments"
    normalize_path, compile_route_regex = _router_checks()
    if path.startswith("~"):
        try:
            compile_route_regex(path[1:])
        except ValueError as exc:
            return str(exc)
        return None
    bad_percent = _bad_percent_encoding(path)
    if bad_percent is not None:
        return bad_percent
    normalized = normalize_path(path)
    if normalized != path:
        return f"non-normalized path, consider use '{normalized}' instead"
    return None


def migrate_legacy_path(path: str) -> str:
    """A 1.1/2.1 path that is not plain prefix text was a regex: mark it with "~" as 3.0 requires."""
    if path.startswith("~") or _PLAIN_PATH_RE.fullmatch(path):
        return path
    return "~" + path


UUIDStr = Annotated[str, Strict(), _checked(_check_uuid)]
Utf8Name = Annotated[str, Strict(), _checked(_check_utf8_name)]
Tag = Annotated[str, Strict(), _checked(_check_tag)]
Tags = tuple[Tag, ...]
HeaderName = Annotated[str, Strict(), _checked(_check_header_name)]
Path = Annotated[str, Strict(), _checked(_check_path)]
Sni = Annotated[str, Strict(), _checked(_check_sni)]
WildcardSni = Annotated[str, Strict(), _checked(_check_wildcard_host)]
NonEmptyStr = Annotated[str, Strict(), _checked(_check_not_empty)]


def _check_header_map(headers: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    problems: list[tuple[FieldPath, str]] = []
    for name, values in headers.items():
        if name.lower() == "host":
            problems.append(((name,), "cannot contain 'host' header, which must be specified in the 'hosts' attribute"))
            continue
        reason = _check_header_name(name)
        if reason is not None:
            problems.append(((name,), reason))
        for index, value in enumerate(values):
            if value.startswith("~*"):
                # A "~*" value is a case-insensitive regex; catch a bad one now, not at router build.
                try:
                    _router_checks()[1](value[2:])
                except ValueError as exc:
                    problems.append(((name, index), str(exc)))
    if problems:
        raise entity_errors(problems)
    return headers


HeaderMap = Annotated[dict[Str, tuple[Str, ...]], AfterValidator(_check_header_map)]


def _check_probe_headers(headers: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    for name in headers:
        reason = _check_header_name(name)
        if reason is not None:
            raise kong_error(reason)
    return headers


ProbeHeaderMap = Annotated[dict[Str, tuple[Str, ...]], AfterValidator(_check_probe_headers)]


def _certificate_reference(value: Any) -> Any:
    """Kong writes a certificate FK as {id: ...}; accept that or the bare id."""
    if isinstance(value, dict) and set(value) == {"id"}:
        return value["id"]
    return value


# --------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------


class Record(BaseModel):
    """Immutable record that rejects unknown fields, like Kong's schema records."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Entity(Record):
    """Fields every Kong entity has. `id` is always set: the loader generates stable ones."""

    id: UUIDStr
    # Accepted so that Kong exports load unchanged; Ringgate does not rely on them.
    created_at: Number | None = None
    updated_at: Number | None = None
    tags: Tags | None = None


def _service_url_parts(url: str) -> dict[str, Any]:
    """Expand Kong's `url` shorthand; port 80/443 by scheme, scheme https for a bare `:443`."""
    parts = urlsplit(url if "://" in url else "//" + url)
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc:
        raise ValueError("missing host in url")
    try:
        parsed = parse_host_port(netloc)
    except ValueError as exc:
        raise ValueError(f"could not parse url: {exc}") from None
    protocol = parts.scheme.lower() or ("https" if parsed.port == 443 else "http")
    port = parsed.port if parsed.port is not None else (443 if protocol == "https" else 80)
    # An IPv6 host comes out without its brackets, as Kong's url parser returns it.
    return {"protocol": protocol, "host": parsed.host, "port": port, "path": parts.path or None}


_URL_FIELDS: Final = ("protocol", "host", "port", "path")


class Service(Entity):
    name: Utf8Name | None = None
    protocol: Annotated[str, Strict(), _checked(_check_protocol)] = "http"
    host: Annotated[str, Strict(), _checked(_check_host)]
    port: Port = 80
    path: Path | None = None
    # Kong retries 5 times: 6 attempts, only for connect/send/header-read failures.
    retries: Annotated[int, Strict(), _between(0, 32767)] = 5
    connect_timeout: Timeout = 60000
    write_timeout: Timeout = 60000
    read_timeout: Timeout = 60000
    # A disabled service's routes are left out of the router (requests get 404).
    enabled: Bool = True
    # None = nginx's proxy_ssl_verify default, which is off.
    tls_verify: Bool | None = None
    tls_verify_depth: Annotated[int, Strict(), _between(0, 64)] | None = None
    ca_certificates: tuple[UUIDStr, ...] | None = None
    client_certificate: UUIDStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _expand_url(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "client_certificate" in data:
            data["client_certificate"] = _certificate_reference(data["client_certificate"])
        url = data.pop("url", None)
        if url is None:
            return data
        # The shorthand decides protocol, host, port and path: report its own problems alone.
        if not isinstance(url, str):
            raise entity_errors([(("url",), "expected a string")])
        if any(data.get(name) is not None for name in _URL_FIELDS):
            raise entity_errors([(("url",), "cannot be combined with 'protocol', 'host', 'port' or 'path'")])
        try:
            data.update(_service_url_parts(url))
        except ValueError as exc:
            raise entity_errors([(("url",), str(exc))]) from None
        return data

    @model_validator(mode="after")
    def _entity_checks(self) -> Service:
        problems: list[tuple[FieldPath, str]] = []
        if self.protocol != "https":
            for name in ("tls_verify", "ca_certificates", "client_certificate"):
                if getattr(self, name) is not None:
                    problems.append(((name,), "can only be set when 'protocol' is 'https'"))
        if problems:
            raise entity_errors(problems)
        return self


def _non_empty_set(values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise kong_error("length must be at least 1")
    return values


RouteProtocol = Annotated[str, Strict(), _checked(_check_protocol)]


class Route(Entity):
    name: Utf8Name | None = None
    # Kong's default: a route answers both plain and TLS traffic.
    protocols: Annotated[tuple[RouteProtocol, ...], AfterValidator(_non_empty_set)] = ("http", "https")
    methods: tuple[Annotated[str, Strict(), _checked(_check_method)], ...] | None = None
    hosts: tuple[Annotated[str, Strict(), _checked(_check_route_host)], ...] | None = None
    paths: tuple[Annotated[str, Strict(), _checked(_check_route_path)], ...] | None = None
    headers: HeaderMap | None = None
    # Kong's traditional_compatible router accepts wildcard SNIs ("*.a.com", "a.*") here.
    snis: tuple[WildcardSni, ...] | None = None
    sources: tuple[dict[Str, Any], ...] | None = None
    destinations: tuple[dict[Str, Any], ...] | None = None
    # Kong strips the matched prefix before proxying unless told otherwise.
    strip_path: Bool = True
    preserve_host: Bool = False
    regex_priority: Int = 0
    # v0 is Kong's path join; v1 is deprecated (and ignored by Kong's compat router).
    path_handling: Annotated[str, Strict(), _one_of("v0", "v1")] = "v0"
    # 426 Upgrade Required tells an http client to retry over https.
    https_redirect_status_code: Annotated[int, Strict(), _one_of(*HTTPS_REDIRECT_CODES)] = 426
    request_buffering: Bool = True
    # Kong buffers responses by default; SSE and other streams need false.
    response_buffering: Bool = True
    service: UUIDStr | None = None

    @model_validator(mode="after")
    def _entity_checks(self) -> Route:
        problems: list[tuple[FieldPath, str]] = []
        matchers = ["methods", "hosts", "headers", "paths"]
        if "https" in self.protocols:
            matchers.append("snis")
            label = "https"
        else:
            label = "http"
        if not any(getattr(self, name) for name in matchers):
            listed = ", ".join(f"'{name}'" for name in matchers)
            problems.append(((), f"must set one of {listed} when 'protocols' is '{label}'"))
        if self.snis and "https" not in self.protocols:
            problems.append(
                (
                    ("snis",),
                    "'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls', 'tls_passthrough', or 'wss'",
                )
            )
        for name in ("sources", "destinations"):
            if getattr(self, name):
                problems.append(((name,), f"cannot set '{name}' when 'protocols' is 'http' or 'https'"))
        if problems:
            raise entity_errors(problems)
        return self


# Health checks: every default is Kong's; 0 means "disabled" for intervals and counters.


class ActiveHealthy(Record):
    interval: Seconds = 0.0
    http_statuses: tuple[HttpStatus, ...] = (200, 302)
    successes: Counter = 0


class ActiveUnhealthy(Record):
    interval: Seconds = 0.0
    http_statuses: tuple[HttpStatus, ...] = (429, 404, 500, 501, 502, 503, 504, 505)
    tcp_failures: Counter = 0
    timeouts: Counter = 0
    http_failures: Counter = 0


class ActiveHealthcheck(Record):
    type: Annotated[str, Strict(), _one_of(*HEALTHCHECK_TYPES)] = "http"
    timeout: Seconds = 1.0
    concurrency: Annotated[int, Strict(), _between(1, 2**31)] = 10
    http_path: Path = "/"
    https_verify_certificate: Bool = True
    https_sni: Sni | None = None
    headers: ProbeHeaderMap | None = None
    healthy: ActiveHealthy = Field(default_factory=ActiveHealthy)
    unhealthy: ActiveUnhealthy = Field(default_factory=ActiveUnhealthy)


class PassiveHealthy(Record):
    http_statuses: tuple[HttpStatus, ...] = (
        200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
        300, 301, 302, 303, 304, 305, 306, 307, 308,
    )  # fmt: skip
    successes: Counter = 0


class PassiveUnhealthy(Record):
    http_statuses: tuple[HttpStatus, ...] = (429, 500, 503)
    tcp_failures: Counter = 0
    timeouts: Counter = 0
    http_failures: Counter = 0


class PassiveHealthcheck(Record):
    type: Annotated[str, Strict(), _one_of(*HEALTHCHECK_TYPES)] = "http"
    healthy: PassiveHealthy = Field(default_factory=PassiveHealthy)
    unhealthy: PassiveUnhealthy = Field(default_factory=PassiveUnhealthy)


class Outlier(Record):
    """Ringgate's extension, not in Kong: passive ejection that recovers (Envoy's outlier detection).

    Kong's passive checks mark a target unhealthy for good (only active checks or the Admin API
    bring it back), a known defect; here an ejected target gets one trial request after
    base x (consecutive ejections), capped at max. base_ejection_time 0 restores Kong's behaviour.
    """

    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0
    # Never keep more than this share of the upstream's targets ejected by passive checks.
    max_ejection_percent: Annotated[float, Strict(), _between(0, 100)] = 100.0
    # Below this share of healthy weight, ignore health and spread over every target (Envoy's panic mode).
    panic_threshold: Annotated[float, Strict(), _between(0, 100)] = 0.0


class Healthchecks(Record):
    active: ActiveHealthcheck = Field(default_factory=ActiveHealthcheck)
    passive: PassiveHealthcheck = Field(default_factory=PassiveHealthcheck)
    outlier: Outlier = Field(default_factory=Outlier)
    # Percent of total weight that must be available; 0 keeps the balancer healthy while any target is.
    threshold: Annotated[float, Strict(), _between(0, 100)] = 0.0


class Target(Entity):
    """`target` is normalized to "host:port"; `host` and `port` are derived from it."""

    target: Annotated[str, Strict(), AfterValidator(normalize_target)]
    # 0 disables the target: no traffic and no health checks.
    weight: Annotated[int, Strict(), _between(0, 65535)] = 100
    upstream: UUIDStr

    _host: str = PrivateAttr(default="")
    _port: int = PrivateAttr(default=DEFAULT_TARGET_PORT)

    def model_post_init(self, context: Any, /) -> None:
        host, _, port = self.target.rpartition(":")
        self._host = host[1:-1] if host.startswith("[") else host
        self._port = int(port)

    @property
    def host(self) -> str:
        """Hostname or IP; IPv6 without brackets."""
        return self._host

    @property
    def port(self) -> int:
        return self._port


# The fallback for each hash input must differ from it, except those with their own name fields.
_HASH_COMPANIONS: Final = {
    "header": ("hash_on_header", "hash_fallback_header"),
    "query_arg": ("hash_on_query_arg", "hash_fallback_query_arg"),
    "uri_capture": ("hash_on_uri_capture", "hash_fallback_uri_capture"),
}


class Upstream(Entity):
    name: Annotated[str, Strict(), _checked(_check_upstream_name)]
    algorithm: Annotated[str, Strict(), _one_of(*ALGORITHMS)] = "round-robin"
    hash_on: Annotated[str, Strict(), _one_of(*HASH_INPUTS)] = "none"
    hash_fallback: Annotated[str, Strict(), _one_of(*HASH_INPUTS)] = "none"
    hash_on_header: HeaderName | None = None
    hash_fallback_header: HeaderName | None = None
    hash_on_cookie: Annotated[str, Strict(), _checked(_check_cookie_name)] | None = None
    hash_on_cookie_path: Path = "/"
    hash_on_query_arg: NonEmptyStr | None = None
    hash_fallback_query_arg: NonEmptyStr | None = None
    hash_on_uri_capture: NonEmptyStr | None = None
    hash_fallback_uri_capture: NonEmptyStr | None = None
    # Size of the consistent-hashing continuum (round-robin ignores it).
    slots: Annotated[int, Strict(), _between(10, 2**16)] = 10000
    host_header: Annotated[str, Strict(), _checked(_check_host_with_optional_port)] | None = None
    client_certificate: UUIDStr | None = None
    use_srv_name: Bool = False
    healthchecks: Healthchecks = Field(default_factory=Healthchecks)
    # Attached by the loader (nested and top-level targets merged); not part of the dumped upstream.
    targets: tuple[Target, ...] = Field(default=(), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _hashing_selects_algorithm(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "client_certificate" in data:
            data["client_certificate"] = _certificate_reference(data["client_certificate"])
        hash_on = data.get("hash_on")
        if isinstance(hash_on, str) and hash_on != "none" and hash_on in HASH_INPUTS:
            # Kong: any hash input switches the balancer to consistent-hashing.
            data["algorithm"] = "consistent-hashing"
        return data

    @model_validator(mode="after")
    def _entity_checks(self) -> Upstream:
        problems: list[tuple[FieldPath, str]] = []
        hash_on, fallback = self.hash_on, self.hash_fallback
        for role, mode in (("on", hash_on), ("fallback", fallback)):
            if mode in _HASH_COMPANIONS:
                companion = _HASH_COMPANIONS[mode][0 if role == "on" else 1]
                if getattr(self, companion) is None:
                    problems.append(((companion,), f"required field missing when 'hash_{role}' is '{mode}'"))
            elif mode == "cookie" and self.hash_on_cookie is None:
                problems.append((("hash_on_cookie",), f"required field missing when 'hash_{role}' is 'cookie'"))
        if hash_on in ("none", "cookie"):
            if fallback != "none":
                problems.append((("hash_fallback",), f"must be 'none' when 'hash_on' is '{hash_on}'"))
        elif fallback == hash_on and hash_on not in _HASH_COMPANIONS:
            problems.append((("hash_fallback",), f"must differ from 'hash_on' ('{hash_on}')"))
        for on_field, fallback_field in _HASH_COMPANIONS.values():
            on_value = getattr(self, on_field)
            if on_value is not None and on_value == getattr(self, fallback_field):
                problems.append(((), f"values of these fields must be distinct: '{on_field}', '{fallback_field}'"))
        if problems:
            raise entity_errors(problems)
        return self


class Plugin(Entity):
    name: Annotated[str, Strict(), _checked(_check_plugin_name)]
    instance_name: Utf8Name | None = None
    config: dict[Str, Any] = Field(default_factory=dict)
    enabled: Bool = True
    # Kong's default: every protocol of the http subsystem.
    protocols: Annotated[
        tuple[Annotated[str, Strict(), _checked(_check_plugin_protocol)], ...],
        AfterValidator(_non_empty_set),
    ] = PLUGIN_DEFAULT_PROTOCOLS
    service: UUIDStr | None = None
    route: UUIDStr | None = None
    # Consumers are not implemented yet, so a consumer-scoped plugin cannot be honoured.
    consumer: None = None


# PEM text; the checks on its content live in ringgate.tls and need cryptography, imported on
# first use so that a config without certificates does not pay for them.
Pem = Annotated[str, Strict(), _checked(_check_not_empty)]


class Certificate(Entity):
    """A server certificate (chain, leaf first) and its key; `cert_alt`/`key_alt` add a second key type."""

    cert: Pem
    key: Pem
    cert_alt: Pem | None = None
    key_alt: Pem | None = None

    @model_validator(mode="after")
    def _entity_checks(self) -> Certificate:
        from ringgate.tls import certificate_problems

        problems: list[tuple[FieldPath, str]] = []
        if (self.cert_alt is None) != (self.key_alt is None):
            problems.append(((), "all or none of these fields must be set: 'cert_alt', 'key_alt'"))
        problems += certificate_problems(self.cert, self.key, self.cert_alt, self.key_alt)
        if problems:
            raise entity_errors(problems)
        return self


class ServerName(Entity):
    """Kong's `snis` entity: a server name (exact, "*.a.com", "a.*" or "*") served with a certificate."""

    name: WildcardSni
    certificate: UUIDStr

    @model_validator(mode="before")
    @classmethod
    def _certificate_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "certificate" in data:
            data = {**data, "certificate": _certificate_reference(data["certificate"])}
        return data


class CACertificate(Entity):
    """A trusted CA for upstream verification; `cert_digest` is always recomputed from `cert`, as Kong does."""

    cert: Pem
    cert_digest: Str | None = None

    @model_validator(mode="after")
    def _entity_checks(self) -> CACertificate:
        from ringgate.tls import ca_certificate_digest, ca_certificate_problems

        problems = ca_certificate_problems(self.cert)
        if problems:
            raise entity_errors(problems)
        # Kong's on-write transformation: the digest is derived from the certificate, whatever the input said.
        object.__setattr__(self, "cert_digest", ca_certificate_digest(self.cert))
        return self


def plugin_config_model(name: str) -> type[BaseModel] | None:
    """The registered config schema for plugin `name` (None when it has none or is unknown)."""
    return KNOWN_PLUGINS.get(name)
