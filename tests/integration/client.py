"""Plain HTTP clients for the tests: http.client for ordinary calls, raw sockets for byte-exact ones."""
from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass, field

import orjson


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> dict:
        return orjson.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(port: int, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
            body: bytes | None = None, timeout: float = 10.0, conn: http.client.HTTPConnection | None = None,
            host: str = "127.0.0.1") -> Response:
    own = conn is None
    connection = conn or http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        resp = connection.getresponse()
        data = resp.read()
        raw = [(k, v) for k, v in resp.getheaders()]
        return Response(resp.status, {k.lower(): v for k, v in raw}, data, raw)
    finally:
        if own:
            connection.close()


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send bytes, read until the server closes (or the timeout passes); return everything read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
            if not read_until_close:
                break
        return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])
