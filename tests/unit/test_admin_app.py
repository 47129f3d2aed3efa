"""The Admin API in process: real config state under a temporary prefix, a real arena, no sockets.

Covers what sits between a request and the pure CRUD functions: routing, methods, the token,
Kong's error bodies for schema failures, POST/GET /config, and that a failing handler is a 500.
"""
from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import BaseModel, ConfigDict
from shared_state.arena import Arena

from ringgate.admin.api import AdminContext, Request, Response, route
from ringgate.admin.app import AdminApp
from ringgate.admin.state import ConfigState
from ringgate.config import KNOWN_PLUGINS, Config, load_dict
from ringgate.config.store import LOCK_FILE, config_lock, save_snapshot, snapshot_path
from ringgate.settings import Settings

FORM = {"content-type": "application/x-www-form-urlencoded"}
JSON = {"content-type": "application/json"}


class Admin:
    def __init__(self, prefix: Path, token: str | None = None) -> None:
        save_snapshot(str(prefix), load_dict({"_format_version": "3.0"}))
        self.arena = Arena(2)
        self.state = ConfigState(str(prefix), self.arena)
        self.context = AdminContext(Settings(prefix=str(prefix), admin_token=token), self.state, self.arena, "node")
        self.app = AdminApp(self.context)

    def __call__(self, method: str, path: str, body: bytes | dict[str, Any] = b"",
                 headers: dict[str, str] | None = None, **query: str) -> Response:
        if isinstance(body, dict):
            body, headers = orjson.dumps(body), {**JSON, **(headers or {})}
        return self.app(Request(method, path, query, {**FORM, **(headers or {})}, body))


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path)


def test_schema_violations_are_answered_as_kong_does(admin: Admin) -> None:
    one = admin("POST", "/services", b"name=s")
    assert (one.status, one.body) == (400, {"code": 2, "name": "schema violation",
                                            "message": "schema violation (host: required field missing)",
                                            "fields": {"host": "required field missing"}})
    two = admin("POST", "/services", b"name=s&host=a&port=99999&protocol=tcp")
    assert two.status == 400
    assert two.body["message"] == ("2 schema violations (port: value should be between 0 and 65535; "
                                   "protocol: protocol 'tcp' is not supported by Ringgate (supported: http, https))")
    nested = admin("POST", "/upstreams", b"name=u&healthchecks.active.timeout=-1")
    assert nested.body["fields"] == {"healthchecks": {"active": {"timeout": "value should be between 0 and 65535"}}}
    assert nested.body["message"] == ("schema violation (healthchecks.active: "
                                      '{timeout="value should be between 0 and 65535"})')
    entity = admin("POST", "/routes", {"protocols": ["http"]})
    assert entity.body["fields"] == {"@entity": [("must set one of 'methods', 'hosts', 'headers', 'paths' "
                                                 "when 'protocols' is 'http'")]}
    array = admin("POST", "/routes", b"paths[]=/ok&paths[]=bad")
    assert array.body["fields"] == {"paths": [None, "should start with: / (fixed path) or ~/ (regex path)"]}
    assert array.body["message"] == "schema violation (paths.2: should start with: / (fixed path) or ~/ (regex path))"
    assert admin("GET", "/services").body == {"data": [], "next": None}  # nothing was written


def test_routes_methods_and_nested_lookups(admin: Admin) -> None:
    assert admin("POST", "/services", b"name=s&url=http://s.internal").status == 201
    route_answer = admin("POST", "/services/s/routes", b"name=r&paths[]=/r")
    assert route_answer.status == 201
    assert admin("GET", "/services/s/routes/r").body["id"] == route_answer.body["id"]
    assert admin("GET", "/routes/r/service").body["name"] == "s"
    assert admin("PATCH", "/routes/r/service", b"retries=1").body["retries"] == 1
    assert admin("DELETE", "/routes/r/service").status == 405
    assert admin("GET", "/services/s/").status == 200  # a trailing slash is the same resource
    assert admin("HEAD", "/services/s").status == 200
    assert admin("GET", "/services/nope/routes").body == {"message": "Not found"}
    assert admin("DELETE", "/services").body == {"message": "Method not allowed"}
    assert admin("POST", "/services/s").status == 405
    assert admin("GET", "/nothing/here").status == 404
    options = admin("OPTIONS", "/services/s")
    assert options.status == 204 and dict(options.headers)["Allow"] == "DELETE, GET, OPTIONS, PATCH, PUT"
    assert admin("DELETE", "/services/s/routes/r").status == 204
    assert admin("GET", "/routes/r").status == 404


