"""TLS termination: an SSL context per app, chosen by SNI.

An operator's certificate (``--tls-cert/--tls-key``, for example for ``*.<domain>``) serves every
app. Without one, hangar makes a CA of its own once and signs a certificate per app for
``<app>.<domain>`` with it (ECDSA P-256, via ``cryptography``); keys and certificates are cached
under ``state_dir/tls`` with mode 0600, so clients can trust ``ca.crt`` once.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hangar.errors import InvalidRequest

CA_NAME = "hangar proxy CA"
LEAF_DAYS = 90
CA_DAYS = 3650
MAX_CACHED_CONTEXTS = 4096
SNI_APP_ATTRIBUTE = "hangar_app"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertificateAuthority:
    """hangar's own CA: made on first use, then read back from ``directory``."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        cert_path = directory / "ca.crt" if directory else None
        key_path = directory / "ca.key" if directory else None
        if cert_path and key_path and cert_path.exists() and key_path.exists():
            self.cert_pem = cert_path.read_bytes()
            self.key_pem = key_path.read_bytes()
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .sign(key, hashes.SHA256())
            )
            self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            self.key_pem = _key_pem(key)
            if cert_path and key_path:
                _write_private(key_path, self.key_pem)
                _write_private(cert_path, self.cert_pem)
        self._cert = x509.load_pem_x509_certificate(self.cert_pem)
        loaded = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise InvalidRequest("hangar's CA key is not an EC key", path=str(key_path))
        self._key = loaded

    def issue(self, hostname: str) -> tuple[bytes, bytes]:
        """A leaf certificate and key for ``hostname``, PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidRequest(
            f"cannot load TLS certificate {cert_file}: {exc}", path=str(cert_file)
        ) from exc
    return context


class CertStore:
    """The SSL context for each app, and the listener context that picks one by SNI."""

    def __init__(
        self,
        domain: str,
        state_dir: Path | None = None,
        operator_cert: Path | None = None,
        operator_key: Path | None = None,
    ) -> None:
        self.domain = domain.lower().strip(".")
        self.directory = state_dir / "tls" if state_dir else None
        self._operator: ssl.SSLContext | None = None
        self._operator_files: tuple[Path, Path] | None = None
        if operator_cert or operator_key:
            if not (operator_cert and operator_key):
                raise InvalidRequest("give both a TLS certificate and its key", field="tls_key")
            self._operator_files = (operator_cert, operator_key)
            self._operator = _server_context(operator_cert, operator_key)
        self._ca: CertificateAuthority | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority(self.directory)
        return self._ca

    def app_for(self, server_name: str | None) -> str | None:
        """``web.<domain>`` -> ``web``; None for a name outside the domain."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        suffix = "." + self.domain
        if not name.endswith(suffix):
            return None
        app = name[: -len(suffix)]
        return app if app and "." not in app else None

    def context_for(self, app: str) -> ssl.SSLContext:
        context = self._contexts.get(app)
        if context is not None:
            return context
        context = self._operator if self._operator is not None else self._generated(app)
        if len(self._contexts) >= MAX_CACHED_CONTEXTS:
            self._contexts.pop(next(iter(self._contexts)))
        self._contexts[app] = context
        return context

    def _generated(self, app: str) -> ssl.SSLContext:
        hostname = f"{app}.{self.domain}"
        if self.directory is not None:
            cert_file = self.directory / f"{app}.crt"
            key_file = self.directory / f"{app}.key"
            if not (cert_file.exists() and key_file.exists()):
                cert_pem, key_pem = self.ca.issue(hostname)
                _write_private(key_file, key_pem)
                _write_private(cert_file, cert_pem + self.ca.cert_pem)
            return _server_context(cert_file, key_file)
        cert_pem, key_pem = self.ca.issue(hostname)
        with tempfile.TemporaryDirectory(prefix="hangar-tls-") as scratch:
            cert_file, key_file = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
            _write_private(key_file, key_pem)
            _write_private(cert_file, cert_pem + self.ca.cert_pem)
            return _server_context(cert_file, key_file)

    def listener_context(self, apps: set[str]) -> ssl.SSLContext:
        """The context a TLS listener starts with: it picks each app's context by SNI and
        marks the connection with the app (``SNI_APP_ATTRIBUTE`` on the ``ssl_object``); a name
        that is not one of ``apps`` has its handshake refused."""
        if self._operator_files is not None:
            listener = _server_context(*self._operator_files)
        else:
            listener = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            listener.minimum_version = ssl.TLSVersion.TLSv1_2
            listener.set_alpn_protocols(["http/1.1"])

        def pick(
            ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
        ) -> int | None:
            app = self.app_for(server_name)
            if app is None or app not in apps:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            setattr(ssl_object, SNI_APP_ATTRIBUTE, app)
            if self._operator is None:
                ssl_object.context = self.context_for(app)
            return None

        listener.sni_callback = pick
        return listener


def sni_app(ssl_object: object) -> str | None:
    """The app a TLS connection's SNI named (set during its handshake)."""
    app = getattr(ssl_object, SNI_APP_ATTRIBUTE, None)
    return app if isinstance(app, str) else None
