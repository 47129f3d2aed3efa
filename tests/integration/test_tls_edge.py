"""TLS at the edge through the real gateway: listeners from Kong's listen syntax, certificates by SNI,
https-only routes, route snis, X-Forwarded-Proto, upstream verification, and certificate reloads.

Clients are Python's ssl and http.client; certificates come from trustme CAs made per module.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
import yaml

from ringgate.origin import OriginServer
from tests.integration.client import request
from tests.integration.conftest import Gateway, free_port

pytestmark = pytest.mark.integration

API = "api.example.test"
WILD = "*.wild.example.test"
UPSTREAM_NAME = "upstream.example.test"


class HTTPS(http.client.HTTPSConnection):
    """HTTPS to the gateway on loopback with `server_name` as the SNI and the Host."""

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext) -> None:
        super().__init__(server_name, port, context=context, timeout=10)

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_certificate(port: int, server_name: str | None) -> bytes:
    """The DER certificate the gateway presents to a client sending `server_name` (None: no SNI)."""
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          unverified().wrap_socket(raw, server_hostname=server_name) as tls):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def echoed_headers(body: bytes) -> dict[str, str]:
    return {name.lower(): value for name, value in orjson.loads(body)["headers"]}


def certificate_entry(cert: trustme.LeafCert, *snis: str) -> dict[str, Any]:
    return {
        "cert": "".join(blob.bytes().decode() for blob in cert.cert_chain_pems),
        "key": cert.private_key_pem.bytes().decode(),
        "snis": [{"name": name} for name in snis],
    }


def start_tls_gateway(config: dict[str, Any], directory: Path, workers: int = 1,
                      via_environment: bool = False) -> tuple[Gateway, int]:
    """A gateway listening plain on one port and TLS on another; returns it and the TLS port."""
    gateway = Gateway(config, directory, workers=workers)
    tls_port = free_port()
    listen = f"127.0.0.1:{gateway.proxy_port}, 127.0.0.1:{tls_port} ssl"
    if via_environment:
        flag = gateway.args.index("--proxy-listen")
        del gateway.args[flag:flag + 2]
        gateway.env["RINGGATE_PROXY_LISTEN"] = listen
    else:
        gateway.args += ["--proxy-listen", listen]
    gateway.start()
    return gateway, tls_port


@pytest.fixture(scope="module")
def edge_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


class Edge:
    """The module's gateway and what stands behind it."""

    def __init__(self, gateway: Gateway, tls_port: int, certs: dict[str, trustme.LeafCert]) -> None:
        self.gateway = gateway
        self.tls_port = tls_port
        self.certs = certs

    @property
    def plain_port(self) -> int:
        return self.gateway.proxy_port


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, edge_ca: trustme.CA, upstream_ca: trustme.CA) -> Iterator[Edge]:
    plain = OriginServer("plain").start()
    by_sni = OriginServer("by-sni").start()
    upstream_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert(UPSTREAM_NAME).configure_cert(upstream_context)
    secure_origin = OriginServer("tls-origin", ssl_context=upstream_context).start()
    certs = {API: edge_ca.issue_cert(API), WILD: edge_ca.issue_cert(WILD)}
    trusted_id, stranger_id = str(uuid.uuid4()), str(uuid.uuid4())

    def tls_service(name: str, path: str, **fields: Any) -> dict[str, Any]:
        return {"name": name, "protocol": "https", "host": "tls-up", "port": 443, "retries": 0, **fields,
                "routes": [{"name": name, "paths": [path]}]}

    config = {
        "_format_version": "3.0",
        "certificates": [certificate_entry(certs[API], API), certificate_entry(certs[WILD], WILD)],
        "ca_certificates": [
            {"id": trusted_id, "cert": upstream_ca.cert_pem.bytes().decode()},
            {"id": stranger_id, "cert": trustme.CA().cert_pem.bytes().decode()},
        ],
        "upstreams": [{"name": "tls-up", "host_header": UPSTREAM_NAME,
                       "targets": [{"target": secure_origin.address}]}],
        "services": [
            {"name": "plain", "url": f"http://{plain.address}", "routes": [
                {"name": "any", "paths": ["/any"]},
                {"name": "secure", "paths": ["/secure"], "protocols": ["https"]},
                {"name": "moved", "paths": ["/moved"], "protocols": ["https"], "https_redirect_status_code": 301},
                {"name": "sni-fallback", "paths": ["/sni"]},
            ]},
            {"name": "by-sni", "url": f"http://{by_sni.address}", "routes": [
                {"name": "sni", "paths": ["/sni"], "snis": [API, WILD]},
            ]},
            tls_service("verified", "/verified", tls_verify=True, ca_certificates=[trusted_id]),
            tls_service("wrong-ca", "/wrong-ca", tls_verify=True, ca_certificates=[stranger_id]),
            tls_service("unchecked", "/unchecked"),
        ],
    }
    gateway, tls_port = start_tls_gateway(config, tmp_path_factory.mktemp("edge"), workers=2)
    try:
        yield Edge(gateway, tls_port, certs)
    finally:
        gateway.stop()
        for origin in (plain, by_sni, secure_origin):
            origin.stop()


