"""Server TLS: certificate choice by SNI, the default certificate, protocol limits, ALPN and reload swaps.

Handshakes are real: a uvloop server on 127.0.0.1:0 with `server_context(...)`, and Python's ssl
client. Certificates come from trustme (a throwaway CA) and cryptography.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import stat
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ringgate.config import Config, ConfigError, load_dict
from ringgate.tls import (
    INTERMEDIATE_CIPHERS,
    CertificateStore,
    CurrentStore,
    PemPair,
    build_context,
    default_certificate,
    generate_self_signed,
    selected_sni,
    server_context,
    validity_unchecked,
)

SHOP_ID = "0d8f3c52-1111-4f0e-9c3b-000000000001"
WILD_ID = "0d8f3c52-1111-4f0e-9c3b-000000000002"
SUFFIX_ID = "0d8f3c52-1111-4f0e-9c3b-000000000003"
DUAL_ID = "0d8f3c52-1111-4f0e-9c3b-000000000004"
FALLBACK_ID = "0d8f3c52-1111-4f0e-9c3b-000000000005"


def pair_of(leaf: trustme.LeafCert) -> PemPair:
    return PemPair(leaf.cert_chain_pems[0].bytes().decode(), leaf.private_key_pem.bytes().decode())


def der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)


@dataclass(frozen=True)
class Material:
    ca: trustme.CA
    shop: PemPair
    wild: PemPair
    suffix: PemPair
    dual_rsa: PemPair
    dual_ec: PemPair
    fallback: PemPair
    default: PemPair


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    ca = trustme.CA()
    return Material(
        ca=ca,
        shop=pair_of(ca.issue_cert("shop.example.com")),
        wild=pair_of(ca.issue_cert("*.api.example.com")),
        suffix=pair_of(ca.issue_cert("suffix-served.example.com")),
        dual_rsa=pair_of(ca.issue_cert("dual.example.com", key_type=trustme.KeyType.RSA)),
        dual_ec=pair_of(ca.issue_cert("dual.example.com")),
        fallback=pair_of(ca.issue_cert("fallback.example.com")),
        default=default_certificate(str(tmp_path_factory.mktemp("prefix"))),
    )


def certificates_config(material: Material, catch_all: bool = False) -> Config:
    m = material
    certificates: list[dict[str, Any]] = [
        {"id": SHOP_ID, "cert": m.shop.cert, "key": m.shop.key, "snis": ["shop.example.com"]},
        {"id": WILD_ID, "cert": m.wild.cert, "key": m.wild.key, "snis": [{"name": "*.api.example.com"}]},
        {"id": SUFFIX_ID, "cert": m.suffix.cert, "key": m.suffix.key},
        {"id": DUAL_ID, "cert": m.dual_rsa.cert, "key": m.dual_rsa.key, "cert_alt": m.dual_ec.cert,
         "key_alt": m.dual_ec.key, "snis": ["dual.example.com"]},
    ]  # fmt: skip
    snis = [{"name": "shop.*", "certificate": SUFFIX_ID}]
    if catch_all:
        certificates.append({"id": FALLBACK_ID, "cert": m.fallback.cert, "key": m.fallback.key, "snis": ["*"]})
    return load_dict({"_format_version": "3.0", "certificates": certificates, "snis": snis})


@pytest.fixture(scope="module")
def store(material: Material) -> CertificateStore:
    return CertificateStore.from_config(certificates_config(material), default=material.default)


# ----------------------------------------------------------------------------------------------
# Real handshakes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    peer_der: bytes
    alpn: str | None
    version: str
    cipher: str
    sni_seen: str  # what selected_sni() gave the server, echoed back


def client_context(material: Material | None = None, *, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> ssl.SSLContext:
    """Verifying client (CA trusted, hostname checked) when given the material, else one that accepts any cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if material is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        material.ca.configure_trust(context)
    context.set_alpn_protocols(list(alpn))
    return context


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str | None) -> Handshake:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(repr(selected_sni(writer.get_extra_info("ssl_object"))).encode())
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server)
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
        tls = writer.get_extra_info("ssl_object")
        echoed = await reader.read()
        writer.close()
        return Handshake(tls.getpeercert(binary_form=True), tls.selected_alpn_protocol(), tls.version(),
                         tls.cipher()[0], echoed.decode())  # fmt: skip
    finally:
        listener.close()


