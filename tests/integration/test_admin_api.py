"""The Admin API against a real gateway: Kong's quickstart as written, CRUD, errors, pages, /config.

One gateway (two workers, started empty) serves the module's tests in file order; the last test
replaces its whole config. Persistence and the token get gateways of their own.
"""
from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from ringgate.origin import OriginServer
from tests.integration.client import Response, raw_exchange, request, status_of
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def admin(gateway: Gateway, method: str, path: str, form: str | None = None, json: Any = None,
          headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None) -> Response:
    """One Admin API call; `form` is sent as written, the way `curl -d` sends it."""
    body, sent = None, dict(headers or {})
    if form is not None:
        body, sent = form.encode(), {**FORM, **sent}
    elif json is not None:
        body, sent = orjson.dumps(json), {"Content-Type": "application/json", **sent}
    return request(gateway.admin_port, method, path, headers=sent, body=body, conn=conn)


def proxied(gateway: Gateway, path: str, host: str | None = None) -> Response:
    return request(gateway.proxy_port, "GET", path, headers={"Host": host} if host else None)


def wait_everywhere(gateway: Gateway, path: str, status: int, host: str | None = None,
                    timeout: float = 5.0) -> float:
    """Seconds until 20 answers in a row, each on a fresh connection (so from any worker), are `status`."""
    started, streak = time.monotonic(), 0
    while time.monotonic() - started < timeout:
        streak = streak + 1 if proxied(gateway, path, host).status == status else 0
        if streak == 20:
            return time.monotonic() - started
    raise AssertionError(f"{host or ''}{path} did not answer {status} within {timeout}s:\n{gateway.log()}")


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    server = OriginServer("admin-origin").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, origin: OriginServer) -> Iterator[Gateway]:
    started = Gateway(None, tmp_path_factory.mktemp("admin"), workers=2).start()
    yield started
    started.stop()


def test_kong_quickstart_as_written_reaches_both_workers(gateway: Gateway, origin: OriginServer) -> None:
    created = admin(gateway, "POST", "/services", form=f"name=example&url=http://127.0.0.1:{origin.port}")
    assert created.status == 201, created.body
    service = created.json()
    assert (service["name"], service["host"], service["port"], service["protocol"]) == (
        "example", "127.0.0.1", origin.port, "http")
    route = admin(gateway, "POST", "/services/example/routes", form="hosts[]=example.com")
    written = time.monotonic()
    assert route.status == 201
    assert route.json()["hosts"] == ["example.com"] and route.json()["service"] == {"id": service["id"]}
    # Each worker says when it put the new config in service (fresh connections may all reach one of them).
    generation = admin(gateway, "GET", "/status").json()["configuration_generation"]
    in_service = f"config generation {generation} in service"
    while gateway.log().count(in_service) < 2 and time.monotonic() - written < 1.0:
        time.sleep(0.01)
    assert gateway.log().count(in_service) == 2, gateway.log()
    wait_everywhere(gateway, "/anything", 200, host="example.com")
    assert proxied(gateway, "/anything", host="example.com").json()["server"] == "admin-origin"


def test_crud_round_trips(gateway: Gateway, origin: OriginServer) -> None:
    service = admin(gateway, "POST", "/services", json={"name": "crud", "host": "127.0.0.1", "port": origin.port})
    assert service.status == 201
    service_id = service.json()["id"]
    assert admin(gateway, "GET", f"/services/{service_id}").json()["name"] == "crud"
    patched = admin(gateway, "PATCH", "/services/crud", form="retries=2&path=/base")
    assert patched.status == 200 and (patched.json()["retries"], patched.json()["path"]) == (2, "/base")
    # PUT creates a route by name, then replaces it.
    put = admin(gateway, "PUT", "/routes/crud-route", json={"paths": ["/crud"], "service": {"name": "crud"}})
    assert put.status == 200 and put.json()["name"] == "crud-route"
    wait_everywhere(gateway, "/crud/x", 200)
    assert proxied(gateway, "/crud/x").json()["path"] == "/base/x"
    replaced = admin(gateway, "PUT", "/routes/crud-route", json={"paths": ["/crud2"], "service": {"id": service_id}})
    assert replaced.json()["id"] == put.json()["id"] and replaced.json()["paths"] == ["/crud2"]
    assert admin(gateway, "GET", "/routes/crud-route/service").json()["id"] == service_id
    listed = admin(gateway, "GET", "/services/crud/routes").json()
    assert [r["name"] for r in listed["data"]] == ["crud-route"] and listed["next"] is None
    wait_everywhere(gateway, "/crud2/x", 200)
    assert admin(gateway, "DELETE", "/routes/crud-route").status == 204
    assert admin(gateway, "DELETE", "/routes/crud-route").status == 204  # Kong: 204 even when missing
    assert admin(gateway, "GET", "/routes/crud-route").status == 404
    wait_everywhere(gateway, "/crud2/x", 404)
    assert admin(gateway, "DELETE", "/services/crud").status == 204
    # Upstreams and targets, a target named by its address.
    assert admin(gateway, "POST", "/upstreams", form="name=crud.upstream&algorithm=least-connections").status == 201
    target = admin(gateway, "POST", "/upstreams/crud.upstream/targets", form=f"target=127.0.0.1:{origin.port}")
    assert target.status == 201 and target.json()["weight"] == 100
    weighed = admin(gateway, "PATCH", f"/upstreams/crud.upstream/targets/127.0.0.1:{origin.port}", form="weight=7")
    assert weighed.json()["weight"] == 7 and weighed.json()["id"] == target.json()["id"]
    assert admin(gateway, "DELETE", "/upstreams/crud.upstream").status == 204
    assert admin(gateway, "GET", "/upstreams/crud.upstream/targets").status == 404


