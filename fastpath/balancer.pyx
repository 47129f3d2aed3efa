# cython: language_level=3, cdivision=True
"""Load balancing over one upstream's targets: Kong's four algorithms, per worker.

Pure decisions: the caller owns health (set_available), the in-flight bookkeeping
(release) and the clock (observe's `now`). See balancer.pxd for the table layout.
"""
import os
from collections.abc import Sequence

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.math cimport exp, floor
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

cdef extern from *:
    """
    #ifndef RINGGATE_DEBUG
    #define RINGGATE_DEBUG 0
    #endif
    #define RG_XXH_P1 2654435761U
    #define RG_XXH_P2 2246822519U
    #define RG_XXH_P3 3266489917U
    #define RG_XXH_P4 668265263U
    #define RG_XXH_P5 374761393U

    /* splitmix64: a small seeded generator for the wheel shuffle */
    static inline uint64_t rg_splitmix64(uint64_t *state) {
        uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    """
    int RINGGATE_DEBUG
    const uint32_t RG_XXH_P1
    const uint32_t RG_XXH_P2
    const uint32_t RG_XXH_P3
    const uint32_t RG_XXH_P4
    const uint32_t RG_XXH_P5
    uint64_t rg_splitmix64(uint64_t *state) noexcept nogil

ALGORITHMS = ("round-robin", "consistent-hashing", "least-connections", "latency")

# Kong's limits for target weights and upstream slots
MAX_WEIGHT = 65535
MAX_SLOTS = 65536
# consistent-hashing: Kong's points per target at equal weights and smallest continuum
cdef int POINTS_PER_TARGET = 160
cdef Py_ssize_t MIN_CONTINUUM = 1000
# latency: Kong's EWMA decay time
cdef double DECAY_SECONDS = 10.0


# ---------------------------------------------------------------- xxHash32

cdef inline uint32_t _rotl32(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef inline uint32_t _read32le(const unsigned char *p) noexcept nogil:
    # byte by byte so that it is right on any host; compilers turn this into one load
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint32_t _xxh32_round(uint32_t acc, uint32_t lane) noexcept nogil:
    acc = acc + lane * RG_XXH_P2
    return _rotl32(acc, 13) * RG_XXH_P1


cdef uint32_t xxh32(const unsigned char *data, Py_ssize_t length, uint32_t seed) noexcept nogil:
    """XXH32 as specified by Yann Collet; all arithmetic is modulo 2**32."""
    cdef const unsigned char *p = data
    cdef const unsigned char *end = data + length
    cdef const unsigned char *last_stripe
    cdef uint32_t v1, v2, v3, v4, h
    if length >= 16:
        last_stripe = end - 16
        v1 = seed + RG_XXH_P1 + RG_XXH_P2
        v2 = seed + RG_XXH_P2
        v3 = seed
        v4 = seed - RG_XXH_P1
        while p <= last_stripe:
            v1 = _xxh32_round(v1, _read32le(p))
            v2 = _xxh32_round(v2, _read32le(p + 4))
            v3 = _xxh32_round(v3, _read32le(p + 8))
            v4 = _xxh32_round(v4, _read32le(p + 12))
            p += 16
        h = _rotl32(v1, 1) + _rotl32(v2, 7) + _rotl32(v3, 12) + _rotl32(v4, 18)
    else:
        h = seed + RG_XXH_P5
    h += <uint32_t>length
    while p + 4 <= end:
        h += _read32le(p) * RG_XXH_P3
        h = _rotl32(h, 17) * RG_XXH_P4
        p += 4
    while p < end:
        h += <uint32_t>p[0] * RG_XXH_P5
        h = _rotl32(h, 11) * RG_XXH_P1
        p += 1
    h ^= h >> 15
    h *= RG_XXH_P2
    h ^= h >> 13
    h *= RG_XXH_P3
    h ^= h >> 16
    return h


def xxhash32(data, uint32_t seed=0) -> int:
    """XXH32 digest of a bytes-like object as an unsigned int (same as xxhash.xxh32_intdigest)."""
    cdef const unsigned char[::1] view
    if isinstance(data, bytes):
        return xxh32(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), seed)
    view = data
    if view.shape[0] == 0:
        return xxh32(<const unsigned char *>b"", 0, seed)
    return xxh32(&view[0], view.shape[0], seed)