def test_the_ready_line_names_both_listeners(edge: Edge) -> None:
    line = edge.gateway.wait_for("ringgate: ready")
    assert f"proxy on 127.0.0.1:{edge.plain_port}, 127.0.0.1:{edge.tls_port} ssl, admin on" in line


def test_the_certificate_is_chosen_by_sni(edge: Edge) -> None:
    default = (edge.gateway.prefix / "ssl" / "default.crt").read_text()
    assert served_certificate(edge.tls_port, API) == der_of(edge.certs[API].cert_chain_pems[0].bytes().decode())
    wild = der_of(edge.certs[WILD].cert_chain_pems[0].bytes().decode())
    assert served_certificate(edge.tls_port, "shop.wild.example.test") == wild
    # A wildcard covers one label: deeper names and the bare domain get the default.
    assert served_certificate(edge.tls_port, "a.shop.wild.example.test") == der_of(default)
    assert served_certificate(edge.tls_port, "unknown.example.test") == der_of(default)
    assert served_certificate(edge.tls_port, None) == der_of(default)


def test_a_verifying_client_gets_through_with_http11(edge: Edge, edge_ca: trustme.CA) -> None:
    conn = HTTPS(edge.tls_port, API, trusting(edge_ca))
    try:
        status, _, body = get(conn, "/any/x")
        assert status == 200 and orjson.loads(body)["server"] == "plain"
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        assert conn.sock.selected_alpn_protocol() in (None, "http/1.1")  # type: ignore[union-attr]
        # keep-alive over TLS: the same connection serves again
        sock = conn.sock
        assert get(conn, "/any/y")[0] == 200 and conn.sock is sock
    finally:
        conn.close()


def test_the_origin_sees_how_the_client_arrived(edge: Edge, edge_ca: trustme.CA) -> None:
    conn = HTTPS(edge.tls_port, API, trusting(edge_ca))
    try:
        status, _, body = get(conn, "/any/proto")
    finally:
        conn.close()
    assert status == 200
    seen = echoed_headers(body)
    assert (seen["x-forwarded-proto"], seen["x-forwarded-port"], seen["x-forwarded-host"]) == (
        "https", str(edge.tls_port), API)
    seen = echoed_headers(request(edge.plain_port, "GET", "/any/proto").body)
    assert (seen["x-forwarded-proto"], seen["x-forwarded-port"]) == ("http", str(edge.plain_port))


def test_an_https_only_route_answers_426_over_plain_http(edge: Edge, edge_ca: trustme.CA) -> None:
    response = request(edge.plain_port, "GET", "/secure")
    assert response.status == 426
    assert response.json()["message"] == "Please use HTTPS protocol"
    assert response.header("Connection") == "Upgrade" and response.header("Upgrade") == "TLS/1.2, HTTP/1.1"
    assert response.header("X-Kong-Request-Id") == response.json()["request_id"]
    conn = HTTPS(edge.tls_port, API, trusting(edge_ca))
    try:
        status, _, body = get(conn, "/secure")
    finally:
        conn.close()
    assert status == 200 and orjson.loads(body)["path"] == "/"


