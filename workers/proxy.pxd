# The proxy worker's request path, compiled: client protocol, per-request state,
# the exchange that carries a request to an upstream, and the upstream pool.
#
# Lifetimes (uvicorn's grouping): a ClientProtocol lives as long as its client
# connection; a Request from its parsed head to its last answer byte; an Exchange
# from routing to the end of that answer; an UpstreamConnection as long as its
# socket, serving one Exchange at a time, idle in the UpstreamPool in between.
#
# Write-path contract: an Exchange writes to the client only through
# ClientProtocol.writelines/write, and queues what one upstream read produced in
# `out`, flushed once per read (one writev per upstream packet). Nothing here
# blocks; the only awaitable is opening a new upstream connection.

from libc.stdint cimport uint64_t
from fastpath.balancer cimport Balancer
from fastpath.router cimport RouteMatch, Router
from shared_state.arena cimport WorkerStats
from shared_state.health cimport HealthTable
from shared_state.series cimport SeriesTable


cdef class RouteSeries:
    # One route's series in this worker's region, resolved once (proxy.pyx SeriesRecorder).
    cdef uint64_t* vec
    cdef dict codes                            # status * 2 + answered -> address of the count vector
    cdef str service_label
    cdef str route_label


cdef class SeriesRecorder:
    # One per worker: requests by route and code, latency histograms and bandwidth, per-target counts,
    # into this worker's region of the shared series table (single writer). Vector addresses are
    # resolved once and cached on the route (RouteRuntime.series) and upstream (series_targets).
    cdef SeriesTable table
    cdef int slot
    cdef dict routes
    cdef dict codes
    cdef dict targets
    cdef object unrouted                       # RouteSeries of requests no route matched

    cdef RouteSeries _route_series(self, str service_label, str route_label)
    cdef void record(self, Request req, int status, long long bytes_out) except *
    cdef void target_failure(self, object upstream, int index, bint timeout) except *
    cdef uint64_t* _target_vector(self, object upstream, int target) except NULL


cdef class HealthSync:
    # One per worker: keeps this worker's balancers in step with the node-wide target states
    # (one atomic load per request when nothing changed) and reports passive results.
    cdef readonly HealthTable table
    cdef readonly unsigned long long seen      # the table's change count the balancers reflect
    cdef object ctx                            # WorkerContext: its current runtime's upstreams

    cdef void check(self) except *
    cdef int try_trial(self, object upstream, object excluded) except -2
    cdef void report(self, object upstream, int index, int outcome) except *


cdef class Request:
    cdef public str method
    cdef public str path
    cdef public bytes raw_path          # as received, without the query: X-Forwarded-Path
    cdef public object query            # bytes or None
    cdef public list headers            # [(name, value), ...] as received
    cdef public str host
    cdef public bint keep_alive
    cdef public bint http_11
    cdef public object accept           # bytes or None
    cdef public long long content_length  # -1: no Content-Length
    cdef public bint chunked
    cdef public list body_chunks
    cdef public long long body_bytes
    cdef public bint body_done
    cdef public bint replayable
    cdef public bint expect_continue
    cdef public double t_start
    cdef public Exchange exchange
    cdef public bytes request_id
    cdef public frozenset connection_tokens
    cdef public object plugin_ctx       # ringgate.plugins.base.Context when the route has plugins
    cdef public object plugin_chain     # its ringgate.plugins.chain.Chain
    cdef public bint websocket          # a WebSocket handshake (GET, Upgrade: websocket, Connection: upgrade)


cdef class UpstreamPool:
    cdef object loop
    cdef readonly int max_idle
    cdef readonly long long max_requests
    cdef readonly double idle_timeout
    cdef readonly dict idle             # PoolKey -> list of idle UpstreamConnection (LIFO)
    cdef readonly long long opened

    cdef UpstreamConnection acquire(self, tuple key)
    cdef void release(self, UpstreamConnection conn, bint reusable) except *
    cdef void forget(self, UpstreamConnection conn) except *


