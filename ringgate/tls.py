"""Server-side TLS: certificates from the config, chosen per connection by the client's SNI.

* PEM checks (`certificate_problems`, `ca_certificate_problems`) shared by the config schema,
  so `ringgate check` and the Admin API report a bad certificate at load, and by the store.
* `CertificateStore`: one SSLContext per certificate, built once and never changed, found by
  server name through dicts: exact name, then "*.rest.of.name", then "name.*", then the SNI "*".
* `server_context`: the listener's SSLContext. Its SNI callback reads the current store through
  one replaceable reference (`CurrentStore`), so a reload swaps certificates for new handshakes
  while handshakes in progress keep the context they were given.
* The default certificate, served to clients without SNI or with an unknown name when the
  config has no "*" SNI: a self-signed one kept under `<prefix>/ssl/`, so all workers serve the
  same one (Kong generates its default certificate at start the same way).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from ringgate.config.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes

    from ringgate.config.declarative import Config

log = logging.getLogger("ringgate.tls")

# Mozilla's "intermediate" profile (v5.7) for TLS 1.2; TLS 1.3 keeps OpenSSL's suites, which are
# the same three the profile lists (Python cannot set them anyway).
INTERMEDIATE_CIPHERS: Final = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))  # fmt: skip
# Ringgate speaks HTTP/1.1 only; a client offering just h2 gets no ALPN answer and may fall back.
ALPN_PROTOCOLS: Final = ("http/1.1",)
# Kong's catch-all SNI: its certificate answers every name no other SNI matches.
CATCH_ALL_SNI: Final = "*"

SSL_DIR: Final = "ssl"
DEFAULT_CERT_FILE: Final = "default.crt"
DEFAULT_KEY_FILE: Final = "default.key"
DEFAULT_CERT_DAYS: Final = 365
# Regenerate a persisted default certificate this close to its end, so it never lapses while serving.
DEFAULT_CERT_RENEW_BEFORE: Final = timedelta(days=7)

# Where the SNI callback leaves the client's (lowercased) server name on the SSL object.
_SNI_ATTRIBUTE: Final = "_ringgate_sni"

# Off only inside `validity_unchecked()`.
_check_validity: ContextVar[bool] = ContextVar("ringgate_tls_check_validity", default=True)

# (field path, message); an empty path means the whole entity (the shape ringgate.config uses).
FieldProblems = list[tuple[tuple[str | int, ...], str]]


# --------------------------------------------------------------------------------------------
# PEM checks (used by the config schema, so every message is one shown to the user)
# --------------------------------------------------------------------------------------------


class PemError(ValueError):
    """A PEM value that cannot be used; the text is the reason, without the field name."""


@dataclass(frozen=True, slots=True)
class PemPair:
    """A certificate chain (leaf first) and its private key, both PEM text."""

    cert: str
    key: str


def load_certificate_chain(pem: str) -> list[x509.Certificate]:
    """Every certificate in `pem`, leaf first. Raises PemError."""
    try:
        chain = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise PemError("not a PEM-encoded X.509 certificate") from None
    if not chain:  # pragma: no cover - cryptography raises for an empty bundle
        raise PemError("no certificate found")
    return chain


def load_private_key(pem: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key in `pem`. Raises PemError."""
    try:
        # The RSA consistency check costs ~60 ms per 2048-bit key; a key that fails it still has to
        # match the certificate's public key (checked next), and OpenSSL checks the pair again on load.
        return serialization.load_pem_private_key(pem.encode(), password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise PemError("the key is encrypted; give it unencrypted, as Kong expects") from None
    except ValueError:
        raise PemError("not a PEM-encoded private key") from None
    except UnsupportedAlgorithm as exc:
        raise PemError(f"unsupported key ({exc})") from None


def _key_kind(key: CertificatePublicKeyTypes) -> str:
    for kind, base in (
        ("RSA", rsa.RSAPublicKey), ("EC", ec.EllipticCurvePublicKey), ("Ed25519", ed25519.Ed25519PublicKey),
        ("Ed448", ed448.Ed448PublicKey), ("DSA", dsa.DSAPublicKey),
    ):  # fmt: skip
        if isinstance(key, base):
            return kind
    return type(key).__name__


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    return _public_der(certificate.public_key()) == _public_der(key.public_key())  # type: ignore[arg-type]


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@contextlib.contextmanager
def validity_unchecked() -> Iterator[None]:
    """Accept expired and not-yet-valid certificates while inside (config loading and the store).

    For a snapshot that was checked when it was written: a worker that restarts or reloads after
    a certificate lapsed must still start and serve (it logs a warning), not crash-loop the node.
    A config given by the user (kong.yml, the Admin API) is always checked.
    """
    token = _check_validity.set(False)
    try:
        yield
    finally:
        _check_validity.reset(token)


def validity_problem(certificate: x509.Certificate, now: datetime | None = None) -> str | None:
    """Why `certificate` cannot be served at `now` (expired, or not valid yet), or None."""
    now = now or datetime.now(UTC)
    not_after = certificate.not_valid_after_utc
    if not_after < now:
        return f'certificate expired, "Not After" time is in the past ({_when(not_after)})'
    not_before = certificate.not_valid_before_utc
    if not_before > now:
        return f'certificate is not valid yet, "Not Before" time is in the future ({_when(not_before)})'
    return None


def certificate_problems(
    cert: str, key: str, cert_alt: str | None = None, key_alt: str | None = None, now: datetime | None = None
) -> FieldProblems:
    """Kong's certificate checks plus Ringgate's validity check; an empty field path means the entity.

    Texts: "invalid certificate: ...", "invalid key: ..." (fields), "certificate does not match key",
    "alternative certificate does not match key" and the same-key-type rule (entity), as Kong words
    them; an expired or not-yet-valid leaf is Ringgate's own rejection (Kong would serve it).
    """
    problems: FieldProblems = []

    def leaf_of(field: str, pem: str | None) -> x509.Certificate | None:
        if pem is None:
            return None
        try:
            leaf = load_certificate_chain(pem)[0]
        except PemError as exc:
            problems.append(((field,), f"invalid certificate: {exc}"))
            return None
        reason = validity_problem(leaf, now)
        if reason is not None and _check_validity.get():
            problems.append(((field,), reason))
        return leaf

    def key_of(field: str, pem: str | None) -> PrivateKeyTypes | None:
        if pem is None:
            return None
        try:
            return load_private_key(pem)
        except PemError as exc:
            problems.append(((field,), f"invalid key: {exc}"))
            return None

    leaf, private = leaf_of("cert", cert), key_of("key", key)
    alt_leaf, alt_private = leaf_of("cert_alt", cert_alt), key_of("key_alt", key_alt)
    if leaf is not None and private is not None and not key_matches(leaf, private):
        problems.append(((), "certificate does not match key"))
    if alt_leaf is not None and alt_private is not None and not key_matches(alt_leaf, alt_private):
        problems.append(((), "alternative certificate does not match key"))
    if leaf is not None and alt_leaf is not None and _key_kind(leaf.public_key()) == _key_kind(alt_leaf.public_key()):
        same_type = (
            "certificate and alternative certificate need to have different type (e.g. RSA and ECDSA), "
            "the provided certificates were both of the same type"
        )
        problems.append(((), same_type))
    return problems


_BEGIN_CERTIFICATE: Final = "-----BEGIN CERTIFICATE-----"


def ca_certificate_problems(cert: str, now: datetime | None = None) -> FieldProblems:
    """Kong's ca_certificates checks, in Kong's order and words."""
    if cert.count(_BEGIN_CERTIFICATE) > 1:
        return [((), "please submit only one certificate at a time")]
    try:
        certificate = load_certificate_chain(cert)[0]
    except PemError as exc:
        return [(("cert",), f"invalid certificate: {exc}")]
    if certificate.not_valid_after_utc < (now or datetime.now(UTC)) and _check_validity.get():
        return [((), 'certificate expired, "Not After" time is in the past')]
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return [((), 'certificate does not appear to be a CA because it is missing the "CA" basic constraint')]
    return []


def ca_certificate_digest(cert: str) -> str:
    """Kong's cert_digest: hex SHA-256 of the certificate's DER form."""
    certificate = load_certificate_chain(cert)[0]
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


# --------------------------------------------------------------------------------------------
# SSL contexts
# --------------------------------------------------------------------------------------------


def _base_context() -> ssl.SSLContext:
    """Every server context gets the same protocol settings: after an SNI switch OpenSSL reads the
    ALPN callback (and more) from the context switched to, not from the listener's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    # Client-initiated TLS 1.2 renegotiation only costs the server CPU; nothing here needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


@functools.cache
def _proc_fd_usable() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def _pem_path(pem: str) -> Iterator[str]:
    """A path OpenSSL can read `pem` from: an anonymous memory file where the platform has one (the
    key never touches a disk), else a private temporary file removed right after."""
    data = pem.encode()
    if _proc_fd_usable():
        fd = os.memfd_create("ringgate-pem", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="ringgate-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        yield path
    finally:
        os.unlink(path)


def load_pair(context: ssl.SSLContext, pair: PemPair) -> None:
    """Add a certificate chain and key to `context` (a second pair of another key type adds, not replaces)."""
    with _pem_path(pair.cert) as cert_path, _pem_path(pair.key) as key_path:
        context.load_cert_chain(cert_path, key_path)


def build_context(*pairs: PemPair) -> ssl.SSLContext:
    context = _base_context()
    for pair in pairs:
        load_pair(context, pair)
    return context


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class ServedCertificate:
    """One configured certificate, ready to serve. `id` is None for the default certificate."""

    id: str | None
    snis: tuple[str, ...]
    context: ssl.SSLContext
    not_after: datetime


def _describe(certificate_id: str, snis: tuple[str, ...]) -> str:
    names = ", ".join(f"'{name}'" for name in snis) if snis else "no SNI"
    return f"certificate {certificate_id} (snis {names})"


class CertificateStore:
    """Certificates by server name. Immutable once built: a reload builds a new store."""

    __slots__ = ("_by_name", "_fallback", "certificates", "default")

    def __init__(self, certificates: tuple[ServedCertificate, ...], default: ServedCertificate) -> None:
        self.certificates = certificates
        self.default = default
        by_name: dict[str, ServedCertificate] = {}
        for served in certificates:
            for name in served.snis:
                # Names are unique in a valid config; setdefault keeps the first of two that differ by case.
                by_name.setdefault(name.lower(), served)
        self._by_name = by_name
        self._fallback = by_name.get(CATCH_ALL_SNI, default)

    @classmethod
    def from_config(
        cls, config: Config, default: PemPair | None = None, now: datetime | None = None, source: str = "certificates"
    ) -> CertificateStore:
        """Check and load every certificate of `config`; ConfigError names each bad one with its SNIs.

        `default` is the certificate for clients without SNI or with an unknown name (see
        `default_certificate`); without one, a self-signed certificate made once per process is used.
        Inside `validity_unchecked()` a lapsed certificate is served with a warning instead.

        Cost: OpenSSL takes about 2.5 ms (EC) to 7.5 ms (RSA 2048) per certificate to load; CPython
        runs that mostly without the GIL, so a worker can build a large store in a thread.
        """
        names: dict[str, list[str]] = {}
        for sni in config.snis:
            names.setdefault(sni.certificate, []).append(sni.name)
        messages: list[str] = []
        served: list[ServedCertificate] = []
        for certificate in config.certificates:
            snis = tuple(names.get(certificate.id, ()))
            label = _describe(certificate.id, snis)
            problems = certificate_problems(
                certificate.cert, certificate.key, certificate.cert_alt, certificate.key_alt, now
            )
            if problems:
                messages += [f"{label}: {''.join(f'{part}: ' for part in path)}{text}" for path, text in problems]
                continue
            pairs = [PemPair(certificate.cert, certificate.key)]
            if certificate.cert_alt is not None and certificate.key_alt is not None:
                pairs.append(PemPair(certificate.cert_alt, certificate.key_alt))
            try:
                context = build_context(*pairs)
            except ssl.SSLError as exc:
                messages.append(f"{label}: OpenSSL refused it: {exc}")
                continue
            leaf = load_certificate_chain(certificate.cert)[0]
            lapsed = validity_problem(leaf, now)
            if lapsed is not None:  # only reached inside validity_unchecked()
                log.warning("%s: %s; serving it anyway", label, lapsed)
            served.append(ServedCertificate(certificate.id, snis, context, leaf.not_valid_after_utc))
        if messages:
            raise ConfigError(source, messages)
        return cls(tuple(served), _serve_default(default or process_default_certificate()))

    def lookup(self, server_name: str | None) -> ServedCertificate:
        """The certificate for a client's server name, as Kong picks it.

        No SNI: the default. Else the exact name, then "*" + the name without its first label
        (only for names of three labels or more, so "*.a.com" serves "x.a.com" but not "a.com"
        nor "y.x.a.com"), then the name with its last label replaced by "*" ("a.*"), then the
        SNI "*" if configured, else the default.
        """
        if server_name is None:
            return self.default
        by_name = self._by_name
        name = server_name.lower()
        found = by_name.get(name)
        if found is not None:
            return found
        first_dot = name.find(".")
        if first_dot > 0 and name.find(".", first_dot + 1) > first_dot + 1:
            found = by_name.get("*" + name[first_dot:])
            if found is not None:
                return found
        last_dot = name.rfind(".")
        if last_dot > 0:
            found = by_name.get(name[: last_dot + 1] + "*")
            if found is not None:
                return found
        return self._fallback

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        return self.lookup(server_name).context


def _serve_default(pair: PemPair) -> ServedCertificate:
    leaf = load_certificate_chain(pair.cert)[0]
    return ServedCertificate(None, (), build_context(pair), leaf.not_valid_after_utc)


class CurrentStore:
    """The one reference the SNI callback reads. `replace` is a single attribute store: handshakes
    already past their callback keep the context they were given; the next ones see the new store."""

    __slots__ = ("store",)

    def __init__(self, store: CertificateStore) -> None:
        self.store = store

    def replace(self, store: CertificateStore) -> None:
        self.store = store


def certificates_fingerprint(config: Config) -> tuple[object, ...]:
    """What a node's store is built from. A reload with the same fingerprint keeps the store it has
    (loading costs milliseconds per certificate; most reloads change routes, not certificates)."""
    return (
        tuple((c.id, c.cert, c.key, c.cert_alt, c.key_alt) for c in config.certificates),
        tuple((sni.name, sni.certificate) for sni in config.snis),
    )


def node_store(config: Config, prefix: str) -> CertificateStore:
    """The certificates a node serves: the config's, and the default kept under `prefix`.

    The config was validated when it was given (kong.yml, the Admin API), so a certificate that has
    lapsed since is served with a warning rather than stopping the node (see `validity_unchecked`).
    Raises ConfigError if OpenSSL refuses a certificate.
    """
    with validity_unchecked():
        return CertificateStore.from_config(config, default=default_certificate(prefix))


def server_context(store: CertificateStore | CurrentStore) -> ssl.SSLContext:
    """The listener's context: TLS 1.2/1.3, Mozilla intermediate ciphers, ALPN http/1.1, and an SNI
    callback that switches each connection to its certificate's context.

    Pass a `CurrentStore` to be able to swap certificates later; a bare store is wrapped in one.
    """
    current = store if isinstance(store, CurrentStore) else CurrentStore(store)
    context = _base_context()
    # The listener itself holds no certificate: the callback runs for every ClientHello (with
    # server_name None when the client sent no SNI) and always picks one.

    def pick_certificate(ssl_object: ssl.SSLObject, server_name: str | None, _listener: ssl.SSLContext) -> None:
        name = server_name.lower() if server_name else None
        setattr(ssl_object, _SNI_ATTRIBUTE, name)
        ssl_object.context = current.store.lookup(name).context

    context.sni_callback = pick_certificate  # type: ignore[assignment]
    return context


def selected_sni(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The server name the client sent (lowercased), or None: no SNI, or not a TLS connection.

    For the proxy: `selected_sni(transport.get_extra_info("ssl_object"))`.
    """
    return getattr(ssl_object, _SNI_ATTRIBUTE, None)


# --------------------------------------------------------------------------------------------
# The default certificate
# --------------------------------------------------------------------------------------------


def generate_self_signed(common_name: str = "localhost", days: int = DEFAULT_CERT_DAYS) -> PemPair:
    """A self-signed EC P-256 certificate (fast handshakes; every current TLS client takes ECDSA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little so a client whose clock lags does not see a certificate from the future.
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return PemPair(certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode())


@functools.cache
def process_default_certificate() -> PemPair:
    """A self-signed default made once per process, for callers without a prefix (tests, tools)."""
    log.warning("no default TLS certificate given: serving a self-signed one (CN=localhost) made for this process")
    return generate_self_signed()


def _usable_default(pair: PemPair, now: datetime) -> bool:
    try:
        leaf = load_certificate_chain(pair.cert)[0]
        key = load_private_key(pair.key)
    except PemError:
        return False
    return key_matches(leaf, key) and leaf.not_valid_after_utc - DEFAULT_CERT_RENEW_BEFORE > now


def default_certificate(prefix: str) -> PemPair:
    """`<prefix>/ssl/default.crt|key`: reused while valid, else (re)generated and written.

    A lock file makes concurrent callers (workers starting together) agree on one certificate;
    the files are replaced by rename, so a reader never sees half of one. Call it in the master
    before forking and hand the pair to the workers, or in every worker: both give one certificate.
    """
    directory = os.path.join(prefix, SSL_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path = os.path.join(directory, DEFAULT_CERT_FILE)
    key_path = os.path.join(directory, DEFAULT_KEY_FILE)
    with open(os.path.join(directory, ".default.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(cert_path) as cert_file, open(key_path) as key_file:
                pair = PemPair(cert_file.read(), key_file.read())
            if _usable_default(pair, datetime.now(UTC)):
                return pair
            reason = "it expires soon, has expired or does not match its key"
        except FileNotFoundError:
            reason = "none was there yet"
        pair = generate_self_signed()
        _write_private(key_path, pair.key)
        _write_private(cert_path, pair.cert)
        log.warning(
            "generated a self-signed default TLS certificate (CN=localhost) in %s (%s); clients that send no "
            "SNI or an unknown name get it unless the config has an SNI '*'",
            cert_path,
            reason,
        )
        return pair


def _write_private(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


__all__ = [
    "ALPN_PROTOCOLS",
    "CATCH_ALL_SNI",
    "INTERMEDIATE_CIPHERS",
    "CertificateStore",
    "CurrentStore",
    "PemError",
    "PemPair",
    "ServedCertificate",
    "ca_certificate_digest",
    "ca_certificate_problems",
    "certificate_problems",
    "certificates_fingerprint",
    "default_certificate",
    "generate_self_signed",
    "node_store",
    "process_default_certificate",
    "selected_sni",
    "server_context",
    "validity_unchecked",
]
