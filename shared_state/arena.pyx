# cython: language_level=3
"""Shared-memory arena: mapped by the master before fork, inherited by every worker.

See arena.pxd for the layout and who writes what.
"""
import mmap

from libc.stdint cimport uint64_t
from libc.string cimport memset

cdef extern from *:
    """
    #ifndef RINGGATE_DEBUG
    #define RINGGATE_DEBUG 0
    #endif
    static inline uint64_t rg_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void rg_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t rg_fetch_add(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
    """
    int RINGGATE_DEBUG
    uint64_t rg_load(uint64_t *p) noexcept nogil
    void rg_store(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t rg_fetch_add(uint64_t *p, uint64_t v) noexcept nogil

MAGIC = 0x5247415445415231  # "RGATEAR1"
LAYOUT_VERSION = 1

# header words
H_MAGIC = 0
H_VERSION = 1
H_GENERATION = 2
H_SLOTS = 3
H_RETIRED_SEQ = 4

# stats block fields; GAUGES are not folded into the retired total when a worker dies
PID = 0
REQUESTS = 1
STATUS_1XX = 2
STATUS_2XX = 3
STATUS_3XX = 4
STATUS_4XX = 5
STATUS_5XX = 6
CONNECTIONS_ACTIVE = 7
CONNECTIONS_ACCEPTED = 8
BYTES_IN = 9
BYTES_OUT = 10
UPSTREAM_CONNECT_ERRORS = 11
UPSTREAM_TIMEOUTS = 12
RETRIES = 13
STARTED_AT_MS = 14
HEARTBEAT_MS = 15

FIELD_NAMES = (
    "pid", "requests", "status_1xx", "status_2xx", "status_3xx", "status_4xx", "status_5xx",
    "connections_active", "connections_accepted", "bytes_in", "bytes_out",
    "upstream_connect_errors", "upstream_timeouts", "retries", "started_at_ms", "heartbeat_ms",
)
GAUGES = frozenset((PID, CONNECTIONS_ACTIVE, STARTED_AT_MS, HEARTBEAT_MS))
_COUNTERS = tuple(i for i in range(BLOCK_WORDS) if i not in GAUGES)


cdef class WorkerStats:
    """One worker's counters; only the owning worker writes through this object."""

    def __init__(self) -> None:
        raise TypeError("use Arena.worker_stats(slot)")

    cdef inline void add(self, int field, uint64_t amount) noexcept nogil:
        # Single writer: a load + store is enough; the store is atomic so readers never see a torn word.
        rg_store(&self._words[field], rg_load(&self._words[field]) + amount)

    cpdef void incr(self, int field, uint64_t amount=1):
        if RINGGATE_DEBUG and not 0 <= field < BLOCK_WORDS:
            raise IndexError(field)
        self.add(field, amount)

    cpdef void decr(self, int field, uint64_t amount=1):
        if RINGGATE_DEBUG and not 0 <= field < BLOCK_WORDS:
            raise IndexError(field)
        rg_store(&self._words[field], rg_load(&self._words[field]) - amount)

    cpdef void record_response(self, int status, uint64_t bytes_in, uint64_t bytes_out):
        cdef int klass = status // 100
        self.add(REQUESTS, 1)
        if 1 <= klass <= 5:
            self.add(STATUS_1XX + klass - 1, 1)
        self.add(BYTES_IN, bytes_in)
        self.add(BYTES_OUT, bytes_out)

    cpdef uint64_t get(self, int field):
        return rg_load(&self._words[field])

    def set(self, int field, uint64_t value) -> None:
        rg_store(&self._words[field], value)


cdef class Arena:
    """Fixed-size anonymous shared mapping; create it before fork, never resize it."""

    def __init__(self, int slots) -> None:
        if slots < 1:
            raise ValueError("an arena needs at least one worker slot")
        self.slots = slots
        self.size = (HEADER_WORDS + (slots + 1) * BLOCK_WORDS) * 8
        # MAP_SHARED | MAP_ANONYMOUS: inherited across fork, nothing to unlink, zero-filled.
        self._mmap = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED)
        self._view = self._mmap
        self._header = <uint64_t*>&self._view[0]
        self._blocks = self._header + HEADER_WORDS
        rg_store(&self._header[H_VERSION], LAYOUT_VERSION)
        rg_store(&self._header[H_SLOTS], <uint64_t>slots)
        rg_store(&self._header[H_MAGIC], MAGIC)

    cdef uint64_t* _block(self, int slot) except NULL:
        if not 0 <= slot <= self.slots:
            raise IndexError(f"slot {slot} out of range 0..{self.slots}")
        return self._blocks + slot * BLOCK_WORDS

    def worker_stats(self, int slot) -> WorkerStats:
        if slot == self.slots:
            raise IndexError("the retired block is written by the master only")
        cdef WorkerStats stats = WorkerStats.__new__(WorkerStats)
        stats._words = self._block(slot)
        stats._owner = self
        return stats

    @property
    def generation(self) -> int:
        return rg_load(&self._header[H_GENERATION])

    def bump_generation(self) -> int:
        return rg_fetch_add(&self._header[H_GENERATION], 1) + 1

    def read_block(self, int slot) -> dict:
        cdef uint64_t* words = self._block(slot)
        return {FIELD_NAMES[i]: rg_load(&words[i]) for i in range(BLOCK_WORDS)}

    def retire(self, int slot) -> None:
        """Fold a dead worker's counters into the retired total and clear its slot (master only)."""
        cdef uint64_t* words = self._block(slot)
        cdef uint64_t* retired = self._block(self.slots)
        cdef uint64_t* seq = &self._header[H_RETIRED_SEQ]
        if slot == self.slots:
            raise IndexError("cannot retire the retired block")
        rg_fetch_add(seq, 1)  # odd: readers retry
        for i in _COUNTERS:
            rg_fetch_add(&retired[i], rg_load(&words[i]))
        memset(words, 0, BLOCK_WORDS * 8)
        rg_fetch_add(seq, 1)

    def totals(self) -> dict:
        """Counters summed over live slots and the retired block; gauges summed over live slots."""
        cdef uint64_t* seq = &self._header[H_RETIRED_SEQ]
        cdef uint64_t before
        cdef list sums
        cdef int slot, i
        cdef uint64_t* words
        while True:
            before = rg_load(seq)
            if before & 1:
                continue
            sums = [0] * BLOCK_WORDS
            for slot in range(self.slots + 1):
                words = self._blocks + slot * BLOCK_WORDS
                for i in range(BLOCK_WORDS):
                    sums[i] += rg_load(&words[i])
            if rg_load(seq) == before:
                break
        totals = {FIELD_NAMES[i]: sums[i] for i in range(BLOCK_WORDS) if i not in (PID, STARTED_AT_MS, HEARTBEAT_MS)}
        return totals

    def __repr__(self) -> str:
        return f"<Arena slots={self.slots} size={self.size} generation={self.generation}>"
