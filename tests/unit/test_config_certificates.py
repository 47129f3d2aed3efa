"""certificates, snis and ca_certificates in kong.yml: loading, references, uniqueness and Kong's rejections."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ringgate.config import ConfigError, load_dict

CERT_ID = "8f5c3c9c-6b0e-4d7e-9a51-2f0d9d7f1a01"
OTHER_ID = "8f5c3c9c-6b0e-4d7e-9a51-2f0d9d7f1a02"


def pem_pair(leaf: trustme.LeafCert) -> dict[str, str]:
    return {"cert": leaf.cert_chain_pems[0].bytes().decode(), "key": leaf.private_key_pem.bytes().decode()}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def shop(ca: trustme.CA) -> dict[str, str]:
    return pem_pair(ca.issue_cert("shop.example.com"))


@pytest.fixture(scope="module")
def other(ca: trustme.CA) -> dict[str, str]:
    return pem_pair(ca.issue_cert("other.example.com"))


@pytest.fixture(scope="module")
def rsa(ca: trustme.CA) -> dict[str, str]:
    return pem_pair(ca.issue_cert("shop.example.com", key_type=trustme.KeyType.RSA))


def doc(**collections: Any) -> dict[str, Any]:
    return {"_format_version": "3.0", **collections}


def rejected(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_dict(document)
    return caught.value.messages


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_nested_snis_as_records_or_names_and_top_level_snis(shop: dict[str, str], other: dict[str, str]) -> None:
    config = load_dict(
        doc(
            certificates=[
                {**shop, "id": CERT_ID, "tags": ["edge"], "snis": ["shop.example.com", {"name": "*.shop.example.com"}]},
                {**other, "id": OTHER_ID},
            ],
            snis=[
                {"name": "other.example.com", "certificate": OTHER_ID, "tags": ["t"]},
                {"name": "api.*", "certificate": {"id": OTHER_ID}},
            ],
        )
    )
    assert [c.id for c in config.certificates] == [CERT_ID, OTHER_ID]
    assert config.certificates[0].tags == ("edge",) and config.certificates[0].cert == shop["cert"]
    assert [(s.name, s.certificate) for s in config.snis] == [
        ("shop.example.com", CERT_ID), ("*.shop.example.com", CERT_ID),
        ("other.example.com", OTHER_ID), ("api.*", OTHER_ID),
    ]  # fmt: skip
    # an SNI without an id gets Kong's stable one, derived from its name
    again = load_dict(doc(certificates=[{**shop, "snis": ["shop.example.com"]}]))
    assert again.snis[0].id == load_dict(doc(certificates=[{**shop, "snis": ["shop.example.com"]}])).snis[0].id


def test_certificates_round_trip_through_to_dict_with_the_same_hash(shop: dict[str, str], ca: trustme.CA) -> None:
    ca_pem = ca.cert_pem.bytes().decode()
    config = load_dict(doc(certificates=[{**shop, "snis": ["shop.example.com"]}], ca_certificates=[{"cert": ca_pem}]))
    document = config.to_dict()
    assert [s["name"] for s in document["snis"]] == ["shop.example.com"]
    assert document["snis"][0]["certificate"] == config.certificates[0].id
    assert "snis" not in document["certificates"][0]
    assert load_dict(document).config_hash == config.config_hash
    # collections left empty stay out, so configs without TLS keep their hash
    assert "certificates" not in load_dict(doc()).to_dict()


def test_certificate_changes_change_the_hash(shop: dict[str, str], other: dict[str, str]) -> None:
    first = load_dict(doc(certificates=[{**shop, "snis": ["shop.example.com"]}]))
    assert load_dict(doc(certificates=[{**other, "snis": ["shop.example.com"]}])).config_hash != first.config_hash
    assert load_dict(doc(certificates=[{**shop, "snis": ["shop2.example.com"]}])).config_hash != first.config_hash


def test_ca_certificate_digest_is_computed_whatever_the_input_says(ca: trustme.CA) -> None:
    pem = ca.cert_pem.bytes().decode()
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    config = load_dict(doc(ca_certificates=[{"cert": pem, "cert_digest": "00" * 32, "tags": ["ca"]}]))
    assert config.ca_certificates[0].cert_digest == hashlib.sha256(der).hexdigest()


def test_cert_alt_of_another_key_type_is_accepted(shop: dict[str, str], rsa: dict[str, str]) -> None:
    config = load_dict(doc(certificates=[{**rsa, "cert_alt": shop["cert"], "key_alt": shop["key"]}]))
    assert config.certificates[0].cert_alt == shop["cert"]


def test_service_and_upstream_client_certificate_references_resolve(shop: dict[str, str]) -> None:
    config = load_dict(
        doc(
            certificates=[{**shop, "id": CERT_ID}],
            services=[{"name": "s", "url": "https://example.com", "client_certificate": {"id": CERT_ID}}],
            upstreams=[{"name": "u.internal", "client_certificate": CERT_ID}],
        )
    )
    assert config.services[0].client_certificate == CERT_ID
    assert config.upstreams[0].client_certificate == CERT_ID
    assert rejected(doc(services=[{"name": "s", "url": "https://example.com", "client_certificate": OTHER_ID}])) == [
        f"services[0] (name 's') > client_certificate: invalid reference 'client_certificate: {OTHER_ID}' "
        "(no such entry in 'certificates')"
    ]


def test_route_snis_take_wildcards_and_only_with_https() -> None:
    routes = [{"name": "r", "protocols": ["https"], "snis": ["*.shop.example.com", "shop.*", "a.example.com"]}]
    config = load_dict(doc(services=[{"name": "s", "host": "h", "routes": routes}]))
    assert config.routes[0].snis == ("*.shop.example.com", "shop.*", "a.example.com")
    http_only = [{"name": "r", "protocols": ["http"], "paths": ["/"], "snis": ["a.example.com"]}]
    assert rejected(doc(services=[{"name": "s", "host": "h", "routes": http_only}])) == [
        "services[0] (name 's') > routes[0] (name 'r') > snis: 'snis' can only be set when 'protocols' is "
        "'grpcs', 'https', 'tls', 'tls_passthrough', or 'wss'"
    ]


# ----------------------------------------------------------------------------------------------
# Rejections
# ----------------------------------------------------------------------------------------------


def test_key_that_does_not_match_names_the_certificate_id_and_its_snis(
    shop: dict[str, str], other: dict[str, str]
) -> None:
    document = doc(
        certificates=[{"cert": shop["cert"], "key": other["key"], "id": CERT_ID, "snis": ["shop.example.com"]}],
        snis=[{"name": "www.shop.example.com", "certificate": CERT_ID}],
    )
    assert rejected(document) == [
        f"certificates[0] (id '{CERT_ID}', snis 'shop.example.com', 'www.shop.example.com'): "
        "certificate does not match key"
    ]
    with pytest.raises(ConfigError) as caught:
        load_dict(document)
    [entry] = caught.value.flattened()
    assert entry["entity_type"] == "certificate" and entry["entity_id"] == CERT_ID
    assert entry["errors"] == [{"type": "entity", "message": "certificate does not match key"}]


def test_expired_and_not_yet_valid_certificates_are_rejected(ca: trustme.CA) -> None:
    now = datetime.now(UTC)
    expired = pem_pair(ca.issue_cert("old.example.com", not_before=now - timedelta(days=30),
                                     not_after=now - timedelta(days=1)))  # fmt: skip
    future = pem_pair(ca.issue_cert("new.example.com", not_before=now + timedelta(days=1),
                                    not_after=now + timedelta(days=30)))  # fmt: skip
    messages = rejected(doc(certificates=[{**expired, "snis": ["old.example.com"]}, future]))
    assert len(messages) == 2, messages
    assert messages[0].startswith(
        "certificates[0] (snis 'old.example.com') > cert: certificate expired, \"Not After\" time is in the past ("
    )
    assert messages[1].startswith(
        'certificates[1] > cert: certificate is not valid yet, "Not Before" time is in the future ('
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"cert": "not a pem"}, [" > cert: invalid certificate: not a PEM-encoded X.509 certificate"]),
        ({"key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
         [" > key: invalid key: not a PEM-encoded private key"]),
        ({"cert": ""}, [" > cert: length must be at least 1"]),
        ({"cert": None}, [" > cert: required field missing"]),
        ({"key": 5}, [" > key: expected a string"]),
        ({"cert_alt": "x"}, [": all or none of these fields must be set: 'cert_alt', 'key_alt'",
                             " > cert_alt: invalid certificate: not a PEM-encoded X.509 certificate"]),
        ({"nope": 1}, [" > nope: unknown field"]),
    ],
)  # fmt: skip
def test_certificate_field_rejections(shop: dict[str, str], fields: dict[str, Any], expected: list[str]) -> None:
    assert rejected(doc(certificates=[{**shop, **fields}])) == ["certificates[0]" + text for text in expected]


def test_encrypted_key_is_rejected_with_the_reason(shop: dict[str, str]) -> None:
    key = serialization.load_pem_private_key(shop["key"].encode(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ).decode()  # fmt: skip
    assert rejected(doc(certificates=[{**shop, "key": encrypted}])) == [
        "certificates[0] > key: invalid key: the key is encrypted; give it unencrypted, as Kong expects"
    ]


def test_alternative_pair_rules(shop: dict[str, str], other: dict[str, str], rsa: dict[str, str]) -> None:
    same_type = {**shop, "cert_alt": other["cert"], "key_alt": other["key"]}
    assert rejected(doc(certificates=[same_type])) == [
        "certificates[0]: certificate and alternative certificate need to have different type (e.g. RSA and "
        "ECDSA), the provided certificates were both of the same type"
    ]
    mismatched = {**rsa, "cert_alt": shop["cert"], "key_alt": other["key"]}
    assert rejected(doc(certificates=[mismatched])) == ["certificates[0]: alternative certificate does not match key"]


def test_an_sni_name_used_twice_is_a_uniqueness_violation(shop: dict[str, str], other: dict[str, str]) -> None:
    messages = rejected(
        doc(
            certificates=[{**shop, "id": CERT_ID, "snis": ["shop.example.com"]},
                          {**other, "snis": ["shop.example.com"]}],
            snis=[{"name": "shop.example.com", "certificate": CERT_ID}],
        )
    )  # fmt: skip
    assert messages == [
        "certificates[1] (snis 'shop.example.com') > snis[0] (name 'shop.example.com'): "
        "uniqueness violation: 'snis' entity with name set to 'shop.example.com' already declared",
        "snis[0] (name 'shop.example.com'): "
        "uniqueness violation: 'snis' entity with name set to 'shop.example.com' already declared",
    ]


def test_sni_references_and_links(shop: dict[str, str]) -> None:
    assert rejected(doc(snis=[{"name": "a.example.com", "certificate": CERT_ID}])) == [
        f"snis[0] (name 'a.example.com') > certificate: invalid reference 'certificate: {CERT_ID}' "
        "(no such entry in 'certificates')"
    ]
    assert rejected(doc(snis=[{"name": "a.example.com"}])) == [
        "snis[0] (name 'a.example.com') > certificate: required field missing"
    ]
    nested_with_link = {**shop, "id": CERT_ID, "snis": [{"name": "a.example.com", "certificate": CERT_ID}]}
    assert rejected(doc(certificates=[nested_with_link])) == [
        f"certificates[0] (id '{CERT_ID}', snis 'a.example.com') > snis[0] (name 'a.example.com') > certificate: "
        "value must be null: a nested entry is linked to its parent automatically"
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a.*.example.com", "wildcard must be leftmost or rightmost character"),
        ("*.example.*", "only one wildcard must be specified"),
        ("10.0.0.1", "must not be an IP"),
        ("a.example.com:443", "must not have a port"),
        ("bad name", "invalid value: bad name"),
    ],
)
def test_sni_name_rules(shop: dict[str, str], name: str, message: str) -> None:
    assert rejected(doc(certificates=[{**shop, "snis": [name]}])) == [
        f"certificates[0] (snis '{name}') > snis[0] (name '{name}') > name: {message}"
    ]


def test_catch_all_and_suffix_wildcard_names_are_valid(shop: dict[str, str]) -> None:
    config = load_dict(doc(certificates=[{**shop, "snis": ["*", "shop.*", "*.shop.example.com"]}]))
    assert [s.name for s in config.snis] == ["*", "shop.*", "*.shop.example.com"]


def test_ca_certificate_rejections(ca: trustme.CA, shop: dict[str, str]) -> None:
    ca_pem = ca.cert_pem.bytes().decode()
    now = datetime.now(UTC)
    expired_ca = trustme.CA()
    expired_leaf = expired_ca.issue_cert("x.example.com", not_before=now - timedelta(days=3),
                                         not_after=now - timedelta(days=1))  # fmt: skip
    cases = [
        (shop["cert"], 'certificate does not appear to be a CA because it is missing the "CA" basic constraint'),
        (ca_pem + ca_pem, "please submit only one certificate at a time"),
        ("garbage", None),
        (expired_leaf.cert_chain_pems[0].bytes().decode(), 'certificate expired, "Not After" time is in the past'),
    ]
    for pem, message in cases:
        expected = message and f"ca_certificates[0]: {message}"
        expected = expected or "ca_certificates[0] > cert: invalid certificate: not a PEM-encoded X.509 certificate"
        assert rejected(doc(ca_certificates=[{"cert": pem}])) == [expected]
    duplicate = rejected(doc(ca_certificates=[{"cert": ca_pem}, {"cert": ca_pem, "tags": ["again"]}]))
    assert len(duplicate) == 1 and duplicate[0].startswith(
        "ca_certificates[1]: uniqueness violation: 'ca_certificates' entity with cert_digest set to '"
    )
