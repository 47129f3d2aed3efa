"""The control process's HTTP side without a socket: answer bytes, and when the token warning is due."""
from __future__ import annotations

import pytest

from ringgate.admin.api import Response
from workers.control import _is_loopback, encode_response


def test_json_answer_head_and_close() -> None:
    answer = encode_response(Response(201, {"a": 1}, headers=(("X-Extra", "1"),)), head_only=False, close=True)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"Content-Type: application/json; charset=utf-8\r\n" in head + b"\r\n"
    assert b"Content-Length: 7" in head and b"X-Extra: 1" in head and b"Connection: close" in head
    assert body == b'{"a":1}'
    head_only = encode_response(Response(200, {"a": 1}), head_only=True, close=False)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 7" in head_only and b"Connection" not in head_only


@pytest.mark.parametrize("status", [204, 304])
def test_answers_without_a_body(status: int) -> None:
    answer = encode_response(Response(status, {"ignored": True}), head_only=False, close=False)
    assert answer.endswith(b"\r\n\r\n") and b"Content-Length" not in answer and b"Content-Type" not in answer


def test_raw_bodies_keep_their_type() -> None:
    answer = encode_response(Response(200, b"metric 1\n", content_type="text/plain; version=0.0.4"),
                             head_only=False, close=False)
    assert b"Content-Type: text/plain; version=0.0.4\r\n" in answer and answer.endswith(b"\r\n\r\nmetric 1\n")


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("admin.example", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback
