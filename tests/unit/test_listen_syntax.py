"""Kong's listen syntax ("0.0.0.0:8000, 0.0.0.0:8443 ssl"): addresses, flags, and what is refused."""

from __future__ import annotations

import pytest

from ringgate.settings import ListenAddress, ListenSpec, SettingsError, parse_listen_list

SETTING = "RINGGATE_PROXY_LISTEN"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8000", [ListenSpec(ListenAddress("0.0.0.0", 8000))]),
        ("0.0.0.0:8000, 0.0.0.0:8443 ssl", [
            ListenSpec(ListenAddress("0.0.0.0", 8000)),
            ListenSpec(ListenAddress("0.0.0.0", 8443), ssl=True),
        ]),
        # Kong's default proxy_listen line, minus http2 (refused below)
        ("0.0.0.0:8000 reuseport backlog=16384, 0.0.0.0:8443 ssl reuseport backlog=16384", [
            ListenSpec(ListenAddress("0.0.0.0", 8000), reuseport=True, backlog=16384),
            ListenSpec(ListenAddress("0.0.0.0", 8443), ssl=True, reuseport=True, backlog=16384),
        ]),
        ("[::1]:8443 ssl", [ListenSpec(ListenAddress("::1", 8443), ssl=True)]),
        ("  127.0.0.1:8000   ssl  ", [ListenSpec(ListenAddress("127.0.0.1", 8000), ssl=True)]),
        ("localhost:8000", [ListenSpec(ListenAddress("localhost", 8000))]),
        (":8000", [ListenSpec(ListenAddress("0.0.0.0", 8000))]),
        # nginx-only tuning flags are accepted and change nothing
        ("127.0.0.1:8000 deferred bind ipv6only=on so_keepalive=on", [ListenSpec(ListenAddress("127.0.0.1", 8000))]),
        ("127.0.0.1:8000 so_keepalive=30m::10", [ListenSpec(ListenAddress("127.0.0.1", 8000))]),
        ("off", []),
        (" off ", []),
        # port 0 (tests: any free port) may repeat, as each bind gets its own port
        ("127.0.0.1:0, 127.0.0.1:0 ssl", [
            ListenSpec(ListenAddress("127.0.0.1", 0)), ListenSpec(ListenAddress("127.0.0.1", 0), ssl=True),
        ]),
    ],
)  # fmt: skip
def test_accepted(text: str, expected: list[ListenSpec]) -> None:
    assert list(parse_listen_list(text, SETTING)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.0.0.0:8443 ssl http2", "RINGGATE_PROXY_LISTEN: flag 'http2' in '0.0.0.0:8443 ssl http2': HTTP/2 is not "
                                   "supported: Ringgate speaks HTTP/1.1 (TLS clients negotiate http/1.1 by ALPN)"),
        ("0.0.0.0:8000 proxy_protocol", "RINGGATE_PROXY_LISTEN: flag 'proxy_protocol' in '0.0.0.0:8000 "
                                        "proxy_protocol': the PROXY protocol is not supported"),
        ("0.0.0.0:8000 sll", "RINGGATE_PROXY_LISTEN: unknown flag 'sll' in '0.0.0.0:8000 sll' (expected "
                             "HOST:PORT [ssl] [reuseport] [backlog=N] [deferred] [bind], ... or off)"),
        ("0.0.0.0:8000 backlog=", "RINGGATE_PROXY_LISTEN: backlog must be a positive integer, got 'backlog='"),
        ("0.0.0.0:8000 backlog=0", "RINGGATE_PROXY_LISTEN: backlog must be a positive integer, got 'backlog=0'"),
        ("0.0.0.0:8000 backlog=-5", "RINGGATE_PROXY_LISTEN: backlog must be a positive integer, got 'backlog=-5'"),
        ("0.0.0.0:8000 ipv6only=maybe", "RINGGATE_PROXY_LISTEN: unknown flag 'ipv6only=maybe' in "
                                        "'0.0.0.0:8000 ipv6only=maybe' (expected HOST:PORT [ssl] [reuseport] "
                                        "[backlog=N] [deferred] [bind], ... or off)"),
        ("0.0.0.0:8000,", "RINGGATE_PROXY_LISTEN: empty listen entry in '0.0.0.0:8000,' (expected HOST:PORT [ssl] "
                          "[reuseport] [backlog=N] [deferred] [bind], ... or off)"),
        ("", "RINGGATE_PROXY_LISTEN: empty listen entry in '' (expected HOST:PORT [ssl] [reuseport] [backlog=N] "
             "[deferred] [bind], ... or off)"),
        ("ssl 0.0.0.0:8443", "RINGGATE_PROXY_LISTEN: invalid listen address 'ssl' (expected HOST:PORT)"),
        ("0.0.0.0", "RINGGATE_PROXY_LISTEN: invalid listen address '0.0.0.0' (expected HOST:PORT)"),
        ("0.0.0.0:70000 ssl", "RINGGATE_PROXY_LISTEN: port 70000 out of range 0..65535"),
        ("off, 0.0.0.0:8000", "RINGGATE_PROXY_LISTEN: invalid listen address 'off' (expected HOST:PORT)"),
        ("0.0.0.0:8000, 0.0.0.0:8000 ssl", "RINGGATE_PROXY_LISTEN: 0.0.0.0:8000 is listed twice"),
    ],
)  # fmt: skip
def test_refused(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_listen_list(text, SETTING)
    assert str(caught.value) == message


def test_spec_reads_like_the_setting() -> None:
    specs = parse_listen_list("[::]:8443 ssl reuseport backlog=511 deferred, 127.0.0.1:8000", SETTING)
    assert [str(spec) for spec in specs] == ["[::]:8443 ssl reuseport backlog=511", "127.0.0.1:8000"]
    assert (specs[0].host, specs[0].port, specs[1].host, specs[1].port) == ("::", 8443, "127.0.0.1", 8000)
