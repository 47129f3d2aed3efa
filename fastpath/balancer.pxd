# One upstream's targets compiled for picking, per worker process (Kong keeps balancer
# state per worker too).
#
# Contract:
#   - built once from an immutable target list (one config generation); afterwards only
#     the health flags, in-flight counts and latency samples change;
#   - every per-target array has n_targets entries, indexed like `targets`;
#   - round-robin uses the wheel, consistent-hashing the continuum (points sorted by
#     slot, plus a slot -> point map), least-connections `conns`, latency the EWMA arrays;
#     the arrays an algorithm does not use stay NULL;
#   - weight 0 targets are never picked; `available_weight` is the weight of the
#     targets whose flag is set;
#   - not thread-safe: one instance belongs to one worker's event loop.
cimport cython
from libc.stdint cimport int32_t, uint32_t, uint64_t

cdef enum Algorithm:
    ALGO_ROUND_ROBIN = 0
    ALGO_CONSISTENT_HASHING = 1
    ALGO_LEAST_CONNECTIONS = 2
    ALGO_LATENCY = 3

cdef uint32_t xxh32(const unsigned char *data, Py_ssize_t length, uint32_t seed) noexcept nogil

@cython.final
cdef class Balancer:
    cdef readonly tuple targets                 # ((host, port, weight), ...) as given
    cdef readonly str algorithm
    cdef readonly long long total_weight
    cdef readonly long long available_weight
    cdef Algorithm algo
    cdef Py_ssize_t n_targets
    cdef uint32_t *weights
    cdef unsigned char *available
    cdef unsigned char *excluded_mark           # scratch, filled for one pick only

    # round-robin: the shuffled wheel and the index of the next entry to try
    cdef int32_t *wheel
    cdef Py_ssize_t wheel_size
    cdef Py_ssize_t wheel_pos

    # consistent-hashing: points are numbered in slot order; point p belongs to
    # target point_target[p]; slot_point[s] is the point at s or the first one
    # counter-clockwise from s
    cdef Py_ssize_t ring_size
    cdef Py_ssize_t n_points
    cdef int32_t *point_target
    cdef int32_t *slot_point

    # least-connections and latency: scans start at `cursor`, which turns by one per
    # pick, so equal scores are shared out in turn
    cdef Py_ssize_t cursor
    cdef long long *conns
    cdef double *ewma
    cdef double *touched_at
    cdef unsigned char *sampled
    cdef Py_ssize_t n_sampled
    cdef double clock                           # latest `now` passed to observe()

    cpdef int pick(self, object excluded=*, object hash_value=*) except? -1
    cpdef void set_available(self, int index, bint available) except *
    cpdef bint is_available(self, int index) except -1
    cpdef void release(self, int index) except *
    cpdef void observe(self, int index, double rtt_seconds, double now) except *

    cdef int _build_wheel(self, uint64_t seed) except -1
    cdef int _build_continuum(self, Py_ssize_t size) except -1
    cdef unsigned char *_exclusion(self, object excluded) except? NULL
    cdef int _pick_round_robin(self, const unsigned char *excl) noexcept
    cdef int _pick_hashed(self, uint32_t hash_value, const unsigned char *excl) noexcept
    cdef int _pick_least_connections(self, const unsigned char *excl) noexcept
    cdef int _pick_latency(self, const unsigned char *excl) noexcept
    cdef double _decayed_ewma(self, Py_ssize_t index) noexcept
    cdef int _check_index(self, int index) except -1
    cdef int _check_invariants(self) except -1
    cdef void _free_tables(self) noexcept
