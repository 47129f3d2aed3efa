"""SharedDict semantics in one process: values, TTLs on the test clock, add/replace/incr, eviction."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared_state import shdict
from shared_state.shdict import SharedDict

START_MS = 5_000_000


class Clock:
    """Drives the dict's test clock (a frozen CLOCK_MONOTONIC in ms)."""

    def __init__(self) -> None:
        self.ms = START_MS
        shdict.set_test_clock_ms(self.ms)

    def advance(self, ms: int) -> None:
        self.ms += ms
        shdict.set_test_clock_ms(self.ms)


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()
    shdict.set_test_clock_ms(None)


def test_values_round_trip_with_their_types() -> None:
    d = SharedDict(16)
    d.set(b"bytes", b"hello")
    d.set("str key", 7)
    d.set(b"neg", -(1 << 63))
    d.set(b"float", 1.25)
    d.set(b"empty", b"")
    assert d.get(b"bytes") == b"hello"
    assert d.get(b"str key") == 7 and d.get("str key") == 7
    assert d.get(b"neg") == -(1 << 63)
    assert d.get(b"float") == 1.25 and isinstance(d.get(b"float"), float)
    assert d.get(b"empty") == b""
    assert d.get(b"absent") is None
    d.set(b"bytes", 3)  # a key may change type
    assert d.get(b"bytes") == 3
    assert d.get("ключ") is None
    d.set("ключ", b"v")
    assert d.get("ключ".encode()) == b"v"


def test_limits_are_checked_with_clear_errors() -> None:
    d = SharedDict(4, key_max=8, value_max=16)
    d.set(b"k" * 8, b"v" * 16)  # exactly at both limits
    with pytest.raises(ValueError, match="value_max of 16"):
        d.set(b"k", b"v" * 17)
    with pytest.raises(ValueError, match="1..8 bytes"):
        d.set(b"k" * 9, 1)
    with pytest.raises(ValueError, match="1..8 bytes"):
        d.get(b"")
    with pytest.raises(TypeError):
        d.set(b"k", True)
    with pytest.raises(TypeError):
        d.set(b"k", "text")
    with pytest.raises(TypeError):
        d.get(12)
    with pytest.raises(OverflowError):
        d.set(b"k", 1 << 63)
    with pytest.raises(ValueError):
        d.set(b"k", 1, ttl=-1)
    with pytest.raises(ValueError):
        SharedDict(0)
    assert d.get(b"k") is None  # nothing half-stored by the refused calls


def test_ttl_expiry_and_expire(clock: Clock) -> None:
    d = SharedDict(8)
    d.set(b"a", b"x", ttl=1.5)
    d.set(b"forever", 1)
    assert d.get_with_ttl(b"a") == (b"x", 1.5)
    assert d.get_with_ttl(b"forever") == (1, None)
    assert d.get_with_ttl(b"absent") == (None, None)
    clock.advance(1499)
    assert d.get(b"a") == b"x"
    clock.advance(1)
    assert d.get(b"a") is None
    assert d.expire(b"a", 10) is False  # expired entries cannot be revived
    assert d.expire(b"forever", 2) is True
    assert d.get_with_ttl(b"forever") == (1, 2.0)
    assert d.expire(b"forever", 0) is True  # 0: never expires again
    clock.advance(5000)
    assert d.get_with_ttl(b"forever") == (1, None)
    assert d.expire(b"absent", 1) is False


def test_add_replace_delete(clock: Clock) -> None:
    d = SharedDict(8)
    assert d.add(b"k", b"first") is True
    assert d.add(b"k", b"second") is False
    assert d.get(b"k") == b"first"
    assert d.replace(b"k", b"third") is True and d.get(b"k") == b"third"
    assert d.replace(b"absent", 1) is False and d.get(b"absent") is None
    d.set(b"short", 1, ttl=1)
    clock.advance(1000)
    assert d.replace(b"short", 2) is False  # expired counts as absent
    assert d.add(b"short", 3) is True and d.get(b"short") == 3
    assert d.delete(b"k") is True
    assert d.delete(b"k") is False
    assert d.get(b"k") is None
    assert d.add(b"k", b"again") is True and d.get(b"k") == b"again"
    d.set(b"gone", 1, ttl=1)
    clock.advance(1000)
    assert d.delete(b"gone") is False


def test_incr(clock: Clock) -> None:
    d = SharedDict(8)
    with pytest.raises(KeyError, match="no init"):
        d.incr(b"n", 1)
    assert d.get(b"n") is None
    assert d.incr(b"n", 5, init=10, init_ttl=10) == 15
    clock.advance(4000)
    assert d.incr(b"n", -3, init=0, init_ttl=100) == 12  # init and init_ttl only apply on creation
    assert d.get_with_ttl(b"n") == (12, 6.0)
    assert d.incr(b"n", 0.5) == 12.5 and isinstance(d.get(b"n"), float)  # a float makes it a float
    assert d.incr(b"n", 1) == 13.5
    clock.advance(6000)
    with pytest.raises(KeyError):
        d.incr(b"n", 1)  # expired
    assert d.incr(b"n", 1, init=0) == 1 and d.get_with_ttl(b"n") == (1, None)
    assert d.incr(b"f", 2, init=0.5) == 2.5
    d.set(b"text", b"12")
    with pytest.raises(TypeError, match="not a number"):
        d.incr(b"text", 1)
    with pytest.raises(TypeError):
        d.incr(b"n", True)
    d.set(b"big", (1 << 63) - 2)
    assert d.incr(b"big", 1) == (1 << 63) - 1
    with pytest.raises(OverflowError):
        d.incr(b"big", 1)
    assert d.get(b"big") == (1 << 63) - 1  # nothing written by the refused add


