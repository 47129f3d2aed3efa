"""SharedDict across real forked processes: exact sums, one winner per add, dead writers recovered.

Every check that could hang if a lock word stayed held runs in a child with a deadline: a spin
in C holds the GIL, so no Python-level timeout could stop it in this process.
"""
from __future__ import annotations

import mmap
import os
import random
import signal
import time
import traceback
import zlib
from collections.abc import Callable

import pytest

from shared_state.shdict import SharedDict


def _fork(work: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _join(pids: list[int], timeout: float) -> list[int]:
    """Exit codes of `pids`; kills them and fails the test if they are not done by the deadline."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if len(codes) < len(pids):
            if time.monotonic() > deadline:
                for pid in pids:
                    if pid not in codes:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                pytest.fail(f"processes still running after {timeout} s: a lock word stayed held?")
            time.sleep(0.002)
    return [codes[pid] for pid in pids]


def _bounded(work: Callable[[], None], timeout: float = 5.0) -> None:
    assert _join([_fork(work)], timeout) == [0]


class Gate:
    """Holds forked children until the parent opens it, so they really race."""

    def __init__(self) -> None:
        self._flag = mmap.mmap(-1, 1, flags=mmap.MAP_SHARED)

    def wait(self) -> None:
        while not self._flag[0]:
            time.sleep(0)

    def open(self) -> None:
        self._flag[0] = 1

    @property
    def is_open(self) -> bool:
        return bool(self._flag[0])


def test_four_processes_incr_the_same_key_to_the_exact_sum() -> None:
    d = SharedDict(64)
    gate = Gate()

    def work() -> None:
        gate.wait()
        for _ in range(20000):
            d.incr(b"hits", 1, init=0)
            d.incr_int(b"fast", 2, 0)

    pids = [_fork(work) for _ in range(4)]
    gate.open()
    assert _join(pids, 30) == [0, 0, 0, 0]
    assert d.get(b"hits") == 80000
    assert d.get(b"fast") == 160000


def test_concurrent_adds_have_one_winner_and_keys_one_slot() -> None:
    d = SharedDict(512, key_max=16, value_max=8)
    wins = SharedDict(512, key_max=16, value_max=8)
    keys = [f"lock-{i}".encode() for i in range(200)]
    gate = Gate()

    def contender(me: int) -> None:
        gate.wait()
        for key in keys:
            if d.add(key, me):
                wins.incr(key, 1, init=0)
        for key in keys[::2]:  # then churn: delete and re-insert the same keys concurrently
            d.delete(key)
            d.set(key, me)

    pids = [_fork(lambda me=me: contender(me)) for me in range(4)]
    gate.open()
    assert _join(pids, 30) == [0, 0, 0, 0]
    assert {key: wins.get(key) for key in keys} == {key: 1 for key in keys}
    stored = d.keys(0)
    assert len(stored) == len(set(stored)), "a key landed in two slots"
    assert set(stored) <= set(keys)
    assert set(keys[1::2]) <= set(stored)  # never deleted
    assert all(d.get(key) in range(4) for key in stored)


def _abandon(d: SharedDict, key: bytes, what: str) -> int:
    """A child that claims `key`'s slot (or insert lock) and dies holding it; returns its pid."""
    return _fork(lambda: d._abandon_claim_for_tests(key, what))


def test_dead_writer_mid_write_is_recovered_and_its_content_discarded() -> None:
    d = SharedDict(16)
    d.set(b"k", b"value")
    d.set(b"other", b"kept")
    os.waitpid(_abandon(d, b"k", "full"), 0)

    def check() -> None:
        assert d.get(b"k") is None  # a half-done write is never trusted
        assert d.get(b"other") == b"kept"
        d.set(b"k", b"new")
        assert d.get(b"k") == b"new"

    _bounded(check)
    assert d.stats()["recovered"] == 1


def test_zombie_writer_is_recovered_by_a_sibling() -> None:
    # The claim must carry the child's own pid (not its parent's, which is alive): a
    # sibling then sees a zombie and takes the slot back before the parent reaps it.
    d = SharedDict(16)
    d.set(b"k", b"value")
    pid = _abandon(d, b"k", "full")
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        _bounded(lambda: d.set(b"k", b"after"))
    finally:
        os.waitpid(pid, 0)
    assert d.get(b"k") == b"after" and d.stats()["recovered"] == 1


def test_dead_one_word_writer_keeps_the_counter() -> None:
    d = SharedDict(16)
    assert d.incr_int(b"ctr", 41, 0) == 41
    os.waitpid(_abandon(d, b"ctr", "word"), 0)

    def check() -> None:
        assert d.get(b"ctr") == 41  # every word was valid at every instant: nothing lost
        assert d.incr_int(b"ctr", 1) == 42

    _bounded(check)
    assert d.get(b"ctr") == 42 and d.stats()["recovered"] == 1


def test_dead_inserter_leaves_no_insert_lock_held() -> None:
    d = SharedDict(16)
    os.waitpid(_abandon(d, b"fresh", "insert_lock"), 0)
    _bounded(lambda: d.set(b"fresh", 1))  # a new key needs its home bucket's insert lock
    assert d.get(b"fresh") == 1 and d.stats()["recovered"] == 1


def test_a_claim_signed_with_our_own_pid_is_stale() -> None:
    # What a process finds when an earlier process with the same pid died holding a slot.
    d = SharedDict(16)
    d.set(b"k", 1)

    def check() -> None:
        d._abandon_claim_for_tests(b"k", "full")
        assert d.get(b"k") is None
        assert d.stats()["recovered"] == 1

    _bounded(check)


def test_a_live_writer_is_never_robbed() -> None:
    d = SharedDict(16)
    d.set(b"k", 1)
    held_r, held_w = os.pipe()

    def hold() -> None:
        d._abandon_claim_for_tests(b"k", "full")
        os.write(held_w, b"x")
        time.sleep(30)

    owner = _fork(hold)
    try:
        os.close(held_w)
        assert os.read(held_r, 1) == b"x"
        reader = _fork(lambda: d.get(b"k"))
        time.sleep(0.05)  # ten liveness checks' worth: the owner is alive, the reader must wait
        assert os.waitpid(reader, os.WNOHANG) == (0, 0)  # (stats() here would wait too: it reads every slot)
    finally:
        os.close(held_r)
        os.kill(owner, signal.SIGKILL)
        os.waitpid(owner, 0)
    assert _join([reader], 5) == [0]  # the owner died: the reader takes the slot back
    assert d.stats()["recovered"] == 1


KEYS = [f"k{i}".encode() for i in range(16)]


def _value_for(key: bytes, rnd: random.Random, size: int) -> bytes:
    body = key + b"|" + rnd.randbytes(size)
    return body + zlib.crc32(body).to_bytes(4, "little")


def _intact(key: bytes, value: bytes) -> bool:
    body, crc = value[:-4], value[-4:]
    return body.startswith(key + b"|") and zlib.crc32(body).to_bytes(4, "little") == crc


def test_writers_killed_in_a_loop_leave_nothing_torn_or_locked() -> None:
    d = SharedDict(64, key_max=16, value_max=4096, probe_window=16)
    pinned = {f"pin{i}".encode(): i for i in range(8)}  # written once, never touched again
    for key, number in pinned.items():
        d.set(key, number)
    stop = Gate()
    report_r, report_w = os.pipe()

    def steady_writer(seed: int) -> None:
        rnd = random.Random(seed)
        done = 0
        while not stop.is_open:
            key = rnd.choice(KEYS)
            roll = rnd.random()
            if roll < 0.1:
                d.delete(key)
            elif roll < 0.2:
                d.add(key, _value_for(key, rnd, rnd.randrange(0, 200)))
            else:
                d.set(key, _value_for(key, rnd, rnd.randrange(0, 200)))
            d.incr_int(b"ctr", 1, 0)
            done += 1
        os.write(report_w, f"w{done}\n".encode())

    def victim(seed: int) -> None:
        # big values written back to back: a kill often lands inside a claim
        rnd = random.Random(seed)
        values = [(key, _value_for(key, rnd, rnd.randrange(2000, 4000))) for key in KEYS for _ in range(2)]
        while True:
            for key, value in values:
                d.set(key, value)
                if rnd.random() < 0.1:
                    d.delete(key)
                d.incr_int(b"victim", 1, 0)

    def reader() -> None:
        checked = 0
        last_count = 0
        while not stop.is_open:
            for key in KEYS:
                value = d.get(key)
                if value is not None:
                    assert isinstance(value, bytes) and _intact(key, value), (key, value[:40])
                    checked += 1
            for key, number in pinned.items():  # never missed, whatever happens next to them
                assert d.get(key) == number, key
            count = d.get(b"ctr")
            assert (count is None and last_count == 0) or (isinstance(count, int) and count >= last_count), (
                count, last_count)
            last_count = count or 0
            assert set(d.keys(0)) <= {*KEYS, *pinned, b"ctr", b"victim"}
        os.write(report_w, f"r{checked}\n".encode())

    steady = [_fork(lambda seed=seed: steady_writer(seed)) for seed in (1, 2)]
    checker = _fork(reader)
    rnd = random.Random(7)
    kills = 0
    while kills < 30 or (d.stats()["recovered"] < 3 and kills < 100):
        pid = _fork(lambda seed=kills: victim(100 + seed))
        time.sleep(rnd.uniform(0.005, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
    stop.open()
    assert _join([*steady, checker], 10) == [0, 0, 0]
    os.close(report_w)
    with os.fdopen(report_r) as reports:
        lines = reports.read().split()
    written = sum(int(line[1:]) for line in lines if line.startswith("w"))
    checked = sum(int(line[1:]) for line in lines if line.startswith("r"))
    assert checked > 100, "the reader verified too few values to mean anything"
    # no increment of the steady writers is lost, whatever the killed ones were doing
    assert d.get(b"ctr") == written
    assert d.stats()["recovered"] >= 1, f"no kill out of {kills} landed inside a claim: the test proved little"

    def everything_still_works() -> None:
        d.keys(0)  # visits every slot: takes back any still held by a dead victim
        for key in [*KEYS, b"victim", b"new-key"]:
            d.set(key, b"x")
            assert d.get(key) == b"x"
            assert d.delete(key)
            assert d.add(key, 1)  # an insert: the home bucket's insert lock is free
            assert d.incr(key, 1) == 2
        d.flush_expired()

    _bounded(everything_still_works)
    stats = d.stats()
    assert stats["evictions"] == 0 and stats["full_errors"] == 0
