"""SeriesTable in one process: keys, adds, histograms, overflow, retirement."""
from __future__ import annotations

import pytest
from shared_state.series import SeriesTable

from shared_state import series as s


def route(service: str = "svc", name: str = "r1") -> bytes:
    return s.route_key(service, name)


def test_keys_round_trip_and_refuse_the_separator() -> None:
    assert s.route_key("svc", "r1") == b"rsvc\x1fr1"
    assert s.decode_key(s.code_key("svc", "r1", 503, "kong")) == (s.KIND_CODE, ("svc", "r1", "503", "kong"))
    assert s.decode_key(s.target_key("up", "10.0.0.1:80")) == (s.KIND_TARGET, ("up", "10.0.0.1:80"))
    assert s.decode_key(s.route_key("sérvice", "")) == (s.KIND_ROUTE, ("sérvice", ""))
    assert s.decode_key(s.overflow_key(s.KIND_CODE)) == (s.KIND_CODE, ())
    with pytest.raises(ValueError, match="separator"):
        s.route_key("a\x1fb", "r")
    with pytest.raises(ValueError, match="fields"):
        s.encode_key(s.KIND_TARGET, "only-one")
    with pytest.raises(ValueError):
        s.decode_key(b"xyz")
    with pytest.raises(ValueError):
        s.encode_key(7, "a")


def test_an_index_is_stable_per_key_and_adds_are_exact() -> None:
    table = SeriesTable(2, series_per_slot=16)
    a = table.series_index(0, route("svc", "a"), s.KIND_ROUTE)
    b = table.series_index(0, route("svc", "b"), s.KIND_ROUTE)
    code = table.series_index(0, s.code_key("svc", "a", 200), s.KIND_CODE)
    assert a == s.NKINDS and b == a + 1 and code == b + 1, "ordinary series come after the overflow series"
    assert table.series_index(0, route("svc", "a"), s.KIND_ROUTE) == a
    assert table.count(0) == 3 and table.count(1) == 0
    table.add(0, a, s.R_REQUESTS, 5)
    table.add(0, a, s.R_STATUS_2XX, 4)
    table.add(0, a, s.R_STATUS_5XX)
    table.add(0, a, s.R_BYTES_OUT, 1 << 40)
    table.add(0, code, s.C_REQUESTS, 4)
    # The same key in another worker's region is summed on read.
    other = table.series_index(1, route("svc", "a"), s.KIND_ROUTE)
    table.add(1, other, s.R_REQUESTS, 2)
    merged = table.merged()
    assert merged[route("svc", "a")][:8] == [7, 0, 4, 0, 0, 1, 0, 1 << 40]
    assert len(merged[route("svc", "a")]) == s.R_WORDS
    assert merged[s.code_key("svc", "a", 200)] == [4]
    assert merged[route("svc", "b")] == [0] * s.R_WORDS, "a registered series shows up even before any add"
    assert s.overflow_key(s.KIND_ROUTE) not in merged, "an unused overflow series stays out of the result"
    assert table.read_region(1) == {route("svc", "a"): [2] + [0] * (s.R_WORDS - 1)}


def test_wrong_use_is_refused() -> None:
    table = SeriesTable(1, series_per_slot=4)
    code = table.series_index(0, s.code_key("svc", "r", 404), s.KIND_CODE)
    with pytest.raises(IndexError):
        table.add(0, code, 1, 1)  # a code series has one counter
    with pytest.raises(IndexError):
        table.add(0, code + 1, 0, 1)  # not published
    with pytest.raises(IndexError):
        table.add(1, code, 0, 1)  # the retired region is the master's
    with pytest.raises(IndexError):
        table.series_index(1, route(), s.KIND_ROUTE)
    with pytest.raises(ValueError, match="not a route key"):
        table.series_index(0, s.target_key("u", "t:1"), s.KIND_ROUTE)
    with pytest.raises(ValueError, match="histogram"):
        table.observe(0, code, s.R_BYTES_IN, 1)
    with pytest.raises(IndexError):
        table.observe(0, code, s.R_REQUEST_LATENCY, 1)  # not a route series
    with pytest.raises(OverflowError):
        table.add(0, code, 0, -1)
    with pytest.raises(ValueError):
        SeriesTable(0)
    with pytest.raises(ValueError):
        SeriesTable(1, series_per_slot=0)
    assert "slots=1" in repr(table) and table.size > 0


@pytest.mark.parametrize("name", ["request", "upstream", "kong"])
def test_histogram_buckets_match_kongs_bounds_at_every_edge(name: str) -> None:
    base, bounds = s.HISTOGRAMS[name]
    assert bounds == (s.KONG_BOUNDS_MS if name == "kong" else s.LONG_BOUNDS_MS)
    table = SeriesTable(1, series_per_slot=4)
    index = table.series_index(0, route(), s.KIND_ROUTE)
    expected = [0] * (len(bounds) + 1)
    total = 0
    for i, bound in enumerate(bounds):
        table.observe(0, index, base, bound * 1000)      # on the bound: that bucket (le)
        table.observe(0, index, base, bound * 1000 + 1)  # just above: the next one
        expected[i] += 1
        expected[i + 1] += 1
        total += 2 * bound * 1000 + 1
    table.observe(0, index, base, 0)
    expected[0] += 1
    vec = table.merged()[route()]
    words = len(bounds) + 2
    assert vec[base:base + words] == expected + [total]
    untouched = [w for w in range(s.R_WORDS) if not base <= w < base + words]
    assert all(vec[w] == 0 for w in untouched), "an observation wrote outside its histogram"