def test_incr_int_fast_path() -> None:
    d = SharedDict(8)
    with pytest.raises(KeyError):
        d.incr_int(b"hits", 1)
    assert d.incr_int(b"hits", 1, 0) == 1
    assert d.incr_int(b"hits", 41) == 42
    assert d.incr_int(b"hits", -2) == 40
    assert d.get(b"hits") == 40
    d.set(b"ratio", 0.5)
    with pytest.raises(TypeError, match="holds a float"):
        d.incr_int(b"ratio", 1)
    d.set(b"text", b"x")
    with pytest.raises(TypeError, match="not a number"):
        d.incr_int(b"text", 1)
    with pytest.raises(ValueError):
        d.incr_int(b"", 1)


def test_set_evicts_soonest_expiry_then_least_recently_written(clock: Clock) -> None:
    # capacity == probe window: every key's window is the whole table
    d = SharedDict(4, probe_window=4)
    for key in (b"a", b"b", b"c", b"d"):
        d.set(key, 1)
        clock.advance(1)
    d.set(b"e", 1)
    assert d.get(b"a") is None  # the least recently written
    assert d.stats()["evictions"] == 1
    clock.advance(1)
    d.incr(b"b", 1)  # a write: b is now recent
    d.set(b"f", 1)
    assert d.get(b"c") is None and d.get(b"b") == 2
    clock.advance(1)
    assert d.add(b"h", 1) is True  # add evicts too, like ngx.shared.DICT:add
    assert d.get(b"d") is None
    assert sorted(d.keys()) == [b"b", b"e", b"f", b"h"]
    assert d.stats()["evictions"] == 3


def test_eviction_prefers_the_entry_expiring_soonest(clock: Clock) -> None:
    d = SharedDict(4, probe_window=4)
    d.set(b"long", 1, ttl=100)
    clock.advance(1)
    d.set(b"short", 1, ttl=50)  # written later, but expires sooner
    clock.advance(1)
    d.set(b"p1", 1)
    clock.advance(1)
    d.set(b"p2", 1)
    clock.advance(1)
    d.set(b"n1", 1)
    assert d.get(b"short") is None
    d.set(b"n2", 1)
    assert d.get(b"long") is None  # entries with a TTL go before entries without
    d.set(b"n3", 1)
    assert d.get(b"p1") is None  # then the least recently written
    assert sorted(d.keys()) == [b"n1", b"n2", b"n3", b"p2"]
    assert d.stats()["evictions"] == 3


def test_safe_set_never_evicts_and_counts_full_errors(clock: Clock) -> None:
    d = SharedDict(2, probe_window=2)
    d.set(b"a", 1)
    d.set(b"b", 2, ttl=1)
    assert d.safe_set(b"c", 3) is False
    assert d.safe_add(b"c", 3) is False
    assert d.stats()["full_errors"] == 2
    assert d.get(b"a") == 1 and d.get(b"b") == 2
    assert d.safe_set(b"a", 10) is True  # an existing key needs no room
    clock.advance(1000)  # b expires: its slot is free again
    assert d.safe_set(b"c", 3) is True
    assert d.delete(b"a") is True
    assert d.safe_set(b"d", 4) is True  # a tombstone is reused
    assert sorted(d.keys()) == [b"c", b"d"]
    assert d.stats()["evictions"] == 0 and d.stats()["full_errors"] == 2


def test_flush_expired_keys_free_slots_and_stats(clock: Clock) -> None:
    d = SharedDict(16, key_max=8, value_max=8)
    for i in range(6):
        d.set(f"t{i}", i, ttl=1)
    for i in range(3):
        d.set(f"p{i}", i)
    assert d.free_slots() == 7 and d.stats()["used"] == 9
    clock.advance(1000)
    assert d.free_slots() == 13  # expired entries are free already
    assert sorted(d.keys()) == [b"p0", b"p1", b"p2"]
    assert len(d.keys(max_count=2)) == 2
    assert d.flush_expired(max_count=4) == 4
    assert d.flush_expired() == 2
    assert d.flush_expired() == 0
    stats = d.stats()
    assert stats["capacity"] == 16 and stats["used"] == 3
    assert stats["evictions"] == 0 and stats["full_errors"] == 0 and stats["recovered"] == 0
    assert d.size == stats["size"] and d.size > 16 * (8 * 8 + 16)
    assert SharedDict(32, key_max=8, value_max=8).size > d.size


def test_keys_do_not_collide_in_a_crowded_table() -> None:
    # more keys than one probe window, in a table where windows overlap heavily
    d = SharedDict(64, key_max=16, value_max=16, probe_window=8)
    stored = {}
    for i in range(40):
        if d.safe_set(f"key-{i}", f"v{i}".encode()):
            stored[f"key-{i}".encode()] = f"v{i}".encode()
    assert len(stored) >= 30
    assert {k: d.get(k) for k in stored} == stored
    assert sorted(d.keys(0)) == sorted(stored)
    for k in list(stored)[::2]:
        assert d.delete(k)
        del stored[k]
    assert {k: d.get(k) for k in stored} == stored  # lookups walk past tombstones
    assert sorted(d.keys(0)) == sorted(stored)