def handshake(server: ssl.SSLContext, name: str | None, client: ssl.SSLContext | None = None) -> Handshake:
    return uvloop.run(asyncio.wait_for(_handshake(server, client or client_context(), name), 5))


def test_exact_sni_gets_its_certificate_verified_by_the_client(material: Material, store: CertificateStore) -> None:
    result = handshake(server_context(store), "shop.example.com", client_context(material))
    assert result.peer_der == der(material.shop.cert)
    assert result.alpn == "http/1.1" and result.version == "TLSv1.3"
    assert result.sni_seen == "'shop.example.com'"


def test_sni_is_matched_without_regard_to_case(material: Material, store: CertificateStore) -> None:
    result = handshake(server_context(store), "SHOP.Example.COM", client_context(material))
    assert result.peer_der == der(material.shop.cert)
    assert result.sni_seen == "'shop.example.com'"


def test_wildcard_sni_serves_one_label_below_it(material: Material, store: CertificateStore) -> None:
    result = handshake(server_context(store), "v2.api.example.com", client_context(material))
    assert result.peer_der == der(material.wild.cert)
    # two labels below is not covered by "*.api.example.com" (as in Kong and in hostname checks)
    assert handshake(server_context(store), "a.v2.api.example.com").peer_der == der(material.default.cert)


def test_trailing_wildcard_sni(material: Material, store: CertificateStore) -> None:
    assert handshake(server_context(store), "shop.io").peer_der == der(material.suffix.cert)


def test_unknown_sni_gets_the_default_certificate(material: Material, store: CertificateStore) -> None:
    result = handshake(server_context(store), "unknown.example.org")
    assert result.peer_der == der(material.default.cert)
    assert result.sni_seen == "'unknown.example.org'"


def test_no_sni_gets_the_default_certificate(material: Material, store: CertificateStore) -> None:
    result = handshake(server_context(store), None)
    assert result.peer_der == der(material.default.cert)
    assert result.sni_seen == "None"
    default = x509.load_pem_x509_certificate(material.default.cert.encode())
    assert default.subject.rfc4514_string() == "CN=localhost"


def test_catch_all_sni_answers_unknown_names_but_not_clients_without_sni(material: Material) -> None:
    with_catch_all = CertificateStore.from_config(certificates_config(material, catch_all=True), material.default)
    assert handshake(server_context(with_catch_all), "unknown.example.org").peer_der == der(material.fallback.cert)
    # Kong serves its default certificate, not the "*" one, when the client sends no SNI
    assert handshake(server_context(with_catch_all), None).peer_der == der(material.default.cert)


def test_tls12_works_with_a_forward_secret_aead_cipher(material: Material, store: CertificateStore) -> None:
    client = client_context(material)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(server_context(store), "shop.example.com", client)
    assert result.version == "TLSv1.2" and result.peer_der == der(material.shop.cert)
    assert result.cipher.startswith("ECDHE-") and ("GCM" in result.cipher or "CHACHA20" in result.cipher)


def test_cert_alt_serves_the_key_type_the_client_can_use(material: Material, store: CertificateStore) -> None:
    served = {}
    for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"):
        client = client_context(material)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        client.set_ciphers(cipher)
        served[cipher] = handshake(server_context(store), "dual.example.com", client).peer_der
    assert served["ECDHE-ECDSA-AES128-GCM-SHA256"] == der(material.dual_ec.cert)
    assert served["ECDHE-RSA-AES128-GCM-SHA256"] == der(material.dual_rsa.cert)


def test_alpn_negotiates_http11_only(store: CertificateStore) -> None:
    assert handshake(server_context(store), "shop.example.com", client_context(alpn=("http/1.1",))).alpn == "http/1.1"
    # a client that offers only h2 gets no ALPN answer, and the handshake still completes
    assert handshake(server_context(store), "shop.example.com", client_context(alpn=("h2",))).alpn is None


def _tls11_client() -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = client_context()
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer TLS 1.1 at all
    return client


