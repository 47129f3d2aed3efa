# Per-target health blocks in shared memory: one table per node, mapped by the master
# before it forks; every worker and the control process read and write it.
#
# Layout (uint64 words, host order):
#   header   HEADER_WORDS: magic, layout version, capacity, change counter, full errors
#   blocks   capacity x BLOCK_WORDS (128 bytes, two cache lines), one per target identity
#
#   block word   meaning                                  written by
#   W_KEY        identity hash (0 = free)                 CAS 0 -> hash, once; never freed
#   W_STATE      state | version << 4 | deadline_ms << 16 CAS only (health_rules.TRANSITIONS)
#   W_SUCCESSES, W_HTTP_FAILURES, W_TCP_FAILURES, W_TIMEOUTS
#                Kong's four counters                     atomic add / store 0 (any process)
#   W_EJECTIONS  consecutive ejections (Envoy multiplier) the transition winner
#   W_CHANGED_AT monotonic ms of the last transition      the transition winner
#   W_FLIPS      transitions so far                       the transition winner (atomic add)
#
# Contract:
#   - the state, its version and its deadline change together in one compare-and-swap, so
#     exactly one process wins each transition, and a reader sees a consistent triple;
#   - counters are hints, not truth: a racing reset may lose a count, which delays a
#     threshold by one report at most, as in Kong's shm counters;
#   - nothing is locked, so a process killed at any instruction leaves a valid table;
#   - the change counter grows on every transition: a worker compares it with the value it
#     last synced its balancers at, one atomic load per request;
#   - an identity hash is 64 bits of blake2b over "upstream\0host\0port"; slots are claimed
#     by CAS with linear probing and are never freed (capacity is a setting).
from libc.stdint cimport uint64_t

cdef enum:
    HEADER_WORDS = 8
    BLOCK_WORDS = 16
    W_KEY = 0
    W_STATE = 1
    W_SUCCESSES = 2
    W_HTTP_FAILURES = 3
    W_TCP_FAILURES = 4
    W_TIMEOUTS = 5
    W_EJECTIONS = 6
    W_CHANGED_AT = 7
    W_FLIPS = 8
    H_MAGIC = 0
    H_VERSION = 1
    H_CAPACITY = 2
    H_CHANGES = 3
    H_FULL_ERRORS = 4

cdef enum:
    OUTCOME_SUCCESS = 0
    OUTCOME_HTTP_FAILURE = 1
    OUTCOME_TCP_FAILURE = 2
    OUTCOME_TIMEOUT = 3

cdef enum:
    S_HEALTHY = 0
    S_UNHEALTHY = 1
    S_EJECTED = 2
    S_TRIAL = 3

cdef uint64_t monotonic_ms() noexcept nogil

cdef class HealthPolicy:
    # Thresholds index: [active?][outcome]; 0 disables a counter (Kong).
    cdef uint64_t thresholds[2][4]
    cdef readonly uint64_t base_ejection_ms     # 0: passive failures make a target UNHEALTHY (Kong)
    cdef readonly uint64_t max_ejection_ms
    cdef readonly bint passive                  # any passive unhealthy counter set
    cdef readonly bint active                   # any active interval set

cdef class HealthTable:
    cdef object _mmap
    cdef unsigned char[::1] _view
    cdef uint64_t* _header
    cdef uint64_t* _blocks
    cdef readonly int capacity
    cdef readonly Py_ssize_t size

    cdef uint64_t* block(self, int slot) noexcept nogil
    cdef uint64_t change_count(self) noexcept nogil
    cdef int state_of(self, int slot) noexcept nogil
    cdef int report(self, int slot, int outcome, bint active, HealthPolicy policy, uint64_t now) except -2
    cdef int apply(self, int slot, int event, HealthPolicy policy, uint64_t now) except -2
