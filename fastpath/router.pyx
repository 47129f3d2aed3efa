# cython: language_level=3
"""Route matching with Kong's `traditional_compatible` semantics.

A Router is built once per config from RouteSpec objects and then only read:
`Router.match(method, host, raw_path, headers, listen_port, sni)` normalizes
the path the way Kong does, finds the highest-priority route that matches, and
computes the upstream path. The module does no I/O and imports nothing from
the rest of Ringgate.

How a match stays cheap with many routes: every (route, path) entry gets a
global rank from Kong's priority order. Entries are filed in buckets by host
key (exact host, "*.suffix", "prefix.*", or host-less), and inside a bucket by
prefix string. A request probes only its own host's buckets, and in each
bucket only the prefix lengths that exist; candidate lists are sorted by rank,
so the search can stop at the first match in each list and skip anything
ranked below the best match found so far.

Two choices differ from Kong on purpose: equal priorities go to the route
declared first (Kong uses the higher UUID), and hosts are compared lowercased.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8

import re

cdef extern from *:
    """
    #ifndef RINGGATE_DEBUG
    #define RINGGATE_DEBUG 0
    #endif
    """
    int RINGGATE_DEBUG

cdef extern from "Python.h":
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    Py_UCS4 PyUnicode_READ(int kind, void* data, Py_ssize_t index) nogil


class RouterError(ValueError):
    """A route that cannot be compiled (bad regex, bad host, bad option)."""


# Host key kinds, the first item of RouteSpec._host_keys tuples.
cdef enum:
    HOST_EXACT = 0
    HOST_SUFFIX = 1     # "*.a.com", stored as ".a.com"
    HOST_PREFIX = 2     # "a.*", stored as "a."

# ---------------------------------------------------------------------------
# Byte tables for normalization and escaping

cdef unsigned char _RESERVED[256]   # stays %-encoded when normalizing
cdef unsigned char _SAFE[128]       # sent unescaped upstream
cdef unsigned char _HEXVAL[256]     # hex digit value, 255 = not a hex digit
cdef const char* _HEX = b"0123456789ABCDEF"


cdef void _init_tables() noexcept:
    cdef int i
    cdef unsigned char c
    for i in range(256):
        _RESERVED[i] = 0
        _HEXVAL[i] = 255
    for i in range(128):
        _SAFE[i] = 0
    for c in b"!*'();:@&=+$,/?%#[]":
        _RESERVED[c] = 1
    for c in b"!#$&'()*+,/:;=?@[]-_.~%":
        _SAFE[c] = 1
    for i in range(10):
        _HEXVAL[48 + i] = i
        _SAFE[48 + i] = 1
    for i in range(26):
        _SAFE[65 + i] = 1
        _SAFE[97 + i] = 1
    for i in range(6):
        _HEXVAL[65 + i] = 10 + i
        _HEXVAL[97 + i] = 10 + i


_init_tables()


# ---------------------------------------------------------------------------
# Path normalization (kong/tools/uri.lua normalize(uri, merge_slashes=true))

cdef inline int _needs_work(str path, bint stop_at_percent) except -1:
    """0: already normal; 1: has dot-segments or "//"; 2: has '%' (when asked)."""
    cdef Py_ssize_t n = len(path)
    cdef Py_ssize_t i
    cdef int kind = PyUnicode_KIND(path)
    cdef void* data = PyUnicode_DATA(path)
    cdef Py_UCS4 c
    cdef int result = 0
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c == u'%':
            if stop_at_percent:
                return 2
        elif c == u'/' and result == 0 and i + 1 < n:
            c = PyUnicode_READ(kind, data, i + 1)
            if c == u'/':
                result = 1
            elif c == u'.':
                if i + 2 == n:
                    result = 1
                else:
                    c = PyUnicode_READ(kind, data, i + 2)
                    if c == u'/':
                        result = 1
                    elif c == u'.' and (i + 3 == n or PyUnicode_READ(kind, data, i + 3) == u'/'):
                        result = 1
            if result and not stop_at_percent:
                return result
    return result


cdef str _percent_decode(str raw):
    """Decode %XX except reserved characters (kept, hex uppercased); bytes are UTF-8."""
    cdef bytes src = raw.encode("utf-8", "surrogateescape")
    cdef const unsigned char* s = src
    cdef Py_ssize_t n = len(src)
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t o = 0
    cdef unsigned char c, hi, lo, value
    cdef char* out = <char*>PyMem_Malloc(n + 1)
    if out == NULL:
        raise MemoryError()
    try:
        while i < n:
            c = s[i]
            if c != 37:  # '%'
                out[o] = <char>c
                o += 1
                i += 1
                continue
            if i + 2 >= n:
                raise ValueError(f"malformed percent-encoding in path: {raw!r}")
            hi = _HEXVAL[s[i + 1]]
            lo = _HEXVAL[s[i + 2]]
            if hi == 255 or lo == 255:
                raise ValueError(f"malformed percent-encoding in path: {raw!r}")
            value = hi * 16 + lo
            if _RESERVED[value]:
                out[o] = b'%'
                out[o + 1] = _HEX[hi]
                out[o + 2] = _HEX[lo]
                o += 3
            else:
                out[o] = <char>value
                o += 1
            i += 3
        return PyUnicode_DecodeUTF8(out, o, "surrogateescape")
    finally:
        PyMem_Free(out)


cdef str _remove_dot_segments(str path):
    """RFC 3986 dot-segment removal with "//" merged; path starts with '/'."""
    cdef list out = []
    cdef Py_ssize_t n = len(path)
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j
    cdef str segment
    while i < n:
        j = path.find(u"/", i + 1)
        if j < 0:
            j = n
        segment = path[i + 1:j]
        if segment == u"..":
            if out:
                out.pop()
            if j == n:
                out.append(u"/")
        elif segment == u"." or segment == u"":
            # "/a/." and "/a/" keep their trailing slash; inner ones vanish
            if j == n:
                out.append(u"/")
        else:
            out.append(path[i:j])
        i = j
    if not out:
        return u"/"
    return u"".join(out)


cdef str _normalize(str raw):
    if raw is None:
        raise TypeError("path must be a str, not None")
    if len(raw) == 0 or raw[0] != u'/':
        raise ValueError(f"path must start with '/': {raw!r}")
    cdef int work = _needs_work(raw, True)
    if work == 0:
        return raw
    cdef str path = raw
    if work == 2:
        path = _percent_decode(raw)
        if _needs_work(path, False) == 0:
            return path
    path = _remove_dot_segments(path)
    if RINGGATE_DEBUG:
        if path[0] != u'/' or _needs_work(path, False) != 0:
            raise AssertionError(f"normalize_path left {path!r} unnormalized")
    return path


def normalize_path(raw: str) -> str:
    """Kong's request path normalization (query string already removed).

    Decodes %XX except the reserved set (those stay encoded, hex uppercased),
    reads the decoded bytes as UTF-8 (surrogateescape keeps invalid bytes),
    resolves dot-segments and merges "//". Raises ValueError on a malformed
    escape or a path that does not start with "/".
    """
    return _normalize(raw)


# ---------------------------------------------------------------------------
# Upstream path: escaping and joining (kong/router/utils.lua)

cdef str _escape_slow(str path):
    cdef bytes src = path.encode("utf-8", "surrogateescape")
    cdef const unsigned char* s = src
    cdef Py_ssize_t n = len(src)
    cdef Py_ssize_t i
    cdef Py_ssize_t o = 0
    cdef unsigned char c
    cdef char* out = <char*>PyMem_Malloc(3 * n + 1)
    if out == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            c = s[i]
            if c < 128 and _SAFE[c]:
                out[o] = <char>c
                o += 1
            else:
                out[o] = b'%'
                out[o + 1] = _HEX[c >> 4]
                out[o + 2] = _HEX[c & 15]
                o += 3
        return PyUnicode_DecodeASCII(out, o, NULL)
    finally:
        PyMem_Free(out)


cdef inline str _escape(str path):
    cdef Py_ssize_t n = len(path)
    cdef Py_ssize_t i
    cdef int kind = PyUnicode_KIND(path)
    cdef void* data = PyUnicode_DATA(path)
    cdef Py_UCS4 c
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c >= 128 or not _SAFE[c]:
            return _escape_slow(path)
    return path


def escape_upstream_path(path: str) -> str:
    """%XX-escape (UTF-8, surrogateescape) every character outside Kong's safe set."""
    return _escape(path)