cdef uint32_t _hash_of_value(object value) except? 0:
    """Hash a consistent-hashing input the way Kong hashes tostring(value)."""
    cdef const char *utf8
    cdef Py_ssize_t size
    if value is None:
        # Kong hashes "" when hash_on and hash_fallback yield nothing
        return xxh32(<const unsigned char *>b"", 0, 0)
    if isinstance(value, bytes):
        return xxh32(<const unsigned char *>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), 0)
    if not isinstance(value, str):
        value = str(value)
    # borrows the string's cached UTF-8 form: no allocation for ASCII text
    utf8 = PyUnicode_AsUTF8AndSize(value, &size)
    return xxh32(<const unsigned char *>utf8, size, 0)


# ---------------------------------------------------------------- building

def _validated_targets(targets: Sequence[tuple[str, int, int]]) -> tuple[tuple[str, int, int], ...]:
    checked: list[tuple[str, int, int]] = []
    for position, entry in enumerate(targets):
        try:
            host, port, weight = entry
        except (TypeError, ValueError):
            raise ValueError(f"target #{position} must be (host, port, weight), got {entry!r}") from None
        if not isinstance(host, str) or not host:
            raise ValueError(f"target #{position}: host must be a non-empty string, got {host!r}")
        if type(port) is not int or not 0 <= port <= 65535:
            raise ValueError(f"target #{position}: port must be an integer 0-65535, got {port!r}")
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"target #{position}: weight must be an integer 0-{MAX_WEIGHT}, got {weight!r}")
        checked.append((host, port, weight))
    return tuple(checked)


cdef inline void _check_alloc(void *pointer) except *:
    if pointer == NULL:
        raise MemoryError()


cdef inline int _gcd(int a, int b) noexcept nogil:
    cdef int t
    while b:
        t = a % b
        a = b
        b = t
    return a


cdef tuple _place_points(int32_t *owner, Py_ssize_t size, tuple targets, list weighted,
                         dict points_wanted):
    """Fill `owner` (slot -> target) the Kong way: target by target in sorted order, the
    key of try i is "host::port i"; a taken slot is skipped and one more i is tried.
    Returns (points placed, complete); incomplete when a target ran out of its `size`
    tries, which is where Kong gives up."""
    cdef Py_ssize_t s, wanted, placed, attempt, filled = 0
    cdef uint32_t slot
    cdef bytes key
    for s in range(size):
        owner[s] = -1
    for t in weighted:
        host, port, _ = targets[t]
        prefix = f"{host}::{port} ".encode()
        wanted = points_wanted[t]
        placed = 0
        attempt = 1
        while placed < wanted:
            if attempt > size:
                return filled, False
            key = prefix + str(attempt).encode()
            slot = xxh32(<const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), 0) % <uint32_t>size
            if owner[slot] < 0:
                owner[slot] = <int32_t>t
                placed += 1
                filled += 1
            attempt += 1
    return filled, True


# ---------------------------------------------------------------- the balancer

