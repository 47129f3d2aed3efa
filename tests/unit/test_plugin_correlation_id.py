"""correlation-id: Kong's generators, keeping a client's id, echoing it, and unique ids after fork."""
from __future__ import annotations

import os
import re
import time
import uuid

import pytest
from pydantic import ValidationError

from ringgate.plugins.base import Context
from ringgate.plugins.chain import Chain, run_access, run_header_filter
from ringgate.plugins.correlation_id import Config, CorrelationIdPlugin


def make_ctx(headers: list[tuple[str, str]] | None = None) -> Context:
    ctx = Context()
    ctx.method = "GET"
    ctx.path = "/"
    ctx.raw_path = b"/"
    ctx.query = None
    ctx.host = "example.test"
    ctx.headers = headers or []
    ctx.client_ip = "10.0.0.1"
    ctx.route_id = "route-1"
    ctx.route_name = "r"
    ctx.service_id = "svc-1"
    ctx.service_name = "s"
    ctx.request_id = "req-1"
    return ctx


def run(ctx: Context, **config: object) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(headers set upstream, headers set on the answer) for one request."""
    chain = Chain([CorrelationIdPlugin(Config.model_validate(config), entity_id="cid-1")])
    assert not run_access(chain, ctx)
    run_header_filter(chain, ctx, 200, [])
    upstream = dict(ctx.upstream_headers or [])
    downstream = {name: value for _, name, value in ctx.response_headers or []}
    return upstream, downstream


def test_uuid_counter_is_the_default_and_counts_per_worker() -> None:
    first, _ = run(make_ctx())
    second, _ = run(make_ctx())
    base1, n1 = first["Kong-Request-ID"].split("#")  # type: ignore[union-attr]
    base2, n2 = second["Kong-Request-ID"].split("#")  # type: ignore[union-attr]
    uuid.UUID(base1)
    assert base1 == base2
    assert int(n2) == int(n1) + 1


def test_uuid_generator() -> None:
    upstream, downstream = run(make_ctx(), generator="uuid", header_name="X-Correlation")
    assert uuid.UUID(upstream["X-Correlation"]).version == 4  # type: ignore[arg-type]
    assert downstream == {}  # echo_downstream is off by default


def test_tracker_generator_shape() -> None:
    upstream, _ = run(make_ctx(), generator="tracker")
    value = upstream["Kong-Request-ID"]
    assert value is not None
    assert re.fullmatch(rf".+-.+-{os.getpid()}-.+-.+-\d+\.\d{{3}}", value)
    assert abs(float(value.rsplit("-", 1)[1]) - time.time()) < 60


def test_a_client_id_is_kept_and_echoed() -> None:
    sent = "abc-123"
    upstream, downstream = run(make_ctx([("kong-request-id", sent)]), echo_downstream=True)
    assert upstream == {}  # forwarded as received
    assert downstream == {"Kong-Request-ID": sent}


def test_an_empty_client_id_is_replaced() -> None:
    upstream, downstream = run(make_ctx([("Kong-Request-ID", "")]), echo_downstream=True, generator="uuid")
    assert upstream["Kong-Request-ID"]
    assert downstream == upstream


def test_a_forked_worker_has_its_own_uuid() -> None:
    parent, _ = run(make_ctx())
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child, _ = run(make_ctx())
            os.write(write_end, child["Kong-Request-ID"].encode())  # type: ignore[union-attr]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child_id = os.read(read_end, 128).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_id.split("#")[0] != parent["Kong-Request-ID"].split("#")[0]  # type: ignore[union-attr]
    assert child_id.endswith("#1")


def test_config() -> None:
    config = Config.model_validate({})
    assert (config.header_name, config.generator, config.echo_downstream) == ("Kong-Request-ID", "uuid#counter",
                                                                              False)
    with pytest.raises(ValidationError) as caught:
        Config.model_validate({"generator": "random"})
    assert caught.value.errors()[0]["ctx"]["reason"] == "expected one of: uuid, uuid#counter, tracker"
    assert CorrelationIdPlugin.PRIORITY == 100001
