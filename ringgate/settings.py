"""Node settings: what Kong keeps in kong.conf, as flags and RINGGATE_* environment variables.

Every default lives here with the reason for it. The declarative entities (services,
routes, ...) are in ringgate.config; this module is only about the process.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

ENV_PREFIX = "RINGGATE_"
# The master's pid, under the prefix: `ringgate stop` / `reload` find the running node through it.
PID_FILE = "ringgate.pid"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, setting: str) -> ListenAddress:
    """Parse Kong's listen syntax, one address: "0.0.0.0:8000", "[::1]:8000", ":8000"."""
    value = text.strip().split(",")[0].split()[0] if text.strip() else ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = value.rpartition(":")
    host = host or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"{setting}: invalid listen address {text!r} (expected HOST:PORT)") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{setting}: port {port} out of range 0..65535")
    return ListenAddress(host, port)


@dataclass(frozen=True)
class ListenSpec:
    """One entry of Kong's listen syntax: an address and the flags Ringgate acts on."""

    address: ListenAddress
    ssl: bool = False
    # The master binds one socket that every worker accepts on, so the kernel already spreads
    # connections; kept so the master can choose per-worker SO_REUSEPORT sockets instead.
    reuseport: bool = False
    # The listen(2) backlog; None leaves the server's default.
    backlog: int | None = None

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    def __str__(self) -> str:
        flags = ["ssl"] * self.ssl + ["reuseport"] * self.reuseport
        if self.backlog is not None:
            flags.append(f"backlog={self.backlog}")
        return " ".join([str(self.address), *flags])


# Flags Kong accepts that only tune nginx and change nothing for a client: accepted so a
# kong.conf listen line works unchanged, then ignored.
#  deferred        nginx's TCP_DEFER_ACCEPT (wake the accept only when data arrived): a CPU saving;
#  bind            makes nginx bind this address on its own socket; Ringgate binds every entry itself;
#  ipv6only=on|off nginx's IPV6_V6ONLY for "[::]"; Ringgate's IPv6 sockets are v6-only, nginx's default;
#  so_keepalive=.. TCP keep-alive probes on client sockets; clients are bounded by Ringgate's idle timeouts.
_IGNORED_LISTEN_FLAGS = ("deferred", "bind", "ipv6only=on", "ipv6only=off")
_UNSUPPORTED_LISTEN_FLAGS = {
    "http2": "HTTP/2 is not supported: Ringgate speaks HTTP/1.1 (TLS clients negotiate http/1.1 by ALPN)",
    "proxy_protocol": "the PROXY protocol is not supported",
}
_LISTEN_FORM = "HOST:PORT [ssl] [reuseport] [backlog=N] [deferred] [bind], ... or off"


def parse_listen_list(text: str, setting: str) -> tuple[ListenSpec, ...]:
    """Parse Kong's listen syntax: "0.0.0.0:8000, 0.0.0.0:8443 ssl reuseport backlog=16384".

    "off" (alone) gives no listener. http2 and proxy_protocol are refused with the reason;
    nginx-only tuning flags are accepted and ignored; anything else is refused.
    """
    if text.strip() == "off":
        return ()
    specs: list[ListenSpec] = []
    seen: set[tuple[str, int]] = set()
    for entry in text.split(","):
        words = entry.split()
        if not words:
            raise SettingsError(f"{setting}: empty listen entry in {text!r} (expected {_LISTEN_FORM})")
        address = parse_listen(words[0], setting)
        values: dict[str, Any] = {}
        for flag in words[1:]:
            name, equals, value = flag.partition("=")
            if flag in ("ssl", "reuseport"):
                values[flag] = True
            elif name == "backlog" and equals:
                if not value.isdigit() or int(value) < 1:
                    raise SettingsError(f"{setting}: backlog must be a positive integer, got {flag!r}")
                values["backlog"] = int(value)
            elif flag in _IGNORED_LISTEN_FLAGS or (name == "so_keepalive" and equals):
                continue
            elif flag in _UNSUPPORTED_LISTEN_FLAGS:
                raise SettingsError(f"{setting}: flag '{flag}' in {entry.strip()!r}: {_UNSUPPORTED_LISTEN_FLAGS[flag]}")
            else:
                raise SettingsError(
                    f"{setting}: unknown flag {flag!r} in {entry.strip()!r} (expected {_LISTEN_FORM})"
                )
        key = (address.host, address.port)
        if key in seen and address.port != 0:
            raise SettingsError(f"{setting}: {address} is listed twice")
        seen.add(key)
        specs.append(ListenSpec(address, **values))
    return tuple(specs)


