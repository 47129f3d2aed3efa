"""The shared arena across real forked processes: exact sums, retirement, no double counting."""
from __future__ import annotations

import os
import signal
import time

import pytest

from shared_state import arena as fields
from shared_state.arena import Arena


def _fork(target, *args) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        finally:
            os._exit(0)
    return pid


def test_processes_write_their_own_blocks_and_totals_add_up() -> None:
    arena = Arena(4)

    def work(slot: int) -> None:
        stats = arena.worker_stats(slot)
        for i in range(20000):
            stats.record_response(200 if i % 4 else 503, 10, 100)

    pids = [_fork(work, slot) for slot in range(4)]
    for pid in pids:
        os.waitpid(pid, 0)
    totals = arena.totals()
    assert totals["requests"] == 80000
    assert totals["status_2xx"] == 60000 and totals["status_5xx"] == 20000
    assert totals["bytes_in"] == 800000 and totals["bytes_out"] == 8000000


def test_retired_worker_counts_are_kept_and_not_doubled() -> None:
    arena = Arena(2)
    stats = arena.worker_stats(0)
    for _ in range(7):
        stats.record_response(200, 1, 1)
    stats.incr(fields.CONNECTIONS_ACTIVE, 3)
    arena.retire(0)
    totals = arena.totals()
    assert totals["requests"] == 7
    assert totals["connections_active"] == 0  # a gauge dies with its worker
    assert arena.read_block(0)["requests"] == 0
    fresh = arena.worker_stats(0)
    fresh.record_response(404, 0, 0)
    assert arena.totals()["requests"] == 8 and arena.totals()["status_4xx"] == 1


def test_reader_never_sees_a_retirement_half_done() -> None:
    arena = Arena(2)
    stats = arena.worker_stats(1)

    def churn() -> None:
        for _ in range(3000):
            stats.record_response(200, 0, 0)
            arena.retire(1)

    pid = _fork(churn)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen.append(arena.totals()["requests"])
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    assert seen == sorted(seen), "a total went backwards: a retirement was counted twice or not at all"
    assert arena.totals()["requests"] == 3000


def test_killed_writer_loses_nothing_already_written() -> None:
    arena = Arena(1)
    stats = arena.worker_stats(0)
    r, w = os.pipe()

    def writer() -> None:
        os.close(r)
        for i in range(1, 10**9):
            stats.record_response(200, 0, 0)
            if i == 5000:
                os.write(w, b"x")

    pid = _fork(writer)
    os.close(w)
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    before = arena.totals()["requests"]
    assert before >= 5000
    arena.retire(0)
    assert arena.totals()["requests"] == before


def test_generation_and_bounds() -> None:
    arena = Arena(3)
    assert arena.generation == 0
    assert arena.bump_generation() == 1 and arena.generation == 1
    with pytest.raises(IndexError):
        arena.worker_stats(3)  # the retired block is the master's
    with pytest.raises(ValueError):
        Arena(0)
    assert "slots=3" in repr(arena)