cdef inline str _sanitize_postfix(str postfix):
    # a postfix must not climb out of the service path
    if postfix == u"." or postfix == u"..":
        return u""
    if postfix.startswith(u"./"):
        return postfix[2:]
    if postfix.startswith(u"../"):
        return postfix[3:]
    return postfix


cdef inline bint _ends_with_slash(str s):
    return len(s) > 0 and s[len(s) - 1] == u'/'


cdef inline bint _starts_with_slash(str s):
    return len(s) > 0 and s[0] == u'/'


cdef str _join_v0(str base, str postfix, str req, bint strip):
    if _ends_with_slash(base):
        if not strip:
            return base + req[1:]
        if len(postfix) == 0:
            if base == u"/":
                return u"/"
            return base if _ends_with_slash(req) else base[:len(base) - 1]
        if postfix[0] == u'/':
            return base[:len(base) - 1] + postfix
        return base + postfix
    if not strip:
        return base if req == u"/" else base + req
    if len(postfix) == 0:
        return base + u"/" if (len(req) > 1 and _ends_with_slash(req)) else base
    if postfix[0] == u'/':
        return base + postfix
    return base + u"/" + postfix


cdef str _join_v1(str base, str postfix, str req, bint strip):
    if not strip:
        return base + req[1:]
    if _ends_with_slash(base) and _starts_with_slash(postfix):
        return base[:len(base) - 1] + postfix
    return base + postfix


