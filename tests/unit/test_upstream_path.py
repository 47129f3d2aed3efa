"""Upstream path joining (kong-spec §2 "Upstream path"), through the functions and the Router."""
from __future__ import annotations

import pytest

from fastpath.router import (
    RouteMatch,
    Router,
    RouterError,
    RouteSpec,
    upstream_path_v0,
    upstream_path_v1,
)

# svc.path, route path, request, strip, v0, v1: the table in kong-spec §2
KONG_TABLE = [
    ("/s", "/fee", "/fee/x", True, "/s/x", "/s/x"),
    ("/s", "/fee", "/feex", True, "/s/x", "/sx"),
    ("/s/", "/fee", "/fee", True, "/s", "/s/"),
    ("/s/", "/fee", "/fee/", True, "/s/", "/s/"),
    ("/s", "/fee", "/fee/x", False, "/s/fee/x", "/sfee/x"),
    ("/s", "/", "/", False, "/s", "/s"),
    (None, "/fee", "/fee", True, "/", "/"),
]


def _match_one(spec: RouteSpec, path: str) -> RouteMatch:
    result = Router([spec]).match("GET", "example.com", path, None, 8000)
    assert result is not None
    return result


@pytest.mark.parametrize(("service_path", "route_path", "request_path", "strip", "v0", "v1"), KONG_TABLE)
def test_kong_table_through_functions(
    service_path: str | None, route_path: str, request_path: str, strip: bool, v0: str, v1: str
) -> None:
    base = service_path or "/"
    postfix = request_path[len(route_path) :]
    assert upstream_path_v0(base, postfix, request_path, strip) == v0
    assert upstream_path_v1(base, postfix, request_path, strip) == v1


@pytest.mark.parametrize(("service_path", "route_path", "request_path", "strip", "v0", "v1"), KONG_TABLE)
def test_kong_table_through_router(
    service_path: str | None, route_path: str, request_path: str, strip: bool, v0: str, v1: str
) -> None:
    for handling, expected in (("v0", v0), ("v1", v1)):
        spec = RouteSpec(
            "r", paths=[route_path], strip_path=strip, path_handling=handling, service_path=service_path
        )
        assert _match_one(spec, request_path).upstream_path == expected, handling


@pytest.mark.parametrize(
    ("base", "postfix", "request_path", "strip", "expected"),
    [
        # every branch of get_upstream_uri_v0
        ("/", "", "/fee", True, "/"),
        ("/s/", "", "/fee/", True, "/s/"),
        ("/s/", "", "/fee", True, "/s"),
        ("/s/", "/x", "/fee/x", True, "/s/x"),
        ("/s/", "x", "/feex", True, "/s/x"),
        ("/s/", "ignored", "/fee/x", False, "/s/fee/x"),
        ("/s", "", "/fee/", True, "/s/"),
        ("/s", "", "/", True, "/s"),
        ("/s", "/x", "/fee/x", True, "/s/x"),
        ("/s", "x", "/feex", True, "/s/x"),
        ("/s", "ignored", "/", False, "/s"),
        ("/s", "ignored", "/fee", False, "/s/fee"),
    ],
)
def test_v0_branches(base: str, postfix: str, request_path: str, strip: bool, expected: str) -> None:
    assert upstream_path_v0(base, postfix, request_path, strip) == expected


@pytest.mark.parametrize(
    ("base", "postfix", "request_path", "strip", "expected"),
    [
        ("/s/", "/x", "/fee/x", True, "/s/x"),
        ("/s/", "x", "/feex", True, "/s/x"),
        ("/s", "x", "/feex", True, "/sx"),
        ("/s", "", "/fee", True, "/s"),
        ("/s/", "ignored", "/fee", False, "/s/fee"),
    ],
)
def test_v1_branches(base: str, postfix: str, request_path: str, strip: bool, expected: str) -> None:
    assert upstream_path_v1(base, postfix, request_path, strip) == expected


def test_strip_with_regex_uses_the_match_end() -> None:
    spec = RouteSpec("r", paths=[r"~/v(?<version>\d+)"], service_path="/s")
    result = _match_one(spec, "/v12/users/7")
    assert result.upstream_path == "/s/users/7"
    assert result.stripped_prefix == "/v12"
    assert result.matched_path == r"~/v(?<version>\d+)"


def test_regex_without_strip_keeps_the_request_path() -> None:
    spec = RouteSpec("r", paths=[r"~/v\d+"], service_path="/s", strip_path=False)
    result = _match_one(spec, "/v12/users")
    assert result.upstream_path == "/s/v12/users"
    assert result.stripped_prefix is None


def test_captures_named_and_positional_unmatched_omitted() -> None:
    spec = RouteSpec("r", paths=[r"~/version/(?<version>\d+)/users/(?<user>\S+)"])
    result = _match_one(spec, "/version/3/users/bob")
    assert result.captures == {1: "3", 2: "bob", "version": "3", "user": "bob"}

    spec = RouteSpec("r", paths=[r"~/(a)?(?<b>b)?(c)"])
    result = _match_one(spec, "/bc")
    assert result.captures == {2: "b", 3: "c", "b": "b"}


def test_regex_without_groups_has_empty_captures_and_prefix_route_has_none() -> None:
    assert _match_one(RouteSpec("r", paths=[r"~/v\d"]), "/v1").captures == {}
    assert _match_one(RouteSpec("r", paths=["/v"]), "/v1").captures is None


def test_route_without_paths_uses_the_whole_path_as_postfix() -> None:
    spec = RouteSpec("r", hosts=["example.com"], service_path="/s")
    result = _match_one(spec, "/foo/bar")
    assert result.upstream_path == "/s/foo/bar"
    assert result.stripped_prefix is None
    assert result.matched_path is None
    assert _match_one(spec, "/").upstream_path == "/s"


@pytest.mark.parametrize(
    ("request_path", "expected"),
    [
        ("/fee../x", "/s/x"),  # postfix "../x" loses its "../"
        ("/fee./x", "/s/x"),  # postfix "./x" loses its "./"
        ("/fee..", "/s"),  # postfix ".." becomes ""
        ("/fee.", "/s"),
    ],
)
def test_leading_dot_segments_are_dropped_from_the_postfix(request_path: str, expected: str) -> None:
    spec = RouteSpec("r", paths=["/fee"], service_path="/s")
    assert _match_one(spec, request_path).upstream_path == expected


def test_upstream_path_is_normalized_then_escaped() -> None:
    spec = RouteSpec("r", paths=["/fee"], service_path="/s")
    result = _match_one(spec, "/fee/x/../caf%c3%a9%20y%2fz")
    assert result.normalized_path == "/fee/café y%2Fz"
    assert result.upstream_path == "/s/caf%C3%A9%20y%2Fz"


def test_stripped_prefix_is_none_for_slash_and_without_strip() -> None:
    assert _match_one(RouteSpec("r", paths=["/"]), "/x").stripped_prefix is None
    assert _match_one(RouteSpec("r", paths=["/fee"], strip_path=False), "/fee/x").stripped_prefix is None
    assert _match_one(RouteSpec("r", paths=["/fee"]), "/fee/x").stripped_prefix == "/fee"


def test_unknown_path_handling_is_refused() -> None:
    with pytest.raises(RouterError):
        RouteSpec("r", paths=["/"], path_handling="v2")
