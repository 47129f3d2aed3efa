# cython: language_level=3
"""Node-wide target health: Kong's counters and our ejection state machine in shared memory.

See health.pxd for the layout and who writes what, and health_rules.py for the state
machine (the table this module compiles into a C array at import).
"""
import hashlib
import mmap

from libc.stdint cimport int8_t, uint64_t
from libc.time cimport time_t

from shared_state import health_rules

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk, timespec *ts)
    clockid_t CLOCK_MONOTONIC

cdef extern from *:
    """
    static inline uint64_t hl_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void hl_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t hl_add(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
    static inline int hl_cas(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    """
    uint64_t hl_load(uint64_t *p) noexcept nogil
    void hl_store(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t hl_add(uint64_t *p, uint64_t v) noexcept nogil
    bint hl_cas(uint64_t *p, uint64_t expected, uint64_t desired) noexcept nogil

MAGIC = 0x52474845414c5431  # "RGHEALT1"
LAYOUT_VERSION = 1
DEFAULT_CAPACITY = 4096

SUCCESS = OUTCOME_SUCCESS
HTTP_FAILURE = OUTCOME_HTTP_FAILURE
TCP_FAILURE = OUTCOME_TCP_FAILURE
TIMEOUT = OUTCOME_TIMEOUT

cdef int N_STATES = 4
cdef int N_EVENTS = 8
# next_state[state][event], -1 where the event does not apply: compiled from health_rules.TRANSITIONS.
cdef int8_t _next[4][8]


def _compile_table() -> None:
    cdef int s, e
    for s in range(N_STATES):
        for e in range(N_EVENTS):
            nxt = health_rules.next_state(s, e)
            _next[s][e] = -1 if nxt is None else <int>nxt


_compile_table()

cdef int EV_SUCCESSES_REACHED = health_rules.Event.SUCCESSES_REACHED
cdef int EV_FAILURES_REACHED = health_rules.Event.FAILURES_REACHED
cdef int EV_EJECT = health_rules.Event.EJECT
cdef int EV_TRIAL_DUE = health_rules.Event.TRIAL_DUE
cdef int EV_TRIAL_SUCCEEDED = health_rules.Event.TRIAL_SUCCEEDED
cdef int EV_TRIAL_FAILED = health_rules.Event.TRIAL_FAILED

cdef uint64_t STATE_MASK = 0xF
cdef uint64_t VERSION_MASK = 0xFFF
cdef int DEADLINE_SHIFT = 16


cdef uint64_t monotonic_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


def now_ms() -> int:
    """The clock every process of the node uses for health deadlines (CLOCK_MONOTONIC, ms)."""
    return monotonic_ms()


def identity_hash(upstream: str, host: str, port: int) -> int:
    """64-bit identity of a target; never 0 (0 marks a free slot)."""
    digest = hashlib.blake2b(f"{upstream}\0{host}\0{port}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


cdef inline int _state(uint64_t word) noexcept nogil:
    return <int>(word & STATE_MASK)


cdef inline uint64_t _deadline(uint64_t word) noexcept nogil:
    return word >> DEADLINE_SHIFT


cdef inline uint64_t _hold(uint64_t ejections, HealthPolicy policy) noexcept:
    cdef uint64_t hold = policy.base_ejection_ms * ejections
    if policy.max_ejection_ms and hold > policy.max_ejection_ms:
        hold = policy.max_ejection_ms
    return hold


cdef class HealthPolicy:
    """An upstream's health thresholds, built once per config generation (Kong's healthchecks)."""

    def __init__(self, active: tuple = (0, 0, 0, 0), passive: tuple = (0, 0, 0, 0),
                 base_ejection_ms: int = 0, max_ejection_ms: int = 0, active_enabled: bool = False) -> None:
        """active / passive: (successes, http_failures, tcp_failures, timeouts) thresholds, 0 = off."""
        cdef int i
        for i in range(4):
            self.thresholds[1][i] = active[i]
            self.thresholds[0][i] = passive[i]
        self.base_ejection_ms = base_ejection_ms
        self.max_ejection_ms = max_ejection_ms
        self.passive = any(passive[1:])
        self.active = active_enabled

    def threshold(self, bint active, int outcome) -> int:
        return self.thresholds[1 if active else 0][outcome]

    def __repr__(self) -> str:
        return (f"<HealthPolicy active={[self.thresholds[1][i] for i in range(4)]} "
                f"passive={[self.thresholds[0][i] for i in range(4)]} ejection={self.base_ejection_ms}"
                f"..{self.max_ejection_ms}ms>")


def policy_for(checks: object) -> HealthPolicy | None:
    """Kong's thresholds for an upstream's `healthchecks`, or None when it gets no checker.

    Kong creates a checker only if an active interval or a passive unhealthy counter is non-zero.
    """
    active, passive, outlier = checks.active, checks.passive, checks.outlier
    active_on = bool(active.healthy.interval or active.unhealthy.interval)
    passive_counters = (passive.unhealthy.http_failures, passive.unhealthy.tcp_failures, passive.unhealthy.timeouts)
    if not active_on and not any(passive_counters):
        return None
    return HealthPolicy(
        active=(active.healthy.successes, active.unhealthy.http_failures, active.unhealthy.tcp_failures,
                active.unhealthy.timeouts),
        passive=(passive.healthy.successes, *passive_counters),
        base_ejection_ms=int(outlier.base_ejection_time * 1000),
        max_ejection_ms=int(outlier.max_ejection_time * 1000),
        active_enabled=active_on,
    )


cdef class HealthTable:
    """Fixed-size anonymous shared mapping; create it before fork, never resize it."""

    def __init__(self, int capacity=DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("the health table needs room for at least one target")
        self.capacity = capacity
        self.size = (HEADER_WORDS + <Py_ssize_t>capacity * BLOCK_WORDS) * 8
        self._mmap = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED)
        self._view = self._mmap
        self._header = <uint64_t*>&self._view[0]
        self._blocks = self._header + HEADER_WORDS
        hl_store(&self._header[H_VERSION], LAYOUT_VERSION)
        hl_store(&self._header[H_CAPACITY], <uint64_t>capacity)
        hl_store(&self._header[H_MAGIC], MAGIC)

    cdef uint64_t* block(self, int slot) noexcept nogil:
        return self._blocks + <Py_ssize_t>slot * BLOCK_WORDS

    cdef uint64_t change_count(self) noexcept nogil:
        return hl_load(&self._header[H_CHANGES])

    @property
    def changes(self) -> int:
        return self.change_count()

    @property
    def full_errors(self) -> int:
        return hl_load(&self._header[H_FULL_ERRORS])

    def slot_for(self, upstream: str, host: str, port: int) -> int:
        """The block of this target identity, claimed on first use; -1 when the table is full."""
        cdef uint64_t key = identity_hash(upstream, host, port)
        cdef int start = <int>(key % <uint64_t>self.capacity)
        cdef int i, slot
        cdef uint64_t* words
        cdef uint64_t seen
        for i in range(self.capacity):
            slot = (start + i) % self.capacity
            words = self.block(slot)
            seen = hl_load(&words[W_KEY])
            if seen == key:
                return slot
            if seen == 0:
                if hl_cas(&words[W_KEY], 0, key):
                    return slot
                if hl_load(&words[W_KEY]) == key:  # another process claimed it for the same target
                    return slot
        hl_add(&self._header[H_FULL_ERRORS], 1)
        return -1

    cdef int state_of(self, int slot) noexcept nogil:
        return _state(hl_load(&self.block(slot)[W_STATE]))

    def state(self, int slot) -> int:
        self._check(slot)
        return self.state_of(slot)

    def deadline(self, int slot) -> int:
        """Monotonic ms at which an EJECTED target may be tried (or a TRIAL expires); 0 otherwise."""
        self._check(slot)
        return _deadline(hl_load(&self.block(slot)[W_STATE]))

    def read(self, int slot) -> dict:
        self._check(slot)
        cdef uint64_t* words = self.block(slot)
        cdef uint64_t word = hl_load(&words[W_STATE])
        return {
            "state": health_rules.State(_state(word)),
            "version": (word >> 4) & VERSION_MASK,
            "deadline_ms": _deadline(word),
            "successes": hl_load(&words[W_SUCCESSES]),
            "http_failures": hl_load(&words[W_HTTP_FAILURES]),
            "tcp_failures": hl_load(&words[W_TCP_FAILURES]),
            "timeouts": hl_load(&words[W_TIMEOUTS]),
            "ejections": hl_load(&words[W_EJECTIONS]),
            "changed_at_ms": hl_load(&words[W_CHANGED_AT]),
            "transitions": hl_load(&words[W_FLIPS]),
        }

    cdef int report(self, int slot, int outcome, bint active, HealthPolicy policy, uint64_t now) except -2:
        """Count one check result with Kong's rules; returns the event this report raised and won, or -1."""
        cdef uint64_t* words = self.block(slot)
        cdef int state = _state(hl_load(&words[W_STATE]))
        cdef uint64_t threshold, count
        if state == S_TRIAL and not active:
            # The one request let through decides (others were kept off by the balancer).
            return self.apply(slot, EV_TRIAL_SUCCEEDED if outcome == OUTCOME_SUCCESS else EV_TRIAL_FAILED,
                              policy, now)
        if outcome == OUTCOME_SUCCESS:
            # A success resets the failure counters (loads first: the common case writes nothing).
            if hl_load(&words[W_HTTP_FAILURES]) or hl_load(&words[W_TCP_FAILURES]) or hl_load(&words[W_TIMEOUTS]):
                hl_store(&words[W_HTTP_FAILURES], 0)
                hl_store(&words[W_TCP_FAILURES], 0)
                hl_store(&words[W_TIMEOUTS], 0)
            threshold = policy.thresholds[active][OUTCOME_SUCCESS]
            if state == S_HEALTHY or threshold == 0:
                return -1
            count = hl_add(&words[W_SUCCESSES], 1)
            if count >= threshold:
                return self.apply(slot, EV_SUCCESSES_REACHED, policy, now)
            return -1
        if hl_load(&words[W_SUCCESSES]):
            hl_store(&words[W_SUCCESSES], 0)
        threshold = policy.thresholds[active][outcome]
        if state != S_HEALTHY or threshold == 0:
            return -1
        count = hl_add(&words[W_SUCCESSES + outcome], 1)
        if count < threshold:
            return -1
        if active or policy.base_ejection_ms == 0:
            return self.apply(slot, EV_FAILURES_REACHED, policy, now)
        return self.apply(slot, EV_EJECT, policy, now)

    cdef int apply(self, int slot, int event, HealthPolicy policy, uint64_t now) except -2:
        """Make one transition by compare-and-swap; returns `event` if this process won it, else -1."""
        cdef uint64_t* words = self.block(slot)
        cdef uint64_t old, new, deadline, ejections
        cdef int state, nxt
        while True:
            old = hl_load(&words[W_STATE])
            state = _state(old)
            nxt = _next[state][event]
            if nxt < 0:
                return -1
            if event == EV_TRIAL_DUE and now < _deadline(old):
                return -1  # checked inside the loop: of two racing workers, only one takes the trial
            deadline = 0
            ejections = hl_load(&words[W_EJECTIONS])
            if event == EV_EJECT or event == EV_TRIAL_FAILED:
                if (event == EV_EJECT and policy.max_ejection_ms
                        and now - hl_load(&words[W_CHANGED_AT]) > policy.max_ejection_ms):
                    ejections = 0  # healthy long enough: the multiplier starts again (Envoy decays it)
                ejections += 1
                deadline = now + _hold(ejections, policy)
            elif event == EV_TRIAL_DUE:
                # The trial must report before this, or another worker takes a new one.
                deadline = now + (policy.base_ejection_ms if policy.base_ejection_ms else 10000)
            new = <uint64_t>nxt | ((((old >> 4) + 1) & VERSION_MASK) << 4) | (deadline << DEADLINE_SHIFT)
            if hl_cas(&words[W_STATE], old, new):
                break
        # Won: this process alone records the transition.
        if event == EV_EJECT or event == EV_TRIAL_FAILED:
            hl_store(&words[W_EJECTIONS], ejections)
        if event != EV_TRIAL_DUE:
            hl_store(&words[W_SUCCESSES], 0)
            hl_store(&words[W_HTTP_FAILURES], 0)
            hl_store(&words[W_TCP_FAILURES], 0)
            hl_store(&words[W_TIMEOUTS], 0)
            hl_store(&words[W_CHANGED_AT], now)
        hl_add(&words[W_FLIPS], 1)
        hl_add(&self._header[H_CHANGES], 1)
        return event

    # Python entry points (control process, tests); workers call the cdef methods.

    def report_outcome(self, int slot, int outcome, bint active, HealthPolicy policy, now: int | None = None) -> int:
        self._check(slot)
        if not 0 <= outcome <= 3:
            raise ValueError(f"unknown outcome {outcome}")
        return self.report(slot, outcome, active, policy, monotonic_ms() if now is None else now)

    def transition(self, int slot, int event, HealthPolicy policy, now: int | None = None) -> bool:
        self._check(slot)
        if not 0 <= event < N_EVENTS:
            raise ValueError(f"unknown event {event}")
        return self.apply(slot, event, policy, monotonic_ms() if now is None else now) >= 0

    def _check(self, int slot) -> None:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"health slot {slot} out of range 0..{self.capacity - 1}")

    def __repr__(self) -> str:
        return f"<HealthTable capacity={self.capacity} changes={self.changes}>"