def test_kong_latency_bounds_are_kongs() -> None:
    assert s.KONG_BOUNDS_MS == (1, 2, 5, 7, 10, 15, 20, 30, 50, 75, 100, 200, 500, 750, 1000, 3000, 6000)
    assert s.LONG_BOUNDS_MS == (25, 50, 80, 100, 250, 400, 700, 1000, 2000, 5000, 10000, 30000, 60000)
    assert s.R_UPSTREAM_LATENCY == s.R_REQUEST_LATENCY + s.LONG_HIST_WORDS
    assert s.R_KONG_LATENCY == s.R_UPSTREAM_LATENCY + s.LONG_HIST_WORDS
    assert s.R_WORDS == s.R_KONG_LATENCY + s.KONG_HIST_WORDS


def test_a_full_region_counts_into_the_overflow_series_once_per_key() -> None:
    table = SeriesTable(1, series_per_slot=2)
    first = table.series_index(0, route("s", "a"), s.KIND_ROUTE)
    table.series_index(0, s.code_key("s", "a", 200), s.KIND_CODE)
    late_route = table.series_index(0, route("s", "b"), s.KIND_ROUTE)
    late_code = table.series_index(0, s.code_key("s", "b", 200), s.KIND_CODE)
    assert late_route == s.KIND_ROUTE and late_code == s.KIND_CODE
    assert table.series_index(0, route("s", "b"), s.KIND_ROUTE) == s.KIND_ROUTE
    assert table.overflowed() == 2, "the same refused key asked twice counts once"
    table.add(0, late_route, s.R_REQUESTS, 3)
    table.add(0, late_code, s.C_REQUESTS, 3)
    table.add(0, first, s.R_REQUESTS, 1)
    merged = table.merged()
    assert merged[s.overflow_key(s.KIND_ROUTE)][0] == 3
    assert merged[s.overflow_key(s.KIND_CODE)] == [3]
    assert route("s", "b") not in merged and merged[route("s", "a")][0] == 1


def test_a_key_too_long_goes_to_overflow() -> None:
    table = SeriesTable(1, series_per_slot=8)
    long_key = route("s" * 100, "r" * 30)
    assert len(long_key) > s.MAX_KEY_BYTES
    assert table.series_index(0, long_key, s.KIND_ROUTE) == s.KIND_ROUTE
    fits = route("s" * 100, "r" * 18)
    assert len(fits) == s.MAX_KEY_BYTES
    index = table.series_index(0, fits, s.KIND_ROUTE)
    assert index == s.NKINDS
    table.add(0, index, s.R_REQUESTS, 1)
    assert table.merged()[fits][0] == 1 and table.overflowed() == 1


def test_retire_folds_by_key_and_clears_the_region() -> None:
    table = SeriesTable(2, series_per_slot=8)
    for slot, amount in ((0, 5), (1, 7)):
        index = table.series_index(slot, route(), s.KIND_ROUTE)
        table.add(slot, index, s.R_REQUESTS, amount)
        table.observe(slot, index, s.R_UPSTREAM_LATENCY, 30_000)
    own = table.series_index(0, s.target_key("up", "a:1"), s.KIND_TARGET)
    table.add(0, own, s.T_TIMEOUTS, 2)
    before = table.merged()
    table.retire(0)
    assert table.merged() == before, "a retirement lost or doubled a count"
    assert table.read_region(0) == {} and table.count(0) == 0
    assert table.read_region(2)[route()][0] == 5
    # The slot's next worker starts from an empty region; this process's cache was invalidated.
    again = table.series_index(0, route(), s.KIND_ROUTE)
    assert again == s.NKINDS
    table.add(0, again, s.R_REQUESTS, 1)
    table.retire(0)
    merged = table.merged()
    assert merged[route()][0] == 13
    assert merged[route()][s.R_UPSTREAM_LATENCY + 1] == 2  # 30 ms lands in the 50 ms bucket
    assert merged[s.target_key("up", "a:1")][s.T_TIMEOUTS] == 2
    assert table.count(2) == 2, "the retired region keeps one entry per key"


def test_a_full_retired_region_folds_into_its_overflow_series() -> None:
    table = SeriesTable(1, series_per_slot=2, retired_capacity=2)
    for names in (("a", "b"), ("c", "d")):
        for name in names:
            table.add(0, table.series_index(0, route("s", name), s.KIND_ROUTE), s.R_REQUESTS, 10)
        table.series_index(0, route("s", "refused-" + names[0]), s.KIND_ROUTE)  # region full
        table.retire(0)
    merged = table.merged()
    assert merged[route("s", "a")][0] == 10 and merged[route("s", "b")][0] == 10
    assert merged[s.overflow_key(s.KIND_ROUTE)][0] == 20, "c and d had no room in the retired region"
    assert table.overflowed() == 4, "two refused by the worker regions, two by the retired region"
    assert sum(vec[0] for key, vec in merged.items() if s.kind_of(key) == s.KIND_ROUTE) == 40
