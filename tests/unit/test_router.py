"""Router matching: Kong traditional_compatible precedence and matching rules (kong-spec §2)."""
from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from fastpath.router import Router, RouterError, RouteSpec, compile_route_regex, normalize_path

Headers = Mapping[str, "str | Sequence[str]"]


def winner(
    specs: Sequence[RouteSpec],
    path: str = "/",
    host: str = "example.com",
    method: str = "GET",
    headers: Headers | None = None,
    port: int = 8000,
) -> str | None:
    result = Router(specs).match(method, host, path, headers, port)
    return None if result is None else result.spec.id


# ---------------------------------------------------------------------------
# Precedence (Kong's documented examples)


def test_hosts_and_path_beat_path_alone_regardless_of_length() -> None:
    specs = [
        RouteSpec("long-path", paths=["/very/long/path/indeed"]),
        RouteSpec("host+root", hosts=["a.com"], paths=["/"]),
    ]
    assert winner(specs, "/very/long/path/indeed", host="a.com") == "host+root"
    assert winner(specs, "/very/long/path/indeed", host="b.com") == "long-path"


def test_plain_host_beats_wildcard_host() -> None:
    specs = [
        RouteSpec("wild", hosts=["*.a.com"], paths=["/"]),
        RouteSpec("plain", hosts=["x.a.com"], paths=["/"]),
    ]
    assert winner(specs, host="x.a.com") == "plain"
    assert winner(specs, host="y.a.com") == "wild"


def test_more_headers_win() -> None:
    specs = [
        RouteSpec("one", headers={"x-a": ["1"]}),
        RouteSpec("two", headers={"x-a": ["1"], "x-b": ["2"]}),
    ]
    assert winner(specs, headers={"x-a": "1", "x-b": "2"}) == "two"
    assert winner(specs, headers={"x-a": "1"}) == "one"
    assert winner(specs, headers={"x-b": "2"}) is None


def test_regex_beats_longer_prefix() -> None:
    specs = [
        RouteSpec("prefix", paths=["/users/list/all"]),
        RouteSpec("regex", paths=[r"~/users/\w+"]),
    ]
    assert winner(specs, "/users/list/all") == "regex"
    assert winner(specs, "/users/") is None


def test_higher_regex_priority_wins() -> None:
    specs = [
        RouteSpec("low", paths=[r"~/a/\d+"], regex_priority=1),
        RouteSpec("high", paths=[r"~/a/.+"], regex_priority=5),
        RouteSpec("negative", paths=[r"~/a/"], regex_priority=-3),
    ]
    assert winner(specs, "/a/12") == "high"
    assert winner(specs, "/a/") == "negative"
    # a huge regex_priority must not spill into the fields ranked above it (Kong bit-packs them)
    huge = [RouteSpec("huge", paths=[r"~/a"], regex_priority=2**40), RouteSpec("hdr", headers={"x": ["1"]})]
    assert winner(huge, "/a", headers={"x": "1"}) == "hdr"  # one field each; one header outranks "is regex"
    more_fields = [
        RouteSpec("huge", paths=[r"~/a"], regex_priority=2**40),
        RouteSpec("two-fields", paths=["/a"], methods=["GET"]),
    ]
    assert winner(more_fields, "/a") == "two-fields"


def test_regex_priority_is_ignored_for_prefix_paths() -> None:
    specs = [
        RouteSpec("short-high", paths=["/a"], regex_priority=100),
        RouteSpec("long", paths=["/a/b"]),
    ]
    assert winner(specs, "/a/b") == "long"


def test_longest_prefix_wins() -> None:
    specs = [
        RouteSpec("root", paths=["/"]),
        RouteSpec("a", paths=["/a"]),
        RouteSpec("ab", paths=["/a/b"]),
    ]
    assert winner(specs, "/a/b/c") == "ab"
    assert winner(specs, "/a/c") == "a"
    assert winner(specs, "/b") == "root"


def test_equal_priority_goes_to_the_route_declared_first() -> None:
    first = RouteSpec("first", paths=["/x"])
    second = RouteSpec("second", paths=["/x"])
    assert winner([first, second], "/x") == "first"
    assert winner([second, first], "/x") == "second"