class ListenList(tuple[ListenSpec, ...]):
    """The listen entries of one setting, in order; str() is Kong's comma-separated form."""

    def __str__(self) -> str:
        return ", ".join(str(spec) for spec in self)

    @property
    def tls(self) -> bool:
        """Whether any entry serves TLS (then the node needs its certificates)."""
        return any(spec.ssl for spec in self)


def parse_proxy_listen(text: str, setting: str) -> ListenList:
    """Kong's proxy_listen: every entry, plain or `ssl`; at least one (Ringgate has no proxy-less mode)."""
    specs = parse_listen_list(text, setting)
    if not specs:
        raise SettingsError(f"{setting}: 'off' is not supported, the proxy needs at least one address")
    return ListenList(specs)


def parse_admin_listen(text: str, setting: str) -> ListenAddress:
    """One plain address; flags are read with Kong's syntax so that `ssl` is refused rather than ignored."""
    specs = parse_listen_list(text, setting)
    if len(specs) != 1:
        raise SettingsError(f"{setting}: expected exactly one address (HOST:PORT), got {text.strip()!r}")
    if specs[0].ssl:
        raise SettingsError(f"{setting}: 'ssl' is not supported on the admin listener yet")
    return specs[0].address


DEFAULT_PROXY_LISTEN = ListenList((ListenSpec(ListenAddress("0.0.0.0", 8000)),))


def parse_networks(text: str, setting: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(f"{setting}: invalid address or CIDR {item!r}") from None
    return tuple(nets)


@dataclass(frozen=True)
class Settings:
    # Kong's ports: 8000 proxy on all interfaces, 8001 admin on loopback only. Kong also listens on
    # 8443 ssl by default; Ringgate binds TLS only where asked ("0.0.0.0:8000, 0.0.0.0:8443 ssl").
    proxy_listen: ListenList = DEFAULT_PROXY_LISTEN
    admin_listen: ListenAddress = ListenAddress("127.0.0.1", 8001)
    # 0 = one worker per core, like nginx's worker_processes auto.
    workers: int = 0
    prefix: str = "ringgate-run"
    config_file: str | None = None
    # Kong trusts nobody's X-Forwarded-* by default.
    trusted_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Graceful stop: in-flight requests get this long to finish (nginx worker_shutdown_timeout, Kong's 10 s).
    drain_timeout: float = 10.0
    # Client side limits (nginx: large_client_header_buffers 8k; client_header_timeout 60s; keepalive_timeout 75s).
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    client_header_timeout: float = 60.0
    client_keepalive_timeout: float = 75.0
    # Upstream keep-alive pool per worker and address (Kong: 512 idle? we cap lower per address; 10000 requests; 60 s).
    upstream_keepalive_pool: int = 128
    upstream_keepalive_requests: int = 10000
    upstream_keepalive_timeout: float = 60.0
    # A request body up to this size is kept so a retry can replay it; larger bodies stream and are not replayed.
    replay_buffer_bytes: int = 1 << 20
    log_level: str = "info"
    # Target health blocks in shared memory (128 bytes each); a block is claimed per (upstream, host, port).
    health_capacity: int = 4096
    # Entries of the shared dict (plugins' counters) and of the shared answer cache (64 KiB each at most).
    shared_dict_capacity: int = 65536
    cache_capacity: int = 1024
    # One JSON line per request: a file path, "stdout", or "off" (the default: no cost on the request path).
    access_log: str = "off"
    # Kong's `plugins` property: "bundled", plus user classes as module:Class, comma-separated.
    plugins: str = "bundled"
    # When set, every Admin API request must carry it (Authorization: Bearer, or Kong-Admin-Token).
    admin_token: str | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def with_overrides(self, **values: Any) -> "Settings":
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_PARSERS: dict[str, Any] = {
    "proxy_listen": parse_proxy_listen,
    "admin_listen": parse_admin_listen,
    "trusted_ips": parse_networks,
}


def coerce(name: str, raw: str) -> Any:
    """Turn a flag or environment string into the typed value of setting `name`."""
    setting = ENV_PREFIX + name.upper()
    if name in _PARSERS:
        return _PARSERS[name](raw, setting)
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{setting}: expected a number, got {raw!r}") from None
    return raw


def from_environment(environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "extra":
            continue
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            values[f.name] = coerce(f.name, raw)
    return values