def test_https_redirect_status_code_redirects_to_the_same_uri(edge: Edge) -> None:
    plain = http.client.HTTPConnection("127.0.0.1", edge.plain_port, timeout=10)
    try:
        status, headers, body = get(plain, "/moved/a%20b?x=1&y=2", {"Host": "Shop.Example.test:8000"})
        assert status == 301 and body == b""
        # Kong: https:// + nginx's $host (lowercased, no port) + the request URI as sent
        assert headers["location"] == "https://shop.example.test/moved/a%20b?x=1&y=2"
        assert headers["content-length"] == "0"
    finally:
        plain.close()


def test_route_snis_match_the_client_sni(edge: Edge, edge_ca: trustme.CA) -> None:
    def origin_for(server_name: str, context: ssl.SSLContext) -> str:
        conn = HTTPS(edge.tls_port, server_name, context)
        try:
            status, _, body = get(conn, "/sni")
        finally:
            conn.close()
        assert status == 200
        return str(orjson.loads(body)["server"])

    assert origin_for(API, trusting(edge_ca)) == "by-sni"
    assert origin_for("shop.wild.example.test", trusting(edge_ca)) == "by-sni"
    assert origin_for("unknown.example.test", unverified()) == "plain"
    # Kong ignores snis for plain http: the route with snis (the more specific one) still matches.
    assert request(edge.plain_port, "GET", "/sni").json()["server"] == "by-sni"


def test_upstream_certificates_are_verified_against_the_service_ca_certificates(edge: Edge) -> None:
    response = request(edge.plain_port, "GET", "/verified/x")
    assert response.status == 200
    assert response.json()["server"] == "tls-origin"
    # SNI and Host are the upstream's host_header: the origin's certificate is issued for that name.
    assert echoed_headers(response.body)["host"] == UPSTREAM_NAME
    assert request(edge.plain_port, "GET", "/unchecked").status == 200  # tls_verify off: not verified

    failed = request(edge.plain_port, "GET", "/wrong-ca")
    assert failed.status == 502
    assert failed.json()["message"] == "An invalid response was received from the upstream server"
    line = edge.gateway.wait_for("failed verification", timeout=5)
    assert UPSTREAM_NAME in line and "unable to get local issuer certificate" in line


def test_a_busy_tls_port_fails_the_start_before_anything_listens(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        gateway = Gateway(None, tmp_path)
        gateway.args += ["--proxy-listen", f"127.0.0.1:{gateway.proxy_port}, 127.0.0.1:{busy.getsockname()[1]} ssl"]
        gateway.start(expect_ready=False)
        try:
            assert gateway.proc is not None and gateway.proc.wait(15) == 1
        finally:
            gateway.stop()
    assert "address already in use" in gateway.log()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=1).close()


def test_a_reload_swaps_the_certificate_without_dropping_tls_connections(
    tmp_path: Path, edge_ca: trustme.CA
) -> None:
    origin = OriginServer("reloaded").start()
    first, second = edge_ca.issue_cert(API), edge_ca.issue_cert(API)

    def config(cert: trustme.LeafCert) -> dict[str, Any]:
        return {"_format_version": "3.0", "certificates": [certificate_entry(cert, API)],
                "services": [{"name": "s", "url": f"http://{origin.address}", "routes": [{"paths": ["/"]}]}]}

    gateway, tls_port = start_tls_gateway(config(first), tmp_path, via_environment=True)
    try:
        old = HTTPS(tls_port, API, trusting(edge_ca))
        assert get(old, "/before")[0] == 200
        old_sock = old.sock
        assert old_sock.getpeercert(binary_form=True) == der_of(first.cert_chain_pems[0].bytes().decode())  # type: ignore[union-attr]

        path = Path(gateway.args[gateway.args.index("-c") + 1])
        path.write_text(yaml.safe_dump(config(second)))
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGHUP)
        wanted = der_of(second.cert_chain_pems[0].bytes().decode())
        deadline = time.monotonic() + 5
        while served_certificate(tls_port, API) != wanted:
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.05)
        gateway.wait_for("TLS certificates reloaded")

        # The connection opened before the reload is the same one, still serving, with its certificate.
        assert get(old, "/after")[0] == 200
        assert old.sock is old_sock
        assert old_sock.getpeercert(binary_form=True) == der_of(first.cert_chain_pems[0].bytes().decode())  # type: ignore[union-attr]
        old.close()
    finally:
        gateway.stop()
        origin.stop()
    assert os.path.exists(gateway.prefix / "ssl" / "default.crt")