def test_route_with_several_paths_ranks_each_path_on_its_own() -> None:
    specs = [
        RouteSpec("multi", paths=["/a", "/long/prefix"]),
        RouteSpec("mid", paths=["/long"]),
    ]
    assert winner(specs, "/long/prefix/x") == "multi"
    assert winner(specs, "/long/x") == "mid"
    result = Router(specs).match("GET", "h", "/long/prefix/x", None, 80)
    assert result is not None and result.matched_path == "/long/prefix"


# ---------------------------------------------------------------------------
# Methods, headers, hosts, paths


def test_methods_are_exact_and_add_a_field() -> None:
    specs = [RouteSpec("any", paths=["/"]), RouteSpec("get", paths=["/"], methods=["GET", "HEAD"])]
    assert winner(specs, method="GET") == "get"
    assert winner(specs, method="HEAD") == "get"
    assert winner(specs, method="POST") == "any"
    assert winner([RouteSpec("get", methods=["GET"])], method="get") is None


def test_headers_and_across_names_or_across_values() -> None:
    specs = [RouteSpec("r", headers={"X-Version": ["v1", "V2"], "x-region": ["eu"]})]
    assert winner(specs, headers={"x-version": "v1", "x-region": "eu"}) == "r"
    assert winner(specs, headers={"x-version": "v2", "x-region": "EU"}) == "r"  # values compared lowercased
    assert winner(specs, headers={"x-version": "v3", "x-region": "eu"}) is None
    assert winner(specs, headers={"x-version": "v1"}) is None
    assert winner(specs, headers=None) is None
    assert Router(specs).header_names == frozenset({"x-version", "x-region"})


def test_header_regex_value_is_case_insensitive_search() -> None:
    specs = [RouteSpec("r", headers={"user-agent": [r"~*mobile\s+safari", "exact-bot"]})]
    assert winner(specs, headers={"user-agent": "Mozilla/5.0 Mobile   Safari/604"}) == "r"
    assert winner(specs, headers={"user-agent": "EXACT-BOT"}) == "r"
    assert winner(specs, headers={"user-agent": "exact-bot/2"}) is None
    assert winner(specs, headers={"user-agent": "desktop"}) is None


def test_repeated_header_matches_when_any_value_matches() -> None:
    specs = [RouteSpec("r", headers={"x-a": ["yes"]})]
    assert winner(specs, headers={"x-a": ["no", "YES"]}) == "r"
    assert winner(specs, headers={"x-a": ["no", "nope"]}) is None


def test_headers_may_be_any_mapping() -> None:
    class ReadOnly(Mapping[str, str]):
        def __init__(self, data: dict[str, str]) -> None:
            self._data = data

        def __getitem__(self, key: str) -> str:
            return self._data[key]

        def __iter__(self) -> Any:
            return iter(self._data)

        def __len__(self) -> int:
            return len(self._data)

    specs = [RouteSpec("r", headers={"x-a": ["1"]})]
    assert winner(specs, headers=ReadOnly({"x-a": "1"})) == "r"
    assert winner(specs, headers=ReadOnly({"x-b": "1"})) is None


def test_host_is_case_insensitive_and_port_is_stripped() -> None:
    specs = [RouteSpec("r", hosts=["Example.COM"])]
    assert winner(specs, host="example.com") == "r"
    assert winner(specs, host="EXAMPLE.com:8000") == "r"
    assert winner(specs, host="example.org") is None
    assert winner(specs, host="") is None


def test_route_host_port_is_compared_with_the_listen_port() -> None:
    specs = [RouteSpec("ported", hosts=["a.com:8443"]), RouteSpec("plain", hosts=["b.com"])]
    assert winner(specs, host="a.com", port=8443) == "ported"
    assert winner(specs, host="a.com:9999", port=8443) == "ported"  # the Host header's port is ignored
    assert winner(specs, host="a.com:8443", port=8000) is None
    assert winner(specs, host="b.com", port=1234) == "plain"


def test_wildcard_hosts_both_forms() -> None:
    specs = [RouteSpec("suffix", hosts=["*.a.com"]), RouteSpec("prefix", hosts=["api.*"])]
    assert winner(specs, host="x.a.com") == "suffix"
    assert winner(specs, host="x.y.a.com") == "suffix"  # several labels
    assert winner(specs, host="a.com") is None
    assert winner(specs, host="xa.com") is None
    assert winner(specs, host="api.example.org") == "prefix"
    assert winner(specs, host="api.b.c") == "prefix"
    assert winner(specs, host="apix.org") is None


