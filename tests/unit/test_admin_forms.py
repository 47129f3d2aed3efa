"""Admin API bodies: Kong's form key syntax, typing form text by the schema, JSON bodies, refusals."""
from __future__ import annotations

from typing import Any

import pytest

from ringgate.admin.errors import AdminError
from ringgate.admin.forms import coerce, decode_body, decode_form
from ringgate.config.schema import Plugin, Route, Service, Target, Upstream

FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(("text", "expected"), [
    ("name=example", {"name": "example"}),
    ("name=example&url=http%3A%2F%2F127.0.0.1%3A9000", {"name": "example", "url": "http://127.0.0.1:9000"}),
    ("hosts[]=a.com", {"hosts": ["a.com"]}),
    ("hosts[]=a.com&hosts[]=b.com", {"hosts": ["a.com", "b.com"]}),
    ("hosts=a.com&hosts=b.com", {"hosts": ["a.com", "b.com"]}),
    ("paths[2]=/b&paths[1]=/a", {"paths": ["/a", "/b"]}),
    ("config.minute=5", {"config": {"minute": "5"}}),
    ("config[minute]=5&config.hour=7", {"config": {"minute": "5", "hour": "7"}}),
    ("healthchecks.active.healthy.interval=5",
     {"healthchecks": {"active": {"healthy": {"interval": "5"}}}}),
    ("headers.x-version=v1&headers.x-version=v2", {"headers": {"x-version": ["v1", "v2"]}}),
    ("config.list[]=a&config.list[]=b", {"config": {"list": ["a", "b"]}}),
    ("service.id=abc", {"service": {"id": "abc"}}),
    ("tags=", {"tags": ""}),
    ("a+b=c%20d", {"a b": "c d"}),
])
def test_form_keys(text: str, expected: dict[str, Any]) -> None:
    assert decode_form(text) == expected


@pytest.mark.parametrize("text", ["config.x=1&config[1]=2", "name=a&name.first=b", "hosts[]=a&hosts.x=b"])
def test_form_keys_that_contradict_each_other_are_refused(text: str) -> None:
    with pytest.raises(AdminError) as caught:
        decode_form(text)
    assert caught.value.status == 400 and "invalid form key" in caught.value.body["message"]


def test_form_text_is_typed_by_the_schema() -> None:
    service = coerce(Service, decode_form("name=s&port=8080&retries=0&enabled=false&tls_verify=true&url=x"))
    assert service == {"name": "s", "port": 8080, "retries": 0, "enabled": False, "tls_verify": True, "url": "x"}
    route = coerce(Route, decode_form("hosts=a.com&methods[]=GET&strip_path=false&regex_priority=-3"
                                      "&headers.x-v=1&name="))
    assert route == {"hosts": ["a.com"], "methods": ["GET"], "strip_path": False, "regex_priority": -3,
                     "headers": {"x-v": ["1"]}, "name": None}
    upstream = coerce(Upstream, decode_form("name=u&slots=100&healthchecks.active.timeout=2.5"
                                            "&healthchecks.active.healthy.interval=5"
                                            "&healthchecks.active.healthy.http_statuses=200"
                                            "&healthchecks.threshold=25"))
    assert upstream == {"name": "u", "slots": 100, "healthchecks": {
        "active": {"timeout": 2.5, "healthy": {"interval": 5, "http_statuses": [200]}}, "threshold": 25}}
    assert coerce(Target, {"target": "a:80", "weight": "7"}) == {"target": "a:80", "weight": 7}
    assert coerce(Plugin, {"name": "p", "enabled": "true", "protocols": "http"}) == {
        "name": "p", "enabled": True, "protocols": ["http"]}


def test_text_that_does_not_fit_the_type_is_left_for_the_schema_to_report() -> None:
    assert coerce(Service, {"port": "eighty", "enabled": "maybe", "nope": "1"}) == {
        "port": "eighty", "enabled": "maybe", "nope": "1"}


def test_json_bodies_are_taken_as_they_are() -> None:
    body, is_form = decode_body("application/json", b'{"name": "s", "port": "80", "hosts": "a"}')
    assert (body, is_form) == ({"name": "s", "port": "80", "hosts": "a"}, False)
    assert decode_body(None, b'{"a": 1}') == ({"a": 1}, False)
    assert decode_body(FORM + "; charset=utf-8", b"a=1") == ({"a": "1"}, True)
    assert decode_body(None, b"a=1") == ({"a": "1"}, True)  # curl -d without a type
    assert decode_body("application/json", b"") == ({}, False)


@pytest.mark.parametrize(("content_type", "body", "status", "message"), [
    ("application/json", b"{nope", 400, "Cannot parse JSON body"),
    ("application/json", b"[1, 2]", 400, "Cannot parse JSON body: expected an object"),
    ("multipart/form-data; boundary=x", b"--x", 415, "Unsupported Content-Type 'multipart/form-data'"),
    (FORM, b"a=\xff", 400, "Cannot parse form body: not valid UTF-8"),
])
def test_unreadable_bodies(content_type: str, body: bytes, status: int, message: str) -> None:
    with pytest.raises(AdminError) as caught:
        decode_body(content_type, body)
    assert caught.value.status == status
    assert caught.value.body["message"].startswith(message)
