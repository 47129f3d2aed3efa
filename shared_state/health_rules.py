"""Target health as a state machine written as a table (h11's style), shared by all processes.

States
------
HEALTHY     takes traffic. Failures are counted; reaching a failure threshold moves it away.
UNHEALTHY   Kong's "unhealthy": set by active probes, by the Admin API, or by passive checks
            when automatic recovery is switched off. Only successes (active probes) or the
            Admin API bring it back. Failures are not counted here (Kong: reports that match
            the settled state are ignored).
EJECTED     our passive ejection (Envoy's outlier detection): out of the balancer until its
            deadline, then exactly one request is let through as a trial.
TRIAL       one worker won the trial (a compare-and-swap on the state word) and sends one
            request. Its outcome decides: back to HEALTHY, or EJECTED again for longer. If the
            trial never reports (the worker died), the deadline passes and another worker may
            take a new trial.

Invariants
----------
1. The state, a small version number and the state's deadline share ONE 64-bit word, changed
   only by compare-and-swap: a transition is atomic, and when several workers race to make
   the same transition exactly one wins (and it alone logs and counts the event).
2. Every transition resets the four counters (Kong: a state change starts counting afresh).
3. A (state, event) pair missing from TRANSITIONS is ignored: e.g. EJECT on a target that is
   already EJECTED, or a passive failure threshold reached on an UNHEALTHY target.
4. The table has no I/O and no clock: callers pass `now` and the hold time, so it is tested
   directly (tests/unit/test_health_rules.py) and shared by the Cython arena code.

Counting (Kong's rules, applied by shared_state.health before an event is raised):
a success resets the three failure counters, a failure resets the success counter; successes
are not counted while HEALTHY, failures not while the target is out of the balancer.
"""
from __future__ import annotations

from enum import IntEnum


class State(IntEnum):
    HEALTHY = 0
    UNHEALTHY = 1
    EJECTED = 2
    TRIAL = 3


class Event(IntEnum):
    SUCCESSES_REACHED = 0    # the healthy.successes threshold was reached (active or passive)
    FAILURES_REACHED = 1     # a failure threshold was reached by active checks (or passive, recovery off)
    EJECT = 2                # a passive failure threshold was reached, automatic recovery on
    TRIAL_DUE = 3            # the ejection (or a stuck trial) deadline passed; one request may try it
    TRIAL_SUCCEEDED = 4
    TRIAL_FAILED = 5
    MANUAL_HEALTHY = 6       # PUT /upstreams/{u}/targets/{t}/healthy
    MANUAL_UNHEALTHY = 7     # PUT /upstreams/{u}/targets/{t}/unhealthy


H, U, E, T = State.HEALTHY, State.UNHEALTHY, State.EJECTED, State.TRIAL

TRANSITIONS: dict[State, dict[Event, State]] = {
    H: {
        Event.FAILURES_REACHED: U,
        Event.EJECT: E,
        Event.MANUAL_UNHEALTHY: U,
        Event.MANUAL_HEALTHY: H,       # resets the counters, as Kong's manual set does
    },
    U: {
        Event.SUCCESSES_REACHED: H,
        Event.MANUAL_HEALTHY: H,
        Event.MANUAL_UNHEALTHY: U,
    },
    E: {
        Event.SUCCESSES_REACHED: H,    # active probes bring an ejected target back at once
        Event.FAILURES_REACHED: U,     # active probes confirm it is down: it waits for them now
        Event.TRIAL_DUE: T,
        Event.MANUAL_HEALTHY: H,
        Event.MANUAL_UNHEALTHY: U,
    },
    T: {
        Event.TRIAL_SUCCEEDED: H,
        Event.TRIAL_FAILED: E,
        Event.TRIAL_DUE: T,            # the trial never reported: a new one, new deadline
        Event.SUCCESSES_REACHED: H,
        Event.FAILURES_REACHED: U,
        Event.MANUAL_HEALTHY: H,
        Event.MANUAL_UNHEALTHY: U,
    },
}

# States in which the balancer does not pick the target (a TRIAL target gets its one request
# from the worker that won the trial, outside the balancer).
OUT_OF_BALANCER = frozenset((U, E, T))

# Kong's names for the Admin API (GET /upstreams/{u}/health): ejected targets are unhealthy.
KONG_NAMES: dict[State, str] = {H: "HEALTHY", U: "UNHEALTHY", E: "UNHEALTHY", T: "UNHEALTHY"}


def next_state(state: int, event: int) -> State | None:
    """The state after `event`, or None when the event does not apply in `state`."""
    return TRANSITIONS[State(state)].get(Event(event))


def ejection_hold_ms(ejections: int, base_ms: int, max_ms: int) -> int:
    """Envoy's rule: the n-th ejection in a row lasts base x n, capped."""
    return min(base_ms * max(ejections, 1), max_ms) if max_ms else base_ms * max(ejections, 1)


def balancer_view(states: list[int], weights: list[int], ejected_at: list[int], *, max_ejection_percent: float,
                  panic_threshold: float, threshold: float) -> tuple[list[bool], str]:
    """Which targets the balancer may pick, from the shared states; decided the same way by every worker.

    - a weight-0 target never takes traffic;
    - ejection cap: at most max_ejection_percent of the targets stay out for passive ejection;
      the earliest ejections count first, later ones are ignored (their targets keep traffic);
    - panic (ours, Envoy's): below panic_threshold percent of healthy weight, every target takes
      traffic again, so the last healthy ones are not crushed;
    - Kong's `threshold`: the upstream is healthy only while its available weight is above this
      percentage of the total; otherwise nothing is available and requests get 503.
    Returns (available flags, mode) with mode "normal", "panic" or "unhealthy".
    """
    count = len(states)
    available = [states[i] == State.HEALTHY and weights[i] > 0 for i in range(count)]
    ejected = sorted((i for i in range(count) if weights[i] > 0 and states[i] in (State.EJECTED, State.TRIAL)),
                     key=lambda i: (ejected_at[i], i))
    in_service = sum(1 for w in weights if w > 0)
    cap = int(in_service * max_ejection_percent / 100.0)
    for i in ejected[cap:]:
        available[i] = True
    total = sum(w for w in weights if w > 0)
    if total == 0:
        return available, "normal"
    healthy_weight = sum(weights[i] for i in range(count) if available[i])
    if panic_threshold and healthy_weight * 100.0 < panic_threshold * total:
        return [w > 0 for w in weights], "panic"
    if healthy_weight * 100.0 <= threshold * total:
        return [False] * count, "unhealthy"
    return available, "normal"