cdef class UpstreamConnection:
    # per connection
    cdef UpstreamPool pool
    cdef readonly tuple key
    cdef object loop
    cdef object transport
    cdef readonly bint closed
    cdef readonly long long requests_served
    cdef double idle_since
    cdef object timer
    cdef double timer_at                # when `timer` fires (compared in C, not asked of the handle)
    # per exchange
    cdef Exchange exchange
    cdef object parser
    cdef bytes head_buf                 # bytes read since the exchange began, until the final head is parsed
    cdef Py_ssize_t head_start          # where the answer's head starts in head_buf (after interim 1xx)
    cdef bint informational
    cdef bint head_done
    cdef readonly long long bytes_received
    cdef double last_read
    cdef double read_timeout
    cdef double write_timeout
    cdef double write_paused_at

    cdef void attach(self, Exchange exchange, double read_timeout, double write_timeout) except *
    cdef void detach(self)
    cdef void _arm(self, double deadline) except *
    cdef void _schedule(self, double deadline) except *
    cdef void close(self) except *
    cdef void abort(self) except *
    cdef object hand_over(self)


cdef class ClientProtocol:
    # worker
    cdef readonly object ctx
    cdef object loop
    cdef UpstreamPool pool
    cdef WorkerStats stats
    cdef HealthSync health
    cdef SeriesRecorder series
    cdef object access_log             # workers.access_log.AccessLog or None
    cdef Py_ssize_t max_request_line
    cdef Py_ssize_t max_header_bytes
    cdef Py_ssize_t max_headers
    cdef long long replay_limit
    cdef double header_timeout
    cdef double keepalive_timeout
    # connection
    cdef object transport
    cdef object parser
    cdef readonly str peer_ip
    cdef bint trusted                   # peer in trusted_ips: its X-Forwarded-* are kept
    cdef object listener                # workers.worker.Listener: port, TLS flag, its header lines
    cdef int listen_port
    cdef readonly bint tls              # arrived on a TLS listener
    cdef readonly object sni            # TLS: the server name the client sent ("" for none); plain: None
    cdef bytes ip_bytes
    cdef bytes conn_block               # X-Real-IP and the per-worker constant headers, built once
    cdef str last_host                  # the Host of the previous request, and what was built from it
    cdef bytes last_host_bytes
    cdef bytes forwarded_block
    cdef readonly bint closed
    cdef object pending                 # deque of Request
    cdef Request active
    cdef int read_pause
    cdef readonly bint write_paused
    cdef long long requests_served
    cdef double last_activity
    cdef object timer
    cdef bint starting
    cdef object error_after
    cdef object upgraded                # _UpgradeBuffer once llhttp stopped at an upgrade head, else None
    # request being parsed
    cdef bytes url
    cdef list headers
    cdef Py_ssize_t header_bytes
    cdef bint in_headers
    cdef double header_started
    cdef Request parsing

    cdef Request _build_request(self)
    cdef void _begin(self, Request req) except *
    cdef void _dispatch(self, Request req) except *
    cdef void _start_next(self) except *
    cdef void request_done(self, Request req, int status, long long bytes_out, bint keep_alive) except *
    cdef void send_error(self, Request req, int status, str message, bint close=*) except *
    cdef void _refuse(self, object error) except *
    cdef void _upgraded(self, bytes rest) except *
    cdef void _pause(self, int reason) except *
    cdef void _resume(self, int reason) except *
    cdef void write(self, bytes data) except *
    cdef void writelines(self, list parts) except *
    cdef void abort(self) except *
    cdef void _close(self) except *
    cdef void plugin_exit(self, Request req) except *


