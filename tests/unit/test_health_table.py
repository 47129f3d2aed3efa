"""The shared health table: Kong's counting rules, ejection with recovery, races between processes."""
from __future__ import annotations

import os
import signal
import time

import pytest

from shared_state.health import (
    HTTP_FAILURE,
    SUCCESS,
    TCP_FAILURE,
    TIMEOUT,
    HealthPolicy,
    HealthTable,
    identity_hash,
    now_ms,
)
from shared_state.health_rules import Event, State

PASSIVE = HealthPolicy(passive=(2, 3, 2, 2), base_ejection_ms=1000, max_ejection_ms=4000)
KONG_PASSIVE = HealthPolicy(passive=(0, 3, 2, 2), base_ejection_ms=0)
ACTIVE = HealthPolicy(active=(2, 3, 2, 2), active_enabled=True)


@pytest.fixture
def table() -> HealthTable:
    return HealthTable(64)


def _state(table: HealthTable, slot: int) -> State:
    return table.read(slot)["state"]


def test_slots_are_stable_per_identity(table: HealthTable) -> None:
    a = table.slot_for("u", "10.0.0.1", 80)
    b = table.slot_for("u", "10.0.0.2", 80)
    assert a != b
    assert table.slot_for("u", "10.0.0.1", 80) == a
    assert table.slot_for("other", "10.0.0.1", 80) not in (a, b)
    assert identity_hash("u", "h", 1) != identity_hash("u", "h", 2)


def test_full_table_answers_minus_one_and_counts(table: HealthTable) -> None:
    small = HealthTable(2)
    assert small.slot_for("u", "a", 1) >= 0 and small.slot_for("u", "b", 1) >= 0
    assert small.slot_for("u", "c", 1) == -1
    assert small.full_errors == 1