def _memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> tuple[Exception | None, bool]:
    """Both ends over memory BIOs: (the server's handshake error or None, whether the client finished)."""
    to_server, to_client, server_out, client_out = (ssl.MemoryBIO() for _ in range(4))
    server_end = server.wrap_bio(to_server, server_out, server_side=True)
    client_end = client.wrap_bio(to_client, client_out, server_hostname=name)
    client_done = False
    for _ in range(10):
        try:
            client_end.do_handshake()
            client_done = True
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        to_server.write(client_out.read())
        try:
            server_end.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return exc, client_done
        to_client.write(server_out.read())
        if client_done:
            return None, True
    return None, client_done


def test_tls11_is_refused(material: Material, store: CertificateStore, tmp_path: Path) -> None:
    control = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        control.minimum_version = ssl.TLSVersion.TLSv1
    control.set_ciphers("DEFAULT:@SECLEVEL=0")
    (tmp_path / "c.pem").write_text(material.shop.cert)
    (tmp_path / "k.pem").write_text(material.shop.key)
    control.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    try:
        accepted = handshake(control, "shop.example.com", _tls11_client())
    except (ssl.SSLError, ConnectionError) as exc:
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 even to a permissive server: {exc}")
    assert accepted.version == "TLSv1.1"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server_context(store), "shop.example.com", _tls11_client())
    # asyncio drops the connection without flushing the alert; in memory the server's reason shows
    error, client_done = _memory_handshake(server_context(store), _tls11_client(), "shop.example.com")
    assert isinstance(error, ssl.SSLError) and error.reason == "UNSUPPORTED_PROTOCOL" and not client_done


def test_reload_swaps_certificates_for_new_handshakes_only(material: Material, store: CertificateStore) -> None:
    current = CurrentStore(store)
    listener = server_context(current)
    assert handshake(listener, "shop.example.com").peer_der == der(material.shop.cert)
    swapped = load_dict({"_format_version": "3.0", "certificates": [
        {"cert": material.fallback.cert, "key": material.fallback.key, "snis": ["shop.example.com"]},
    ]})  # fmt: skip
    current.replace(CertificateStore.from_config(swapped, material.default))
    assert handshake(listener, "shop.example.com").peer_der == der(material.fallback.cert)
    # the old store is untouched: its contexts are never changed, only the reference moved
    assert store.lookup("shop.example.com").id == SHOP_ID


def test_the_listener_offers_only_tls12_and_13_with_intermediate_ciphers(store: CertificateStore) -> None:
    listener = server_context(store)
    assert listener.minimum_version == ssl.TLSVersion.TLSv1_2
    assert listener.maximum_version == ssl.TLSVersion.TLSv1_3
    tls12 = [c["name"] for c in listener.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and set(tls12) <= set(INTERMEDIATE_CIPHERS.split(":"))
    assert all(name.startswith(("ECDHE-", "DHE-")) for name in tls12)


# ----------------------------------------------------------------------------------------------
# The store without sockets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("shop.example.com", SHOP_ID),
        ("x.api.example.com", WILD_ID),
        ("api.example.com", None),  # "*.api.example.com" needs a label in front
        ("a.b.api.example.com", None),
        ("shop.net", SUFFIX_ID),
        ("www.shop.net", None),  # "shop.*" replaces only the last label of a two-label name
        ("dual.example.com", DUAL_ID),
        ("localhost", None),
        ("", None),
        (None, None),
    ],
)
def test_lookup_order(store: CertificateStore, name: str | None, expected: str | None) -> None:
    assert store.lookup(name).id == expected
    assert store.context_for(name) is store.lookup(name).context


def test_exact_name_beats_wildcards(material: Material) -> None:
    config = load_dict({"_format_version": "3.0", "certificates": [
        {"cert": material.wild.cert, "key": material.wild.key, "snis": ["*.api.example.com", "v1.*"]},
        {"id": SHOP_ID, "cert": material.shop.cert, "key": material.shop.key, "snis": ["v1.api.example.com", "v1.io"]},
    ]})  # fmt: skip
    store = CertificateStore.from_config(config, material.default)
    assert store.lookup("v1.api.example.com").id == SHOP_ID and store.lookup("v1.io").id == SHOP_ID
    assert store.lookup("v2.api.example.com").id != SHOP_ID and store.lookup("v1.dev").id != SHOP_ID