def test_error_bodies(gateway: Gateway) -> None:
    assert admin(gateway, "POST", "/services", form="name=errors&host=errors.internal").status == 201
    assert admin(gateway, "POST", "/services/errors/routes", form="name=errors-route&paths[]=/errors").status == 201
    missing = admin(gateway, "GET", "/services/nope")
    assert (missing.status, missing.json()) == (404, {"message": "Not found"})
    duplicate = admin(gateway, "POST", "/services", form="name=errors&host=x")
    assert (duplicate.status, duplicate.json()) == (409, {
        "code": 5, "name": "unique constraint violation",
        "message": "UNIQUE violation detected on '{name=\"errors\"}'", "fields": {"name": "errors"}})
    invalid = admin(gateway, "POST", "/services", form="name=invalid")
    assert (invalid.status, invalid.json()) == (400, {
        "code": 2, "name": "schema violation", "message": "schema violation (host: required field missing)",
        "fields": {"host": "required field missing"}})
    referenced = admin(gateway, "DELETE", "/services/errors")
    assert referenced.status == 400 and referenced.json()["code"] == 4
    assert referenced.json()["message"] == "an existing 'routes' entity references this 'services' entity"
    assert admin(gateway, "GET", "/services/errors").status == 200
    assert admin(gateway, "PATCH", "/services").status == 405


def test_pages_follow_next_links(gateway: Gateway) -> None:
    names = [f"page{n}.internal" for n in range(5)]
    for name in names:
        assert admin(gateway, "POST", "/upstreams", form=f"name={name}").status == 201
    seen: list[str] = []
    link: str | None = "/upstreams?size=2"
    pages = 0
    while link is not None:
        page = admin(gateway, "GET", link).json()
        seen += [upstream["name"] for upstream in page["data"]]
        link = page["next"]
        pages += 1
        assert (page.get("offset") is None) == (link is None)
    assert seen == names and pages == 3
    bad_size = admin(gateway, "GET", "/upstreams?size=0")
    assert bad_size.status == 400 and bad_size.json()["code"] == 9
    bad_offset = admin(gateway, "GET", "/upstreams?offset=%21%21")
    assert bad_offset.status == 400 and bad_offset.json() == {
        "code": 7, "name": "invalid offset", "message": "'!!' is not a valid offset: bad base64 encoding"}


