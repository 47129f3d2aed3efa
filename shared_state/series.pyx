# cython: language_level=3
"""Labelled counter series in shared memory, per worker, merged on read.

See series.pxd for the layout, the key encoding and who writes what. Python callers use
series_index / add / observe; Cython callers (the proxy worker) cimport SeriesTable and
use vector() once, then series_add / series_observe on the cached pointer, or cadd().
"""
import mmap
import time

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    static inline uint64_t rg_series_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void rg_series_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void rg_series_seq_enter(uint64_t *p) {
        __atomic_fetch_add(p, 1, __ATOMIC_ACQ_REL);
        __atomic_thread_fence(__ATOMIC_RELEASE);   /* the fold's writes stay after the odd value */
    }
    static inline void rg_series_seq_leave(uint64_t *p) { __atomic_fetch_add(p, 1, __ATOMIC_RELEASE); }
    static inline uint64_t rg_series_seq_recheck(const uint64_t *p) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* the reads stay before the second look */
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    """
    uint64_t rg_series_acquire(const uint64_t *p) noexcept nogil
    void rg_series_release(uint64_t *p, uint64_t v) noexcept nogil
    void rg_series_seq_enter(uint64_t *p) noexcept nogil
    void rg_series_seq_leave(uint64_t *p) noexcept nogil
    uint64_t rg_series_seq_recheck(const uint64_t *p) noexcept nogil

MAGIC = 0x3145495245534752  # "RGSERIE1" little-endian
LAYOUT_VERSION = 1

# header words
H_MAGIC = 0
H_VERSION = 1
H_SLOTS = 2
H_SERIES_PER_SLOT = 3
H_RETIRED_CAPACITY = 4
H_ENTRY_WORDS = 5
H_RETIRED_SEQ = 6

# region header words
RH_COUNT = 0
RH_OVERFLOWED = 1
RH_EPOCH = 2

KEY_SEP = b"\x1f"
MAX_KEY_BYTES = KEY_BYTES
KIND_TAGS = (b"r", b"c", b"t")
KIND_NAMES = ("route", "code", "target")
KIND_FIELDS = (("service", "route"), ("service", "route", "code", "source"), ("upstream", "target"))
KIND_WIDTHS = (R_WORDS, C_WORDS, T_WORDS)

# Kong's prometheus plugin buckets (ms); must match the C arrays in series.pxd.
LONG_BOUNDS_MS = (25, 50, 80, 100, 250, 400, 700, 1000, 2000, 5000, 10000, 30000, 60000)
KONG_BOUNDS_MS = (1, 2, 5, 7, 10, 15, 20, 30, 50, 75, 100, 200, 500, 750, 1000, 3000, 6000)
# name -> (first word in the route vector, bucket upper bounds in ms)
HISTOGRAMS = {
    "request": (R_REQUEST_LATENCY, LONG_BOUNDS_MS),
    "upstream": (R_UPSTREAM_LATENCY, LONG_BOUNDS_MS),
    "kong": (R_KONG_LATENCY, KONG_BOUNDS_MS),
}

# A reader waits at most this long for the master to finish a fold (it takes microseconds;
# a seqlock left odd means the master died mid-fold, and then the node is going down).
_SEQLOCK_PATIENCE_S = 1.0


def encode_key(int kind, *fields) -> bytes:
    """Kind tag + fields joined by KEY_SEP; a field is str, bytes or int (a status code)."""
    if not 0 <= kind < NKINDS:
        raise ValueError(f"unknown series kind {kind}")
    if len(fields) != len(KIND_FIELDS[kind]):
        raise ValueError(f"a {KIND_NAMES[kind]} key has fields {KIND_FIELDS[kind]}, got {len(fields)}")
    parts = []
    for field in fields:
        if isinstance(field, int):
            part = str(field).encode()
        elif isinstance(field, str):
            part = field.encode("utf-8")
        elif isinstance(field, bytes):
            part = field
        else:
            raise TypeError(f"a key field is str, bytes or int, not {type(field).__name__}")
        if KEY_SEP in part:
            raise ValueError(f"a key field cannot contain the separator 0x1f: {part!r}")
        parts.append(part)
    return KIND_TAGS[kind] + KEY_SEP.join(parts)


def route_key(service: str, route: str) -> bytes:
    return encode_key(KIND_ROUTE, service, route)


def code_key(service: str, route: str, code: int, source: str = "service") -> bytes:
    """source: "service" when the upstream answered, "kong" when the gateway did (Kong's label)."""
    return encode_key(KIND_CODE, service, route, code, source)


def target_key(upstream: str, target: str) -> bytes:
    return encode_key(KIND_TARGET, upstream, target)


def overflow_key(int kind) -> bytes:
    """The key of a kind's overflow series: the tag alone."""
    return KIND_TAGS[kind]


cdef int _kind_of_tag(int tag) noexcept nogil:
    if tag == 0x72:      # "r"
        return KIND_ROUTE
    if tag == 0x63:      # "c"
        return KIND_CODE
    if tag == 0x74:      # "t"
        return KIND_TARGET
    return -1


def kind_of(bytes key) -> int:
    kind = _kind_of_tag(key[0]) if key else -1
    if kind < 0:
        raise ValueError(f"not a series key: {key!r}")
    return kind


def decode_key(bytes key) -> tuple:
    """(kind, fields as str); fields is () for an overflow series."""
    kind = kind_of(key)
    if len(key) == 1:
        return kind, ()
    return kind, tuple(part.decode("utf-8", "replace") for part in key[1:].split(KEY_SEP))


cdef inline uint64_t* _entry(uint64_t* region, Py_ssize_t index) noexcept nogil:
    return region + REGION_HEADER_WORDS + index * ENTRY_WORDS


cdef inline int _entry_kind(uint64_t* entry) noexcept nogil:
    """The kind from the tag byte of a published entry, -1 if it has none."""
    if rg_series_load(entry) == 0:
        return -1
    return _kind_of_tag((<unsigned char*>&entry[1])[0])


cdef bytes _key_at(uint64_t* entry):
    cdef uint64_t length = rg_series_load(entry)
    if length > KEY_BYTES:   # never written so; a reader does not trust it blindly
        length = KEY_BYTES
    return PyBytes_FromStringAndSize(<char*>&entry[1], <Py_ssize_t>length)


cdef void _write_entry(uint64_t* entry, bytes key) noexcept:
    """Key and zeroed counters; the caller publishes the entry afterwards."""
    cdef Py_ssize_t length = PyBytes_GET_SIZE(key)
    memset(entry, 0, ENTRY_WORDS * 8)
    memcpy(&entry[1], PyBytes_AS_STRING(key), length)
    entry[0] = <uint64_t>length


cdef class SeriesTable:
    """Fixed-size anonymous shared mapping; create it before fork, never resize it."""

    def __init__(self, int slots, Py_ssize_t series_per_slot=4096, Py_ssize_t retired_capacity=-1) -> None:
        if slots < 1:
            raise ValueError("a series table needs at least one worker slot")
        if series_per_slot < 1:
            raise ValueError("series_per_slot must be at least 1")
        if retired_capacity < 0:
            # The retired region collects the union of every dead worker's keys.
            retired_capacity = 2 * series_per_slot
        self.slots = slots
        self.series_per_slot = series_per_slot
        self.retired_capacity = retired_capacity
        self._region_words = REGION_HEADER_WORDS + (NKINDS + series_per_slot) * ENTRY_WORDS
        self.size = (HEADER_WORDS + slots * self._region_words
                     + REGION_HEADER_WORDS + (NKINDS + retired_capacity) * ENTRY_WORDS) * 8
        # MAP_SHARED | MAP_ANONYMOUS: inherited across fork, zero-filled, pages cost only once touched.
        self._mmap = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED)
        self._view = self._mmap
        self._header = <uint64_t*>&self._view[0]
        self._regions = self._header + HEADER_WORDS
        self._caches = [None] * slots
        cdef int slot
        cdef uint64_t* region
        for slot in range(slots + 1):
            region = self._region(slot)
            for kind in range(NKINDS):
                _write_entry(_entry(region, kind), KIND_TAGS[kind])
            rg_series_release(&region[RH_COUNT], NKINDS)
        self._header[H_VERSION] = LAYOUT_VERSION
        self._header[H_SLOTS] = <uint64_t>slots
        self._header[H_SERIES_PER_SLOT] = <uint64_t>series_per_slot
        self._header[H_RETIRED_CAPACITY] = <uint64_t>retired_capacity
        self._header[H_ENTRY_WORDS] = ENTRY_WORDS
        rg_series_release(&self._header[H_MAGIC], MAGIC)

    cdef uint64_t* _region(self, int slot) noexcept nogil:
        return self._regions + slot * self._region_words

    cdef Py_ssize_t _capacity(self, int slot):
        """Entries a region can hold, overflow entries included."""
        return NKINDS + (self.retired_capacity if slot == self.slots else self.series_per_slot)

    cdef Py_ssize_t _published(self, int slot):
        cdef Py_ssize_t count = <Py_ssize_t>rg_series_acquire(&self._region(slot)[RH_COUNT])
        cdef Py_ssize_t capacity = self._capacity(slot)
        return count if count <= capacity else capacity

    cdef void _check_worker_slot(self, int slot) except *:
        if not 0 <= slot < self.slots:
            raise IndexError(f"worker slot {slot} out of range 0..{self.slots - 1}")

    cdef uint64_t* vector(self, int slot, Py_ssize_t index) except NULL:
        self._check_worker_slot(slot)
        if not 0 <= index < self._published(slot):
            raise IndexError(f"series {index} is not in slot {slot}")
        return _entry(self._region(slot), index) + VALUES_OFFSET

    cdef inline void cadd(self, int slot, Py_ssize_t index, int field, uint64_t amount) noexcept nogil:
        rg_series_add(_entry(self._region(slot), index) + VALUES_OFFSET + field, amount)

    cdef dict _cache(self, int slot):
        """This process's key -> index map for `slot`, rebuilt when a retire changed the region."""
        cdef uint64_t* region = self._region(slot)
        cdef uint64_t epoch = rg_series_acquire(&region[RH_EPOCH])
        cached = self._caches[slot]
        if cached is not None and cached[0] == epoch:
            return cached[1]
        cdef dict index = {}
        cdef Py_ssize_t i
        for i in range(self._published(slot)):
            index[_key_at(_entry(region, i))] = i
        self._caches[slot] = (epoch, index)
        return index

    def series_index(self, int slot, bytes key, int kind) -> int:
        """Find or append `key` in `slot` (its owning worker only); the kind's overflow index when full.

        Keep the returned index: this call does a dict lookup, the adds do not.
        """
        self._check_worker_slot(slot)
        if not 0 <= kind < NKINDS:
            raise ValueError(f"unknown series kind {kind}")
        if not key or key[0] != KIND_TAGS[kind][0]:
            raise ValueError(f"key {key!r} is not a {KIND_NAMES[kind]} key")
        cdef dict cache = self._cache(slot)
        found = cache.get(key)
        if found is not None:
            return found
        cdef uint64_t* region = self._region(slot)
        cdef Py_ssize_t count = self._published(slot)
        if PyBytes_GET_SIZE(key) > KEY_BYTES or count >= self._capacity(slot):
            # Counted once per distinct key: the refusal is cached like a hit.
            rg_series_add(&region[RH_OVERFLOWED], 1)
            cache[key] = kind
            return kind
        _write_entry(_entry(region, count), key)
        rg_series_release(&region[RH_COUNT], <uint64_t>(count + 1))   # publish
        cache[key] = count
        return count

    cdef uint64_t* _checked_vector(self, int slot, Py_ssize_t index, int field, int width) except NULL:
        cdef uint64_t* vec = self.vector(slot, index)
        cdef int kind = _entry_kind(vec - VALUES_OFFSET)
        if field < 0 or field + width > KIND_WIDTHS[kind]:
            raise IndexError(f"field {field} out of range for a {KIND_NAMES[kind]} series")
        return vec

    def add(self, int slot, Py_ssize_t index, int field, uint64_t amount=1) -> None:
        """Add to one counter of a series (the owning worker only)."""
        cdef uint64_t* vec = self._checked_vector(slot, index, field, 1)
        rg_series_add(&vec[field], amount)

    def observe(self, int slot, Py_ssize_t index, int hist, uint64_t micros) -> None:
        """Record a latency (microseconds) in a route histogram: R_REQUEST/UPSTREAM/KONG_LATENCY."""
        if hist not in (R_REQUEST_LATENCY, R_UPSTREAM_LATENCY, R_KONG_LATENCY):
            raise ValueError(f"word {hist} does not start a latency histogram")
        cdef uint64_t* vec = self._checked_vector(
            slot, index, hist, KONG_HIST_WORDS if hist == R_KONG_LATENCY else LONG_HIST_WORDS)
        series_observe(vec, hist, micros)

    def count(self, int slot) -> int:
        """Ordinary series published in a region (slot == slots: the retired region)."""
        if not 0 <= slot <= self.slots:
            raise IndexError(f"slot {slot} out of range 0..{self.slots}")
        return self._published(slot) - NKINDS

    def merged(self) -> dict:
        """Counters summed by key over every live region and the retired one: {key: [counters]}.

        A kind's overflow series appears only once something was counted in it.
        """
        return self._collect(range(self.slots + 1))

    def read_region(self, int slot) -> dict:
        """One region's series (slot == slots: the retired region), read like merged()."""
        if not 0 <= slot <= self.slots:
            raise IndexError(f"slot {slot} out of range 0..{self.slots}")
        return self._collect((slot,))

    def overflowed(self) -> int:
        """Distinct keys refused (region full or key too long), dead workers included."""
        cdef uint64_t* seq = &self._header[H_RETIRED_SEQ]
        cdef uint64_t before
        cdef double deadline = time.monotonic() + _SEQLOCK_PATIENCE_S
        while True:
            before = self._seq_begin(seq, deadline)
            total = 0
            for slot in range(self.slots + 1):
                total += rg_series_load(&self._region(slot)[RH_OVERFLOWED])
            if rg_series_seq_recheck(seq) == before:
                return total

    cdef uint64_t _seq_begin(self, uint64_t* seq, double deadline) except 1:
        cdef uint64_t value
        cdef int spins = 0
        while True:
            value = rg_series_acquire(seq)
            if not value & 1:
                return value
            spins += 1
            if spins % 1024 == 0 and time.monotonic() > deadline:
                raise TimeoutError("series table: the retired region stayed mid-fold (did the master die?)")

    cdef dict _collect(self, object slots):
        cdef uint64_t* seq = &self._header[H_RETIRED_SEQ]
        cdef uint64_t before
        cdef double deadline = time.monotonic() + _SEQLOCK_PATIENCE_S
        cdef uint64_t* sums = NULL
        cdef Py_ssize_t rows_allocated = 0, row, i, count
        cdef int slot, kind, width, w
        cdef uint64_t* region
        cdef uint64_t* vec
        cdef uint64_t* grown
        cdef uint64_t* acc
        cdef bint used
        cdef dict rows
        cdef list widths
        try:
            while True:
                before = self._seq_begin(seq, deadline)
                rows = {}
                widths = []
                for slot in slots:
                    region = self._region(slot)
                    count = self._published(slot)
                    for i in range(count):
                        kind = _entry_kind(_entry(region, i))
                        if kind < 0:
                            continue
                        width = KIND_WIDTHS[kind]
                        vec = _entry(region, i) + VALUES_OFFSET
                        if i < NKINDS:
                            used = False
                            for w in range(width):
                                if rg_series_load(&vec[w]):
                                    used = True
                                    break
                            if not used:
                                continue
                        key = _key_at(_entry(region, i))
                        found = rows.get(key)
                        if found is None:
                            row = len(rows)
                            if row == rows_allocated:
                                rows_allocated = rows_allocated * 2 + 64
                                grown = <uint64_t*>realloc(sums, rows_allocated * VALUE_WORDS * 8)
                                if grown == NULL:
                                    raise MemoryError()
                                sums = grown
                            memset(sums + row * VALUE_WORDS, 0, VALUE_WORDS * 8)
                            rows[key] = row
                            widths.append(width)
                        else:
                            row = found
                        acc = sums + row * VALUE_WORDS
                        for w in range(width):
                            acc[w] += rg_series_load(&vec[w])
                if rg_series_seq_recheck(seq) == before:
                    break
            result = {}
            for key, row in rows.items():
                acc = sums + row * VALUE_WORDS
                result[key] = [acc[w] for w in range(<int>widths[row])]
            return result
        finally:
            free(sums)

    def retire(self, int slot) -> None:
        """Fold a dead worker's series into the retired region by key, then clear its region (master only)."""
        self._check_worker_slot(slot)
        cdef uint64_t* dead = self._region(slot)
        cdef uint64_t* retired = self._region(self.slots)
        cdef uint64_t* seq = &self._header[H_RETIRED_SEQ]
        cdef Py_ssize_t count = self._published(slot)
        cdef Py_ssize_t retired_count, i, target
        cdef int kind, width, w
        cdef uint64_t* vec
        cdef uint64_t* into
        rg_series_seq_enter(seq)   # odd: readers retry
        try:
            index = {_key_at(_entry(retired, i)): i for i in range(self._published(self.slots))}
            for i in range(count):
                kind = _entry_kind(_entry(dead, i))
                if kind < 0:
                    continue
                key = _key_at(_entry(dead, i))
                if i < NKINDS:
                    target = i   # overflow entries sit at the same index in every region
                else:
                    found = index.get(key)
                    if found is not None:
                        target = found
                    else:
                        retired_count = self._published(self.slots)
                        if retired_count < self._capacity(self.slots):
                            _write_entry(_entry(retired, retired_count), key)
                            rg_series_release(&retired[RH_COUNT], <uint64_t>(retired_count + 1))
                            index[key] = retired_count
                            target = retired_count
                        else:
                            rg_series_add(&retired[RH_OVERFLOWED], 1)
                            target = kind
                width = KIND_WIDTHS[kind]
                vec = _entry(dead, i) + VALUES_OFFSET
                into = _entry(retired, target) + VALUES_OFFSET
                for w in range(width):
                    rg_series_add(&into[w], rg_series_load(&vec[w]))
            rg_series_add(&retired[RH_OVERFLOWED], rg_series_load(&dead[RH_OVERFLOWED]))
            # Clear: overflow counters zeroed (their keys stay), ordinary entries wiped.
            for i in range(NKINDS):
                memset(_entry(dead, i) + VALUES_OFFSET, 0, VALUE_WORDS * 8)
            if count > NKINDS:
                memset(_entry(dead, NKINDS), 0, (count - NKINDS) * ENTRY_WORDS * 8)
            dead[RH_OVERFLOWED] = 0
            rg_series_release(&dead[RH_COUNT], NKINDS)
            rg_series_release(&dead[RH_EPOCH], rg_series_load(&dead[RH_EPOCH]) + 1)
        finally:
            rg_series_seq_leave(seq)

    def __repr__(self) -> str:
        return (f"<SeriesTable slots={self.slots} series_per_slot={self.series_per_slot} "
                f"retired_capacity={self.retired_capacity} size={self.size}>")