def test_store_rejects_certificates_expired_since_the_config_was_loaded(material: Material) -> None:
    config = certificates_config(material)
    later = datetime.now(UTC) + timedelta(days=365 * 2000)
    with pytest.raises(ConfigError) as caught:
        CertificateStore.from_config(config, material.default, now=later)
    messages = caught.value.messages
    assert len(messages) == 5  # four certificates, the dual one twice (cert and cert_alt)
    assert messages[0].startswith(
        f"certificate {SHOP_ID} (snis 'shop.example.com'): cert: certificate expired, \"Not After\" time is in the past"
    )
    assert messages[2].startswith(f"certificate {SUFFIX_ID} (snis 'shop.*'): cert: ")
    assert any(m.startswith(f"certificate {DUAL_ID} (snis 'dual.example.com'): cert_alt: ") for m in messages)


def test_a_trusted_snapshot_with_a_lapsed_certificate_still_loads_and_serves(
    material: Material, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    lapsed = pair_of(material.ca.issue_cert("old.example.com", not_before=now - timedelta(days=30),
                                             not_after=now - timedelta(days=1)))  # fmt: skip
    document = {"_format_version": "3.0", "certificates": [
        {"id": SHOP_ID, "cert": lapsed.cert, "key": lapsed.key, "snis": ["old.example.com"]},
    ]}  # fmt: skip
    with pytest.raises(ConfigError):
        load_dict(document)  # what a user submits is checked
    with validity_unchecked():
        config = load_dict(document)
        with caplog.at_level("WARNING", logger="ringgate.tls"):
            store = CertificateStore.from_config(config, material.default)
    assert f"certificate {SHOP_ID} (snis 'old.example.com'): certificate expired" in caplog.text
    assert handshake(server_context(store), "old.example.com").peer_der == der(lapsed.cert)
    with pytest.raises(ConfigError):
        CertificateStore.from_config(config, material.default)  # the switch ends with the block


def test_store_without_a_default_makes_one_per_process(material: Material) -> None:
    first = CertificateStore.from_config(certificates_config(material))
    second = CertificateStore.from_config(certificates_config(material))
    peer = handshake(server_context(first), None).peer_der
    assert peer == handshake(server_context(second), None).peer_der
    assert peer != der(material.default.cert)


# ----------------------------------------------------------------------------------------------
# The default certificate under the prefix
# ----------------------------------------------------------------------------------------------


def test_default_certificate_is_persisted_private_and_reused(tmp_path: Path) -> None:
    first = default_certificate(str(tmp_path))
    assert default_certificate(str(tmp_path)) == first
    key_mode = stat.S_IMODE(os.stat(tmp_path / "ssl" / "default.key").st_mode)
    assert key_mode == 0o600
    assert (tmp_path / "ssl" / "default.crt").read_text() == first.cert
    leaf = x509.load_pem_x509_certificate(first.cert.encode())
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=360) < lifetime < timedelta(days=370)
    build_context(first)  # OpenSSL takes it


def test_default_certificate_is_replaced_when_expiring_or_broken(tmp_path: Path) -> None:
    ssl_dir = tmp_path / "ssl"
    ssl_dir.mkdir()
    expiring = generate_self_signed(days=3)
    (ssl_dir / "default.crt").write_text(expiring.cert)
    (ssl_dir / "default.key").write_text(expiring.key)
    renewed = default_certificate(str(tmp_path))
    assert renewed != expiring
    (ssl_dir / "default.key").write_text(generate_self_signed().key)  # no longer matches the certificate
    assert default_certificate(str(tmp_path)) not in (renewed, expiring)


def _default_in_child(prefix: str, results: Any) -> None:
    results.put(default_certificate(prefix).cert)


def test_workers_starting_together_agree_on_one_default(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_default_in_child, args=(str(tmp_path), results)) for _ in range(4)]
    for child in children:
        child.start()
    certs = {results.get(timeout=10) for _ in children}
    for child in children:
        child.join(timeout=10)
    assert len(certs) == 1
    assert certs == {(tmp_path / "ssl" / "default.crt").read_text()}
