"""HTTP/1.1 bytes built once at import: status lines, hop-by-hop sets, Kong's error answers."""
from __future__ import annotations

from http import HTTPStatus

import orjson

from ringgate import __version__
from ringgate.negotiation import prefers_text

SERVER_TOKEN = f"ringgate/{__version__}".encode()
VIA_TOKEN = b"1.1 " + SERVER_TOKEN

STATUS_LINES: dict[int, bytes] = {}
for _status in HTTPStatus:
    STATUS_LINES[_status.value] = b"HTTP/1.1 %d %s\r\n" % (_status.value, _status.phrase.encode())


def status_line(status: int, reason: bytes = b"") -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Unknown")
    return line


IDEMPOTENT_METHODS: frozenset[str] = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"))

# Kong's messages (kong-spec §3).
MSG_NO_ROUTE = "no Route matched with those values"
MSG_NO_SERVICE = "no Service found with those values"
MSG_BAD_GATEWAY = "An invalid response was received from the upstream server"
MSG_TIMEOUT = "The upstream server is timing out"
MSG_NO_PEER = "failure to get a peer from the ring-balancer"
MSG_NAME_RESOLUTION = "name resolution failed"
MSG_UNEXPECTED = "An unexpected error occurred"
MSG_BAD_REQUEST = "Bad request"

def wants_text(accept: bytes | None) -> bool:
    """Kong answers JSON unless the client's Accept prefers text/plain (or text/html) over JSON."""
    return bool(accept) and prefers_text(accept.decode("latin-1"))  # type: ignore[union-attr]


def error_response(status: int, message: str, request_id: str, accept: bytes | None, close: bool,
                   extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete gateway-generated answer in Kong's shape (JSON by default, text/plain on request)."""
    if wants_text(accept):
        body = f"{message}\nrequest_id: {request_id}\n".encode()
        content_type = b"text/plain; charset=utf-8"
    else:
        body = b'{\n  "message":' + orjson.dumps(message) + b',\n  "request_id":"' + request_id.encode() + b'"\n}'
        content_type = b"application/json; charset=utf-8"
    parts = [
        status_line(status),
        b"Content-Type: ", content_type, b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Server: ", SERVER_TOKEN, b"\r\n",
        b"X-Kong-Request-Id: ", request_id.encode(), b"\r\n",
    ]
    for name, value in extra_headers:
        parts += [name, b": ", value, b"\r\n"]
    if close:
        parts.append(b"Connection: close\r\n")
    parts += [b"\r\n", body]
    return b"".join(parts)


def plugin_response(status: int, body: bytes, headers: list[tuple[str, str]], request_id: bytes, head_only: bool,
                    close: bool) -> bytes:
    """An answer a plugin gave (Kong's kong.response.exit): its headers, a Content-Length, our marks."""
    parts = [status_line(status)]
    has_type = False
    for name, value in headers:
        lower = name.lower()
        if lower in ("content-length", "transfer-encoding", "connection"):
            continue  # framing is ours to set
        has_type = has_type or lower == "content-type"
        parts += [name.encode("latin-1"), b": ", str(value).encode("latin-1"), b"\r\n"]
    if body and not has_type:
        parts.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    parts += [b"Content-Length: %d\r\n" % len(body), b"Server: ", SERVER_TOKEN, b"\r\n",
              b"X-Kong-Request-Id: ", request_id, b"\r\n"]
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK_END = b"0\r\n\r\n"