def test_every_write_is_persisted_and_published(admin: Admin, tmp_path: Path) -> None:
    generation = admin.arena.generation
    admin("POST", "/services", b"name=s&host=s.internal")
    assert admin.arena.generation == generation + 1
    on_disk = orjson.loads(Path(snapshot_path(str(tmp_path))).read_bytes())
    assert [service["name"] for service in on_disk["services"]] == ["s"]
    status = admin("GET", "/status").body
    assert status["configuration_generation"] == generation + 1
    assert status["configuration_hash"] == load_dict(on_disk).config_hash
    # A refused write leaves the file and the generation alone.
    before = Path(snapshot_path(str(tmp_path))).read_bytes()
    assert admin("POST", "/services", b"name=s&host=x").status == 409
    assert admin("PATCH", "/services/s", b"port=-1").status == 400
    assert Path(snapshot_path(str(tmp_path))).read_bytes() == before and admin.arena.generation == generation + 1


def test_writes_by_another_process_are_seen(admin: Admin, tmp_path: Path) -> None:
    # What the master's SIGHUP reload does: a new snapshot, then a new generation.
    save_snapshot(str(tmp_path), load_dict({"_format_version": "3.0", "services": [{"name": "x", "host": "x"}]}))
    admin.arena.bump_generation()
    assert [s["name"] for s in admin("GET", "/services").body["data"]] == ["x"]
    assert admin("POST", "/services", b"name=y&host=y").status == 201
    names = [s["name"] for s in orjson.loads(Path(snapshot_path(str(tmp_path))).read_bytes())["services"]]
    assert names == ["x", "y"]


def test_post_config_valid_invalid_and_unchanged(admin: Admin) -> None:
    text = b'_format_version: "3.0"\nservices:\n- name: s\n  host: s.internal\n  routes:\n  - paths: [/a]\n'
    loaded = admin("POST", "/config", text, {"content-type": "text/yaml"})
    assert loaded.status == 201 and list(loaded.body) == ["services", "routes"]
    (service,) = loaded.body["services"].values()
    (route_,) = loaded.body["routes"].values()
    assert service["name"] == "s" and route_["service"] == {"id": service["id"]}
    generation = admin.arena.generation
    assert admin("POST", "/config", text, {"content-type": "text/yaml"}, check_hash="1").status == 304
    again = {"config": text.decode()}
    assert admin("POST", "/config", again).status == 201 and admin.arena.generation == generation  # nothing new
    bad = b'_format_version: "3.0"\nservices:\n- name: s\n  host: s.internal\n  routes:\n  - paths: [a]\n'
    refused = admin("POST", "/config", bad, {"content-type": "text/yaml"}, flatten_errors="1")
    assert refused.status == 400
    assert refused.body["code"] == 14 and refused.body["name"] == "invalid declarative configuration"
    assert refused.body["fields"] == {
        "services": [{"routes": [{"paths": ["should start with: / (fixed path) or ~/ (regex path)"]}]}]}
    assert refused.body["message"].startswith("declarative config is invalid: {services={{routes={{paths=")
    assert refused.body["flattened_errors"][0]["errors"] == [
        {"type": "field", "field": "paths.1", "message": "should start with: / (fixed path) or ~/ (regex path)"}]
    assert "flattened_errors" not in admin("POST", "/config", bad, {"content-type": "text/yaml"}).body
    syntax = admin("POST", "/config", b"{nope", JSON)
    assert syntax.status == 400 and syntax.body["message"].startswith("failed parsing declarative configuration")
    assert admin.arena.generation == generation
    exported = yaml.safe_load(admin("GET", "/config").body["config"])
    assert load_dict(exported).config_hash == admin.state.snapshot.config.config_hash
    form = admin("POST", "/config", b"config=" + text.replace(b"/a", b"/b").replace(b"\n", b"%0A"))
    assert form.status == 201 and next(iter(form.body["routes"].values()))["paths"] == ["/b"]


