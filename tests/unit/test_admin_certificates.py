"""Certificates, SNIs and CA certificates through the Admin API, in process (real config state under a
temporary prefix, a real arena, no sockets): Kong's `snis` pseudo-field, SNI names in certificate URLs,
and Kong's refusals.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import trustme
from shared_state.arena import Arena

from ringgate.admin.api import AdminContext, Request, Response
from ringgate.admin.app import AdminApp
from ringgate.admin.state import ConfigState
from ringgate.config import load_dict
from ringgate.config.store import load_snapshot, save_snapshot
from ringgate.settings import Settings

UNKNOWN_ID = "6b1a5b4e-2c1f-4e63-9a0e-1f7d3b8c9d00"


class Admin:
    def __init__(self, prefix: Path) -> None:
        save_snapshot(str(prefix), load_dict({"_format_version": "3.0"}))
        self.prefix = prefix
        self.arena = Arena(2)
        self.app = AdminApp(AdminContext(Settings(prefix=str(prefix)), ConfigState(str(prefix), self.arena),
                                         self.arena, "node"))

    def __call__(self, method: str, path: str, body: bytes | dict[str, Any] = b"") -> Response:
        if isinstance(body, dict):
            headers = {"content-type": "application/json"}
            body = orjson.dumps(body)
        else:
            headers = {"content-type": "application/x-www-form-urlencoded"}
        return self.app(Request(method, path, {}, headers, body))


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pair(ca: trustme.CA, *names: str) -> dict[str, str]:
    leaf = ca.issue_cert(*names)
    return {"cert": leaf.cert_chain_pems[0].bytes().decode(), "key": leaf.private_key_pem.bytes().decode()}


def test_snis_pseudo_field_and_certificates_named_by_sni(admin: Admin, ca: trustme.CA) -> None:
    created = admin("POST", "/certificates", {**pair(ca, "shop.example.com"), "snis": ["shop.example.com",
                                                                                      "*.shop.example.com"]})
    assert created.status == 201, created.body
    certificate = created.body
    assert certificate["snis"] == ["*.shop.example.com", "shop.example.com"]  # sorted, as Kong answers
    assert certificate["cert_alt"] is None and isinstance(certificate["created_at"], int)
    by_name = admin("GET", "/certificates/shop.example.com")
    assert (by_name.status, by_name.body) == (200, certificate)
    assert admin("GET", f"/certificates/{certificate['id']}").body == certificate
    listed = admin("GET", "/certificates").body
    assert listed == {"data": [certificate], "next": None}
    snis = admin("GET", "/snis").body["data"]
    assert sorted(sni["name"] for sni in snis) == certificate["snis"]
    assert all(sni["certificate"] == {"id": certificate["id"]} for sni in snis)
    assert admin("GET", "/snis/shop.example.com/certificate").body["id"] == certificate["id"]
    nested = admin("GET", "/certificates/shop.example.com/snis").body["data"]
    assert sorted(sni["name"] for sni in nested) == certificate["snis"]
    # Persisted as kong.yml has it: SNIs are their own collection pointing at the certificate.
    saved = load_snapshot(str(admin.prefix))
    assert {(sni.name, sni.certificate) for sni in saved.snis} == {
        ("shop.example.com", certificate["id"]), ("*.shop.example.com", certificate["id"])}


def test_writes_replace_keep_or_clear_the_snis(admin: Admin, ca: trustme.CA) -> None:
    keys = pair(ca, "a.example.com")
    # A form, as `curl --data-urlencode cert@a.pem ... -d 'snis[]=a.example.com'` sends it.
    body = f"cert={quote(keys['cert'])}&key={quote(keys['key'])}&snis[]=a.example.com&snis[]=b.example.com"
    created = admin("POST", "/certificates", body.encode())
    assert created.status == 201 and created.body["snis"] == ["a.example.com", "b.example.com"], created.body
    cert_id = created.body["id"]
    patched = admin("PATCH", "/certificates/b.example.com", {"snis": ["a.example.com", "c.example.com"]})
    assert patched.status == 200 and patched.body["snis"] == ["a.example.com", "c.example.com"]
    assert admin("GET", "/snis/b.example.com").status == 404
    assert admin("GET", "/snis/a.example.com").body["certificate"] == {"id": cert_id}  # kept, same entity
    assert admin("PATCH", f"/certificates/{cert_id}", {"tags": ["kept"]}).body["snis"] == [
        "a.example.com", "c.example.com"]  # no `snis`: untouched
    through_sni = admin("PATCH", "/snis/c.example.com/certificate", {"snis": ["c.example.com"]})
    assert through_sni.status == 200 and through_sni.body["snis"] == ["c.example.com"]
    assert through_sni.body["tags"] == ["kept"]
    replaced = admin("PUT", f"/certificates/{cert_id}", keys)
    assert replaced.status == 200 and replaced.body["snis"] == [] and replaced.body["tags"] is None
    assert admin("GET", "/snis").body["data"] == []
    # PUT by a name nobody serves creates a certificate served for that name.
    put_new = admin("PUT", "/certificates/new.example.com", pair(ca, "new.example.com"))
    assert put_new.status == 200 and put_new.body["snis"] == ["new.example.com"]
    assert put_new.body["id"] != cert_id
    assert admin("GET", "/certificates/new.example.com").body["id"] == put_new.body["id"]


def test_kong_refusals_for_certificates_and_snis(admin: Admin, ca: trustme.CA) -> None:
    keys = pair(ca, "taken.example.com")
    first = admin("POST", "/certificates", {**keys, "snis": ["taken.example.com"]}).body
    twice = admin("POST", "/certificates", {**keys, "snis": ["x.example.com", "x.example.com"]})
    assert (twice.status, twice.body) == (400, {"code": 2, "name": "schema violation",
                                                "message": "schema violation (snis: x.example.com is duplicated)",
                                                "fields": {"snis": "x.example.com is duplicated"}})
    taken = admin("POST", "/certificates", {**keys, "snis": ["taken.example.com"]})
    assert taken.status == 400 and taken.body["fields"] == {
        "snis": f"taken.example.com already associated with existing certificate '{first['id']}'"}
    bad_name = admin("POST", "/certificates", {**keys, "snis": ["ok.example.com", "10.0.0.1"]})
    assert bad_name.status == 400 and bad_name.body["fields"] == {"snis": [None, "must not be an IP"]}
    bad_pem = admin("POST", "/certificates", {"cert": "not a certificate", "key": keys["key"]})
    assert bad_pem.status == 400 and bad_pem.body["code"] == 2 and "cert" in bad_pem.body["fields"]
    assert admin("GET", "/certificates").body["data"] == [first]  # nothing else was written
    # SNIs as their own entity: unique names, a certificate that exists.
    duplicate = admin("POST", "/snis", {"name": "taken.example.com", "certificate": {"id": first["id"]}})
    assert (duplicate.status, duplicate.body["message"]) == (
        409, "UNIQUE violation detected on '{name=\"taken.example.com\"}'")
    orphan = admin("POST", "/snis", {"name": "orphan.example.com", "certificate": {"id": UNKNOWN_ID}})
    assert orphan.status == 400 and orphan.body["code"] == 4
    nested = admin("POST", "/certificates/taken.example.com/snis", b"name=more.example.com")
    assert nested.status == 201 and nested.body["certificate"] == {"id": first["id"]}
    # An SNI name nobody serves: Kong's own 404 text, for every method but PUT.
    for method in ("GET", "PATCH", "DELETE"):
        missing = admin(method, "/certificates/nobody.example.com", b"")
        assert (missing.status, missing.body) == (404, {"message": "SNI not found"}), method
    assert admin("GET", f"/certificates/{UNKNOWN_ID}").body == {"message": "Not found"}
    assert admin("DELETE", f"/certificates/{UNKNOWN_ID}").status == 204


def test_delete_cascades_to_snis_and_is_refused_while_a_service_uses_it(admin: Admin, ca: trustme.CA) -> None:
    certificate = admin("POST", "/certificates", {**pair(ca, "client.example.com"),
                                                  "snis": ["client.example.com"]}).body
    service = admin("POST", "/services", {"name": "s", "url": "https://s.internal",
                                          "client_certificate": {"id": certificate["id"]}})
    assert service.status == 201 and service.body["client_certificate"] == {"id": certificate["id"]}
    refused = admin("DELETE", "/certificates/client.example.com")
    assert (refused.status, refused.body["message"]) == (
        400, "an existing 'services' entity references this 'certificates' entity")
    assert admin("DELETE", "/services/s").status == 204
    assert admin("DELETE", "/certificates/client.example.com").status == 204
    assert admin("GET", "/snis").body["data"] == []  # cascaded, as Kong deletes a certificate's SNIs


def test_ca_certificates_digest_uniqueness_and_references(admin: Admin, ca: trustme.CA) -> None:
    pem = ca.cert_pem.bytes().decode()
    created = admin("POST", "/ca_certificates", {"cert": pem, "cert_digest": "ignored"})
    assert created.status == 201, created.body
    digest = created.body["cert_digest"]
    assert len(digest) == 64 and digest != "ignored"  # always computed from the certificate
    again = admin("POST", "/ca_certificates", {"cert": pem})
    assert (again.status, again.body) == (409, {"code": 5, "name": "unique constraint violation",
                                                "message": f"UNIQUE violation detected on '{{cert_digest=\"{digest}\"}}'",
                                                "fields": {"cert_digest": digest}})
    leaf = admin("POST", "/ca_certificates", {"cert": pair(ca, "leaf.example.com")["cert"]})
    assert leaf.status == 400 and leaf.body["code"] == 2
    ca_id = created.body["id"]
    service = admin("POST", "/services", {"name": "verified", "url": "https://v.internal", "tls_verify": True,
                                          "ca_certificates": [ca_id]})
    assert service.status == 201, service.body
    in_use = admin("DELETE", f"/ca_certificates/{ca_id}")
    assert (in_use.status, in_use.body) == (400, {
        "code": 19, "name": "referenced by others",
        "message": f"ca certificate {ca_id} is still referenced by services (id = {service.body['id']})"})
    assert admin("PATCH", "/services/verified", {"ca_certificates": None}).status == 200
    assert admin("DELETE", f"/ca_certificates/{ca_id}").status == 204
    assert admin("GET", "/ca_certificates").body["data"] == []
