"""Certificates, SNIs and CA certificates through a running gateway's Admin API: a round trip that
survives a restart, with the private keys persisted readable by the owner only."""
from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
import trustme

from tests.integration.client import Response, request
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def admin(gateway: Gateway, method: str, path: str, form: str | None = None) -> Response:
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    return request(gateway.admin_port, method, path, headers=headers, body=form.encode() if form else None)


def test_certificate_round_trip_survives_a_restart(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("api.example.com", "www.example.com")
    cert, key = leaf.cert_chain_pems[0].bytes().decode(), leaf.private_key_pem.bytes().decode()
    prefix = tmp_path / "prefix"
    first = gateway_factory(None, extra_args=["--prefix", str(prefix)])
    # As `curl -d 'snis[]=...' --data-urlencode cert@... --data-urlencode key@...` sends it.
    created = admin(first, "POST", "/certificates",
                    f"cert={quote(cert)}&key={quote(key)}&snis[]=www.example.com&snis[]=api.example.com")
    assert created.status == 201, created.body
    certificate = created.json()
    assert certificate["snis"] == ["api.example.com", "www.example.com"]
    trusted = admin(first, "POST", "/ca_certificates", f"cert={quote(ca.cert_pem.bytes().decode())}")
    assert trusted.status == 201, trusted.body
    assert admin(first, "POST", "/certificates/api.example.com/snis", "name=*.example.com").status == 201
    snapshot = prefix / "config.json"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600  # it holds the private key
    assert key in orjson.loads(snapshot.read_bytes())["certificates"][0]["key"]
    first.stop()

    second = gateway_factory(None, extra_args=["--prefix", str(prefix)])
    restored = admin(second, "GET", "/certificates/www.example.com")
    assert restored.status == 200
    assert restored.json() == {**certificate, "snis": ["*.example.com", "api.example.com", "www.example.com"]}
    assert admin(second, "GET", f"/ca_certificates/{trusted.json()['id']}").json() == trusted.json()
    assert admin(second, "DELETE", "/certificates/api.example.com").status == 204
    assert admin(second, "GET", "/snis").json() == {"data": [], "next": None}
    assert admin(second, "GET", "/certificates/www.example.com").json() == {"message": "SNI not found"}
