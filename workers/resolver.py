"""Asynchronous name resolution for upstream hosts: getaddrinfo off the loop, a TTL cache, records in turn."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any


class NameResolutionError(OSError):
    pass


class Resolver:
    """Asynchronous getaddrinfo with a small TTL cache and round-robin over the records."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float = 30.0) -> None:
        self.loop = loop
        self.ttl = ttl
        self.cache: dict[str, tuple[float, list[str], int]] = {}

    _literals: dict[str, str | None] = {}

    @classmethod
    def literal(cls, host: str) -> str | None:
        """The host as a normalized IP if it is an IP literal, else None (cached: hosts come from config)."""
        try:
            return cls._literals[host]
        except KeyError:
            pass
        try:
            value: str | None = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            value = None
        if len(cls._literals) > 4096:
            cls._literals.clear()
        cls._literals[host] = value
        return value

    async def resolve(self, host: str) -> str:
        ip = self.literal(host)
        if ip is not None:
            return ip
        now = self.loop.time()
        entry = self.cache.get(host)
        if entry is None or entry[0] < now:
            try:
                infos: list[Any] = await self.loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise NameResolutionError(f"{host}: {exc}") from exc
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            if not addresses:
                raise NameResolutionError(f"{host}: no addresses")
            entry = (now + self.ttl, addresses, 0)
        expires, addresses, turn = entry
        self.cache[host] = (expires, addresses, turn + 1)
        return addresses[turn % len(addresses)]
