# The node-wide shared memory arena (like nginx's lua_shared_dict), small for now:
# a header and one stats block per worker slot plus a "retired" block.
#
# Layout (all fields uint64, little-endian host order, 8-byte aligned):
#   header   HEADER_WORDS words: magic, layout version, config generation, slot count,
#            retired-block seqlock
#   blocks   (slots + 1) blocks of BLOCK_WORDS words; block `slots` is the retired total.
#
# Write-path contract:
#   - a worker slot block is written only by the worker that owns the slot (single
#     writer), with relaxed atomic stores so a reader never sees a torn word;
#   - the retired block and the slot of a dead worker are written only by the master,
#     inside the retired seqlock (odd while folding), so a reader retries instead of
#     counting a dead worker twice or not at all;
#   - the generation word is written only by the master (atomic store) and read by
#     everyone.
from libc.stdint cimport uint64_t

cdef enum:
    HEADER_WORDS = 8
    BLOCK_WORDS = 16

cdef class WorkerStats:
    cdef uint64_t* _words
    cdef object _owner          # keeps the arena (and its mmap) alive
    cdef inline void add(self, int field, uint64_t amount) noexcept nogil
    cpdef void incr(self, int field, uint64_t amount=*)
    cpdef void decr(self, int field, uint64_t amount=*)
    cpdef void record_response(self, int status, uint64_t bytes_in, uint64_t bytes_out)
    cpdef uint64_t get(self, int field)

cdef class Arena:
    cdef object _mmap
    cdef unsigned char[::1] _view
    cdef uint64_t* _header
    cdef uint64_t* _blocks
    cdef readonly int slots
    cdef readonly Py_ssize_t size
    cdef uint64_t* _block(self, int slot) except NULL
