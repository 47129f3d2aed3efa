"""Declarative config: loading, Kong's defaults, nesting and references, ids, hashing, round trips."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from ringgate.config import Config, ConfigError, load_dict, load_file, load_text

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kong.yml"


def minimal(**collections: Any) -> dict[str, Any]:
    return {"_format_version": "3.0", **collections}


def one_service(**fields: Any) -> Config:
    return load_dict(minimal(services=[{"name": "s", "host": "example.com", **fields}]))


def one_upstream(**fields: Any) -> Config:
    return load_dict(minimal(upstreams=[{"name": "u.internal", **fields}]))


# ----------------------------------------------------------------------------------------------
# The example file
# ----------------------------------------------------------------------------------------------


def test_example_loads_with_expected_shape() -> None:
    config = load_file(str(EXAMPLE))
    assert config.format_version == "3.0"
    assert [s.name for s in config.services] == ["catalogue", "orders", "events", "legacy-search", "partner-api"]
    # nested routes first (in service order), then the top-level ones
    assert [r.name for r in config.routes] == [
        "catalogue-public", "catalogue-item", "catalogue-admin", "orders", "events-stream",
        "legacy-search", "partner-callbacks",
    ]  # fmt: skip
    by_name = {s.name: s for s in config.services}
    routes = {r.name: r for r in config.routes}
    assert routes["catalogue-item"].service == by_name["catalogue"].id
    assert routes["partner-callbacks"].service == by_name["partner-api"].id
    assert config.service(routes["orders"].service).host == "orders.upstream"
    orders = config.upstream_by_name("orders.upstream")
    assert orders is not None and orders.algorithm == "consistent-hashing"
    # nested targets and the top-level one, merged, in file order
    assert [t.target for t in orders.targets] == [
        "10.20.2.21:9000", "[fd00::22]:9000", "orders-3.internal:8000", "10.20.2.24:9000",
    ]  # fmt: skip
    assert all(t.upstream == orders.id for t in orders.targets)
    assert config.upstream_by_name("nope") is None


def test_example_round_trips_through_to_dict() -> None:
    config = load_file(str(EXAMPLE))
    document = config.to_dict()
    again = load_dict(document)
    assert again.config_hash == config.config_hash
    assert again.to_dict() == document
    assert again == config
    # and through YAML text, as `ringgate` would persist it
    assert load_text(yaml.safe_dump(document)).config_hash == config.config_hash
    assert load_text(json.dumps(document)).config_hash == config.config_hash


def test_to_dict_is_canonical_declarative_form() -> None:
    document = load_file(str(EXAMPLE)).to_dict()
    assert document["_format_version"] == "3.0"
    assert set(document) == {"_format_version", "services", "routes", "upstreams", "targets", "plugins"}
    assert all("routes" not in s and "url" not in s for s in document["services"])
    assert all("targets" not in u for u in document["upstreams"])
    assert len(document["targets"]) == 6
    for collection in ("services", "routes", "upstreams", "targets"):
        for entity in document[collection]:
            uuid.UUID(entity["id"])


@pytest.mark.parametrize("path", sorted(EXAMPLE.parent.glob("*.yml")), ids=lambda p: p.name)
def test_every_example_loads_and_round_trips(path: Path) -> None:
    config = load_file(str(path))
    assert config.services and config.routes
    assert load_dict(config.to_dict()).config_hash == config.config_hash


def test_config_pickles_whole() -> None:
    config = load_file(str(EXAMPLE))
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and copy.config_hash == config.config_hash
    assert copy.service(config.services[0].id).name == "catalogue"
    assert [(t.host, t.port) for t in copy.upstreams[1].targets][:2] == [("10.20.2.21", 9000), ("fd00::22", 9000)]


def test_config_is_immutable() -> None:
    config = load_file(str(EXAMPLE))
    with pytest.raises((AttributeError, TypeError)):
        config.services = ()  # type: ignore[misc]
    with pytest.raises(ValueError):
        config.services[0].port = 1  # type: ignore[misc]
    with pytest.raises(KeyError):
        config.service("00000000-0000-0000-0000-000000000000")


# ----------------------------------------------------------------------------------------------
# Kong's defaults (values written out from kong-spec §1, not read from the schema)
# ----------------------------------------------------------------------------------------------


def test_service_defaults() -> None:
    service = one_service().services[0]
    assert service.protocol == "http"
    assert service.port == 80
    assert service.path is None
    assert service.retries == 5
    assert (service.connect_timeout, service.write_timeout, service.read_timeout) == (60000, 60000, 60000)
    assert service.enabled is True
    assert service.tls_verify is None and service.tls_verify_depth is None
    assert service.ca_certificates is None and service.client_certificate is None
    assert service.tags is None


def test_route_defaults() -> None:
    route = load_dict(minimal(routes=[{"paths": ["/"]}])).routes[0]
    assert route.protocols == ("http", "https")
    assert route.strip_path is True
    assert route.preserve_host is False
    assert route.regex_priority == 0
    assert route.path_handling == "v0"
    assert route.https_redirect_status_code == 426
    assert route.request_buffering is True and route.response_buffering is True
    assert route.service is None
    assert route.methods is None and route.hosts is None and route.headers is None and route.snis is None


def test_upstream_defaults() -> None:
    upstream = one_upstream().upstreams[0]
    assert upstream.algorithm == "round-robin"
    assert upstream.hash_on == "none" and upstream.hash_fallback == "none"
    assert upstream.hash_on_cookie_path == "/"
    assert upstream.slots == 10000
    assert upstream.use_srv_name is False
    assert upstream.host_header is None
    assert upstream.targets == ()


def test_healthcheck_defaults() -> None:
    checks = one_upstream().upstreams[0].healthchecks
    active, passive = checks.active, checks.passive
    assert active.type == "http"
    assert active.timeout == 1
    assert active.concurrency == 10
    assert active.http_path == "/"
    assert active.https_verify_certificate is True
    assert active.https_sni is None and active.headers is None
    assert active.healthy.interval == 0 and active.healthy.successes == 0
    assert active.healthy.http_statuses == (200, 302)
    assert active.unhealthy.interval == 0
    assert (active.unhealthy.http_failures, active.unhealthy.tcp_failures, active.unhealthy.timeouts) == (0, 0, 0)
    assert active.unhealthy.http_statuses == (429, 404, 500, 501, 502, 503, 504, 505)
    assert passive.healthy.successes == 0
    assert passive.healthy.http_statuses == (*range(200, 209), 226, *range(300, 309))
    assert (passive.unhealthy.http_failures, passive.unhealthy.tcp_failures, passive.unhealthy.timeouts) == (0, 0, 0)
    assert passive.unhealthy.http_statuses == (429, 500, 503)
    assert checks.threshold == 0


def test_partial_healthchecks_keep_other_defaults() -> None:
    checks = one_upstream(healthchecks={"active": {"unhealthy": {"interval": 5}}}).upstreams[0].healthchecks
    assert checks.active.unhealthy.interval == 5
    assert checks.active.unhealthy.http_statuses == (429, 404, 500, 501, 502, 503, 504, 505)
    assert checks.active.healthy.http_statuses == (200, 302)
    assert checks.passive.unhealthy.http_statuses == (429, 500, 503)


def test_target_defaults_and_normalization() -> None:
    config = one_upstream(
        targets=[
            {"target": "10.0.0.1"},
            {"target": "backend.internal:9000", "weight": 0},
            {"target": "[::1]:81"},
            {"target": "::2"},
        ]
    )
    targets = config.upstreams[0].targets
    assert [(t.target, t.host, t.port, t.weight) for t in targets] == [
        ("10.0.0.1:8000", "10.0.0.1", 8000, 100),
        ("backend.internal:9000", "backend.internal", 9000, 0),
        ("[::1]:81", "::1", 81, 100),
        ("[::2]:8000", "::2", 8000, 100),
    ]
    # host and port are derived, not dumped
    assert set(config.to_dict()["targets"][0]) == {
        "id",
        "created_at",
        "updated_at",
        "tags",
        "target",
        "weight",
        "upstream",
    }


def test_hash_on_switches_algorithm_to_consistent_hashing() -> None:
    upstream = one_upstream(algorithm="least-connections", hash_on="ip").upstreams[0]
    assert upstream.algorithm == "consistent-hashing"
    assert one_upstream(algorithm="latency").upstreams[0].algorithm == "latency"


# ----------------------------------------------------------------------------------------------
# The url shorthand
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://a.example.com", ("http", "a.example.com", 80, None)),
        ("https://a.example.com", ("https", "a.example.com", 443, None)),
        ("https://a.example.com:8443/x/y", ("https", "a.example.com", 8443, "/x/y")),
        ("http://10.0.0.5:81/", ("http", "10.0.0.5", 81, "/")),
        ("http://[::1]:8080/api", ("http", "::1", 8080, "/api")),
        ("a.example.com:443", ("https", "a.example.com", 443, None)),
        ("a.example.com:8080/p", ("http", "a.example.com", 8080, "/p")),
    ],
)
def test_url_shorthand_expands(url: str, expected: tuple[Any, ...]) -> None:
    service = load_dict(minimal(services=[{"name": "s", "url": url}])).services[0]
    assert (service.protocol, service.host, service.port, service.path) == expected
    assert not hasattr(service, "url")
    assert "url" not in load_dict(minimal(services=[{"url": url}])).to_dict()["services"][0]


def test_url_shorthand_equals_explicit_fields() -> None:
    short = load_dict(minimal(services=[{"name": "s", "url": "https://h.example.com:8443/base"}]))
    explicit = load_dict(
        minimal(services=[{"name": "s", "protocol": "https", "host": "h.example.com", "port": 8443, "path": "/base"}])
    )
    assert short.config_hash == explicit.config_hash


# ----------------------------------------------------------------------------------------------
# Nesting and references, both directions
# ----------------------------------------------------------------------------------------------


def test_nested_and_top_level_routes_reference_the_same_service() -> None:
    nested = load_dict(minimal(services=[{"name": "s1", "host": "h", "routes": [{"name": "r", "paths": ["/a"]}]}]))
    service_id = nested.services[0].id
    by_name = load_dict(
        minimal(services=[{"name": "s1", "host": "h"}], routes=[{"name": "r", "service": "s1", "paths": ["/a"]}])
    )
    by_record = load_dict(
        minimal(
            services=[{"name": "s1", "host": "h"}], routes=[{"name": "r", "service": {"name": "s1"}, "paths": ["/a"]}]
        )
    )
    by_id = load_dict(
        minimal(
            services=[{"name": "s1", "host": "h"}],
            routes=[{"name": "r", "service": {"id": service_id}, "paths": ["/a"]}],
        )
    )
    by_bare_id = load_dict(
        minimal(services=[{"name": "s1", "host": "h"}], routes=[{"name": "r", "service": service_id, "paths": ["/a"]}])
    )
    for config in (nested, by_name, by_record, by_id, by_bare_id):
        assert config.routes[0].service == service_id
    # the same entities, so the same snapshot
    assert len({c.config_hash for c in (nested, by_name, by_record, by_id, by_bare_id)}) == 1


def test_route_without_service_is_allowed() -> None:
    assert load_dict(minimal(routes=[{"paths": ["/x"]}])).routes[0].service is None


def test_service_given_an_explicit_id_is_referenced_by_it() -> None:
    given = "5a1b8e3c-0d2f-4c1e-9f10-0123456789ab"
    config = load_dict(minimal(services=[{"id": given, "host": "h"}], routes=[{"service": given, "paths": ["/"]}]))
    assert config.services[0].id == given
    assert config.routes[0].service == given


def test_targets_nested_and_top_level_merge_per_upstream() -> None:
    config = load_dict(
        minimal(
            upstreams=[{"name": "a.up", "targets": [{"target": "1.1.1.1:1"}]}, {"name": "b.up"}],
            targets=[
                {"target": "2.2.2.2:2", "upstream": "b.up"},
                {"target": "3.3.3.3:3", "upstream": {"name": "a.up"}},
            ],
        )
    )
    a, b = config.upstreams
    assert [t.target for t in a.targets] == ["1.1.1.1:1", "3.3.3.3:3"]
    assert [t.target for t in b.targets] == ["2.2.2.2:2"]
    assert [t.upstream for t in a.targets] == [a.id, a.id]
    assert [t.target for t in config.targets] == ["1.1.1.1:1", "3.3.3.3:3", "2.2.2.2:2"]


def test_nested_plugins_get_their_parent_and_top_level_plugins_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    from ringgate.config import schema

    monkeypatch.setitem(schema.KNOWN_PLUGINS, "cors", None)
    config = load_dict(
        minimal(
            services=[
                {
                    "name": "s",
                    "host": "h",
                    "plugins": [{"name": "cors"}],
                    "routes": [
                        {"name": "r", "paths": ["/"], "plugins": [{"name": "cors", "config": {"origins": ["*"]}}]}
                    ],
                }
            ],
            plugins=[{"name": "cors", "route": "r", "service": "s"}, {"name": "cors"}],
        )
    )
    service_id, route_id = config.services[0].id, config.routes[0].id
    scopes = [(p.service, p.route, p.consumer) for p in config.plugins]
    assert scopes == [
        (None, route_id, None),
        (service_id, None, None),
        (service_id, route_id, None),
        (None, None, None),
    ]
    assert config.plugins[0].config == {"origins": ["*"]}
    assert all(p.enabled is True and p.protocols == ("grpc", "grpcs", "http", "https") for p in config.plugins)
    assert len({p.id for p in config.plugins}) == 4


def test_registered_plugin_config_is_validated_and_defaulted(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import BaseModel, ConfigDict

    from ringgate.config import schema

    class LimitConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        minute: int | None = None
        policy: str = "local"

    monkeypatch.setitem(schema.KNOWN_PLUGINS, "rate-limiting", LimitConfig)
    config = load_dict(minimal(plugins=[{"name": "rate-limiting", "config": {"minute": 5}}]))
    assert config.plugins[0].config == {"minute": 5, "policy": "local"}
    with pytest.raises(ConfigError) as caught:
        load_dict(minimal(plugins=[{"name": "rate-limiting", "config": {"minute": "x", "hour": 1}}]))
    assert caught.value.messages == [
        "plugins[0] (name 'rate-limiting') > config.minute: expected an integer",
        "plugins[0] (name 'rate-limiting') > config.hour: unknown field",
    ]


def test_opaque_collections_are_kept() -> None:
    consumers = [{"username": "alice", "custom_id": "a-1"}]
    config = load_dict(minimal(consumers=consumers))
    assert config.consumers == ({"username": "alice", "custom_id": "a-1"},)
    document = config.to_dict()
    assert document["consumers"] == consumers
    assert "certificates" not in document and "snis" not in document
    assert load_dict(document).config_hash == config.config_hash
    assert config.config_hash != load_dict(minimal(consumers=[{"username": "bob"}])).config_hash


def test_meta_keys_are_accepted_and_do_not_change_the_hash() -> None:
    plain = load_dict(minimal(services=[{"host": "h"}]))
    with_meta = load_dict(minimal(services=[{"host": "h"}], _transform=False, _comment="hello", _workspace="default"))
    assert plain.config_hash == with_meta.config_hash


def test_load_dict_does_not_keep_or_change_its_input() -> None:
    document = minimal(services=[{"name": "s", "host": "h", "routes": [{"paths": ["/"], "headers": {"x-a": ["1"]}}]}])
    before = json.dumps(document, sort_keys=True)
    config = load_dict(document)
    assert json.dumps(document, sort_keys=True) == before
    document["services"][0]["routes"][0]["headers"]["x-a"].append("2")
    assert config.routes[0].headers == {"x-a": ("1",)}


# ----------------------------------------------------------------------------------------------
# Format versions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1", "2.1"])
def test_legacy_format_marks_regex_paths(version: str) -> None:
    config = load_dict(
        {"_format_version": version, "routes": [{"paths": ["/plain/path-1.x_y~", r"/users/\d+", "/v1/(?<id>[a-z]+)"]}]}
    )
    assert config.format_version == version
    assert config.routes[0].paths == ("/plain/path-1.x_y~", r"~/users/\d+", "~/v1/(?<id>[a-z]+)")
    assert config.to_dict()["_format_version"] == "3.0"
    assert load_dict(config.to_dict()).config_hash == config.config_hash


def test_format_3_paths_are_not_migrated() -> None:
    with pytest.raises(ConfigError) as caught:
        load_dict(minimal(routes=[{"paths": [r"\d+"]}]))
    assert "should start with: / (fixed path) or ~/ (regex path)" in caught.value.messages[0]


# ----------------------------------------------------------------------------------------------
# Ids
# ----------------------------------------------------------------------------------------------


def test_ids_are_stable_across_loads() -> None:
    first = load_file(str(EXAMPLE))
    second = load_file(str(EXAMPLE))

    def ids(config: Config) -> list[str]:
        return [e.id for group in (config.services, config.routes, config.upstreams, config.targets) for e in group]

    assert ids(first) == ids(second)
    assert len(set(ids(first))) == len(ids(first))


def test_named_ids_follow_kongs_uuid5_scheme() -> None:
    config = load_dict(minimal(services=[{"name": "billing", "host": "h"}], upstreams=[{"name": "u.up"}]))
    root = uuid.UUID("fd02801f-0957-4a15-a55a-c8d9606f30b5")
    assert config.services[0].id == str(uuid.uuid5(uuid.uuid5(root, "services"), "billing"))
    assert config.upstreams[0].id == str(uuid.uuid5(uuid.uuid5(root, "upstreams"), "u.up"))


def test_ids_do_not_depend_on_position_of_named_entities() -> None:
    a = load_dict(minimal(services=[{"name": "x", "host": "h"}, {"name": "y", "host": "h"}]))
    b = load_dict(minimal(services=[{"name": "y", "host": "h"}, {"name": "x", "host": "h"}]))
    assert {s.name: s.id for s in a.services} == {s.name: s.id for s in b.services}


def test_unnamed_twins_get_distinct_stable_ids() -> None:
    document = minimal(services=[{"host": "h", "routes": [{"paths": ["/a"]}, {"paths": ["/a"]}, {"paths": ["/b"]}]}])
    first, second = load_dict(document), load_dict(document)
    assert [r.id for r in first.routes] == [r.id for r in second.routes]
    assert len({r.id for r in first.routes}) == 3


# ----------------------------------------------------------------------------------------------
# Inputs and the hash
# ----------------------------------------------------------------------------------------------


def test_json_and_yaml_inputs_are_equal(tmp_path: Path) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    json_file = tmp_path / "kong.json"
    json_file.write_text(json.dumps(document, indent=2))
    from_json = load_file(str(json_file))
    from_yaml = load_file(str(EXAMPLE))
    assert from_json.config_hash == from_yaml.config_hash
    assert from_json.to_dict() == from_yaml.to_dict()
    # JSON detected by a leading "{" as well as by the extension
    assert load_text("  " + json.dumps(document)).config_hash == from_yaml.config_hash
    odd_name = tmp_path / "config.txt"
    odd_name.write_text(json.dumps(document))
    assert load_file(str(odd_name)).config_hash == from_yaml.config_hash


def test_hash_is_32_hex_and_ignores_key_order() -> None:
    config = load_file(str(EXAMPLE))
    assert len(config.config_hash) == 32 and int(config.config_hash, 16) >= 0

    def reverse_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reverse_keys(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reverse_keys(v) for v in value]
        return value

    document = yaml.safe_load(EXAMPLE.read_text())
    # opaque entries keep their own key order, so they show whether the hash sorts keys
    document["consumers"] = [{"username": "alice", "custom_id": "a-1", "tags": ["vip"]}]
    reordered = reverse_keys(document)
    assert list(reordered)[0] != "_format_version"
    assert list(reordered["consumers"][0]) == ["tags", "custom_id", "username"]
    assert load_dict(reordered).config_hash == load_dict(document).config_hash
    assert load_dict(document).config_hash != config.config_hash


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", 0, "retries"), 4),
        (("services", 0, "routes", 0, "strip_path"), False),
        (("upstreams", 0, "targets", 1, "weight"), 51),
        (("upstreams", 0, "healthchecks", "active", "unhealthy", "interval"), 6),
        (("services", 1, "url"), "http://orders.upstream:9001/v1"),
    ],
)
def test_hash_changes_when_a_field_changes(path: tuple[Any, ...], value: Any) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    original = load_dict(document).config_hash
    node = document
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    assert load_dict(document).config_hash != original


def test_hash_changes_when_a_default_is_written_differently() -> None:
    # writing a default explicitly is the same config...
    assert one_service(retries=5).config_hash == one_service().config_hash
    # ...a different value is not
    assert one_service(retries=6).config_hash != one_service().config_hash


def test_config_error_survives_pickling() -> None:
    with pytest.raises(ConfigError) as caught:
        load_dict(minimal(services=[{"name": "s"}]))
    restored = pickle.loads(pickle.dumps(caught.value))
    assert restored.messages == caught.value.messages and str(restored) == str(caught.value)
