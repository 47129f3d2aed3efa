"""SeriesTable across real forked processes: exact merges, writers killed with SIGKILL, retirement."""
from __future__ import annotations

import math
import os
import select
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
from shared_state.arena import REQUESTS, Arena, WorkerStats
from shared_state.series import SeriesTable

from shared_state import series as s

DEADLINE_S = 20.0


def _fork(target: Callable[..., None], *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException:  # noqa: BLE001 - a forked child must never return into pytest
            code = 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in time")


def _read_reports(fd: int, until: Callable[[bytes], bool]) -> bytes:
    """What a child reported (one byte per completed batch), read until `until` or end of file."""
    reports = b""
    deadline = time.monotonic() + DEADLINE_S
    while not until(reports):
        assert time.monotonic() < deadline, "the child stopped reporting"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            reports += data
    return reports


def test_workers_append_shared_and_own_keys_and_the_merge_is_exact() -> None:
    workers, rounds = 4, 3000
    table = SeriesTable(workers, series_per_slot=64)
    shared = [s.route_key("svc", f"r{i}") for i in range(5)]

    def work(slot: int) -> None:
        own = s.code_key("svc", "r0", 200 + slot, "service")
        for i in range(rounds):
            key = shared[i % len(shared)]
            index = table.series_index(slot, key, s.KIND_ROUTE)
            table.add(slot, index, s.R_REQUESTS, 1)
            table.add(slot, index, s.R_BYTES_IN, slot + 1)
            table.observe(slot, index, s.R_KONG_LATENCY, 1000 * (i % 3))  # 0, 1, 2 ms
            table.add(slot, table.series_index(slot, own, s.KIND_CODE), s.C_REQUESTS, 1)

    pids = [_fork(work, slot) for slot in range(workers)]
    assert all(_wait(pid) == 0 for pid in pids)
    merged = table.merged()
    per_key = rounds // len(shared)
    for key in shared:
        vec = merged[key]
        assert vec[s.R_REQUESTS] == workers * per_key
        assert vec[s.R_BYTES_IN] == per_key * sum(range(1, workers + 1))
        kong = vec[s.R_KONG_LATENCY:s.R_KONG_LATENCY + s.KONG_HIST_WORDS]
        assert sum(kong[:-1]) == workers * per_key
    for slot in range(workers):
        assert merged[s.code_key("svc", "r0", 200 + slot, "service")] == [rounds]
    assert [table.count(slot) for slot in range(workers)] == [len(shared) + 1] * workers
    assert table.overflowed() == 0


# The killed writer runs a fixed sequence of operations so that what it completed before
# it died can be checked exactly: batch b registers key "b<b mod 400>" (appends while the
# reader may be looking) and adds 1 to each of KEYS_PER_BATCH keys, in order, then reports
# the batch. Reports go through a pipe when the parent paces the writer, and through an
# arena counter (an atomic store, no system call) when it must be killed at any instruction.
KEYS_PER_BATCH = 8


_COMMON_KEYS = [s.route_key("svc", f"k{i}") for i in range(13)]
_BATCH_KEYS = [s.route_key("svc", f"b{i}") for i in range(400)]
# Built once, so that the writer spends its time adding (and a kill lands mid-batch).
_SEQUENCE = [[_COMMON_KEYS[(batch + j) % 13] for j in range(KEYS_PER_BATCH - 1)] + [_BATCH_KEYS[batch % 400]]
             for batch in range(13 * 400)]


def _batch_keys(batch: int) -> list[bytes]:
    return _SEQUENCE[batch % len(_SEQUENCE)]


def _paced_writer(table: SeriesTable, slot: int, report_fd: int, go_fd: int) -> None:
    """One batch, one byte on report_fd, then wait for a byte on go_fd."""
    batch = 0
    while True:
        for key in _batch_keys(batch):
            table.add(slot, table.series_index(slot, key, s.KIND_ROUTE), s.R_REQUESTS, 1)
        os.write(report_fd, b"b")
        batch += 1
        if not os.read(go_fd, 1):
            return


def _free_writer(table: SeriesTable, slot: int, progress: WorkerStats) -> None:
    """Batches until killed; the batch count goes to an arena counter after each batch."""
    batch = 0
    while True:
        for key in _batch_keys(batch):
            table.add(slot, table.series_index(slot, key, s.KIND_ROUTE), s.R_REQUESTS, 1)
        batch += 1
        progress.incr(REQUESTS)


def _expected_after(adds: int) -> Counter[bytes]:
    """Counts after the first `adds` add operations of the writer's sequence."""
    expected: Counter[bytes] = Counter()
    batch = 0
    while adds > 0:
        for key in _batch_keys(batch)[:adds]:
            expected[key] += 1
        adds -= KEYS_PER_BATCH
        batch += 1
    return expected


def _requests(table: SeriesTable) -> Counter[bytes]:
    return Counter({key: vec[s.R_REQUESTS] for key, vec in table.merged().items() if vec[s.R_REQUESTS]})


def test_writer_killed_between_batches_loses_nothing_and_retire_counts_it_once() -> None:
    table = SeriesTable(2, series_per_slot=512)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = _fork(_paced_writer, table, 1, report_w, go_r)
    os.close(report_w)
    os.close(go_r)
    try:
        for expected_batches in range(1, 6):
            assert _read_reports(report_r, lambda r: len(r) >= 1) == b"b"
            # The child is blocked between batches: its counts are exactly the batches it reported.
            assert _requests(table) == _expected_after(expected_batches * KEYS_PER_BATCH)
            if expected_batches < 5:
                os.write(go_w, b"g")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(report_r)
        os.close(go_w)
    before = _requests(table)
    assert before == _expected_after(5 * KEYS_PER_BATCH)
    table.retire(1)
    assert _requests(table) == before
    assert table.read_region(1) == {}


@pytest.mark.parametrize("run", range(3))  # a few kills, so some land inside a batch
def test_writer_killed_mid_batch_leaves_an_exact_prefix_and_retire_keeps_it(run: int) -> None:
    table = SeriesTable(2, series_per_slot=512)
    # Another worker's counts must come through the kill and the retirement untouched.
    neighbour = table.series_index(0, s.route_key("svc", "k0"), s.KIND_ROUTE)
    table.add(0, neighbour, s.R_REQUESTS, 1000)
    arena = Arena(1)
    progress = arena.worker_stats(0)
    pid = _fork(_free_writer, table, 1, progress)
    seen_totals = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while progress.get(REQUESTS) < 40:
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.001)
        # Read while the writer runs: a merged total never goes backwards.
        for _ in range(20):
            seen_totals.append(sum(_requests(table).values()))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert seen_totals == sorted(seen_totals)
    completed = progress.get(REQUESTS)

    counts = _requests(table)
    counts[s.route_key("svc", "k0")] -= 1000
    adds = sum(counts.values())
    assert completed * KEYS_PER_BATCH <= adds <= (completed + 1) * KEYS_PER_BATCH
    # Not only the total: the counts are exactly those of the first `adds` operations.
    assert +counts == _expected_after(adds)
    before = _requests(table)
    table.retire(1)
    assert _requests(table) == before, "retire lost or doubled what the killed writer did"
    assert table.read_region(1) == {}
    # A replacement worker in the same slot starts empty, and its counts add to the retired ones.
    def replacement() -> None:
        table.add(1, table.series_index(1, s.route_key("svc", "k0"), s.KIND_ROUTE), s.R_REQUESTS, 5)

    assert _wait(_fork(replacement)) == 0
    after = _requests(table)
    assert after[s.route_key("svc", "k0")] == before[s.route_key("svc", "k0")] + 5
    assert table.count(1) == 1


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def _is_triangular(value: int) -> bool:
    n = (math.isqrt(8 * value + 1) - 1) // 2
    return _triangle(n) == value


