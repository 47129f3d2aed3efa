"""Declarative config rejections: every rule, its message, and the entity and field it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ringgate.config import ConfigError, load_dict, load_file, load_text, schema


def rejected(document: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_dict(document)
    return caught.value.messages


def only_problem(document: Any) -> str:
    messages = rejected(document)
    assert len(messages) == 1, messages
    return messages[0]


def doc(**collections: Any) -> dict[str, Any]:
    return {"_format_version": "3.0", **collections}


def service(**fields: Any) -> dict[str, Any]:
    return doc(services=[{"name": "a", "host": "a.internal", **fields}])


def route(**fields: Any) -> dict[str, Any]:
    return doc(services=[{"name": "a", "host": "a.internal", "routes": [{"name": "r", **fields}]}])


def upstream(**fields: Any) -> dict[str, Any]:
    return doc(upstreams=[{"name": "u.internal", **fields}])


# ----------------------------------------------------------------------------------------------
# ConfigError itself
# ----------------------------------------------------------------------------------------------


def test_error_text_names_source_and_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text('_format_version: "3.0"\nservices:\n- {name: a, port: 99999}\n', source="kong.yml")
    error = caught.value
    assert error.source == "kong.yml"
    assert error.messages == [
        "services[0] (name 'a') > host: required field missing",
        "services[0] (name 'a') > port: value should be between 0 and 65535",
    ]
    assert str(error) == (
        "kong.yml: invalid declarative config:\n"
        "  services[0] (name 'a') > host: required field missing\n"
        "  services[0] (name 'a') > port: value should be between 0 and 65535"
    )


def test_all_problems_are_gathered_across_entities_in_document_order() -> None:
    messages = rejected(
        {
            "_format_version": "9.9",
            "extra": 1,
            "targets": [{"target": "x:1", "upstream": "ghost"}],
            "services": [
                {"name": "a", "host": "h", "retries": -1, "routes": [{"paths": ["x"]}, {"methods": ["get"]}]},
                {"name": "a", "host": "h:80"},
            ],
            "upstreams": [{"name": "1.2.3.4"}],
        }
    )
    assert messages == [
        "_format_version: expected one of: 1.1, 2.1, 3.0",
        "extra: unknown field",
        "services[0] (name 'a') > retries: value should be between 0 and 32767",
        "services[0] (name 'a') > routes[0] > paths[0]: should start with: / (fixed path) or ~/ (regex path)",
        "services[0] (name 'a') > routes[1] > methods[0]: invalid value: get",
        "services[1] (name 'a') > host: must not have a port",
        "services[1] (name 'a'): uniqueness violation: 'services' entity with name set to 'a' already declared",
        "upstreams[0] (name '1.2.3.4') > name: Invalid name ('1.2.3.4'); no ip addresses allowed",
        "targets[0] (target 'x:1') > upstream: invalid reference 'upstream: ghost' (no such entry in 'upstreams')",
    ]


def test_flattened_has_kongs_shape() -> None:
    with pytest.raises(ConfigError) as caught:
        load_dict(
            doc(
                services=[
                    {
                        "name": "svc",
                        "host": "h",
                        "tags": ["t1"],
                        "port": -1,
                        "routes": [{"name": "r1", "paths": ["/a", "/b//c"]}, {"name": "r2"}],
                    }
                ],
                colour="red",
            )
        )
    flattened = caught.value.flattened()
    service_entry, route1_entry, route2_entry = flattened
    assert service_entry["entity_type"] == "service"
    assert service_entry["entity_name"] == "svc"
    assert service_entry["entity_tags"] == ["t1"]
    assert service_entry["entity"] == {"name": "svc", "host": "h", "tags": ["t1"], "port": -1}
    assert service_entry["errors"] == [
        {"type": "field", "field": "port", "message": "value should be between 0 and 65535"}
    ]
    service_id = service_entry["entity_id"]
    assert isinstance(service_id, str) and len(service_id) == 36
    assert route1_entry["entity_type"] == "route" and route1_entry["entity_name"] == "r1"
    # the parent reference is filled in; Kong's field paths count from 1
    assert route1_entry["entity"]["service"] == {"id": service_id}
    assert route1_entry["errors"] == [{"type": "field", "field": "paths.2", "message": "must not have empty segments"}]
    assert route2_entry["errors"] == [
        {
            "type": "entity",
            "message": "must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'",
        }
    ]
    assert route2_entry["entity_tags"] is None
    # document-level problems have no entity to attach to
    assert "colour: unknown field" in caught.value.messages


# ----------------------------------------------------------------------------------------------
# Reading and parsing
# ----------------------------------------------------------------------------------------------


def test_yaml_syntax_error_reports_the_line() -> None:
    text = '_format_version: "3.0"\nservices:\n  - name: a\n    host: [unclosed\n  - name: b\n'
    with pytest.raises(ConfigError) as caught:
        load_text(text, source="bad.yml")
    (message,) = caught.value.messages
    assert message.startswith("YAML syntax error at line 5,"), message
    assert str(caught.value).startswith("bad.yml: invalid declarative config:")


def test_yaml_mapping_error_reports_the_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text('_format_version: "3.0"\nservices:\n- name: a\n  host: b: c\n')
    assert caught.value.messages[0] == (
        "YAML syntax error at line 4, column 10: mapping values are not allowed in this context"
    )


def test_json_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "kong.json"
    path.write_text('{\n  "_format_version": "3.0",\n  "services": [,]\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_file(str(path))
    (message,) = caught.value.messages
    assert message.startswith("JSON syntax error at line 3,"), message
    assert caught.value.source == str(path)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yml"
    with pytest.raises(ConfigError) as caught:
        load_file(str(missing))
    assert caught.value.source == str(missing)
    assert caught.value.messages == ["cannot read the file: No such file or directory"]
    with pytest.raises(ConfigError) as caught:
        load_file(str(tmp_path))
    assert caught.value.messages == ["cannot read the file: Is a directory"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b'_format_version: "3.0"\n_comment: caf\xe9\n')
    with pytest.raises(ConfigError) as caught:
        load_file(str(path))
    assert caught.value.messages == ["the file is not valid UTF-8 (byte 36)"]


@pytest.mark.parametrize(
    ("text", "found"),
    [("- a\n- b\n", "a list"), ("", "nothing"), ("just text", "a str"), ("42", "a int")],
)
def test_top_level_must_be_a_mapping(text: str, found: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(text)
    assert caught.value.messages == [f"expected a mapping at the top level, got {found}"]


# ----------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------


def test_format_version_required() -> None:
    assert only_problem({"services": []}) == "_format_version: required field missing"


@pytest.mark.parametrize("version", ["3.1", 3.0, "1.0"])
def test_format_version_one_of(version: Any) -> None:
    assert only_problem({"_format_version": version}) == "_format_version: expected one of: 1.1, 2.1, 3.0"


def test_meta_key_types() -> None:
    assert rejected(doc(_transform="yes", _comment=5, _workspace=[])) == [
        "_transform: expected a boolean",
        "_comment: expected a string",
        "_workspace: expected a string",
    ]


def test_collections_must_be_arrays_of_records() -> None:
    # problems of the document itself come first, then the entities in file order
    assert rejected(doc(services={"name": "a"}, routes=["/a", {"paths": ["/"]}], consumers="bob")) == [
        "services: expected an array",
        "consumers: expected an array",
        "routes[0]: expected a record",
    ]


def test_nested_collection_must_be_an_array() -> None:
    assert only_problem(service(routes={"paths": ["/"]})) == "services[0] (name 'a') > routes: expected an array"


# ----------------------------------------------------------------------------------------------
# Services
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"protocol": "grpc"}, "protocol: protocol 'grpc' is not supported by Ringgate (supported: http, https)"),
        ({"protocol": "tcp"}, "protocol: protocol 'tcp' is not supported by Ringgate (supported: http, https)"),
        ({"protocol": "ftp"}, "protocol: expected one of: http, https, grpc, grpcs, tcp, tls, tls_passthrough, udp"),
        ({"host": None}, "host: required field missing"),
        ({"host": "a.internal:8080"}, "host: must not have a port"),
        ({"host": "bad host"}, "host: invalid value: bad host"),
        ({"host": "300.1.1.1"}, "host: invalid value: 300.1.1.1"),
        ({"port": 65536}, "port: value should be between 0 and 65535"),
        ({"port": "80"}, "port: expected an integer"),
        ({"path": "api"}, "path: should start with: /"),
        ({"path": "/a//b"}, "path: must not have empty segments"),
        ({"path": "/a b"}, "path: invalid path: '/a b' (characters outside of the reserved list of RFC 3986 found)"),
        ({"path": "/a%zz"}, "path: invalid url-encoded value: '%zz'"),
        ({"retries": 32768}, "retries: value should be between 0 and 32767"),
        ({"connect_timeout": 0}, "connect_timeout: value should be between 1 and 2147483646"),
        ({"read_timeout": 2**31 - 1}, "read_timeout: value should be between 1 and 2147483646"),
        ({"write_timeout": 1.5}, "write_timeout: expected an integer"),
        ({"enabled": "yes"}, "enabled: expected a boolean"),
        ({"tls_verify": True}, "tls_verify: can only be set when 'protocol' is 'https'"),
        ({"protocol": "https", "tls_verify_depth": 65}, "tls_verify_depth: value should be between 0 and 64"),
        (
            {"name": "a b"},
            "name: invalid value 'a b': the only accepted ascii characters are alphanumerics or ., -, _, and ~",
        ),
        (
            {"tags": ["ok", "a,b"]},
            "tags[1]: invalid tag 'a,b': expected printable ascii (except `,` and `/`) or valid utf-8 sequences",
        ),
        ({"colour": "red"}, "colour: unknown field"),
        ({"id": "not-a-uuid"}, "id: expected a valid UUID"),
    ],
)
def test_service_rules(fields: dict[str, Any], expected: str) -> None:
    name = fields.get("name", "a")
    assert only_problem(service(**fields)) == f"services[0] (name '{name}') > {expected}"


def test_service_url_cannot_be_combined_with_its_fields() -> None:
    message = only_problem(doc(services=[{"name": "a", "url": "http://x.internal", "port": 81}]))
    assert message == "services[0] (name 'a') > url: cannot be combined with 'protocol', 'host', 'port' or 'path'"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://", "url: missing host in url"),
        ("http://a.internal:99999/", "url: could not parse url: invalid port number"),
        ("grpc://a.internal", "protocol: protocol 'grpc' is not supported by Ringgate (supported: http, https)"),
        (5, "url: expected a string"),
    ],
)
def test_service_url_errors(url: Any, expected: str) -> None:
    messages = rejected(doc(services=[{"name": "a", "url": url}]))
    assert messages[0] == f"services[0] (name 'a') > {expected}"


# ----------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------


R = "services[0] (name 'a') > routes[0] (name 'r')"


def test_http_route_needs_a_matcher() -> None:
    assert only_problem(route(protocols=["http"])) == (
        f"{R}: must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"
    )
    assert only_problem(route(paths=[], methods=[])) == (
        f"{R}: must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'"
    )


def test_https_route_may_match_on_snis_alone() -> None:
    config = load_dict(route(protocols=["https"], snis=["shop.example.com"]))
    assert config.routes[0].snis == ("shop.example.com",)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"protocols": ["grpc"], "paths": ["/"]},
            "protocols[0]: protocol 'grpc' is not supported by Ringgate (supported: http, https)",
        ),
        (
            {"protocols": ["http", "ws"], "paths": ["/"]},
            "protocols[1]: expected one of: http, https, grpc, grpcs, tcp, tls, tls_passthrough, udp",
        ),
        ({"protocols": [], "paths": ["/"]}, "protocols: length must be at least 1"),
        ({"methods": ["GET", "post"]}, "methods[1]: invalid value: post"),
        ({"hosts": ["*.a.*"]}, "hosts[0]: invalid wildcard: must have at most one wildcard"),
        ({"hosts": ["a.*.com"]}, "hosts[0]: invalid wildcard: must be placed at leftmost or rightmost label"),
        ({"hosts": ["ok.com", "a.com:99999"]}, "hosts[1]: invalid port number"),
        ({"hosts": ["bad host"]}, "hosts[0]: invalid value: bad host"),
        ({"paths": ["~/(", "/ok"]}, "paths[0]: invalid regex: '/(' (missing ), unterminated subpattern at position 1)"),
        ({"paths": ["/a/../b"]}, "paths[0]: non-normalized path, consider use '/b' instead"),
        ({"paths": ["/%7Euser"]}, "paths[0]: non-normalized path, consider use '/~user' instead"),
        ({"paths": ["/a//b"]}, "paths[0]: must not have empty segments"),
        ({"paths": ["a"]}, "paths[0]: should start with: / (fixed path) or ~/ (regex path)"),
        ({"paths": ["/a%2"]}, "paths[0]: invalid url-encoded value: '%2'"),
        ({"paths": "/a"}, "paths: expected an array"),
        (
            {"headers": {"Host": ["a"]}},
            "headers.Host: cannot contain 'host' header, which must be specified in the 'hosts' attribute",
        ),
        ({"headers": {"x-a": "b"}}, "headers.x-a: expected an array"),
        (
            {"headers": {"x a": ["b"]}},
            "headers.x a: bad header name 'x a', allowed characters are A-Z, a-z, 0-9, '_', and '-'",
        ),
        (
            {"headers": {"x-a": ["ok", "~*[a"]}},
            "headers.x-a[1]: invalid regex: '[a' (unterminated character set at position 0)",
        ),
        (
            {"paths": ["/"], "https_redirect_status_code": 300},
            "https_redirect_status_code: expected one of: 426, 301, 302, 307, 308",
        ),
        ({"paths": ["/"], "path_handling": "v2"}, "path_handling: expected one of: v0, v1"),
        ({"paths": ["/"], "strip_path": "no"}, "strip_path: expected a boolean"),
        ({"paths": ["/"], "regex_priority": "1"}, "regex_priority: expected an integer"),
        (
            {"paths": ["/"], "sources": [{"ip": "10.0.0.1"}]},
            "sources: cannot set 'sources' when 'protocols' is 'http' or 'https'",
        ),
        (
            {"paths": ["/"], "destinations": [{"port": 80}]},
            "destinations: cannot set 'destinations' when 'protocols' is 'http' or 'https'",
        ),
        (
            {"paths": ["/"], "protocols": ["http"], "snis": ["a.com"]},
            "snis: 'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls', 'tls_passthrough', or 'wss'",
        ),
        ({"protocols": ["https"], "snis": ["10.0.0.1"]}, "snis[0]: must not be an IP"),
        (
            {"paths": ["/"], "service": "a"},
            "service: value must be null: a nested entry is linked to its parent automatically",
        ),
        ({"paths": ["/"], "expression": "x"}, "expression: unknown field"),
    ],
)
def test_route_rules(fields: dict[str, Any], expected: str) -> None:
    assert only_problem(route(**fields)) == f"{R} > {expected}"


def test_route_reference_errors() -> None:
    messages = rejected(
        doc(
            services=[{"name": "s1", "host": "h"}],
            routes=[
                {"name": "r1", "service": "foo", "paths": ["/1"]},
                {"name": "r2", "service": {"name": "bar"}, "paths": ["/2"]},
                {"name": "r3", "service": {"id": "6a3a5c6e-1111-4222-8333-444455556666"}, "paths": ["/3"]},
                {"name": "r4", "service": {"host": "h"}, "paths": ["/4"]},
                {"name": "r5", "service": 7, "paths": ["/5"]},
            ],
        )
    )
    assert messages == [
        "routes[0] (name 'r1') > service: invalid reference 'service: foo' (no such entry in 'services')",
        "routes[1] (name 'r2') > service: invalid reference 'service: bar' (no such entry in 'services')",
        "routes[2] (name 'r3') > service: invalid reference 'service: 6a3a5c6e-1111-4222-8333-444455556666' "
        "(no such entry in 'services')",
        "routes[3] (name 'r4') > service: expected a name or id, or a record with 'name' or 'id'",
        "routes[4] (name 'r5') > service: expected a name or id, or a record with 'name' or 'id'",
    ]


def test_route_names_and_ids_are_unique() -> None:
    given = "0b6f1a2c-3d4e-4f50-8a6b-7c8d9e0f1a2b"
    messages = rejected(
        doc(
            services=[{"name": "s", "host": "h", "routes": [{"name": "dup", "paths": ["/a"]}]}],
            routes=[{"name": "dup", "paths": ["/b"]}, {"id": given, "paths": ["/c"]}, {"id": given, "paths": ["/d"]}],
        )
    )
    assert messages == [
        "routes[0] (name 'dup'): uniqueness violation: 'routes' entity with name set to 'dup' already declared",
        f"routes[2]: uniqueness violation: 'routes' entity with primary key set to '{given}' already declared",
    ]


# ----------------------------------------------------------------------------------------------
# Upstreams and targets
# ----------------------------------------------------------------------------------------------


U = "upstreams[0] (name 'u.internal')"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"algorithm": "random"},
            "algorithm: expected one of: round-robin, consistent-hashing, least-connections, latency",
        ),
        (
            {"hash_on": "body"},
            "hash_on: expected one of: none, consumer, ip, header, cookie, path, query_arg, uri_capture",
        ),
        ({"hash_on": "header"}, "hash_on_header: required field missing when 'hash_on' is 'header'"),
        (
            {"hash_on": "ip", "hash_fallback": "header"},
            "hash_fallback_header: required field missing when 'hash_fallback' is 'header'",
        ),
        ({"hash_on": "cookie"}, "hash_on_cookie: required field missing when 'hash_on' is 'cookie'"),
        (
            {"hash_on": "ip", "hash_fallback": "cookie"},
            "hash_on_cookie: required field missing when 'hash_fallback' is 'cookie'",
        ),
        ({"hash_on": "query_arg"}, "hash_on_query_arg: required field missing when 'hash_on' is 'query_arg'"),
        (
            {"hash_on": "ip", "hash_fallback": "uri_capture"},
            "hash_fallback_uri_capture: required field missing when 'hash_fallback' is 'uri_capture'",
        ),
        ({"hash_fallback": "ip"}, "hash_fallback: must be 'none' when 'hash_on' is 'none'"),
        (
            {"hash_on": "cookie", "hash_on_cookie": "sid", "hash_fallback": "ip"},
            "hash_fallback: must be 'none' when 'hash_on' is 'cookie'",
        ),
        ({"hash_on": "ip", "hash_fallback": "ip"}, "hash_fallback: must differ from 'hash_on' ('ip')"),
        ({"hash_on": "path", "hash_fallback": "path"}, "hash_fallback: must differ from 'hash_on' ('path')"),
        (
            {"hash_on_header": "x y"},
            "hash_on_header: bad header name 'x y', allowed characters are A-Z, a-z, 0-9, '_', and '-'",
        ),
        ({"hash_on_cookie_path": "x"}, "hash_on_cookie_path: should start with: /"),
        ({"hash_on_query_arg": ""}, "hash_on_query_arg: length must be at least 1"),
        ({"slots": 9}, "slots: value should be between 10 and 65536"),
        ({"slots": 65537}, "slots: value should be between 10 and 65536"),
        ({"host_header": "a.internal:x"}, "host_header: invalid port number"),
        ({"healthchecks": {"threshold": 101}}, "healthchecks.threshold: value should be between 0 and 100"),
        (
            {"healthchecks": {"active": {"timeout": 65536}}},
            "healthchecks.active.timeout: value should be between 0 and 65535",
        ),
        (
            {"healthchecks": {"active": {"type": "udp"}}},
            "healthchecks.active.type: expected one of: tcp, http, https, grpc, grpcs",
        ),
        (
            {"healthchecks": {"active": {"concurrency": 0}}},
            "healthchecks.active.concurrency: value should be between 1 and 2147483648",
        ),
        ({"healthchecks": {"active": {"http_path": "health"}}}, "healthchecks.active.http_path: should start with: /"),
        (
            {"healthchecks": {"active": {"https_sni": "a.com:443"}}},
            "healthchecks.active.https_sni: must not have a port",
        ),
        (
            {"healthchecks": {"active": {"healthy": {"interval": -1}}}},
            "healthchecks.active.healthy.interval: value should be between 0 and 65535",
        ),
        (
            {"healthchecks": {"active": {"unhealthy": {"tcp_failures": 256}}}},
            "healthchecks.active.unhealthy.tcp_failures: value should be between 0 and 255",
        ),
        (
            {"healthchecks": {"passive": {"unhealthy": {"http_statuses": [500, 1000]}}}},
            "healthchecks.passive.unhealthy.http_statuses[1]: value should be between 100 and 999",
        ),
        (
            {"healthchecks": {"passive": {"healthy": {"succeses": 1}}}},
            "healthchecks.passive.healthy.succeses: unknown field",
        ),
        ({"healthchecks": {"active": "on"}}, "healthchecks.active: expected a record"),
    ],
)
def test_upstream_rules(fields: dict[str, Any], expected: str) -> None:
    assert only_problem(upstream(**fields)) == f"{U} > {expected}"


def test_hash_header_names_must_be_distinct() -> None:
    message = only_problem(
        upstream(hash_on="header", hash_on_header="x-a", hash_fallback="header", hash_fallback_header="x-a")
    )
    assert message == f"{U}: values of these fields must be distinct: 'hash_on_header', 'hash_fallback_header'"
    # the same mode with different names is fine
    load_dict(upstream(hash_on="header", hash_on_header="x-a", hash_fallback="header", hash_fallback_header="x-b"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("10.0.0.1", "Invalid name ('10.0.0.1'); no ip addresses allowed"),
        ("[::1]", "Invalid name ('[::1]'); no ip addresses allowed"),
        ("u.internal:80", "Invalid name ('u.internal:80'); no port allowed"),
        ("bad name", "Invalid name ('bad name'); must be a valid hostname"),
    ],
)
def test_upstream_name_is_a_hostname(name: str, expected: str) -> None:
    assert only_problem(doc(upstreams=[{"name": name}])) == f"upstreams[0] (name '{name}') > name: {expected}"


def test_upstream_name_required() -> None:
    assert only_problem(doc(upstreams=[{"slots": 100}])) == "upstreams[0] > name: required field missing"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            {"target": "a.internal:99999"},
            "target: Invalid target ('a.internal:99999'); not a valid hostname or ip address",
        ),
        ({"target": "no good"}, "target: Invalid target ('no good'); not a valid hostname or ip address"),
        ({"target": "a.internal", "weight": 65536}, "weight: value should be between 0 and 65535"),
        ({"target": "a.internal", "weight": -1}, "weight: value should be between 0 and 65535"),
        ({"weight": 5}, "target: required field missing"),
        (
            {"target": "a.internal", "upstream": "u.internal"},
            "upstream: value must be null: a nested entry is linked to its parent automatically",
        ),
    ],
)
def test_target_rules(target: dict[str, Any], expected: str) -> None:
    label = f" (target '{target['target']}')" if "target" in target else ""
    assert only_problem(upstream(targets=[target])) == f"{U} > targets[0]{label} > {expected}"


def test_target_unique_per_upstream_after_normalization() -> None:
    messages = rejected(
        doc(
            upstreams=[
                {"name": "u.internal", "targets": [{"target": "10.0.0.1"}]},
                {"name": "v.internal", "targets": [{"target": "10.0.0.1"}]},
            ],
            targets=[{"target": "10.0.0.1:8000", "upstream": "u.internal"}],
        )
    )
    assert messages == [
        "targets[0] (target '10.0.0.1:8000'): uniqueness violation: 'targets' entity with target set to "
        "'10.0.0.1:8000' already declared"
    ]


def test_top_level_target_needs_an_upstream() -> None:
    assert (
        only_problem(doc(targets=[{"target": "a.internal:80"}]))
        == "targets[0] (target 'a.internal:80') > upstream: required field missing"
    )


def test_upstream_names_are_unique() -> None:
    assert only_problem(doc(upstreams=[{"name": "u.internal"}, {"name": "u.internal"}])) == (
        "upstreams[1] (name 'u.internal'): "
        "uniqueness violation: 'upstreams' entity with name set to 'u.internal' already declared"
    )


# ----------------------------------------------------------------------------------------------
# Plugins
# ----------------------------------------------------------------------------------------------


def test_unknown_plugin_is_not_enabled() -> None:
    messages = rejected(
        doc(
            services=[{"name": "s", "host": "h", "plugins": [{"name": "acl", "config": {"allow": ["a"]}}]}],
            plugins=[{"name": "cors"}],
        )
    )
    assert messages == [
        "services[0] (name 's') > plugins[0] (name 'acl') > name: plugin 'acl' not enabled; "
        "add it to the 'plugins' configuration property",
        "plugins[0] (name 'cors') > name: plugin 'cors' not enabled; add it to the 'plugins' configuration property",
    ]


def test_plugin_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.KNOWN_PLUGINS, "cors", None)
    messages = rejected(
        doc(
            services=[{"name": "s1", "host": "h"}, {"name": "s2", "host": "h"}, {"name": "s3", "host": "h"}],
            plugins=[
                {"name": "cors", "consumer": "alice"},
                {"name": "cors", "service": "ghost"},
                {"name": "cors", "route": "ghost"},
                {"name": "cors", "protocols": ["http", "gopher"], "service": "s1"},
                {"name": "cors", "enabled": "yes", "config": [], "route": None, "service": "s2"},
                {"name": "cors", "service": "s3"},
                {"name": "cors", "service": {"name": "s3"}},
            ],
        )
    )
    assert messages == [
        "plugins[0] (name 'cors') > consumer: consumer-scoped plugins are not supported by Ringgate yet",
        "plugins[1] (name 'cors') > service: invalid reference 'service: ghost' (no such entry in 'services')",
        "plugins[2] (name 'cors') > route: invalid reference 'route: ghost' (no such entry in 'routes')",
        "plugins[3] (name 'cors') > protocols[1]: "
        "expected one of: http, https, grpc, grpcs, tcp, tls, tls_passthrough, udp",
        "plugins[4] (name 'cors') > config: expected a map",
        "plugins[4] (name 'cors') > enabled: expected a boolean",
        "plugins[6] (name 'cors'): uniqueness violation: 'plugins' entity with name set to 'cors' already declared "
        "for the same route, service and consumer",
    ]


def test_same_plugin_on_different_scopes_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.KNOWN_PLUGINS, "cors", None)
    config = load_dict(
        doc(
            services=[
                {"name": "s", "host": "h", "plugins": [{"name": "cors"}], "routes": [{"name": "r", "paths": ["/"]}]}
            ],
            plugins=[{"name": "cors"}, {"name": "cors", "route": "r"}],
        )
    )
    assert len(config.plugins) == 3
    # and a nested plugin repeated at the top level with the same scope is a duplicate
    messages = rejected(
        doc(
            services=[{"name": "s", "host": "h", "plugins": [{"name": "cors"}]}],
            plugins=[{"name": "cors", "service": "s"}],
        )
    )
    assert messages == [
        "plugins[0] (name 'cors'): uniqueness violation: 'plugins' entity with name set to 'cors' already declared "
        "for the same route, service and consumer"
    ]
