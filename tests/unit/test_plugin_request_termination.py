"""request-termination: Kong's answer shapes, trigger, echo, and its config rules."""
from __future__ import annotations

import os

import orjson
import pytest
from pydantic import ValidationError

from ringgate.plugins.base import Context
from ringgate.plugins.chain import Chain, run_access
from ringgate.plugins.request_termination import Config, RequestTerminationPlugin


def make_ctx(method: str = "GET", query: bytes | None = None, headers: list[tuple[str, str]] | None = None,
             body: bytes | None = None) -> Context:
    ctx = Context()
    ctx.method = method
    ctx.path = "/orders"
    ctx.raw_path = b"/orders"
    ctx.query = query
    ctx.host = "shop.test:8000"
    ctx.headers = headers or []
    ctx.client_ip = "10.0.0.1"
    ctx.route_id = "route-1"
    ctx.route_name = "orders"
    ctx.service_id = "svc-1"
    ctx.service_name = "shop"
    ctx.request_id = "req-1"
    ctx.body = body
    return ctx


def terminate(ctx: Context | None = None, **config: object) -> tuple[int, bytes, dict[str, str]] | None:
    """The exit answer, or None when the request went on."""
    ctx = ctx or make_ctx()
    plugin = RequestTerminationPlugin(Config.model_validate(config), entity_id="rt-1")
    if not run_access(Chain([plugin]), ctx):
        return None
    status, body, headers = ctx.exit_answer  # type: ignore[misc]
    return status, body, dict(headers)


def test_default_is_503_service_unavailable_in_json() -> None:
    assert terminate() == (503, b'{"message":"Service unavailable"}',
                           {"Content-Type": "application/json; charset=utf-8"})


@pytest.mark.parametrize("status, message", [(401, "Unauthorized"), (404, "Not found"), (405, "Method not allowed"),
                                             (500, "An unexpected error occurred"), (502, "Bad Gateway")])
def test_default_messages_per_status(status: int, message: str) -> None:
    answer = terminate(status_code=status)
    assert answer is not None and (answer[0], orjson.loads(answer[1])) == (status, {"message": message})


def test_a_status_without_default_message_has_no_body() -> None:
    assert terminate(status_code=403) == (403, b"", {})


def test_configured_message() -> None:
    answer = terminate(status_code=418, message="So long and thanks for all the fish!")
    assert answer == (418, b'{"message":"So long and thanks for all the fish!"}',
                      {"Content-Type": "application/json; charset=utf-8"})


def test_raw_body_with_its_content_type() -> None:
    assert terminate(status_code=200, body="<h1>closed</h1>", content_type="text/html") == (
        200, b"<h1>closed</h1>", {"Content-Type": "text/html"})
    assert terminate(body='{"down": true}') == (503, b'{"down": true}',
                                                {"Content-Type": "application/json; charset=utf-8"})


@pytest.mark.parametrize("ctx, terminated", [
    (make_ctx(), False),
    (make_ctx(headers=[("x-debug-me", "")]), True),
    (make_ctx(query=b"X-Debug-Me"), True),
    (make_ctx(query=b"x-debug-me=1"), False),  # query names are case-sensitive, header names are not
])
def test_trigger(ctx: Context, terminated: bool) -> None:
    assert (terminate(ctx, trigger="X-Debug-Me") is not None) is terminated


def test_echo_returns_the_request() -> None:
    ctx = make_ctx(method="POST", query=b"a=1&a=2&flag", headers=[("Content-Type", "application/json"),
                                                                  ("X-Tag", "1"), ("X-Tag", "2")],
                   body=b'{"item": 7}')
    answer = terminate(ctx, status_code=200, echo=True)
    assert answer is not None
    status, body, headers = answer
    assert status == 200 and headers == {"Content-Type": "application/json; charset=utf-8"}
    echoed = orjson.loads(body)
    assert "message" not in echoed  # 200 has no default message
    assert echoed["kong"]["worker_pid"] == os.getpid()
    assert echoed["request"] == {
        "scheme": "http", "host": "shop.test", "port": 8000, "method": "POST", "path": "/orders",
        "headers": {"content-type": "application/json", "x-tag": ["1", "2"]},
        "query": {"a": ["1", "2"], "flag": True},
        "body": {"item": 7}, "raw_body": '{"item": 7}',
    }
    assert echoed["matched_route"] == {"id": "route-1", "name": "orders"}
    assert echoed["matched_service"] == {"id": "svc-1", "name": "shop"}


def test_echo_keeps_the_message() -> None:
    answer = terminate(echo=True)
    assert answer is not None and orjson.loads(answer[1])["message"] == "Service unavailable"


@pytest.mark.parametrize("config, loc, message", [
    ({"message": "a", "body": "b"}, (), "message cannot be used with content_type or body"),
    ({"message": "a", "content_type": "text/plain", "body": "b"}, (), "message cannot be used with content_type or body"),
    ({"content_type": "text/plain"}, (), "content_type requires a body"),
    ({"echo": True, "body": "b"}, (), "echo cannot be used with content_type and body"),
    ({"status_code": 600}, ("status_code",), "value should be between 100 and 599"),
    ({"status_code": 99}, ("status_code",), "value should be between 100 and 599"),
    ({"trigger": "no spaces"}, ("trigger",),
     "bad header name 'no spaces', allowed characters are A-Z, a-z, 0-9, '_', and '-'"),
    ({"echo_trigger": "x"}, ("echo_trigger",), "extra_forbidden"),
])
def test_config_errors(config: dict[str, object], loc: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Config.model_validate(config)
    found = [(d["loc"], d["ctx"]["reason"] if d["type"] == "kong" else d["type"]) for d in caught.value.errors()]
    assert (loc, message) in found


def test_empty_strings_are_absent_for_the_rules() -> None:
    Config.model_validate({"message": "", "body": "x"})
    assert RequestTerminationPlugin.PRIORITY == 2
