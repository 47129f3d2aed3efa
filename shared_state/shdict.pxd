# A fixed-capacity hash table in shared memory, like nginx's `ngx.shared.DICT`.
# Mapped (anonymous, MAP_SHARED) by the master before it forks; every process reads and
# writes it at once, and a process killed with SIGKILL at any instruction leaves nothing
# locked and nothing torn that a reader trusts. docs/shdict.md has the long version.
#
# Layout (all fields uint64 words, host order, 8-byte aligned):
#   header   SD_HEADER_WORDS words: magic, layout version, capacity, key_max, value_max,
#            probe window, slot words, then the shared counters evictions, full_errors,
#            recovered (atomic adds).
#   locks    capacity pairs [lock word, owner start]: the insert lock of each home bucket.
#   slots    capacity slots of `slot_words` words:
#              0 LOCK     lock word (below)
#              1 START    start time (/proc/<pid>/stat field 22) of the claimer, pid-reuse guard
#              2 META     bits 0-1 state (EMPTY 0, LIVE 1, TOMB 2), bits 2-3 value type
#                         (BYTES 1, INT 2, FLOAT 3), bits 16-31 key length, 32-63 value length
#              3 HASH     64-bit hash of the key (FNV-1a + finalizer: the same in every process)
#              4 EXPIRES  CLOCK_MONOTONIC ms at which the entry expires; 0 = never
#              5 WRITTEN  CLOCK_MONOTONIC ms of the last write (the eviction tie-breaker)
#              6 VALUE    int64, or the bits of a double
#              7 (reserved)
#              then ceil(key_max / 8) key words and ceil(value_max / 8) value words,
#              zero-padded so keys compare word by word.
#
# Lock word: bits 42-63 the pid of the last claimer (Linux pids are < 2**22), bits 0-41 a
# sequence number whose two low bits say who owns the slot:
#   0  stable: anyone may read, a writer may claim it;
#   1  full write in progress: the content may be torn; a dead owner's slot is recovered
#      by discarding the content (it becomes a tombstone);
#   3  one-word write in progress (incr of a number of the same type, expire): every word
#      is valid at every instant, so a dead owner's slot is recovered content and all.
# Release moves the sequence to the next multiple of 4, so it only ever grows.
#
# Write contract:
#   - a writer claims a slot by a compare-and-swap of the lock word from the stable value
#     it validated its read with to (its pid, seq + 1 or + 3): a claim that succeeds proves
#     the slot still holds what the writer read. It writes with relaxed atomic stores and
#     releases with a release store of the next stable value. Nothing between claim and
#     release can fail, block or call Python.
#   - readers copy what they need between two loads of the lock word and retry when it
#     was odd or changed (a seqlock); they never write.
#   - a new key is inserted only under the insert lock of its home bucket, after looking
#     for it again, so a key is never in two slots; updates in place need no insert lock.
#     Order: insert lock, then one slot; a slot owner never waits for anything.
#   - a lock word that stays odd is checked after 1 ms of waiting, then every 5 ms: when its
#     pid no longer exists or is a zombie (or is alive but started at another time than the
#     claimer, after 2 s), the waiter recovers it by CAS and counts it in `recovered`.
#   - EMPTY slots never come back (deletes leave tombstones), so a lookup stops at one.
from libc.stdint cimport int64_t, uint64_t

cdef enum:
    SD_HEADER_WORDS = 16
    SD_FIXED_WORDS = 8

# status of SharedDict.incr_int_nogil
cdef enum:
    SD_INCR_OK = 0
    SD_INCR_MISSING = 1      # absent or expired: the caller decides whether to initialize it
    SD_INCR_NOT_INT = 2      # holds bytes or a float: use incr()
    SD_INCR_OVERFLOW = 3     # the sum does not fit in int64; nothing was written
    SD_INCR_NOT_NUMBER = 4   # holds bytes (incr_int_nogil reports it as SD_INCR_NOT_INT)

ctypedef struct SlotRead:
    uint64_t lock
    uint64_t meta
    uint64_t hash
    uint64_t expires
    uint64_t written
    uint64_t value

cdef class SharedDict:
    cdef object _mmap
    cdef unsigned char[::1] _view
    cdef uint64_t* _header
    cdef uint64_t* _locks
    cdef uint64_t* _slots
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t key_max
    cdef readonly Py_ssize_t value_max
    cdef readonly Py_ssize_t probe_window
    cdef readonly Py_ssize_t size
    cdef Py_ssize_t _slot_words
    cdef Py_ssize_t _key_words

    # the request-path counter: an existing int entry is updated by one CAS claim, two
    # stores (value, write time) and a release store; returns an SD_INCR_* status and,
    # when SD_INCR_OK, the new value. A missing key is left to the caller (incr_int creates it).
    cdef int incr_int_nogil(self, const unsigned char* key, Py_ssize_t key_len, int64_t delta,
                            int64_t* result) noexcept nogil
    cpdef int64_t incr_int(self, bytes key, int64_t delta=*, object init=*, double init_ttl=*) except? -1

    cdef inline uint64_t* _slot(self, Py_ssize_t index) noexcept nogil
    cdef Py_ssize_t _find(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h,
                          SlotRead* out) noexcept nogil
    cdef void _snapshot(self, uint64_t* slot, SlotRead* out) noexcept nogil
    cdef bint _key_equals(self, uint64_t* slot, const unsigned char* key, Py_ssize_t key_len) noexcept nogil
    cdef void _wait(self, uint64_t* lock, uint64_t* slot, uint64_t seen) noexcept nogil
    cdef void _recover(self, uint64_t* lock, uint64_t* slot, uint64_t seen) noexcept nogil
    cdef bint _claim(self, uint64_t* lock, uint64_t expected, int kind, uint64_t* claimed) noexcept nogil
    cdef uint64_t _lock_insert(self, uint64_t* lock) noexcept nogil
    cdef void _fill(self, uint64_t* slot, const unsigned char* key, Py_ssize_t key_len, uint64_t h,
                    int vtype, uint64_t vword, const unsigned char* vbytes, Py_ssize_t vlen,
                    uint64_t expires, uint64_t now) noexcept nogil
    cdef int _write(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h, int vtype,
                    uint64_t vword, const unsigned char* vbytes, Py_ssize_t vlen, uint64_t expires,
                    int flags, uint64_t now) noexcept nogil
    cdef int _insert_locked(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h, int vtype,
                            uint64_t vword, const unsigned char* vbytes, Py_ssize_t vlen,
                            uint64_t expires, int flags, uint64_t now) noexcept nogil
    cdef bytes _key(self, object key)
    cdef int _check_key(self, bytes key) except -1
    cdef _raise_not_int(self, bytes key)
    cdef int _store(self, bytes key, object value, double ttl, int flags) except -1
    cdef object _read(self, bytes key, uint64_t* expires_out)
    cdef Py_ssize_t _count_live(self) noexcept
    cdef int _bump(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h, bint int_only,
                   bint delta_is_float, int64_t di, double df, uint64_t now,
                   int* out_type, uint64_t* out_word) noexcept nogil