def upstream_path_v0(base: str, postfix: str, req: str, strip: bool) -> str:
    """Kong's get_upstream_uri_v0: join the service path and the request path."""
    return _join_v0(base, postfix, req, strip)


def upstream_path_v1(base: str, postfix: str, req: str, strip: bool) -> str:
    """Kong's path_handling=v1 join (plain concatenation, one "/" dropped at "//")."""
    return _join_v1(base, postfix, req, strip)


# ---------------------------------------------------------------------------
# Regexes: Kong paths are PCRE, Python's re spells a few things differently

_GROUP_NAME_CLOSERS = {u"<": u">", u"{": u"}", u"'": u"'"}


cdef str _translate_pcre(str pattern):
    """Rewrite PCRE-only spellings into Python's: (?<n>..), (?'n'..), \\k<n>, \\z."""
    cdef list out = []
    cdef Py_ssize_t n = len(pattern)
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j
    cdef bint in_class = False
    cdef str c, following, opener
    while i < n:
        c = pattern[i]
        if c == u"\\":
            if i + 1 >= n:
                out.append(c)  # re reports the dangling backslash
                break
            following = pattern[i + 1]
            opener = pattern[i + 2:i + 3]
            if not in_class and following == u"k" and opener in _GROUP_NAME_CLOSERS:
                j = pattern.find(_GROUP_NAME_CLOSERS[opener], i + 3)
                if j > i + 3:
                    out.append(u"(?P=" + pattern[i + 3:j] + u")")
                    i = j + 1
                    continue
            if not in_class and following == u"z":
                out.append(u"\\Z")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == u"]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == u"[":
            in_class = True
            out.append(c)
            i += 1
            # "[]...]" and "[^]...]": a "]" right after the opening is a member
            if i < n and pattern[i] == u"^":
                out.append(u"^")
                i += 1
            if i < n and pattern[i] == u"]":
                out.append(u"]")
                i += 1
            continue
        if c == u"(" and pattern.startswith(u"(?<", i) and i + 3 < n and pattern[i + 3] not in u"=!":
            out.append(u"(?P<")
            i += 3
            continue
        if c == u"(" and pattern.startswith(u"(?'", i):
            j = pattern.find(u"'", i + 3)
            if j > i + 3:
                out.append(u"(?P<" + pattern[i + 3:j] + u">")
                i = j + 1
                continue
        out.append(c)
        i += 1
    return u"".join(out)


cdef object _compile_pcre(str pattern, int flags):
    try:
        return re.compile(_translate_pcre(pattern), flags)
    except (re.error, OverflowError, RecursionError) as exc:
        raise RouterError(f"invalid regex: '{pattern}' ({exc})") from None


def compile_route_regex(path: str) -> "re.Pattern[str]":
    """Compile a Kong regex path given without its "~"; use pattern.match (anchored)."""
    return _compile_pcre(path, 0)


# ---------------------------------------------------------------------------
# Route specs

cdef tuple _optional_tuple(object values, str field):
    """None or empty -> None; a bare str is refused (it would iterate by character)."""
    if values is None:
        return None
    if isinstance(values, str):
        raise TypeError(f"{field} must be a sequence of str, not a str")
    cdef tuple result = tuple(values)
    for value in result:
        if not isinstance(value, str):
            raise TypeError(f"{field} must contain str values, got {type(value).__name__}")
    return result if result else None


cdef tuple _parse_route_host(str host):
    """Route host -> (kind, lowercased key, port or -1)."""
    cdef str name = host.lower()
    cdef str port_text = u""
    cdef Py_ssize_t j
    cdef int port = -1
    cdef str rest
    if name.startswith(u"["):
        j = name.find(u"]")
        if j < 0:
            raise RouterError(f"invalid host: '{host}'")
        rest = name[j + 1:]
        name = name[:j + 1]
        if rest:
            if rest[0] != u":" or len(rest) == 1:
                raise RouterError(f"invalid host: '{host}'")
            port_text = rest[1:]
    elif name.count(u":") == 1:
        name, _, port_text = name.partition(u":")
        if not port_text:
            raise RouterError(f"invalid host: '{host}'")
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
            raise RouterError(f"invalid port number in host: '{host}'")
        port = int(port_text)
    if not name:
        raise RouterError(f"invalid host: '{host}'")
    stars = name.count(u"*")
    if stars == 0:
        return (HOST_EXACT, name, port)
    if stars > 1:
        raise RouterError("invalid wildcard: must have at most one wildcard")
    if name.startswith(u"*.") and len(name) > 2:
        return (HOST_SUFFIX, name[1:], port)
    if name.endswith(u".*") and len(name) > 2:
        return (HOST_PREFIX, name[:len(name) - 1], port)
    raise RouterError("invalid wildcard: must be placed at leftmost or rightmost label")


@cython.final
cdef class _HeaderRule:
    pass


cdef tuple _compile_header_rules(dict headers):
    cdef list rules = []
    cdef _HeaderRule rule
    cdef list exact, searches
    for name, values in headers.items():
        if not values:
            raise RouterError(f"header '{name}' needs at least one value")
        exact = []
        searches = []
        for value in values:
            if value.startswith(u"~*"):
                searches.append(_compile_pcre(value[2:], re.IGNORECASE).search)
            else:
                exact.append(value.lower())
        rule = _HeaderRule.__new__(_HeaderRule)
        rule.name = name.lower()
        rule.values = frozenset(exact) if exact else None
        rule.searches = tuple(searches) if searches else None
        rules.append(rule)
    return tuple(rules)


cdef class RouteSpec:
    """One route as configured (Kong field names and defaults), compiled for matching.

    Empty sequences mean "not set" and are stored as None. payload is opaque:
    the worker hangs its compiled service there. Raises RouterError for an
    invalid regex (path or "~*" header value), an invalid host or wildcard,
    a header without values, or an unknown path_handling.
    """

    def __init__(self, id: str, name: str | None = None, hosts: "Sequence[str] | None" = None,
                 paths: "Sequence[str] | None" = None, methods: "Sequence[str] | None" = None,
                 headers: "Mapping[str, Sequence[str]] | None" = None, regex_priority: int = 0,
                 strip_path: bool = True, preserve_host: bool = False, path_handling: str = "v0",
                 service_path: str | None = None, protocols: "Sequence[str]" = ("http", "https"),
                 payload: object = None, snis: "Sequence[str] | None" = None) -> None:
        self.id = id
        self.name = name
        self.hosts = _optional_tuple(hosts, "hosts")
        self.paths = _optional_tuple(paths, "paths")
        self.methods = _optional_tuple(methods, "methods")
        self.regex_priority = regex_priority
        self.strip_path = strip_path
        self.preserve_host = preserve_host
        self.path_handling = path_handling
        self.service_path = service_path
        self.protocols = tuple(protocols)
        self.snis = _optional_tuple(snis, "snis")
        self.payload = payload
        _compile_snis(self)

        if path_handling != u"v0" and path_handling != u"v1":
            raise RouterError(f"path_handling must be 'v0' or 'v1', got '{path_handling}'")
        self._v1 = path_handling == u"v1"
        self._upstream_base = service_path or u"/"

        if headers:
            self.headers = {name_: _header_values(name_, values) for name_, values in headers.items()}
            self._header_rules = _compile_header_rules(self.headers)
        else:
            self.headers = None
            self._header_rules = None

        self._method_set = frozenset(self.methods) if self.methods is not None else None

        cdef list regexes = []
        if self.paths is not None:
            for path in self.paths:
                regexes.append(_compile_pcre(path[1:], 0) if path.startswith(u"~") else None)
        self._path_regexes = tuple(regexes)

        cdef list host_keys = []
        self._plain_hosts_only = self.hosts is not None
        if self.hosts is not None:
            for host in self.hosts:
                key = _parse_route_host(host)
                if key[0] != HOST_EXACT:
                    self._plain_hosts_only = False
                if key not in host_keys:
                    host_keys.append(key)
        self._host_keys = tuple(host_keys)

    def __repr__(self) -> str:
        return f"RouteSpec(id={self.id!r}, name={self.name!r})"


cdef void _compile_snis(RouteSpec spec) except *:
    # Kong's compat router: "*.a.com" is a suffix match on ".a.com" (any depth), "a.*" a prefix
    # match on "a.", anything else exact; a trailing dot is dropped (FQDN form).
    cdef list exact = [], suffixes = [], prefixes = []
    spec._has_snis = spec.snis is not None
    for name in spec.snis or ():
        if not isinstance(name, str):
            raise TypeError(f"snis must be str, got {type(name).__name__}")
        name = name.lower()
        if name.endswith(u".*"):
            prefixes.append(name[:len(name) - 1])
            continue
        if len(name) > 1 and name.endswith(u"."):
            name = name[:len(name) - 1]
        if name.startswith(u"*"):
            suffixes.append(name[1:])
        else:
            exact.append(name)
    spec._sni_exact = frozenset(exact)
    spec._sni_suffixes = tuple(suffixes)
    spec._sni_prefixes = tuple(prefixes)


cdef tuple _header_values(object name, object values):
    if not isinstance(name, str):
        raise TypeError(f"header names must be str, got {type(name).__name__}")
    if isinstance(values, str):
        values = (values,)
    cdef tuple result = tuple(values)
    for value in result:
        if not isinstance(value, str):
            raise TypeError(f"header '{name}' values must be str, got {type(value).__name__}")
    return result


# ---------------------------------------------------------------------------
# Match table

@cython.final
cdef class _Entry:
    pass


@cython.final
cdef class _Bucket:
    def __dealloc__(self) -> None:
        PyMem_Free(self.lengths)
        PyMem_Free(self.length_min_ranks)
        self.lengths = NULL
        self.length_min_ranks = NULL


@cython.final
cdef class _HostTable:
    pass


cdef _Entry _make_entry(RouteSpec spec, object path, object regex):
    cdef _Entry entry = _Entry.__new__(_Entry)
    cdef bint has_regex = regex is not None
    entry.spec = spec
    entry.path = path
    entry.methods = spec._method_set
    entry.header_rules = spec._header_rules
    if has_regex:
        entry.regex_match = regex.match
        entry.prefix = None
    else:
        entry.regex_match = None
        entry.prefix = path
    cdef int n_fields = ((spec.methods is not None) + (spec.hosts is not None)
                         + (spec.headers is not None) + (spec.paths is not None) + spec._has_snis)
    # Kong compat's 64-bit priority, kept as a tuple so nothing overflows
    entry.priority = (
        n_fields,
        spec._plain_hosts_only,
        len(spec._header_rules) if spec._header_rules is not None else 0,
        has_regex,
        spec.regex_priority if has_regex else 0,
        len(path) if (path is not None and not has_regex) else 0,
    )
    return entry


cdef _Bucket _make_bucket(list entries):
    """entries must already be in rank order; every list built here stays so."""
    cdef _Bucket bucket = _Bucket.__new__(_Bucket)
    cdef dict prefixes = {}
    cdef list regexes = []
    cdef list pathless = []
    cdef _Entry entry
    for entry in entries:
        if entry.regex_match is not None:
            regexes.append(entry)
        elif entry.prefix is not None:
            prefixes.setdefault(entry.prefix, []).append(entry)
        else:
            pathless.append(entry)
    bucket.prefixes = {prefix: tuple(group) for prefix, group in prefixes.items()}
    bucket.regexes = tuple(regexes) if regexes else None
    bucket.pathless = tuple(pathless) if pathless else None
    bucket.min_rank = (<_Entry>entries[0]).rank
    cdef dict min_rank_by_length = {}
    for prefix, group in prefixes.items():
        rank = (<_Entry>group[0]).rank
        if rank < min_rank_by_length.get(len(prefix), rank + 1):
            min_rank_by_length[len(prefix)] = rank
    lengths = sorted(min_rank_by_length, reverse=True)
    bucket.n_lengths = len(lengths)
    if lengths:
        bucket.lengths = <Py_ssize_t*>PyMem_Malloc(len(lengths) * sizeof(Py_ssize_t))
        bucket.length_min_ranks = <Py_ssize_t*>PyMem_Malloc(len(lengths) * sizeof(Py_ssize_t))
        if bucket.lengths == NULL or bucket.length_min_ranks == NULL:
            raise MemoryError()
        for i, length in enumerate(lengths):
            bucket.lengths[i] = length
            bucket.length_min_ranks[i] = min_rank_by_length[length]
    if RINGGATE_DEBUG:
        _check_bucket(bucket)
    return bucket


cdef void _check_bucket(_Bucket bucket) except *:
    cdef Py_ssize_t i
    groups = list(bucket.prefixes.values())
    if bucket.regexes is not None:
        groups.append(bucket.regexes)
    if bucket.pathless is not None:
        groups.append(bucket.pathless)
    for group in groups:
        ranks = [(<_Entry>entry).rank for entry in group]
        if ranks != sorted(ranks) or ranks[0] < bucket.min_rank:
            raise AssertionError("router bucket not sorted by rank")
    for i in range(1, bucket.n_lengths):
        if bucket.lengths[i] >= bucket.lengths[i - 1]:
            raise AssertionError("router prefix lengths not strictly descending")
    for prefix, group in bucket.prefixes.items():
        for i in range(bucket.n_lengths):
            if bucket.lengths[i] == len(prefix) and bucket.length_min_ranks[i] > (<_Entry>group[0]).rank:
                raise AssertionError("router length_min_ranks above a prefix's best rank")


cdef _HostTable _make_host_table(dict plain, dict ported):
    if not plain and not ported:
        return None
    cdef _HostTable table = _HostTable.__new__(_HostTable)
    table.plain = {key: _make_bucket(entries) for key, entries in plain.items()}
    table.ported = {
        key: {port: _make_bucket(entries) for port, entries in by_port.items()}
        for key, by_port in ported.items()
    }
    return table


# ---------------------------------------------------------------------------
# Per-request search

cdef inline int _value_matches(_HeaderRule rule, str value) except -1:
    cdef str lowered = value.lower()
    if rule.values is not None and lowered in rule.values:
        return 1
    if rule.searches is not None:
        for search in rule.searches:
            if search(lowered) is not None:
                return 1
    return 0


cdef int _headers_match(tuple rules, object headers) except -1:
    cdef _HeaderRule rule
    cdef PyObject* found
    cdef object value
    if headers is None:
        return 0
    cdef bint plain_dict = type(headers) is dict
    for rule in rules:
        if plain_dict:
            found = PyDict_GetItem(headers, rule.name)
            if found == NULL:
                return 0
            value = <object>found
        else:
            value = headers.get(rule.name)
            if value is None:
                return 0
        if isinstance(value, str):
            if not _value_matches(rule, <str>value):
                return 0
        elif isinstance(value, (list, tuple)):
            # a repeated header: any one of its values may match
            for item in value:
                if isinstance(item, str) and _value_matches(rule, <str>item):
                    break
            else:
                return 0
        else:
            return 0
    return 1


cdef bint _sni_matches(RouteSpec spec, object sni) except -1:
    cdef str name = <str>sni
    cdef str part
    if name in spec._sni_exact:
        return True
    for part in spec._sni_suffixes:
        if len(name) > len(part) and name.endswith(part):
            return True
    for part in spec._sni_prefixes:
        if len(name) > len(part) and name.startswith(part):
            return True
    return False


cdef inline int _scan(tuple entries, RouteMatch res, str method, object regex_path, object headers) except -1:
    """Take the first entry of a rank-sorted list that beats res and passes methods, snis, headers
    and, for regex entries (regex_path given), the regex."""
    cdef Py_ssize_t i
    cdef _Entry entry
    cdef object m = None
    for i in range(len(entries)):
        entry = <_Entry>entries[i]
        if entry.rank >= res._best_rank:
            return 0
        if entry.methods is not None and method not in entry.methods:
            continue
        # Kong: snis are ignored for plain http (res._sni None); over TLS the client's SNI must match.
        if entry.spec._has_snis and res._sni is not None and not _sni_matches(entry.spec, res._sni):
            continue
        if entry.header_rules is not None and not _headers_match(entry.header_rules, headers):
            continue
        if regex_path is not None:
            m = entry.regex_match(regex_path)
            if m is None:
                continue
        res._best = entry
        res._best_rank = entry.rank
        res._best_regex_match = m
        return 0
    return 0


cdef int _scan_bucket(_Bucket bucket, RouteMatch res, str method, str path, object headers) except -1:
    cdef Py_ssize_t i, length
    cdef Py_ssize_t path_len = len(path)
    cdef PyObject* group
    if bucket.min_rank >= res._best_rank:
        return 0
    for i in range(bucket.n_lengths):
        length = bucket.lengths[i]
        # a probe costs a slice and a hash: skip lengths that cannot win
        if length > path_len or bucket.length_min_ranks[i] >= res._best_rank:
            continue
        group = PyDict_GetItem(bucket.prefixes, path if length == path_len else path[:length])
        if group != NULL:
            _scan(<tuple>group, res, method, None, headers)
    if bucket.regexes is not None:
        _scan(bucket.regexes, res, method, path, headers)
    if bucket.pathless is not None:
        _scan(bucket.pathless, res, method, None, headers)
    return 0


cdef str _request_host_slow(str host):
    cdef Py_ssize_t j
    if host.startswith(u"["):
        j = host.find(u"]")
        if j >= 0:
            host = host[:j + 1]
    else:
        j = host.find(u":")
        if j >= 0:
            host = host[:j]
    return host.lower()


cdef inline str _request_host(str host):
    """Host header -> lowercased name without ":port" (nginx's $host, minus its checks)."""
    cdef Py_ssize_t i
    cdef Py_ssize_t n = len(host)
    cdef int kind = PyUnicode_KIND(host)
    cdef void* data = PyUnicode_DATA(host)
    cdef Py_UCS4 c
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c == u':' or c >= 128 or (u'A' <= c <= u'Z'):
            return _request_host_slow(host)
    return host


cdef dict _captures(object m):
    cdef dict captures = {}
    cdef tuple groups = m.groups()
    cdef Py_ssize_t i
    for i in range(len(groups)):
        if groups[i] is not None:
            captures[i + 1] = groups[i]
    for name, index in m.re.groupindex.items():
        if groups[index - 1] is not None:
            captures[name] = groups[index - 1]
    return captures


cdef int _finish(RouteMatch res, str path) except -1:
    """Turn the scratch state into the public result (captures, prefix, upstream path)."""
    cdef _Entry entry = res._best
    cdef RouteSpec spec = entry.spec
    cdef object m = res._best_regex_match
    cdef str matched = None
    cdef str postfix
    cdef str upstream
    res.spec = spec
    res.payload = spec.payload
    res.normalized_path = path
    res.matched_path = entry.path
    if m is not None:
        res.captures = _captures(m)
        matched = path[:m.end()]
    elif entry.prefix is not None:
        matched = entry.prefix
    if spec.strip_path and matched is not None:
        postfix = path[len(matched):]
        if matched != u"" and matched != u"/":
            res.stripped_prefix = matched
    else:
        postfix = path[1:]
    postfix = _sanitize_postfix(postfix)
    if spec._v1:
        upstream = _join_v1(spec._upstream_base, postfix, path, spec.strip_path)
    else:
        upstream = _join_v0(spec._upstream_base, postfix, path, spec.strip_path)
    res.upstream_path = _escape(upstream)
    res._best = None
    res._best_regex_match = None
    return 0


@cython.freelist(16)
cdef class RouteMatch:
    """The route that matched a request and what follows from it (see router.pxd)."""

    def __repr__(self) -> str:
        route_id = self.spec.id if self.spec is not None else None
        return (f"RouteMatch(route={route_id!r}, matched_path={self.matched_path!r}, "
                f"upstream_path={self.upstream_path!r}, captures={self.captures!r})")


cdef class Router:
    """Immutable match table over routes, Kong traditional_compatible precedence.

    Each (route, path) entry is ranked by the tuple (fields set among
    methods/hosts/headers/paths, plain hosts only, number of headers, is regex,
    regex_priority for regex entries, prefix length), higher first; equal
    tuples keep declaration order. The first entry in that order that fully
    matches wins.
    """

    def __init__(self, specs: "Sequence[RouteSpec]") -> None:
        cdef list entries = []
        cdef RouteSpec spec
        cdef _Entry entry
        cdef set header_names = set()
        cdef Py_ssize_t n_routes = 0
        for item in specs:
            if not isinstance(item, RouteSpec):
                raise TypeError(f"Router wants RouteSpec objects, got {type(item).__name__}")
            spec = <RouteSpec>item
            n_routes += 1
            if spec.paths is None:
                entries.append(_make_entry(spec, None, None))
            else:
                for path, regex in zip(spec.paths, spec._path_regexes):
                    entries.append(_make_entry(spec, path, regex))
            if spec._header_rules is not None:
                for rule in spec._header_rules:
                    header_names.add((<_HeaderRule>rule).name)

        # sort is stable with reverse=True, so equal priorities keep declaration order
        entries.sort(key=_priority_of, reverse=True)
        for rank, entry in enumerate(entries):
            entry.rank = rank

        # file every entry under each of its host keys, in rank order
        cdef list tables = [({}, {}), ({}, {}), ({}, {})]   # per kind: (plain, ported)
        cdef list hostless = []
        for entry in entries:
            if entry.spec.hosts is None:
                hostless.append(entry)
                continue
            for kind, key, port in entry.spec._host_keys:
                plain, ported = tables[kind]
                if port < 0:
                    plain.setdefault(key, []).append(entry)
                else:
                    ported.setdefault(key, {}).setdefault(port, []).append(entry)

        self._n_routes = n_routes
        self._n_entries = len(entries)
        self.header_names = frozenset(header_names)
        self._exact = _make_host_table(tables[HOST_EXACT][0], tables[HOST_EXACT][1])
        self._suffix = _make_host_table(tables[HOST_SUFFIX][0], tables[HOST_SUFFIX][1])
        self._wprefix = _make_host_table(tables[HOST_PREFIX][0], tables[HOST_PREFIX][1])
        self._hostless = _make_bucket(hostless) if hostless else None
        self._has_ports = any(table[1] for table in tables)

    def __len__(self) -> int:
        return self._n_routes

    cdef int _probe(self, _HostTable table, str key, object port, RouteMatch res,
                    str method, str path, object headers) except -1:
        cdef PyObject* found = PyDict_GetItem(table.plain, key)
        if found != NULL:
            _scan_bucket(<_Bucket>found, res, method, path, headers)
        if port is not None and table.ported:
            found = PyDict_GetItem(table.ported, key)
            if found != NULL:
                found = PyDict_GetItem(<dict>found, port)
                if found != NULL:
                    _scan_bucket(<_Bucket>found, res, method, path, headers)
        return 0

    cpdef RouteMatch match(self, str method, str host, str raw_path, object headers, int listen_port,
                           object sni=None):
        """Best route for a request, or None.

        host is the Host header as received ("" when missing); raw_path has no
        query string and is normalized here (ValueError propagates). headers maps
        lowercased names to str values (or lists of them for repeated headers).
        sni is None for a plain-http request (routes' snis are then ignored, as in
        Kong), else the lowercased server name the TLS client sent, "" for none.
        """
        cdef str path = _normalize(raw_path)
        if self._n_entries == 0:
            return None
        cdef RouteMatch res = RouteMatch.__new__(RouteMatch)
        res._best_rank = self._n_entries
        if sni is not None:
            if not isinstance(sni, str):
                raise TypeError(f"sni must be str or None, got {type(sni).__name__}")
            res._sni = sni
        cdef object port = listen_port if self._has_ports else None
        cdef str hostname
        cdef Py_ssize_t i, n
        cdef int kind
        cdef void* data

        if host is not None and (self._exact is not None or self._suffix is not None
                                 or self._wprefix is not None):
            hostname = _request_host(host)
            if self._exact is not None:
                self._probe(self._exact, hostname, port, res, method, path, headers)
            if self._suffix is not None or self._wprefix is not None:
                # wildcard keys can only end or start at a label boundary
                n = len(hostname)
                kind = PyUnicode_KIND(hostname)
                data = PyUnicode_DATA(hostname)
                for i in range(n):
                    if PyUnicode_READ(kind, data, i) != u'.':
                        continue
                    if self._suffix is not None:
                        self._probe(self._suffix, hostname[i:], port, res, method, path, headers)
                    if self._wprefix is not None:
                        self._probe(self._wprefix, hostname[:i + 1], port, res, method, path, headers)
        if self._hostless is not None:
            _scan_bucket(self._hostless, res, method, path, headers)

        if res._best is None:
            return None
        _finish(res, path)
        return res


def _priority_of(_Entry entry) -> tuple:
    return entry.priority