def test_wildcard_host_with_port() -> None:
    specs = [RouteSpec("r", hosts=["*.a.com:8000"])]
    assert winner(specs, host="x.a.com", port=8000) == "r"
    assert winner(specs, host="x.a.com", port=8001) is None


def test_ipv6_host() -> None:
    specs = [RouteSpec("r", hosts=["[::1]"]), RouteSpec("p", hosts=["[::2]:8443"])]
    assert winner(specs, host="[::1]:8000") == "r"
    assert winner(specs, host="[::2]", port=8443) == "p"
    assert winner(specs, host="[::2]", port=8000) is None


def test_paths_are_case_sensitive_plain_prefixes() -> None:
    specs = [RouteSpec("r", paths=["/fee"])]
    assert winner(specs, "/fee") == "r"
    assert winner(specs, "/feex") == "r"
    assert winner(specs, "/fee/x") == "r"
    assert winner(specs, "/Fee") is None
    assert winner(specs, "/fe") is None


def test_regex_is_anchored_at_the_start_and_runs_on_the_normalized_path() -> None:
    specs = [RouteSpec("r", paths=[r"~/v\d+/"])]
    assert winner(specs, "/v1/x") == "r"
    assert winner(specs, "/api/v1/x") is None
    assert winner(specs, "/x/../v2/") == "r"
    assert winner(specs, "/%76%31/") == "r"


def test_route_without_paths_matches_every_path() -> None:
    specs = [RouteSpec("r", hosts=["a.com"])]
    assert winner(specs, "/anything/at/all", host="a.com") == "r"


def test_no_match_and_empty_router() -> None:
    assert winner([RouteSpec("r", paths=["/a"])], "/b") is None
    empty = Router([])
    assert len(empty) == 0
    assert empty.match("GET", "a.com", "/", None, 8000) is None
    assert empty.header_names == frozenset()


def test_bad_escape_propagates_value_error() -> None:
    router = Router([RouteSpec("r", paths=["/"])])
    with pytest.raises(ValueError):
        router.match("GET", "a.com", "/%zz", None, 8000)
    with pytest.raises(ValueError):
        Router([]).match("GET", "a.com", "/%4", None, 8000)


def test_match_result_fields() -> None:
    service = object()
    spec = RouteSpec("r", name="users", paths=["/users"], service_path="/api", payload=service)
    router = Router([spec])
    assert len(router) == 1
    result = router.match("GET", "a.com", "/users//42/", None, 8000)
    assert result is not None
    assert result.spec is spec
    assert result.payload is service
    assert result.normalized_path == "/users/42/"
    assert result.matched_path == "/users"
    assert result.stripped_prefix == "/users"
    assert result.upstream_path == "/api/42/"
    assert result.captures is None


def test_route_spec_fields_and_empty_sequences() -> None:
    spec = RouteSpec("r", hosts=[], paths=["/a"], methods=(), headers={}, regex_priority=3)
    assert spec.hosts is None and spec.methods is None and spec.headers is None
    assert spec.paths == ("/a",)
    assert spec.regex_priority == 3
    assert spec.strip_path is True and spec.preserve_host is False
    assert spec.path_handling == "v0" and spec.protocols == ("http", "https")
    with pytest.raises(TypeError):
        RouteSpec("r", hosts="a.com")


def test_a_spec_can_be_shared_by_two_routers() -> None:
    spec = RouteSpec("r", paths=["/a"])
    first, second = Router([spec]), Router([RouteSpec("s", paths=["/a/b"]), spec])
    assert winner([spec], "/a") == "r"
    assert first.match("GET", "", "/a/b", None, 1) is not None
    result = second.match("GET", "", "/a/b", None, 1)
    assert result is not None and result.spec.id == "s"


# ---------------------------------------------------------------------------
# Regex translation and errors


def test_compile_route_regex_translates_named_groups() -> None:
    pattern = compile_route_regex(r"/version/(?<version>\d+)/users/(?<user>\S+)")
    m = pattern.match("/version/2/users/amy")
    assert m is not None and m.group("version") == "2" and m.group("user") == "amy"
    quoted = compile_route_regex(r"/(?'id'\d+)")
    m = quoted.match("/7")
    assert m is not None and m.group("id") == "7"