def test_token(tmp_path: Path) -> None:
    admin = Admin(tmp_path, token="s3cret")
    assert admin("GET", "/").body == {"message": "Unauthorized"}
    assert admin("GET", "/", headers={"authorization": "Bearer nope"}).status == 401
    assert admin("GET", "/", headers={"authorization": "Basic s3cret"}).status == 401
    assert admin("GET", "/", headers={"authorization": "Bearer s3cret"}).status == 200
    assert admin("GET", "/services", headers={"kong-admin-token": "s3cret"}).status == 200
    assert admin("OPTIONS", "/services").status == 204  # a preflight carries no credentials


def test_a_failing_handler_is_a_500_and_the_app_goes_on(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    def broken(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        raise RuntimeError("bug")

    app = AdminApp(admin.context, routes=[route("/broken", GET=broken), *admin.app.routes])
    answer = app(Request("GET", "/broken"))
    assert (answer.status, answer.body) == (500, {"message": "An unexpected error occurred"})
    assert "RuntimeError: bug" in caplog.text
    assert app(Request("GET", "/status")).status == 200


def test_config_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    prefix = str(tmp_path)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the lock until killed
        try:
            with config_lock(prefix):
                os.write(write_fd, b"x")
                time.sleep(30)
        finally:
            os._exit(0)
    try:
        assert os.read(read_fd, 1) == b"x"
        probe = os.open(os.path.join(prefix, LOCK_FILE), os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(write_fd)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel let go of the dead holder's lock
    os.close(probe)


def test_state_loads_snapshot_even_if_given_another_config(tmp_path: Path) -> None:
    admin = Admin(tmp_path)
    other: Config = load_dict({"_format_version": "3.0", "services": [{"name": "z", "host": "z"}]})
    state = ConfigState(str(tmp_path), admin.arena, fallback=other)
    assert state.snapshot.config.services == ()


class DemoLimits(BaseModel):
    """A plugin config schema registered for the test, as ringgate.plugins registers its own."""

    model_config = ConfigDict(extra="forbid", strict=True)
    minute: int | None = None
    hour: int | None = None


def test_plugins_with_typed_form_config(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KNOWN_PLUGINS, "demo-limits", DemoLimits)
    admin("POST", "/services", b"name=s&host=s.internal")
    created = admin("POST", "/services/s/plugins", b"name=demo-limits&config.minute=5")
    assert created.status == 201, created.body
    plugin = created.body
    assert plugin["config"] == {"minute": 5, "hour": None}
    assert plugin["service"] == {"id": admin("GET", "/services/s").body["id"]} and plugin["route"] is None
    assert admin("POST", "/services/s/plugins", b"name=demo-limits").status == 409
    patched = admin("PATCH", f"/plugins/{plugin['id']}", b"config.hour=100")
    assert patched.body["config"] == {"minute": 5, "hour": 100}  # a record: merged, not replaced
    wrong = admin("PATCH", f"/plugins/{plugin['id']}", b"config.second=1")
    assert wrong.status == 400 and wrong.body["fields"] == {"config": {"second": "unknown field"}}
    assert admin("GET", "/services/s/plugins").body["data"][0]["id"] == plugin["id"]
    assert admin("DELETE", "/services/s").status == 204
    assert admin("GET", "/plugins").body["data"] == []  # went with its service