def test_a_reader_never_sees_a_retirement_half_done() -> None:
    """A reader sees the fold of a dead region either not at all or whole.

    Round r (from 0) adds r + 1 to each key in slot 0, then retires slot 0. Whenever a
    reader looks, a key holds 1 + 2 + ... + k for some k (live counters may be read at
    slightly different instants, but each is one word), a triangular number. A read that
    took the dead region before its fold and the retired region after it would count round
    r twice: T(r + 1) + r + 1, which is not triangular.
    """
    table = SeriesTable(2, series_per_slot=128)
    rounds, count = 3000, 64
    keys = [s.route_key("svc", f"churn{i:02d}") for i in range(count)]
    halfway_r, halfway_w = os.pipe()

    def churn() -> None:
        # Plays both the worker of slot 0 and the master that retires it, again and again;
        # halfway it waits until the reader has seen the half, so reads overlap the churn.
        for done in range(rounds):
            if done == rounds // 2:
                os.read(halfway_r, 1)
            for key in keys:
                table.add(0, table.series_index(0, key, s.KIND_ROUTE), s.R_REQUESTS, done + 1)
            table.retire(0)

    pid = _fork(churn)
    totals = []
    released = False
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            merged = table.merged()
            counts = [merged[key][s.R_REQUESTS] if key in merged else 0 for key in keys]
            torn = [value for value in counts if not _is_triangular(value)]
            assert not torn, f"a fold was seen half done: {torn[:5]}"
            totals.append(sum(counts))
            if not released and counts == [_triangle(rounds // 2)] * count:
                os.write(halfway_w, b"g")
                released = True
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert status == 0
                pid = 0
                break
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(halfway_r)
        os.close(halfway_w)
    assert pid == 0, "churn did not finish"
    assert totals == sorted(totals), "a total went backwards"
    assert [table.merged()[key][s.R_REQUESTS] for key in keys] == [_triangle(rounds)] * count
    assert released, "the reader never saw the churn half done"