def test_compile_route_regex_leaves_lookbehinds_classes_and_escapes_alone() -> None:
    assert compile_route_regex(r"/(?<=/)a(?<!b)").match("/a")
    literal = compile_route_regex(r"/a\(?<b>")  # escaped "(", then literal "<b>"
    assert literal.match("/a(<b>") and literal.match("/a<b>") and not literal.groupindex
    in_class = compile_route_regex(r"/[(?<]x")
    assert in_class.match("/<x") and in_class.match("/(x") and not in_class.groupindex
    assert compile_route_regex(r"/[]a]").match("/]")


def test_compile_route_regex_backreferences_and_end_anchor() -> None:
    pattern = compile_route_regex(r"/(?<w>\w+)/\k<w>\z")
    assert pattern.match("/ab/ab")
    assert not pattern.match("/ab/cd")
    assert not pattern.match("/ab/ab/")


def test_compile_route_regex_is_anchored_only_through_match() -> None:
    pattern = compile_route_regex(r"/b")
    assert pattern.match("/b/c") and not pattern.match("/a/b")


@pytest.mark.parametrize("bad", ["/(", "/[a", r"/(?<1x>a)", "/a{2,1}", "\\"])
def test_invalid_regex_error_text(bad: str) -> None:
    with pytest.raises(RouterError) as caught:
        compile_route_regex(bad)
    text = str(caught.value)
    assert text.startswith(f"invalid regex: '{bad}' (") and text.endswith(")")
    assert isinstance(caught.value, ValueError)


def test_route_spec_rejects_invalid_regexes_and_hosts() -> None:
    with pytest.raises(RouterError, match=r"^invalid regex: '/\(' "):
        RouteSpec("r", paths=["~/("])
    with pytest.raises(RouterError, match="invalid regex"):
        RouteSpec("r", headers={"x": ["~*("]})
    with pytest.raises(RouterError, match="at most one wildcard"):
        RouteSpec("r", hosts=["*.a.*"])
    with pytest.raises(RouterError, match="leftmost or rightmost"):
        RouteSpec("r", hosts=["a.*.com"])
    with pytest.raises(RouterError):
        RouteSpec("r", hosts=["a.com:99999"])
    with pytest.raises(RouterError):
        RouteSpec("r", headers={"x": []})


# ---------------------------------------------------------------------------
# The indexed search against a brute-force reference


def _reference_priority(spec: RouteSpec, path: str | None) -> tuple[int, ...]:
    is_regex = path is not None and path.startswith("~")
    fields = sum(bool(x) for x in (spec.methods, spec.hosts, spec.headers, spec.paths))
    plain_hosts = bool(spec.hosts) and all("*" not in h for h in spec.hosts or ())
    return (
        fields,
        int(plain_hosts),
        len(spec.headers or {}),
        int(is_regex),
        spec.regex_priority if is_regex else 0,
        0 if path is None or is_regex else len(path),
    )


def _reference_host_matches(route_host: str, host: str, listen_port: int) -> bool:
    name, _, port = route_host.lower().partition(":")
    if port and int(port) != listen_port:
        return False
    if name.startswith("*."):
        return host.endswith(name[1:])
    if name.endswith(".*"):
        return host.startswith(name[:-1])
    return host == name


def _reference_headers_match(rules: Mapping[str, Sequence[str]], headers: Mapping[str, str]) -> bool:
    for name, values in rules.items():
        value = headers.get(name.lower())
        if value is None:
            return False
        lowered = value.lower()
        if not any(
            re.search(v[2:], lowered, re.IGNORECASE) if v.startswith("~*") else v.lower() == lowered for v in values
        ):
            return False
    return True