def test_failures_reach_the_threshold_then_eject(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    assert table.report_outcome(slot, HTTP_FAILURE, False, PASSIVE, now=1000) == -1
    assert table.report_outcome(slot, HTTP_FAILURE, False, PASSIVE, now=1000) == -1
    assert table.report_outcome(slot, HTTP_FAILURE, False, PASSIVE, now=1000) == Event.EJECT
    block = table.read(slot)
    assert block["state"] == State.EJECTED
    assert block["deadline_ms"] == 2000 and block["ejections"] == 1
    assert block["http_failures"] == 0  # a transition starts the counting afresh


def test_a_success_resets_failures_and_a_failure_resets_successes(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    table.report_outcome(slot, TCP_FAILURE, False, PASSIVE, now=1)
    table.report_outcome(slot, SUCCESS, False, PASSIVE, now=2)
    assert table.report_outcome(slot, TCP_FAILURE, False, PASSIVE, now=3) == -1  # count restarted at 1
    assert table.read(slot)["tcp_failures"] == 1
    assert table.report_outcome(slot, TIMEOUT, False, PASSIVE, now=4) == -1
    assert table.report_outcome(slot, TCP_FAILURE, False, PASSIVE, now=5) == Event.EJECT


def test_counters_of_different_kinds_are_separate(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    for outcome in (HTTP_FAILURE, HTTP_FAILURE, TCP_FAILURE, TIMEOUT):
        assert table.report_outcome(slot, outcome, False, PASSIVE, now=1) == -1
    assert _state(table, slot) == State.HEALTHY


def test_zero_threshold_disables_a_counter(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    policy = HealthPolicy(passive=(0, 0, 1, 0), base_ejection_ms=1000)
    for _ in range(10):
        assert table.report_outcome(slot, HTTP_FAILURE, False, policy, now=1) == -1
    assert table.report_outcome(slot, TCP_FAILURE, False, policy, now=1) == Event.EJECT


def test_kong_mode_passive_failures_make_it_unhealthy_for_good(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    for _ in range(2):
        table.report_outcome(slot, TCP_FAILURE, False, KONG_PASSIVE, now=1)
    assert _state(table, slot) == State.UNHEALTHY and table.read(slot)["deadline_ms"] == 0
    # Kong: passive successes (threshold 0) never bring it back; no trial either.
    for _ in range(5):
        table.report_outcome(slot, SUCCESS, False, KONG_PASSIVE, now=10**9)
    assert not table.transition(slot, Event.TRIAL_DUE, KONG_PASSIVE, now=10**9)
    assert _state(table, slot) == State.UNHEALTHY
    assert table.transition(slot, Event.MANUAL_HEALTHY, KONG_PASSIVE)
    assert _state(table, slot) == State.HEALTHY


def test_trial_waits_for_the_deadline_and_success_restores(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    table.transition(slot, Event.EJECT, PASSIVE, now=5000)
    assert not table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=5999)
    assert table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=6000)
    assert not table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=6000)  # one trial at a time
    assert table.report_outcome(slot, SUCCESS, False, PASSIVE, now=6100) == Event.TRIAL_SUCCEEDED
    assert _state(table, slot) == State.HEALTHY


def test_failed_trials_eject_for_longer_up_to_the_cap(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    now = 10_000
    table.transition(slot, Event.EJECT, PASSIVE, now=now)
    holds = []
    for _ in range(5):
        deadline = table.deadline(slot)
        holds.append(deadline - now)
        now = deadline
        assert table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=now)
        assert table.report_outcome(slot, TIMEOUT, False, PASSIVE, now=now) == Event.TRIAL_FAILED
    assert holds == [1000, 2000, 3000, 4000, 4000]


def test_a_trial_that_never_reports_can_be_retaken(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    table.transition(slot, Event.EJECT, PASSIVE, now=0)
    assert table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=1000)
    trial_deadline = table.deadline(slot)
    assert trial_deadline == 2000
    assert not table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=1999)
    assert table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=2000)


def test_ejection_multiplier_decays_after_a_healthy_spell(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    table.transition(slot, Event.EJECT, PASSIVE, now=0)
    table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=1000)
    table.report_outcome(slot, SUCCESS, False, PASSIVE, now=1000)
    table.transition(slot, Event.EJECT, PASSIVE, now=2000)  # soon after: second in a row
    assert table.read(slot)["ejections"] == 2
    table.transition(slot, Event.MANUAL_HEALTHY, PASSIVE, now=3000)
    table.transition(slot, Event.EJECT, PASSIVE, now=3000 + 4001)  # healthy longer than the max hold
    assert table.read(slot)["ejections"] == 1


def test_active_counts_use_active_thresholds_and_bring_back(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    for _ in range(3):
        table.report_outcome(slot, HTTP_FAILURE, True, ACTIVE)
    assert _state(table, slot) == State.UNHEALTHY  # active failures never mean "ejected"
    assert table.report_outcome(slot, HTTP_FAILURE, True, ACTIVE) == -1  # matches the settled state: ignored
    assert table.report_outcome(slot, SUCCESS, True, ACTIVE) == -1
    assert table.report_outcome(slot, SUCCESS, True, ACTIVE) == Event.SUCCESSES_REACHED
    assert _state(table, slot) == State.HEALTHY


def test_active_successes_bring_back_an_ejected_target(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    table.transition(slot, Event.EJECT, PASSIVE, now=now_ms())
    table.report_outcome(slot, SUCCESS, True, ACTIVE)
    assert table.report_outcome(slot, SUCCESS, True, ACTIVE) == Event.SUCCESSES_REACHED
    assert _state(table, slot) == State.HEALTHY


def test_successes_while_healthy_are_not_counted(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    for _ in range(5):
        table.report_outcome(slot, SUCCESS, True, ACTIVE)
    assert table.read(slot)["successes"] == 0


def test_every_transition_bumps_the_change_counter(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    before = table.changes
    table.transition(slot, Event.EJECT, PASSIVE)
    table.transition(slot, Event.EJECT, PASSIVE)  # ignored: already ejected
    table.transition(slot, Event.MANUAL_HEALTHY, PASSIVE)
    assert table.changes == before + 2


def _fork(body) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def test_racing_processes_make_exactly_one_transition(table: HealthTable) -> None:
    # 4 processes report failures on the same target as fast as they can: one ejection, one winner.
    slot = table.slot_for("u", "a", 80)
    read_fd, write_fd = os.pipe()

    def reporter() -> None:
        won = sum(1 for _ in range(2000) if table.report_outcome(slot, TCP_FAILURE, False, PASSIVE) >= 0)
        os.write(write_fd, bytes([won]))

    pids = [_fork(reporter) for _ in range(4)]
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    os.close(write_fd)
    wins = os.read(read_fd, 16)
    os.close(read_fd)
    assert sum(wins) == 1
    block = table.read(slot)
    assert block["state"] == State.EJECTED and block["transitions"] == 1


def test_racing_trials_have_one_winner(table: HealthTable) -> None:
    slot = table.slot_for("u", "a", 80)
    table.transition(slot, Event.EJECT, PASSIVE, now=0)
    read_fd, write_fd = os.pipe()
    start_at = time.monotonic() + 0.2

    def taker() -> None:
        while time.monotonic() < start_at:
            pass
        os.write(write_fd, b"1" if table.transition(slot, Event.TRIAL_DUE, PASSIVE, now=1000) else b"0")

    pids = [_fork(taker) for _ in range(4)]
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    os.close(write_fd)
    assert sorted(os.read(read_fd, 16)) == sorted(b"1000")
    os.close(read_fd)


def test_writers_killed_at_random_leave_a_usable_table(table: HealthTable) -> None:
    # No lock exists to be left held: after SIGKILLs at arbitrary points, every state is valid
    # and transitions still work.
    slots = [table.slot_for("u", f"h{i}", 80) for i in range(4)]

    def churn() -> None:
        i = 0
        while True:
            slot = slots[i % 4]
            table.report_outcome(slot, (TCP_FAILURE, SUCCESS, TIMEOUT, HTTP_FAILURE)[i % 4], False, PASSIVE)
            table.transition(slot, Event.TRIAL_DUE, PASSIVE)
            table.report_outcome(slot, SUCCESS, False, PASSIVE)
            i += 1

    deadline = time.monotonic() + 3.0
    kills = 0
    while kills < 25 and time.monotonic() < deadline:
        pid = _fork(churn)
        time.sleep(0.01 + (kills % 5) * 0.005)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
    assert kills >= 10
    for slot in slots:
        block = table.read(slot)
        assert block["state"] in set(State)
        assert table.transition(slot, Event.MANUAL_UNHEALTHY, PASSIVE)
        assert table.transition(slot, Event.MANUAL_HEALTHY, PASSIVE)
        assert table.read(slot)["state"] == State.HEALTHY
