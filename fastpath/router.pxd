# Layout of the router's extension types (see router.pyx for the behaviour).
#
# Contract: every object here is immutable once Router.__init__ returns, so a
# Router can be shared by all requests of a worker and swapped whole on reload.
# Nothing here does I/O or imports from ringgate/ or workers/.

cimport cython


cdef class RouteSpec:
    # One Kong route as the router sees it, plus the pieces compiled from it once
    # (regexes, lowercased host keys, header rules). Public fields keep the
    # values as configured; empty sequences are stored as None ("not set").
    cdef readonly str id
    cdef readonly object name
    cdef readonly tuple hosts
    cdef readonly tuple paths
    cdef readonly tuple methods
    cdef readonly dict headers
    cdef readonly object regex_priority
    cdef readonly bint strip_path
    cdef readonly bint preserve_host
    cdef readonly str path_handling
    cdef readonly object service_path
    cdef readonly tuple protocols
    cdef readonly tuple snis
    cdef readonly object payload

    cdef tuple _path_regexes      # per path: compiled pattern, or None for a prefix
    cdef frozenset _method_set    # None when methods are not set
    cdef tuple _header_rules      # tuple of _HeaderRule, None when headers are not set
    cdef tuple _host_keys         # tuple of (kind, key, port); port -1 = any port
    cdef bint _plain_hosts_only
    cdef str _upstream_base       # service_path or "/"
    cdef bint _v1
    # snis (lowercased, trailing dot dropped): exact names, "*.a.com" as ".a.com", "a.*" as "a."
    cdef bint _has_snis
    cdef frozenset _sni_exact
    cdef tuple _sni_suffixes
    cdef tuple _sni_prefixes


cdef class _HeaderRule:
    # One configured header: the request value (lowercased) must equal one of
    # `values` or be found by one of the case-insensitive `searches`.
    cdef str name
    cdef frozenset values
    cdef tuple searches           # bound Pattern.search methods


cdef class _Entry:
    # One (route, path) pair, the unit Kong's compat router orders by priority.
    # rank is its position in the global priority order: lower rank wins.
    cdef RouteSpec spec
    cdef Py_ssize_t rank
    cdef object path              # the path as configured ("/fee", "~/v\d+"), or None
    cdef str prefix               # prefix entries only
    cdef object regex_match       # bound Pattern.match for regex entries, else None
    cdef frozenset methods
    cdef tuple header_rules
    cdef tuple priority           # Kong compat priority, as a tuple (higher first)


cdef class _Bucket:
    # The entries reachable through one host key (or the host-less ones).
    # Every tuple of entries is sorted by rank; `lengths` holds the distinct
    # prefix lengths of `prefixes`, longest first.
    cdef dict prefixes            # prefix str -> tuple of _Entry
    cdef Py_ssize_t* lengths
    cdef Py_ssize_t* length_min_ranks  # best rank among the prefixes of lengths[i]
    cdef Py_ssize_t n_lengths
    cdef tuple regexes            # tuple of _Entry, or None
    cdef tuple pathless           # tuple of _Entry, or None
    cdef Py_ssize_t min_rank      # best rank in the bucket, to skip it early


cdef class _HostTable:
    # Buckets keyed by a host key: an exact host, a ".suffix" or a "prefix.".
    cdef dict plain               # key -> _Bucket (route host without a port)
    cdef dict ported              # key -> {listen port (int) -> _Bucket}


@cython.final
cdef class RouteMatch:
    # The result of Router.match. While matching it doubles as the scratch
    # state (best entry so far), so a request allocates nothing else.
    cdef readonly RouteSpec spec
    cdef readonly object payload
    cdef readonly dict captures
    cdef readonly str normalized_path
    cdef readonly object matched_path
    cdef readonly object stripped_prefix
    cdef readonly str upstream_path

    cdef _Entry _best
    cdef Py_ssize_t _best_rank
    cdef object _best_regex_match
    cdef object _sni             # the client's SNI over TLS ("" if none), None for plain http


@cython.final
cdef class Router:
    # Immutable match table over a list of RouteSpec (see router.pyx).
    cdef readonly frozenset header_names
    cdef Py_ssize_t _n_routes
    cdef Py_ssize_t _n_entries
    cdef _HostTable _exact
    cdef _HostTable _suffix       # "*.a.com" stored as ".a.com"
    cdef _HostTable _wprefix      # "a.*" stored as "a."
    cdef _Bucket _hostless
    cdef bint _has_ports

    cpdef RouteMatch match(self, str method, str host, str raw_path, object headers, int listen_port,
                           object sni=*)
    cdef int _probe(self, _HostTable table, str key, object port, RouteMatch res,
                    str method, str path, object headers) except -1