def _reference_match(
    specs: Sequence[RouteSpec], method: str, host: str, raw_path: str, headers: Mapping[str, str], port: int
) -> tuple[str, str | None, dict[Any, str] | None] | None:
    path = normalize_path(raw_path)
    host = host.split(":")[0].lower()
    entries = []
    for spec in specs:
        for path_entry in spec.paths or (None,):
            entries.append((_reference_priority(spec, path_entry), len(entries), spec, path_entry))
    entries.sort(key=lambda e: (tuple(-x for x in e[0]), e[1]))
    for _, _, spec, path_entry in entries:
        if spec.methods and method not in spec.methods:
            continue
        if spec.hosts and not any(_reference_host_matches(h, host, port) for h in spec.hosts):
            continue
        if spec.headers and not _reference_headers_match(spec.headers, headers):
            continue
        captures = None
        if path_entry is not None:
            if path_entry.startswith("~"):
                m = re.match(path_entry[1:].replace("(?<", "(?P<"), path)
                if m is None:
                    continue
                captures = {i: g for i, g in enumerate(m.groups(), 1) if g is not None}
                captures.update({k: g for k, g in m.groupdict().items() if g is not None})
            elif not path.startswith(path_entry):
                continue
        return spec.id, path_entry, captures
    return None


HOST_POOL = [
    "a.com", "b.com", "x.a.com", "y.x.a.com", "*.a.com", "*.x.a.com", "api.*", "api.a.*",
    "b.com:8000", "*.a.com:8443", "api.*:8000", "A.com",
]
PATH_POOL = [
    "/", "/a", "/ab", "/a/b", "/abc", "/b", "/a/b/c", "/c/",
    r"~/a\d", r"~/(?<x>a|b)/", r"~/ab?c", r"~/(a)(?<n>b)?", r"~/[bc]+$",
]
HEADER_POOL = {"x-a": ["1", "2", "~*^v\\d"], "x-b": ["on", "~*off|no"], "x-c": ["Z"]}
REQ_HOSTS = [
    "a.com", "A.COM", "b.com:8000", "x.a.com", "y.x.a.com", "z.y.x.a.com", "api.a.com", "api.a.org",
    "api.b.c:99", "c.org", "", "a.com.", "xa.com",
]
REQ_PIECES = ["/", "a", "b", "c", "1", "2", "/a", "/b", "..", "%61", "//"]


def _random_spec(rng: random.Random, index: int) -> RouteSpec:
    fields: dict[str, Any] = {}
    while not fields or rng.random() < 0.15:
        choice = rng.choice(["hosts", "paths", "paths", "methods", "headers"])
        if choice == "hosts":
            fields["hosts"] = rng.sample(HOST_POOL, rng.randint(1, 2))
        elif choice == "paths":
            fields["paths"] = rng.sample(PATH_POOL, rng.randint(1, 3))
        elif choice == "methods":
            fields["methods"] = rng.sample(["GET", "POST", "PUT"], rng.randint(1, 2))
        else:
            names = rng.sample(sorted(HEADER_POOL), rng.randint(1, 2))
            fields["headers"] = {n: rng.sample(HEADER_POOL[n], rng.randint(1, len(HEADER_POOL[n]))) for n in names}
    return RouteSpec(f"r{index}", regex_priority=rng.randint(-2, 2), **fields)


def _random_request(rng: random.Random) -> tuple[str, str, str, dict[str, str], int]:
    path = "/" + "".join(rng.choice(REQ_PIECES) for _ in range(rng.randint(0, 5)))
    headers = {}
    for name, values in (("x-a", ["1", "2", "V3", "x"]), ("x-b", ["ON", "off", "No", "maybe"]), ("x-c", ["z"])):
        if rng.random() < 0.5:
            headers[name] = rng.choice(values)
    return rng.choice(["GET", "POST", "PUT", "DELETE"]), rng.choice(REQ_HOSTS), path, headers, rng.choice([8000, 8443])


def test_indexed_match_agrees_with_brute_force() -> None:
    rng = random.Random(1234)
    compared = matched = 0
    for _ in range(60):
        specs = [_random_spec(rng, i) for i in range(rng.randint(1, 60))]
        router = Router(specs)
        for _ in range(100):
            method, host, path, headers, port = _random_request(rng)
            expected = _reference_match(specs, method, host, path, headers, port)
            result = router.match(method, host, path, headers, port)
            got = None if result is None else (result.spec.id, result.matched_path, result.captures)
            assert got == expected, (method, host, path, headers, port)
            compared += 1
            matched += expected is not None
    # the random mix must exercise both outcomes, or the comparison proves little
    assert compared == 6000
    assert 0.2 * compared < matched < 0.95 * compared