@cython.final
cdef class Balancer:
    """Picks a target index for each request; -1 means no peer is available.

    Per worker, like Kong. Round-robin walks a shuffled weighted wheel; consistent-hashing
    is Kong's Ketama continuum (xxhash32 points, counter-clockwise walk); least-connections
    takes the lowest (in-flight + 1) / weight; latency the lowest EWMA(rtt) / weight. Ties
    in the last two go to the first target at or after a cursor that turns by one per pick.
    """

    # the annotations document the Python API; the checks below do the validation
    @cython.annotation_typing(False)
    def __init__(self, targets: Sequence[tuple[str, int, int]], algorithm: str = "round-robin",
                 slots: int = 10000, seed: int | None = None) -> None:
        self._free_tables()
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown balancing algorithm {algorithm!r}, expected one of {ALGORITHMS}")
        if type(slots) is not int or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be an integer 1-{MAX_SLOTS}, got {slots!r}")
        self.targets = _validated_targets(targets)
        self.algorithm = algorithm
        self.algo = <Algorithm><int>ALGORITHMS.index(algorithm)

        cdef Py_ssize_t n = len(self.targets)
        cdef Py_ssize_t t
        self.n_targets = n
        # one spare byte so that an empty balancer still has valid pointers
        self.weights = <uint32_t *>calloc(n + 1, sizeof(uint32_t))
        _check_alloc(self.weights)
        self.available = <unsigned char *>calloc(n + 1, 1)
        _check_alloc(self.available)
        self.excluded_mark = <unsigned char *>calloc(n + 1, 1)
        _check_alloc(self.excluded_mark)
        self.total_weight = 0
        for t in range(n):
            self.weights[t] = self.targets[t][2]
            self.available[t] = 1
            self.total_weight += self.weights[t]
        self.available_weight = self.total_weight
        self.cursor = 0

        if self.algo == ALGO_ROUND_ROBIN:
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little")
            self._build_wheel(seed & 0xFFFFFFFFFFFFFFFF)
        elif self.algo == ALGO_CONSISTENT_HASHING:
            self._build_continuum(slots if slots >= MIN_CONTINUUM else MIN_CONTINUUM)
        elif self.algo == ALGO_LEAST_CONNECTIONS:
            self.conns = <long long *>calloc(n + 1, sizeof(long long))
            _check_alloc(self.conns)
        else:
            self.ewma = <double *>calloc(n + 1, sizeof(double))
            _check_alloc(self.ewma)
            self.touched_at = <double *>calloc(n + 1, sizeof(double))
            _check_alloc(self.touched_at)
            self.sampled = <unsigned char *>calloc(n + 1, 1)
            _check_alloc(self.sampled)
            self.n_sampled = 0
            self.clock = 0.0
        if RINGGATE_DEBUG:
            self._check_invariants()

    def __dealloc__(self) -> None:
        self._free_tables()

    cdef void _free_tables(self) noexcept:
        free(self.weights)
        free(self.available)
        free(self.excluded_mark)
        free(self.wheel)
        free(self.point_target)
        free(self.slot_point)
        free(self.conns)
        free(self.ewma)
        free(self.touched_at)
        free(self.sampled)
        self.weights = NULL
        self.available = NULL
        self.excluded_mark = NULL
        self.wheel = NULL
        self.point_target = NULL
        self.slot_point = NULL
        self.conns = NULL
        self.ewma = NULL
        self.touched_at = NULL
        self.sampled = NULL
        self.n_targets = 0
        self.wheel_size = 0
        self.wheel_pos = 0
        self.ring_size = 0
        self.n_points = 0
        self.available_weight = 0

    cdef int _build_wheel(self, uint64_t seed) except -1:
        """weight/gcd entries per target, Fisher-Yates shuffled (Kong's round-robin wheel)."""
        cdef Py_ssize_t t, i, j, k
        cdef int divisor = 0
        cdef int32_t swap
        cdef uint64_t state = seed
        for t in range(self.n_targets):
            divisor = _gcd(<int>self.weights[t], divisor)
        self.wheel_size = 0
        if divisor > 0:
            for t in range(self.n_targets):
                self.wheel_size += self.weights[t] // divisor
        self.wheel = <int32_t *>malloc((self.wheel_size + 1) * sizeof(int32_t))
        _check_alloc(self.wheel)
        i = 0
        for t in range(self.n_targets):
            if divisor > 0:
                for k in range(self.weights[t] // divisor):
                    self.wheel[i] = <int32_t>t
                    i += 1
        for i in range(self.wheel_size - 1, 0, -1):
            j = <Py_ssize_t>(rg_splitmix64(&state) % <uint64_t>(i + 1))
            swap = self.wheel[i]
            self.wheel[i] = self.wheel[j]
            self.wheel[j] = swap
        self.wheel_pos = 0
        return 0

    cdef int _build_continuum(self, Py_ssize_t size) except -1:
        """Kong's Ketama continuum: points per target proportional to weight, keyed by
        xxhash32("host::port i") % size, first claim wins and the loser tries the next i."""
        cdef Py_ssize_t t, s, p, wanted, filled
        cdef Py_ssize_t n_weighted = 0, requested = 0, capacity
        cdef double weight_sum = 0.0
        cdef int32_t *owner = NULL
        for t in range(self.n_targets):
            if self.weights[t] > 0:
                n_weighted += 1
                weight_sum += self.weights[t]
        # sorted by (host, port) so that collisions resolve the same way whatever order
        # the targets came in
        weighted = [index for _, _, index in sorted(
            (self.targets[index][0], self.targets[index][1], index)
            for index in range(self.n_targets) if self.weights[index] > 0)]
        points_wanted = {}
        for t in weighted:
            # same operation order as Kong, so the float rounding matches too
            wanted = <Py_ssize_t>floor(self.weights[t] / weight_sum * n_weighted * POINTS_PER_TARGET)
            points_wanted[t] = wanted if wanted > 0 else 1
            requested += points_wanted[t]
        self.ring_size = size
        self.slot_point = <int32_t *>malloc(size * sizeof(int32_t))
        _check_alloc(self.slot_point)
        owner = <int32_t *>malloc(size * sizeof(int32_t))
        _check_alloc(owner)
        try:
            filled, complete = _place_points(owner, size, self.targets, weighted, points_wanted)
            if not complete:
                # Kong gives up here (CRIT "requires more entries") and proxies nothing;
                # we scale the points down to half the ring instead, keeping proportions
                capacity = size // 2
                for t in weighted:
                    points_wanted[t] = max(1, points_wanted[t] * capacity // max(requested, capacity))
                filled, complete = _place_points(owner, size, self.targets, weighted, points_wanted)
            self.n_points = filled
            self.point_target = <int32_t *>malloc((filled + 1) * sizeof(int32_t))
            _check_alloc(self.point_target)
            p = -1
            for s in range(size):
                if owner[s] >= 0:
                    p += 1
                    self.point_target[p] = owner[s]
                # slots before the first point wrap around to the last one
                self.slot_point[s] = <int32_t>(p if p >= 0 else filled - 1)
        finally:
            free(owner)
        return 0

    # ------------------------------------------------------------ picking

    cpdef int pick(self, object excluded=None, object hash_value=None) except? -1:
        """Index of the target for this request, or -1 when no peer is available.

        excluded: indices that already failed for this request; ignored once they cover
        every available target. hash_value: the consistent-hashing input (None hashes "").
        """
        cdef const unsigned char *excl = NULL
        cdef int chosen
        if self.available_weight <= 0:
            return -1
        if excluded is not None:
            excl = self._exclusion(excluded)
        if self.algo == ALGO_ROUND_ROBIN:
            chosen = self._pick_round_robin(excl)
        elif self.algo == ALGO_CONSISTENT_HASHING:
            chosen = self._pick_hashed(_hash_of_value(hash_value), excl)
        elif self.algo == ALGO_LEAST_CONNECTIONS:
            chosen = self._pick_least_connections(excl)
        else:
            chosen = self._pick_latency(excl)
        if RINGGATE_DEBUG:
            if not (0 <= chosen < self.n_targets and self.available[chosen] and self.weights[chosen] > 0):
                raise AssertionError(f"balancer picked {chosen}, which is not an available weighted target")
            if excl != NULL and excl[chosen]:
                raise AssertionError(f"balancer picked excluded target {chosen}")
        return chosen

    cdef unsigned char *_exclusion(self, object excluded) except? NULL:
        """The mark array for `excluded`, or NULL when nothing usable remains excluded."""
        cdef Py_ssize_t t, index
        if not excluded:
            return NULL
        memset(self.excluded_mark, 0, self.n_targets)
        for item in excluded:
            index = item
            if 0 <= index < self.n_targets:
                self.excluded_mark[index] = 1
        for t in range(self.n_targets):
            if self.available[t] and self.weights[t] > 0 and not self.excluded_mark[t]:
                return self.excluded_mark
        # every available target already failed: start over, like Kong's least-connections
        return NULL

    cdef int _pick_round_robin(self, const unsigned char *excl) noexcept:
        cdef Py_ssize_t pos = self.wheel_pos
        cdef Py_ssize_t size = self.wheel_size
        cdef Py_ssize_t lap
        cdef int32_t t
        for lap in range(size):
            t = self.wheel[pos]
            pos += 1
            if pos == size:
                pos = 0
            if self.available[t] and (excl == NULL or not excl[t]):
                self.wheel_pos = pos
                return t
        return -1

    cdef int _pick_hashed(self, uint32_t hash_value, const unsigned char *excl) noexcept:
        cdef Py_ssize_t n_points = self.n_points
        cdef Py_ssize_t p, step
        cdef int32_t t
        if n_points == 0:
            return -1
        p = self.slot_point[hash_value % <uint32_t>self.ring_size]
        # counter-clockwise like Kong: towards lower slots, wrapping to the top
        for step in range(n_points):
            t = self.point_target[p]
            if self.available[t] and (excl == NULL or not excl[t]):
                return t
            p = p - 1 if p > 0 else n_points - 1
        return -1

    cdef int _pick_least_connections(self, const unsigned char *excl) noexcept:
        cdef Py_ssize_t n = self.n_targets
        cdef Py_ssize_t t = self.cursor
        cdef Py_ssize_t step
        cdef int best = -1
        for step in range(n):
            if self.weights[t] > 0 and self.available[t] and (excl == NULL or not excl[t]):
                # (c+1)/w < (cb+1)/wb without division: exact for any count and weight
                if best < 0 or ((self.conns[t] + 1) * <long long>self.weights[best]
                                < (self.conns[best] + 1) * <long long>self.weights[t]):
                    best = <int>t
            t += 1
            if t == n:
                t = 0
        self.cursor = self.cursor + 1 if self.cursor + 1 < n else 0
        if best >= 0:
            self.conns[best] += 1
        return best

    cdef double _decayed_ewma(self, Py_ssize_t index) noexcept:
        # Kong scores with the EWMA decayed towards 0 since its last sample, so a target
        # that was slow once is tried again after a while instead of being starved
        cdef double elapsed = self.clock - self.touched_at[index]
        if elapsed <= 0.0:
            return self.ewma[index]
        return self.ewma[index] * exp(-elapsed / DECAY_SECONDS)

    cdef int _pick_latency(self, const unsigned char *excl) noexcept:
        cdef Py_ssize_t n = self.n_targets
        cdef Py_ssize_t t, step, counted = 0
        cdef double newcomer = 0.0, total = 0.0, score, best_score = 0.0
        cdef int best = -1
        if self.n_sampled < n:
            # targets without a sample start at the average of the sampled ones
            for t in range(n):
                if self.sampled[t] and self.available[t] and self.weights[t] > 0:
                    total += self._decayed_ewma(t)
                    counted += 1
            if counted:
                newcomer = total / counted
        t = self.cursor
        for step in range(n):
            if self.weights[t] > 0 and self.available[t] and (excl == NULL or not excl[t]):
                score = (self._decayed_ewma(t) if self.sampled[t] else newcomer) / self.weights[t]
                if best < 0 or score < best_score:
                    best = <int>t
                    best_score = score
            t += 1
            if t == n:
                t = 0
        self.cursor = self.cursor + 1 if self.cursor + 1 < n else 0
        return best

    # ------------------------------------------------------------ feedback

    cdef int _check_index(self, int index) except -1:
        if not 0 <= index < self.n_targets:
            raise IndexError(f"target index {index} out of range (0-{self.n_targets - 1})")
        return 0

    cpdef void set_available(self, int index, bint available) except *:
        """Health: an unavailable target is skipped by every algorithm."""
        self._check_index(index)
        if self.available[index] != available:
            self.available[index] = available
            if available:
                self.available_weight += self.weights[index]
            else:
                self.available_weight -= self.weights[index]
        if RINGGATE_DEBUG:
            self._check_invariants()

    cpdef bint is_available(self, int index) except -1:
        self._check_index(index)
        return self.available[index]

    cpdef void release(self, int index) except *:
        """The request that picked `index` is done (least-connections; a no-op otherwise).

        Call it once per successful pick, including picks that failed and were retried.
        """
        self._check_index(index)
        if self.conns != NULL and self.conns[index] > 0:
            self.conns[index] -= 1

    cpdef void observe(self, int index, double rtt_seconds, double now) except *:
        """Latency: feed one round-trip time (connect + response), `now` in seconds on a
        monotonic clock; also advances the clock used to age the other targets' EWMA."""
        cdef double weight, elapsed
        self._check_index(index)
        if not rtt_seconds >= 0.0:
            raise ValueError(f"rtt_seconds must be >= 0, got {rtt_seconds!r}")
        if self.ewma == NULL:
            return
        if now > self.clock:
            self.clock = now
        if not self.sampled[index]:
            self.ewma[index] = rtt_seconds
            self.sampled[index] = 1
            self.n_sampled += 1
        else:
            elapsed = now - self.touched_at[index]
            weight = exp(-elapsed / DECAY_SECONDS) if elapsed > 0.0 else 1.0
            self.ewma[index] = self.ewma[index] * weight + rtt_seconds * (1.0 - weight)
        self.touched_at[index] = now

    # ------------------------------------------------------------ introspection

    cdef int _check_invariants(self) except -1:
        cdef Py_ssize_t t, p, i
        cdef long long weight = 0
        for t in range(self.n_targets):
            if self.available[t]:
                weight += self.weights[t]
            if self.conns != NULL and self.conns[t] < 0:
                raise AssertionError(f"negative in-flight count for target {t}")
        if weight != self.available_weight:
            raise AssertionError(f"available_weight {self.available_weight} != {weight}")
        for i in range(self.wheel_size):
            if not 0 <= self.wheel[i] < self.n_targets or self.weights[self.wheel[i]] == 0:
                raise AssertionError(f"wheel entry {i} holds bad target {self.wheel[i]}")
        for p in range(self.n_points):
            if not 0 <= self.point_target[p] < self.n_targets:
                raise AssertionError(f"point {p} holds bad target {self.point_target[p]}")
        return 0

    def __repr__(self) -> str:
        cdef Py_ssize_t t
        available = sum(1 for t in range(self.n_targets) if self.available[t])
        head = f"<Balancer {self.algorithm} targets={self.n_targets} available={available}"
        if self.algo == ALGO_ROUND_ROBIN:
            return f"{head} wheel={self.wheel_size}>"
        if self.algo == ALGO_CONSISTENT_HASHING:
            return f"{head} ring={self.ring_size} points={self.n_points}>"
        if self.algo == ALGO_LEAST_CONNECTIONS:
            in_flight = sum(self.conns[t] for t in range(self.n_targets))
            return f"{head} in_flight={in_flight}>"
        return f"{head} sampled={self.n_sampled}>"