def test_keep_alive_and_body_cap(gateway: Gateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=5)
    try:
        admin(gateway, "GET", "/status", conn=conn)
        sock = conn.sock
        assert admin(gateway, "POST", "/upstreams", form="name=kept.alive", conn=conn).status == 201
        assert admin(gateway, "GET", "/upstreams/kept.alive", conn=conn).status == 200
        assert conn.sock is sock and sock is not None  # one connection for all three
    finally:
        conn.close()
    # Pipelined: two requests in one write, two answers in order.
    both = raw_exchange(gateway.admin_port, b"GET /upstreams/kept.alive HTTP/1.1\r\nHost: a\r\n\r\n"
                                            b"GET /upstreams/nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert both.count(b"HTTP/1.1 200 OK") == 1 and both.index(b"200 OK") < both.index(b"404 Not Found")
    # curl sends "Expect: 100-continue" before a body over 1 KiB (a kong.yml) and waits for the interim answer.
    expecting = raw_exchange(gateway.admin_port, b"POST /upstreams HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                                                 b"Expect: 100-continue\r\nContent-Length: 18\r\n"
                                                 b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
                                                 b"name=continue.test")
    assert expecting.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n")
    too_big = raw_exchange(gateway.admin_port, b"POST /services HTTP/1.1\r\nHost: a\r\n"
                                               b"Content-Length: 20000000\r\n\r\nname=x")
    assert status_of(too_big) == 413
    assert admin(gateway, "GET", "/status").status == 200


def test_post_config_replaces_everything_and_an_invalid_one_changes_nothing(gateway: Gateway,
                                                                             origin: OriginServer) -> None:
    config = {"_format_version": "3.0", "services": [
        {"name": "declared", "url": f"http://127.0.0.1:{origin.port}", "routes": [{"paths": ["/declared"]}]}]}
    loaded = admin(gateway, "POST", "/config", json=config)
    assert loaded.status == 201 and [s["name"] for s in loaded.json()["services"].values()] == ["declared"]
    wait_everywhere(gateway, "/declared", 200)
    wait_everywhere(gateway, "/anything", 404, host="example.com")  # the quickstart's route is gone
    hash_now = admin(gateway, "GET", "/status").json()["configuration_hash"]
    assert admin(gateway, "POST", "/config?check_hash=1", json=config).status == 304
    broken = yaml.safe_dump({"_format_version": "3.0", "services": [
        {"name": "declared", "host": "127.0.0.1", "port": 99999, "routes": [{"paths": ["/declared"]}]}]})
    refused = admin(gateway, "POST", "/config?flatten_errors=1", json={"config": broken})
    assert refused.status == 400
    body = refused.json()
    assert body["code"] == 14 and body["fields"] == {"services": [{"port": "value should be between 0 and 65535"}]}
    assert body["flattened_errors"][0]["entity_name"] == "declared"
    assert admin(gateway, "GET", "/status").json()["configuration_hash"] == hash_now
    time.sleep(0.2)  # two generation polls: a change would have reached the workers by now
    assert all(proxied(gateway, "/declared").status == 200 for _ in range(10))
    exported = yaml.safe_load(admin(gateway, "GET", "/config").json()["config"])
    assert [s["name"] for s in exported["services"]] == ["declared"]


def test_config_survives_restarts_and_the_token_guards_it(gateway_factory: Callable[..., Gateway],
                                                          origin_factory: Callable[[str], OriginServer],
                                                          tmp_path: Path) -> None:
    origin = origin_factory("persisted")
    prefix = tmp_path / "shared-prefix"
    token = {"Authorization": "Bearer t0ken"}
    first = gateway_factory(None, extra_args=["--prefix", str(prefix)], env={"RINGGATE_ADMIN_TOKEN": "t0ken"})
    assert admin(first, "GET", "/services").status == 401
    assert admin(first, "GET", "/services", headers={"Authorization": "Bearer wrong"}).json() == {
        "message": "Unauthorized"}
    assert admin(first, "POST", "/services", form=f"name=kept&url=http://127.0.0.1:{origin.port}",
                 headers=token).status == 201
    assert admin(first, "POST", "/services/kept/routes", form="paths[]=/kept", headers=token).status == 201
    wait_everywhere(first, "/kept", 200)
    before = admin(first, "GET", "/services/kept", headers={"Kong-Admin-Token": "t0ken"}).json()
    acknowledged = _writes_while_the_control_process_is_killed(first, token)
    # Every acknowledged write is there; at most the one cut short by the kill is there unanswered.
    names = {u["name"] for u in admin(first, "GET", "/upstreams?size=1000", headers=token).json()["data"]}
    assert acknowledged <= names and len(names - acknowledged) <= 1
    first.stop()

    # No -c: the persisted config comes back, ids and all.
    second = gateway_factory(None, extra_args=["--prefix", str(prefix)], env={"RINGGATE_ADMIN_TOKEN": "t0ken"})
    assert "restored config from" in second.log()
    assert admin(second, "GET", "/services/kept", headers=token).json() == before
    assert proxied(second, "/kept").status == 200
    second.stop()

    # With -c the file wins, as Kong's declarative_config does, and becomes the new snapshot.
    file_config = {"_format_version": "3.0", "services": [
        {"name": "from-file", "url": f"http://127.0.0.1:{origin.port}", "routes": [{"paths": ["/file"]}]}]}
    third = gateway_factory(file_config, extra_args=["--prefix", str(prefix)])
    assert "restored config" not in third.log()
    assert [s["name"] for s in admin(third, "GET", "/services").json()["data"]] == ["from-file"]
    assert proxied(third, "/kept").status == 404 and proxied(third, "/file").status == 200
    snapshot = orjson.loads((prefix / "config.json").read_bytes())
    assert [s["name"] for s in snapshot["services"]] == ["from-file"]


def _writes_while_the_control_process_is_killed(gateway: Gateway, headers: dict[str, str]) -> set[str]:
    """POST upstreams one after another, SIGKILL the control process in the middle of the stream, and go
    on until the master's replacement has acknowledged five more. Returns the acknowledged names."""
    line = gateway.wait_for("(Admin API write)")
    control_pid = int(line.split("] ", 1)[1].split()[0])  # "... [INFO] <pid> ringgate.admin: ..."
    assert control_pid in gateway.worker_pids()
    acknowledged: set[str] = set()
    after_kill = 0
    deadline = time.monotonic() + 10
    for n in range(10_000):
        assert time.monotonic() < deadline, "the Admin API did not come back after its process was killed"
        if n == 10:
            os.kill(control_pid, signal.SIGKILL)
        name = f"killed{n}.internal"
        try:
            answer = admin(gateway, "POST", "/upstreams", form=f"name={name}", headers=headers)
        except OSError:
            time.sleep(0.02)  # the listener stays open (the master holds it); nobody accepts for a moment
            continue
        assert answer.status == 201, answer.body
        acknowledged.add(name)
        after_kill += n > 10
        if after_kill == 5:
            assert f"(pid {control_pid}) exited with signal SIGKILL" in gateway.log()
            return acknowledged
    raise AssertionError("unreachable")