cdef class Exchange:
    cdef ClientProtocol client
    cdef Request req
    cdef RouteMatch match
    cdef object route
    cdef object service
    cdef object upstream                # UpstreamRuntime or None
    cdef Balancer balancer              # upstream's balancer or None
    cdef bint health_checked            # the upstream has a health checker (Kong's rule)
    cdef object passive_status          # bytes status -> verdict, or None (no passive counting)
    cdef object ctx
    cdef object loop
    # attempts
    cdef int tries_left
    cdef object excluded                # set of failed target indices, or None
    cdef int target
    cdef bint picked
    cdef str target_host
    cdef int target_port
    cdef UpstreamConnection conn
    cdef bint reused
    cdef bint stale_retry_done
    cdef object sni
    # request head
    cdef bytes head_line
    cdef bytes head_rest
    cdef bytes host_line
    cdef readonly bint streaming
    cdef object hash_value
    cdef object set_cookie
    # response
    cdef readonly bint done
    cdef readonly bint response_started
    cdef bint chunked_out
    cdef bint close_delimited
    cdef bint client_keep_alive
    cdef bint upstream_keep_alive
    cdef readonly int status
    cdef long long bytes_out
    cdef list out
    cdef bint out_large                 # a body piece in `out` is big enough to write without copying
    cdef double t_sent
    cdef double t_head
    # plugins (None when the route has none: every hook below is skipped)
    cdef object chain
    cdef object pctx                    # made at dispatch, or (lazy chains) when a plugin must act
    cdef bint in_fallback
    cdef double primary_timeout         # seconds, 0: the service's read_timeout (a plugin's setting)
    cdef bint no_timeout_retry

    cdef init(self, ClientProtocol client, Request req, RouteMatch match, object route, object service)
    cdef void start(self) except *
    cdef void _build_head(self) except *
    cdef void _attempt(self) except *
    cdef void _send(self, UpstreamConnection conn, bint reused) except *
    cdef void forward_body(self, bytes data) except *
    cdef void on_client_body_done(self) except *
    cdef void _attempt_failed(self, bint timeout, bint sent) except *
    cdef void _release_target(self) except *
    cdef void _end_target(self) except *
    cdef void on_upstream_head(self, UpstreamConnection conn, int status, bytes buf, Py_ssize_t start,
                               Py_ssize_t end, bint keep_alive) except *
    cdef void on_upstream_switch(self, UpstreamConnection conn, bytes buf, Py_ssize_t start,
                                 Py_ssize_t end) except *
    cdef void on_upstream_body(self, bytes data) except *
    cdef void on_upstream_flush(self) except *
    cdef void on_upstream_complete(self, UpstreamConnection conn) except *
    cdef void on_upstream_lost(self, UpstreamConnection conn, int reason) except *
    cdef void on_client_lost(self) except *
    cdef void abandon(self) except *
    cdef void _fail(self, int status, str message) except *
    cdef void _finish(self, bint keep_alive) except *
    cdef bint _plugins_take_over(self, int status, list headers) except -1
    cdef object _context(self)
    cdef void _replace_answer(self) except *
    cdef void switch_to(self, object dest, object path) except *


cdef class Tunnel:
    # A WebSocket connection after its 101: the client and upstream transports, each driven by a
    # _TunnelEnd protocol, pass bytes to each other untouched until one side closes.
    cdef ClientProtocol client
    cdef Exchange exchange              # keeps the target picked (least-connections) until the tunnel ends
    cdef object loop
    cdef object client_transport
    cdef object upstream_transport
    cdef double idle_timeout            # the service's read_timeout: no byte either way this long closes both
    cdef double stall_timeout           # its write_timeout: a destination paused this long closes both
    cdef double last_traffic
    cdef double stalled_since
    cdef int stalled                    # SIDE_* bits: destinations whose transport paused writing
    cdef object timer
    cdef double timer_at
    cdef readonly bint ended
    cdef readonly long long to_client   # tunnel bytes, after the 101 head
    cdef readonly long long to_upstream

    cdef void start(self, bytes head, bytes from_upstream, list from_client) except *
    cdef void forward(self, int side, bytes data) except *
    cdef bint on_eof(self) except -1
    cdef void on_lost(self, int side, object exc) except *
    cdef void on_pause(self, int side) except *
    cdef void on_resume(self, int side) except *
    cdef void _schedule(self, double deadline) except *
    cdef void _end(self, bint abort) except *
