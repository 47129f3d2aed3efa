# Labelled counter series in shared memory: one vector of uint64 counters per key
# (a route, a route + status code, an upstream target), appended by each worker to its
# own region and merged on read. It complements arena.pxd, whose per-worker blocks
# hold only fixed node-wide counters.
#
# Layout (all words uint64, host order; an anonymous MAP_SHARED mapping made by the
# master before fork, never resized):
#   header    HEADER_WORDS: magic, layout version, slot count, series per slot,
#             retired capacity, entry words, retired seqlock, reserved
#   regions   `slots` worker regions, then one retired region (index `slots`), each
#             REGION_HEADER_WORDS followed by (NKINDS + capacity) entries:
#               region header: count (published entries, overflow entries included),
#                              overflowed (distinct keys refused), epoch (bumped by
#                              retire), reserved
#               entry:  word 0 key length in bytes, words 1..KEY_WORDS key bytes,
#                       then VALUE_WORDS counters (ENTRY_WORDS in all, a multiple of
#                       8 so an entry starts on a cache line)
#   Entries 0..NKINDS-1 of every region are the overflow series of each kind (key =
#   the kind tag alone), written at creation. A worker region holds `series_per_slot`
#   ordinary series; the retired region holds `retired_capacity`.
#
# Key encoding: one kind tag byte, then the fields joined by KEY_SEP (0x1f, ASCII unit
# separator). Kong's names (alphanumerics, ".", "-", "_", "~", UTF-8), hostnames,
# "host:port" targets, status codes and "service"/"kong" cannot contain it; the key
# builders refuse a field that does. A key longer than KEY_BYTES is counted in the
# overflow series of its kind.
#
# Write contract:
#   - a worker region is written only by the worker owning the slot (single writer).
#     Appending a series writes the key and zeroed counters, then publishes the entry by
#     a release-store of the count word; readers acquire-load the count and read only
#     entries below it, so they never see a half-written key. Counter updates are
#     relaxed atomic load + store (one writer: no read-modify-write needed), so a
#     reader never sees a torn word and a SIGKILL leaves nothing half-done.
#   - the retired region, and the region of a dead worker, are written only by the
#     master, inside the retired seqlock (odd while folding): retire() adds the dead
#     region's counters into the retired region by key, then clears the dead region.
#     Readers retry while the seqlock is odd or has moved, so a dead worker's counts are
#     seen exactly once.
#   - a process's key -> index cache is tied to the region's epoch, so a cache made
#     before a retire is never trusted after it.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    static inline uint64_t rg_series_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void rg_series_add(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
    }
    /* Kong's prometheus plugin buckets, in ms: upstream and request latency, then Kong's own latency. */
    static const uint32_t rg_series_long_bounds_ms[13] __attribute__((unused)) = {
        25, 50, 80, 100, 250, 400, 700, 1000, 2000, 5000, 10000, 30000, 60000};
    static const uint32_t rg_series_kong_bounds_ms[17] __attribute__((unused)) = {
        1, 2, 5, 7, 10, 15, 20, 30, 50, 75, 100, 200, 500, 750, 1000, 3000, 6000};
    /* hist: n + 1 bucket words (value <= bound i, then +Inf), then the sum in microseconds. */
    static inline void rg_series_observe(uint64_t *hist, const uint32_t *bounds_ms, int n, uint64_t micros) {
        int i = 0;
        while (i < n && micros > (uint64_t)bounds_ms[i] * 1000u) i++;
        rg_series_add(&hist[i], 1);
        rg_series_add(&hist[n + 1], micros);
    }
    """
    uint64_t rg_series_load(const uint64_t *p) noexcept nogil
    void rg_series_add(uint64_t *p, uint64_t v) noexcept nogil
    const uint32_t* rg_series_long_bounds_ms
    const uint32_t* rg_series_kong_bounds_ms
    void rg_series_observe(uint64_t *hist, const uint32_t *bounds_ms, int n, uint64_t micros) noexcept nogil

# Layout constants: for Cython only.
cdef enum:
    HEADER_WORDS = 8
    REGION_HEADER_WORDS = 8
    KEY_BYTES = 120
    KEY_WORDS = 15                  # KEY_BYTES / 8
    VALUES_OFFSET = 16              # 1 length word + KEY_WORDS
    VALUE_WORDS = 57                # the widest kind (R_WORDS)
    ENTRY_WORDS = 80                # VALUES_OFFSET + VALUE_WORDS, rounded up to a cache line

# Kinds and vector fields: also exported to Python (cpdef).
cpdef enum:
    # kinds (the key's first byte is KIND_TAGS[kind])
    KIND_ROUTE = 0                  # b"r" service, route
    KIND_CODE = 1                   # b"c" service, route, status code, source ("service" | "kong")
    KIND_TARGET = 2                 # b"t" upstream, target ("host:port")
    NKINDS = 3

    # histogram shapes: LONG for request and upstream latency, KONG for the gateway's own latency
    LONG_BOUNDS = 13
    KONG_BOUNDS = 17
    LONG_HIST_WORDS = 15            # LONG_BOUNDS + 1 (+Inf) bucket words + sum_us
    KONG_HIST_WORDS = 19

    # KIND_ROUTE vector
    R_REQUESTS = 0
    R_STATUS_1XX = 1                # R_STATUS_1XX + class - 1 for classes 1..5
    R_STATUS_2XX = 2
    R_STATUS_3XX = 3
    R_STATUS_4XX = 4
    R_STATUS_5XX = 5
    R_BYTES_IN = 6                  # Kong's bandwidth "ingress"
    R_BYTES_OUT = 7                 # "egress"
    R_REQUEST_LATENCY = 8           # LONG histogram: total request time
    R_UPSTREAM_LATENCY = 23         # LONG histogram: upstream answer time
    R_KONG_LATENCY = 38             # KONG histogram: time added by the gateway
    R_WORDS = 57

    # KIND_CODE vector
    C_REQUESTS = 0
    C_WORDS = 1

    # KIND_TARGET vector
    T_REQUESTS = 0
    T_CONNECT_FAILURES = 1
    T_TIMEOUTS = 2
    T_STATUS_FAILURES = 3           # an answer whose status counts as unhealthy
    T_LATENCY_SUM_US = 4
    T_LATENCY_COUNT = 5
    T_WORDS = 6


cdef inline void series_add(uint64_t* vec, int field, uint64_t amount) noexcept nogil:
    """Add to one counter of a vector from SeriesTable.vector(); the owning worker only."""
    rg_series_add(&vec[field], amount)


cdef inline void series_observe(uint64_t* vec, int hist, uint64_t micros) noexcept nogil:
    """Record one latency in the route histogram starting at word `hist` (an R_*_LATENCY)."""
    if hist == R_KONG_LATENCY:
        rg_series_observe(&vec[hist], rg_series_kong_bounds_ms, KONG_BOUNDS, micros)
    else:
        rg_series_observe(&vec[hist], rg_series_long_bounds_ms, LONG_BOUNDS, micros)


cdef class SeriesTable:
    cdef object _mmap
    cdef unsigned char[::1] _view
    cdef uint64_t* _header
    cdef uint64_t* _regions
    cdef Py_ssize_t _region_words
    cdef readonly int slots
    cdef readonly Py_ssize_t series_per_slot
    cdef readonly Py_ssize_t retired_capacity
    cdef readonly Py_ssize_t size
    cdef list _caches               # per slot: (epoch, {key: index}), this process's writer-side cache

    cdef uint64_t* _region(self, int slot) noexcept nogil
    cdef Py_ssize_t _capacity(self, int slot)
    cdef Py_ssize_t _published(self, int slot)
    cdef void _check_worker_slot(self, int slot) except *
    cdef dict _cache(self, int slot)
    cdef uint64_t* _checked_vector(self, int slot, Py_ssize_t index, int field, int width) except NULL
    cdef uint64_t _seq_begin(self, uint64_t* seq, double deadline) except 1
    cdef dict _collect(self, object slots)
    # Counters of series `index` in `slot`, bounds-checked: cache it next to the index.
    cdef uint64_t* vector(self, int slot, Py_ssize_t index) except NULL
    # Hot path add for Cython callers: no checks (the index came from series_index).
    cdef inline void cadd(self, int slot, Py_ssize_t index, int field, uint64_t amount) noexcept nogil
