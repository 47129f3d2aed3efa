"""The target health state machine as a table, and the balancer view computed from it."""
from __future__ import annotations

import itertools

import pytest

from shared_state.health_rules import (
    KONG_NAMES,
    OUT_OF_BALANCER,
    TRANSITIONS,
    Event,
    State,
    balancer_view,
    ejection_hold_ms,
    next_state,
)

H, U, E, T = State.HEALTHY, State.UNHEALTHY, State.EJECTED, State.TRIAL

# Every (state, event) pair with its expected outcome; None = the event is ignored in that state.
EXPECTED = {
    (H, Event.SUCCESSES_REACHED): None,
    (H, Event.FAILURES_REACHED): U,
    (H, Event.EJECT): E,
    (H, Event.TRIAL_DUE): None,
    (H, Event.TRIAL_SUCCEEDED): None,
    (H, Event.TRIAL_FAILED): None,
    (H, Event.MANUAL_HEALTHY): H,
    (H, Event.MANUAL_UNHEALTHY): U,
    (U, Event.SUCCESSES_REACHED): H,
    (U, Event.FAILURES_REACHED): None,
    (U, Event.EJECT): None,
    (U, Event.TRIAL_DUE): None,
    (U, Event.TRIAL_SUCCEEDED): None,
    (U, Event.TRIAL_FAILED): None,
    (U, Event.MANUAL_HEALTHY): H,
    (U, Event.MANUAL_UNHEALTHY): U,
    (E, Event.SUCCESSES_REACHED): H,
    (E, Event.FAILURES_REACHED): U,
    (E, Event.EJECT): None,
    (E, Event.TRIAL_DUE): T,
    (E, Event.TRIAL_SUCCEEDED): None,
    (E, Event.TRIAL_FAILED): None,
    (E, Event.MANUAL_HEALTHY): H,
    (E, Event.MANUAL_UNHEALTHY): U,
    (T, Event.SUCCESSES_REACHED): H,
    (T, Event.FAILURES_REACHED): U,
    (T, Event.EJECT): None,
    (T, Event.TRIAL_DUE): T,
    (T, Event.TRIAL_SUCCEEDED): H,
    (T, Event.TRIAL_FAILED): E,
    (T, Event.MANUAL_HEALTHY): H,
    (T, Event.MANUAL_UNHEALTHY): U,
}


def test_expected_table_covers_every_pair() -> None:
    assert set(EXPECTED) == set(itertools.product(State, Event))


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED))
def test_transition(state: State, event: Event) -> None:
    assert next_state(state, event) == EXPECTED[(state, event)]


def test_table_lists_only_real_states_and_events() -> None:
    for state, row in TRANSITIONS.items():
        assert isinstance(state, State)
        for event, target in row.items():
            assert isinstance(event, Event) and isinstance(target, State)


def test_only_healthy_targets_are_in_the_balancer_and_kong_sees_ejected_as_unhealthy() -> None:
    assert OUT_OF_BALANCER == {U, E, T}
    assert KONG_NAMES[H] == "HEALTHY"
    assert {KONG_NAMES[s] for s in (U, E, T)} == {"UNHEALTHY"}


def test_every_state_can_get_back_to_healthy() -> None:
    # A target never gets stuck: from each state some event leads (eventually) to HEALTHY.
    for start in State:
        seen, frontier = {start}, [start]
        while frontier:
            state = frontier.pop()
            for target in TRANSITIONS[state].values():
                if target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert H in seen, start


@pytest.mark.parametrize(("ejections", "expected"), [(0, 1000), (1, 1000), (2, 2000), (3, 3000), (10, 5000)])
def test_ejection_hold_grows_and_is_capped(ejections: int, expected: int) -> None:
    assert ejection_hold_ms(ejections, 1000, 5000) == expected


def _view(states: list[State], weights: list[int] | None = None, ejected_at: list[int] | None = None,
          cap: float = 100.0, panic: float = 0.0, threshold: float = 0.0) -> tuple[list[bool], str]:
    weights = weights or [100] * len(states)
    ejected_at = ejected_at or list(range(len(states)))
    return balancer_view([int(s) for s in states], weights, ejected_at, max_ejection_percent=cap,
                         panic_threshold=panic, threshold=threshold)


def test_view_follows_states() -> None:
    assert _view([H, U, E, T]) == ([True, False, False, False], "normal")


def test_view_weight_zero_never_available() -> None:
    assert _view([H, H], weights=[0, 10]) == ([False, True], "normal")


def test_view_all_down_is_unhealthy_with_kong_threshold_zero() -> None:
    assert _view([E, U]) == ([False, False], "unhealthy")


def test_view_ejection_cap_keeps_the_latest_ejections_in_service() -> None:
    # 4 targets, at most 50% ejected: the two earliest ejections hold, the third is ignored.
    flags, mode = _view([E, E, H, E], ejected_at=[30, 10, 0, 20], cap=50)
    assert flags == [True, False, True, False] and mode == "normal"


def test_view_ejection_cap_does_not_apply_to_active_unhealthy() -> None:
    flags, _ = _view([U, U, H, H], cap=25)
    assert flags == [False, False, True, True]


def test_view_panic_spreads_over_every_target() -> None:
    flags, mode = _view([H, E, E, E], panic=50)
    assert flags == [True, True, True, True] and mode == "panic"
    flags, mode = _view([H, H, E, E], panic=50)
    assert flags == [True, True, False, False] and mode == "normal"


def test_view_kong_threshold_makes_the_upstream_unhealthy() -> None:
    # Kong: healthy while available weight is above `threshold` percent of the total.
    assert _view([H, H, U, U], threshold=50) == ([False] * 4, "unhealthy")
    assert _view([H, H, H, U], threshold=50) == ([True, True, True, False], "normal")
