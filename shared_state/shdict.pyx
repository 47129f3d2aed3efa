# cython: language_level=3
"""A fixed-capacity dict in shared memory, shared by every process of a node (like `ngx.shared.DICT`).

Create it before fork; every process then reads and writes it with no lock a killed process
could leave held. See shdict.pxd for the layout and the write contract, docs/shdict.md for the
guarantees and the eviction rule.
"""
import mmap

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport ceil, isfinite
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <pthread.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    #ifndef RINGGATE_DEBUG
    #define RINGGATE_DEBUG 0
    #endif
    #define SD_PID_SHIFT 42
    #define SD_SEQ_MASK ((1ULL << SD_PID_SHIFT) - 1)

    static inline uint64_t sd_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t sd_load_relaxed(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void sd_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void sd_store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline int sd_cas(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
    }
    static inline uint64_t sd_fetch_add(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline void sd_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void sd_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void sd_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    static inline void sd_yield(void) { sched_yield(); }
    static inline uint64_t sd_clock_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    }
    /* FNV-1a with a murmur3 finalizer: stable across processes (unlike Python's hash). */
    static inline uint64_t sd_hash(const unsigned char *p, Py_ssize_t n) {
        uint64_t h = 0xcbf29ce484222325ULL;
        for (Py_ssize_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
        h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
        h ^= h >> 33;
        return h;
    }
    static inline int sd_add_overflows(int64_t a, int64_t b, int64_t *out) { return __builtin_add_overflow(a, b, out); }

    /* /proc/<pid>/stat: 1 and the state letter and start time (field 22) when readable,
       0 when there is no such entry, -1 when it cannot be told. */
    static int sd_proc_stat(uint64_t pid, char *state, uint64_t *start) {
        char path[64], buf[1024];
        snprintf(path, sizeof path, "/proc/%llu/stat", (unsigned long long)pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return errno == ENOENT ? 0 : -1;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) return n == 0 || errno == ESRCH ? 0 : -1;
        buf[n] = 0;
        char *p = strrchr(buf, ')');          /* the command name may hold spaces and parens */
        if (p == NULL || p[1] != ' ') return -1;
        p += 2;
        *state = *p;
        for (int field = 3; field < 22; field++) {
            p = strchr(p, ' ');
            if (p == NULL) return -1;
            p++;
        }
        *start = strtoull(p, NULL, 10);
        return 1;
    }
    static uint64_t sd_start_token(uint64_t pid) {
        char state;
        uint64_t start;
        return sd_proc_stat(pid, &state, &start) == 1 ? start : 0;
    }
    /* 0 when the process is gone or a zombie; 1 otherwise, with *mismatch set when a
       process with that pid exists but started at another time than `token` says. */
    static int sd_pid_alive(uint64_t pid, uint64_t token, int *mismatch) {
        char state;
        uint64_t start;
        *mismatch = 0;
        if (kill((pid_t)pid, 0) == -1 && errno == ESRCH) return 0;
        if (sd_proc_stat(pid, &state, &start) != 1) return 1;   /* hidden (hidepid) or racing: ask kill() again later */
        if (state == 'Z' || state == 'X' || state == 'x') return 0;
        if (token != 0 && start != token) *mismatch = 1;
        return 1;
    }
    /* Who signs claims in this process: pid and start time, read once per process. A
       pthread_atfork child handler forgets them, so a child of any fork() re-reads its own. */
    static uint64_t sd_me_pid = 0, sd_me_start = 0;
    static int sd_atfork_registered = 0;
    static void sd_forget_identity(void) { sd_me_pid = 0; }
    static inline void sd_identity(void) {
        if (sd_me_pid != 0) return;
        if (!sd_atfork_registered) {
            pthread_atfork(NULL, NULL, sd_forget_identity);
            sd_atfork_registered = 1;
        }
        uint64_t pid = (uint64_t)getpid();
        sd_me_start = sd_start_token(pid);
        sd_me_pid = pid;
    }
    static void sd_abort(const char *msg) { fprintf(stderr, "shdict invariant broken: %s\\n", msg); abort(); }
    """
    int RINGGATE_DEBUG
    int SD_PID_SHIFT
    uint64_t SD_SEQ_MASK
    uint64_t sd_load(uint64_t *p) noexcept nogil
    uint64_t sd_load_relaxed(uint64_t *p) noexcept nogil
    void sd_store(uint64_t *p, uint64_t v) noexcept nogil
    void sd_store_relaxed(uint64_t *p, uint64_t v) noexcept nogil
    bint sd_cas(uint64_t *p, uint64_t expected, uint64_t desired) noexcept nogil
    uint64_t sd_fetch_add(uint64_t *p, uint64_t v) noexcept nogil
    void sd_fence_acquire() noexcept nogil
    void sd_fence_release() noexcept nogil
    void sd_cpu_relax() noexcept nogil
    void sd_yield() noexcept nogil
    uint64_t sd_clock_ms() noexcept nogil
    uint64_t sd_hash(const unsigned char *p, Py_ssize_t n) noexcept nogil
    bint sd_add_overflows(int64_t a, int64_t b, int64_t *out) noexcept nogil
    uint64_t sd_me_pid
    uint64_t sd_me_start
    void sd_identity() noexcept nogil
    int sd_pid_alive(uint64_t pid, uint64_t token, int *mismatch) noexcept nogil
    void sd_abort(const char *msg) noexcept nogil

MAGIC = 0x5247534844494331  # "RGSHDIC1"
LAYOUT_VERSION = 1

cdef enum:
    # header words
    H_MAGIC = 0
    H_VERSION = 1
    H_CAPACITY = 2
    H_KEY_MAX = 3
    H_VALUE_MAX = 4
    H_WINDOW = 5
    H_SLOT_WORDS = 6
    H_EVICTIONS = 7
    H_FULL_ERRORS = 8
    H_RECOVERED = 9
    # slot words (LOCK and START are also the two words of an insert lock)
    LOCK = 0
    START = 1
    META = 2
    HASH = 3
    EXPIRES = 4
    WRITTEN = 5
    VALUE = 6
    # slot states and value types (META bits 0-1 and 2-3)
    ST_EMPTY = 0
    ST_LIVE = 1
    ST_TOMB = 2
    T_BYTES = 1
    T_INT = 2
    T_FLOAT = 3
    # claim kinds: the two low bits of an owned lock word
    CLAIM_FULL = 1
    CLAIM_WORD = 3
    # what a write may do
    F_OVERWRITE = 1
    F_INSERT = 2
    F_EVICT = 4
    # outcomes of a write
    W_OK = 0
    W_EXISTS = 1
    W_MISSING = 2
    W_FULL = 3
    W_NO_VICTIM = 4
    W_RETRY = 5

# a lock word odd this long is checked for a dead owner, then again every RECHECK_MS
cdef uint64_t FIRST_CHECK_MS = 1
cdef uint64_t RECHECK_MS = 5
# an owner pid that is alive but started at another time is taken for a reused pid after this
cdef uint64_t PID_REUSE_GRACE_MS = 2000

cdef uint64_t _test_now_ms = 0


class SharedDictFull(Exception):
    """No slot of the key's probe window could be freed for a new entry."""


def set_test_clock_ms(ms: int | None) -> None:
    """Test only: freeze the TTL clock of this process (and of children forked later) at `ms`."""
    global _test_now_ms
    if ms is not None and ms <= 0:
        raise ValueError("the test clock must be positive (0 means the real clock)")
    _test_now_ms = 0 if ms is None else ms


def monotonic_ms() -> int:
    """The clock TTLs are measured on: CLOCK_MONOTONIC in ms, or the test clock when set."""
    return _now_ms()


cdef inline uint64_t _now_ms() noexcept nogil:
    return _test_now_ms if _test_now_ms else sd_clock_ms()


cdef inline void _identity() noexcept nogil:
    sd_identity()
    if RINGGATE_DEBUG and sd_me_pid >> (64 - SD_PID_SHIFT):
        sd_abort("pid does not fit the lock word")


cdef inline uint64_t _compose(uint64_t pid, uint64_t seq) noexcept nogil:
    return (pid << SD_PID_SHIFT) | (seq & SD_SEQ_MASK)


cdef inline uint64_t _next_stable(uint64_t seq) noexcept nogil:
    return ((seq | 3) + 1) & SD_SEQ_MASK


cdef inline void _release(uint64_t* lock, uint64_t claimed) noexcept nogil:
    if RINGGATE_DEBUG and sd_load(lock) != claimed:
        sd_abort("released a lock word this process does not hold")
    sd_store(lock, _compose(sd_me_pid, _next_stable(claimed & SD_SEQ_MASK)))


cdef inline bint _expired(uint64_t expires, uint64_t now) noexcept nogil:
    return expires != 0 and expires <= now


cdef inline void _copy_in(uint64_t* words, const unsigned char* src, Py_ssize_t n) noexcept nogil:
    # whole words, zero-padded, each an atomic store: a reader never sees half a word
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while n > 0:
        w = 0
        memcpy(&w, src + 8 * i, 8 if n >= 8 else n)
        sd_store_relaxed(&words[i], w)
        n -= 8
        i += 1


cdef inline void _copy_out(uint64_t* words, unsigned char* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while n > 0:
        w = sd_load_relaxed(&words[i])
        memcpy(dst + 8 * i, &w, 8 if n >= 8 else n)
        n -= 8
        i += 1


cdef uint64_t _expiry(double ttl, uint64_t now) except? 0:
    if not isfinite(ttl) or ttl < 0:
        raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl}")
    if ttl == 0:
        return 0
    if ttl > 1e10:
        raise ValueError(f"ttl of {ttl} s is too large")
    return now + max(<uint64_t>1, <uint64_t>ceil(ttl * 1000.0))


cdef object _number(int vtype, uint64_t word):
    cdef double d
    if vtype == T_INT:
        return <int64_t>word
    memcpy(&d, &word, 8)
    return d


cdef class SharedDict:
    """A fixed-capacity key/value table in an anonymous shared mapping; create it before fork.

    Keys are 1..key_max bytes (str is UTF-8 encoded); values are bytes (<= value_max), int
    (int64) or float. Each key lives within `probe_window` slots of its home slot; when those
    are all taken, `set` evicts the entry that expires soonest, else the least recently written.
    """

    def __init__(self, Py_ssize_t capacity, Py_ssize_t key_max=64, Py_ssize_t value_max=256,
                 Py_ssize_t probe_window=32) -> None:
        if capacity < 1:
            raise ValueError("a shared dict needs a capacity of at least one entry")
        if not 1 <= key_max <= 0xFFFF:
            raise ValueError(f"key_max must be 1..65535 bytes, got {key_max}")
        if not 0 <= value_max <= 1 << 24:
            raise ValueError(f"value_max must be 0..16777216 bytes, got {value_max}")
        if probe_window < 1:
            raise ValueError("probe_window must be at least 1")
        self.capacity = capacity
        self.key_max = key_max
        self.value_max = value_max
        self.probe_window = min(probe_window, capacity)
        self._key_words = (key_max + 7) // 8
        self._slot_words = SD_FIXED_WORDS + self._key_words + (value_max + 7) // 8
        self.size = (SD_HEADER_WORDS + 2 * capacity + capacity * self._slot_words) * 8
        # MAP_SHARED | MAP_ANONYMOUS: inherited across fork, nothing to unlink, zero-filled
        # (all slots EMPTY, all lock words stable).
        self._mmap = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED)
        self._view = self._mmap
        self._header = <uint64_t*>&self._view[0]
        self._locks = self._header + SD_HEADER_WORDS
        self._slots = self._locks + 2 * capacity
        self._header[H_VERSION] = LAYOUT_VERSION
        self._header[H_CAPACITY] = <uint64_t>capacity
        self._header[H_KEY_MAX] = <uint64_t>key_max
        self._header[H_VALUE_MAX] = <uint64_t>value_max
        self._header[H_WINDOW] = <uint64_t>self.probe_window
        self._header[H_SLOT_WORDS] = <uint64_t>self._slot_words
        sd_store(&self._header[H_MAGIC], MAGIC)

    # ---- low level: every function below runs without Python and never fails ----

    cdef inline uint64_t* _slot(self, Py_ssize_t index) noexcept nogil:
        return self._slots + index * self._slot_words

    cdef void _snapshot(self, uint64_t* slot, SlotRead* out) noexcept nogil:
        """Copy a slot's fixed words at a stable lock word; the caller validates with out.lock."""
        cdef uint64_t seen
        while True:
            seen = sd_load(&slot[LOCK])
            if seen & 3:
                self._wait(&slot[LOCK], slot, seen)
                continue
            out.lock = seen
            out.meta = sd_load_relaxed(&slot[META])
            out.hash = sd_load_relaxed(&slot[HASH])
            out.expires = sd_load_relaxed(&slot[EXPIRES])
            out.written = sd_load_relaxed(&slot[WRITTEN])
            out.value = sd_load_relaxed(&slot[VALUE])
            return

    cdef bint _key_equals(self, uint64_t* slot, const unsigned char* key, Py_ssize_t key_len) noexcept nogil:
        cdef uint64_t* words = slot + SD_FIXED_WORDS
        cdef Py_ssize_t i = 0
        cdef uint64_t w
        while key_len > 0:
            w = 0
            memcpy(&w, key + 8 * i, 8 if key_len >= 8 else key_len)
            if sd_load_relaxed(&words[i]) != w:
                return False
            key_len -= 8
            i += 1
        return True

    cdef Py_ssize_t _find(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h,
                          SlotRead* out) noexcept nogil:
        """Index of the slot holding `key` (live or expired) and a consistent copy of it, or -1."""
        cdef Py_ssize_t index = <Py_ssize_t>(h % <uint64_t>self.capacity)
        cdef Py_ssize_t step
        cdef uint64_t* slot
        cdef bint matched
        cdef uint64_t state
        if key_len < 1 or key_len > self.key_max:
            return -1
        for step in range(self.probe_window):
            slot = self._slot(index)
            while True:
                self._snapshot(slot, out)
                state = out.meta & 3
                matched = (state == ST_LIVE and out.hash == h and <Py_ssize_t>((out.meta >> 16) & 0xFFFF) == key_len
                         and self._key_equals(slot, key, key_len))
                sd_fence_acquire()
                if sd_load_relaxed(&slot[LOCK]) == out.lock:
                    break
            if matched:
                return index
            if state == ST_EMPTY:
                return -1  # an EMPTY slot never held anything: the key cannot be further on
            index += 1
            if index == self.capacity:
                index = 0
        return -1

    cdef void _wait(self, uint64_t* lock, uint64_t* slot, uint64_t seen) noexcept nogil:
        """Wait until the odd lock word `seen` changes; take it back if its owner died."""
        cdef int spins = 0
        cdef uint64_t started = 0, next_check = 0, now, owner
        cdef int mismatch
        while sd_load(lock) == seen:
            if spins < 100:
                spins += 1
                sd_cpu_relax()
                continue
            sd_yield()
            now = sd_clock_ms()  # the real clock: a frozen test clock must not stall recovery
            if started == 0:
                started = now
                next_check = now + FIRST_CHECK_MS
                continue
            if now < next_check:
                continue
            next_check = now + RECHECK_MS
            owner = seen >> SD_PID_SHIFT
            # This process holds no claim while it waits, so an odd word signed with its own
            # pid was left by an earlier process that had the same pid.
            if owner != sd_me_pid and sd_pid_alive(owner, sd_load_relaxed(lock + 1), &mismatch):
                if not mismatch or now - started < PID_REUSE_GRACE_MS:
                    continue
            self._recover(lock, slot, seen)
            return

    cdef void _recover(self, uint64_t* lock, uint64_t* slot, uint64_t seen) noexcept nogil:
        """Take back a lock word left odd by a dead process (whoever wins the CAS does it)."""
        cdef uint64_t seq = seen & SD_SEQ_MASK
        cdef uint64_t mine
        if seq & 3 == CLAIM_WORD:
            # a one-word write: every word is valid at every instant, keep the content
            if sd_cas(lock, seen, _compose(sd_me_pid, _next_stable(seq))):
                sd_fetch_add(&self._header[H_RECOVERED], 1)
            return
        # A full write may have been cut anywhere: own the slot (still odd), discard it.
        mine = _compose(sd_me_pid, seq + 4)
        if not sd_cas(lock, seen, mine):
            return
        sd_fence_release()
        sd_store_relaxed(lock + 1, sd_me_start)
        if slot != NULL:
            sd_store_relaxed(&slot[META], ST_TOMB)
            sd_store_relaxed(&slot[HASH], 0)
            sd_store_relaxed(&slot[EXPIRES], 0)
        _release(lock, mine)
        sd_fetch_add(&self._header[H_RECOVERED], 1)

    cdef bint _claim(self, uint64_t* lock, uint64_t expected, int kind, uint64_t* claimed) noexcept nogil:
        """Own a lock word if it still is `expected` (stable), so what was read there still holds."""
        cdef uint64_t mine = _compose(sd_me_pid, (expected & SD_SEQ_MASK) + <uint64_t>kind)
        if not sd_cas(lock, expected, mine):
            return False
        sd_fence_release()  # the writes that follow are seen only with the odd word (seqlock)
        sd_store_relaxed(lock + 1, sd_me_start)
        claimed[0] = mine
        return True

    cdef uint64_t _lock_insert(self, uint64_t* lock) noexcept nogil:
        cdef uint64_t seen, claimed
        while True:
            seen = sd_load(lock)
            if seen & 3:
                self._wait(lock, NULL, seen)
            elif self._claim(lock, seen, CLAIM_FULL, &claimed):
                return claimed

    cdef void _fill(self, uint64_t* slot, const unsigned char* key, Py_ssize_t key_len, uint64_t h,
                    int vtype, uint64_t vword, const unsigned char* vbytes, Py_ssize_t vlen,
                    uint64_t expires, uint64_t now) noexcept nogil:
        if RINGGATE_DEBUG and (key_len > self.key_max or vlen > self.value_max or (sd_load(&slot[LOCK]) & 3) != CLAIM_FULL):
            sd_abort("fill outside a full claim or past the slot")
        sd_store_relaxed(&slot[META], ST_LIVE | (<uint64_t>vtype << 2) | (<uint64_t>key_len << 16) | (<uint64_t>vlen << 32))
        sd_store_relaxed(&slot[HASH], h)
        sd_store_relaxed(&slot[EXPIRES], expires)
        sd_store_relaxed(&slot[WRITTEN], now)
        sd_store_relaxed(&slot[VALUE], vword)
        _copy_in(slot + SD_FIXED_WORDS, key, key_len)
        if vtype == T_BYTES:
            _copy_in(slot + SD_FIXED_WORDS + self._key_words, vbytes, vlen)

    cdef int _write(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h, int vtype,
                    uint64_t vword, const unsigned char* vbytes, Py_ssize_t vlen, uint64_t expires,
                    int flags, uint64_t now) noexcept nogil:
        cdef SlotRead r
        cdef Py_ssize_t index
        cdef uint64_t* slot
        cdef uint64_t* lock
        cdef uint64_t claimed, held
        cdef int outcome
        while True:
            index = self._find(key, key_len, h, &r)
            if index >= 0:
                # the key has its slot: update in place, no insert lock needed
                if not _expired(r.expires, now):
                    if not flags & F_OVERWRITE:
                        return W_EXISTS
                elif not flags & F_INSERT:
                    return W_MISSING
                slot = self._slot(index)
                if not self._claim(&slot[LOCK], r.lock, CLAIM_FULL, &claimed):
                    continue
                self._fill(slot, key, key_len, h, vtype, vword, vbytes, vlen, expires, now)
                _release(&slot[LOCK], claimed)
                return W_OK
            if not flags & F_INSERT:
                return W_MISSING
            # a new key: only under its home bucket's insert lock, so it never lands twice
            lock = self._locks + 2 * <Py_ssize_t>(h % <uint64_t>self.capacity)
            held = self._lock_insert(lock)
            outcome = self._insert_locked(key, key_len, h, vtype, vword, vbytes, vlen, expires, flags, now)
            _release(lock, held)
            if outcome != W_RETRY:
                return outcome

    cdef int _insert_locked(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h, int vtype,
                            uint64_t vword, const unsigned char* vbytes, Py_ssize_t vlen,
                            uint64_t expires, int flags, uint64_t now) noexcept nogil:
        cdef SlotRead r
        cdef Py_ssize_t index, step, target, victim
        cdef uint64_t* slot
        cdef uint64_t claimed, target_lock = 0, victim_lock = 0
        cdef uint64_t rank_ttl, rank_time, best_ttl = 0, best_time = 0
        if self._find(key, key_len, h, &r) >= 0:
            return W_RETRY  # inserted meanwhile by another process: update it instead
        while True:
            index = <Py_ssize_t>(h % <uint64_t>self.capacity)
            target = -1
            victim = -1
            for step in range(self.probe_window):
                slot = self._slot(index)
                while True:
                    self._snapshot(slot, &r)
                    sd_fence_acquire()
                    if sd_load_relaxed(&slot[LOCK]) == r.lock:
                        break
                if (r.meta & 3) != ST_LIVE or _expired(r.expires, now):
                    # the first free slot (lookups rely on it: nothing EMPTY before a key)
                    target = index
                    target_lock = r.lock
                    break
                # eviction rank: entries with a TTL first, soonest expiry first; then oldest write
                rank_ttl = 0 if r.expires else 1
                rank_time = r.expires if r.expires else r.written
                if victim < 0 or rank_ttl < best_ttl or (rank_ttl == best_ttl and rank_time < best_time):
                    victim = index
                    victim_lock = r.lock
                    best_ttl = rank_ttl
                    best_time = rank_time
                index += 1
                if index == self.capacity:
                    index = 0
            if target < 0:
                if not flags & F_EVICT:
                    sd_fetch_add(&self._header[H_FULL_ERRORS], 1)
                    return W_FULL
                if victim < 0:
                    return W_NO_VICTIM
                target = victim
                target_lock = victim_lock
            slot = self._slot(target)
            if not self._claim(&slot[LOCK], target_lock, CLAIM_FULL, &claimed):
                continue  # changed since we looked: look again
            self._fill(slot, key, key_len, h, vtype, vword, vbytes, vlen, expires, now)
            _release(&slot[LOCK], claimed)
            if target == victim:
                sd_fetch_add(&self._header[H_EVICTIONS], 1)
            return W_OK

    cdef int _bump(self, const unsigned char* key, Py_ssize_t key_len, uint64_t h, bint int_only,
                   bint delta_is_float, int64_t di, double df, uint64_t now,
                   int* out_type, uint64_t* out_word) noexcept nogil:
        """Add to a live number. A claim of the lock word the value was read at makes it atomic."""
        cdef SlotRead r
        cdef Py_ssize_t index
        cdef uint64_t* slot
        cdef uint64_t claimed, word
        cdef int vtype, kind, new_type
        cdef int64_t isum
        cdef double current, fsum
        while True:
            index = self._find(key, key_len, h, &r)
            if index < 0 or _expired(r.expires, now):
                return SD_INCR_MISSING
            vtype = (r.meta >> 2) & 3
            if vtype == T_BYTES:
                return SD_INCR_NOT_NUMBER
            if vtype == T_INT and not delta_is_float:
                if sd_add_overflows(<int64_t>r.value, di, &isum):
                    return SD_INCR_OVERFLOW
                word = <uint64_t>isum
                new_type = T_INT
                kind = CLAIM_WORD
            else:
                if int_only:
                    return SD_INCR_NOT_INT
                if vtype == T_FLOAT:
                    memcpy(&current, &r.value, 8)
                else:
                    current = <double><int64_t>r.value
                fsum = current + (df if delta_is_float else <double>di)
                memcpy(&word, &fsum, 8)
                new_type = T_FLOAT
                # an int turning into a float changes META too: that is a full write
                kind = CLAIM_WORD if vtype == T_FLOAT else CLAIM_FULL
            slot = self._slot(index)
            if not self._claim(&slot[LOCK], r.lock, kind, &claimed):
                continue  # another write got there first: read again
            sd_store_relaxed(&slot[VALUE], word)
            if kind == CLAIM_FULL:
                sd_store_relaxed(&slot[META], (r.meta & ~(<uint64_t>0xC)) | (<uint64_t>T_FLOAT << 2))
            sd_store_relaxed(&slot[WRITTEN], now)
            _release(&slot[LOCK], claimed)
            out_type[0] = new_type
            out_word[0] = word
            return SD_INCR_OK

    # ---- the request-path counter ----

    cdef int incr_int_nogil(self, const unsigned char* key, Py_ssize_t key_len, int64_t delta,
                            int64_t* result) noexcept nogil:
        cdef int vtype
        cdef uint64_t word
        cdef int status
        _identity()
        status = self._bump(key, key_len, sd_hash(key, key_len), True, False, delta, 0.0, _now_ms(),
                            &vtype, &word)
        if status == SD_INCR_OK:
            result[0] = <int64_t>word
        elif status == SD_INCR_NOT_NUMBER:
            status = SD_INCR_NOT_INT
        return status

    cpdef int64_t incr_int(self, bytes key, int64_t delta=1, object init=None, double init_ttl=0) except? -1:
        """incr() for int entries and int deltas: the counter used per request (rate limiting)."""
        cdef int64_t result, start
        cdef int status
        self._check_key(key)
        if init is not None and (isinstance(init, bool) or not isinstance(init, int)):
            raise TypeError(f"incr_int needs an int init, got {type(init).__name__}")
        while True:
            status = self.incr_int_nogil(key, len(key), delta, &result)
            if status == SD_INCR_OK:
                return result
            if status == SD_INCR_OVERFLOW:
                raise OverflowError(f"incrementing {key!r} by {delta} would overflow int64")
            if status == SD_INCR_NOT_INT:
                self._raise_not_int(key)
            if init is None:
                raise KeyError(f"{key!r} is not in the shared dict and no init was given")
            if sd_add_overflows(<int64_t>init, delta, &start):
                raise OverflowError(f"init {init} + {delta} overflows int64")
            if self._store(key, start, init_ttl, F_INSERT | F_EVICT) == W_OK:
                return start
            # created by another process in the meantime: increment that one

    # ---- Python API ----

    cdef bytes _key(self, object key):
        if isinstance(key, str):
            key = (<str>key).encode("utf-8")
        elif not isinstance(key, bytes):
            if isinstance(key, (bytearray, memoryview)):
                key = bytes(key)
            else:
                raise TypeError(f"keys are bytes or str, got {type(key).__name__}")
        self._check_key(<bytes>key)
        return <bytes>key

    cdef int _check_key(self, bytes key) except -1:
        if key is None:
            raise TypeError("keys are bytes or str, got None")
        if not 1 <= len(key) <= self.key_max:
            raise ValueError(f"keys must be 1..{self.key_max} bytes, got {len(key)}")
        return 0

    cdef _raise_not_int(self, bytes key):
        current = self.get(key)
        if isinstance(current, float):
            raise TypeError(f"{key!r} holds a float; use incr()")
        raise TypeError(f"the value of {key!r} is not a number")

    cdef int _store(self, bytes key, object value, double ttl, int flags) except -1:
        cdef int vtype
        cdef uint64_t vword = 0
        cdef int64_t ivalue
        cdef double fvalue
        cdef bytes data = None
        cdef const unsigned char* vbytes = NULL
        cdef Py_ssize_t vlen = 0
        cdef uint64_t now, expires
        cdef int outcome
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if isinstance(value, bytes):
            data = <bytes>value
            vlen = len(data)
            if vlen > self.value_max:
                raise ValueError(f"value of {vlen} bytes is over this dict's value_max of {self.value_max} bytes")
            vtype = T_BYTES
            vbytes = <const unsigned char*>PyBytes_AS_STRING(data)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"values are bytes, int or float, got {type(value).__name__}")
        elif isinstance(value, int):
            if not -(1 << 63) <= value < (1 << 63):
                raise OverflowError(f"int values must fit in int64, got {value}")
            ivalue = value
            vword = <uint64_t>ivalue
            vtype = T_INT
        else:
            fvalue = value
            memcpy(&vword, &fvalue, 8)
            vtype = T_FLOAT
        _identity()
        now = _now_ms()
        expires = _expiry(ttl, now)
        outcome = self._write(key, len(key), sd_hash(key, len(key)), vtype, vword, vbytes, vlen, expires,
                              flags, now)
        if outcome == W_NO_VICTIM:
            raise SharedDictFull(
                f"shared dict full (capacity {self.capacity} entries): no entry in the probe window "
                f"of {key!r} can be evicted"
            )
        return outcome

    cdef object _read(self, bytes key, uint64_t* expires_out):
        """The value of a live key (None when absent or expired) and its expiry."""
        cdef SlotRead r
        cdef Py_ssize_t index, vlen
        cdef uint64_t* slot
        cdef uint64_t now, h = sd_hash(key, len(key))
        cdef int vtype
        cdef bytes data
        _identity()
        now = _now_ms()
        while True:
            index = self._find(key, len(key), h, &r)
            if index < 0 or _expired(r.expires, now):
                return None
            expires_out[0] = r.expires
            vtype = (r.meta >> 2) & 3
            if vtype != T_BYTES:
                return _number(vtype, r.value)  # copied with the lock word _find validated
            slot = self._slot(index)
            vlen = min(<Py_ssize_t>(r.meta >> 32), self.value_max)
            data = PyBytes_FromStringAndSize(NULL, vlen)
            _copy_out(slot + SD_FIXED_WORDS + self._key_words, <unsigned char*>PyBytes_AS_STRING(data), vlen)
            sd_fence_acquire()
            if sd_load_relaxed(&slot[LOCK]) == r.lock:
                return data
            # rewritten while we copied: read again

    def get(self, key: bytes | str) -> bytes | int | float | None:
        """The value of `key`, or None when it is absent or expired."""
        cdef uint64_t expires
        return self._read(self._key(key), &expires)

    def get_with_ttl(self, key: bytes | str) -> tuple[bytes | int | float | None, float | None]:
        """(value, seconds left) — seconds left is None for an entry that never expires; (None, None) if absent."""
        cdef uint64_t expires = 0
        value = self._read(self._key(key), &expires)
        if value is None or expires == 0:
            return value, None
        return value, max(0, <int64_t>(expires - _now_ms())) / 1000.0

    def set(self, key: bytes | str, value: bytes | int | float, double ttl=0) -> None:
        """Store `value` (ttl seconds, 0 = forever), evicting when the key's window is full."""
        self._store(self._key(key), value, ttl, F_OVERWRITE | F_INSERT | F_EVICT)

    def safe_set(self, key: bytes | str, value: bytes | int | float, double ttl=0) -> bool:
        """Like set, but never evicts: False (and a full_errors count) when there is no room."""
        return self._store(self._key(key), value, ttl, F_OVERWRITE | F_INSERT) == W_OK

    def add(self, key: bytes | str, value: bytes | int | float, double ttl=0) -> bool:
        """Store only if the key is absent or expired; exactly one of concurrent adds wins."""
        return self._store(self._key(key), value, ttl, F_INSERT | F_EVICT) == W_OK

    def safe_add(self, key: bytes | str, value: bytes | int | float, double ttl=0) -> bool:
        """Like add, but never evicts (False and a full_errors count when there is no room)."""
        return self._store(self._key(key), value, ttl, F_INSERT) == W_OK

    def replace(self, key: bytes | str, value: bytes | int | float, double ttl=0) -> bool:
        """Store only if the key is present and not expired."""
        return self._store(self._key(key), value, ttl, F_OVERWRITE) == W_OK

    def delete(self, key: bytes | str) -> bool:
        """Remove `key`; True if a live entry was removed."""
        cdef bytes k = self._key(key)
        cdef SlotRead r
        cdef Py_ssize_t index
        cdef uint64_t* slot
        cdef uint64_t claimed, h = sd_hash(k, len(k))
        _identity()
        while True:
            index = self._find(k, len(k), h, &r)
            if index < 0:
                return False
            slot = self._slot(index)
            if self._claim(&slot[LOCK], r.lock, CLAIM_FULL, &claimed):
                sd_store_relaxed(&slot[META], ST_TOMB)
                _release(&slot[LOCK], claimed)
                return not _expired(r.expires, _now_ms())

    def incr(self, key: bytes | str, delta: int | float = 1, init: int | float | None = None,
             double init_ttl=0) -> int | float:
        """Add `delta` to a number; create it as init + delta (with init_ttl) when absent.

        KeyError when absent and init is None; TypeError when the value is bytes.
        int + int stays an int64 (OverflowError past it); a float on either side gives a float.
        """
        cdef bytes k = self._key(key)
        cdef bint delta_is_float
        cdef int64_t di = 0
        cdef double df = 0
        cdef int status, vtype
        cdef uint64_t word, h = sd_hash(k, len(k))
        for name, number in (("delta", delta), ("init", init)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
                raise TypeError(f"{name} must be an int or a float, got {type(number).__name__}")
        delta_is_float = isinstance(delta, float)
        if delta_is_float:
            df = delta
        else:
            di = delta  # OverflowError past int64
        _identity()
        while True:
            status = self._bump(k, len(k), h, False, delta_is_float, di, df, _now_ms(), &vtype, &word)
            if status == SD_INCR_OK:
                return _number(vtype, word)
            if status == SD_INCR_NOT_NUMBER:
                raise TypeError(f"the value of {k!r} is not a number")
            if status == SD_INCR_OVERFLOW:
                raise OverflowError(f"incrementing {k!r} by {delta} would overflow int64")
            if init is None:
                raise KeyError(f"{k!r} is not in the shared dict and no init was given")
            start = init + delta
            if self._store(k, start, init_ttl, F_INSERT | F_EVICT) == W_OK:
                return start
            # created by another process in the meantime: increment that one

    def expire(self, key: bytes | str, double ttl) -> bool:
        """Set a live key's TTL (seconds from now, 0 = never); False when absent or expired."""
        cdef bytes k = self._key(key)
        cdef SlotRead r
        cdef Py_ssize_t index
        cdef uint64_t* slot
        cdef uint64_t claimed, now, expires, h = sd_hash(k, len(k))
        _identity()
        now = _now_ms()
        expires = _expiry(ttl, now)
        while True:
            index = self._find(k, len(k), h, &r)
            if index < 0 or _expired(r.expires, now):
                return False
            slot = self._slot(index)
            if self._claim(&slot[LOCK], r.lock, CLAIM_WORD, &claimed):
                sd_store_relaxed(&slot[EXPIRES], expires)
                _release(&slot[LOCK], claimed)
                return True

    def flush_expired(self, Py_ssize_t max_count=0) -> int:
        """Turn expired entries into free slots (at most max_count, 0 = all); how many were."""
        cdef SlotRead r
        cdef Py_ssize_t index, flushed = 0
        cdef uint64_t* slot
        cdef uint64_t claimed, now
        _identity()
        now = _now_ms()
        for index in range(self.capacity):
            if max_count > 0 and flushed >= max_count:
                break
            slot = self._slot(index)
            while True:
                self._snapshot(slot, &r)
                if (r.meta & 3) != ST_LIVE or not _expired(r.expires, now):
                    break
                # the claim succeeds only if the slot is still what we read
                if self._claim(&slot[LOCK], r.lock, CLAIM_FULL, &claimed):
                    sd_store_relaxed(&slot[META], ST_TOMB)
                    _release(&slot[LOCK], claimed)
                    flushed += 1
                    break
        return flushed

    cdef Py_ssize_t _count_live(self) noexcept:
        cdef SlotRead r
        cdef Py_ssize_t index, live = 0
        cdef uint64_t* slot
        cdef uint64_t now = _now_ms()
        for index in range(self.capacity):
            slot = self._slot(index)
            while True:
                self._snapshot(slot, &r)
                sd_fence_acquire()
                if sd_load_relaxed(&slot[LOCK]) == r.lock:
                    break
            if (r.meta & 3) == ST_LIVE and not _expired(r.expires, now):
                live += 1
        return live

    def free_slots(self) -> int:
        """Slots not holding a live entry (expired entries count as free: they are reused)."""
        _identity()
        return self.capacity - self._count_live()

    def keys(self, Py_ssize_t max_count=1024) -> list[bytes]:
        """Live keys in slot order, at most max_count (0 = all)."""
        cdef SlotRead r
        cdef Py_ssize_t index, key_len
        cdef uint64_t* slot
        cdef uint64_t now
        cdef bytes key
        cdef list found = []
        _identity()
        now = _now_ms()
        for index in range(self.capacity):
            if max_count > 0 and len(found) >= max_count:
                break
            slot = self._slot(index)
            while True:
                self._snapshot(slot, &r)
                if (r.meta & 3) != ST_LIVE or _expired(r.expires, now):
                    key = None
                else:
                    key_len = min(<Py_ssize_t>((r.meta >> 16) & 0xFFFF), self.key_max)
                    key = PyBytes_FromStringAndSize(NULL, key_len)
                    _copy_out(slot + SD_FIXED_WORDS, <unsigned char*>PyBytes_AS_STRING(key), key_len)
                sd_fence_acquire()
                if sd_load_relaxed(&slot[LOCK]) == r.lock:
                    break
            if key is not None:
                found.append(key)
        return found

    def stats(self) -> dict:
        """capacity, used (live entries), evictions, full_errors, recovered (lock words taken back
        from dead writers), and the layout figures probe_window and size."""
        _identity()
        return {
            "capacity": self.capacity,
            "used": self._count_live(),
            "evictions": sd_load_relaxed(&self._header[H_EVICTIONS]),
            "full_errors": sd_load_relaxed(&self._header[H_FULL_ERRORS]),
            "recovered": sd_load_relaxed(&self._header[H_RECOVERED]),
            "probe_window": self.probe_window,
            "size": self.size,
        }

    def _abandon_claim_for_tests(self, key: bytes | str, str what="full") -> None:
        """Test only: claim `key`'s slot ("full" or "word" write) or its insert lock ("insert_lock")
        and never release it, as a process killed there would. Call it in a child that then exits."""
        cdef bytes k = self._key(key)
        cdef SlotRead r
        cdef Py_ssize_t index
        cdef uint64_t claimed, h = sd_hash(k, len(k))
        _identity()
        if what == "insert_lock":
            self._lock_insert(self._locks + 2 * <Py_ssize_t>(h % <uint64_t>self.capacity))
            return
        if what not in ("full", "word"):
            raise ValueError(what)
        index = self._find(k, len(k), h, &r)
        if index < 0:
            raise KeyError(k)
        if not self._claim(&self._slot(index)[LOCK], r.lock, CLAIM_FULL if what == "full" else CLAIM_WORD, &claimed):
            raise RuntimeError("the slot changed under the test")
        if what == "full":
            sd_store_relaxed(&self._slot(index)[VALUE], 0xDEAD)  # half a write: must never be read

    def __repr__(self) -> str:
        return (f"<SharedDict capacity={self.capacity} key_max={self.key_max} value_max={self.value_max} "
                f"size={self.size}>")
